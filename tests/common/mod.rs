//! Shared helpers for the integration tests: the parity fixtures in `../shared/parity`.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Tensor};

/// `../shared/parity/<name>` from the project root, or from `$FLUXFLOW_PARITY_DIR` where set
/// (the GPU machine gets a copy of the fixtures, see scripts/gpu-check.sh).
pub fn parity(name: &str) -> PathBuf {
    match std::env::var_os("FLUXFLOW_PARITY_DIR") {
        Some(dir) => PathBuf::from(dir).join(name),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/parity")
            .join(name),
    }
}

/// The `train` settings and `steps` of tiny16.json.
pub fn tiny16_settings() -> serde_json::Value {
    let text = std::fs::read_to_string(parity("tiny16.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A trainer with tiny16.json's Phase 1 training settings for `model`.
pub fn tiny16_trainer(model: &fluxflow::model::FluxModel) -> fluxflow::train::step::VaeTrainer {
    tiny16_trainer_lr(model, None)
}

/// [`tiny16_trainer`] with another base learning rate.
pub fn tiny16_trainer_lr(
    model: &fluxflow::model::FluxModel,
    lr: Option<f64>,
) -> fluxflow::train::step::VaeTrainer {
    use fluxflow::train::optim::{self, OptimizerSpec, RmsPropConfig};
    use fluxflow::train::schedule::{CosineAnnealingLrConfig, Scheduler, SchedulerSpec};
    use fluxflow::train::step::{vae_params, StepConfig, VaeTrainer};
    let s = &tiny16_settings()["train"];
    let f = |k: &str| s[k].as_f64().unwrap();
    let config = StepConfig {
        kl_beta: f("kl_beta"),
        kl_warmup_steps: s["kl_warmup_steps"].as_u64().unwrap(),
        kl_free_bits: f("kl_free_bits"),
        freq_alpha: f("freq_alpha"),
        mse_weight: f("mse_weight"),
        clip_norm: f("clip_norm"),
        adaptive_weights: s["adaptive_weights"].as_bool().unwrap(),
        adaptive_window: 100,
        ema_decay: f("ema_decay"),
        use_spade: true,
        checkpointing: true,
        mixed_precision: Default::default(),
    };
    let lr = lr.unwrap_or(f("lr"));
    let spec = OptimizerSpec::RmsProp(RmsPropConfig {
        lr,
        alpha: f("alpha"),
        momentum: f("momentum"),
        centered: s["centered"].as_bool().unwrap(),
        ..RmsPropConfig::default()
    });
    let opt = optim::build("vae", &spec, vae_params(model)).unwrap();
    let sched = Scheduler::build(
        "vae",
        &SchedulerSpec::CosineAnnealing(CosineAnnealingLrConfig {
            eta_min_factor: Some(f("eta_min_factor")),
            ..Default::default()
        }),
        lr,
        s["total_steps"].as_u64().unwrap(),
    )
    .unwrap();
    VaeTrainer::new(config, model, opt, sched).unwrap()
}

/// Every tensor of tiny16.safetensors.
pub fn tiny16() -> HashMap<String, Tensor> {
    fluxflow::weights::read_tensors(&parity("tiny16.safetensors"))
        .expect("the parity fixture ../shared/parity/tiny16.safetensors")
}

/// ||a - b|| / ||b|| in float64; ||a - b|| itself where b is all zeros.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let diff = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap();
    let norm = b.sqr().unwrap().sum_all().unwrap();
    let d: f64 = diff.to_scalar().unwrap();
    let n: f64 = norm.to_scalar().unwrap();
    if n == 0.0 {
        d.sqrt()
    } else {
        (d / n).sqrt()
    }
}

/// Asserts rel_l2(actual, expected) < tol, naming the tensor.
pub fn assert_close(name: &str, actual: &Tensor, expected: &Tensor, tol: f64) {
    let err = rel_l2(actual, expected);
    assert!(
        err < tol,
        "{name}: relative L2 error {err:e} exceeds {tol:e}"
    );
}

/// The `fluxflow` binary of this build.
pub fn bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_fluxflow"))
}

/// A fresh folder `fluxflow-<kind>-<pid>-<name>` under the temp dir.
pub fn fresh_dir(kind: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fluxflow-{kind}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A finished command's stdout and stderr together.
pub fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
