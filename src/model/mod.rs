//! The FluxFlow model, ported layer for layer from fluxflow-core (`models/`), with tensor names
//! identical to the reference's state_dict.

pub mod activation;
pub mod bezier;
pub mod compressor;
pub mod conditioning;
pub mod config;
pub mod expander;
pub mod flow;
pub mod recompute;
pub mod text;

use candle_core::{DType, Device, Result};

pub use activation::Activation;
pub use bezier::{BezierActivation, PreAct, TrainableBezier};
pub use compressor::{Encoded, FluxCompressor, Noise};
pub use config::ModelConfig;
pub use expander::FluxExpander;
pub use flow::FluxFlowProcessor;
pub use recompute::Recompute;
pub use text::TextProjection;

use crate::params::ParamStore;

/// Name prefixes of the model file and of the text projection file.
pub const COMPRESSOR: &str = "diffuser.compressor.";
pub const EXPANDER: &str = "diffuser.expander.";
pub const FLOW: &str = "diffuser.flow_processor.";
pub const DIFFUSER: &str = "diffuser.";
pub const TEXT: &str = "text_encoder.";

/// The whole model: the VAE (compressor + expander), the flow processor and the text
/// projection, all backed by one [`ParamStore`].
#[derive(Clone)]
pub struct FluxModel {
    pub config: ModelConfig,
    pub compressor: FluxCompressor,
    pub expander: FluxExpander,
    pub flow_processor: FluxFlowProcessor,
    pub text: TextProjection,
    pub params: ParamStore,
}

impl FluxModel {
    /// Builds every layer from `params` (fresh or loaded) under the reference names.
    pub fn build(config: &ModelConfig, params: ParamStore) -> Result<Self> {
        config
            .validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let root = params.root();
        let diffuser = root.pp("diffuser");
        Ok(Self {
            config: config.clone(),
            compressor: FluxCompressor::new(config, diffuser.pp("compressor"))?,
            expander: FluxExpander::new(config, diffuser.pp("expander"))?,
            flow_processor: FluxFlowProcessor::new(config, diffuser.pp("flow_processor"))?,
            text: TextProjection::new(config, root.pp("text_encoder").pp("ouput_layer"))?,
            params,
        })
    }

    /// Trainable parameters of the VAE (compressor and expander) of `config`, counted from
    /// the shapes alone (nothing allocated).
    pub fn vae_parameter_count(config: &ModelConfig) -> Result<usize> {
        let store = ParamStore::shapes(DType::F32, &Device::Cpu);
        let diffuser = store.root().pp("diffuser");
        FluxCompressor::new(config, diffuser.pp("compressor"))?;
        FluxExpander::new(config, diffuser.pp("expander"))?;
        Ok(store.parameter_count(DIFFUSER))
    }

    /// Trainable parameters of the whole model of `config` (VAE, flow processor and text
    /// projection), counted from the shapes alone (nothing allocated).
    pub fn parameter_count(config: &ModelConfig) -> Result<usize> {
        let store = ParamStore::shapes(DType::F32, &Device::Cpu);
        Self::build(config, store.clone())?;
        Ok(store.parameter_count(""))
    }

    /// The `baseline_width_mult` whose `activation` baseline has the VAE parameter count
    /// closest to the Bezier VAE of the same dimensions: the multiplier is searched by
    /// bisection (the count grows with it) between 1/16 and 16, then the better of the two
    /// neighbouring widths is taken.
    pub fn matched_width_mult(config: &ModelConfig, activation: Activation) -> Result<f64> {
        let bezier = ModelConfig {
            activation: Activation::Bezier,
            baseline_width_mult: 1.0,
            ..config.clone()
        };
        let target = Self::vae_parameter_count(&bezier)? as i64;
        if activation.is_bezier() {
            return Ok(1.0);
        }
        let count = |m: f64| -> Result<i64> {
            let c = ModelConfig {
                activation,
                baseline_width_mult: m,
                ..config.clone()
            };
            Ok(Self::vae_parameter_count(&c)? as i64)
        };
        let (mut lo, mut hi) = (1.0 / 16.0, 16.0);
        for _ in 0..40 {
            let mid = (lo + hi) / 2.0;
            if count(mid)? < target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let (below, above) = (count(lo)?, count(hi)?);
        Ok(if target - below < above - target {
            lo
        } else {
            hi
        })
    }

    /// A freshly initialised model (the reference's initialisation, drawn from `seed`).
    pub fn fresh(config: &ModelConfig, dtype: DType, device: &Device, seed: u64) -> Result<Self> {
        Self::build(config, ParamStore::fresh(dtype, device, seed))
    }
}
