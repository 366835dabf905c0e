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

/// Dynamic loss scaling for fp16 (PyTorch's `GradScaler` with its defaults): the loss is
/// multiplied by `scale` before the backward pass so that small gradients survive float16, and
/// the gradients are divided by it before clipping. A step whose scaled gradients overflow is
/// skipped and halves the scale; `growth_interval` clean steps in a row double it. Saved with
/// the trainer's state, so a resumed run continues with the same scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u64,
    /// Clean steps since the scale last changed.
    pub good_steps: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self {
            scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            good_steps: 0,
        }
    }
}

impl LossScaler {
    /// After a step: `overflow` (non-finite scaled gradients) backs off, a clean step counts
    /// towards growth.
    pub fn update(&mut self, overflow: bool) {
        if overflow {
            self.scale *= self.backoff_factor;
            self.good_steps = 0;
        } else {
            self.good_steps += 1;
            if self.good_steps >= self.growth_interval {
                self.scale *= self.growth_factor;
                self.good_steps = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_backs_off_on_overflow_and_grows_after_clean_steps() {
        let mut s = LossScaler {
            growth_interval: 3,
            ..LossScaler::default()
        };
        s.update(true);
        assert_eq!((s.scale, s.good_steps), (32768.0, 0));
        s.update(false);
        s.update(false);
        assert_eq!(s.scale, 32768.0);
        s.update(true);
        assert_eq!((s.scale, s.good_steps), (16384.0, 0));
        for _ in 0..3 {
            s.update(false);
        }
        assert_eq!((s.scale, s.good_steps), (32768.0, 0));
    }

    #[test]
    fn mixed_precision_values_parse_and_name_the_setting_when_wrong() {
        assert_eq!("bf16".parse::<MixedPrecision>(), Ok(MixedPrecision::Bf16));
        assert_eq!("fp16".parse::<MixedPrecision>(), Ok(MixedPrecision::Fp16));
        assert_eq!("no".parse::<MixedPrecision>(), Ok(MixedPrecision::No));
        let e = "half".parse::<MixedPrecision>().unwrap_err();
        assert!(
            e.contains("training.mixed_precision") && e.contains("half"),
            "{e}"
        );
        assert_eq!(MixedPrecision::Fp16.compute_dtype(DType::F32), DType::F16);
    }
}
