//! fp16's dynamic loss scaling through the training step (on the CPU, in float16).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::{parity, rel_l2, tiny16, tiny16_trainer};
use fluxflow::model::{FluxModel, Noise};
use fluxflow::train::precision::{LossScaler, MixedPrecision};
use fluxflow::train::step::{Skip, StepOutcome};
use fluxflow::weights::load_model;

fn load() -> FluxModel {
    load_model(&parity("tiny16.safetensors"), DType::F32, &Device::Cpu)
        .unwrap()
        .model
}

fn weights(m: &FluxModel) -> HashMap<String, Tensor> {
    m.params
        .tensors("diffuser.")
        .into_iter()
        .map(|(k, t)| (k, t.copy().unwrap()))
        .collect()
}

#[test]
fn fp16_steps_scale_the_loss_and_an_overflow_changes_nothing_but_the_scale() {
    let fx: HashMap<String, Tensor> = tiny16()
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F32).unwrap()))
        .collect();
    let (image, eps) = (&fx["fixture.image"], &fx["train.eps.1"]);

    // A clean fp16 step trains, with gradients close to float32's.
    let f32_model = load();
    let mut t32 = tiny16_trainer(&f32_model);
    let StepOutcome::Trained(m32) = t32.step(&f32_model, image, Noise::Given(eps), 1).unwrap()
    else {
        panic!("the float32 step was skipped")
    };
    let model = load();
    let mut t = tiny16_trainer(&model);
    t.config.mixed_precision = MixedPrecision::Fp16;
    let StepOutcome::Trained(m16) = t.step(&model, image, Noise::Given(eps), 1).unwrap() else {
        panic!("the fp16 step was skipped")
    };
    let rel =
        ((m16.grad_norm_before_clip - m32.grad_norm_before_clip) / m32.grad_norm_before_clip).abs();
    assert!(
        rel < 0.01,
        "unscaled gradient norm {} vs float32 {}",
        m16.grad_norm_before_clip,
        m32.grad_norm_before_clip
    );
    assert!(((m16.recon - m32.recon) / m32.recon).abs() < 1e-2);
    let state = t.state();
    let scaler = state
        .loss_scaler
        .clone()
        .expect("fp16 saves its loss scaler");
    assert_eq!((scaler.scale, scaler.good_steps), (65536.0, 1));
    let w1 = weights(&model);
    let w32 = weights(&f32_model);
    // The update against float32's: RMSprop's first step is sign-like, so elements whose
    // gradients are mostly rounding noise (the attention's key bias) may step the other way;
    // the update as a whole must point the same way and be as long.
    let w0 = weights(&load());
    let (mut dot, mut n16, mut n32) = (0f64, 0f64, 0f64);
    for (k, v) in &w1 {
        let a = (v - &w0[k]).unwrap().to_dtype(DType::F64).unwrap();
        let b = (&w32[k] - &w0[k]).unwrap().to_dtype(DType::F64).unwrap();
        let s = |t: &Tensor| -> f64 { t.sum_all().unwrap().to_scalar().unwrap() };
        dot += s(&(&a * &b).unwrap());
        n16 += s(&a.sqr().unwrap());
        n32 += s(&b.sqr().unwrap());
    }
    let cosine = dot / (n16 * n32).sqrt();
    assert!(
        cosine > 0.95,
        "fp16 update against float32's: cosine {cosine}"
    );
    assert!(
        ((n16 / n32).sqrt() - 1.0).abs() < 0.05,
        "update lengths {n16} vs {n32}"
    );

    // A scale that overflows float16: the step is skipped, the scale halves, nothing else moves.
    let mut hot = state.clone();
    hot.loss_scaler = Some(LossScaler {
        scale: 1e30,
        ..scaler.clone()
    });
    let tensors: HashMap<String, Tensor> = t.state_tensors().into_iter().collect();
    t.load_state(&hot, &tensors).unwrap();
    let before = t.state_tensors();
    match t.step(&model, image, Noise::Given(eps), 2).unwrap() {
        StepOutcome::Skipped(Skip::GradientOverflow { new_scale }) => assert_eq!(new_scale, 5e29),
        other => panic!("expected an overflow, got {other:?}"),
    }
    for (k, v) in weights(&model) {
        assert_eq!(rel_l2(&v, &w1[&k]), 0.0, "{k} moved on an overflowed step");
    }
    for ((k, a), (_, b)) in before.iter().zip(t.state_tensors().iter()) {
        assert_eq!(
            rel_l2(a, b),
            0.0,
            "{k} (optimizer/EMA state) moved on an overflowed step"
        );
    }
    let after = t.state();
    // Finding the loss scale is not a bad batch.
    assert_eq!(after.skipped, 0);
    assert_eq!(after.loss_scaler.unwrap().scale, 5e29);
    assert_eq!(after.optimizer, hot.optimizer);
}
