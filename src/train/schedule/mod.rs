//! Learning-rate schedulers with the step-by-step semantics of `torch.optim.lr_scheduler`.
//!
//! Each scheduler follows PyTorch's chainable (recursive) `get_lr`, as used when
//! `scheduler.step()` is called once per optimizer step: the new lr is computed from the
//! current one, so rounding matches PyTorch's. Construction performs PyTorch's initial step
//! (`last_epoch` 0), so [`Scheduler::lr`] is the lr of the first optimizer step. The structs
//! are their own saveable state (serde; floats stored exactly, see
//! [`super::optim::exact_f64`]).

use serde::{Deserialize, Serialize};

use super::optim::exact_f64;

mod cosine;
mod factor;
mod plateau;

pub use cosine::{CosineAnnealingLr, CosineAnnealingLrConfig};
pub use factor::{
    ConstantLr, ConstantLrConfig, ExponentialLr, ExponentialLrConfig, LinearLr, LinearLrConfig,
    StepLr, StepLrConfig,
};
pub use plateau::{PlateauMode, ReduceLrOnPlateau, ReduceLrOnPlateauConfig, ThresholdMode};

/// Errors of scheduler construction and stepping; each names the model and the field.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("scheduler for \"{model}\": {scheduler} {field} must be {expected}, got {value:?}")]
    InvalidParameter {
        model: String,
        scheduler: &'static str,
        field: &'static str,
        expected: &'static str,
        value: f64,
    },
    #[error(
        "scheduler for \"{model}\": CosineAnnealingLR takes eta_min or eta_min_factor, not both"
    )]
    EtaMinTwice { model: String },
    #[error("ReduceLROnPlateau steps with a metric; none was given")]
    MissingMetric,
}

pub type Result<T> = std::result::Result<T, ScheduleError>;

struct Checker<'a> {
    model: &'a str,
    scheduler: &'static str,
}

impl Checker<'_> {
    fn check(
        &self,
        field: &'static str,
        value: f64,
        ok: bool,
        expected: &'static str,
    ) -> Result<()> {
        if ok {
            Ok(())
        } else {
            Err(ScheduleError::InvalidParameter {
                model: self.model.to_string(),
                scheduler: self.scheduler,
                field,
                expected,
                value,
            })
        }
    }

    fn positive(&self, field: &'static str, value: f64) -> Result<()> {
        self.check(field, value, value > 0.0 && value.is_finite(), "> 0")
    }

    fn non_negative(&self, field: &'static str, value: f64) -> Result<()> {
        self.check(field, value, value >= 0.0 && value.is_finite(), ">= 0")
    }

    fn initial_lr(&self, value: f64) -> Result<()> {
        self.positive("initial lr", value)
    }
}
/// Which scheduler and its settings, as in a config file: `{"type": "StepLR", "step_size": 7}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum SchedulerSpec {
    #[serde(rename = "CosineAnnealingLR")]
    CosineAnnealing(CosineAnnealingLrConfig),
    #[serde(rename = "LinearLR")]
    Linear(LinearLrConfig),
    #[serde(rename = "ExponentialLR")]
    Exponential(ExponentialLrConfig),
    #[serde(rename = "ConstantLR")]
    Constant(ConstantLrConfig),
    #[serde(rename = "StepLR")]
    Step(StepLrConfig),
    #[serde(rename = "ReduceLROnPlateau")]
    ReduceOnPlateau(ReduceLrOnPlateauConfig),
}

/// Any scheduler, with its state; serialises tagged by the PyTorch class name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Scheduler {
    #[serde(rename = "CosineAnnealingLR")]
    CosineAnnealing(CosineAnnealingLr),
    #[serde(rename = "LinearLR")]
    Linear(LinearLr),
    #[serde(rename = "ExponentialLR")]
    Exponential(ExponentialLr),
    #[serde(rename = "ConstantLR")]
    Constant(ConstantLr),
    #[serde(rename = "StepLR")]
    Step(StepLr),
    #[serde(rename = "ReduceLROnPlateau")]
    ReduceOnPlateau(ReduceLrOnPlateau),
}

impl Scheduler {
    /// Builds the scheduler `spec` describes for an optimizer starting at `initial_lr`, in a run
    /// of `total_steps` optimizer steps (CosineAnnealingLR's default `T_max`).
    pub fn build(
        model: &str,
        spec: &SchedulerSpec,
        initial_lr: f64,
        total_steps: u64,
    ) -> Result<Self> {
        Ok(match spec {
            SchedulerSpec::CosineAnnealing(cfg) => {
                let eta_min = match (cfg.eta_min, cfg.eta_min_factor) {
                    (Some(_), Some(_)) => {
                        return Err(ScheduleError::EtaMinTwice {
                            model: model.to_string(),
                        })
                    }
                    (Some(eta_min), None) => eta_min,
                    (None, Some(factor)) => {
                        let c = Checker {
                            model,
                            scheduler: "CosineAnnealingLR",
                        };
                        c.non_negative("eta_min_factor", factor)?;
                        initial_lr * factor
                    }
                    (None, None) => 0.0,
                };
                let t_max = cfg.t_max.unwrap_or(total_steps);
                Self::CosineAnnealing(CosineAnnealingLr::new(model, initial_lr, t_max, eta_min)?)
            }
            SchedulerSpec::Linear(cfg) => Self::Linear(LinearLr::new(model, initial_lr, cfg)?),
            SchedulerSpec::Exponential(cfg) => {
                Self::Exponential(ExponentialLr::new(model, initial_lr, cfg)?)
            }
            SchedulerSpec::Constant(cfg) => {
                Self::Constant(ConstantLr::new(model, initial_lr, cfg)?)
            }
            SchedulerSpec::Step(cfg) => Self::Step(StepLr::new(model, initial_lr, cfg)?),
            SchedulerSpec::ReduceOnPlateau(cfg) => {
                Self::ReduceOnPlateau(ReduceLrOnPlateau::new(model, initial_lr, cfg)?)
            }
        })
    }

    /// One step after an optimizer step; ReduceLROnPlateau needs `metric`, the others ignore it.
    pub fn step(&mut self, metric: Option<f64>) -> Result<()> {
        match self {
            Self::CosineAnnealing(s) => s.step(),
            Self::Linear(s) => s.step(),
            Self::Exponential(s) => s.step(),
            Self::Constant(s) => s.step(),
            Self::Step(s) => s.step(),
            Self::ReduceOnPlateau(s) => s.step_metric(metric.ok_or(ScheduleError::MissingMetric)?),
        }
        Ok(())
    }

    /// The learning rate for the next optimizer step.
    pub fn lr(&self) -> f64 {
        match self {
            Self::CosineAnnealing(s) => s.lr(),
            Self::Linear(s) => s.lr(),
            Self::Exponential(s) => s.lr(),
            Self::Constant(s) => s.lr(),
            Self::Step(s) => s.lr(),
            Self::ReduceOnPlateau(s) => s.lr(),
        }
    }

    /// The PyTorch class name.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::CosineAnnealing(_) => "CosineAnnealingLR",
            Self::Linear(_) => "LinearLR",
            Self::Exponential(_) => "ExponentialLR",
            Self::Constant(_) => "ConstantLR",
            Self::Step(_) => "StepLR",
            Self::ReduceOnPlateau(_) => "ReduceLROnPlateau",
        }
    }

    /// Checks a restored (deserialised) state: every setting in its domain and every learning
    /// rate finite and non-negative; errors name `model` and the field by its saved name.
    pub fn check_state(&self, model: &str) -> Result<()> {
        let c = Checker {
            model,
            scheduler: self.kind(),
        };
        match self {
            Self::CosineAnnealing(s) => s.check_state(&c),
            Self::Linear(s) => s.check_state(&c),
            Self::Exponential(s) => s.check_state(&c),
            Self::Constant(s) => s.check_state(&c),
            Self::Step(s) => s.check_state(&c),
            Self::ReduceOnPlateau(s) => s.check_state(&c),
        }
    }

    /// The learning rates the state holds, by their saved names (`lr`, and `base_lr`,
    /// `eta_min` or `min_lr` where the scheduler has them).
    pub fn learning_rates(&self) -> Vec<(&'static str, f64)> {
        match self {
            Self::CosineAnnealing(s) => s.rates(),
            Self::ReduceOnPlateau(s) => s.rates(),
            other => vec![("lr", other.lr())],
        }
    }

    /// Fits the schedule to a run whose length changed to `total_steps`: CosineAnnealingLR,
    /// whose `T_max` is the run's length, continues from its current learning rate to reach
    /// `eta_min` at the new end (see [`CosineAnnealingLr::set_t_max`]); returns whether it
    /// changed. The other schedulers keep their saved settings.
    pub fn set_run_length(&mut self, total_steps: u64) -> bool {
        match self {
            Self::CosineAnnealing(s) if s.t_max() != total_steps => {
                s.set_t_max(total_steps);
                true
            }
            _ => false,
        }
    }

    /// Number of steps taken.
    pub fn last_epoch(&self) -> u64 {
        match self {
            Self::CosineAnnealing(s) => s.last_epoch(),
            Self::Linear(s) => s.last_epoch(),
            Self::Exponential(s) => s.last_epoch(),
            Self::Constant(s) => s.last_epoch(),
            Self::Step(s) => s.last_epoch(),
            Self::ReduceOnPlateau(s) => s.last_epoch(),
        }
    }
}
