//! The training step's state: a NaN batch changes nothing, and saving and restoring every
//! piece of state continues bit-identically.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use fluxflow::model::{FluxModel, ModelConfig, Noise};
use fluxflow::params::ParamStore;
use fluxflow::train::factory::{optimizer_spec, scheduler_spec};
use fluxflow::train::optim;
use fluxflow::train::schedule::Scheduler;
use fluxflow::train::step::{vae_params, Skip, StepConfig, StepOutcome, TrainerState, VaeTrainer};
use fluxflow::weights::to_safetensors_bytes_exact;
use serde_json::json;

fn tiny() -> ModelConfig {
    ModelConfig {
        vae_dim: 8,
        vae_attn_layers: 1,
        vae_attn_heads: 2,
        flow_dim: 8,
        flow_heads: 2,
        flow_layers: 1,
        text_embedding_dim: 8,
        text_hidden: 8,
        ..ModelConfig::default()
    }
}

fn trainer(model: &FluxModel) -> VaeTrainer {
    let entry =
        json!({"type": "RMSprop", "lr": 1e-3, "alpha": 0.95, "momentum": 0.9, "centered": true});
    let spec = optimizer_spec("vae", Some(&entry), 1e-3).unwrap();
    let sched = scheduler_spec("vae", Some(&json!({"eta_min_factor": 0.001})), 0.1, 10).unwrap();
    let opt = optim::build("vae", &spec, vae_params(model)).unwrap();
    let sched = Scheduler::build("vae", &sched, spec.lr(), 10).unwrap();
    let config = StepConfig {
        kl_beta: 0.5,
        kl_warmup_steps: 3,
        kl_free_bits: 0.01,
        ..StepConfig::default()
    };
    VaeTrainer::new(config, model, opt, sched).unwrap()
}

fn batch(seed: u64) -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    let mut v = Vec::new();
    let mut x = seed.wrapping_mul(2654435761) | 1;
    for _ in 0..(2 * 3 * 32 * 32 + 2 * 8 * 4) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push((x % 2000) as f64 / 1000.0 - 1.0);
    }
    let img = Tensor::from_vec(v[..2 * 3 * 32 * 32].to_vec(), (2, 3, 32, 32), &dev).unwrap();
    let eps = Tensor::from_vec(v[2 * 3 * 32 * 32..].to_vec(), (2, 8, 2, 2), &dev).unwrap();
    (img, eps)
}

fn bits(tensors: Vec<(String, Tensor)>) -> Vec<(String, Vec<u64>)> {
    tensors
        .into_iter()
        .map(|(k, t)| {
            let v: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
            (k, v.into_iter().map(f64::to_bits).collect())
        })
        .collect()
}

fn train(t: &mut VaeTrainer, m: &FluxModel, steps: std::ops::Range<u64>) -> Vec<u64> {
    steps
        .map(|s| {
            let (img, eps) = batch(s);
            match t.step(m, &img, Noise::Given(&eps), s).unwrap() {
                StepOutcome::Trained(x) => x.total.to_bits(),
                StepOutcome::Skipped(why) => panic!("step {s}: {why}"),
            }
        })
        .collect()
}

#[test]
fn nan_batches_leave_weights_and_optimizer_state_bit_identical() {
    let model = FluxModel::fresh(&tiny(), DType::F64, &Device::Cpu, 4).unwrap();
    let mut t = trainer(&model);
    train(&mut t, &model, 1..3);
    let weights = bits(model.params.tensors(""));
    let state = bits(t.state_tensors());
    let scalars = serde_json::to_string(&t.state()).unwrap();

    let (img, eps) = batch(9);
    let nan_img = img
        .broadcast_mul(&Tensor::new(f64::NAN, &Device::Cpu).unwrap())
        .unwrap();
    let out = t.step(&model, &nan_img, Noise::Given(&eps), 3).unwrap();
    assert_eq!(out, StepOutcome::Skipped(Skip::NonFiniteInput));
    let inf_eps = (eps.ones_like().unwrap() * f64::INFINITY).unwrap();
    let out = t.step(&model, &img, Noise::Given(&inf_eps), 3).unwrap();
    assert!(
        matches!(out, StepOutcome::Skipped(Skip::NonFiniteLoss { .. })),
        "{out:?}"
    );

    assert_eq!(bits(model.params.tensors("")), weights);
    assert_eq!(bits(t.state_tensors()), state);
    let after: TrainerState = t.state();
    assert_eq!(after.skipped, 2);
    let mut before: TrainerState = serde_json::from_str(&scalars).unwrap();
    before.skipped = 2;
    assert_eq!(after, before);
}

#[test]
fn save_restore_continue_is_bit_identical_to_never_stopping() {
    let straight = FluxModel::fresh(&tiny(), DType::F64, &Device::Cpu, 5).unwrap();
    let mut t = trainer(&straight);
    let losses = train(&mut t, &straight, 1..6);

    let first = FluxModel::fresh(&tiny(), DType::F64, &Device::Cpu, 5).unwrap();
    let mut t1 = trainer(&first);
    let mut resumed = train(&mut t1, &first, 1..3);
    // Through bytes, as on disk: weights and state tensors as safetensors, scalars as JSON.
    let weights = to_safetensors_bytes_exact(&first.params.tensors("")).unwrap();
    let tensors = to_safetensors_bytes_exact(&t1.state_tensors()).unwrap();
    let scalars = serde_json::to_string(&t1.state()).unwrap();
    drop((t1, first));

    let load = |b: &[u8]| -> HashMap<String, Tensor> {
        candle_core::safetensors::load_buffer(b, &Device::Cpu).unwrap()
    };
    let store = ParamStore::loaded(load(&weights), vec![], DType::F64, &Device::Cpu);
    let second = FluxModel::build(&tiny(), store).unwrap();
    let mut t2 = trainer(&second);
    let state: TrainerState = serde_json::from_str(&scalars).unwrap();
    t2.load_state(&state, &load(&tensors)).unwrap();
    resumed.extend(train(&mut t2, &second, 3..6));

    assert_eq!(resumed, losses);
    assert_eq!(
        bits(second.params.tensors("")),
        bits(straight.params.tensors(""))
    );
    assert_eq!(bits(t2.state_tensors()), bits(t.state_tensors()));
}
