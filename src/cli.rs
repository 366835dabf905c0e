//! The command line (clap derive).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "fluxflow",
    version,
    about = "Trains and runs the FluxFlow VAE on candle"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train the VAE (with no --config: the embedded quickstart on generated images).
    Train(TrainArgs),
    /// Continue a run from its newest complete checkpoint (after a shutdown or a stop).
    Resume(ResumeArgs),
    /// Regenerate a run's summary, plots, galleries and report.md.
    Report(ReportArgs),
    /// Runs side by side: loss and quality at matching steps, steps to thresholds, stability,
    /// speed; markdown and overlay plots (reads the reference's run folders too).
    Compare(CompareArgs),
    /// Time training steps on random images (median s/step, images/s, peak memory).
    Bench(BenchArgs),
    /// Encode and decode one image with a checkpoint and print the PSNR.
    Reconstruct(ReconstructArgs),
    /// PSNR, SSIM and MS-SSIM of a checkpoint's reconstructions of a folder of images.
    #[command(long_about = EVAL_ABOUT)]
    Eval(EvalArgs),
    /// Describe a checkpoint: detected dimensions, parameters per component, tensors, dtypes.
    Info(InfoArgs),
}

/// Limits every command that computes takes: `--memory-budget` and `--threads`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ResourceArgs {
    /// Hold each request's estimated activation memory against SIZE instead of the memory
    /// detected as available (on the CPU the smallest of MemAvailable, the `ulimit -v` room and
    /// the memory cgroup's room; on CUDA the driver's free memory); a request over it is
    /// refused with the estimate. SIZE: bytes, or a number with a unit: K, M, G, T (also KB,
    /// MB, GB, TB) are powers of 1000, KiB, MiB, GiB, TiB powers of 1024, case-insensitive
    /// (512M, 8GiB, 1.5T). Default: the environment variable FLUXFLOW_MEMORY_BUDGET where set
    /// (this flag wins), else detection.
    #[arg(long, value_name = "SIZE", value_parser = crate::memory::Size::parse)]
    pub memory_budget: Option<crate::memory::Size>,
    /// CPU threads of the computation, 1 to 4096: the thread pool that candle, gemm and
    /// fluxflow's kernels share, and candle's split of each matrix product. Default:
    /// RAYON_NUM_THREADS where set, else one per CPU (candle's matrix products: one per
    /// physical core).
    #[arg(long, value_name = "N", value_parser = threads_parser())]
    pub threads: Option<usize>,
}

/// The most `--threads` accepted.
pub const MAX_THREADS: u64 = 4096;

fn threads_parser() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..=MAX_THREADS)
}

impl Command {
    /// The command's `--memory-budget` and `--threads`, for the commands that compute.
    pub fn resources(&self) -> Option<&ResourceArgs> {
        match self {
            Self::Train(a) => Some(&a.resources),
            Self::Resume(a) => Some(&a.resources),
            Self::Bench(a) => Some(&a.resources),
            Self::Reconstruct(a) => Some(&a.resources),
            Self::Eval(a) => Some(&a.resources),
            Self::Report(_) | Self::Compare(_) | Self::Info(_) => None,
        }
    }
}

/// Numeric precision of the computation (`--dtype`, `training.dtype`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    F64,
}

impl Precision {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::F64 => candle_core::DType::F64,
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F64 => "f64",
        })
    }
}

#[derive(Debug, clap::Args)]
pub struct ReconstructArgs {
    /// A PNG, JPEG or WebP image.
    pub image: PathBuf,
    /// The model file (reference names, e.g. flxflow_final.safetensors).
    #[arg(long, short = 'c')]
    pub checkpoint: PathBuf,
    /// Where to write the reconstruction (.png or .webp); default `<image stem>.recon.png`.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Decode a sampled latent z = mu + eps * sigma instead of the posterior mean.
    #[arg(long)]
    pub sample: bool,
    /// Seed of the sampled latent's noise (with --sample).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Precision of the computation.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub dtype: Precision,
    /// Pixel budget: an image whose training size (sides rounded to multiples of 16) has more
    /// pixels is scaled down (aspect kept) until it has at most this many, with a note; one
    /// that cannot fit even at 16 pixels on its shorter side is refused. The default is
    /// 1024x1024, the largest Phase 1 training size.
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    #[command(flatten)]
    pub resources: ResourceArgs,
}

/// `reconstruct --max-pixels`' and `eval --max-pixels`' default: 1024 x 1024.
pub const DEFAULT_MAX_PIXELS: u64 = 1024 * 1024;

const EVAL_ABOUT: &str = "\
PSNR, SSIM and MS-SSIM of a checkpoint's reconstructions of a folder of images, per image and
on average.

Each image (PNG, JPEG or WebP, searched recursively; grey and RGBA become RGB) is resized to its
training size as `reconstruct` does, encoded with the posterior mean, decoded with SPADE
context (images of one size in batches), and written to 8 bits as `reconstruct` writes it.
Both images are then taken as values in [0, 1] (v / 255).
PSNR: 10 log10(1 / MSE) over all values (inf for an exact reconstruction, null in JSON).
SSIM: Wang et al. 2004, an 11x11 Gaussian window with sigma 1.5, K1 0.01, K2 0.03, data range
1, averaged over the window positions that lie wholly inside the image (as scikit-image and
pytorch-msssim do), then over R, G and B.
MS-SSIM: as pytorch-msssim, five scales weighted 0.0448, 0.2856, 0.3001, 0.2363, 0.1333, 2x2
average pooling between scales, contrast-structure at the first four and SSIM at the last,
negative terms clamped to 0. Images with a side under 161 px are too small for five scales:
their MS-SSIM is null and a note says so.
An image whose training size has more than --max-pixels pixels is scaled down first, with a
note. An unreadable or truncated file, or an image that cannot fit (in --max-pixels, or its
forward pass in memory), is skipped, named and counted.";

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// The model file (reference names, e.g. flxflow_final.safetensors).
    #[arg(long, short = 'c')]
    pub checkpoint: PathBuf,
    /// The folder of images (searched recursively).
    #[arg(long)]
    pub data: PathBuf,
    /// Evaluate at most this many readable images (in path order).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Also write the scores as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Images of one size per forward pass.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Pixel budget per image, as `reconstruct`'s: an image whose training size has more
    /// pixels is scaled down (aspect kept) until it has at most this many, with a note; one
    /// that cannot fit even at 16 pixels on its shorter side is skipped and named.
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    #[command(flatten)]
    pub resources: ResourceArgs,
}

#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// The model file to describe.
    pub checkpoint: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// The configuration (YAML); default: the embedded quickstart.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// The image folder (data.data_path).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The output folder (output.output_path).
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Stop after this many steps (training.max_steps).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// cpu, cuda or cuda:N (training.device).
    #[arg(long)]
    pub device: Option<String>,
    /// Override any setting: --set training.lr=1e-5 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Start over in an output folder that already holds a run (deletes the files that run
    /// wrote, its checkpoints, logs and samples; any other file stays).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub resources: ResourceArgs,
}

#[derive(Debug, clap::Args)]
pub struct ResumeArgs {
    /// The run folder; default: the most recently updated run under ./runs.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub resources: ResourceArgs,
}

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// The run folder (ours or a PyTorch reference run with graph/training_metrics.jsonl);
    /// default: the most recently updated run under ./runs.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// Two or more run folders (ours, or the reference's with graph/training_metrics.jsonl).
    #[arg(required = true, num_args = 2..)]
    pub runs: Vec<PathBuf>,
    /// Where to write comparison.md and the plots.
    #[arg(long, short = 'o', default_value = "comparison")]
    pub output: PathBuf,
    /// A loss level whose first crossing is reported (repeatable); default: the highest
    /// final loss among the runs and twice it.
    #[arg(long = "loss")]
    pub loss: Vec<f64>,
    /// A PSNR level in dB whose first crossing is reported (repeatable); default 15, 20, 25, 30.
    #[arg(long = "psnr")]
    pub psnr: Vec<f64>,
    /// Stability: the loss variance over each run's last N steps.
    #[arg(long, default_value_t = 100)]
    pub last: u64,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A configuration whose model, dtype and device to use; default: the Phase 1 model.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Use the embedded quickstart's model instead of the Phase 1 model.
    #[arg(long, conflicts_with = "config")]
    pub quickstart: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    #[arg(long, default_value_t = 64)]
    pub width: usize,
    #[arg(long, default_value_t = 64)]
    pub height: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Print the result as one JSON line.
    #[arg(long)]
    pub json: bool,
    /// Time the forward pass alone (encode and decode, no gradients), as `reconstruct` runs.
    #[arg(long)]
    pub forward_only: bool,
    /// Gradient checkpointing (default: the configuration's model.use_gradient_checkpointing,
    /// on unless set off, as in the reference).
    #[arg(long, value_enum)]
    pub checkpointing: Option<Switch>,
    /// Mixed precision: no, bf16 or fp16 (CUDA only); default: the configuration's
    /// training.mixed_precision.
    #[arg(long)]
    pub mixed_precision: Option<crate::train::precision::MixedPrecision>,
    /// TF32 tensor cores for float32 matrix products and convolutions on CUDA (PyTorch's
    /// default for convolutions); `off` for full float32 precision.
    #[arg(long, value_enum, default_value_t = Switch::On)]
    pub tf32: Switch,
    #[command(flatten)]
    pub resources: ResourceArgs,
}

/// An on/off setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}
