//! The VAE's activation choice: the reference's Bezier curves, or a plain ReLU/SiLU/GELU
//! baseline of the same architecture (`model.activation`, `model.baseline_width_mult`).
//!
//! A Bezier site is a layer that produces 5C channels followed by `BezierActivation` (sigmoid,
//! SiLU) down to C. The baseline replaces every such site in the compressor and the expander
//! by the same layer producing C channels followed by the plain activation. The per-channel
//! `TrainableBezier` heads (mu, logvar, RGB) are not sites and stay. A baseline's internal
//! widths (those between two sites: the encoder stages, the first layer of each 1x1 head
//! pair, the attention blocks' feed-forward width and the expander blocks' middle width) are
//! multiplied by `baseline_width_mult` and rounded; the widths the rest of the model sees (the
//! latent, the tokens, the expander's residual stream) never change.

use std::fmt;
use std::str::FromStr;

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use super::bezier::BezierActivation;

/// The activation of every VAE site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Activation {
    /// The reference: a layer to 5C channels, then the Bezier activation (sigmoid, SiLU).
    #[default]
    Bezier,
    Relu,
    Silu,
    /// The exact (erf) GELU, PyTorch's `nn.GELU()` default.
    Gelu,
}

impl Activation {
    pub const ALL: [Activation; 4] = [
        Activation::Bezier,
        Activation::Relu,
        Activation::Silu,
        Activation::Gelu,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Activation::Bezier => "bezier",
            Activation::Relu => "relu",
            Activation::Silu => "silu",
            Activation::Gelu => "gelu",
        }
    }

    pub fn is_bezier(self) -> bool {
        self == Activation::Bezier
    }

    /// Channels the layer before a site produces for an output of `c`: 5c for Bezier.
    pub fn site_width(self, c: usize) -> usize {
        if self.is_bezier() {
            5 * c
        } else {
            c
        }
    }

    /// The site's activation: [.., 5C, ..] -> [.., C, ..] for Bezier (grouped as
    /// `BezierActivation` groups), elementwise for the baselines.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Bezier => BezierActivation::VAE.forward(x),
            Activation::Relu => x.relu(),
            Activation::Silu => x.silu(),
            Activation::Gelu => x.gelu_erf(),
        }
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl TryFrom<String> for Activation {
    type Error = anyhow::Error;

    fn try_from(s: String) -> anyhow::Result<Self> {
        s.parse()
    }
}

impl From<Activation> for String {
    fn from(a: Activation) -> String {
        a.name().to_string()
    }
}

impl FromStr for Activation {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "unknown activation {s:?} (model.activation): expected bezier, relu, silu or gelu"
                )
            })
    }
}
