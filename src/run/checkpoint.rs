//! What a checkpoint holds, both ways: the snapshot the step loop hands to the background
//! writer ([`Run::checkpoint`]) and the restore that `resume` starts from ([`restore`]).
//!
//! A checkpoint folder holds the model file and the text projection (the reference's files,
//! float32), `trainer.safetensors` (each trainer's optimizer moments and EMA under
//! `<model>.`, and for non-float32 runs the exact weights under `weights.`) and `state.json`
//! (the manifest and the [`LoopState`], whose trainer states are keyed by model name: `vae` in
//! Phase 1, `flow`, `text_encoder` and `discriminator` later). `state.json` carries a version:
//! version 1 (one unkeyed trainer) is read, a newer one than this build knows is refused.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::checks::check_loop_state;
use super::events::{Events, Level};
use super::resume_settings::settings_for_resume;
use super::state::{reference_lrs, reference_training_state, LoopState};
use super::step_loop::{Counters, Run};
use super::writer::{Snapshot, Writer};
use crate::config::Config;
use crate::data::DataRecord;
use crate::model::{FluxModel, ModelConfig, DIFFUSER, TEXT};
use crate::params::ParamStore;
use crate::run::dir::{RunDir, REFERENCE_LR_FILE, REFERENCE_STATE_FILE, STATE_FILE};
use crate::train::optim;
use crate::train::step::{vae_params, VaeTrainer};
use crate::weights::model_file::model_file_bytes;
use crate::weights::{
    check_finite, read_architecture, read_tensors, to_safetensors_bytes,
    to_safetensors_bytes_exact, TEXT_FILE,
};

pub use crate::run::dir::{IMAGES_FILE, MODEL_FILE, TRAINER_FILE};

/// The loop state of `state.json` at any version this build reads, as the current version;
/// also the version it was written at.
pub fn read_loop_state(mut raw: Value) -> Result<(LoopState, u32)> {
    let version = raw
        .get("version")
        .and_then(Value::as_u64)
        .ok_or_else(|| anyhow!("it has no version number"))? as u32;
    match version {
        1 => {
            // One trainer, the VAE's, under "trainer".
            let m = raw
                .as_object_mut()
                .ok_or_else(|| anyhow!("it is not a JSON object"))?;
            let trainer = m
                .remove("trainer")
                .ok_or_else(|| anyhow!("version 1 without a trainer state"))?;
            m.insert("trainers".into(), json!({ "vae": trainer }));
            m.insert("version".into(), json!(LoopState::VERSION));
        }
        v if v == LoopState::VERSION => {}
        v if v > LoopState::VERSION => bail!(
            "its state version {v} is newer than this fluxflow reads (1 to {}): resume it with \
             the fluxflow that wrote it, or a newer one",
            LoopState::VERSION
        ),
        v => bail!("its state version {v} is unknown"),
    }
    // A key that does not read is named by its path under `loop`.
    let state = serde_path_to_error::deserialize(raw)
        .map_err(|e| anyhow!("loop.{}: {}", e.path(), e.inner()))?;
    Ok((state, version))
}

impl Run {
    /// The run's trainers by model name (Phase 1: the VAE's).
    pub(super) fn trainers(&self) -> Vec<(&'static str, &VaeTrainer)> {
        vec![("vae", &self.trainer)]
    }

    /// A snapshot of the current step handed to the background writer: a complete checkpoint
    /// and the reference's files at the root. Returns how long the loop was blocked (waiting
    /// for the previous write, then taking the snapshot).
    pub(super) fn checkpoint(
        &mut self,
        writer: &Writer,
        n: &mut Counters,
        total: u64,
        spe: u64,
        session_start: Instant,
        ev: &mut dyn Events,
    ) -> Result<Duration> {
        let start = Instant::now();
        // The previous snapshot's memory is released before this one is taken.
        writer.wait()?;
        let model_bytes = model_file_bytes(&self.model)?;
        let text_bytes = to_safetensors_bytes(&self.model.params.tensors(TEXT))?;
        let mut exact: Vec<(String, Tensor)> = Vec::new();
        let mut trainers = BTreeMap::new();
        for (name, trainer) in self.trainers() {
            exact.extend(
                trainer
                    .state_tensors()
                    .into_iter()
                    .map(|(k, t)| (format!("{name}.{k}"), t)),
            );
            trainers.insert(name.to_string(), trainer.state());
        }
        if self.dtype != DType::F32 {
            exact.extend(
                self.model
                    .params
                    .tensors("")
                    .into_iter()
                    .map(|(k, t)| (format!("weights.{k}"), t)),
            );
        }
        let trainer_bytes = to_safetensors_bytes_exact(&exact)?;
        let images_bytes = serde_json::to_vec(&DataRecord::of(&self.dataset))?;
        n.checkpoints_written += 1;
        let state = LoopState {
            version: LoopState::VERSION,
            global_step: n.global_step,
            total_steps: total,
            steps_per_epoch: spe,
            sampler: n.sampler,
            checkpoints_written: n.checkpoints_written,
            last_sample_step: n.last_sample_step,
            last_eval_step: n.last_eval_step,
            elapsed_secs: n.elapsed_before + session_start.elapsed().as_secs_f64(),
            bad_files: self.bad_files,
            vae_avg: n.vae_avg.clone(),
            kl_avg: n.kl_avg.clone(),
            dtype: self.cfg.training.dtype.to_string(),
            trainers,
        };
        // The reference's files at the root, so its tools read our runs.
        let root = &self.dir.root;
        let [flow, text, disc] = self.other_lrs;
        let lrs = reference_lrs(flow, self.trainer.lr(), text, disc);
        let t = &self.cfg.training;
        let ts = reference_training_state(
            n.sampler.epoch,
            n.sampler.position as u64,
            n.global_step,
            t.kl_warmup_steps,
            t.kl_beta,
            &lrs,
        );
        self.session.skipped_batches = self.trainer.skipped();
        self.session.bad_files = self.bad_files;
        self.session.last_update = crate::train::metrics::now_iso();
        let snap = Snapshot {
            step: n.global_step,
            files: vec![
                (MODEL_FILE, model_bytes),
                (TEXT_FILE, text_bytes),
                (TRAINER_FILE, trainer_bytes),
                (IMAGES_FILE, images_bytes),
            ],
            state: json!({ "loop": state }),
            keep_last: self.cfg.output.keep_last,
            copies: vec![(root.join(MODEL_FILE), 0), (root.join(TEXT_FILE), 1)],
            after: vec![
                (root.join(REFERENCE_LR_FILE), serde_json::to_vec(&lrs)?),
                (
                    root.join(REFERENCE_STATE_FILE),
                    serde_json::to_vec_pretty(&ts)?,
                ),
                (
                    self.dir.graph().join("session.json"),
                    serde_json::to_vec_pretty(&self.session)?,
                ),
            ],
        };
        writer.submit(snap)?;
        n.last_checkpoint_step = Some(n.global_step);
        ev.log(
            Level::Info,
            &format!(
                "checkpoint of step {} in {} (written in the background)",
                n.global_step,
                self.dir
                    .checkpoints()
                    .join(format!("step-{:08}", n.global_step))
                    .display()
            ),
        );
        Ok(start.elapsed())
    }
}

/// What a checkpoint restores.
pub(super) struct Restored {
    pub model: FluxModel,
    pub trainer: VaeTrainer,
    pub state: LoopState,
    /// The data set it trained on, when it records one.
    pub data: Option<DataRecord>,
    /// Step settings in which `run.yaml` and the checkpoint differ, and which is used.
    pub notes: Vec<String>,
}

/// Model, trainer and loop state from one checkpoint folder, every value of its state checked
/// ([`check_loop_state`]).
pub(super) fn restore(
    dir: &RunDir,
    ckpt: &Path,
    cfg: &Config,
    dtype: DType,
    device: &Device,
) -> Result<Restored> {
    let json = dir.verify(ckpt)?;
    let raw = json
        .get("loop")
        .cloned()
        .ok_or_else(|| anyhow!("no loop state in {}", ckpt.display()))?;
    let state_file = ckpt.join(STATE_FILE);
    let (state, version) = read_loop_state(raw)
        .with_context(|| format!("cannot read the loop state of {}", state_file.display()))?;
    let folder_step = ckpt
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("step-"))
        .and_then(|n| n.parse::<u64>().ok());
    if folder_step.is_some_and(|s| s != state.global_step) {
        bail!(
            "{} says global_step {}, but the folder holds step {}",
            ckpt.join(STATE_FILE).display(),
            state.global_step,
            folder_step.unwrap_or_default()
        );
    }
    if state.global_step > state.total_steps {
        bail!(
            "{} says global_step {}, beyond the run's {} steps",
            ckpt.join(STATE_FILE).display(),
            state.global_step,
            state.total_steps
        );
    }
    check_loop_state(&state, cfg.training.dtype, &state_file)?;
    let data = if json["manifest"]["files"].get(IMAGES_FILE).is_some() {
        let path = ckpt.join(IMAGES_FILE);
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let record: DataRecord = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a list of images", path.display()))?;
        Some(record)
    } else {
        None
    };
    let read = |file: &str| -> Result<HashMap<String, Tensor>> {
        let path = ckpt.join(file);
        let t = read_tensors(&path)?;
        check_finite(&t, &path)?;
        Ok(t)
    };
    let mut tensors = read(MODEL_FILE)?;
    tensors.extend(read(TEXT_FILE)?);
    let trainer_tensors = read(TRAINER_FILE)?;
    // Trainer tensors by model name: `<model>.<name>`; version 1 held the VAE's unprefixed.
    let mut by_model: BTreeMap<String, HashMap<String, Tensor>> = BTreeMap::new();
    for (k, t) in trainer_tensors {
        if let Some(name) = k.strip_prefix("weights.") {
            tensors.insert(name.to_string(), t);
            continue;
        }
        let (model, name) = match (version, k.split_once('.')) {
            (1, _) => ("vae".to_string(), k.clone()),
            (_, Some((m, rest))) if state.trainers.contains_key(m) => {
                (m.to_string(), rest.to_string())
            }
            _ => bail!(
                "{}: tensor {k} belongs to no trainer of the checkpoint ({})",
                ckpt.join(TRAINER_FILE).display(),
                state
                    .trainers
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        by_model
            .entry(model)
            .or_default()
            .insert(name, t.to_dtype(dtype)?.to_device(device)?);
    }
    // The activation and baseline width are the checkpoint's (what its tensors were built for).
    let (activation, baseline_width_mult) = read_architecture(&ckpt.join(MODEL_FILE))?;
    let model_cfg = ModelConfig {
        activation,
        baseline_width_mult,
        ..cfg.model_config()
    };
    let store = ParamStore::loaded(tensors, vec![], dtype, device);
    let model = FluxModel::build(&model_cfg, store.clone())?;
    store.check_complete(&[DIFFUSER, TEXT])?;
    // Phase 1 trains one model; each trainer of a later phase is restored the same way.
    let vae_state = state.trainers.get("vae").ok_or_else(|| {
        anyhow!(
            "{} holds no trainer state for the vae",
            ckpt.join(STATE_FILE).display()
        )
    })?;
    let mut vae_state = vae_state.clone();
    let notes = settings_for_resume(&mut vae_state.config, &cfg.step_config());
    let opt = optim::build("vae", &vae_state.optimizer.spec, vae_params(&model))?;
    let mut trainer = VaeTrainer::new(
        vae_state.config.clone(),
        &model,
        opt,
        vae_state.scheduler.clone(),
    )?;
    trainer.load_state(&vae_state, &by_model.remove("vae").unwrap_or_default())?;
    Ok(Restored {
        model,
        trainer,
        state,
        data,
        notes,
    })
}
