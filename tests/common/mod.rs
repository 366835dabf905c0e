//! Shared helpers for the integration tests: the fixtures in `tests/fixtures/` (copied and
//! trimmed from the PyTorch reference's results by `tests/fixtures/make_fixtures.py`).
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Tensor};

/// `tests/fixtures/<name>`, or `$FLUXFLOW_FIXTURES_DIR/<name>` where that is set (the GPU
/// machine runs a test binary built elsewhere, see scripts/gpu-check.sh).
pub fn parity(name: &str) -> PathBuf {
    match std::env::var_os("FLUXFLOW_FIXTURES_DIR") {
        Some(dir) => PathBuf::from(dir).join(name),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
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
        recompute: true,
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
        .expect("the fixture tests/fixtures/tiny16.safetensors")
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

/// Random projections in a sketch (`sketch.projections` of tiny16.json).
pub const SKETCH_PROJECTIONS: usize = 64;

/// splitmix64's output for the counter `x` (the mix of x + the golden-ratio increment).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A Neumaier-compensated float64 sum: the error is about one rounding of the result, whatever
/// the number of terms (make_fixtures.py sums exactly with math.fsum).
#[derive(Clone, Copy, Default)]
struct Sum {
    s: f64,
    c: f64,
}

impl Sum {
    fn add(&mut self, x: f64) {
        let t = self.s + x;
        if self.s.abs() >= x.abs() {
            self.c += (self.s - t) + x;
        } else {
            self.c += (x - t) + self.s;
        }
        self.s = t;
    }
    fn value(self) -> f64 {
        self.s + self.c
    }
}

/// The sketch of tests/fixtures/make_fixtures.py of `t` in float64 (row-major elements x):
/// `[n, sum x, ||x||, max |x|, r_0 . x, ..., r_{K-1} . x]`, K = [`SKETCH_PROJECTIONS`], with
/// r_k[i] = -1 where the top bit of splitmix64((k << 32) | i) is set, else +1.
pub fn sketch(t: &Tensor) -> Vec<f64> {
    let x: Vec<f64> = t
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(x.len() < 1 << 32);
    let (mut sum, mut sq, mut max) = (Sum::default(), Sum::default(), 0f64);
    let mut proj = [Sum::default(); SKETCH_PROJECTIONS];
    for (i, &v) in x.iter().enumerate() {
        sum.add(v);
        sq.add(v * v);
        max = max.max(v.abs());
        for (k, p) in proj.iter_mut().enumerate() {
            let negative = splitmix64(((k as u64) << 32) | i as u64) >> 63 == 1;
            p.add(if negative { -v } else { v });
        }
    }
    let mut out = vec![x.len() as f64, sum.value(), sq.value().sqrt(), max];
    out.extend(proj.iter().map(|p| p.value()));
    out
}

/// How far a tensor is from the one a stored sketch describes, each relative to the sketched
/// tensor's norm (or absolute where that is 0, as [`rel_l2`]).
#[derive(Debug, Clone, Copy)]
pub struct SketchError {
    /// sqrt(mean_k (r_k . (a - b))^2) / ||b||: estimates rel_l2(a, b) (unbiased in the square).
    pub estimate: f64,
    /// | ||a|| - ||b|| | / ||b|| (at most rel_l2(a, b)).
    pub norm: f64,
    /// |sum a - sum b| / (sqrt(n) ||b||) (at most rel_l2(a, b)).
    pub sum: f64,
    /// |max|a| - max|b|| / ||b|| (at most rel_l2(a, b)).
    pub max_abs: f64,
}

impl SketchError {
    /// The largest of the four: each is at most (about, for `estimate`) rel_l2(a, b).
    pub fn worst(&self) -> f64 {
        self.estimate.max(self.norm).max(self.sum).max(self.max_abs)
    }
}

/// [`SketchError`] of `actual` against `expected`, a stored sketch (float64, [4 + K]).
pub fn sketch_error(name: &str, actual: &Tensor, expected: &Tensor) -> SketchError {
    let b: Vec<f64> = expected.to_vec1().unwrap();
    assert_eq!(b.len(), 4 + SKETCH_PROJECTIONS, "{name}: sketch length");
    let a = sketch(actual);
    assert_eq!(a[0], b[0], "{name}: element count");
    let norm = if b[2] == 0.0 { 1.0 } else { b[2] };
    let mean_sq = a[4..]
        .iter()
        .zip(&b[4..])
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        / SKETCH_PROJECTIONS as f64;
    SketchError {
        estimate: mean_sq.sqrt() / norm,
        norm: (a[2] - b[2]).abs() / norm,
        sum: (a[1] - b[1]).abs() / (b[0].sqrt() * norm),
        max_abs: (a[3] - b[3]).abs() / norm,
    }
}

/// Asserts that `actual` is within `tol` of the tensor whose sketch is `expected` by every
/// measure of [`SketchError`], naming the tensor; the counterpart of [`assert_close`] for the
/// tensors the fixtures keep only as sketches.
pub fn assert_sketch_close(name: &str, actual: &Tensor, expected: &Tensor, tol: f64) {
    let e = sketch_error(name, actual, expected);
    assert!(
        e.worst() < tol,
        "{name}: sketch error {e:?} exceeds {tol:e} (estimated relative L2 {:e})",
        e.estimate
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
