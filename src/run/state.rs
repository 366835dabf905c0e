//! What a checkpoint holds besides the weights, and the reference's `training_state.json` and
//! `lr_sav.json` written beside them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::data::SamplerState;
use crate::train::adaptive::RollingMean;
use crate::train::loss::kl_beta;
use crate::train::metrics::now_iso;
use crate::train::step::TrainerState;

/// The loop's state at a checkpoint (`state.json`, beside the manifest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    pub version: u32,
    pub global_step: u64,
    pub total_steps: u64,
    pub steps_per_epoch: u64,
    /// The data order's position after the last trained batch.
    pub sampler: SamplerState,
    pub checkpoints_written: u64,
    /// Step of the last template reconstruction.
    pub last_sample_step: Option<u64>,
    /// Step of the last evaluation of `output.eval_data` (absent in checkpoints written
    /// before it was saved).
    #[serde(default)]
    pub last_eval_step: Option<u64>,
    /// Training wall time over all sessions, in seconds.
    pub elapsed_secs: f64,
    pub bad_files: u64,
    /// Running means behind the logged losses.
    pub vae_avg: RollingMean,
    pub kl_avg: RollingMean,
    /// The compute dtype ("f32" or "f64").
    pub dtype: String,
    /// Each trained model's trainer state, by model name (`vae` in Phase 1).
    pub trainers: BTreeMap<String, TrainerState>,
}

impl LoopState {
    /// 2: trainer states keyed by model name (1: one trainer, the VAE's).
    pub const VERSION: u32 = 2;
}

/// The reference's `training_state.json`.
pub fn reference_training_state(
    epoch: u64,
    batch_idx: u64,
    global_step: u64,
    warmup_steps: u64,
    max_beta: f64,
    lrs: &Value,
) -> Value {
    let progress = if warmup_steps > 0 {
        (100.0 * global_step as f64 / warmup_steps as f64).min(100.0)
    } else {
        100.0
    };
    json!({
        "version": "1.0",
        "timestamp": now_iso(),
        "epoch": epoch,
        "batch_idx": batch_idx,
        "global_step": global_step,
        "kl_warmup": {
            "current_beta": kl_beta(global_step, warmup_steps, max_beta),
            "warmup_steps": warmup_steps,
            "max_beta": max_beta,
            "progress_pct": progress,
        },
        "learning_rates": lrs,
    })
}

/// The reference's `lr_sav.json` (CheckpointManager format): the learning rate of each
/// optimizer by the reference's names.
pub fn reference_lrs(flow: f64, vae: f64, text: f64, disc: f64) -> Value {
    json!({
        "optimizer_FDiff": flow,
        "optimizer_Diff": vae,
        "optimizer_te": text,
        "optimizer_Dimg": disc,
    })
}
