//! `fluxflow info`: what a checkpoint holds.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::{Context, Result};

use crate::cli::InfoArgs;
use crate::model::{Activation, FluxModel, ModelConfig};
use crate::weights::{detect_config, read_architecture, read_tensors};

/// A checkpoint's description.
#[derive(Debug)]
pub struct Info {
    pub config: ModelConfig,
    /// Trainable parameters per component (`compressor`, `expander`, `flow_processor`,
    /// `text_encoder`), buffers excluded.
    pub parameters: BTreeMap<String, usize>,
    pub tensors: usize,
    /// Tensor count per stored dtype.
    pub dtypes: BTreeMap<String, usize>,
    /// VAE (compressor + expander) parameters of the Bezier model of these dimensions.
    pub bezier_vae_parameters: usize,
    /// For a Bezier checkpoint: the parameter-matched baseline's width multiplier and VAE
    /// parameter count (the same for ReLU, SiLU and GELU, which have no parameters).
    pub matched_baseline: Option<(f64, usize)>,
}

/// Buffers saved in a state_dict that are not parameters.
fn is_buffer(name: &str) -> bool {
    name.ends_with(".rotary_pe.inv_freq")
}

fn component(name: &str) -> Option<String> {
    let mut parts = name.split('.');
    match (parts.next(), parts.next()) {
        (Some("diffuser"), Some(c)) => Some(c.to_string()),
        (Some("text_encoder"), _) => Some("text_encoder".to_string()),
        _ => None,
    }
}

pub fn run(args: &InfoArgs) -> Result<Info> {
    let tensors = read_tensors(&args.checkpoint)?;
    let (activation, mult) = read_architecture(&args.checkpoint)?;
    let config = detect_config(&tensors, activation, mult).with_context(|| {
        format!(
            "cannot detect the model dimensions of {}",
            args.checkpoint.display()
        )
    })?;
    let bezier = ModelConfig {
        activation: Activation::Bezier,
        baseline_width_mult: 1.0,
        ..config.clone()
    };
    let bezier_vae_parameters = FluxModel::vae_parameter_count(&bezier)?;
    let matched_baseline = if activation.is_bezier() {
        let m = FluxModel::matched_width_mult(&bezier, Activation::Relu)?;
        let relu = ModelConfig {
            activation: Activation::Relu,
            baseline_width_mult: m,
            ..bezier.clone()
        };
        Some((m, FluxModel::vae_parameter_count(&relu)?))
    } else {
        None
    };
    let mut parameters = BTreeMap::new();
    let mut dtypes = BTreeMap::new();
    let mut count = 0;
    for (name, t) in &tensors {
        let Some(c) = component(name) else { continue };
        count += 1;
        *dtypes.entry(format!("{:?}", t.dtype())).or_insert(0) += 1;
        if !is_buffer(name) {
            *parameters.entry(c).or_insert(0) += t.elem_count();
        }
    }
    Ok(Info {
        config,
        parameters,
        tensors: count,
        dtypes,
        bezier_vae_parameters,
        matched_baseline,
    })
}

impl Info {
    /// Parameters of the VAE (compressor and expander).
    pub fn vae_parameters(&self) -> usize {
        ["compressor", "expander"]
            .iter()
            .filter_map(|k| self.parameters.get(*k))
            .sum()
    }

    /// Parameters of the model file (`diffuser.*`): the reference's total.
    pub fn model_parameters(&self) -> usize {
        self.parameters
            .iter()
            .filter(|(k, _)| *k != "text_encoder")
            .map(|(_, v)| v)
            .sum()
    }
}

impl fmt::Display for Info {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(f, "model dimensions (detected from tensor shapes):")?;
        writeln!(
            f,
            "  vae_dim {}  downscales {}  upscales {}  vae attention layers {}",
            c.vae_dim, c.downscales, c.upscales, c.vae_attn_layers
        )?;
        writeln!(
            f,
            "  flow_dim {}  flow heads {}  flow blocks {}  text_embedding_dim {}  text hidden {}",
            c.flow_dim, c.flow_heads, c.flow_layers, c.text_embedding_dim, c.text_hidden
        )?;
        if c.activation.is_bezier() {
            writeln!(f, "activation: bezier")?;
        } else {
            writeln!(
                f,
                "activation: {} baseline, widths x{:.4}",
                c.activation, c.baseline_width_mult
            )?;
        }
        writeln!(f, "parameters:")?;
        for (k, v) in self.parameters.iter().filter(|(k, _)| *k != "text_encoder") {
            writeln!(f, "  {k:<16} {}", group(*v))?;
        }
        writeln!(f, "  {:<16} {}", "total", group(self.model_parameters()))?;
        if let Some(t) = self.parameters.get("text_encoder") {
            writeln!(
                f,
                "  text projection  {} (text_encoder.*, not in the total)",
                group(*t)
            )?;
        }
        writeln!(
            f,
            "VAE parameters (compressor + expander): {} ({}); the Bezier VAE of these dimensions: {}",
            group(self.vae_parameters()),
            c.activation,
            group(self.bezier_vae_parameters)
        )?;
        if let Some((m, n)) = self.matched_baseline {
            writeln!(
                f,
                "  a parameter-matched relu/silu/gelu baseline (baseline_width_mult {m:.4}): {}",
                group(n)
            )?;
        }
        let dt: Vec<String> = self
            .dtypes
            .iter()
            .map(|(k, v)| format!("{k} x{v}"))
            .collect();
        write!(f, "tensors: {} ({})", self.tensors, dt.join(", "))
    }
}

/// 112027928 -> "112,027,928"
pub fn group(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
