//! Optimizers and LR schedulers against PyTorch traces (`tests/fixtures/optim-traces.json`),
//! save/restore round trips, validation errors, and parameters without gradients.
//!
//! Tolerances: parameters (all of magnitude < 1) within 1e-10 absolute after every step, in
//! float64; learning rates within 1e-10 relative. Resume round trips must be bit-identical.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use fluxflow::train::{optim, schedule};
use optim::{Optimizer, OptimizerSpec, OptimizerState};
use schedule::{Scheduler, SchedulerSpec};
use serde_json::{json, Value};

const PARAM_TOL: f64 = 1e-10;
const LR_REL_TOL: f64 = 1e-10;

fn traces() -> &'static Value {
    static TRACES: OnceLock<Value> = OnceLock::new();
    TRACES.get_or_init(|| {
        let path = common::parity("optim-traces.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        serde_json::from_str(&text).expect("optim-traces.json parses")
    })
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

/// The least-squares-plus-quartic problem: loss = sum((A p - b)^2) + 0.1 * sum(p^4).
struct Problem {
    a: Tensor,
    b: Tensor,
    p0: Vec<f64>,
}

impl Problem {
    fn new(dtype: DType) -> Self {
        let t = traces();
        let rows: Vec<f64> = t["A"].as_array().unwrap().iter().flat_map(f64s).collect();
        let n = t["p0"].as_array().unwrap().len();
        let a = Tensor::from_vec(rows, (8, n), &Device::Cpu).unwrap();
        let b = Tensor::from_vec(f64s(&t["b"]), 8, &Device::Cpu).unwrap();
        Self {
            a: a.to_dtype(dtype).unwrap(),
            b: b.to_dtype(dtype).unwrap(),
            p0: f64s(&t["p0"]),
        }
    }

    fn param(&self) -> Var {
        let p0 = Tensor::from_vec(self.p0.clone(), self.p0.len(), &Device::Cpu).unwrap();
        Var::from_tensor(&p0.to_dtype(self.a.dtype()).unwrap()).unwrap()
    }

    fn grads(&self, p: &Var) -> GradStore {
        let p = p.as_tensor();
        let residual = (self
            .a
            .matmul(&p.unsqueeze(1).unwrap())
            .unwrap()
            .squeeze(1)
            .unwrap()
            - &self.b)
            .unwrap();
        let quartic = (p.sqr().unwrap().sqr().unwrap().sum_all().unwrap() * 0.1).unwrap();
        let loss = (residual.sqr().unwrap().sum_all().unwrap() + quartic).unwrap();
        loss.backward().unwrap()
    }
}

fn values(var: &Var) -> Vec<f64> {
    var.as_tensor()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn optimizer_entry(name: &str) -> &'static Value {
    &traces()["optimizers"][name]
}

/// The trace's `config` with its `type`, parsed as a config file would be.
fn optimizer_spec(name: &str) -> OptimizerSpec {
    let entry = optimizer_entry(name);
    let mut config = entry["config"].clone();
    config["type"] = entry["type"].clone();
    serde_json::from_value(config).expect("trace config parses as OptimizerSpec")
}

fn expected_params(name: &str) -> Vec<Vec<f64>> {
    optimizer_entry(name)["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(f64s)
        .collect()
}

fn check_optimizer_trace(name: &str, dtype: DType, tol: f64) {
    let problem = Problem::new(dtype);
    let p = problem.param();
    let mut opt = optim::build(
        "trace",
        &optimizer_spec(name),
        vec![("p".into(), p.clone())],
    )
    .expect("optimizer builds");
    for (step, expected) in expected_params(name).iter().enumerate() {
        opt.step(&problem.grads(&p)).unwrap();
        let got = values(&p);
        for (i, (g, e)) in got.iter().zip(expected).enumerate() {
            assert!(
                (g - e).abs() <= tol,
                "{name} step {} p[{i}]: got {g:e}, torch {e:e}, diff {:e}",
                step + 1,
                (g - e).abs()
            );
        }
    }
    for (key, t) in opt.state_tensors() {
        assert_eq!(t.dtype(), dtype, "{name}: {key}");
    }
}

macro_rules! optimizer_trace_tests {
    ($($test:ident, $test_f32:ident => $name:literal;)*) => {$(
        #[test]
        fn $test() {
            check_optimizer_trace($name, DType::F64, PARAM_TOL);
        }

        /// The production dtype runs the same update; float32 rounding (about 2e-7 here) allows 1e-6.
        #[test]
        fn $test_f32() {
            check_optimizer_trace($name, DType::F32, 1e-6);
        }
    )*};
}

optimizer_trace_tests! {
    rmsprop_centered_momentum_matches_torch, rmsprop_centered_momentum_runs_in_f32
        => "RMSprop_centered_momentum";
    rmsprop_plain_with_weight_decay_matches_torch, rmsprop_plain_runs_in_f32 => "RMSprop_plain";
    adamw_matches_torch, adamw_runs_in_f32 => "AdamW";
    adamw_amsgrad_matches_torch, adamw_amsgrad_runs_in_f32 => "AdamW_amsgrad";
    adam_l2_weight_decay_matches_torch, adam_runs_in_f32 => "Adam";
    sgd_nesterov_matches_torch, sgd_nesterov_runs_in_f32 => "SGD_nesterov";
    sgd_dampened_matches_torch, sgd_dampened_runs_in_f32 => "SGD_dampened";
    lion_matches_lion_pytorch, lion_runs_in_f32 => "Lion";
}

fn scheduler_entry(name: &str) -> &'static Value {
    &traces()["schedulers"][name]
}

/// The trace's scheduler: its config minus `total_steps`, which is the run length.
fn trace_scheduler(name: &str) -> Scheduler {
    let entry = scheduler_entry(name);
    let mut config = entry["config"].clone();
    let total_steps = config
        .as_object_mut()
        .unwrap()
        .remove("total_steps")
        .map_or(0, |v| v.as_u64().unwrap());
    let spec: SchedulerSpec =
        serde_json::from_value(config).expect("trace config parses as SchedulerSpec");
    let initial_lr = entry["initial_lr"].as_f64().unwrap();
    Scheduler::build("trace", &spec, initial_lr, total_steps).expect("scheduler builds")
}

fn scheduler_metrics(name: &str) -> Option<Vec<f64>> {
    scheduler_entry(name).get("metrics").map(f64s)
}

fn check_scheduler_trace(name: &str) {
    let mut scheduler = trace_scheduler(name);
    let metrics = scheduler_metrics(name);
    let expected = f64s(&scheduler_entry(name)["lr_after_each_step"]);
    for (step, e) in expected.iter().enumerate() {
        scheduler.step(metrics.as_ref().map(|m| m[step])).unwrap();
        let got = scheduler.lr();
        assert!(
            (got - e).abs() <= LR_REL_TOL * e.abs(),
            "{name} step {}: got {got:e}, torch {e:e}",
            step + 1
        );
    }
    assert_eq!(scheduler.last_epoch(), expected.len() as u64);
}

macro_rules! scheduler_trace_tests {
    ($($test:ident => $name:literal;)*) => {$(
        #[test]
        fn $test() {
            check_scheduler_trace($name);
        }
    )*};
}

scheduler_trace_tests! {
    cosine_annealing_matches_torch_past_t_max => "CosineAnnealingLR";
    linear_lr_matches_torch => "LinearLR";
    exponential_lr_matches_torch => "ExponentialLR";
    constant_lr_matches_torch => "ConstantLR";
    step_lr_matches_torch => "StepLR";
    reduce_on_plateau_matches_torch => "ReduceLROnPlateau";
}

fn temp_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("fluxflow-optim-{}-{tag}", std::process::id()))
}

/// Runs `steps` steps of optimizer + cosine schedule (lr changes every step), from `p`.
fn run_steps(
    problem: &Problem,
    p: &Var,
    opt: &mut dyn Optimizer,
    scheduler: &mut Scheduler,
    steps: usize,
) {
    for _ in 0..steps {
        opt.step(&problem.grads(p)).unwrap();
        scheduler.step(None).unwrap();
        opt.set_lr(scheduler.lr());
    }
}

fn cosine_for(spec: &OptimizerSpec) -> Scheduler {
    let cosine: SchedulerSpec =
        serde_json::from_value(json!({"type": "CosineAnnealingLR", "eta_min_factor": 0.001}))
            .unwrap();
    Scheduler::build("trace", &cosine, spec.lr(), 7).unwrap()
}

#[test]
fn resume_continues_bit_identical_on_cpu() {
    let problem = Problem::new(DType::F64);
    for name in traces()["optimizers"].as_object().unwrap().keys() {
        let spec = optimizer_spec(name);

        let p = problem.param();
        let mut opt = optim::build("vae", &spec, vec![("p".into(), p.clone())]).unwrap();
        let mut scheduler = cosine_for(&spec);
        run_steps(&problem, &p, opt.as_mut(), &mut scheduler, 10);
        let uninterrupted = values(&p);

        let p = problem.param();
        let mut opt = optim::build("vae", &spec, vec![("p".into(), p.clone())]).unwrap();
        let mut scheduler = cosine_for(&spec);
        run_steps(&problem, &p, opt.as_mut(), &mut scheduler, 4);
        // Save: tensors (moments and the weights) to safetensors, scalars to JSON text.
        let file = temp_path(&format!("{name}.safetensors"));
        let mut tensors: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
        tensors.insert("weights.p".into(), p.as_tensor().copy().unwrap());
        candle_core::safetensors::save(&tensors, &file).unwrap();
        let optimizer_json = serde_json::to_string(&opt.scalar_state()).unwrap();
        let scheduler_json = serde_json::to_string(&scheduler).unwrap();
        drop((opt, scheduler, p, tensors));

        // Restore into fresh objects.
        let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
        std::fs::remove_file(&file).unwrap();
        let p = Var::from_tensor(&tensors.remove("weights.p").unwrap()).unwrap();
        let state: OptimizerState = serde_json::from_str(&optimizer_json).unwrap();
        let mut opt =
            optim::restore("vae", &state, &tensors, vec![("p".into(), p.clone())]).unwrap();
        let mut scheduler: Scheduler = serde_json::from_str(&scheduler_json).unwrap();
        assert_eq!(opt.lr().to_bits(), scheduler.lr().to_bits(), "{name}");
        run_steps(&problem, &p, opt.as_mut(), &mut scheduler, 6);

        let resumed = values(&p);
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&resumed),
            bits(&uninterrupted),
            "{name}: resumed run differs"
        );
    }
}

#[test]
fn scheduler_state_round_trips_through_json() {
    for name in traces()["schedulers"].as_object().unwrap().keys() {
        let metrics = scheduler_metrics(name);
        let metric = |i: usize| metrics.as_ref().map(|m| m[i]);
        for split in [0, 5, 13] {
            let mut reference = trace_scheduler(name);
            let mut resumed = trace_scheduler(name);
            for i in 0..split {
                reference.step(metric(i)).unwrap();
                resumed.step(metric(i)).unwrap();
            }
            let json = serde_json::to_string(&resumed).unwrap();
            let mut resumed: Scheduler = serde_json::from_str(&json).unwrap();
            assert_eq!(resumed, reference, "{name} after {split} steps: {json}");
            for i in split..30 {
                reference.step(metric(i)).unwrap();
                resumed.step(metric(i)).unwrap();
                assert_eq!(resumed.lr().to_bits(), reference.lr().to_bits(), "{name}");
            }
        }
    }
}

#[test]
fn parameter_without_gradient_is_untouched() {
    let problem = Problem::new(DType::F64);
    let p = problem.param();
    let q = Var::from_vec(vec![0.5f64, -0.25, 2.0], 3, &Device::Cpu).unwrap();
    let q_before = values(&q);
    let spec: OptimizerSpec =
        serde_json::from_value(json!({"type": "AdamW", "lr": 0.01, "weight_decay": 0.1})).unwrap();
    let params = vec![("p".to_string(), p.clone()), ("q".to_string(), q.clone())];
    let mut opt = optim::build("vae", &spec, params).unwrap();
    for _ in 0..3 {
        opt.step(&problem.grads(&p)).unwrap();
    }
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&values(&q)),
        bits(&q_before),
        "no decay without a gradient"
    );
    assert!(opt.state_tensors().iter().all(|(k, _)| k.starts_with("p.")));
    let state = opt.scalar_state();
    assert_eq!(state.steps.get("p"), Some(&3));
    assert_eq!(state.steps.get("q"), None);

    // q's first gradient gets a first step (bias corrections of step 1), as a fresh optimizer.
    let q_grads = (q.as_tensor().sqr().unwrap().sum_all().unwrap())
        .backward()
        .unwrap();
    let q_fresh = Var::from_vec(q_before, 3, &Device::Cpu).unwrap();
    let mut fresh = optim::build("vae", &spec, vec![("q".into(), q_fresh.clone())]).unwrap();
    let fresh_grads = q_fresh
        .as_tensor()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    opt.step(&q_grads).unwrap();
    fresh.step(&fresh_grads).unwrap();
    assert_eq!(bits(&values(&q)), bits(&values(&q_fresh)));
    assert_eq!(opt.scalar_state().steps.get("q"), Some(&1));
}

#[test]
fn spec_takes_pytorch_defaults_for_absent_fields() {
    let parse = |v: Value| serde_json::from_value::<OptimizerSpec>(v).unwrap();
    match parse(json!({"type": "AdamW"})) {
        OptimizerSpec::AdamW(c) => {
            assert_eq!(
                (c.lr, c.betas, c.eps, c.weight_decay),
                (1e-3, (0.9, 0.999), 1e-8, 0.01)
            );
            assert!(!c.amsgrad);
        }
        other => panic!("{other:?}"),
    }
    match parse(json!({"type": "Adam"})) {
        OptimizerSpec::Adam(c) => assert_eq!((c.betas, c.weight_decay), ((0.9, 0.999), 0.0)),
        other => panic!("{other:?}"),
    }
    match parse(
        json!({"type": "RMSprop", "lr": 1e-5, "alpha": 0.95, "momentum": 0.9, "centered": true}),
    ) {
        OptimizerSpec::RmsProp(c) => {
            assert_eq!(
                (c.lr, c.alpha, c.eps, c.momentum, c.weight_decay),
                (1e-5, 0.95, 1e-8, 0.9, 0.0)
            );
            assert!(c.centered);
        }
        other => panic!("{other:?}"),
    }
    match parse(json!({"type": "Lion"})) {
        OptimizerSpec::Lion(c) => {
            assert_eq!((c.lr, c.betas, c.weight_decay), (1e-4, (0.9, 0.99), 0.0))
        }
        other => panic!("{other:?}"),
    }
    match parse(json!({"type": "SGD", "lr": 0.1})) {
        OptimizerSpec::Sgd(c) => {
            assert_eq!((c.momentum, c.dampening, c.weight_decay), (0.0, 0.0, 0.0));
            assert!(!c.nesterov);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn spec_rejects_unknown_fields_and_kinds() {
    let err = serde_json::from_value::<OptimizerSpec>(json!({"type": "Adam", "alpha": 0.9}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("alpha"), "{err}");
    let err = serde_json::from_value::<OptimizerSpec>(json!({"type": "Adagrad"}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("Adagrad"), "{err}");
}

fn build_error(spec: Value) -> String {
    let spec: OptimizerSpec = serde_json::from_value(spec).unwrap();
    let p = Var::from_vec(vec![1.0f64], 1, &Device::Cpu).unwrap();
    match optim::build("vae", &spec, vec![("p".into(), p)]) {
        Ok(_) => panic!("{spec:?} was accepted"),
        Err(e) => e.to_string(),
    }
}

macro_rules! invalid_optimizer_tests {
    ($($test:ident: $spec:tt => $message:literal;)*) => {$(
        #[test]
        fn $test() {
            assert_eq!(build_error(json!($spec)), $message);
        }
    )*};
}

invalid_optimizer_tests! {
    rejects_momentum_of_one_and_a_half:
        {"type": "RMSprop", "momentum": 1.5}
        => "optimizer for \"vae\": momentum must be in [0, 1), got 1.5";
    rejects_zero_lr: {"type": "AdamW", "lr": 0.0} => "optimizer for \"vae\": lr must be > 0, got 0.0";
    rejects_negative_lr: {"type": "SGD", "lr": -0.1} => "optimizer for \"vae\": lr must be > 0, got -0.1";
    rejects_beta1_of_one:
        {"type": "Adam", "betas": [1.0, 0.999]} => "optimizer for \"vae\": betas[0] must be in [0, 1), got 1.0";
    rejects_negative_beta2:
        {"type": "Lion", "betas": [0.9, -0.1]} => "optimizer for \"vae\": betas[1] must be in [0, 1), got -0.1";
    rejects_zero_eps: {"type": "AdamW", "eps": 0.0} => "optimizer for \"vae\": eps must be > 0, got 0.0";
    rejects_zero_alpha: {"type": "RMSprop", "alpha": 0.0} => "optimizer for \"vae\": alpha must be in (0, 1], got 0.0";
    rejects_alpha_above_one:
        {"type": "RMSprop", "alpha": 1.01} => "optimizer for \"vae\": alpha must be in (0, 1], got 1.01";
    rejects_negative_weight_decay:
        {"type": "AdamW", "weight_decay": -0.01} => "optimizer for \"vae\": weight_decay must be >= 0, got -0.01";
    rejects_negative_sgd_momentum:
        {"type": "SGD", "momentum": -0.5} => "optimizer for \"vae\": momentum must be in [0, 1), got -0.5";
    rejects_dampening_above_one:
        {"type": "SGD", "momentum": 0.9, "dampening": 1.5} => "optimizer for \"vae\": dampening must be in [0, 1], got 1.5";
    rejects_nesterov_without_momentum:
        {"type": "SGD", "nesterov": true}
        => "optimizer for \"vae\": nesterov: Nesterov momentum requires momentum > 0 and dampening 0";
}

#[test]
fn rejects_nan_lr() {
    let spec = OptimizerSpec::Adam(optim::AdamConfig {
        lr: f64::NAN,
        ..Default::default()
    });
    let p = Var::from_vec(vec![1.0f64], 1, &Device::Cpu).unwrap();
    let err = optim::build("vae", &spec, vec![("p".into(), p)])
        .err()
        .unwrap()
        .to_string();
    assert_eq!(err, "optimizer for \"vae\": lr must be > 0, got NaN");
}

#[test]
fn rejects_empty_and_duplicate_parameters() {
    let spec = optimizer_spec("Adam");
    let err = optim::build("vae", &spec, vec![])
        .err()
        .unwrap()
        .to_string();
    assert_eq!(err, "optimizer for \"vae\": no parameters to optimize");
    let p = Var::from_vec(vec![1.0f64], 1, &Device::Cpu).unwrap();
    let params = vec![("w".to_string(), p.clone()), ("w".to_string(), p)];
    let err = optim::build("vae", &spec, params)
        .err()
        .unwrap()
        .to_string();
    assert_eq!(err, "optimizer for \"vae\": parameter \"w\" is given twice");
}

#[test]
fn load_state_rejects_mismatched_state() {
    let problem = Problem::new(DType::F64);
    let p = problem.param();
    let mut opt = optim::build(
        "vae",
        &optimizer_spec("AdamW"),
        vec![("p".into(), p.clone())],
    )
    .unwrap();
    opt.step(&problem.grads(&p)).unwrap();
    let state = opt.scalar_state();
    let tensors: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
    let fresh = || vec![("p".to_string(), problem.param())];
    let restore_err = |state: &OptimizerState, tensors: &HashMap<String, Tensor>| {
        optim::build("vae", &optimizer_spec("RMSprop_plain"), fresh())
            .unwrap()
            .load_state(state, tensors)
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        restore_err(&state, &tensors),
        "optimizer for \"vae\": cannot load state: saved state is for AdamW, this optimizer is RMSprop"
    );
    let mut missing = tensors.clone();
    missing.remove("p.exp_avg_sq");
    let err = optim::restore("vae", &state, &missing, fresh())
        .err()
        .unwrap()
        .to_string();
    assert_eq!(
        err,
        "optimizer for \"vae\": cannot load state: missing tensor \"p.exp_avg_sq\""
    );
    let mut extra = tensors.clone();
    extra.insert(
        "q.exp_avg".into(),
        Tensor::zeros(6, DType::F64, &Device::Cpu).unwrap(),
    );
    let err = optim::restore("vae", &state, &extra, fresh())
        .err()
        .unwrap()
        .to_string();
    assert_eq!(
        err,
        "optimizer for \"vae\": cannot load state: unexpected tensor \"q.exp_avg\""
    );
    let mut wrong_shape = tensors.clone();
    wrong_shape.insert(
        "p.exp_avg".into(),
        Tensor::zeros(5, DType::F64, &Device::Cpu).unwrap(),
    );
    let err = optim::restore("vae", &state, &wrong_shape, fresh())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("\"p.exp_avg\" has shape"), "{err}");
}

fn scheduler_error(spec: Value, initial_lr: f64) -> String {
    let spec: SchedulerSpec = serde_json::from_value(spec).unwrap();
    match Scheduler::build("vae", &spec, initial_lr, 100) {
        Ok(s) => panic!("{s:?} was accepted"),
        Err(e) => e.to_string(),
    }
}

macro_rules! invalid_scheduler_tests {
    ($($test:ident: $spec:tt, $lr:expr => $message:literal;)*) => {$(
        #[test]
        fn $test() {
            assert_eq!(scheduler_error(json!($spec), $lr), $message);
        }
    )*};
}

invalid_scheduler_tests! {
    cosine_rejects_zero_t_max:
        {"type": "CosineAnnealingLR", "T_max": 0}, 1e-3
        => "scheduler for \"vae\": CosineAnnealingLR T_max must be > 0, got 0.0";
    cosine_rejects_negative_eta_min:
        {"type": "CosineAnnealingLR", "eta_min": -1e-6}, 1e-3
        => "scheduler for \"vae\": CosineAnnealingLR eta_min must be >= 0, got -1e-6";
    cosine_rejects_eta_min_given_twice:
        {"type": "CosineAnnealingLR", "eta_min": 0.0, "eta_min_factor": 0.001}, 1e-3
        => "scheduler for \"vae\": CosineAnnealingLR takes eta_min or eta_min_factor, not both";
    scheduler_rejects_zero_initial_lr:
        {"type": "ExponentialLR", "gamma": 0.9}, 0.0
        => "scheduler for \"vae\": ExponentialLR initial lr must be > 0, got 0.0";
    exponential_rejects_zero_gamma:
        {"type": "ExponentialLR", "gamma": 0.0}, 1e-3
        => "scheduler for \"vae\": ExponentialLR gamma must be > 0, got 0.0";
    linear_rejects_zero_start_factor:
        {"type": "LinearLR", "start_factor": 0.0}, 1e-3
        => "scheduler for \"vae\": LinearLR start_factor must be in (0, 1], got 0.0";
    linear_rejects_end_factor_above_one:
        {"type": "LinearLR", "end_factor": 1.5}, 1e-3
        => "scheduler for \"vae\": LinearLR end_factor must be in [0, 1], got 1.5";
    constant_rejects_factor_above_one:
        {"type": "ConstantLR", "factor": 2.0}, 1e-3
        => "scheduler for \"vae\": ConstantLR factor must be in (0, 1], got 2.0";
    step_rejects_zero_step_size:
        {"type": "StepLR", "step_size": 0}, 1e-3
        => "scheduler for \"vae\": StepLR step_size must be > 0, got 0.0";
    plateau_rejects_factor_of_one:
        {"type": "ReduceLROnPlateau", "factor": 1.0}, 1e-3
        => "scheduler for \"vae\": ReduceLROnPlateau factor must be in [0, 1), got 1.0";
    plateau_rejects_negative_min_lr:
        {"type": "ReduceLROnPlateau", "min_lr": -1.0}, 1e-3
        => "scheduler for \"vae\": ReduceLROnPlateau min_lr must be >= 0, got -1.0";
}

#[test]
fn plateau_needs_a_metric() {
    let spec: SchedulerSpec = serde_json::from_value(json!({"type": "ReduceLROnPlateau"})).unwrap();
    let mut s = Scheduler::build("vae", &spec, 1e-3, 10).unwrap();
    assert!(s.step(None).is_err());
    s.step(Some(1.0)).unwrap();
}

#[test]
fn scheduler_spec_defaults_are_pytorch_defaults() {
    let lr_after = |spec: Value, steps: usize| {
        let spec: SchedulerSpec = serde_json::from_value(spec).unwrap();
        let mut s = Scheduler::build("vae", &spec, 1.0, 10).unwrap();
        for _ in 0..steps {
            s.step(Some(1.0)).unwrap();
        }
        s.lr()
    };
    // LinearLR: 1/3 -> 1 over 5 steps; ConstantLR: 1/3 for 5 steps; StepLR gamma 0.1.
    assert_eq!(lr_after(json!({"type": "LinearLR"}), 0), 1.0 / 3.0);
    assert!((lr_after(json!({"type": "LinearLR"}), 5) - 1.0).abs() < 1e-15);
    assert_eq!(lr_after(json!({"type": "ConstantLR"}), 4), 1.0 / 3.0);
    assert!((lr_after(json!({"type": "ConstantLR"}), 5) - 1.0).abs() < 1e-15);
    assert!((lr_after(json!({"type": "StepLR", "step_size": 2}), 2) - 0.1).abs() < 1e-15);
    // CosineAnnealingLR: T_max = the run's 10 steps, eta_min 0.
    assert!(lr_after(json!({"type": "CosineAnnealingLR"}), 10).abs() < 1e-15);
    // ReduceLROnPlateau: patience 10, factor 0.1 (a constant metric stalls from step 2).
    assert_eq!(lr_after(json!({"type": "ReduceLROnPlateau"}), 11), 1.0);
    assert!((lr_after(json!({"type": "ReduceLROnPlateau"}), 12) - 0.1).abs() < 1e-15);
}
