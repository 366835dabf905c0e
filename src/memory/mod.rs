//! Whether a request fits in memory, checked before its tensors are allocated: a size that
//! cannot fit is refused with the estimate instead of aborting in the allocator.
//!
//! The estimate covers the activations, which grow with the pixels; the weights and optimizer
//! state are already allocated when it is made, and the memory they hold is no longer
//! available. Its coefficients were measured with `fluxflow bench` (Phase 1 model, vae_dim 128,
//! float32, CPU): a forward pass peaks at about 23 KB per pixel (256x256 against 128x128), a
//! training step at about 37 KB per pixel (64x64 against 32x32). The estimate stays below
//! them (40 and 60 values per channel and pixel, 20 KB and 31 KB at vae_dim 128), so a request
//! it refuses would not have fitted.
//!
//! What the estimate is held against, in this order:
//! - a budget given with `--memory-budget SIZE` (train, resume, bench, reconstruct, eval);
//! - else one given in the environment variable [`BUDGET_ENV`];
//! - else the memory detected as available: on CUDA the driver's free memory; on the CPU the
//!   smallest of `MemAvailable` (/proc/meminfo), the address-space limit (`ulimit -v`,
//!   `RLIMIT_AS`) less the process's address space, and the memory cgroup's limit less its
//!   usage (its own and every ancestor's, cgroup v2 or v1; the inactive file cache, which the
//!   kernel reclaims first, is not counted as usage).
//!
//! The budget is resolved once per process ([`init_budget`], called by the binary at
//! start-up) and every [`check_fits`] uses it; the refusal says where it came from.

pub mod budget;
pub mod detect;
pub mod size;

use anyhow::{bail, Result};
use candle_core::{DType, Device};

pub use budget::{init_budget, Budget, BudgetSource, BUDGET_ENV};
pub use detect::Detected;
pub use size::{human_bytes, parse_size, Size};

use crate::model::ModelConfig;

/// Activation values per channel (`vae_dim`) and pixel of a forward pass.
const FORWARD_PER_CHANNEL_PIXEL: u64 = 40;
/// Activation values per channel and pixel of a training step (forward and backward).
const TRAINING_PER_CHANNEL_PIXEL: u64 = 60;

/// Estimated activation bytes of `batch` images of `height` x `width` through the VAE.
pub fn activation_bytes(
    cfg: &ModelConfig,
    batch: usize,
    height: usize,
    width: usize,
    dtype: DType,
    training: bool,
) -> u64 {
    let per = if training {
        TRAINING_PER_CHANNEL_PIXEL
    } else {
        FORWARD_PER_CHANNEL_PIXEL
    };
    (batch as u64)
        .saturating_mul(height as u64)
        .saturating_mul(width as u64)
        .saturating_mul(cfg.vae_dim as u64)
        .saturating_mul(per)
        .saturating_mul(dtype.size_in_bytes() as u64)
}

/// What a request is held against: a budget, or the memory detected as available.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limit {
    Budget(Budget),
    Detected { bytes: u64, what: Detected },
}

impl Limit {
    pub fn bytes(&self) -> u64 {
        match self {
            Self::Budget(b) => b.size.bytes,
            Self::Detected { bytes, .. } => *bytes,
        }
    }
}

/// Refuses `what` when its estimated `bytes` exceed `limit`; the error gives the estimate, the
/// limit and where the limit came from.
pub fn check_against(what: &str, bytes: u64, limit: &Limit) -> Result<()> {
    check_purpose_against(what, Purpose::ACTIVATIONS, bytes, limit)
}

/// What an estimate is for, and what to make smaller when it does not fit.
struct Purpose {
    what_for: &'static str,
    advice: &'static str,
}

impl Purpose {
    const ACTIVATIONS: Self = Self {
        what_for: "for its activations",
        advice: "use fewer or smaller images",
    };
    const WEIGHTS: Self = Self {
        what_for: "for its weights",
        advice: "make the model smaller (model.vae_dim, feature_maps_dim, text_embedding_dim, \
                 text_hidden, the layer counts, baseline_width_mult)",
    };
}

/// [`check_against`] for memory needed for `purpose`.
fn check_purpose_against(what: &str, purpose: Purpose, bytes: u64, limit: &Limit) -> Result<()> {
    let Purpose { what_for, advice } = purpose;
    if bytes <= limit.bytes() {
        return Ok(());
    }
    let need = human_bytes(bytes);
    let have = human_bytes(limit.bytes());
    match limit {
        Limit::Budget(b) => bail!(
            "{what} needs about {need} {what_for}, more than the memory budget of {have} ({}); \
             {advice}, or a larger budget",
            b.describe()
        ),
        Limit::Detected { what: from, .. } => {
            let from = match from {
                Detected::MemAvailable => {
                    "available in this machine's memory (MemAvailable in /proc/meminfo)".into()
                }
                Detected::AddressSpace { limit, in_use } => format!(
                    "left under the address-space limit (ulimit -v: {} less the {} this \
                     process has mapped)",
                    human_bytes(*limit),
                    human_bytes(*in_use)
                ),
                Detected::Cgroup { dir, limit, usage } => format!(
                    "left in the memory cgroup {} ({} limit, {} in use)",
                    dir.display(),
                    human_bytes(*limit),
                    human_bytes(*usage)
                ),
                Detected::GpuFree => "free on the GPU".into(),
            };
            bail!(
                "{what} needs about {need} {what_for}, and {have} are {from}; {advice} \
                 (--memory-budget SIZE or {BUDGET_ENV} sets the memory to hold it against \
                 instead)"
            )
        }
    }
}

/// Refuses `what` when its estimated `bytes` exceed the process's memory budget or, without
/// one, the memory available on `device` (see the module's documentation).
pub fn check_fits(what: &str, bytes: u64, device: &Device) -> Result<()> {
    check_purpose_fits(what, Purpose::ACTIVATIONS, bytes, device)
}

fn check_purpose_fits(what: &str, purpose: Purpose, bytes: u64, device: &Device) -> Result<()> {
    let limit = match budget::process_budget()? {
        Some(b) => Some(Limit::Budget(b)),
        None => detect::detect(device).map(|(bytes, what)| Limit::Detected { bytes, what }),
    };
    match limit {
        Some(limit) => check_purpose_against(what, purpose, bytes, &limit),
        None => Ok(()),
    }
}

/// Bytes of a model's weights in `dtype` and, when `training`, of the VAE's gradients,
/// optimizer moments (at most three per weight: RMSprop centered with momentum) and EMA:
/// what building and training it holds besides the activations. Counted from the shapes alone.
pub fn model_bytes(cfg: &ModelConfig, dtype: DType, training: bool) -> Result<u64> {
    let all = crate::model::FluxModel::parameter_count(cfg)? as u64;
    let vae = crate::model::FluxModel::vae_parameter_count(cfg)? as u64;
    let per_vae_weight = if training { 5 } else { 0 };
    Ok(all
        .saturating_add(vae.saturating_mul(per_vae_weight))
        .saturating_mul(dtype.size_in_bytes() as u64))
}

/// Refuses a model of `cfg` whose weights (and, when `training`, training state) would not fit
/// in the memory detected as available ([`model_bytes`]), before any of it is allocated; the
/// error names the estimate, the limit and the keys that size the model. A memory budget is
/// the activations' limit and replaces the detection: with one, the model is not checked.
pub fn check_model_fits(
    cfg: &ModelConfig,
    dtype: DType,
    training: bool,
    device: &Device,
) -> Result<()> {
    if budget::process_budget()?.is_some() {
        return Ok(());
    }
    let bytes = model_bytes(cfg, dtype, training)?;
    let what = if training {
        "the model with the VAE's gradients, optimizer state and EMA"
    } else {
        "the model"
    };
    check_purpose_fits(what, Purpose::WEIGHTS, bytes, device)
}

/// Memory available for new allocations on `device` in bytes, if known (see [`detect::detect`]).
pub fn available_bytes(device: &Device) -> Option<u64> {
    detect::detect(device).map(|(bytes, _)| bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_estimate_and_where_the_limit_came_from() {
        let budget = |source| {
            Limit::Budget(Budget {
                size: Size::parse("1M").unwrap(),
                source,
            })
        };
        assert!(check_against("x", 1_000_000, &budget(BudgetSource::Flag)).is_ok());
        let e = check_against("a step", 1_000_001, &budget(BudgetSource::Flag))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a step needs about 1.00 MB") && e.contains("(--memory-budget 1M)"),
            "{e}"
        );
        let e = check_against("a step", 2_500_000, &budget(BudgetSource::Env))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("2.50 MB") && e.contains("(FLUXFLOW_MEMORY_BUDGET=1M)"),
            "{e}"
        );
        let detected = |what| Limit::Detected { bytes: 1000, what };
        for (what, needle) in [
            (Detected::MemAvailable, "MemAvailable"),
            (
                Detected::AddressSpace {
                    limit: 5000,
                    in_use: 4000,
                },
                "ulimit -v: 5.00 kB less the 4.00 kB",
            ),
            (
                Detected::Cgroup {
                    dir: "/sys/fs/cgroup/a".into(),
                    limit: 2000,
                    usage: 1000,
                },
                "cgroup /sys/fs/cgroup/a (2.00 kB limit, 1.00 kB in use)",
            ),
        ] {
            let e = check_against("it", 1001, &detected(what))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("it needs about 1.00 kB") && e.contains(needle),
                "{e}"
            );
        }
    }
}
