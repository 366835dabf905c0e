//! The reference's model files: the model file (`diffuser.*`) and the text projection file
//! (`text_encoder.*`), float32 on disk whatever the training dtype, loaded into a
//! [`FluxModel`] whose dimensions come from the tensor shapes, as the reference's loader does.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

use super::detect::{
    detect_config, determined_fields, differing_fields, read_architecture, ACTIVATION_KEY,
    WIDTH_MULT_KEY,
};
use super::read::{check_finite, read_tensors_where};
use super::write::{serialize, to_safetensors_bytes};
use crate::atomic_write::write_atomic;
use crate::model::{FluxModel, ModelConfig, DIFFUSER, TEXT};
use crate::params::ParamStore;

/// File name of the text projection beside a model file (the reference's name).
pub const TEXT_FILE: &str = "text_encoder.safetensors";

/// The prefix of the DistilBERT backbone a reference run saves in its text encoder file; the
/// model does not use it (flow training is not supported), so it is not read.
pub const TEXT_BACKBONE: &str = "text_encoder.language_model.";

fn not_backbone(name: &str) -> bool {
    !name.starts_with(TEXT_BACKBONE)
}

/// A model loaded from a model file, and where its text projection came from.
pub struct Loaded {
    pub model: FluxModel,
    /// The file the text projection was read from; `None` when it was freshly initialised.
    pub text_source: Option<PathBuf>,
}

/// Loads a model file (and its text projection: from the same file if it holds
/// `text_encoder.*`, else from `text_encoder.safetensors` beside it, else fresh). Every
/// `diffuser.*` tensor must be there with the right shape and no other `diffuser.*` tensor may
/// be; tensors under other prefixes, and the reference's text backbone ([`TEXT_BACKBONE`],
/// never read), are ignored. Non-finite weights are refused ([`check_finite`]).
pub fn load_model(path: &Path, dtype: DType, device: &Device) -> Result<Loaded> {
    load(path, None, dtype, device)
}

/// [`load_model`] as a model of `config` (a run's warm start): the dimensions the file's
/// shapes and metadata determine ([`determined_fields`]) must equal `config`'s, and an error
/// names the file and each field that differs (`vae_dim: file 16, config 32`); the ones they
/// cannot determine (`vae_attn_heads`, ...) are taken from `config`.
pub fn load_model_as(
    path: &Path,
    config: &ModelConfig,
    dtype: DType,
    device: &Device,
) -> Result<Loaded> {
    load(path, Some(config), dtype, device)
}

fn load(
    path: &Path,
    wanted: Option<&ModelConfig>,
    dtype: DType,
    device: &Device,
) -> Result<Loaded> {
    let mut tensors = read_tensors_where(path, not_backbone)?;
    check_finite(&tensors, path)?;
    let mut text_source = None;
    if tensors.keys().any(|k| k.starts_with(TEXT)) {
        text_source = Some(path.to_path_buf());
    } else {
        let beside = path.with_file_name(TEXT_FILE);
        if beside.is_file() && beside != path {
            let text = read_tensors_where(&beside, not_backbone)?;
            check_finite(&text, &beside)?;
            for (k, v) in text {
                if k.starts_with(TEXT) {
                    tensors.insert(k, v);
                }
            }
            text_source = Some(beside);
        }
    }
    let (activation, mult) = read_architecture(path)?;
    let detected = detect_config(&tensors, activation, mult)
        .with_context(|| format!("cannot detect the model dimensions of {}", path.display()))?;
    let cfg = match wanted {
        None => detected,
        Some(wanted) => {
            let differ = differing_fields(&detected, wanted, &determined_fields(&tensors));
            if !differ.is_empty() {
                bail!(
                    "{} holds a model of other dimensions than the configuration's model \
                     section: {}",
                    path.display(),
                    differ.join("; ")
                );
            }
            wanted.clone()
        }
    };
    let fresh: Vec<String> = match text_source {
        Some(_) => vec![],
        None => vec![TEXT.to_string()],
    };
    let store = ParamStore::loaded(tensors, fresh, dtype, device);
    let model = FluxModel::build(&cfg, store.clone())
        .with_context(|| format!("cannot build the model of {}", path.display()))?;
    store
        .check_complete(&[DIFFUSER, TEXT])
        .with_context(|| format!("{} does not match a FluxFlow model", path.display()))?;
    Ok(Loaded { model, text_source })
}

/// The model file's bytes (`diffuser.*`, float32); a baseline's records its activation and
/// width multiplier in the metadata, a Bezier model's is exactly the reference's format.
pub fn model_file_bytes(model: &FluxModel) -> Result<Vec<u8>> {
    let c = &model.config;
    let meta = if c.activation.is_bezier() {
        vec![]
    } else {
        vec![
            (ACTIVATION_KEY.to_string(), c.activation.to_string()),
            (
                WIDTH_MULT_KEY.to_string(),
                c.baseline_width_mult.to_string(),
            ),
        ]
    };
    serialize(&model.params.tensors(DIFFUSER), Some(DType::F32), &meta)
}

/// Saves the model file (`diffuser.*`) at `model_path` and the text projection as
/// `text_encoder.safetensors` beside it, both atomically, float32.
pub fn save_model(model: &FluxModel, model_path: &Path) -> Result<()> {
    write_atomic(model_path, &model_file_bytes(model)?)?;
    let text = to_safetensors_bytes(&model.params.tensors(TEXT))?;
    write_atomic(&model_path.with_file_name(TEXT_FILE), &text)
}
