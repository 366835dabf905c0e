//! Schedulers that multiply the lr by a factor at given steps: `LinearLR`, `ExponentialLR`,
//! `ConstantLR`, `StepLR`.

use serde::{Deserialize, Serialize};

use super::{exact_f64, Checker, Result};

/// Matches `torch.optim.lr_scheduler.LinearLR`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearLr {
    #[serde(with = "exact_f64")]
    start_factor: f64,
    #[serde(with = "exact_f64")]
    end_factor: f64,
    total_iters: u64,
    #[serde(with = "exact_f64")]
    lr: f64,
    last_epoch: u64,
}

/// `LinearLR` settings; defaults are PyTorch's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinearLrConfig {
    pub start_factor: f64,
    pub end_factor: f64,
    pub total_iters: u64,
}

impl Default for LinearLrConfig {
    fn default() -> Self {
        Self {
            start_factor: 1.0 / 3.0,
            end_factor: 1.0,
            total_iters: 5,
        }
    }
}

impl LinearLr {
    /// Checks the settings; errors name `model` and the field.
    pub fn new(model: &str, initial_lr: f64, cfg: &LinearLrConfig) -> Result<Self> {
        let c = Checker {
            model,
            scheduler: "LinearLR",
        };
        c.initial_lr(initial_lr)?;
        let start_ok = cfg.start_factor > 0.0 && cfg.start_factor <= 1.0;
        c.check("start_factor", cfg.start_factor, start_ok, "in (0, 1]")?;
        let end_ok = (0.0..=1.0).contains(&cfg.end_factor);
        c.check("end_factor", cfg.end_factor, end_ok, "in [0, 1]")?;
        Ok(Self {
            start_factor: cfg.start_factor,
            end_factor: cfg.end_factor,
            total_iters: cfg.total_iters,
            lr: initial_lr * cfg.start_factor,
            last_epoch: 0,
        })
    }

    /// Checks a restored state's fields (by their saved names).
    pub(super) fn check_state(&self, c: &Checker) -> Result<()> {
        let start_ok = self.start_factor > 0.0 && self.start_factor <= 1.0;
        c.check("start_factor", self.start_factor, start_ok, "in (0, 1]")?;
        let end_ok = (0.0..=1.0).contains(&self.end_factor);
        c.check("end_factor", self.end_factor, end_ok, "in [0, 1]")?;
        c.non_negative("lr", self.lr)
    }

    /// One `scheduler.step()`, after an optimizer step.
    pub fn step(&mut self) {
        self.last_epoch += 1;
        if self.last_epoch > self.total_iters {
            return;
        }
        let delta = self.end_factor - self.start_factor;
        self.lr *= 1.0
            + delta
                / (self.total_iters as f64 * self.start_factor
                    + (self.last_epoch - 1) as f64 * delta);
    }

    /// The learning rate for the next optimizer step.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// PyTorch's `last_epoch`: steps taken since construction.
    pub fn last_epoch(&self) -> u64 {
        self.last_epoch
    }
}

/// Matches `torch.optim.lr_scheduler.ExponentialLR`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExponentialLr {
    #[serde(with = "exact_f64")]
    gamma: f64,
    #[serde(with = "exact_f64")]
    lr: f64,
    last_epoch: u64,
}

/// `ExponentialLR` settings (`gamma` has no default in PyTorch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExponentialLrConfig {
    pub gamma: f64,
}

impl ExponentialLr {
    /// Checks the settings; errors name `model` and the field.
    pub fn new(model: &str, initial_lr: f64, cfg: &ExponentialLrConfig) -> Result<Self> {
        let gamma = cfg.gamma;
        let c = Checker {
            model,
            scheduler: "ExponentialLR",
        };
        c.initial_lr(initial_lr)?;
        c.positive("gamma", gamma)?;
        Ok(Self {
            gamma,
            lr: initial_lr,
            last_epoch: 0,
        })
    }

    /// Checks a restored state's fields (by their saved names).
    pub(super) fn check_state(&self, c: &Checker) -> Result<()> {
        c.positive("gamma", self.gamma)?;
        c.non_negative("lr", self.lr)
    }

    /// One `scheduler.step()`, after an optimizer step.
    pub fn step(&mut self) {
        self.last_epoch += 1;
        self.lr *= self.gamma;
    }

    /// The learning rate for the next optimizer step.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// PyTorch's `last_epoch`: steps taken since construction.
    pub fn last_epoch(&self) -> u64 {
        self.last_epoch
    }
}

/// Matches `torch.optim.lr_scheduler.ConstantLR`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConstantLr {
    #[serde(with = "exact_f64")]
    factor: f64,
    total_iters: u64,
    #[serde(with = "exact_f64")]
    lr: f64,
    last_epoch: u64,
}

/// `ConstantLR` settings; defaults are PyTorch's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConstantLrConfig {
    pub factor: f64,
    pub total_iters: u64,
}

impl Default for ConstantLrConfig {
    fn default() -> Self {
        Self {
            factor: 1.0 / 3.0,
            total_iters: 5,
        }
    }
}

impl ConstantLr {
    /// Checks the settings; errors name `model` and the field.
    pub fn new(model: &str, initial_lr: f64, cfg: &ConstantLrConfig) -> Result<Self> {
        let c = Checker {
            model,
            scheduler: "ConstantLR",
        };
        c.initial_lr(initial_lr)?;
        let factor_ok = cfg.factor > 0.0 && cfg.factor <= 1.0;
        c.check("factor", cfg.factor, factor_ok, "in (0, 1]")?;
        Ok(Self {
            factor: cfg.factor,
            total_iters: cfg.total_iters,
            lr: initial_lr * cfg.factor,
            last_epoch: 0,
        })
    }

    /// Checks a restored state's fields (by their saved names).
    pub(super) fn check_state(&self, c: &Checker) -> Result<()> {
        let factor_ok = self.factor > 0.0 && self.factor <= 1.0;
        c.check("factor", self.factor, factor_ok, "in (0, 1]")?;
        c.non_negative("lr", self.lr)
    }

    /// One `scheduler.step()`, after an optimizer step.
    pub fn step(&mut self) {
        self.last_epoch += 1;
        if self.last_epoch == self.total_iters {
            self.lr *= 1.0 / self.factor;
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
}

/// Matches `torch.optim.lr_scheduler.StepLR`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLr {
    step_size: u64,
    #[serde(with = "exact_f64")]
    gamma: f64,
    #[serde(with = "exact_f64")]
    lr: f64,
    last_epoch: u64,
}

/// `StepLR` settings; `gamma` defaults to PyTorch's 0.1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepLrConfig {
    pub step_size: u64,
    #[serde(default = "StepLrConfig::default_gamma")]
    pub gamma: f64,
}

impl StepLrConfig {
    fn default_gamma() -> f64 {
        0.1
    }
}

impl StepLr {
    /// Checks the settings; errors name `model` and the field.
    pub fn new(model: &str, initial_lr: f64, cfg: &StepLrConfig) -> Result<Self> {
        let c = Checker {
            model,
            scheduler: "StepLR",
        };
        c.initial_lr(initial_lr)?;
        c.check("step_size", cfg.step_size as f64, cfg.step_size > 0, "> 0")?;
        c.positive("gamma", cfg.gamma)?;
        Ok(Self {
            step_size: cfg.step_size,
            gamma: cfg.gamma,
            lr: initial_lr,
            last_epoch: 0,
        })
    }

    /// Checks a restored state's fields (by their saved names).
    pub(super) fn check_state(&self, c: &Checker) -> Result<()> {
        let size_ok = self.step_size > 0;
        c.check("step_size", self.step_size as f64, size_ok, "> 0")?;
        c.positive("gamma", self.gamma)?;
        c.non_negative("lr", self.lr)
    }

    /// One `scheduler.step()`, after an optimizer step.
    pub fn step(&mut self) {
        self.last_epoch += 1;
        if self.last_epoch.is_multiple_of(self.step_size) {
            self.lr *= self.gamma;
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
}
