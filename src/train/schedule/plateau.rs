//! `ReduceLROnPlateau`: divides the lr when a metric stops improving.

use serde::{Deserialize, Serialize};

use super::{exact_f64, Checker, Result};

/// `ReduceLROnPlateau` direction: whether lower or higher metrics are better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlateauMode {
    Min,
    Max,
}

/// `ReduceLROnPlateau` threshold: relative (`best * (1 -+ threshold)`) or absolute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ThresholdMode {
    Rel,
    Abs,
}

/// `ReduceLROnPlateau` settings; defaults are PyTorch's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReduceLrOnPlateauConfig {
    pub mode: PlateauMode,
    pub factor: f64,
    pub patience: u64,
    pub threshold: f64,
    pub threshold_mode: ThresholdMode,
    pub cooldown: u64,
    pub min_lr: f64,
    pub eps: f64,
}

impl Default for ReduceLrOnPlateauConfig {
    fn default() -> Self {
        Self {
            mode: PlateauMode::Min,
            factor: 0.1,
            patience: 10,
            threshold: 1e-4,
            threshold_mode: ThresholdMode::Rel,
            cooldown: 0,
            min_lr: 0.0,
            eps: 1e-8,
        }
    }
}

/// Matches `torch.optim.lr_scheduler.ReduceLROnPlateau` (one scalar `min_lr`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReduceLrOnPlateau {
    mode: PlateauMode,
    #[serde(with = "exact_f64")]
    factor: f64,
    patience: u64,
    #[serde(with = "exact_f64")]
    threshold: f64,
    threshold_mode: ThresholdMode,
    cooldown: u64,
    #[serde(with = "exact_f64")]
    min_lr: f64,
    #[serde(with = "exact_f64")]
    eps: f64,
    #[serde(with = "exact_f64")]
    lr: f64,
    /// Best metric so far; starts at the worst value (+inf for min, -inf for max).
    #[serde(with = "exact_f64")]
    best: f64,
    num_bad_epochs: u64,
    cooldown_counter: u64,
    last_epoch: u64,
}

impl ReduceLrOnPlateau {
    /// Checks the settings; errors name `model` and the field.
    pub fn new(model: &str, initial_lr: f64, cfg: &ReduceLrOnPlateauConfig) -> Result<Self> {
        let c = Checker {
            model,
            scheduler: "ReduceLROnPlateau",
        };
        c.initial_lr(initial_lr)?;
        let factor_ok = (0.0..1.0).contains(&cfg.factor);
        c.check("factor", cfg.factor, factor_ok, "in [0, 1)")?;
        c.non_negative("threshold", cfg.threshold)?;
        c.non_negative("min_lr", cfg.min_lr)?;
        c.non_negative("eps", cfg.eps)?;
        Ok(Self {
            mode: cfg.mode,
            factor: cfg.factor,
            patience: cfg.patience,
            threshold: cfg.threshold,
            threshold_mode: cfg.threshold_mode,
            cooldown: cfg.cooldown,
            min_lr: cfg.min_lr,
            eps: cfg.eps,
            lr: initial_lr,
            best: match cfg.mode {
                PlateauMode::Min => f64::INFINITY,
                PlateauMode::Max => f64::NEG_INFINITY,
            },
            num_bad_epochs: 0,
            cooldown_counter: 0,
            last_epoch: 0,
        })
    }

    /// Checks a restored state's fields (by their saved names).
    pub(super) fn check_state(&self, c: &Checker) -> Result<()> {
        let factor_ok = (0.0..1.0).contains(&self.factor);
        c.check("factor", self.factor, factor_ok, "in [0, 1)")?;
        c.non_negative("threshold", self.threshold)?;
        c.non_negative("min_lr", self.min_lr)?;
        c.non_negative("eps", self.eps)?;
        c.check("best", self.best, !self.best.is_nan(), "a number")?;
        c.non_negative("lr", self.lr)
    }

    /// The learning rates it holds, by their saved names.
    pub(super) fn rates(&self) -> Vec<(&'static str, f64)> {
        vec![("min_lr", self.min_lr), ("lr", self.lr)]
    }

    fn is_better(&self, a: f64) -> bool {
        let (best, t) = (self.best, self.threshold);
        match (self.mode, self.threshold_mode) {
            (PlateauMode::Min, ThresholdMode::Rel) => a < best * (1.0 - t),
            (PlateauMode::Min, ThresholdMode::Abs) => a < best - t,
            (PlateauMode::Max, ThresholdMode::Rel) => a > best * (t + 1.0),
            (PlateauMode::Max, ThresholdMode::Abs) => a > best + t,
        }
    }

    /// One step with this epoch's metric (NaN counts as no improvement, as in PyTorch).
    pub fn step_metric(&mut self, metric: f64) {
        self.last_epoch += 1;
        if self.is_better(metric) {
            self.best = metric;
            self.num_bad_epochs = 0;
        } else {
            self.num_bad_epochs += 1;
        }
        if self.cooldown_counter > 0 {
            self.cooldown_counter -= 1;
            self.num_bad_epochs = 0;
        }
        if self.num_bad_epochs > self.patience {
            let new_lr = (self.lr * self.factor).max(self.min_lr);
            if self.lr - new_lr > self.eps {
                self.lr = new_lr;
            }
            self.cooldown_counter = self.cooldown;
            self.num_bad_epochs = 0;
        }
    }

    /// The learning rate for the next optimizer step.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// PyTorch's `last_epoch`: steps taken since construction.
    pub fn last_epoch(&self) -> u64 {
        self.last_epoch
    }

    /// Best metric seen so far (infinite before the first step).
    pub fn best(&self) -> f64 {
        self.best
    }
}
