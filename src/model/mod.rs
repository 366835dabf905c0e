//! The FluxFlow model, ported layer for layer from fluxflow-core (`models/`), with tensor names
//! identical to the reference's state_dict.

pub mod bezier;
pub mod compressor;
pub mod conditioning;
pub mod config;
pub mod expander;
pub mod flow;
pub mod recompute;
pub mod text;

use candle_core::{DType, Device, Result};

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

    /// A freshly initialised model (the reference's initialisation, drawn from `seed`).
    pub fn fresh(config: &ModelConfig, dtype: DType, device: &Device, seed: u64) -> Result<Self> {
        Self::build(config, ParamStore::fresh(dtype, device, seed))
    }
}
