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

/// [`count`] for a field that must be positive: none is an error naming the tensors that
/// are missing (the whole component's when it has none at all, e.g. `diffuser.expander.*`).
fn counted(t: &HashMap<String, Tensor>, prefix: &str, suffix: &str, field: &str) -> Result<usize> {
    let n = count(t, prefix, suffix);
    if n > 0 {
        return Ok(n);
    }
    let component: String = prefix.split('.').take(2).collect::<Vec<_>>().join(".") + ".";
    if t.keys().any(|k| k.starts_with(&component)) {
        bail!("no {prefix}0{suffix} tensor: cannot detect model.{field}");
    }
    bail!("no {component}* tensors: cannot detect model.{field} (the file lacks that part of the model)")
}

/// The fields of [`ModelConfig`] that [`detect_config`] reads from a model file's tensor
/// shapes or metadata, given its tensors: the others (`vae_attn_heads`, `in_channels`,
/// `max_hw`, `ctx_tokens`, and `flow_heads`, `text_embedding_dim` and `text_hidden` when
/// their tensors are absent) are defaults, not the file's.
pub fn determined_fields(t: &HashMap<String, Tensor>) -> Vec<&'static str> {
    let mut fields = vec![
        "activation",
        "baseline_width_mult",
        "vae_dim",
        "downscales",
        "upscales",
        "vae_attn_layers",
        "flow_dim",
        "flow_layers",
    ];
    for (name, field) in [
        (
            "diffuser.flow_processor.transformer_blocks.0.rotary_pe.inv_freq",
            "flow_heads",
        ),
        (
            "diffuser.flow_processor.text_proj.weight",
            "text_embedding_dim",
        ),
        ("text_encoder.ouput_layer.0.weight", "text_hidden"),
    ] {
        if t.contains_key(name) {
            fields.push(field);
        }
    }
    fields
}

/// `field`'s value in `cfg`, for messages; None for a name that is not a field.
fn field_value(cfg: &ModelConfig, field: &str) -> Option<String> {
    Some(match field {
        "activation" => cfg.activation.to_string(),
        "baseline_width_mult" => cfg.baseline_width_mult.to_string(),
        "vae_dim" => cfg.vae_dim.to_string(),
        "in_channels" => cfg.in_channels.to_string(),
        "downscales" => cfg.downscales.to_string(),
        "upscales" => cfg.upscales.to_string(),
        "vae_attn_layers" => cfg.vae_attn_layers.to_string(),
        "vae_attn_heads" => cfg.vae_attn_heads.to_string(),
        "flow_dim" => cfg.flow_dim.to_string(),
        "flow_heads" => cfg.flow_heads.to_string(),
        "flow_layers" => cfg.flow_layers.to_string(),
        "text_embedding_dim" => cfg.text_embedding_dim.to_string(),
        "text_hidden" => cfg.text_hidden.to_string(),
        "max_hw" => cfg.max_hw.to_string(),
        "ctx_tokens" => cfg.ctx_tokens.to_string(),
        _ => return None,
    })
}

/// Each of `fields` whose value differs between a model file's detected config and a wanted
/// one, as `name: file X, config Y`.
pub fn differing_fields(file: &ModelConfig, wanted: &ModelConfig, fields: &[&str]) -> Vec<String> {
    fields
        .iter()
        .filter_map(|&f| {
            let (a, b) = (field_value(file, f)?, field_value(wanted, f)?);
            (a != b).then(|| format!("{f}: file {a}, config {b}"))
        })
        .collect()
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
    cfg.downscales = counted(
        t,
        "diffuser.compressor.encoder_z.",
        ".0.weight",
        "downscales",
    )?;
    cfg.upscales = counted(
        t,
        "diffuser.expander.upscale.layers.",
        ".conv1.0.weight",
        "upscales",
    )?;
    cfg.vae_attn_layers = count(t, "diffuser.compressor.token_attn.", ".attn.in_proj_weight");
    let v2d = "diffuser.flow_processor.vae_to_dmodel.weight";
    cfg.flow_dim = match dims(t, v2d) {
        Some([o, _]) => *o,
        _ => bail!("no {v2d} of rank 2: cannot detect the flow dimension"),
    };
    cfg.flow_layers = counted(
        t,
        "diffuser.flow_processor.transformer_blocks.",
        ".self_attn.q_proj.weight",
        "flow_layers",
    )?;
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
        let mut t = tensors_of(&small());
        t.retain(|k, _| !k.starts_with("diffuser.expander."));
        let e = detect_config(&t, Activation::Bezier, 1.0).unwrap_err();
        assert!(
            e.to_string().contains("no diffuser.expander.* tensors")
                && e.to_string().contains("model.upscales"),
            "{e}"
        );
    }

    #[test]
    fn only_the_fields_the_shapes_determine_are_compared_and_each_difference_is_named() {
        let t = tensors_of(&small());
        let fields = determined_fields(&t);
        assert!(fields.contains(&"text_hidden") && !fields.contains(&"vae_attn_heads"));
        let file = detect_config(&t, Activation::Bezier, 1.0).unwrap();
        let wanted = ModelConfig {
            vae_attn_heads: 2,
            ..small()
        };
        assert!(differing_fields(&file, &wanted, &fields).is_empty());
        let wanted = ModelConfig {
            vae_dim: 32,
            flow_layers: 1,
            ..small()
        };
        assert_eq!(
            differing_fields(&file, &wanted, &fields),
            [
                "vae_dim: file 16, config 32",
                "flow_layers: file 2, config 1"
            ]
        );
        let mut t = t;
        t.retain(|k, _| !k.starts_with("text_encoder."));
        assert!(!determined_fields(&t).contains(&"text_hidden"));
    }
}
