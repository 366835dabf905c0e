//! One Phase 1 training step, as fluxflow-training's `VAETrainer.train_step` at the December
//! 2025 run (GAN and LPIPS off): forward with a fresh eps, frequency-weighted L1 + MSE, clamped
//! KL with a cosine warm-up, adaptive weights, global-norm clipping, optimizer step, EMA, LR
//! scheduler step. A batch with NaN/Inf anywhere changes nothing but the skip count.

use std::collections::HashMap;

use anyhow::{anyhow, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::adaptive::AdaptiveWeights;
use super::ema::Ema;
use super::loss::{frequency_weighted_l1, kl_beta, kl_standard_normal, mse};
use super::optim::fused::sum_squares;
use super::optim::{Optimizer, OptimizerState};
use super::precision::{LossScaler, MixedPrecision};
use super::schedule::Scheduler;
use crate::model::{FluxModel, Noise, Recompute, COMPRESSOR, EXPANDER};

/// The loss and update settings of a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepConfig {
    pub kl_beta: f64,
    pub kl_warmup_steps: u64,
    pub kl_free_bits: f64,
    /// Weight of the high-frequency L1 term.
    pub freq_alpha: f64,
    pub mse_weight: f64,
    /// Global gradient norm bound (`initial_clipping_norm`).
    pub clip_norm: f64,
    pub adaptive_weights: bool,
    pub adaptive_window: usize,
    pub ema_decay: f64,
    /// Decode with SPADE context (`train_spade`).
    pub use_spade: bool,
    /// Recomputation in the backward pass (the reference models' `use_gradient_checkpointing`,
    /// "gradient checkpointing"): keep only the inputs of the compressor's stages and of each
    /// expander block, recompute the rest in the backward pass. Changes no result.
    #[serde(default = "default_recompute", alias = "checkpointing")]
    pub recompute: bool,
    /// Activations in a 16-bit float over float32 master weights (`training.mixed_precision`).
    #[serde(default)]
    pub mixed_precision: MixedPrecision,
}

fn default_recompute() -> bool {
    true
}

impl Default for StepConfig {
    fn default() -> Self {
        Self {
            kl_beta: 0.0001,
            kl_warmup_steps: 5000,
            kl_free_bits: 0.0,
            freq_alpha: 1.0,
            mse_weight: 0.1,
            clip_norm: 1.0,
            adaptive_weights: true,
            adaptive_window: 100,
            ema_decay: 0.999,
            use_spade: true,
            recompute: true,
            mixed_precision: MixedPrecision::No,
        }
    }
}

/// What one trained step measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub freq_l1: f64,
    pub mse: f64,
    /// freq_l1 + mse_weight * mse: the logged "VAE loss".
    pub recon: f64,
    /// KL before beta: the logged "KL loss".
    pub kl: f64,
    pub kl_beta: f64,
    pub w_recon: f64,
    pub w_kl: f64,
    pub total: f64,
    pub grad_norm_before_clip: f64,
    /// The learning rate after the scheduler's step (used by the next step).
    pub lr_after: f64,
    pub kl_clamped_fraction: f64,
}

/// Why a batch was skipped.
#[derive(Debug, Clone, PartialEq)]
pub enum Skip {
    NonFiniteInput,
    NonFiniteLoss {
        recon: f64,
        kl: f64,
    },
    NonFiniteGradient,
    /// fp16: the scaled gradients overflowed; the loss scale was lowered to `new_scale`.
    GradientOverflow {
        new_scale: f64,
    },
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::NonFiniteInput => write!(f, "NaN/Inf in the input images"),
            Skip::NonFiniteLoss { recon, kl } => {
                write!(f, "NaN/Inf in the loss (recon {recon}, kl {kl})")
            }
            Skip::NonFiniteGradient => write!(f, "NaN/Inf in the gradients"),
            Skip::GradientOverflow { new_scale } => write!(
                f,
                "fp16 gradients overflowed; loss scale lowered to {new_scale}"
            ),
        }
    }
}

/// The outcome of [`VaeTrainer::step`].
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    Trained(StepMetrics),
    Skipped(Skip),
}

/// Scalar state of a [`VaeTrainer`] for JSON; tensors go through [`VaeTrainer::state_tensors`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub config: StepConfig,
    pub adaptive: AdaptiveWeights,
    pub optimizer: OptimizerState,
    pub scheduler: Scheduler,
    pub skipped: u64,
    /// fp16's dynamic loss scale (absent otherwise and in states saved before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<LossScaler>,
}

/// Trains the VAE (compressor + expander) of a model.
pub struct VaeTrainer {
    pub config: StepConfig,
    params: Vec<(String, Var)>,
    optimizer: Box<dyn Optimizer>,
    scheduler: Scheduler,
    ema: Ema,
    adaptive: AdaptiveWeights,
    skipped: u64,
    /// fp16 only: created by the first fp16 step (or restored with the state).
    scaler: Option<LossScaler>,
}

/// The VAE's trainable tensors: every compressor and expander parameter, by name.
pub fn vae_params(model: &FluxModel) -> Vec<(String, Var)> {
    let mut p = model.params.trainable(COMPRESSOR);
    p.extend(model.params.trainable(EXPANDER));
    p
}

/// The loss terms of one forward pass (device tensors: nothing is read back here), and the
/// checkpointed segments to backpropagate through.
struct Losses<'a> {
    recompute: Recompute<'a>,
    freq: Tensor,
    mse: Tensor,
    recon_t: Tensor,
    kl_t: Tensor,
    /// Fraction of clamped KL elements (float64).
    clamped: Tensor,
    beta: f64,
}

impl<'a> Losses<'a> {
    fn compute(
        c: &StepConfig,
        model: &'a FluxModel,
        images: &Tensor,
        noise: Noise,
        global_step: u64,
    ) -> Result<Self> {
        let recompute = Recompute::new(c.recompute);
        let master = images.dtype();
        let compute = c.mixed_precision.compute_dtype(master);
        let x = images.to_dtype(compute)?;
        let enc = model.compressor.forward_rc(&x, noise, &recompute)?;
        let recon_img = model
            .expander
            .forward_rc(&enc.packed, c.use_spade, &recompute)?;
        // The loss in the master dtype (float32 under mixed precision).
        let recon_img = recon_img.to_dtype(master)?;
        let freq = frequency_weighted_l1(&recon_img, images, c.freq_alpha)?;
        let mse_t = mse(&recon_img, images)?;
        let recon_t = (&freq + (&mse_t * c.mse_weight)?)?;
        let (mu, logvar) = (enc.mu.to_dtype(master)?, enc.logvar.to_dtype(master)?);
        let (kl_t, clamped) = kl_standard_normal(&mu, &logvar, c.kl_free_bits)?;
        Ok(Self {
            recompute,
            beta: kl_beta(global_step, c.kl_warmup_steps, c.kl_beta),
            freq,
            mse: mse_t,
            recon_t,
            kl_t,
            clamped,
        })
    }

    /// w_recon * recon + w_kl * beta * kl, with the weights as float64 device scalars (rounded
    /// to the loss's dtype as a host scalar would be).
    fn total(&self, w_recon: &Tensor, w_kl: &Tensor) -> Result<Tensor> {
        let dtype = self.recon_t.dtype();
        let wr = w_recon.to_dtype(dtype)?;
        let wk = (w_kl * self.beta)?.to_dtype(dtype)?;
        Ok((self.recon_t.broadcast_mul(&wr)? + self.kl_t.broadcast_mul(&wk)?)?)
    }

    /// The gradients of `total` through the checkpointed segments.
    fn backward(&self, total: &Tensor) -> Result<GradStore> {
        Ok(self.recompute.backward(total)?)
    }
}

/// The gradients of the total loss of a first step (empty adaptive history) at `global_step`,
/// before clipping: what the reference's step computes before `clip_grad_norm_`.
pub fn loss_gradients(
    config: &StepConfig,
    model: &FluxModel,
    images: &Tensor,
    noise: Noise,
    global_step: u64,
) -> Result<GradStore> {
    let l = Losses::compute(config, model, images, noise, global_step)?;
    let adaptive = AdaptiveWeights::new(config.adaptive_weights, config.adaptive_window);
    let (w_recon, w_kl) = adaptive.weights_with(&l.recon_t, &l.kl_t)?;
    l.backward(&l.total(&w_recon, &w_kl)?)
}

/// The scalars a step reads back from the device, all at once.
struct StepScalars {
    image_max: f64,
    recon: f64,
    kl: f64,
    total: f64,
    grad_norm: f64,
    freq: f64,
    mse: f64,
    clamped: f64,
    w_recon: f64,
    w_kl: f64,
}

impl VaeTrainer {
    /// A trainer over `model`'s VAE with an optimizer and scheduler already built over
    /// [`vae_params`]; the EMA starts at the current weights.
    pub fn new(
        config: StepConfig,
        model: &FluxModel,
        optimizer: Box<dyn Optimizer>,
        scheduler: Scheduler,
    ) -> Result<Self> {
        let params = vae_params(model);
        let ema = Ema::new(config.ema_decay, params.clone())?;
        let adaptive = AdaptiveWeights::new(config.adaptive_weights, config.adaptive_window);
        Ok(Self {
            config,
            params,
            optimizer,
            scheduler,
            ema,
            adaptive,
            skipped: 0,
            scaler: None,
        })
    }

    /// One step on `images` ([B, 3, H, W] in [-1, 1]) at `global_step` (1 for the first).
    ///
    /// The device is synchronised once: the forward pass, the adaptive weights (computed on
    /// the device from the host's history), the backward pass and the gradient norm are queued
    /// without reading anything back; then every scalar the step needs (input check, losses,
    /// norm, metrics) comes back in one transfer, and the host decides: skip, or clip and
    /// update.
    pub fn step(
        &mut self,
        model: &FluxModel,
        images: &Tensor,
        noise: Noise,
        global_step: u64,
    ) -> Result<StepOutcome> {
        let l = Losses::compute(&self.config, model, images, noise, global_step)?;
        let (w_recon_t, w_kl_t) = self.adaptive.weights_with(&l.recon_t, &l.kl_t)?;
        let total_t = l.total(&w_recon_t, &w_kl_t)?;
        // fp16: the loss scaled up so small gradients survive float16, unscaled in `clip`.
        let fp16 = self.config.mixed_precision == MixedPrecision::Fp16;
        if fp16 && self.scaler.is_none() {
            self.scaler = Some(LossScaler::default());
        }
        let scale = match &self.scaler {
            Some(s) if fp16 => s.scale,
            _ => 1.0,
        };
        let grads = if scale == 1.0 {
            l.backward(&total_t)?
        } else {
            l.backward(&(&total_t * scale)?)?
        };
        let s = self.read_back(images, &l, &total_t, &grads, &w_recon_t, &w_kl_t)?;
        if !s.image_max.is_finite() {
            self.skipped += 1;
            return Ok(StepOutcome::Skipped(Skip::NonFiniteInput));
        }
        let (recon, kl) = (s.recon, s.kl);
        if !recon.is_finite() || !kl.is_finite() {
            self.skipped += 1;
            return Ok(StepOutcome::Skipped(Skip::NonFiniteLoss { recon, kl }));
        }
        let norm = s.grad_norm / scale;
        if fp16 && !norm.is_finite() && s.total.is_finite() {
            // Part of finding the loss scale (GradScaler's skipped step), not a bad batch: it
            // is not counted with the skipped batches.
            let scaler = self.scaler.as_mut().expect("fp16 has a loss scaler");
            scaler.update(true);
            return Ok(StepOutcome::Skipped(Skip::GradientOverflow {
                new_scale: scaler.scale,
            }));
        }
        if !norm.is_finite() || !s.total.is_finite() {
            self.skipped += 1;
            return Ok(StepOutcome::Skipped(Skip::NonFiniteGradient));
        }
        let factor = self.clip_factor(norm, scale);
        if let Some(scaler) = self.scaler.as_mut().filter(|_| fp16) {
            scaler.update(false);
        }
        self.adaptive.record(recon, kl);
        self.optimizer
            .step_scaled(&grads, factor)
            .map_err(|e| anyhow!(e))?;
        self.ema.update()?;
        self.scheduler.step(Some(recon)).map_err(|e| anyhow!(e))?;
        let lr = self.scheduler.lr();
        self.optimizer.set_lr(lr);
        Ok(StepOutcome::Trained(StepMetrics {
            freq_l1: s.freq,
            mse: s.mse,
            recon,
            kl,
            kl_beta: l.beta,
            w_recon: s.w_recon,
            w_kl: s.w_kl,
            total: s.total,
            grad_norm_before_clip: norm,
            lr_after: lr,
            kl_clamped_fraction: s.clamped,
        }))
    }

    /// Every scalar of the step in one device-to-host transfer. The gradient norm is of the
    /// gradients as computed (times the loss scale under fp16); NaN/Inf anywhere come back as
    /// such for the caller to act on.
    fn read_back(
        &self,
        images: &Tensor,
        l: &Losses,
        total: &Tensor,
        grads: &GradStore,
        w_recon: &Tensor,
        w_kl: &Tensor,
    ) -> Result<StepScalars> {
        let f64s =
            |t: &Tensor| -> candle_core::Result<Tensor> { t.to_dtype(DType::F64)?.reshape(()) };
        let grads: Vec<&Tensor> = self
            .params
            .iter()
            .filter_map(|(_, v)| grads.get(v.as_tensor()))
            .collect();
        // One pass per gradient, accumulated in f64 (one kernel each on CUDA).
        let norm = match sum_squares(&grads)? {
            Some(s) => s.sqrt()?,
            None if grads.is_empty() => Tensor::new(0f64, images.device())?,
            None => {
                let squares = grads
                    .iter()
                    .map(|g| g.sqr()?.sum_all()?.to_dtype(DType::F64))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::stack(&squares, 0)?.sum_all()?.sqrt()?
            }
        };
        let all = [
            f64s(&images.abs()?.max_all()?)?,
            f64s(&l.recon_t)?,
            f64s(&l.kl_t)?,
            f64s(total)?,
            norm,
            f64s(&l.freq)?,
            f64s(&l.mse)?,
            f64s(&l.clamped)?,
            f64s(w_recon)?,
            f64s(w_kl)?,
        ];
        let v = Tensor::stack(&all, 0)?
            .to_device(&Device::Cpu)?
            .to_vec1::<f64>()?;
        Ok(StepScalars {
            image_max: v[0],
            recon: v[1],
            kl: v[2],
            total: v[3],
            grad_norm: v[4],
            freq: v[5],
            mse: v[6],
            clamped: v[7],
            w_recon: v[8],
            w_kl: v[9],
        })
    }

    /// torch.nn.utils.clip_grad_norm_'s factor for the VAE parameters' gradients, given their
    /// (unscaled) norm: min(1, max_norm / (norm + 1e-6)). Gradients of a loss multiplied by
    /// `scale` (fp16's loss scaling) are divided by it in the same multiplication, which the
    /// optimizer applies to each gradient as it reads it.
    fn clip_factor(&self, norm: f64, scale: f64) -> f64 {
        let coef = self.config.clip_norm / (norm + 1e-6);
        coef.min(1.0) / scale
    }

    /// Batches skipped for NaN/Inf so far.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    pub fn lr(&self) -> f64 {
        self.optimizer.lr()
    }

    /// The EMA shadow by parameter name.
    pub fn ema_shadow(&self) -> Vec<(String, Tensor)> {
        self.ema.shadow()
    }

    /// Scalar state for JSON.
    pub fn state(&self) -> TrainerState {
        TrainerState {
            config: self.config.clone(),
            adaptive: self.adaptive.clone(),
            optimizer: self.optimizer.scalar_state(),
            scheduler: self.scheduler.clone(),
            skipped: self.skipped,
            loss_scaler: self.scaler.clone(),
        }
    }

    /// Optimizer buffers as `optim.<param>.<buffer>` and the EMA as `ema.<param>`, in the
    /// training dtype.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .optimizer
            .state_tensors()
            .into_iter()
            .map(|(k, t)| (format!("optim.{k}"), t))
            .collect();
        out.extend(
            self.ema
                .shadow()
                .into_iter()
                .map(|(k, t)| (format!("ema.{k}"), t)),
        );
        out
    }

    /// Fits the learning-rate schedule to a run whose length changed to `total_steps` (see
    /// [`Scheduler::set_run_length`]); returns whether the schedule changed.
    pub fn set_run_length(&mut self, total_steps: u64) -> bool {
        self.scheduler.set_run_length(total_steps)
    }

    /// The learning-rate scheduler and its state.
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Restores what [`VaeTrainer::state`] and [`VaeTrainer::state_tensors`] saved.
    pub fn load_state(
        &mut self,
        state: &TrainerState,
        tensors: &HashMap<String, Tensor>,
    ) -> Result<()> {
        let strip = |prefix: &str| -> HashMap<String, Tensor> {
            tensors
                .iter()
                .filter_map(|(k, t)| k.strip_prefix(prefix).map(|s| (s.to_string(), t.clone())))
                .collect()
        };
        self.optimizer
            .load_state(&state.optimizer, &strip("optim."))
            .map_err(|e| anyhow!(e))
            .context("cannot restore the VAE optimizer")?;
        self.ema
            .load(&strip("ema."))
            .context("cannot restore the EMA")?;
        self.config = state.config.clone();
        self.adaptive = state.adaptive.clone();
        self.scheduler = state.scheduler.clone();
        self.skipped = state.skipped;
        if state.loss_scaler.is_some() {
            self.scaler = state.loss_scaler.clone();
        }
        Ok(())
    }
}
