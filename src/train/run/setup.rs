//! Starting a run from a configuration, and restoring one from its newest complete checkpoint.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device};

use super::checkpoint::{restore, MODEL_FILE};
use super::events::{Events, Filtered, Level};
use super::step_loop::Run;
use super::{RunSummary, StopSignal};
use crate::atomic_write::write_atomic;
use crate::config::{Config, OptimFile, Overrides};
use crate::data::{scan, synthetic, BatchSampler, Dataset};
use crate::eval::EvalSet;
use crate::model::FluxModel;
use crate::train::metrics::{MetricsLog, Session};
use crate::train::optim;
use crate::train::run_dir::{RunDir, CONFIG_FILE};
use crate::train::sample::load_templates;
use crate::train::schedule::Scheduler;
use crate::train::step::{vae_params, VaeTrainer};
use crate::weights::TEXT_FILE;

/// The optimizer JSON as the run uses it, copied into the run folder.
pub const OPTIM_FILE: &str = "optim.json";

fn dtype_of(cfg: &Config) -> DType {
    cfg.training.dtype.dtype()
}

/// Finds (or generates) and scans the data, before any model is built.
fn prepare_data(
    cfg: &Config,
    dir: &RunDir,
    events: &mut dyn Events,
) -> Result<(Dataset, Vec<PathBuf>)> {
    let mut templates = cfg.output.test_image_address.clone();
    let root = match &cfg.data.synthetic {
        Some(s) => {
            let root = dir.root.join("synthetic-data");
            let size = (s.width, s.height);
            // Generated once per setting: a marker records what the folder holds.
            let marker = root.join("synthetic.json");
            let wanted = serde_json::to_string(s)?;
            let current = std::fs::read_to_string(&marker).ok();
            let files = if current.as_deref() == Some(wanted.as_str()) {
                Vec::new()
            } else {
                if root.exists() {
                    std::fs::remove_dir_all(&root)
                        .with_context(|| format!("cannot remove {}", root.display()))?;
                }
                events.log(
                    Level::Info,
                    &format!(
                        "generating {} synthetic images in {}",
                        s.count,
                        root.display()
                    ),
                );
                let files = synthetic::generate(&root, s.count, size, s.seed)?;
                write_atomic(&marker, wanted.as_bytes())?;
                files
            };
            if templates.is_empty() {
                // One template of each generated size.
                let second = synthetic::second_size(size);
                let mut all = files;
                if all.is_empty() {
                    all = walk_pngs(&root)?;
                }
                for want in [size, second] {
                    if let Some(p) = all
                        .iter()
                        .find(|p| image::image_dimensions(p).is_ok_and(|(w, h)| (w, h) == want))
                    {
                        templates.push(p.clone());
                    }
                }
            }
            root
        }
        None => cfg
            .data
            .data_path
            .clone()
            .ok_or_else(|| anyhow!("data.data_path is not set (or pass --data DIR)"))?,
    };
    std::fs::create_dir_all(&dir.root)
        .with_context(|| format!("cannot create the output folder {}", dir.root.display()))?;
    let dataset = scan(
        &root,
        cfg.data.captions_file.as_deref(),
        cfg.data.img_size,
        &dir.root,
    )?;
    for bad in &dataset.bad {
        events.log(
            Level::Warn,
            &format!("skipping {}: {}", bad.path.display(), bad.reason),
        );
    }
    Ok((dataset, templates))
}

fn walk_pngs(root: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    v.sort();
    Ok(v)
}

/// The optimizer JSON; a relative path is taken relative to `base` when given (a run folder),
/// else to the current folder.
fn optim_file(cfg: &Config, base: Option<&Path>) -> Result<(OptimFile, Option<String>)> {
    match &cfg.optimization.optim_sched_config {
        None => Ok((OptimFile::default(), None)),
        Some(p) => {
            let p = match base {
                Some(b) if p.is_relative() => b.join(p),
                _ => p.clone(),
            };
            let text = std::fs::read_to_string(&p).with_context(|| {
                format!(
                    "optimization.optim_sched_config: cannot read {}",
                    p.display()
                )
            })?;
            let f = OptimFile::parse(&text).with_context(|| format!("in {}", p.display()))?;
            Ok((f, Some(text)))
        }
    }
}

/// Refuses a run whose largest batch cannot fit in memory (see [`crate::memory`]): the
/// largest training size in the data times the batch, checked before the model is built.
fn check_batch_fits(cfg: &Config, dataset: &Dataset, dtype: DType, device: &Device) -> Result<()> {
    let Some(((w, h), members)) = dataset
        .buckets()
        .into_iter()
        .max_by_key(|((w, h), _)| *w as u64 * *h as u64)
    else {
        return Ok(());
    };
    let batch = cfg.training.batch_size.min(members.len());
    let act = cfg.step_config().mixed_precision.compute_dtype(dtype);
    crate::memory::check_fits(
        &format!(
            "a training step of {batch} image(s) of {w}x{h} (the largest training size in {})",
            dataset.root.display()
        ),
        crate::memory::activation_bytes(
            &cfg.model_config(),
            batch,
            h as usize,
            w as usize,
            act,
            true,
        ),
        device,
    )
    .context("set data.img_size to cap the images' size, or lower training.batch_size")
}

/// Deletes a run's checkpoints, logs, samples and root files (not its data caches).
fn remove_run(dir: &RunDir) -> Result<()> {
    for sub in ["checkpoints", "graph", "samples"] {
        let p = dir.root.join(sub);
        if p.exists() {
            std::fs::remove_dir_all(&p)
                .with_context(|| format!("cannot remove {}", p.display()))?;
        }
    }
    for f in [
        CONFIG_FILE,
        OPTIM_FILE,
        MODEL_FILE,
        TEXT_FILE,
        "training_state.json",
        "lr_sav.json",
    ] {
        let _ = std::fs::remove_file(dir.root.join(f));
    }
    Ok(())
}

/// Starts a new run. Refuses a folder that already holds one unless `force`.
pub fn start(
    mut cfg: Config,
    force: bool,
    events: &mut dyn Events,
    stop: &StopSignal,
) -> Result<RunSummary> {
    let mut filtered = Filtered::new(events, cfg.output.log_level);
    let events: &mut dyn Events = &mut filtered;
    let dir = RunDir::new(&cfg.output.output_path);
    let _lock = dir.lock()?;
    let replace = dir.has_run();
    if replace && !force {
        bail!(
            "{} already holds a run; continue it with `fluxflow resume --output {}`, or pass \
             --force to start over (its checkpoints, logs and samples are deleted)",
            dir.root.display(),
            dir.root.display()
        );
    }
    let (optim, optim_text) = optim_file(&cfg, None)?;
    let (dataset, template_paths) = prepare_data(&cfg, &dir, events)?;
    let device = cfg.training.device.open()?;
    let dtype = dtype_of(&cfg);
    crate::memory::check_model_fits(&cfg.model_config(), dtype, true, &device)?;
    check_batch_fits(&cfg, &dataset, dtype, &device)?;
    // Absolute paths in the run's config copy, so `resume` works from any folder.
    let absolute = |p: &PathBuf| p.canonicalize().unwrap_or_else(|_| p.clone());
    let template_paths: Vec<PathBuf> = template_paths.iter().map(absolute).collect();
    let templates = load_templates(&template_paths, cfg.data.img_size, dtype, &device)?;
    let eval_set = load_eval_set(&cfg)?;
    if replace {
        // Only now that the new run's settings, data, device and templates are all valid.
        remove_run(&dir)?;
    }
    dir.create()?;
    if let Some(text) = &optim_text {
        write_atomic(&dir.root.join(OPTIM_FILE), text.as_bytes())?;
        cfg.optimization.optim_sched_config = Some(PathBuf::from(OPTIM_FILE));
    }
    cfg.output.test_image_address = template_paths;
    cfg.data.data_path = cfg.data.data_path.as_ref().map(absolute);
    cfg.data.captions_file = cfg.data.captions_file.as_ref().map(absolute);
    cfg.model_checkpoint = cfg.model_checkpoint.as_ref().map(absolute);
    cfg.output.eval_data = cfg.output.eval_data.as_ref().map(absolute);
    let model = match &cfg.model_checkpoint {
        Some(p) => {
            let loaded = crate::weights::load_model(p, dtype, &device)
                .with_context(|| format!("model_checkpoint: {}", p.display()))?;
            if loaded.model.config != cfg.model_config() {
                bail!(
                    "model_checkpoint {} has dimensions {:?}, the model section asks for {:?}",
                    p.display(),
                    loaded.model.config,
                    cfg.model_config()
                );
            }
            loaded.model
        }
        None => FluxModel::fresh(&cfg.model_config(), dtype, &device, cfg.training.seed)?,
    };
    let sampler = BatchSampler::new(&dataset, cfg.training.batch_size, cfg.training.seed)?;
    let spe = sampler.batches_per_epoch() as u64;
    let planned = cfg.training.n_epochs * spe;
    let total = cfg.training.max_steps.map_or(planned, |m| m.min(planned));
    let vae_spec = optim.optimizer("vae", cfg.training.lr)?;
    let sched_spec = optim.scheduler("vae", cfg.training.lr_min, total)?;
    let opt = optim::build("vae", &vae_spec, vae_params(&model))?;
    let sched = Scheduler::build("vae", &sched_spec, vae_spec.lr(), total)?;
    let trainer = VaeTrainer::new(cfg.step_config(), &model, opt, sched)?;
    write_atomic(
        &dir.root.join(CONFIG_FILE),
        serde_yaml::to_string(&cfg)?.as_bytes(),
    )?;

    let mut session = Session::new();
    session.save(&dir.graph().join("session.json"))?;
    let metrics = MetricsLog::new(&dir.graph(), &session.session_id);
    let other = other_lrs(&optim, &cfg)?;
    let run = Run {
        bad_files: dataset.bad.len() as u64,
        cfg,
        dir,
        device,
        dtype,
        model,
        trainer,
        dataset,
        sampler,
        templates,
        eval_set,
        metrics,
        session,
        other_lrs: other,
        state: None,
    };
    run.describe(events, &optim, spe, planned, total);
    run.run(events, stop, true)
}

/// The held-out images of `output.eval_data` (up to `output.eval_limit`, at their training
/// size after `data.img_size`), if set.
fn load_eval_set(cfg: &Config) -> Result<Option<EvalSet>> {
    let Some(root) = &cfg.output.eval_data else {
        return Ok(None);
    };
    EvalSet::load(root, Some(cfg.output.eval_limit), cfg.data.img_size)
        .with_context(|| format!("output.eval_data: {}", root.display()))
        .map(Some)
}

/// Learning rates of the models Phase 1 does not train, for the logs: (flow, text, disc).
fn other_lrs(optim: &OptimFile, cfg: &Config) -> Result<[f64; 3]> {
    Ok([
        optim.optimizer("flow", cfg.training.lr)?.lr(),
        optim.optimizer("text_encoder", cfg.training.lr)?.lr(),
        optim.optimizer("discriminator", cfg.training.lr)?.lr(),
    ])
}

/// Continues the run in `output` from its newest complete checkpoint (falling back to an
/// older one when the newest is damaged).
pub fn resume(output: &Path, events: &mut dyn Events, stop: &StopSignal) -> Result<RunSummary> {
    let dir = RunDir::new(output);
    let cfg_path = dir.root.join(CONFIG_FILE);
    if !cfg_path.exists() {
        bail!(
            "{} holds no run (no {CONFIG_FILE}); start one with `fluxflow train`",
            dir.root.display()
        );
    }
    let _lock = dir.lock()?;
    let cfg = Config::load(&cfg_path, &Overrides::default())?;
    let mut filtered = Filtered::new(events, cfg.output.log_level);
    let events: &mut dyn Events = &mut filtered;
    let (optim, _) = optim_file(&cfg, Some(&dir.root))?;
    let (dataset, templates) = prepare_data(&cfg, &dir, events)?;
    let device = cfg.training.device.open()?;
    let dtype = dtype_of(&cfg);
    check_batch_fits(&cfg, &dataset, dtype, &device)?;
    let templates = load_templates(&templates, cfg.data.img_size, dtype, &device)?;
    let eval_set = load_eval_set(&cfg)?;
    let checkpoints = dir.list()?;
    if checkpoints.is_empty() {
        bail!(
            "{} has no complete checkpoint to resume from; start over with `fluxflow train --force`",
            dir.root.display()
        );
    }
    let mut restored = None;
    for (step, path) in &checkpoints {
        match restore(&dir, path, &cfg, dtype, &device) {
            Ok(r) => {
                restored = Some(r);
                break;
            }
            Err(e) => events.log(
                Level::Warn,
                &format!(
                    "checkpoint of step {step} ({}) cannot be used: {e:#}; falling back to the previous one",
                    path.display()
                ),
            ),
        }
    }
    let Some((model, trainer, state)) = restored else {
        bail!(
            "no checkpoint in {} could be restored",
            dir.checkpoints().display()
        );
    };
    let mut sampler = BatchSampler::new(&dataset, cfg.training.batch_size, cfg.training.seed)?;
    sampler
        .restore(state.sampler)
        .context("the data changed since the checkpoint")?;
    let session_path = dir.graph().join("session.json");
    let mut session = Session::load(&session_path).unwrap_or_default();
    session.mark_resumed(state.global_step);
    session.save(&session_path)?;
    let metrics = MetricsLog::new(&dir.graph(), &session.session_id);
    metrics.truncate_after(state.global_step)?;
    events.log(
        Level::Info,
        &format!(
            "resuming {} at step {} of {} (epoch {}, batch {})",
            dir.root.display(),
            state.global_step,
            state.total_steps,
            state.sampler.epoch,
            state.sampler.position
        ),
    );
    let other = other_lrs(&optim, &cfg)?;
    let run = Run {
        bad_files: state.bad_files,
        cfg,
        dir,
        device,
        dtype,
        model,
        trainer,
        dataset,
        sampler,
        templates,
        eval_set,
        metrics,
        session,
        other_lrs: other,
        state: Some(state),
    };
    run.run(events, stop, false)
}
