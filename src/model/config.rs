//! Model hyper-parameters, with the Phase 1 values as defaults.

use serde::{Deserialize, Serialize};

use super::activation::Activation;

/// Dimensions of the whole FluxFlow model (compressor, expander, flow processor, text
/// projection). Defaults are the Phase 1 model of `configs/config-p1-128.yaml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Latent width of the VAE (`vae_dim`).
    pub vae_dim: usize,
    pub in_channels: usize,
    pub downscales: usize,
    pub upscales: usize,
    /// Self-attention blocks over the latent tokens.
    pub vae_attn_layers: usize,
    pub vae_attn_heads: usize,
    /// Flow processor width (`feature_maps_dim`).
    pub flow_dim: usize,
    pub flow_heads: usize,
    pub flow_layers: usize,
    /// Text embedding size (`text_embedding_dim`).
    pub text_embedding_dim: usize,
    /// Hidden size of the text backbone (768 for DistilBERT).
    pub text_hidden: usize,
    pub max_hw: usize,
    pub ctx_tokens: usize,
    /// The VAE's activation sites: Bezier (the reference) or a plain baseline.
    pub activation: Activation,
    /// A baseline's internal widths are multiplied by this (see `model::activation`); 1 for
    /// Bezier.
    pub baseline_width_mult: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            vae_dim: 128,
            in_channels: 3,
            downscales: 4,
            upscales: 4,
            vae_attn_layers: 4,
            vae_attn_heads: 8,
            flow_dim: 128,
            flow_heads: 8,
            flow_layers: 10,
            text_embedding_dim: 1024,
            text_hidden: 768,
            max_hw: 1024,
            ctx_tokens: 4,
            activation: Activation::Bezier,
            baseline_width_mult: 1.0,
        }
    }
}

impl ModelConfig {
    /// A width between two activation sites: `c` for Bezier, round(c x baseline_width_mult)
    /// (at least 1) for a baseline.
    pub fn wide(&self, c: usize) -> usize {
        if self.activation.is_bezier() {
            c
        } else {
            ((c as f64 * self.baseline_width_mult).round() as usize).max(1)
        }
    }

    /// Checks the combinations the layers need; the error names the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        let positive = [
            ("vae_dim", self.vae_dim),
            ("downscales", self.downscales),
            ("upscales", self.upscales),
            ("vae_attn_heads", self.vae_attn_heads),
            ("flow_dim", self.flow_dim),
            ("flow_heads", self.flow_heads),
            ("flow_layers", self.flow_layers),
            ("text_embedding_dim", self.text_embedding_dim),
            ("text_hidden", self.text_hidden),
            ("max_hw", self.max_hw),
        ];
        for (name, v) in positive {
            if v == 0 {
                anyhow::bail!("model.{name} must be positive");
            }
        }
        if !(self.baseline_width_mult.is_finite() && self.baseline_width_mult > 0.0) {
            anyhow::bail!(
                "model.baseline_width_mult must be a positive number, got {}",
                self.baseline_width_mult
            );
        }
        if self.in_channels != 3 {
            anyhow::bail!(
                "model.in_channels must be 3 (RGB), got {}",
                self.in_channels
            );
        }
        if !self.vae_dim.is_multiple_of(self.vae_attn_heads) {
            anyhow::bail!(
                "model.vae_dim ({}) must be divisible by model.vae_attn_heads ({})",
                self.vae_dim,
                self.vae_attn_heads
            );
        }
        if !self.vae_dim.is_multiple_of(4) {
            anyhow::bail!("model.vae_dim ({}) must be a multiple of 4", self.vae_dim);
        }
        if self.vae_dim > 32 && !self.vae_dim.is_multiple_of(32) {
            anyhow::bail!(
                "model.vae_dim ({}) must be at most 32 or a multiple of 32: the expander's SPADE \
                 normalises its channels in min(32, vae_dim) groups",
                self.vae_dim
            );
        }
        if !self.flow_dim.is_multiple_of(self.flow_heads)
            || !(self.flow_dim / self.flow_heads).is_multiple_of(2)
        {
            anyhow::bail!(
                "model.flow_dim ({}) must split into model.flow_heads ({}) heads of even size",
                self.flow_dim,
                self.flow_heads
            );
        }
        Ok(())
    }
}
