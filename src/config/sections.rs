//! The sections of a configuration file, with the reference's defaults and our additions.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::cli::Precision;
use crate::device::DeviceSpec;
use crate::model::Activation;
use crate::train::precision::MixedPrecision;

/// `model:`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    pub vae_dim: usize,
    /// The flow processor's width.
    pub feature_maps_dim: usize,
    /// The discriminator's width (used only by GAN training).
    pub feature_maps_dim_disc: usize,
    pub text_embedding_dim: usize,
    /// The text backbone (not loaded while flow training is off).
    pub pretrained_bert_model: Option<String>,
    // Ours: dimensions the reference fixes in code.
    /// 2x down- (and up-) sampling stages of the VAE (the reference: 4, a 16x smaller latent).
    pub downscales: usize,
    pub vae_attn_layers: usize,
    pub vae_attn_heads: usize,
    pub flow_heads: usize,
    pub flow_layers: usize,
    /// Hidden size of the text backbone (768 for DistilBERT).
    pub text_hidden: usize,
    /// Gradient checkpointing during training (the reference models' constructor argument,
    /// on by default there too): recompute the compressor's stages and each expander block in
    /// the backward pass instead of keeping their intermediates. Same results, less memory.
    pub use_gradient_checkpointing: bool,
    /// Ours: the VAE's activation sites, `bezier` (the reference) or a `relu`, `silu` or
    /// `gelu` baseline of the same architecture (see `model::activation`).
    pub activation: Activation,
    /// Ours: a baseline's internal widths times this number, or `matched` (the default): the
    /// multiplier that gives the baseline the Bezier VAE's parameter count. Ignored for Bezier.
    pub baseline_width_mult: WidthMult,
    /// The reference's later key: `bezier`, or `baseline` for a plain-activation VAE (then
    /// `activation` says which); checked against `activation`.
    pub model_type: Option<ModelType>,
}

/// `model.model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    Bezier,
    Baseline,
}

/// `model.baseline_width_mult`: a positive number or `matched`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum WidthMult {
    Matched(MatchedWidth),
    Factor(f64),
}

/// The word `matched`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MatchedWidth {
    Matched,
}

impl Default for WidthMult {
    fn default() -> Self {
        WidthMult::Matched(MatchedWidth::Matched)
    }
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            vae_dim: 128,
            feature_maps_dim: 128,
            feature_maps_dim_disc: 8,
            text_embedding_dim: 1024,
            pretrained_bert_model: None,
            downscales: 4,
            vae_attn_layers: 4,
            vae_attn_heads: 8,
            flow_heads: 8,
            flow_layers: 10,
            text_hidden: 768,
            use_gradient_checkpointing: true,
            activation: Activation::Bezier,
            baseline_width_mult: WidthMult::default(),
            model_type: None,
        }
    }
}

/// Our addition: a generated data set (shapes, gradients, textures), for the quickstart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyntheticData {
    pub count: usize,
    pub width: u32,
    pub height: u32,
    pub seed: u64,
}

impl Default for SyntheticData {
    fn default() -> Self {
        Self {
            count: 256,
            width: 32,
            height: 32,
            seed: 0,
        }
    }
}

/// `data:`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSection {
    pub data_path: Option<PathBuf>,
    pub captions_file: Option<PathBuf>,
    pub fixed_prompt_prefix: Option<String>,
    pub use_webdataset: bool,
    pub webdataset_token: Option<String>,
    pub webdataset_url: Option<String>,
    pub webdataset_image_key: Option<String>,
    pub webdataset_label_key: Option<String>,
    pub webdataset_caption_key: Option<String>,
    pub webdataset_size: Option<u64>,
    pub webdataset_samples_per_shard: Option<u64>,
    /// Legacy aliases of the reference.
    pub use_tt2m: bool,
    pub tt2m_token: Option<String>,
    pub dataloader_max_retries: u32,
    pub dataloader_retry_delay: f64,
    /// Ours: a cap on the longer side of the training size (the reference ignores it).
    pub img_size: Option<u32>,
    pub channels: usize,
    pub tokenizer_name: String,
    pub reduced_min_sizes: Option<Vec<u32>>,
    /// Ours: generate the data set instead of reading `data_path`.
    pub synthetic: Option<SyntheticData>,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            data_path: None,
            captions_file: None,
            fixed_prompt_prefix: None,
            use_webdataset: false,
            webdataset_token: None,
            webdataset_url: None,
            webdataset_image_key: None,
            webdataset_label_key: None,
            webdataset_caption_key: None,
            webdataset_size: None,
            webdataset_samples_per_shard: None,
            use_tt2m: false,
            tt2m_token: None,
            dataloader_max_retries: 5,
            dataloader_retry_delay: 5.0,
            img_size: None,
            channels: 3,
            tokenizer_name: "distilbert-base-uncased".into(),
            reduced_min_sizes: None,
            synthetic: None,
        }
    }
}

/// `training:`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainingSection {
    pub n_epochs: u64,
    pub batch_size: usize,
    /// Decoding threads.
    pub workers: usize,
    /// The learning rate of any model whose optimizer JSON gives none.
    pub lr: f64,
    /// CosineAnnealingLR's eta_min_factor where the scheduler JSON gives none.
    pub lr_min: f64,
    pub training_steps: u64,
    pub use_fp16: bool,
    pub initial_clipping_norm: f64,
    /// Resume keeps the optimizers' learning rates (always true for `fluxflow resume`).
    pub preserve_lr: bool,
    pub train_vae: bool,
    pub gan_training: bool,
    pub use_lpips: bool,
    /// Decode with SPADE context.
    pub train_spade: bool,
    pub train_diff: bool,
    pub train_diff_full: bool,
    pub kl_beta: f64,
    pub kl_warmup_steps: u64,
    pub kl_free_bits: f64,
    pub lambda_adv: f64,
    pub lambda_lpips: f64,
    // Ours.
    /// Stop after this many steps (the run's length for the LR schedule when shorter).
    pub max_steps: Option<u64>,
    /// Stop cleanly after this wall time, e.g. "5h50m".
    pub max_runtime: Option<String>,
    /// Seed of the initialisation, the data order and the latent noise.
    pub seed: u64,
    pub adaptive_weights: bool,
    pub freq_alpha: f64,
    pub mse_weight: f64,
    pub ema_decay: f64,
    /// f32 or f64: the dtype of the weights (the master weights under mixed precision).
    pub dtype: Precision,
    /// Ours: `no`, `bf16` or `fp16`; activations and convolutions in that 16-bit float, master
    /// weights, optimizer state, loss and norm statistics in float32. The reference's
    /// `use_fp16: true` means `fp16`.
    pub mixed_precision: MixedPrecision,
    /// cpu, cuda or cuda:N.
    pub device: DeviceSpec,
}

impl TrainingSection {
    /// `mixed_precision`, with the reference's `use_fp16: true` read as `fp16`.
    pub fn mixed_precision(&self) -> MixedPrecision {
        if self.use_fp16 {
            MixedPrecision::Fp16
        } else {
            self.mixed_precision
        }
    }
}

impl Default for TrainingSection {
    fn default() -> Self {
        Self {
            n_epochs: 1,
            batch_size: 1,
            workers: 4,
            lr: 1e-5,
            lr_min: 0.1,
            training_steps: 1,
            use_fp16: false,
            initial_clipping_norm: 1.0,
            preserve_lr: true,
            train_vae: true,
            gan_training: false,
            use_lpips: false,
            train_spade: true,
            train_diff: false,
            train_diff_full: false,
            kl_beta: 0.0001,
            kl_warmup_steps: 5000,
            kl_free_bits: 0.0,
            lambda_adv: 0.5,
            lambda_lpips: 0.1,
            max_steps: None,
            max_runtime: None,
            seed: 42,
            adaptive_weights: true,
            freq_alpha: 1.0,
            mse_weight: 0.1,
            ema_decay: 0.999,
            dtype: Precision::F32,
            mixed_precision: MixedPrecision::No,
            device: DeviceSpec::Cpu,
        }
    }
}

/// `optimization:`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizationSection {
    /// The optimizer/scheduler JSON.
    pub optim_sched_config: Option<PathBuf>,
}

/// A sample size: a square side or [width, height] (flow sampling only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    Square(u32),
    Rect([u32; 2]),
}

/// `output:`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputSection {
    pub output_path: PathBuf,
    pub log_interval: u64,
    pub checkpoint_save_interval: u64,
    /// A template reconstruction every this many checkpoints.
    pub samples_per_checkpoint: u64,
    pub no_samples: bool,
    pub test_image_address: Vec<PathBuf>,
    /// Flow sampling only.
    pub sample_captions: Vec<String>,
    /// Flow sampling only.
    pub sample_sizes: Vec<SampleSize>,
    /// Which log lines are printed: `DEBUG` and `INFO` print all, `WARNING` only warnings,
    /// `ERROR` none (errors end the run and are always printed).
    pub log_level: LogLevel,
    pub log_file: Option<PathBuf>,
    pub generate_diagrams: bool,
    /// Ours: complete checkpoints kept.
    pub keep_last: usize,
    /// Ours: a held-out image folder whose reconstruction quality (PSNR, SSIM, MS-SSIM) is
    /// measured during training, with the EMA weights and the live ones.
    pub eval_data: Option<PathBuf>,
    /// Ours: steps between evaluations of `eval_data` (default: at each checkpoint), and at
    /// the end of the run.
    pub eval_interval: Option<u64>,
    /// Ours: at most this many images of `eval_data` (the first in path order).
    pub eval_limit: usize,
}

impl Default for OutputSection {
    fn default() -> Self {
        Self {
            output_path: PathBuf::from("outputs/flux"),
            log_interval: 10,
            checkpoint_save_interval: 50,
            samples_per_checkpoint: 1,
            no_samples: false,
            test_image_address: Vec::new(),
            sample_captions: Vec::new(),
            sample_sizes: Vec::new(),
            log_level: LogLevel::Info,
            log_file: None,
            generate_diagrams: false,
            keep_last: 3,
            eval_data: None,
            eval_interval: None,
            eval_limit: 16,
        }
    }
}

/// `output.log_level`, as the reference spells it (Python logging's names, any case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum LogLevel {
    #[serde(rename = "DEBUG")]
    Debug,
    #[serde(rename = "INFO")]
    Info,
    #[serde(rename = "WARNING")]
    Warning,
    #[serde(rename = "ERROR")]
    Error,
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.to_ascii_uppercase().as_str() {
            "DEBUG" => Ok(Self::Debug),
            "INFO" => Ok(Self::Info),
            "WARNING" | "WARN" => Ok(Self::Warning),
            "ERROR" | "CRITICAL" => Ok(Self::Error),
            _ => Err(serde::de::Error::custom(format!(
                "unknown log level {s:?}: use DEBUG, INFO, WARNING or ERROR"
            ))),
        }
    }
}
