//! Three Phase 1 training steps from tiny16 in float64 against the PyTorch reference
//! (`train.*` and `steps` of ../shared/parity/tiny16.*).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::{
    assert_close, parity, tiny16, tiny16_settings as settings, tiny16_trainer as trainer,
};
use fluxflow::model::{FluxModel, Noise};
use fluxflow::train::step::{vae_params, StepConfig, StepMetrics, StepOutcome, VaeTrainer};
use fluxflow::weights::load_model;

fn run_step(
    t: &mut VaeTrainer,
    m: &FluxModel,
    fx: &HashMap<String, Tensor>,
    s: u64,
) -> StepMetrics {
    let eps = &fx[&format!("train.eps.{s}")];
    match t
        .step(m, &fx["fixture.image"], Noise::Given(eps), s)
        .unwrap()
    {
        StepOutcome::Trained(metrics) => metrics,
        StepOutcome::Skipped(why) => panic!("step {s} skipped: {why}"),
    }
}

fn load() -> FluxModel {
    load_model(&parity("tiny16.safetensors"), DType::F64, &Device::Cpu)
        .unwrap()
        .model
}

#[test]
fn three_steps_match_reference_scalars_weights_and_ema() {
    let fx = tiny16();
    let model = load();
    let mut t = trainer(&model);
    let expected = settings()["steps"].as_array().unwrap().clone();
    for (i, exp) in expected.iter().enumerate() {
        let got = run_step(&mut t, &model, &fx, i as u64 + 1);
        let pairs = [
            ("freq_l1", got.freq_l1),
            ("mse", got.mse),
            ("recon", got.recon),
            ("kl", got.kl),
            ("kl_beta", got.kl_beta),
            ("w_recon", got.w_recon),
            ("w_kl", got.w_kl),
            ("total", got.total),
            ("grad_norm_before_clip", got.grad_norm_before_clip),
            ("lr_after", got.lr_after),
        ];
        for (name, value) in pairs {
            let want = exp[name].as_f64().unwrap();
            let rel = ((value - want) / want).abs();
            assert!(
                rel < 1e-9,
                "step {}: {name} = {value}, reference {want} (rel {rel:e})",
                i + 1
            );
        }
        let frac = exp["kl_clamped_fraction"].as_f64().unwrap();
        assert_eq!(
            got.kl_clamped_fraction,
            frac,
            "step {}: clamped fraction",
            i + 1
        );
    }
    let params: HashMap<String, Tensor> = model.params.tensors("diffuser.").into_iter().collect();
    let mut after = 0;
    for (k, v) in &fx {
        if let Some(name) = k.strip_prefix("train.after.") {
            assert_close(k, &params[name], v, 1e-7);
            after += 1;
        }
    }
    let ema: HashMap<String, Tensor> = t.ema_shadow().into_iter().collect();
    let mut shadows = 0;
    for (k, v) in &fx {
        if let Some(name) = k.strip_prefix("train.ema.") {
            assert_close(k, &ema[name], v, 1e-7);
            shadows += 1;
        }
    }
    assert!(
        after > 100 && shadows > 100,
        "{after} weights, {shadows} shadows compared"
    );
}

#[test]
fn first_step_gradients_match_reference() {
    let fx = tiny16();
    let model = load();
    let s = &settings()["train"];
    let config = StepConfig {
        kl_beta: s["kl_beta"].as_f64().unwrap(),
        kl_warmup_steps: s["kl_warmup_steps"].as_u64().unwrap(),
        kl_free_bits: s["kl_free_bits"].as_f64().unwrap(),
        ..StepConfig::default()
    };
    let grads = fluxflow::train::step::loss_gradients(
        &config,
        &model,
        &fx["fixture.image"],
        Noise::Given(&fx["train.eps.1"]),
        1,
    )
    .unwrap();
    let mut compared = 0;
    for (name, var) in vae_params(&model) {
        let key = format!("train.grad1.{name}");
        match (fx.get(&key), grads.get(var.as_tensor())) {
            (Some(want), Some(got)) => {
                assert_close(&key, got, want, 1e-7);
                compared += 1;
            }
            (None, None) => assert!(name.contains("context_mixer"), "{name}"),
            (Some(_), None) => panic!("{name}: the reference has a gradient, we have none"),
            (None, Some(_)) => panic!("{name}: we have a gradient, the reference has none"),
        }
    }
    assert_eq!(compared, 134);
}
