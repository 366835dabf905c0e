//! Starting a run from a configuration, and restoring one from its newest complete checkpoint.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device};

use super::checkpoint::{restore, Restored};
use super::events::{Events, Filtered, Level};
use super::step_loop::Run;
use super::{RunSummary, StopSignal};
use crate::atomic_write::write_atomic;
use crate::config::limits::{dtype_problem, MAX_STEPS};
use crate::config::{Config, OptimFile, Overrides};
use crate::data::{scan, synthetic, BatchSampler, DataRecord, Dataset, SamplerState};
use crate::eval::EvalSet;
use crate::model::FluxModel;
use crate::run::dir::own::{self, Contents};
use crate::run::dir::{RunDir, CONFIG_FILE, OPTIM_FILE};
use crate::train::metrics::{MetricsLog, Session};
use crate::train::optim;
use crate::train::sample::load_templates;
use crate::train::schedule::Scheduler;
use crate::train::step::{vae_params, VaeTrainer};

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
                // Only the generated files go: anything else in the folder is not ours.
                let kept = own::clear_synthetic(&root)?;
                if !kept.is_empty() {
                    events.log(
                        Level::Warn,
                        &format!(
                            "{} holds {} file(s) fluxflow did not generate (kept, and read as \
                             training images where they are images): {}",
                            root.display(),
                            kept.len(),
                            kept.iter()
                                .map(|p| p.display().to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    );
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

/// What a run folder of ours holds, for messages: "run.yaml and 3 checkpoint folder(s), the
/// newest checkpoints/step-00000016", "run.yaml and no checkpoint", ...
fn describe_run(c: &Contents) -> String {
    let ckpts = match c.checkpoints.first() {
        None => "no checkpoint".to_string(),
        Some(newest) => format!(
            "{} checkpoint folder(s), the newest checkpoints/step-{newest:08}",
            c.checkpoints.len()
        ),
    };
    if c.config {
        format!("{CONFIG_FILE} and {ckpts}")
    } else {
        format!("{ckpts} but no {CONFIG_FILE}")
    }
}

/// The run's length from its configuration and its data: (`training.n_epochs` x the steps per
/// epoch, and that capped at `training.max_steps`), refused beyond the most steps a run may
/// have.
fn run_length(cfg: &Config, steps_per_epoch: u64) -> Result<(u64, u64)> {
    let planned = cfg.training.n_epochs.saturating_mul(steps_per_epoch);
    let total = cfg.training.max_steps.map_or(planned, |m| m.min(planned));
    if total > MAX_STEPS {
        bail!(
            "training.n_epochs {} x {steps_per_epoch} steps per epoch is {planned} steps, more \
             than the {MAX_STEPS} a run may have; lower training.n_epochs or set \
             training.max_steps",
            cfg.training.n_epochs
        );
    }
    Ok((planned, total))
}

/// What sets the run's length, for messages: `training.max_steps`, the epochs, or the smaller.
fn length_source(cfg: &Config, planned: u64, steps_per_epoch: u64) -> String {
    let epochs = format!(
        "training.n_epochs {} x {steps_per_epoch} steps per epoch",
        cfg.training.n_epochs
    );
    match cfg.training.max_steps {
        Some(m) if m < planned => format!("training.max_steps {m}"),
        Some(m) => format!("training.max_steps {m}, {epochs} = {planned}"),
        None => epochs,
    }
}

/// The learning rates of the optimizer JSON, used in the training dtype: each must be a number
/// there (as `training.lr` must).
fn check_optim_in_dtype(cfg: &Config, optim: &OptimFile) -> Result<()> {
    for model in ["vae", "flow", "text_encoder", "discriminator"] {
        let lr = optim.optimizer(model, cfg.training.lr)?.lr();
        if let Some(why) = dtype_problem(lr, cfg.training.dtype) {
            let file = cfg.optimization.optim_sched_config.as_ref().map_or_else(
                || "the optimizer settings".into(),
                |p| p.display().to_string(),
            );
            bail!("{file}: the {model} optimizer's lr is {lr:e}: {why}");
        }
    }
    Ok(())
}

/// Refuses a folder that holds files fluxflow did not write and no run of ours (a PyTorch
/// reference run, a user's model file or notes): `train` writes only into an empty folder or
/// its own run's, whatever `--force` says.
fn refuse_foreign(dir: &RunDir, c: &Contents) -> Result<()> {
    if c.is_run() || c.foreign.is_empty() {
        return Ok(());
    }
    let mut msg = format!(
        "{} holds files fluxflow did not write ({}) and no run of its own (no {CONFIG_FILE}, no \
         checkpoints/step-*); train writes only into an empty folder or one of its own runs \
         (--force deletes only such a run's files): name another output folder with --output",
        dir.root.display(),
        c.foreign_list(6)
    );
    if let Some(model) = c.foreign_model() {
        msg.push_str(&format!(
            "; to start from {0}, read it as the source: --set model_checkpoint={0}",
            dir.root.join(model).display()
        ));
    }
    bail!(msg)
}

/// Refuses a folder `train` may not write into: one holding files fluxflow did not write and
/// no run of ours ([`refuse_foreign`]), or a run of ours unless `force`.
fn refuse_existing(dir: &RunDir, contents: &Contents, force: bool) -> Result<()> {
    refuse_foreign(dir, contents)?;
    if !contents.is_run() || force {
        return Ok(());
    }
    let root = dir.root.display();
    if contents.config {
        bail!(
            "{root} already holds a run ({}); continue it with `fluxflow resume --output \
             {root}`, or pass --force to start over (the files that run wrote are deleted, any \
             others kept)",
            describe_run(contents)
        );
    }
    bail!(
        "{root} holds an unfinished fluxflow run ({}), which cannot be resumed without its \
         configuration; pass --force to start over (the files that run wrote are deleted, any \
         others kept), or name another output folder",
        describe_run(contents)
    )
}

/// Refuses a data folder and an output folder that overlap (one is the other or inside it):
/// the run would read its own samples as training images, and `--force` would delete in the
/// data folder.
fn refuse_overlap(cfg: &Config, dir: &RunDir) -> Result<()> {
    if cfg.data.synthetic.is_some() {
        // The run generates its data inside its own folder.
        return Ok(());
    }
    if let Some(data) = &cfg.data.data_path {
        if crate::paths::overlap(data, &dir.root) {
            bail!(
                "the data folder {} and the output folder {} overlap (one is the other or lies \
                 inside it): a run writes samples and checkpoints into its output folder, and \
                 --force deletes there; name an output folder outside the data folder",
                data.display(),
                dir.root.display()
            );
        }
    }
    Ok(())
}

/// Deletes the files of the run `c` describes and its folders left empty; files fluxflow did
/// not write stay (see [`own`]), and so do the caches a new run reuses.
fn remove_run(dir: &RunDir, c: &Contents, events: &mut dyn Events) -> Result<()> {
    own::remove_run_files(&dir.root, c)?;
    events.log(
        Level::Info,
        &format!(
            "--force: deleted the {} file(s) of the previous run in {}",
            c.run_files.len(),
            dir.root.display()
        ),
    );
    if !c.foreign.is_empty() {
        events.log(
            Level::Info,
            &format!(
                "--force: kept {} file(s) fluxflow did not write: {}",
                c.foreign.len(),
                c.foreign_list(6)
            ),
        );
    }
    Ok(())
}

/// Starts a new run. Refuses a folder that already holds one unless `force`, and a folder
/// that holds files fluxflow did not write.
pub fn start(
    mut cfg: Config,
    force: bool,
    events: &mut dyn Events,
    stop: &StopSignal,
) -> Result<RunSummary> {
    let mut filtered = Filtered::new(events, cfg.output.log_level);
    let events: &mut dyn Events = &mut filtered;
    let dir = RunDir::new(&cfg.output.output_path);
    refuse_overlap(&cfg, &dir)?;
    // Before the lock file is created, so that a folder of files fluxflow did not write is left
    // untouched; then under the lock, which is what counts (and which names the process using
    // a run of ours).
    refuse_foreign(&dir, &dir.contents()?)?;
    let _lock = dir.lock()?;
    let contents = dir.contents()?;
    refuse_existing(&dir, &contents, force)?;
    let replace = contents.is_run();
    let (optim, optim_text) = optim_file(&cfg, None)?;
    check_optim_in_dtype(&cfg, &optim)?;
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
    cfg.output.test_image_address = template_paths;
    cfg.data.data_path = cfg.data.data_path.as_ref().map(absolute);
    cfg.data.captions_file = cfg.data.captions_file.as_ref().map(absolute);
    cfg.model_checkpoint = cfg.model_checkpoint.as_ref().map(absolute);
    cfg.output.eval_data = cfg.output.eval_data.as_ref().map(absolute);
    let model = match &cfg.model_checkpoint {
        Some(p) => {
            // The loader's errors name the file.
            crate::weights::load_model_as(p, &cfg.model_config(), dtype, &device)
                .context("model_checkpoint")?
                .model
        }
        None => FluxModel::fresh(&cfg.model_config(), dtype, &device, cfg.training.seed)?,
    };
    let sampler = BatchSampler::new(&dataset, cfg.training.batch_size, cfg.training.seed)?;
    let spe = sampler.batches_per_epoch() as u64;
    let (planned, total) = run_length(&cfg, spe)?;
    let vae_spec = optim.optimizer("vae", cfg.training.lr)?;
    let sched_spec = optim.scheduler("vae", cfg.training.lr_min, total)?;
    let opt = optim::build("vae", &vae_spec, vae_params(&model))?;
    let sched = Scheduler::build("vae", &sched_spec, vae_spec.lr(), total)?;
    let trainer = VaeTrainer::new(cfg.step_config(), &model, opt, sched)?;
    let other = other_lrs(&optim, &cfg)?;
    if replace {
        // Only now that the new run's settings, data, device, templates and model are all
        // valid (and a model_checkpoint inside the old run is read).
        remove_run(&dir, &contents, events)?;
    }
    dir.create()?;
    // run.yaml first: from then on the folder is a run of ours, whose files are known.
    if optim_text.is_some() {
        cfg.optimization.optim_sched_config = Some(PathBuf::from(OPTIM_FILE));
    }
    write_atomic(
        &dir.root.join(CONFIG_FILE),
        serde_yaml::to_string(&cfg)?.as_bytes(),
    )?;
    if let Some(text) = &optim_text {
        write_atomic(&dir.root.join(OPTIM_FILE), text.as_bytes())?;
    }

    let mut session = Session::new();
    session.save(&dir.graph().join("session.json"))?;
    let metrics = MetricsLog::new(&dir.graph(), &session.session_id);
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
        total,
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
    EvalSet::load(root, Some(cfg.output.eval_limit), cfg.data.img_size, None)
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

/// Refuses to resume a folder without a run of ours that can be resumed (its `run.yaml`),
/// saying what the folder holds and what is missing.
fn refuse_resume(dir: &RunDir, c: &Contents) -> Result<()> {
    let root = dir.root.display();
    if c.config {
        return Ok(());
    }
    if !dir.root.exists() {
        bail!("{root} does not exist; start a run there with `fluxflow train --output {root}`");
    }
    if c.is_run() {
        bail!(
            "{root} holds an unfinished fluxflow run ({}): resume needs the run's configuration \
             {}, which is missing; start over with `fluxflow train --force --output {root}`",
            describe_run(c),
            dir.root.join(CONFIG_FILE).display()
        );
    }
    let mut msg = format!("{root} holds no fluxflow run (no {CONFIG_FILE}, no checkpoints/step-*)");
    if !c.foreign.is_empty() {
        msg.push_str(&format!(
            ", only files fluxflow did not write ({})",
            c.foreign_list(6)
        ));
    }
    match c.foreign_model() {
        Some(model) => msg.push_str(&format!(
            "; to train from {0}, start a run in another folder with `fluxflow train --output \
             NEW_FOLDER --set model_checkpoint={0}`",
            dir.root.join(model).display()
        )),
        None => msg.push_str("; start one with `fluxflow train`"),
    }
    bail!(msg)
}

/// Why the data order a checkpoint saved its position in no longer holds, if it does not: the
/// images changed (`recorded` against `dataset`), or, for a checkpoint that records none, the
/// number of batches per epoch (the images or `training.batch_size` changed).
fn data_order_change(
    dataset: &Dataset,
    recorded: Option<&DataRecord>,
    saved_spe: u64,
    spe: u64,
) -> Option<String> {
    let root = dataset.root.display();
    match recorded {
        Some(r) => {
            let change = r.changes(&DataRecord::of(dataset));
            if !change.is_empty() {
                Some(format!(
                    "the data set in {root} changed: {}",
                    change.describe()
                ))
            } else if saved_spe != spe {
                Some(format!(
                    "the batches per epoch changed from {saved_spe} to {spe} (training.batch_size \
                     changed)"
                ))
            } else {
                None
            }
        }
        None if saved_spe != spe => Some(format!(
            "the data in {root} or training.batch_size changed (an epoch had {saved_spe} batches, \
             now {spe}; the checkpoint does not list its images, so which were added or removed \
             is not known)"
        )),
        None => None,
    }
}

/// Continues the run in `output` from its newest complete checkpoint (falling back to an
/// older one when the newest is damaged).
pub fn resume(output: &Path, events: &mut dyn Events, stop: &StopSignal) -> Result<RunSummary> {
    let dir = RunDir::new(output);
    let cfg_path = dir.root.join(CONFIG_FILE);
    refuse_resume(&dir, &dir.contents()?)?;
    let _lock = dir.lock()?;
    let cfg = Config::load(&cfg_path, &Overrides::default())?;
    let mut filtered = Filtered::new(events, cfg.output.log_level);
    let events: &mut dyn Events = &mut filtered;
    let (optim, _) = optim_file(&cfg, Some(&dir.root))?;
    check_optim_in_dtype(&cfg, &optim)?;
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
    let mut newest_error = None;
    for (step, path) in &checkpoints {
        match restore(&dir, path, &cfg, dtype, &device) {
            Ok(r) => {
                restored = Some(r);
                break;
            }
            Err(e) => {
                events.log(
                    Level::Warn,
                    &format!(
                        "checkpoint of step {step} ({}) cannot be used: {e:#}; falling back to the previous one",
                        path.display()
                    ),
                );
                newest_error.get_or_insert(format!("{e:#}"));
            }
        }
    }
    let Some(Restored {
        model,
        mut trainer,
        mut state,
        data,
        notes,
    }) = restored
    else {
        bail!(
            "no checkpoint in {} could be restored (the newest: {})",
            dir.checkpoints().display(),
            newest_error.unwrap_or_default()
        );
    };
    for note in notes {
        events.log(Level::Warn, &format!("{}: {note}", cfg_path.display()));
    }
    let mut sampler = BatchSampler::new(&dataset, cfg.training.batch_size, cfg.training.seed)?;
    let spe = sampler.batches_per_epoch() as u64;
    if let Some(why) = data_order_change(&dataset, data.as_ref(), state.steps_per_epoch, spe) {
        // The saved position indexes an order of the old set: the new set starts a new epoch.
        let was = state.sampler;
        state.sampler = SamplerState {
            epoch: if was.position > 0 {
                was.epoch + 1
            } else {
                was.epoch
            },
            position: 0,
        };
        events.log(
            Level::Warn,
            &format!(
                "{why} since the checkpoint of step {}: training goes on with the data as it is \
                 now ({} images, {spe} batches per epoch) from the start of epoch {}{}",
                state.global_step,
                dataset.len(),
                state.sampler.epoch,
                if was.position > 0 {
                    format!(
                        " (the last {} batches of epoch {}'s order, drawn from the old set, are \
                         not trained)",
                        state.steps_per_epoch.saturating_sub(was.position as u64),
                        was.epoch
                    )
                } else {
                    String::new()
                }
            ),
        );
    }
    sampler
        .restore(state.sampler)
        .context("the data changed since the checkpoint")?;
    let (planned, total) = run_length(&cfg, spe).with_context(|| cfg_path.display().to_string())?;
    if total < state.global_step {
        bail!(
            "{}: {} makes the run {total} steps long, but its newest usable checkpoint is at \
             step {}: nothing is left to train; raise training.max_steps or training.n_epochs \
             to continue it",
            cfg_path.display(),
            length_source(&cfg, planned, spe),
            state.global_step
        );
    }
    if total != state.total_steps {
        let schedule = if trainer.set_run_length(total) {
            let lr = trainer.scheduler().lr();
            let floor = trainer
                .scheduler()
                .learning_rates()
                .into_iter()
                .find(|(k, _)| *k == "eta_min")
                .map_or(0.0, |(_, v)| v);
            if lr <= floor {
                format!(
                    "the vae's CosineAnnealingLR, whose learning rate has reached its eta_min \
                     {floor:e}, stays there to step {total}"
                )
            } else {
                format!(
                    "the vae's CosineAnnealingLR now reaches its eta_min {floor:e} at step \
                     {total}, going on from its current learning rate {lr:e} without a jump"
                )
            }
        } else {
            format!(
                "the vae's {} keeps its saved settings",
                trainer.scheduler().kind()
            )
        };
        events.log(
            Level::Warn,
            &format!(
                "the run's length changed from {} to {total} steps ({} in {}): training goes \
                 on to step {total}, and {schedule}",
                state.total_steps,
                length_source(&cfg, planned, spe),
                cfg_path.display()
            ),
        );
    }
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
            total,
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
        total,
    };
    run.run(events, stop, false)
}
