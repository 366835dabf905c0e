//! The training configuration: the reference's `config.yaml` sections (model, data, training,
//! optimization, output) with its defaults, our additions, command-line overrides, and one
//! validation pass whose errors name the key and the file.

pub mod limits;
mod optim_file;
mod sections;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_yaml::Value;

pub use optim_file::OptimFile;
pub use sections::{
    DataSection, LogLevel, MatchedWidth, ModelSection, ModelType, OptimizationSection,
    OutputSection, Precision, SampleSize, SyntheticData, TrainingSection, WidthMult,
};

use crate::model::ModelConfig;
use crate::train::precision::MixedPrecision;
use crate::train::step::StepConfig;

/// The embedded quickstart configuration (`configs/quickstart.yaml`).
pub const QUICKSTART: &str = include_str!("../../configs/quickstart.yaml");

/// A whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub model: ModelSection,
    pub data: DataSection,
    pub training: TrainingSection,
    pub optimization: OptimizationSection,
    pub output: OutputSection,
    /// Initial weights (a model file with reference names).
    pub model_checkpoint: Option<PathBuf>,
    /// Set by [`Config::parse`] when the file (and its overrides) had no `model` section, so
    /// that the full Phase 1 model's defaults apply: worth a warning on a small machine.
    #[serde(skip)]
    pub model_section_missing: bool,
}

/// Reference keys that fluxflow reads but that change nothing here (the features they belong
/// to are not supported, or fluxflow does the job another way), with why. Setting one to
/// anything but its default is reported as a warning naming the key.
pub const INERT_KEYS: &[(&str, &str)] = &[
    (
        "model.feature_maps_dim_disc",
        "the discriminator belongs to GAN training, which fluxflow does not support",
    ),
    (
        "model.pretrained_bert_model",
        "the text backbone is loaded only for flow training, which fluxflow does not support",
    ),
    (
        "data.fixed_prompt_prefix",
        "prompts are used only by flow training",
    ),
    (
        "data.webdataset_token",
        "WebDataset streaming is not supported",
    ),
    (
        "data.webdataset_url",
        "WebDataset streaming is not supported",
    ),
    (
        "data.webdataset_image_key",
        "WebDataset streaming is not supported",
    ),
    (
        "data.webdataset_label_key",
        "WebDataset streaming is not supported",
    ),
    (
        "data.webdataset_caption_key",
        "WebDataset streaming is not supported",
    ),
    (
        "data.webdataset_size",
        "WebDataset streaming is not supported",
    ),
    (
        "data.webdataset_samples_per_shard",
        "WebDataset streaming is not supported",
    ),
    ("data.tt2m_token", "WebDataset streaming is not supported"),
    (
        "data.dataloader_max_retries",
        "a file that fails to decode is dropped from the run at once, never retried",
    ),
    (
        "data.dataloader_retry_delay",
        "a file that fails to decode is dropped from the run at once, never retried",
    ),
    (
        "data.tokenizer_name",
        "text tokenisation is used only by flow training",
    ),
    (
        "training.lambda_adv",
        "the adversarial loss belongs to GAN training, which fluxflow does not support",
    ),
    ("training.lambda_lpips", "the LPIPS loss is not supported"),
    (
        "output.sample_captions",
        "caption-conditioned samples belong to flow training",
    ),
    (
        "output.sample_sizes",
        "caption-conditioned samples belong to flow training",
    ),
    (
        "output.generate_diagrams",
        "fluxflow draws no model diagrams",
    ),
];

/// `--set section.key=value` and the dedicated flags, applied over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub data: Option<PathBuf>,
    pub output: Option<PathBuf>,
    pub max_steps: Option<u64>,
    pub device: Option<String>,
    pub set: Vec<String>,
    /// Settings a command makes from flags of its own, as (`section.key=value`, the flag as
    /// the user gave it: `--mixed-precision fp16`): applied after `set`, and an error they
    /// cause names the flag, not a `--set` the user never typed.
    pub flags: Vec<(String, String)>,
}

impl Overrides {
    /// Every `section.key=value` to apply, in order, with what to call it in an error.
    fn settings(&self) -> Vec<(&str, String)> {
        self.set
            .iter()
            .map(|s| (s.as_str(), format!("--set {s}")))
            .chain(
                self.flags
                    .iter()
                    .map(|(s, flag)| (s.as_str(), flag.clone())),
            )
            .collect()
    }

    /// The dedicated flags given, with the key each sets (they are applied last, so they win).
    fn dedicated(&self) -> Vec<(&str, String)> {
        let mut v = Vec::new();
        if let Some(d) = &self.data {
            v.push(("data.data_path", format!("--data {}", d.display())));
        }
        if let Some(o) = &self.output {
            v.push(("output.output_path", format!("--output {}", o.display())));
        }
        if let Some(n) = self.max_steps {
            v.push(("training.max_steps", format!("--max-steps {n}")));
        }
        if let Some(d) = &self.device {
            v.push(("training.device", format!("--device {d}")));
        }
        v
    }
}

impl Config {
    /// Parses YAML text from `source` (a path or "<embedded quickstart>") with overrides.
    ///
    /// Every error names where the bad value came from: the file for its own keys, `--set
    /// KEY=VALUE` for an override (the file is checked alone first, then each `--set` in
    /// order), and the key's full path (`training.batch_size: invalid value: integer -1 ...`).
    /// Non-finite numbers (`.inf`, `.nan`) are refused wherever they appear.
    pub fn parse(text: &str, source: &str, overrides: &Overrides) -> Result<Self> {
        let mut tree: Value =
            serde_yaml::from_str(text).with_context(|| format!("{source} is not valid YAML"))?;
        if tree.is_null() {
            tree = Value::Mapping(Default::default());
        }
        check_finite(&tree, "").map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
        let mut cfg = typed(&tree).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
        let settings = overrides.settings();
        for (s, label) in &settings {
            apply_set(&mut tree, s).with_context(|| label.clone())?;
            check_finite(&tree, "").map_err(|e| anyhow::anyhow!("{label}: {e}"))?;
            cfg = typed(&tree).map_err(|e| anyhow::anyhow!("{label}: {e}"))?;
        }
        cfg.model_section_missing = tree.get("model").is_none();
        if let Some(d) = &overrides.data {
            check_data_flag(d, &cfg, source)?;
            cfg.data.data_path = Some(d.clone());
        }
        if let Some(o) = &overrides.output {
            cfg.output.output_path = o.clone();
        }
        if let Some(n) = overrides.max_steps {
            if n == 0 || n > limits::MAX_STEPS {
                bail!(
                    "--max-steps {n}: must be at least 1 and at most {}",
                    limits::MAX_STEPS
                );
            }
            cfg.training.max_steps = Some(n);
        }
        if let Some(d) = &overrides.device {
            cfg.training.device = d.parse().with_context(|| format!("--device {d}"))?;
        }
        if let Err(e) = cfg.validate() {
            // Blame the flag or override that set the key the error names first (a flag over
            // a `--set`, the last `--set` of a key over earlier ones), else the file.
            let msg = format!("{e:#}");
            let candidates = overrides.dedicated().into_iter().chain(
                settings
                    .iter()
                    .rev()
                    .filter_map(|(s, label)| Some((s.split_once('=')?.0.trim(), label.clone()))),
            );
            let blamed = candidates
                .filter_map(|(key, label)| msg.find(key).map(|at| (at, label)))
                .min_by_key(|(at, _)| *at)
                .map(|(_, label)| label);
            return Err(match blamed {
                Some(label) => e.context(format!("invalid configuration: {label}")),
                None => e.context(format!("invalid configuration in {source}")),
            });
        }
        Ok(cfg)
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the configuration {}", path.display()))?;
        Self::parse(&text, &path.display().to_string(), overrides)
    }

    /// Rejects settings we cannot honour, naming the key.
    pub fn validate(&self) -> Result<()> {
        let t = &self.training;
        let d = &self.data;
        let unsupported = [
            (t.gan_training, "training.gan_training", "GAN training"),
            (t.use_lpips, "training.use_lpips", "the LPIPS loss"),
            (
                t.train_diff,
                "training.train_diff",
                "flow (diffusion) training",
            ),
            (
                t.train_diff_full,
                "training.train_diff_full",
                "flow (diffusion) training",
            ),
            (
                d.use_webdataset,
                "data.use_webdataset",
                "WebDataset streaming",
            ),
            (d.use_tt2m, "data.use_tt2m", "WebDataset streaming"),
        ];
        for (on, key, what) in unsupported {
            if on {
                bail!("{key}: true asks for {what}, which fluxflow does not support yet; set it to false");
            }
        }
        if d.reduced_min_sizes.as_ref().is_some_and(|v| !v.is_empty()) {
            bail!("data.reduced_min_sizes: multi-scale training is not supported yet; remove it or set it to null");
        }
        if !t.preserve_lr {
            bail!(
                "training.preserve_lr: false is not supported: `fluxflow resume` always continues \
                 with the saved learning rates, schedule and optimizer state (the reference's \
                 --preserve_lr); set it to true or remove it"
            );
        }
        if !t.train_vae {
            bail!("training.train_vae: false leaves nothing to train (flow training is not supported yet)");
        }
        if d.channels != 3 {
            bail!(
                "data.channels: only 3 (RGB) is supported, got {}",
                d.channels
            );
        }
        if t.training_steps != 1 {
            bail!(
                "training.training_steps: only 1 is supported, got {}",
                t.training_steps
            );
        }
        if self.output.log_file.is_some() {
            bail!("output.log_file: writing logs to a file is not supported; redirect the output instead");
        }
        let positive = [
            ("training.n_epochs", t.n_epochs as f64),
            ("training.batch_size", t.batch_size as f64),
            ("training.lr", t.lr),
            ("training.initial_clipping_norm", t.initial_clipping_norm),
            ("output.log_interval", self.output.log_interval as f64),
            (
                "output.checkpoint_save_interval",
                self.output.checkpoint_save_interval as f64,
            ),
            (
                "output.samples_per_checkpoint",
                self.output.samples_per_checkpoint as f64,
            ),
            ("output.keep_last", self.output.keep_last as f64),
            ("output.eval_limit", self.output.eval_limit as f64),
            (
                "output.eval_interval",
                self.output.eval_interval.unwrap_or(1) as f64,
            ),
        ];
        for (key, v) in positive {
            if v.is_nan() || v <= 0.0 {
                bail!("{key} must be positive, got {v}");
            }
        }
        let non_negative = [
            ("training.kl_beta", t.kl_beta),
            ("training.kl_free_bits", t.kl_free_bits),
            ("training.mse_weight", t.mse_weight),
            ("training.freq_alpha", t.freq_alpha),
        ];
        for (key, v) in non_negative {
            if v.is_nan() || v < 0.0 {
                bail!("{key} must be non-negative, got {v}");
            }
        }
        if !(0.0..1.0).contains(&t.ema_decay) {
            bail!("training.ema_decay must be in [0, 1), got {}", t.ema_decay);
        }
        if t.kl_beta > limits::MAX_KL_BETA {
            bail!(
                "training.kl_beta must be at most {} (the reference uses about 1e-4 to 1), got {}",
                limits::MAX_KL_BETA,
                t.kl_beta
            );
        }
        // What the step computes with in the training dtype must be a number there.
        let in_dtype = [
            ("training.lr", t.lr),
            ("training.lr_min", t.lr_min),
            ("training.kl_beta", t.kl_beta),
            ("training.kl_free_bits", t.kl_free_bits),
            ("training.mse_weight", t.mse_weight),
            ("training.freq_alpha", t.freq_alpha),
            ("training.initial_clipping_norm", t.initial_clipping_norm),
        ];
        for (key, v) in in_dtype {
            if let Some(why) = limits::dtype_problem(v, t.dtype) {
                bail!("{key} is {v:e}: {why}");
            }
        }
        match t.max_steps {
            Some(0) => bail!("training.max_steps must be positive"),
            Some(n) if n > limits::MAX_STEPS => bail!(
                "training.max_steps must be at most {}, got {n}",
                limits::MAX_STEPS
            ),
            _ => {}
        }
        if t.n_epochs > limits::MAX_STEPS {
            bail!(
                "training.n_epochs must be at most {}, got {}",
                limits::MAX_STEPS,
                t.n_epochs
            );
        }
        if t.workers > limits::MAX_WORKERS {
            bail!(
                "training.workers must be at most {} (each is a data loader thread), got {}",
                limits::MAX_WORKERS,
                t.workers
            );
        }
        if let Some(r) = &t.max_runtime {
            parse_duration(r).context("training.max_runtime")?;
        }
        if let Some(cap) = d.img_size {
            if cap < 16 {
                bail!("data.img_size must be at least 16, got {cap}");
            }
        }
        let mp_key = if t.use_fp16 {
            "training.use_fp16"
        } else {
            "training.mixed_precision"
        };
        if t.mixed_precision() != MixedPrecision::No && t.dtype != Precision::F32 {
            bail!(
                "{mp_key}: {} keeps float32 master weights; set training.dtype to f32 (it is \
                 {})",
                t.mixed_precision(),
                t.dtype
            );
        }
        if t.mixed_precision() != MixedPrecision::No && t.device.is_cpu() {
            bail!(
                "{mp_key}: {} mixed precision runs on CUDA only; set training.device to cuda, or \
                 train in float32 on the CPU",
                t.mixed_precision()
            );
        }
        if d.data_path.is_none() && d.synthetic.is_none() {
            bail!("data.data_path is not set (or pass --data DIR)");
        }
        if self.model.downscales > 4 {
            bail!(
                "model.downscales must be at most 4, got {}: training sizes are multiples of 16, \
                 which the VAE halves at most 4 times",
                self.model.downscales
            );
        }
        if let Some(s) = &d.synthetic {
            let limits = [
                ("data.synthetic.width", s.width as usize, 4096),
                ("data.synthetic.height", s.height as usize, 4096),
                ("data.synthetic.count", s.count, 100_000),
            ];
            for (key, v, most) in limits {
                if v > most {
                    bail!("{key} must be at most {most}, got {v}");
                }
            }
        }
        match (self.model.model_type, self.model.activation.is_bezier()) {
            (Some(ModelType::Baseline), true) => bail!(
                "model.model_type: baseline needs model.activation relu, silu or gelu (it is bezier)"
            ),
            (Some(ModelType::Bezier), false) => bail!(
                "model.model_type: bezier contradicts model.activation: {}",
                self.model.activation
            ),
            _ => {}
        }
        let m = &self.model;
        let sizes = [
            ("model.vae_dim", m.vae_dim, limits::MAX_WIDTH),
            (
                "model.feature_maps_dim",
                m.feature_maps_dim,
                limits::MAX_WIDTH,
            ),
            (
                "model.text_embedding_dim",
                m.text_embedding_dim,
                limits::MAX_WIDTH,
            ),
            ("model.text_hidden", m.text_hidden, limits::MAX_WIDTH),
            (
                "model.vae_attn_layers",
                m.vae_attn_layers,
                limits::MAX_LAYERS,
            ),
            ("model.vae_attn_heads", m.vae_attn_heads, limits::MAX_LAYERS),
            ("model.flow_layers", m.flow_layers, limits::MAX_LAYERS),
            ("model.flow_heads", m.flow_heads, limits::MAX_LAYERS),
        ];
        for (key, v, most) in sizes {
            if v > most {
                bail!("{key} must be at most {most}, got {v}");
            }
        }
        self.baseline_width_mult()?;
        self.model_config().validate()?;
        Ok(())
    }

    /// The baseline's width multiplier: the configured number, or the parameter-matched one
    /// (1 for Bezier).
    pub fn baseline_width_mult(&self) -> Result<f64> {
        let m = &self.model;
        match m.baseline_width_mult {
            WidthMult::Factor(f) if !(f.is_finite() && f > 0.0 && f <= limits::MAX_WIDTH_MULT) => {
                bail!(
                    "model.baseline_width_mult must be a positive number at most {} or \
                     `matched`, got {f}",
                    limits::MAX_WIDTH_MULT
                )
            }
            _ if m.activation.is_bezier() => Ok(1.0),
            WidthMult::Factor(f) => Ok(f),
            WidthMult::Matched(_) => {
                let dims = ModelConfig {
                    activation: m.activation,
                    ..self.model_dims()
                };
                crate::model::FluxModel::matched_width_mult(&dims, m.activation).with_context(
                    || "model.baseline_width_mult: matched: cannot count the parameters",
                )
            }
        }
    }

    /// Steps between evaluations of `output.eval_data` (its interval, or the checkpoints').
    pub fn eval_interval(&self) -> u64 {
        self.output
            .eval_interval
            .unwrap_or(self.output.checkpoint_save_interval)
    }

    /// The model's dimensions and activation (a parameter-matched baseline width that cannot
    /// be computed, which `validate` reports, falls back to 1).
    pub fn model_config(&self) -> ModelConfig {
        ModelConfig {
            activation: self.model.activation,
            baseline_width_mult: self.baseline_width_mult().unwrap_or(1.0),
            ..self.model_dims()
        }
    }

    /// The model's dimensions, with the Bezier activation.
    fn model_dims(&self) -> ModelConfig {
        let m = &self.model;
        ModelConfig {
            vae_dim: m.vae_dim,
            downscales: m.downscales,
            upscales: m.downscales,
            vae_attn_layers: m.vae_attn_layers,
            vae_attn_heads: m.vae_attn_heads,
            flow_dim: m.feature_maps_dim,
            flow_heads: m.flow_heads,
            flow_layers: m.flow_layers,
            text_embedding_dim: m.text_embedding_dim,
            text_hidden: m.text_hidden,
            ..ModelConfig::default()
        }
    }

    /// The training step's settings.
    pub fn step_config(&self) -> StepConfig {
        let t = &self.training;
        StepConfig {
            kl_beta: t.kl_beta,
            kl_warmup_steps: t.kl_warmup_steps,
            kl_free_bits: t.kl_free_bits,
            freq_alpha: t.freq_alpha,
            mse_weight: t.mse_weight,
            clip_norm: t.initial_clipping_norm,
            adaptive_weights: t.adaptive_weights,
            adaptive_window: 100,
            ema_decay: t.ema_decay,
            use_spade: t.train_spade,
            recompute: self.model.use_gradient_checkpointing,
            mixed_precision: t.mixed_precision(),
        }
    }

    /// A warning for each [`INERT_KEYS`] entry set to something other than its default.
    fn inert_settings(&self) -> Vec<String> {
        let (Ok(current), Ok(default)) = (
            serde_json::to_value(self),
            serde_json::to_value(Config::default()),
        ) else {
            return Vec::new();
        };
        INERT_KEYS
            .iter()
            .filter(|(key, _)| {
                let ptr = format!("/{}", key.replace('.', "/"));
                current.pointer(&ptr) != default.pointer(&ptr)
            })
            .map(|(key, why)| format!("{key} is set but has no effect in fluxflow: {why}"))
            .collect()
    }

    /// `training.max_runtime` as a duration.
    pub fn max_runtime(&self) -> Option<Duration> {
        self.training
            .max_runtime
            .as_deref()
            .and_then(|s| parse_duration(s).ok())
    }

    /// Warnings about settings that defeat themselves, and about reference keys set to a value
    /// that has no effect here ([`INERT_KEYS`]).
    pub fn warnings(&self) -> Vec<String> {
        let mut w = self.inert_settings();
        let t = &self.training;
        // Per-element KL of a fresh VAE is around 1e-2..1e0 nats; a floor far above that clamps
        // every element, and clamped elements carry no gradient.
        if t.kl_free_bits >= 10.0 {
            w.push(format!(
                "training.kl_free_bits = {} clamps every per-element KL (each is far below it): the KL term \
                 has no gradient at all and the latent is not regularised. Values around 0.0-0.5 are usual.",
                t.kl_free_bits
            ));
        }
        if t.kl_beta == 0.0 {
            w.push("training.kl_beta = 0: the KL term has no weight.".into());
        }
        if self.model_section_missing {
            let cpu = if t.device.is_cpu() {
                " on the CPU, where one step of it takes seconds to minutes"
            } else {
                ""
            };
            w.push(format!(
                "the configuration has no model section: the full Phase 1 model (vae_dim {}, \
                 about 112M parameters) is trained{cpu}. Set model: (e.g. vae_dim: 16) for a \
                 smaller one.",
                self.model.vae_dim
            ));
        }
        w
    }
}

/// `--data DIR` must name a folder, and one the configuration (`source`) will read: a
/// configuration that generates its images (`data.synthetic`) would ignore it.
fn check_data_flag(dir: &Path, cfg: &Config, source: &str) -> Result<()> {
    if !dir.is_dir() {
        let what = if dir.exists() {
            "is not a folder"
        } else {
            "does not exist"
        };
        bail!("--data {}: the folder {what}", dir.display());
    }
    if let Some(s) = &cfg.data.synthetic {
        bail!(
            "--data {}: {source} generates its images (data.synthetic: {} images of {}x{}), so \
             --data would be ignored; to train on the folder, use a configuration without \
             data.synthetic or add --set data.synthetic=null",
            dir.display(),
            s.count,
            s.width,
            s.height
        );
    }
    Ok(())
}

/// The tree as a [`Config`]; the error names the key's full path, and for an unknown key
/// suggests checking its spelling and section.
fn typed(tree: &Value) -> Result<Config> {
    serde_path_to_error::deserialize(tree.clone()).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let hint = if inner.contains("unknown field") {
            " (check the key's spelling and section)"
        } else {
            ""
        };
        if path == "." || path.is_empty() {
            anyhow::anyhow!("{inner}{hint}")
        } else {
            anyhow::anyhow!("{path}: {inner}{hint}")
        }
    })
}

/// Refuses NaN and infinities anywhere in the tree, naming the key.
fn check_finite(tree: &Value, path: &str) -> Result<()> {
    match tree {
        Value::Number(n) if n.as_f64().is_some_and(|v| !v.is_finite()) => {
            bail!("{path} is {n}; numbers must be finite")
        }
        Value::Mapping(m) => {
            for (k, v) in m {
                let key = match k {
                    Value::String(s) => s.clone(),
                    other => serde_yaml::to_string(other)
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                };
                let sub = if path.is_empty() {
                    key
                } else {
                    format!("{path}.{key}")
                };
                check_finite(v, &sub)?;
            }
            Ok(())
        }
        Value::Sequence(items) => {
            for (i, v) in items.iter().enumerate() {
                check_finite(v, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        Value::Tagged(t) => check_finite(&t.value, path),
        _ => Ok(()),
    }
}

/// Applies `section.key=value` (value parsed as YAML) to the tree.
fn apply_set(tree: &mut Value, s: &str) -> Result<()> {
    let (path, value) = s.split_once('=').context("expected section.key=value")?;
    let value: Value = serde_yaml::from_str(value).context("the value is not valid YAML")?;
    let keys: Vec<&str> = path.trim().split('.').collect();
    if keys.iter().any(|k| k.is_empty()) {
        bail!("expected section.key=value");
    }
    let mut node = tree;
    for (i, k) in keys.iter().enumerate() {
        let map = node
            .as_mapping_mut()
            .with_context(|| format!("{} is not a section", keys[..i].join(".")))?;
        let key = Value::String((*k).to_string());
        if i + 1 == keys.len() {
            map.insert(key, value);
            return Ok(());
        }
        node = map
            .entry(key)
            .or_insert_with(|| Value::Mapping(Default::default()));
    }
    Ok(())
}

/// "5h50m", "90m", "45s", "2h", "1h30m15s" or a number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        if secs > 0.0 && secs.is_finite() {
            return Ok(Duration::from_secs_f64(secs));
        }
        bail!("{s:?} is not a positive duration");
    }
    let mut total = 0f64;
    let mut num = String::new();
    for c in s.chars() {
        match c {
            '0'..='9' | '.' => num.push(c),
            'h' | 'm' | 's' => {
                let v: f64 = num
                    .parse()
                    .with_context(|| format!("{s:?} is not a duration like 5h50m"))?;
                total += v * match c {
                    'h' => 3600.0,
                    'm' => 60.0,
                    _ => 1.0,
                };
                num.clear();
            }
            _ => bail!("{s:?} is not a duration like 5h50m"),
        }
    }
    if !num.is_empty() || total <= 0.0 {
        bail!("{s:?} is not a duration like 5h50m");
    }
    Ok(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("5h50m").unwrap(), Duration::from_secs(21000));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_duration("1h30m15s").unwrap(),
            Duration::from_secs(5415)
        );
        assert!(parse_duration("5 hours").is_err());
        assert!(parse_duration("5h50").is_err());
        assert!(parse_duration("0").is_err());
    }

    #[test]
    fn set_overrides_nested_keys() {
        let mut tree: Value = serde_yaml::from_str("training:\n  lr: 1\n").unwrap();
        apply_set(&mut tree, "training.lr=0.5").unwrap();
        apply_set(&mut tree, "output.keep_last=2").unwrap();
        assert_eq!(tree["training"]["lr"], Value::from(0.5));
        assert_eq!(tree["output"]["keep_last"], Value::from(2));
        assert!(apply_set(&mut tree, "training.lr").is_err());
    }
}
