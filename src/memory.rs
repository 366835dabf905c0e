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

use anyhow::{bail, Result};
use candle_core::{DType, Device};

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

/// Memory available for new allocations on `device` in bytes, if known: `MemAvailable` of
/// /proc/meminfo on the CPU (Linux), the driver's free memory on CUDA.
pub fn available_bytes(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => {
            let s = std::fs::read_to_string("/proc/meminfo").ok()?;
            let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => crate::gpu::free_bytes(device).ok().flatten(),
        _ => None,
    }
}

fn gb(bytes: u64) -> String {
    format!("{:.1} GB", bytes as f64 / 1e9)
}

/// Refuses `what` when its estimated `bytes` exceed the memory available on `device`.
pub fn check_fits(what: &str, bytes: u64, device: &Device) -> Result<()> {
    if let Some(avail) = available_bytes(device) {
        if bytes > avail {
            let on = match device {
                Device::Cpu => "in this machine's memory",
                _ => "on the GPU",
            };
            bail!(
                "{what} needs about {} for its activations, and {} are available {on}; use \
                 fewer or smaller images",
                gb(bytes),
                gb(avail)
            );
        }
    }
    Ok(())
}
