//! GPU checks (built with `--features cuda`, run by scripts/gpu-check.sh on a machine with an
//! NVIDIA GPU; CI has none and never builds this file's tests):
//! - the tiny16 forward fixtures on CUDA in float32 with TF32 off, within 1e-4 of the reference;
//! - three training steps on CUDA within 1e-4 of the same steps on the CPU (float32);
//! - the cuDNN convolutions (forward, input and weight gradients, transposed) against the CPU
//!   ops: float32 within 1e-5, bfloat16 within 1e-2 (relative L2);
//! - the fused optimizer, EMA and gradient-norm kernels against the CPU loops (bit for bit; the
//!   norm within 1e-12): `unverified_*`, run only with `FLUXFLOW_CUDA_UNVERIFIED=1`.
//!
//! `scripts/gpu-check.sh` runs this binary twice: with the CUDA paths of the last verified GPU
//! run (skipping `unverified_*`), then with `FLUXFLOW_CUDA_UNVERIFIED=1` (everything), so the
//! training and attention tests cover both.
#![cfg(feature = "cuda")]

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use common::{
    assert_close, parity, rel_l2, tiny16, tiny16_settings, tiny16_trainer, tiny16_trainer_lr,
};
use fluxflow::kernels::softmax::softmax_last;
use fluxflow::model::{FluxModel, Noise};
use fluxflow::train::step::{StepMetrics, StepOutcome};
use fluxflow::weights::load_model;

fn gpu() -> Device {
    let dev = Device::new_cuda(0).expect("a CUDA GPU (these tests run on the GPU machine)");
    // Full float32: the parity tolerances are for exact float32 arithmetic.
    candle_core::cuda::set_gemm_reduced_precision_f32(false);
    dev
}

fn fixtures(dtype: DType, dev: &Device) -> HashMap<String, Tensor> {
    tiny16()
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(dtype).unwrap().to_device(dev).unwrap()))
        .collect()
}

fn load(dtype: DType, dev: &Device) -> FluxModel {
    load_model(&parity("tiny16.safetensors"), dtype, dev)
        .expect("tiny16 loads")
        .model
}

#[test]
fn tiny16_forward_fixtures_on_gpu_f32() {
    let dev = gpu();
    let fx = fixtures(DType::F32, &dev);
    let f = |k: &str| &fx[&format!("fixture.{k}")];
    let m = load(DType::F32, &dev);
    let tol = 1e-4;
    let enc = m
        .compressor
        .forward(f("image"), Noise::Given(f("eps")))
        .unwrap();
    assert_close("mu", &enc.mu, f("mu"), tol);
    assert_close("logvar", &enc.logvar, f("logvar"), tol);
    assert_close("packed", &enc.packed, f("packed"), tol);
    let mean = m.compressor.forward(f("image"), Noise::Mean).unwrap();
    assert_close("packed_mean", &mean.packed, f("packed_mean"), tol);
    let ctx = m.expander.forward(&enc.packed, true).unwrap();
    assert_close("recon_ctx", &ctx, f("recon_ctx"), tol);
    let noctx = m.expander.forward(&enc.packed, false).unwrap();
    assert_close("recon_noctx", &noctx, f("recon_noctx"), tol);
    let rmean = m.expander.forward(&mean.packed, true).unwrap();
    assert_close("recon_mean", &rmean, f("recon_mean"), tol);
    let flow = m
        .flow_processor
        .forward(f("packed"), f("flow_text"), f("flow_t"))
        .unwrap();
    assert_close("flow_out", &flow, f("flow_out"), tol);
    let text = m.text.forward(f("text_hidden")).unwrap();
    assert_close("text_out", &text, f("text_out"), tol);
}

fn three_steps(dtype: DType, dev: &Device) -> (Vec<StepMetrics>, HashMap<String, Tensor>) {
    let fx = fixtures(dtype, dev);
    let model = load(dtype, dev);
    let mut t = tiny16_trainer(&model);
    let mut metrics = Vec::new();
    for s in 1..=3u64 {
        let eps = &fx[&format!("train.eps.{s}")];
        match t
            .step(&model, &fx["fixture.image"], Noise::Given(eps), s)
            .unwrap()
        {
            StepOutcome::Trained(m) => metrics.push(m),
            StepOutcome::Skipped(why) => panic!("step {s} skipped: {why}"),
        }
    }
    let weights = model
        .params
        .tensors("diffuser.")
        .into_iter()
        .map(|(k, v)| (k, v.to_device(&Device::Cpu).unwrap()))
        .collect();
    (metrics, weights)
}

#[test]
fn three_training_steps_on_gpu_follow_cpu_f32() {
    let dev = gpu();
    assert!(tiny16_settings()["steps"].as_array().unwrap().len() >= 3);
    let (cpu, cpu_w) = three_steps(DType::F32, &Device::Cpu);
    let (gpu, gpu_w) = three_steps(DType::F32, &dev);
    for (i, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
        for (name, a, b) in [
            ("freq_l1", c.freq_l1, g.freq_l1),
            ("mse", c.mse, g.mse),
            ("kl", c.kl, g.kl),
            ("total", c.total, g.total),
            (
                "grad_norm_before_clip",
                c.grad_norm_before_clip,
                g.grad_norm_before_clip,
            ),
            ("lr_after", c.lr_after, g.lr_after),
        ] {
            let rel = ((a - b) / a).abs();
            assert!(
                rel < 1e-4,
                "step {}: {name} cpu {a} gpu {b} (rel {rel:e})",
                i + 1
            );
        }
    }
    // Weights: within 1e-4 of the CPU's float32 run, except where float32 itself cannot be:
    // tensors whose gradients are mostly rounding noise (the attention's key bias gets none at
    // all: softmax ignores a shift shared by a row of scores), which RMSprop scales up to full
    // steps. There the bound is three times the CPU's own float32-vs-float64 difference.
    let (_, exact_w) = three_steps(DType::F64, &Device::Cpu);
    assert!(cpu_w.len() > 100);
    let (mut num, mut den) = (0f64, 0f64);
    // Each tensor's errors, the worst printed first: GPU vs CPU, and each against float64 (a
    // GPU less accurate than the CPU shows as GPU-vs-float64 above CPU-vs-float64 throughout).
    let mut rows: Vec<(f64, f64, f64, &String)> = cpu_w
        .iter()
        .map(|(k, c)| {
            let exact = exact_w[k].to_dtype(DType::F32).unwrap();
            (
                rel_l2(&gpu_w[k], c),
                rel_l2(c, &exact),
                rel_l2(&gpu_w[k], &exact),
                k,
            )
        })
        .collect();
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (gc, ce, ge, k) in rows.iter().take(12) {
        eprintln!("{gc:.3e} GPU vs CPU | CPU vs f64 {ce:.3e} | GPU vs f64 {ge:.3e} | {k}");
    }
    for (k, c) in &cpu_w {
        let g = &gpu_w[k];
        let floor = 3.0 * rel_l2(c, &exact_w[k].to_dtype(DType::F32).unwrap());
        let err = rel_l2(g, c);
        assert!(
            err < floor.max(1e-4),
            "{k}: GPU vs CPU {err:e} (float32 vs float64 on the CPU: {:e})",
            floor / 3.0
        );
        let d: f64 = (g - c)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar()
            .unwrap();
        let n: f64 = c
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar()
            .unwrap();
        num += d;
        den += n;
    }
    let all = (num / den).sqrt();
    assert!(all < 1e-4, "all weights together: relative L2 {all:e}");
}

/// The value of `f(inputs)` and each input's gradient against the cotangent `r`, computed on
/// `dev` in `dtype`, as float32 CPU tensors: [value, d input 0, d input 1, ...].
fn value_and_grads(
    f: &dyn Fn(&[Tensor]) -> Tensor,
    inputs: &[&Tensor],
    r: &Tensor,
    dtype: DType,
    dev: &Device,
) -> Vec<Tensor> {
    let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(dev).unwrap();
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&on(t)).unwrap())
        .collect();
    let args: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&args);
    let g = (&y * &on(r))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let back = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
    };
    std::iter::once(back(&y))
        .chain(
            vars.iter()
                .map(|v| back(g.get(v.as_tensor()).expect("a gradient"))),
        )
        .collect()
}

/// Checks `f` on the GPU against the CPU, value and every input's gradient (relative L2): in
/// float32 within 1e-5, in bfloat16 and float16 within 1e-2. The CPU computes in bfloat16 where
/// its op has it (`cpu_bf16`), else (and for float16, which the CPU ops lack) in float32.
fn check_against_cpu(
    what: &str,
    f: &dyn Fn(&[Tensor]) -> Tensor,
    inputs: &[&Tensor],
    cpu_bf16: bool,
) {
    let (dev, cpu) = (gpu(), Device::Cpu);
    let y = f(&inputs.iter().map(|t| (*t).clone()).collect::<Vec<_>>());
    let r = Tensor::randn(0f32, 1.0, y.dims(), &cpu).unwrap();
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2), (DType::F16, 1e-2)] {
        let cpu_dtype = if cpu_bf16 && dtype != DType::F16 {
            dtype
        } else {
            DType::F32
        };
        let want = value_and_grads(f, inputs, &r, cpu_dtype, &cpu);
        let got = value_and_grads(f, inputs, &r, dtype, &dev);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let part = if i == 0 {
                "value".to_string()
            } else {
                format!("gradient {}", i - 1)
            };
            let e = rel_l2(g, w);
            assert!(
                e < tol,
                "{what} {dtype:?} {part}: relative L2 {e:e} > {tol:e}"
            );
        }
    }
}

#[test]
fn cudnn_convolutions_match_cpu() {
    let cpu = Device::Cpu;
    let randn =
        |dims: (usize, usize, usize, usize), sd: f32| Tensor::randn(0f32, sd, dims, &cpu).unwrap();
    // (kernel, stride, padding, dilation, input h, input w): the model's layers and odd cases.
    for (k, s, p, d, h, w) in [
        (3, 1, 1, 1, 9, 12),
        (16, 2, 7, 1, 16, 17),
        (5, 1, 4, 2, 9, 7),
        (1, 1, 0, 1, 3, 5),
        (4, 2, 1, 1, 15, 8),
    ] {
        let f = move |t: &[Tensor]| fluxflow::kernels::conv2d(&t[0], &t[1], p, s, d).unwrap();
        let (x, wt) = (randn((2, 5, h, w), 1.0), randn((6, 5, k, k), 0.2));
        let what = format!("conv2d k{k} s{s} p{p} d{d} {h}x{w}");
        // candle's CPU convolution has no fast bfloat16 path: compare with float32.
        check_against_cpu(&what, &f, &[&x, &wt], false);
    }
    // (kernel, stride, padding, output padding, dilation): the expander's layers and odd cases.
    for (k, s, p, op, d) in [
        (16, 2, 7, 0, 1),
        (4, 2, 1, 1, 1),
        (3, 1, 1, 0, 2),
        (5, 1, 4, 0, 2),
    ] {
        let f = move |t: &[Tensor]| {
            fluxflow::kernels::conv_transpose2d(&t[0], &t[1], p, op, s, d).unwrap()
        };
        let (x, wt) = (randn((2, 5, 7, 6), 1.0), randn((5, 3, k, k), 0.2));
        let what = format!("conv_transpose2d k{k} s{s} p{p} op{op} d{d}");
        check_against_cpu(&what, &f, &[&x, &wt], false);
    }
}

#[test]
fn fused_bezier_kernel_matches_cpu() {
    use fluxflow::model::{BezierActivation, PreAct};
    let kinds = [PreAct::Sigmoid, PreAct::Silu, PreAct::Tanh, PreAct::None];
    for dims in [
        &[2usize, 10, 7, 9][..],
        &[1, 5, 1, 1],
        &[3, 4, 15],
        &[6, 20],
    ] {
        let x = Tensor::randn(0f32, 1.5, dims, &Device::Cpu).unwrap();
        for t_pre in kinds {
            for p_pre in kinds {
                let act = BezierActivation::new(t_pre, p_pre);
                let f = move |t: &[Tensor]| act.forward(&t[0]).unwrap();
                let what = format!("Bezier {dims:?} {t_pre:?}/{p_pre:?}");
                check_against_cpu(&what, &f, &[&x], true);
            }
        }
    }
}

/// 50 steps on the fixture image, returning each step's reconstruction loss. `phase1` uses the
/// Phase 1 loss (KL weight 1e-4, no free bits) instead of tiny16's (KL weight 0.5 with free
/// bits at 2e-4, where rounding decides which KL elements are clamped and the run forks).
fn fifty_steps(
    dev: &Device,
    mp: fluxflow::train::precision::MixedPrecision,
    phase1: bool,
) -> Vec<f64> {
    let fx = fixtures(DType::F32, dev);
    let model = load(DType::F32, dev);
    // 1e-4 (Phase 1 trains at 1e-5): at tiny16's 1e-3, RMSprop's sign-like steps make 50
    // steps on one image chaotic, so any rounding difference, float32's too, grows.
    let mut t = tiny16_trainer_lr(&model, Some(1e-4));
    t.config.mixed_precision = mp;
    if phase1 {
        t.config.kl_beta = 1e-4;
        t.config.kl_free_bits = 0.0;
    }
    (1..=50u64)
        .map(|s| {
            let noise = Noise::Given(&fx["train.eps.1"]);
            match t.step(&model, &fx["fixture.image"], noise, s).unwrap() {
                StepOutcome::Trained(m) => m.recon,
                StepOutcome::Skipped(why) => panic!("{mp} step {s} skipped: {why}"),
            }
        })
        .collect()
}

fn worst_gap(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(a, b)| ((a - b) / a).abs())
        .fold(0f64, f64::max)
}

#[test]
fn bf16_training_follows_f32_for_50_steps() {
    use fluxflow::train::precision::MixedPrecision;
    let dev = gpu();
    // The first step's gradients: bfloat16 rounding, not a different computation.
    let fx = fixtures(DType::F32, &dev);
    let model = load(DType::F32, &dev);
    let grads = |mp: MixedPrecision| {
        let config = fluxflow::train::step::StepConfig {
            mixed_precision: mp,
            ..Default::default()
        };
        let noise = Noise::Given(&fx["train.eps.1"]);
        fluxflow::train::step::loss_gradients(&config, &model, &fx["fixture.image"], noise, 1)
            .unwrap()
    };
    let (g32, g16) = (grads(MixedPrecision::No), grads(MixedPrecision::Bf16));
    let (mut num, mut den, mut worst) = (0f64, 0f64, Vec::new());
    for (name, var) in fluxflow::train::step::vae_params(&model) {
        let (Some(a), Some(b)) = (g16.get(var.as_tensor()), g32.get(var.as_tensor())) else {
            continue;
        };
        let sq = |t: &Tensor| -> f64 {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let (d, n) = (sq(&(a - b).unwrap()), sq(b));
        num += d;
        den += n;
        worst.push(((d / n.max(1e-300)).sqrt(), name));
    }
    worst.sort_by(|x, y| y.0.total_cmp(&x.0));
    let all = (num / den).sqrt();
    eprintln!(
        "first-step gradients, bf16 vs f32: all {all:e}; worst {:?}",
        &worst[..4]
    );
    assert!(all < 0.05, "bf16 gradients differ from f32 by {all:e}");

    let tiny = (
        fifty_steps(&dev, MixedPrecision::No, false),
        fifty_steps(&dev, MixedPrecision::Bf16, false),
    );
    let (f32_loss, bf16_loss) = (
        fifty_steps(&dev, MixedPrecision::No, true),
        fifty_steps(&dev, MixedPrecision::Bf16, true),
    );
    let worst = worst_gap(&f32_loss, &bf16_loss);
    eprintln!(
        "recon loss, Phase 1 loss: f32 {:.5} -> {:.5}, bf16 {:.5} -> {:.5}, worst gap {worst:e}; \
         tiny16 loss: f32 {:.5} -> {:.5}, bf16 {:.5} -> {:.5}, worst gap {:e}",
        f32_loss[0],
        f32_loss[49],
        bf16_loss[0],
        bf16_loss[49],
        tiny.0[0],
        tiny.0[49],
        tiny.1[0],
        tiny.1[49],
        worst_gap(&tiny.0, &tiny.1)
    );
    assert!(
        f32_loss[49] < f32_loss[0] * 0.5,
        "the float32 run should learn: {} -> {}",
        f32_loss[0],
        f32_loss[49]
    );
    // Measured on an H200 (2026-11-27): the losses end 1.5% apart (0.0900 and 0.0914 from
    // 0.691); step by step the gap peaks at 7.5% during the steep descent, where a small shift
    // in time is a large relative difference. The end point is what is asserted; the step-wise
    // gap is printed (see docs/performance.md).
    let end = ((f32_loss[49] - bf16_loss[49]) / f32_loss[49]).abs();
    assert!(end < 0.02, "bf16 ends {end:e} away from f32 after 50 steps");
}

#[test]
fn fused_softmax_kernel_matches_cpu() {
    for dims in [&[2usize, 8, 64, 64][..], &[3, 1], &[5, 4097]] {
        let x = Tensor::randn(0f32, 3.0, dims, &Device::Cpu).unwrap();
        let f = |t: &[Tensor]| softmax_last(&t[0]).unwrap();
        check_against_cpu(&format!("softmax {dims:?}"), &f, &[&x], true);
    }
}

#[test]
fn chunked_attention_matches_cpu() {
    use fluxflow::kernels::attention::attention;
    let cpu = Device::Cpu;
    // Budgets of one chunk, of several with a short last one, and of one query per chunk.
    for (q, kv, budget) in [
        (
            (2usize, 8usize, 256usize, 16usize),
            (2usize, 8usize, 256usize, 16usize),
            1usize << 24,
        ),
        ((2, 8, 300, 16), (2, 8, 256, 16), 2 * 8 * 256 * 7),
        ((1, 2, 9, 8), (1, 2, 5, 8), 1),
    ] {
        let x = |d| Tensor::randn(0f32, 1.0, d, &cpu).unwrap();
        let (tq, tk, tv) = (x(q), x(kv), x(kv));
        let f = move |t: &[Tensor]| attention(&t[0], &t[1], &t[2], 0.25, budget).unwrap();
        check_against_cpu(
            &format!("attention {q:?}/{kv:?}/{budget}"),
            &f,
            &[&tq, &tk, &tv],
            false,
        );
    }
}

#[test]
fn fused_group_norm_kernel_matches_cpu() {
    use fluxflow::kernels::group_norm::group_norm;
    let cpu = Device::Cpu;
    for (dims, groups) in [
        (&[2usize, 96, 33, 17][..], 8),
        (&[1, 6, 1, 1], 2),
        (&[2, 128, 64, 64], 32),
        (&[3, 6, 5], 6),
    ] {
        let c = dims[1];
        let x = (Tensor::randn(0f32, 2.0, dims, &cpu).unwrap() + 0.7).unwrap();
        let w = Tensor::randn(1f32, 0.3, c, &cpu).unwrap();
        let b = Tensor::randn(0f32, 0.3, c, &cpu).unwrap();
        let f = move |t: &[Tensor]| group_norm(&t[0], groups, &t[1], &t[2], 1e-5).unwrap();
        check_against_cpu(
            &format!("GroupNorm {dims:?}/{groups}"),
            &f,
            &[&x, &w, &b],
            true,
        );
    }
}

#[test]
fn fp16_training_with_loss_scaling_follows_f32_for_50_steps() {
    use fluxflow::train::precision::MixedPrecision;
    let dev = gpu();
    let f32_loss = fifty_steps(&dev, MixedPrecision::No, true);
    let fp16_loss = fifty_steps(&dev, MixedPrecision::Fp16, true);
    eprintln!(
        "recon loss, Phase 1 loss: f32 {:.5} -> {:.5}, fp16 {:.5} -> {:.5}, worst gap {:e}",
        f32_loss[0],
        f32_loss[49],
        fp16_loss[0],
        fp16_loss[49],
        worst_gap(&f32_loss, &fp16_loss)
    );
    let end = ((f32_loss[49] - fp16_loss[49]) / f32_loss[49]).abs();
    assert!(end < 0.02, "fp16 ends {end:e} away from f32 after 50 steps");
}

/// Bits of every element of an f32 or f64 tensor (copied to the CPU), NaN included.
fn bits(t: &Tensor) -> Vec<u64> {
    let t = t.flatten_all().unwrap().to_device(&Device::Cpu).unwrap();
    match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(|v| v.to_bits() as u64)
            .collect(),
        _ => t
            .to_vec1::<f64>()
            .unwrap()
            .into_iter()
            .map(f64::to_bits)
            .collect(),
    }
}

/// The one-launch optimizer, EMA and norm kernels run only with the unverified CUDA paths
/// switched on (`FLUXFLOW_CUDA_UNVERIFIED=1`, as `scripts/gpu-check.sh`'s second pass sets it);
/// the tests of those kernels are named `unverified_*` and fail without it.
fn require_unverified_paths() {
    assert!(
        fluxflow::kernels::unverified_cuda_paths(),
        "run with {}=1 (scripts/gpu-check.sh's second pass); the first pass skips unverified_*",
        fluxflow::kernels::UNVERIFIED_CUDA_ENV
    );
}

/// Three fused steps of `rule` on the CPU and on the GPU from the same parameter and gradients
/// (with and without a clipping factor): both devices must take the fused path (one kernel per
/// parameter on the GPU) and agree bit for bit, parameter and buffers, after every step.
fn fused_update_on_gpu_is_the_cpus<R: fluxflow::train::optim::UpdateRule>(rule: &R, dtype: DType) {
    use fluxflow::train::optim::Buffers;
    let (cpu, dev) = (Device::Cpu, gpu());
    // More elements than one block's grid-stride share; some gradients zero.
    let n = 300_001;
    let p0 = (Tensor::randn(0f32, 1.0, n, &cpu).unwrap() * 0.1)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    for scale in [None, Some(0.37)] {
        let a = Var::from_tensor(&p0).unwrap();
        let b = Var::from_tensor(&p0.to_device(&dev).unwrap()).unwrap();
        let (mut ba, mut bb) = (Buffers::new(), Buffers::new());
        for step in 1..=3u64 {
            let g = Tensor::randn(0f32, 1.0, n, &cpu).unwrap();
            let mask = Tensor::rand(0f32, 1.0, n, &cpu).unwrap().ge(0.1).unwrap();
            let g = (g * mask.to_dtype(DType::F32).unwrap())
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let lr = 1e-3 * step as f64;
            let on_cpu = rule.update_fused(lr, step, &a, &g, scale, &mut ba).unwrap();
            let g_gpu = g.to_device(&dev).unwrap();
            let on_gpu = rule
                .update_fused(lr, step, &b, &g_gpu, scale, &mut bb)
                .unwrap();
            let what = format!("{:?} {dtype:?} scale {scale:?} step {step}", rule.to_spec());
            assert!(
                on_cpu && on_gpu,
                "{what}: fused path cpu {on_cpu} gpu {on_gpu}"
            );
            assert!(
                b.as_tensor().device().is_cuda(),
                "{what}: parameter left the GPU"
            );
            assert_eq!(
                bits(a.as_tensor()),
                bits(b.as_tensor()),
                "{what}: parameter"
            );
            assert_eq!(ba.keys().collect::<Vec<_>>(), bb.keys().collect::<Vec<_>>());
            for (k, t) in &ba {
                assert!(bb[k].device().is_cuda(), "{what}: buffer {k} left the GPU");
                assert_eq!(bits(t), bits(&bb[k]), "{what}: buffer {k}");
            }
        }
    }
}

#[test]
fn unverified_fused_optimizer_kernels_match_cpu_bit_for_bit() {
    require_unverified_paths();
    use fluxflow::train::optim::{AdamConfig, AdamWConfig, RmsPropConfig};
    let rms = |momentum, centered, weight_decay| RmsPropConfig {
        lr: 1e-3,
        alpha: 0.95,
        eps: 1e-8,
        weight_decay,
        momentum,
        centered,
    };
    for dtype in [DType::F32, DType::F64] {
        for (m, c, wd) in [
            (0.9, true, 0.0),
            (0.0, false, 0.0),
            (0.9, false, 0.01),
            (0.0, true, 0.01),
        ] {
            fused_update_on_gpu_is_the_cpus(&rms(m, c, wd), dtype);
        }
        // alpha 0.4: the lerp's weight 0.6 takes its other branch.
        let other = RmsPropConfig {
            alpha: 0.4,
            ..rms(0.5, true, 0.0)
        };
        fused_update_on_gpu_is_the_cpus(&other, dtype);
        for (betas, wd, amsgrad) in [
            ((0.9, 0.999), 0.0, false),
            ((0.9, 0.95), 0.01, true),
            ((0.3, 0.9), 0.1, false),
        ] {
            let (lr, eps) = (1e-3, 1e-8);
            let adam = AdamConfig {
                lr,
                betas,
                eps,
                weight_decay: wd,
                amsgrad,
            };
            fused_update_on_gpu_is_the_cpus(&adam, dtype);
            let adamw = AdamWConfig {
                lr,
                betas,
                eps,
                weight_decay: wd,
                amsgrad,
            };
            fused_update_on_gpu_is_the_cpus(&adamw, dtype);
        }
    }
}

#[test]
fn unverified_fused_ema_and_gradient_norm_kernels_match_cpu() {
    require_unverified_paths();
    use fluxflow::train::optim::fused::{ema, sum_squares};
    let (cpu, dev) = (Device::Cpu, gpu());
    for dtype in [DType::F32, DType::F64] {
        let t = |n: usize| {
            Tensor::randn(0f32, 1.0, n, &cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let (s, p) = (t(300_001), t(300_001));
        let want = ema(&s, &p, 0.999).unwrap().unwrap();
        let (sg, pg) = (s.to_device(&dev).unwrap(), p.to_device(&dev).unwrap());
        let got = ema(&sg, &pg, 0.999).unwrap().expect("the CUDA EMA kernel");
        assert!(got.device().is_cuda());
        assert_eq!(bits(&want), bits(&got), "EMA {dtype:?}");
        // The norm over tensors of several sizes (one of them empty).
        let ts = [t(5), t(0), t(1 << 20), t(300_001)];
        let refs: Vec<&Tensor> = ts.iter().collect();
        let want = sum_squares(&refs)
            .unwrap()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let on_gpu: Vec<Tensor> = ts.iter().map(|x| x.to_device(&dev).unwrap()).collect();
        let refs: Vec<&Tensor> = on_gpu.iter().collect();
        let got = sum_squares(&refs)
            .unwrap()
            .expect("the CUDA sum of squares");
        assert!(got.device().is_cuda());
        let got = got.to_device(&cpu).unwrap().to_scalar::<f64>().unwrap();
        assert!(
            ((got - want) / want).abs() < 1e-12,
            "sum of squares {dtype:?}: GPU {got} CPU {want}"
        );
    }
}
