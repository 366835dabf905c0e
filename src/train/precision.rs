//! Mixed precision (`training.mixed_precision`): float32 master weights, optimizer state, loss
//! and norm statistics; activations, convolutions and matrix products in a 16-bit float.
//! Parameters are cast where they meet an activation (`nn::cast_like`), whose backward pass
//! hands the float32 variables their gradients.

use candle_core::DType;
use serde::{Deserialize, Deserializer, Serialize};

/// `no`, `bf16` or `fp16` (the reference's `use_fp16: true`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MixedPrecision {
    #[default]
    No,
    Bf16,
    Fp16,
}

impl MixedPrecision {
    /// The dtype activations are computed in, for master weights in `master`.
    pub fn compute_dtype(self, master: DType) -> DType {
        match self {
            MixedPrecision::No => master,
            MixedPrecision::Bf16 => DType::BF16,
            MixedPrecision::Fp16 => DType::F16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            MixedPrecision::No => "no",
            MixedPrecision::Bf16 => "bf16",
            MixedPrecision::Fp16 => "fp16",
        }
    }
}

impl std::str::FromStr for MixedPrecision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "no" => Ok(MixedPrecision::No),
            "bf16" => Ok(MixedPrecision::Bf16),
            "fp16" => Ok(MixedPrecision::Fp16),
            other => Err(format!(
                "training.mixed_precision: unknown value {other:?}; use no, bf16 or fp16"
            )),
        }
    }
}

// By hand, so that a bad value's error names the setting (serde's names only the variants).
impl<'de> Deserialize<'de> for MixedPrecision {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for MixedPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
