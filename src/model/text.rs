//! Ports the trainable output projection of `BertTextEncoder` (`ouput_layer`, sic) from
//! fluxflow-core's `models/encoders.py`. The frozen DistilBERT backbone is not part of it.

use candle_core::{Module, Result, Tensor};

use super::bezier::BezierActivation;
use super::config::ModelConfig;
use crate::nn::{InitKind, LayerNorm, Linear};
use crate::params::Pb;

/// Linear(hidden, 2560) -> LayerNorm -> Bezier -> Linear(512, 5E) -> LayerNorm -> Bezier.
#[derive(Debug, Clone)]
pub struct TextProjection {
    lin1: Linear,
    norm1: LayerNorm,
    lin2: Linear,
    norm2: LayerNorm,
}

impl TextProjection {
    pub fn new(cfg: &ModelConfig, pb: Pb) -> Result<Self> {
        let e = cfg.text_embedding_dim;
        Ok(Self {
            lin1: Linear::new(cfg.text_hidden, 2560, InitKind::Xavier, pb.pp(0))?,
            norm1: LayerNorm::new(2560, pb.pp(1))?,
            lin2: Linear::new(512, e * 5, InitKind::Xavier, pb.pp(3))?,
            norm2: LayerNorm::new(e * 5, pb.pp(4))?,
        })
    }

    /// Sentence embedding [B, hidden] -> [B, E]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let bez = BezierActivation::DEFAULT;
        let h = bez.forward(&self.norm1.forward(&self.lin1.forward(x)?)?)?;
        bez.forward(&self.norm2.forward(&self.lin2.forward(&h)?)?)
    }
}
