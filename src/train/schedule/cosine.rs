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

    /// Checks a restored state's fields (by their saved names).
    pub(super) fn check_state(&self, c: &Checker) -> Result<()> {
        c.check("t_max", self.t_max as f64, self.t_max > 0, "> 0")?;
        c.positive("base_lr", self.base_lr)?;
        c.non_negative("eta_min", self.eta_min)?;
        c.non_negative("lr", self.lr)
    }

    /// The learning rates it holds, by their saved names.
    pub(super) fn rates(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("base_lr", self.base_lr),
            ("eta_min", self.eta_min),
            ("lr", self.lr),
        ]
    }

    /// The schedule's length, `T_max`.
    pub fn t_max(&self) -> u64 {
        self.t_max
    }

    /// Sets `T_max` (a run whose length changed): the chainable form continues from the
    /// current learning rate, without a jump, and reaches `eta_min` at the new `T_max`. This is
    /// what PyTorch computes after `scheduler.T_max = t_max`, or for a CosineAnnealingLR
    /// created at the current step from the optimizer's current learning rate.
    pub fn set_t_max(&mut self, t_max: u64) {
        self.t_max = t_max.max(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_longer_t_max_continues_from_the_current_lr_and_ends_at_eta_min() {
        let mut s = CosineAnnealingLr::new("vae", 1.0, 8, 0.1).unwrap();
        for _ in 0..4 {
            s.step();
        }
        let at4 = s.lr();
        s.set_t_max(16);
        let mut prev = at4;
        for k in 5..=16u32 {
            s.step();
            // (lr_k - eta_min) = (lr_4 - eta_min) (1 + cos(pi k / 16)) / (1 + cos(pi 4 / 16)):
            // no jump at the change, falling to eta_min at the new end.
            let want = 0.1
                + (at4 - 0.1) * (1.0 + (PI * k as f64 / 16.0).cos())
                    / (1.0 + (PI * 4.0 / 16.0).cos());
            assert!(
                (s.lr() - want).abs() < 1e-12,
                "step {k}: {} vs {want}",
                s.lr()
            );
            assert!(s.lr() < prev);
            prev = s.lr();
        }
        assert!((s.lr() - 0.1).abs() < 1e-12);
    }
}
