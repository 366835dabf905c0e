//! Recomputation in the backward pass (gradient checkpointing) changes no gradient: the first
//! training step's gradients of tiny16 in float64 with and without it.

mod common;

use candle_core::{DType, Device};
use common::{parity, rel_l2, tiny16};
use fluxflow::model::Noise;
use fluxflow::train::step::{loss_gradients, vae_params, StepConfig};
use fluxflow::weights::load_model;

#[test]
fn recomputation_changes_no_gradient_f64() {
    let fx = tiny16();
    let model = load_model(&parity("tiny16.safetensors"), DType::F64, &Device::Cpu)
        .unwrap()
        .model;
    let grads = |recompute: bool, use_spade: bool| {
        let config = StepConfig {
            kl_free_bits: 2e-4,
            recompute,
            use_spade,
            ..StepConfig::default()
        };
        let noise = Noise::Given(&fx["train.eps.1"]);
        loss_gradients(&config, &model, &fx["fixture.image"], noise, 1).unwrap()
    };
    for use_spade in [true, false] {
        let (on, off) = (grads(true, use_spade), grads(false, use_spade));
        let mut compared = 0;
        for (name, var) in vae_params(&model) {
            match (on.get(var.as_tensor()), off.get(var.as_tensor())) {
                (Some(a), Some(b)) => {
                    let e = rel_l2(a, b);
                    assert!(e < 1e-12, "{name} (spade {use_spade}): relative L2 {e:e}");
                    compared += 1;
                }
                (None, None) => {}
                (a, b) => panic!(
                    "{name}: gradient with recomputation {}, without {}",
                    a.is_some(),
                    b.is_some()
                ),
            }
        }
        // Every trained tensor but the never-called context mixer; SPADE's too with context.
        let expected = if use_spade { 134 } else { 110 };
        assert_eq!(compared, expected, "gradients compared (spade {use_spade})");
    }
}
