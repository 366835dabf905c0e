//! The optimizer/scheduler JSON (`optimization.optim_sched_config`), in either layout: the
//! reference's `{"optimizers": {...}, "schedulers": {...}}` or model names at the top level
//! beside `"schedulers"`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use crate::train::factory::{optimizer_spec, scheduler_spec, MODELS};
use crate::train::optim::OptimizerSpec;
use crate::train::schedule::SchedulerSpec;

/// Per-model optimizer and scheduler entries as written in the file (absent: reference defaults).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OptimFile {
    pub optimizers: Map<String, Value>,
    pub schedulers: Map<String, Value>,
}

impl OptimFile {
    /// Reads the file; an unknown model name or top-level key is an error naming it and the file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the optimizer config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).context("not valid JSON")?;
        let Value::Object(mut top) = v else {
            bail!("the top level must be a JSON object");
        };
        let take = |top: &mut Map<String, Value>, key: &str| -> Result<Map<String, Value>> {
            match top.remove(key) {
                None => Ok(Map::new()),
                Some(Value::Object(m)) => Ok(m),
                Some(_) => bail!("\"{key}\" must be an object of per-model entries"),
            }
        };
        let schedulers = take(&mut top, "schedulers")?;
        let optimizers = if top.contains_key("optimizers") {
            let o = take(&mut top, "optimizers")?;
            if let Some(k) = top.keys().next() {
                bail!("unknown key \"{k}\" beside \"optimizers\" and \"schedulers\"");
            }
            o
        } else {
            top
        };
        for (what, map) in [("optimizer", &optimizers), ("scheduler", &schedulers)] {
            for k in map.keys() {
                if !MODELS.contains(&k.as_str()) {
                    bail!("unknown {what} model \"{k}\" (expected one of {MODELS:?})");
                }
            }
        }
        Ok(Self {
            optimizers,
            schedulers,
        })
    }

    /// The optimizer `model` gets, with `training_lr` where its entry gives no lr.
    pub fn optimizer(&self, model: &str, training_lr: f64) -> Result<OptimizerSpec> {
        optimizer_spec(model, self.optimizers.get(model), training_lr)
    }

    /// The scheduler `model` gets over a run of `total_steps`.
    pub fn scheduler(&self, model: &str, lr_min: f64, total_steps: u64) -> Result<SchedulerSpec> {
        scheduler_spec(model, self.schedulers.get(model), lr_min, total_steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED_LAYOUT: &str = r#"{
        "vae": {"type": "RMSprop", "lr": 1e-5, "alpha": 0.95, "momentum": 0.9, "centered": true},
        "flow": {"type": "AdamW", "lr": 1e-5, "betas": [0.9, 0.95], "weight_decay": 0.01},
        "schedulers": {"vae": {"type": "CosineAnnealingLR", "eta_min_factor": 0.001}}
    }"#;

    #[test]
    fn both_layouts_give_the_same_settings() {
        let a = OptimFile::parse(SEED_LAYOUT).unwrap();
        let b = OptimFile::parse(
            r#"{"optimizers": {
                "vae": {"type": "RMSprop", "lr": 1e-5, "alpha": 0.95, "momentum": 0.9, "centered": true},
                "flow": {"type": "AdamW", "lr": 1e-5, "betas": [0.9, 0.95], "weight_decay": 0.01}},
               "schedulers": {"vae": {"type": "CosineAnnealingLR", "eta_min_factor": 0.001}}}"#,
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.optimizer("vae", 1e-6).unwrap().lr(), 1e-5);
        assert_eq!(a.optimizer("text_encoder", 1e-6).unwrap().lr(), 1e-7);
    }

    #[test]
    fn unknown_models_and_keys_are_named() {
        let e = OptimFile::parse(r#"{"vea": {"type": "AdamW"}}"#).unwrap_err();
        assert!(format!("{e:#}").contains("\"vea\""), "{e:#}");
        let e = OptimFile::parse(r#"{"optimizers": {}, "extra": 1}"#).unwrap_err();
        assert!(format!("{e:#}").contains("\"extra\""), "{e:#}");
    }
}
