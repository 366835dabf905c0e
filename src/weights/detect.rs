//! What model a model file holds: the activation and width multiplier its metadata records, and
//! the dimensions its tensor shapes imply.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Tensor;

use super::read::read_header;
use crate::model::{Activation, ModelConfig};

/// Metadata keys of a baseline model file: its activation and width multiplier. A file without
/// them (the reference's, or ours with Bezier activations) is a Bezier model.
pub const ACTIVATION_KEY: &str = "fluxflow.activation";
pub const WIDTH_MULT_KEY: &str = "fluxflow.baseline_width_mult";

/// The activation and baseline width multiplier a model file records in its safetensors
/// metadata (Bezier and 1 when it records none). Reads the header only.
pub fn read_architecture(path: &Path) -> Result<(Activation, f64)> {
    let header = read_header(path)?;
    let meta = &header["__metadata__"];
    let activation = match meta[ACTIVATION_KEY].as_str() {
        None => return Ok((Activation::Bezier, 1.0)),
        Some(a) => a
            .parse::<Activation>()
            .with_context(|| format!("{}: metadata {ACTIVATION_KEY}", path.display()))?,
    };
    let mult = match meta[WIDTH_MULT_KEY].as_str() {
        None => 1.0,
        Some(m) => m
            .parse::<f64>()
            .ok()
            .filter(|m| m.is_finite() && *m > 0.0)
            .ok_or_else(|| {
                anyhow!(
                    "{}: metadata {WIDTH_MULT_KEY} is {m:?}, not a positive number",
                    path.display()
                )
            })?,
    };
    Ok((activation, mult))
}

fn dims<'a>(t: &'a HashMap<String, Tensor>, name: &str) -> Option<&'a [usize]> {
    t.get(name).map(|x| x.dims())
}

fn count(t: &HashMap<String, Tensor>, prefix: &str, suffix: &str) -> usize {
    (0..)
        .take_while(|i| t.contains_key(&format!("{prefix}{i}{suffix}")))
        .count()
}

/// The model dimensions implied by a model file's tensor shapes (the reference's
/// `_detect_config`), for the activation and baseline width multiplier its metadata records
/// ([`read_architecture`]); a baseline's VAE dimension comes from its mu head. The compressor's
/// head count is not recorded in a model file; like the reference, it is taken to be 8.
pub fn detect_config(
    t: &HashMap<String, Tensor>,
    activation: Activation,
    baseline_width_mult: f64,
) -> Result<ModelConfig> {
    let mut cfg = ModelConfig {
        activation,
        baseline_width_mult,
        ..ModelConfig::default()
    };
    let latent = "diffuser.compressor.latent_proj.0.0.weight";
    let mu = "diffuser.compressor.mu_activation.p0";
    cfg.vae_dim = match (activation.is_bezier(), dims(t, latent), dims(t, mu)) {
        (true, Some([o, ..]), _) if o % 5 == 0 => o / 5,
        (true, Some(d), _) => {
            bail!("{latent} has shape {d:?}: its first dimension is not 5 x vae_dim")
        }
        (false, _, Some([d])) => *d,
        (false, _, _) => bail!("no {mu} of rank 1: cannot detect the {activation} VAE's dimension"),
        (true, None, _) => {
            bail!("no {latent}: cannot detect the VAE dimension (not a FluxFlow model file?)")
        }
    };
    cfg.downscales = count(t, "diffuser.compressor.encoder_z.", ".0.weight");
    cfg.upscales = count(t, "diffuser.expander.upscale.layers.", ".conv1.0.weight");
    cfg.vae_attn_layers = count(t, "diffuser.compressor.token_attn.", ".attn.in_proj_weight");
    let v2d = "diffuser.flow_processor.vae_to_dmodel.weight";
    cfg.flow_dim = match dims(t, v2d) {
        Some([o, _]) => *o,
        _ => bail!("no {v2d} of rank 2: cannot detect the flow dimension"),
    };
    cfg.flow_layers = count(
        t,
        "diffuser.flow_processor.transformer_blocks.",
        ".self_attn.q_proj.weight",
    );
    let inv = "diffuser.flow_processor.transformer_blocks.0.rotary_pe.inv_freq";
    if let Some([half]) = dims(t, inv) {
        if *half == 0 || !cfg.flow_dim.is_multiple_of(2 * half) {
            bail!(
                "{inv} has {half} entries, which does not divide flow_dim {}",
                cfg.flow_dim
            );
        }
        cfg.flow_heads = cfg.flow_dim / (2 * half);
    }
    if let Some([_, e]) = dims(t, "diffuser.flow_processor.text_proj.weight") {
        cfg.text_embedding_dim = *e;
    }
    if let Some([_, h]) = dims(t, "text_encoder.ouput_layer.0.weight") {
        cfg.text_hidden = *h;
    }
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FluxModel;
    use candle_core::{DType, Device};

    /// A small config whose every detectable field differs from the Phase 1 defaults.
    fn small() -> ModelConfig {
        ModelConfig {
            vae_dim: 16,
            downscales: 2,
            upscales: 3,
            vae_attn_layers: 1,
            flow_dim: 24,
            flow_heads: 3,
            flow_layers: 2,
            text_embedding_dim: 20,
            text_hidden: 12,
            ..ModelConfig::default()
        }
    }

    fn tensors_of(cfg: &ModelConfig) -> HashMap<String, Tensor> {
        let model = FluxModel::fresh(cfg, DType::F32, &Device::Cpu, 1).unwrap();
        let mut t: HashMap<String, Tensor> = model.params.tensors("").into_iter().collect();
        t.retain(|k, _| k.starts_with("diffuser.") || k.starts_with("text_encoder."));
        t
    }

    #[test]
    fn dimensions_come_back_from_the_shapes_of_a_bezier_and_a_baseline_model() {
        let cfg = small();
        assert_eq!(
            detect_config(&tensors_of(&cfg), Activation::Bezier, 1.0).unwrap(),
            cfg
        );
        let relu = ModelConfig {
            activation: Activation::Relu,
            baseline_width_mult: 1.5,
            ..small()
        };
        assert_eq!(
            detect_config(&tensors_of(&relu), Activation::Relu, 1.5).unwrap(),
            relu
        );
    }

    #[test]
    fn a_file_without_the_detecting_tensors_is_named_for_what_is_missing() {
        let mut t = tensors_of(&small());
        t.remove("diffuser.flow_processor.vae_to_dmodel.weight");
        let e = detect_config(&t, Activation::Bezier, 1.0).unwrap_err();
        assert!(e.to_string().contains("vae_to_dmodel"), "{e}");
        let e = detect_config(&HashMap::new(), Activation::Bezier, 1.0).unwrap_err();
        assert!(e.to_string().contains("not a FluxFlow model file"), "{e}");
    }
}
