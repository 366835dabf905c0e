//! `fluxflow info`: what a checkpoint holds.

use std::collections::BTreeMap;
use std::fmt;

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::cli::InfoArgs;
use crate::model::{Activation, FluxModel, ModelConfig, DIFFUSER, TEXT};
use crate::params::ParamStore;
use crate::weights::detect::{ACTIVATION_KEY, WIDTH_MULT_KEY};
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
    /// Tensors holding NaN or infinity: (name, how many values, of how many), by name. Loading
    /// the file (`reconstruct`, `eval`, `model_checkpoint`) refuses it.
    pub non_finite: Vec<(String, usize, usize)>,
}

/// Tensors with NaN or infinity: (name, non-finite values, values), sorted by name.
fn non_finite(tensors: &HashMap<String, Tensor>) -> Result<Vec<(String, usize, usize)>> {
    let mut out = Vec::new();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let t = &tensors[name];
        // 0 * x is 0 for every finite x and NaN for NaN and infinities.
        let probe = t
            .affine(0.0, 0.0)?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        if probe.is_finite() {
            continue;
        }
        let values = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let bad = values.iter().filter(|v| !v.is_finite()).count();
        out.push((name.clone(), bad, values.len()));
    }
    Ok(out)
}

/// The activation the tensor shapes imply, where they decide it: a Bezier site's convolution
/// has 5 outputs per channel it passes on, a baseline's one. Checked on the second 1x1 head
/// (`latent_proj.1`, `vae_dim` channels out of the site) against the mu head's `vae_dim`.
fn shapes_say_bezier(t: &HashMap<String, Tensor>) -> Option<(bool, String)> {
    let site = "diffuser.compressor.latent_proj.1.0.weight";
    let mu = "diffuser.compressor.mu_activation.p0";
    let out = *t.get(site)?.dims().first()?;
    let d = *t.get(mu)?.dims().first()?;
    if out == 5 * d {
        Some((
            true,
            format!("{site} has {out} output channels, 5 x the {d} of {mu}: a Bezier site"),
        ))
    } else if out == d {
        Some((
            false,
            format!("{site} has {out} output channels, the {d} of {mu}: a baseline's site"),
        ))
    } else {
        None
    }
}

/// Refuses a file whose metadata (activation, width multiplier) contradicts its tensor shapes,
/// saying which contradicts which.
fn check_metadata(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    activation: Activation,
    mult: f64,
) -> Result<()> {
    let recorded = if activation.is_bezier() {
        format!("no {ACTIVATION_KEY} in its metadata, which means a Bezier model")
    } else {
        format!("its metadata says {ACTIVATION_KEY} = {activation}")
    };
    if let Some((bezier, why)) = shapes_say_bezier(tensors) {
        if bezier != activation.is_bezier() {
            let shapes = if bezier {
                "a Bezier model's"
            } else {
                "a baseline's"
            };
            bail!(
                "{}: {recorded}, but its tensor shapes are {shapes} ({why}); the metadata \
                 contradicts the tensors, so the file cannot be loaded as it is",
                path.display()
            );
        }
    }
    // Every tensor against the model the metadata and the detected dimensions describe.
    let config = detect_config(tensors, activation, mult).with_context(|| {
        format!(
            "{}: cannot detect the model dimensions ({recorded})",
            path.display()
        )
    })?;
    let model: HashMap<String, Tensor> = tensors
        .iter()
        .filter(|(k, _)| k.starts_with(DIFFUSER) || k.starts_with(TEXT))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let fresh = if model.keys().any(|k| k.starts_with(TEXT)) {
        vec![]
    } else {
        vec![TEXT.to_string()]
    };
    let store = ParamStore::loaded(model, fresh, DType::F32, &Device::Cpu);
    let built = FluxModel::build(&config, store.clone())
        .map_err(anyhow::Error::from)
        .and_then(|_| store.check_complete(&[DIFFUSER, TEXT]));
    if let Err(e) = built {
        let width = if activation.is_bezier() {
            String::new()
        } else {
            format!(" and {WIDTH_MULT_KEY} = {mult}")
        };
        bail!(
            "{}: its tensor shapes do not match the model its metadata describes ({recorded}{width}): \
             {e:#}",
            path.display()
        );
    }
    Ok(())
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
    let non_finite = non_finite(&tensors)?;
    check_metadata(&args.checkpoint, &tensors, activation, mult)?;
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
        non_finite,
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
        write!(f, "tensors: {} ({})", self.tensors, dt.join(", "))?;
        if !self.non_finite.is_empty() {
            write!(
                f,
                "\nnon-finite values (NaN or infinity) in {} tensor(s); reconstruct, eval and \
                 model_checkpoint refuse this file:",
                self.non_finite.len()
            )?;
            for (name, bad, all) in &self.non_finite {
                write!(f, "\n  {name}: {bad} of {}", group(*all))?;
            }
        }
        Ok(())
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
