//! The reference's optimizer and scheduler factories (fluxflow-training `optimizer_factory.py`,
//! `scheduler_factory.py`, `load_optimizer_scheduler_config`): per-model defaults where the
//! optimizer JSON is silent, the factory's own defaults per field, and its validation.

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

use super::optim::OptimizerSpec;
use super::schedule::{Scheduler, SchedulerSpec};

/// The models the reference configures: "flow", "vae", "text_encoder", "discriminator".
pub const MODELS: [&str; 4] = ["flow", "vae", "text_encoder", "discriminator"];

/// The reference's optimizer for `model` when the JSON has none (`get_default_optimizer_config`).
fn default_optimizer(model: &str) -> Value {
    match model {
        "flow" => json!({"type": "Lion", "lr": 5e-7, "betas": [0.9, 0.95],
                         "weight_decay": 0.01, "decoupled_weight_decay": true}),
        "text_encoder" => json!({"type": "AdamW", "lr": 5e-8, "betas": [0.9, 0.99],
                                 "weight_decay": 0.01}),
        "discriminator" => json!({"type": "AdamW", "lr": 5e-7, "betas": [0.0, 0.9],
                                  "weight_decay": 0.001, "amsgrad": true}),
        _ => json!({"type": "AdamW", "lr": 5e-7, "betas": [0.9, 0.95], "weight_decay": 0.01}),
    }
}

/// The reference's scheduler for `model` when the JSON has none.
fn default_scheduler(model: &str) -> Value {
    let factor = if model == "text_encoder" { 0.001 } else { 0.1 };
    json!({"type": "CosineAnnealingLR", "eta_min_factor": factor})
}

/// The learning rate the reference gives a model whose config has no "lr": the `lr` setting
/// for flow and vae (and the discriminator), a tenth of it for the text encoder.
pub fn fallback_lr(model: &str, training_lr: f64) -> f64 {
    if model == "text_encoder" {
        training_lr / 10.0
    } else {
        training_lr
    }
}

fn set_default(obj: &mut Map<String, Value>, key: &str, value: Value) {
    obj.entry(key.to_string()).or_insert(value);
}

/// The optimizer `model` gets from its JSON entry (`None`: absent), with `training_lr` where the
/// entry has no "lr", the reference factory's per-field defaults, and its validation.
pub fn optimizer_spec(
    model: &str,
    entry: Option<&Value>,
    training_lr: f64,
) -> Result<OptimizerSpec> {
    let mut v = match entry {
        Some(e) => e.clone(),
        None => default_optimizer(model),
    };
    let obj = v
        .as_object_mut()
        .with_context(|| format!("optimizer for {model:?} must be a JSON object"))?;
    if entry.is_none() || !obj.contains_key("lr") {
        obj.insert("lr".into(), json!(fallback_lr(model, training_lr)));
    }
    set_default(obj, "type", json!("AdamW"));
    let kind = obj["type"].as_str().unwrap_or_default().to_string();
    match kind.as_str() {
        "Lion" => {
            set_default(obj, "betas", json!([0.9, 0.95]));
            set_default(obj, "weight_decay", json!(0.01));
            set_default(obj, "decoupled_weight_decay", json!(true));
        }
        "Adam" | "AdamW" => {
            set_default(obj, "betas", json!([0.9, 0.999]));
            set_default(obj, "weight_decay", json!(0.0));
            set_default(obj, "eps", json!(1e-8));
        }
        "SGD" | "RMSprop" => {}
        other => bail!(
            "optimizer for {model:?}: unsupported type {other:?} (supported: Lion, AdamW, Adam, SGD, RMSprop)"
        ),
    }
    let spec: OptimizerSpec =
        serde_json::from_value(v).with_context(|| format!("optimizer for {model:?}"))?;
    spec.validate(model)?;
    Ok(spec)
}

/// The scheduler `model` gets from its JSON entry, with the reference factory's defaults
/// (CosineAnnealingLR over the run with eta_min_factor `lr_min`, LinearLR 1 -> 0.1 over the run,
/// ExponentialLR gamma 0.95, ConstantLR factor 1 over the run, StepLR a tenth of the run) and
/// its validation. `total_steps` is the run's length in optimizer steps.
pub fn scheduler_spec(
    model: &str,
    entry: Option<&Value>,
    lr_min: f64,
    total_steps: u64,
) -> Result<SchedulerSpec> {
    if total_steps == 0 {
        bail!("scheduler for {model:?}: the run has no steps");
    }
    let mut v = match entry {
        Some(e) => e.clone(),
        None => default_scheduler(model),
    };
    let obj = v
        .as_object_mut()
        .with_context(|| format!("scheduler for {model:?} must be a JSON object"))?;
    set_default(obj, "type", json!("CosineAnnealingLR"));
    let kind = obj["type"].as_str().unwrap_or_default().to_string();
    let num =
        |obj: &Map<String, Value>, k: &str, d: f64| obj.get(k).and_then(Value::as_f64).unwrap_or(d);
    match kind.as_str() {
        "CosineAnnealingLR" => {
            set_default(obj, "eta_min_factor", json!(lr_min));
            let f = num(obj, "eta_min_factor", lr_min);
            if !(f > 0.0 && f <= 1.0) {
                bail!("scheduler for {model:?}: eta_min_factor must be in (0, 1], got {f}");
            }
            if obj.contains_key("T_max") || obj.contains_key("t_max") {
                bail!("scheduler for {model:?}: T_max is the run's total steps, not a setting");
            }
        }
        "LinearLR" => {
            set_default(obj, "start_factor", json!(1.0));
            set_default(obj, "end_factor", json!(0.1));
            set_default(obj, "total_iters", json!(total_steps));
        }
        "ExponentialLR" | "StepLR" => {
            let d = if kind == "ExponentialLR" { 0.95 } else { 0.1 };
            set_default(obj, "gamma", json!(d));
            let g = num(obj, "gamma", d);
            if !(g > 0.0 && g < 1.0) {
                bail!("scheduler for {model:?}: gamma must be in (0, 1), got {g}");
            }
            if kind == "StepLR" {
                set_default(obj, "step_size", json!(total_steps / 10));
                if obj["step_size"].as_u64() == Some(0) {
                    bail!("scheduler for {model:?}: step_size must be positive (the run has {total_steps} steps)");
                }
            }
        }
        "ConstantLR" => {
            set_default(obj, "factor", json!(1.0));
            set_default(obj, "total_iters", json!(total_steps));
        }
        "ReduceLROnPlateau" => {}
        other => bail!(
            "scheduler for {model:?}: unsupported type {other:?} (supported: CosineAnnealingLR, LinearLR, ExponentialLR, ConstantLR, StepLR, ReduceLROnPlateau)"
        ),
    }
    let spec: SchedulerSpec =
        serde_json::from_value(v).with_context(|| format!("scheduler for {model:?}"))?;
    Scheduler::build(model, &spec, 1.0, total_steps)?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::{LionConfig, RmsPropConfig};

    #[test]
    fn absent_models_get_the_reference_defaults_with_the_training_lr() {
        match optimizer_spec("flow", None, 1e-6).unwrap() {
            OptimizerSpec::Lion(LionConfig {
                lr,
                betas,
                weight_decay,
                decoupled_weight_decay,
            }) => {
                assert_eq!((lr, betas, weight_decay), (1e-6, (0.9, 0.95), 0.01));
                assert!(decoupled_weight_decay);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            optimizer_spec("text_encoder", None, 1e-6).unwrap().lr(),
            1e-7
        );
    }

    #[test]
    fn given_fields_win_and_silent_ones_take_the_factory_defaults() {
        let e = json!({"type": "RMSprop", "lr": 1e-5, "alpha": 0.95, "momentum": 0.9, "centered": true});
        let spec = optimizer_spec("vae", Some(&e), 1e-6).unwrap();
        let want = RmsPropConfig {
            lr: 1e-5,
            alpha: 0.95,
            momentum: 0.9,
            centered: true,
            ..RmsPropConfig::default()
        };
        assert_eq!(spec, OptimizerSpec::RmsProp(want));
        let adamw = optimizer_spec("vae", Some(&json!({"type": "AdamW"})), 3e-4).unwrap();
        match adamw {
            OptimizerSpec::AdamW(c) => assert_eq!((c.lr, c.weight_decay), (3e-4, 0.0)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_entries_are_errors_naming_model_and_field() {
        let e = optimizer_spec("vae", Some(&json!({"type": "Adagrad"})), 1e-5).unwrap_err();
        assert!(format!("{e:#}").contains("\"vae\": unsupported type \"Adagrad\""));
        let e = optimizer_spec(
            "vae",
            Some(&json!({"type": "RMSprop", "momentum": 1.5})),
            1e-5,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("momentum"), "{e:#}");
        let e = optimizer_spec("vae", Some(&json!({"type": "RMSprop", "colour": 1})), 1e-5)
            .unwrap_err();
        assert!(format!("{e:#}").contains("colour"), "{e:#}");
        let e = scheduler_spec(
            "vae",
            Some(&json!({"type": "StepLR", "gamma": 1.5})),
            0.1,
            100,
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("gamma must be in (0, 1)"),
            "{e:#}"
        );
        let e = scheduler_spec("vae", Some(&json!({"eta_min_factor": 0.0})), 0.1, 100).unwrap_err();
        assert!(format!("{e:#}").contains("eta_min_factor"), "{e:#}");
    }

    #[test]
    fn scheduler_defaults_follow_the_run_length() {
        let s = scheduler_spec("vae", Some(&json!({"type": "StepLR"})), 0.1, 1000).unwrap();
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["step_size"], json!(100));
        let s = scheduler_spec("text_encoder", None, 0.1, 1000).unwrap();
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["eta_min_factor"], json!(0.001));
    }
}
