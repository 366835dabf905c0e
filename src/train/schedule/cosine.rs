//! `CosineAnnealingLR`: cosine decay from the initial lr to `eta_min` over `T_max` steps.

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};

use super::{exact_f64, Checker, Result};

/// `CosineAnnealingLR` settings as the reference config writes them: `T_max` defaults to the
/// run's total steps, `eta_min` is absolute or `eta_min_factor` times the initial lr (default 0).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CosineAnnealingLrConfig {
    #[serde(
        rename = "T_max",
        alias = "t_max",
        skip_serializing_if = "Option::is_none"
    )]
    pub t_max: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_min_factor: Option<f64>,
}

/// Matches `torch.optim.lr_scheduler.CosineAnnealingLR` (recursive form, restarts past T_max).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CosineAnnealingLr {
    t_max: u64,
    #[serde(with = "exact_f64")]
    eta_min: f64,
    #[serde(with = "exact_f64")]
    base_lr: f64,
    #[serde(with = "exact_f64")]
    lr: f64,
    last_epoch: u64,
}

impl CosineAnnealingLr {
    /// Checks the settings; errors name `model` and the field.
    pub fn new(model: &str, initial_lr: f64, t_max: u64, eta_min: f64) -> Result<Self> {
        let c = Checker {
            model,
            scheduler: "CosineAnnealingLR",
        };
        c.initial_lr(initial_lr)?;
        c.check("T_max", t_max as f64, t_max > 0, "> 0")?;
        c.non_negative("eta_min", eta_min)?;
        Ok(Self {
            t_max,
            eta_min,
            base_lr: initial_lr,
            lr: initial_lr,
            last_epoch: 0,
        })
    }

    /// One `scheduler.step()`, after an optimizer step.
    pub fn step(&mut self) {
        self.last_epoch += 1;
        let (epoch, t_max) = (self.last_epoch as f64, self.t_max as f64);
        // PyTorch's `(last_epoch - 1 - T_max) % (2 * T_max) == 0`: the first step of a rise.
        let restart = (self.last_epoch as i128 - 1 - self.t_max as i128)
            .checked_rem_euclid(2 * self.t_max as i128)
            == Some(0);
        self.lr = if restart {
            self.lr + (self.base_lr - self.eta_min) * (1.0 - (PI / t_max).cos()) / 2.0
        } else {
            (1.0 + (PI * epoch / t_max).cos()) / (1.0 + (PI * (epoch - 1.0) / t_max).cos())
                * (self.lr - self.eta_min)
                + self.eta_min
        };
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
