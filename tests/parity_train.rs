//! Three Phase 1 training steps from tiny16 in float64 against the PyTorch reference
//! (`train.*`, `sketch.train.*` and `steps` of tests/fixtures/tiny16.*): every gradient,
//! weight and EMA shadow against its sketch, and in full for the layers the fixture keeps
//! whole (tests/fixtures/README.md).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::{
    assert_close, assert_sketch_close, parity, rel_l2, sketch, sketch_error, splitmix64, tiny16,
    tiny16_settings as settings, tiny16_trainer as trainer, SKETCH_PROJECTIONS,
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
    let ema: HashMap<String, Tensor> = t.ema_shadow().into_iter().collect();
    let after = compare_group(&fx, "train.after.", &params);
    let shadows = compare_group(&fx, "train.ema.", &ema);
    assert!(
        after > 100 && shadows > 100,
        "{after} weights, {shadows} shadows compared"
    );
}

/// Every tensor of `group` (`train.after.` or `train.ema.`) in the fixture against `ours`:
/// its sketch always, the full tensor where the fixture keeps it. Returns how many.
fn compare_group(
    fx: &HashMap<String, Tensor>,
    group: &str,
    ours: &HashMap<String, Tensor>,
) -> usize {
    let (mut sketched, mut full) = (0, 0);
    for (k, v) in fx {
        if let Some(name) = k
            .strip_prefix("sketch.")
            .and_then(|k| k.strip_prefix(group))
        {
            let got = ours
                .get(name)
                .unwrap_or_else(|| panic!("{k}: we have no {name}"));
            assert_sketch_close(k, got, v, 1e-7);
            sketched += 1;
            if let Some(want) = fx.get(&k["sketch.".len()..]) {
                assert_close(&k["sketch.".len()..], got, want, 1e-7);
                full += 1;
            }
        }
    }
    let kept = fx.keys().filter(|k| k.starts_with(group)).count();
    assert_eq!(
        full, kept,
        "{group}: full tensors compared (each has a sketch)"
    );
    assert!(full >= 20, "{group}: {full} full tensors");
    sketched
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
    let (mut compared, mut full) = (0, 0);
    for (name, var) in vae_params(&model) {
        let key = format!("train.grad1.{name}");
        match (fx.get(&format!("sketch.{key}")), grads.get(var.as_tensor())) {
            (Some(want), Some(got)) => {
                assert_sketch_close(&key, got, want, 1e-7);
                if let Some(want) = fx.get(&key) {
                    assert_close(&key, got, want, 1e-7);
                    full += 1;
                }
                compared += 1;
            }
            (None, None) => assert!(name.contains("context_mixer"), "{name}"),
            (Some(_), None) => panic!("{name}: the reference has a gradient, we have none"),
            (None, Some(_)) => panic!("{name}: we have a gradient, the reference has none"),
        }
    }
    assert_eq!(compared, 134);
    let kept = fx.keys().filter(|k| k.starts_with("train.grad1.")).count();
    assert_eq!(full, kept, "full gradients compared");
    assert!(full >= 20, "{full} full gradients");
}

/// The sketches of tests/common match make_fixtures.py's (the same signs, the same sums) for
/// every tensor the fixture keeps whole, and a sketch comparison at 1e-7 fails where the full
/// comparison does: one element off by 2e-7 ||b||, the whole tensor scaled by 1 + 2e-7, an
/// error spread over every element of 2e-7 ||b||; it passes the same spread error of 0.5e-7.
#[test]
fn sketches_match_the_generator_and_catch_what_a_full_comparison_catches() {
    let fx = tiny16();
    let declared = settings()["sketch"]["projections"].as_u64().unwrap();
    assert_eq!(declared as usize, SKETCH_PROJECTIONS);
    let mut checked = 0;
    for (k, full) in &fx {
        if !["train.grad1.", "train.after.", "train.ema."]
            .iter()
            .any(|g| k.starts_with(g))
        {
            continue;
        }
        let stored: Vec<f64> = fx[&format!("sketch.{k}")].to_vec1().unwrap();
        let ours = sketch(full);
        assert_eq!(ours[0], stored[0], "{k}: element count");
        let scale = stored[2].max(f64::MIN_POSITIVE);
        for (j, (a, b)) in ours.iter().zip(&stored).enumerate() {
            assert!(
                (a - b).abs() <= 1e-13 * scale,
                "{k}: sketch entry {j}: {a} here, {b} in the fixture"
            );
        }
        checked += 1;
    }
    assert!(checked >= 60, "{checked} full tensors");

    let key = "train.grad1.diffuser.compressor.token_attn.1.ff.0.weight";
    let (b, stored) = (&fx[key], &fx[&format!("sketch.{key}")]);
    let bv: Vec<f64> = b.flatten_all().unwrap().to_vec1().unwrap();
    let nb = bv.iter().map(|x| x * x).sum::<f64>().sqrt();
    let tensor = |v: Vec<f64>| Tensor::from_vec(v, b.shape(), &Device::Cpu).unwrap();
    let tol = 1e-7;

    let mut one = bv.clone();
    one[1234] += 2e-7 * nb;
    let one = tensor(one);
    let e = sketch_error(key, &one, stored);
    assert!(rel_l2(&one, b) > tol);
    // One element: every projection sees exactly that error.
    assert!((e.estimate / 2e-7 - 1.0).abs() < 1e-6, "{e:?}");

    let scaled = tensor(bv.iter().map(|x| x * (1.0 + 2e-7)).collect());
    let e = sketch_error(key, &scaled, stored);
    assert!(rel_l2(&scaled, b) > tol);
    assert!(e.norm > tol && e.estimate > tol, "{e:?}");

    // A pseudo-random error over every element, nearly orthogonal to b (the norm barely moves):
    // only the projections see it.
    let noise: Vec<f64> = (0..bv.len() as u64)
        .map(|i| (splitmix64((0xD1CE << 32) | i) >> 11) as f64 / (1u64 << 53) as f64 - 0.5)
        .collect();
    let nn = noise.iter().map(|x| x * x).sum::<f64>().sqrt();
    for c in [2.0, 0.5] {
        let spread = tensor(
            bv.iter()
                .zip(&noise)
                .map(|(x, d)| x + d / nn * c * tol * nb)
                .collect(),
        );
        let e = sketch_error(key, &spread, stored);
        let full = rel_l2(&spread, b);
        assert!((full / (c * tol) - 1.0).abs() < 1e-6, "{full:e}");
        assert!(e.norm < 0.3 * tol, "{e:?}");
        // K = 64 projections estimate ||a - b|| within about 9% (one standard deviation).
        assert!((e.estimate / full - 1.0).abs() < 0.3, "{e:?} for {full:e}");
        assert_eq!(e.worst() < tol, full < tol, "{e:?} for {full:e}");
    }
}
