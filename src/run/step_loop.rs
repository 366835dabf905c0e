//! The step loop: batches from the loader, training steps, metrics rows, checkpoints, template
//! samples, and the clean stops (end, max_steps, max_runtime, signals).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Map, Value};

use super::events::{Events, Level, Progress};
use super::state::LoopState;
use super::writer::{Reporter, Writer};
use super::{RunSummary, StopReason, StopSignal};
use crate::config::{Config, OptimFile};
use crate::data::rng::SplitMix64;
use crate::data::{BatchSampler, Dataset, Loader, LoaderConfig, SamplerState};
use crate::eval::{evaluate, EvalSet};
use crate::model::{FluxModel, Noise, DIFFUSER, TEXT};
use crate::params::ParamStore;
use crate::run::dir::RunDir;
use crate::train::adaptive::RollingMean;
use crate::train::loss::kl_beta;
use crate::train::metrics::{MetricsLog, Session};
use crate::train::sample::{write_samples, Template};
use crate::train::step::{Skip, StepOutcome, VaeTrainer};

/// Everything a session of training holds.
pub(super) struct Run {
    pub cfg: Config,
    pub dir: RunDir,
    pub device: Device,
    pub dtype: DType,
    pub model: FluxModel,
    pub trainer: VaeTrainer,
    pub dataset: Dataset,
    pub sampler: BatchSampler,
    pub templates: Vec<Template>,
    /// The held-out images of `output.eval_data`.
    pub eval_set: Option<EvalSet>,
    pub metrics: MetricsLog,
    pub session: Session,
    /// Learning rates of flow, text encoder and discriminator (not trained in Phase 1).
    pub other_lrs: [f64; 3],
    pub bad_files: u64,
    /// The restored loop state (None for a new run).
    pub state: Option<LoopState>,
    /// The run's length in steps: from the configuration and the data (a resumed run's
    /// configuration may have changed it since its checkpoint).
    pub total: u64,
}

/// The latent noise of a step: a stream seeded by (seed, global step), so a resumed run draws
/// exactly what the uninterrupted one drew.
fn step_rng(seed: u64, step: u64) -> StdRng {
    StdRng::seed_from_u64(SplitMix64::for_stream(seed, step).next_u64())
}

/// Mutable counters of the loop.
pub(super) struct Counters {
    pub(super) global_step: u64,
    pub(super) sampler: SamplerState,
    pub(super) checkpoints_written: u64,
    pub(super) last_checkpoint_step: Option<u64>,
    pub(super) last_sample_step: Option<u64>,
    pub(super) last_eval_step: Option<u64>,
    pub(super) elapsed_before: f64,
    pub(super) vae_avg: RollingMean,
    pub(super) kl_avg: RollingMean,
}

impl Run {
    /// Prints the effective settings and warnings.
    pub fn describe(
        &self,
        ev: &mut dyn Events,
        optim: &OptimFile,
        spe: u64,
        planned: u64,
        total: u64,
    ) {
        let c = &self.cfg;
        let buckets = self.dataset.buckets();
        ev.log(
            Level::Info,
            &format!(
                "data: {} images in {} from {} size bucket(s); {} unreadable file(s) skipped",
                self.dataset.len(),
                self.dataset.root.display(),
                buckets.len(),
                self.dataset.bad.len()
            ),
        );
        let stop = match (c.training.max_steps, &c.training.max_runtime) {
            (Some(m), _) if m < planned => format!(" (max_steps {m} of {planned})"),
            _ => String::new(),
        };
        ev.log(
            Level::Info,
            &format!(
                "{} epoch(s) x {spe} steps per epoch (batch {}): {total} steps{stop}{}",
                c.training.n_epochs,
                c.training.batch_size,
                c.training
                    .max_runtime
                    .as_ref()
                    .map(|r| format!("; stops cleanly after {r}"))
                    .unwrap_or_default()
            ),
        );
        let params: usize = crate::train::step::vae_params(&self.model)
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        ev.log(
            Level::Info,
            &format!(
                "model: vae_dim {}, {} trainable VAE parameters, {:?} on {:?}, mixed \
                 precision {}, gradient checkpointing {}",
                c.model.vae_dim,
                params,
                self.dtype,
                self.device,
                c.training.mixed_precision(),
                if c.model.use_gradient_checkpointing {
                    "on"
                } else {
                    "off"
                }
            ),
        );
        for model in ["vae", "flow", "text_encoder"] {
            let source = if optim.optimizers.contains_key(model) {
                "optimizer JSON"
            } else {
                "reference default"
            };
            let trained = if model == "vae" {
                "trained"
            } else {
                "not trained in Phase 1"
            };
            if let Ok(spec) = optim.optimizer(model, c.training.lr) {
                ev.log(
                    Level::Info,
                    &format!(
                        "optimizer {model}: {} lr {:e} ({source}; {trained})",
                        spec.kind(),
                        spec.lr()
                    ),
                );
            }
        }
        if let Ok(s) = optim.scheduler("vae", c.training.lr_min, total) {
            ev.log(
                Level::Info,
                &format!(
                    "scheduler vae: {}",
                    serde_json::to_string(&s).unwrap_or_default()
                ),
            );
        }
        for w in c.warnings() {
            ev.log(Level::Warn, &w);
        }
        let images = self.dataset.len();
        if c.training.batch_size > images {
            ev.log(
                Level::Warn,
                &format!(
                    "training.batch_size {} is larger than the data set ({images} images in {}): \
                     every batch holds at most {images}",
                    c.training.batch_size,
                    self.dataset.root.display()
                ),
            );
        }
        if let Some(cap) = c.data.img_size {
            let largest = self
                .dataset
                .entries
                .iter()
                .map(|e| e.original)
                .max_by_key(|&(w, h)| w.max(h));
            if let Some((w, h)) = largest.filter(|&(w, h)| w.max(h) < cap) {
                ev.log(
                    Level::Warn,
                    &format!(
                        "data.img_size {cap} is beyond every image in {} (the largest is \
                         {w}x{h}): images are not enlarged, so none trains at {cap}",
                        self.dataset.root.display()
                    ),
                );
            }
        }
    }

    /// Runs steps until the end of the run or a stop; always ends with a complete checkpoint.
    pub fn run(
        mut self,
        ev: &mut dyn Events,
        stop: &StopSignal,
        fresh: bool,
    ) -> Result<RunSummary> {
        let session_start = Instant::now();
        let window = (self.cfg.output.log_interval as usize)
            .saturating_mul(2)
            .max(10);
        let mut n = match &self.state {
            Some(s) => Counters {
                global_step: s.global_step,
                sampler: s.sampler,
                checkpoints_written: s.checkpoints_written,
                last_checkpoint_step: Some(s.global_step),
                last_sample_step: s.last_sample_step,
                last_eval_step: s.last_eval_step,
                elapsed_before: s.elapsed_secs,
                vae_avg: s.vae_avg.clone(),
                kl_avg: s.kl_avg.clone(),
            },
            None => Counters {
                global_step: 0,
                sampler: SamplerState::default(),
                checkpoints_written: 0,
                last_checkpoint_step: None,
                last_sample_step: None,
                last_eval_step: None,
                elapsed_before: 0.0,
                vae_avg: RollingMean::new(window),
                kl_avg: RollingMean::new(window),
            },
        };
        let spe = self.sampler.batches_per_epoch() as u64;
        let planned = self.cfg.training.n_epochs.saturating_mul(spe);
        let total = self.total;
        let workers = self.cfg.training.workers.max(1);
        let mut loader = Loader::new(
            &self.dataset,
            self.sampler.clone(),
            n.sampler,
            LoaderConfig {
                workers,
                prefetch: 4,
            },
        )?;
        if fresh && !self.cfg.output.no_samples {
            self.sample(&mut n, ev)?;
        }
        let writer = Writer::new(self.dir.clone())?;
        let mut reporter = Reporter::new(&self.dir.root, self.metrics.path());
        // Time the loop was blocked on checkpoints and report rebuilds since the last row.
        let mut blocked = Duration::ZERO;
        ev.start(total, n.global_step);
        let max_runtime = self.cfg.max_runtime();
        let mut steps_this_session = 0;
        let mut recent = Duration::ZERO;
        // Empty batches in a row (every image of each failed to decode).
        let mut empty_streak = 0u64;
        let reason = loop {
            if n.global_step >= total {
                break if total < planned {
                    StopReason::MaxSteps
                } else {
                    StopReason::Finished
                };
            }
            if stop.requested() {
                break StopReason::Signal;
            }
            // A failed background write stops training with its error.
            writer.check()?;
            reporter.drain(ev);
            if max_runtime.is_some_and(|m| session_start.elapsed() >= m) {
                break StopReason::MaxRuntime;
            }
            let Some((batch, waited)) = loader.next() else {
                bail!("the data loader stopped delivering batches");
            };
            for bad in &batch.bad {
                self.bad_files += 1;
                ev.log(
                    Level::Warn,
                    &format!("skipping {}: {}", bad.path.display(), bad.reason),
                );
            }
            n.sampler = batch.state_after();
            if batch.is_empty() {
                // A batch that names a newly unreadable file has dropped it from the run: that
                // is progress (each file is named once), so only the others count.
                if batch.bad.is_empty() {
                    empty_streak += 1;
                }
                if loader.exhausted() {
                    bail!(
                        "no readable image remains in {}: all {} images failed to decode",
                        self.dataset.root.display(),
                        loader.len()
                    );
                }
                if empty_streak >= spe.max(1) {
                    bail!(
                        "no batch could be filled for a whole epoch ({empty_streak} batches): \
                         {} of the {} images in {} failed to decode",
                        loader.unreadable(),
                        loader.len(),
                        self.dataset.root.display()
                    );
                }
                continue;
            }
            empty_streak = 0;
            n.global_step += 1;
            steps_this_session += 1;
            let t0 = Instant::now();
            let images = Tensor::from_vec(
                batch.images,
                (batch.batch_size, 3, batch.height, batch.width),
                &Device::Cpu,
            )?
            .to_dtype(self.dtype)?
            .to_device(&self.device)?;
            let mut rng = step_rng(self.cfg.training.seed, n.global_step);
            let outcome = self
                .trainer
                .step(
                    &self.model,
                    &images,
                    Noise::Sampled(&mut rng),
                    n.global_step,
                )
                .with_context(|| format!("training step {}", n.global_step))?;
            let batch_time = t0.elapsed();
            recent = if recent.is_zero() {
                batch_time
            } else {
                recent.mul_f64(0.9) + batch_time.mul_f64(0.1)
            };
            let (recon, kl) = match &outcome {
                StepOutcome::Trained(m) => {
                    if n.global_step == 1
                        && m.kl_clamped_fraction >= 1.0
                        && self.cfg.training.kl_beta > 0.0
                    {
                        ev.log(Level::Warn, "every KL element was clamped at kl_free_bits in the first step: the KL term has no gradient");
                    }
                    n.vae_avg.push(m.recon);
                    n.kl_avg.push(m.kl);
                    (Some(m.recon), Some(m.kl))
                }
                StepOutcome::Skipped(why @ Skip::GradientOverflow { .. }) => {
                    ev.log(Level::Info, &format!("step {}: {why}", n.global_step));
                    (None, None)
                }
                StepOutcome::Skipped(why) => {
                    let files: Vec<String> = batch
                        .paths
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect();
                    ev.log(
                        Level::Warn,
                        &format!(
                            "step {}: batch skipped ({why}): {}",
                            n.global_step,
                            files.join(", ")
                        ),
                    );
                    (None, None)
                }
            };
            let beta = kl_beta(
                n.global_step,
                self.cfg.training.kl_warmup_steps,
                self.cfg.training.kl_beta,
            );
            let remaining = total.saturating_sub(n.global_step) as f64;
            ev.progress(&Progress {
                step: n.global_step,
                total,
                epoch: batch.epoch,
                loss: recon.unwrap_or(f64::NAN),
                kl: kl.unwrap_or(f64::NAN),
                beta,
                lr: self.trainer.lr(),
                secs_per_step: recent.as_secs_f64(),
                eta_secs: remaining * recent.as_secs_f64(),
            });
            if n.global_step % self.cfg.output.log_interval == 0 {
                let mut metrics = Map::new();
                metrics.insert("vae_loss".into(), json!(n.vae_avg.mean()));
                metrics.insert("kl_loss".into(), json!(n.kl_avg.mean()));
                metrics.insert("kl_beta".into(), json!(beta));
                let mut extras = Map::new();
                extras.insert("batch_time".into(), json!(batch_time.as_secs_f64()));
                extras.insert(
                    "eta_seconds".into(),
                    json!(remaining * recent.as_secs_f64()),
                );
                extras.insert("data_wait".into(), json!(waited.as_secs_f64()));
                extras.insert("ckpt_wait".into(), json!(blocked.as_secs_f64()));
                blocked = Duration::ZERO;
                extras.insert("step_vae_loss".into(), json!(recon));
                extras.insert("step_kl_loss".into(), json!(kl));
                extras.insert("skipped_batches".into(), json!(self.trainer.skipped()));
                self.metrics.log(
                    batch.epoch,
                    batch.position_after.saturating_sub(1) as u64,
                    n.global_step,
                    metrics,
                    self.lrs_map(),
                    extras,
                )?;
            }
            // Evaluations and samples come before the checkpoint of the same step, so a run
            // resumed from that checkpoint has their rows and does not repeat them; the run's
            // last step gets both (what the end of the run would otherwise add after its
            // checkpoint).
            let last = n.global_step >= total;
            let at_checkpoint = n.global_step % self.cfg.output.checkpoint_save_interval == 0;
            let at_eval = self.eval_set.is_some()
                && (n.global_step % self.cfg.eval_interval() == 0 || (last && at_checkpoint));
            if at_eval {
                self.evaluate(&mut n, ev)?;
            }
            if at_checkpoint {
                let sampled_checkpoint =
                    (n.checkpoints_written + 1) % self.cfg.output.samples_per_checkpoint == 0;
                if (sampled_checkpoint || last) && !self.cfg.output.no_samples {
                    self.sample(&mut n, ev)?;
                }
                blocked += self.checkpoint(&writer, &mut n, total, spe, session_start, ev)?;
            }
            if at_checkpoint || at_eval {
                blocked += reporter.kick(ev);
            }
        };
        drop(loader);
        // What the last step has not done yet, then its checkpoint (again, if a sample or an
        // evaluation came after the one it has, so that a resume does not repeat them).
        let mut after_checkpoint = false;
        if !self.cfg.output.no_samples && n.last_sample_step != Some(n.global_step) {
            self.sample(&mut n, ev)?;
            after_checkpoint = true;
        }
        if self.eval_set.is_some() && n.last_eval_step != Some(n.global_step) {
            self.evaluate(&mut n, ev)?;
            after_checkpoint = true;
        }
        if n.last_checkpoint_step != Some(n.global_step) || after_checkpoint {
            self.checkpoint(&writer, &mut n, total, spe, session_start, ev)?;
        }
        // A stop waits for the last write; its error is the run's.
        writer.finish()?;
        reporter.finish(ev);
        ev.finish();
        let last = self.dir.list()?.first().map(|(_, p)| p.clone());
        Ok(RunSummary {
            output: self.dir.root.clone(),
            reason,
            global_step: n.global_step,
            total_steps: total,
            steps_this_session,
            skipped_batches: self.trainer.skipped(),
            bad_files: self.bad_files,
            last_checkpoint: last,
        })
    }

    fn lrs_map(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("flow_lr".into(), json!(self.other_lrs[0]));
        m.insert("vae_lr".into(), json!(self.trainer.lr()));
        m
    }

    /// Template reconstructions at the current step, logged with their colour ranges.
    fn sample(&mut self, n: &mut Counters, ev: &mut dyn Events) -> Result<()> {
        if self.templates.is_empty() {
            return Ok(());
        }
        let colours = write_samples(
            &self.model,
            &self.templates,
            &self.dir.samples(),
            n.global_step,
        )?;
        n.last_sample_step = Some(n.global_step);
        let mut extras = Map::new();
        extras.insert("samples".into(), Value::Object(colours));
        self.metrics.log(
            n.sampler.epoch,
            n.sampler.position as u64,
            n.global_step,
            Map::new(),
            self.lrs_map(),
            extras,
        )?;
        ev.log(
            Level::Info,
            &format!(
                "samples of step {} in {}",
                n.global_step,
                self.dir.samples().display()
            ),
        );
        Ok(())
    }

    /// Reconstruction quality of `output.eval_data` with the live and the EMA weights, logged
    /// as a metrics row (`eval_psnr`, `eval_ssim`, `eval_ms_ssim` and their `_ema` twins).
    fn evaluate(&mut self, n: &mut Counters, ev: &mut dyn Events) -> Result<()> {
        let Some(set) = &self.eval_set else {
            return Ok(());
        };
        let batch = self.cfg.training.batch_size.max(1);
        let live = evaluate(&self.model, set, batch, self.dtype, &self.device)
            .with_context(|| format!("evaluating output.eval_data at step {}", n.global_step))?;
        let ema_model = self.ema_model()?;
        let ema =
            evaluate(&ema_model, set, batch, self.dtype, &self.device).with_context(|| {
                format!(
                    "evaluating output.eval_data (EMA) at step {}",
                    n.global_step
                )
            })?;
        n.last_eval_step = Some(n.global_step);
        let mut metrics = Map::new();
        for (suffix, e) in [("", &live), ("_ema", &ema)] {
            metrics.insert(format!("eval_psnr{suffix}"), json!(e.mean.psnr));
            metrics.insert(format!("eval_ssim{suffix}"), json!(e.mean.ssim));
            if let Some(m) = e.mean.ms_ssim {
                metrics.insert(format!("eval_ms_ssim{suffix}"), json!(m));
            }
        }
        let mut extras = Map::new();
        extras.insert("eval_images".into(), json!(live.mean.images));
        self.metrics.log(
            n.sampler.epoch,
            n.sampler.position as u64,
            n.global_step,
            metrics,
            self.lrs_map(),
            extras,
        )?;
        let db = |p: Option<f64>| p.map_or("inf".to_string(), |p| format!("{p:.2}"));
        ev.log(
            Level::Info,
            &format!(
                "eval of step {} on {} images: PSNR {} dB, SSIM {:.4} (EMA: {} dB, {:.4})",
                n.global_step,
                live.mean.images,
                db(live.mean.psnr),
                live.mean.ssim,
                db(ema.mean.psnr),
                ema.mean.ssim
            ),
        );
        Ok(())
    }

    /// The model with the EMA weights in place of the live VAE weights.
    fn ema_model(&self) -> Result<FluxModel> {
        let mut tensors: HashMap<String, Tensor> =
            self.model.params.tensors("").into_iter().collect();
        tensors.extend(self.trainer.ema_shadow());
        let store = ParamStore::loaded(tensors, vec![], self.dtype, &self.device);
        let model = FluxModel::build(&self.model.config, store.clone())?;
        store.check_complete(&[DIFFUSER, TEXT])?;
        Ok(model)
    }
}
