//! GPU checks (built with `--features cuda`, run by scripts/gpu-check.sh on a machine with an
//! NVIDIA GPU; CI has none and never builds this file's tests):
//! - the tiny16 forward fixtures on CUDA in float32 with TF32 off, within 1e-4 of the reference;
//! - three training steps on CUDA within 1e-4 of the same steps on the CPU (float32);
//! - the cuDNN convolutions (forward, input and weight gradients, transposed) against the CPU
//!   ops: float32 within 1e-5, bfloat16 within 1e-2 (relative L2).
#![cfg(feature = "cuda")]

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use common::{assert_close, parity, rel_l2, tiny16, tiny16_settings, tiny16_trainer};
use fluxflow::checkpoint::load_model;
use fluxflow::model::{FluxModel, Noise};
use fluxflow::train::step::{StepMetrics, StepOutcome};

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

fn three_steps(dev: &Device) -> (Vec<StepMetrics>, HashMap<String, Tensor>) {
    let fx = fixtures(DType::F32, dev);
    let model = load(DType::F32, dev);
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
    let (cpu, cpu_w) = three_steps(&Device::Cpu);
    let (gpu, gpu_w) = three_steps(&dev);
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
    assert!(cpu_w.len() > 100);
    for (k, c) in &cpu_w {
        let g = &gpu_w[k];
        if !k.ends_with("attn.in_proj_bias") {
            assert_close(k, g, c, 1e-4);
            continue;
        }
        // [q; k; v] biases. Softmax ignores a shift shared by a row of scores, so the key bias
        // has no gradient: its updates are float32 rounding noise that RMSprop scales up to
        // step size, different on every device (float64 moves it by ~1e-14, float32 on the CPU
        // by ~1e-5). Compare q and v; bound the key bias's noise by 1e-4.
        let d = c.dim(0).unwrap() / 3;
        for (part, i) in [("q", 0), ("v", 2)] {
            let name = format!("{k}[{part}]");
            assert_close(
                &name,
                &g.narrow(0, i * d, d).unwrap(),
                &c.narrow(0, i * d, d).unwrap(),
                1e-4,
            );
        }
        for t in [c, g] {
            let kb = t.narrow(0, d, d).unwrap();
            let norm: f32 = kb
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .sqrt()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(
                norm < 1e-4,
                "{k}[k]: the key bias moved by {norm} (a real gradient?)"
            );
        }
    }
}

/// Value and gradients of `f(x, w)` against a random cotangent, on `dev` in `dtype`.
fn value_and_grads(
    f: &dyn Fn(&Tensor, &Tensor) -> Tensor,
    x: &Tensor,
    w: &Tensor,
    r: &Tensor,
    dtype: DType,
    dev: &Device,
) -> [Tensor; 3] {
    let xv = Var::from_tensor(&x.to_dtype(dtype).unwrap().to_device(dev).unwrap()).unwrap();
    let wv = Var::from_tensor(&w.to_dtype(dtype).unwrap().to_device(dev).unwrap()).unwrap();
    let y = f(xv.as_tensor(), wv.as_tensor());
    let r = r.to_dtype(dtype).unwrap().to_device(dev).unwrap();
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let back = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
    };
    [
        back(&y),
        back(g.get(xv.as_tensor()).expect("input gradient")),
        back(g.get(wv.as_tensor()).expect("weight gradient")),
    ]
}

fn compare_conv(
    name: &str,
    f: &dyn Fn(&Tensor, &Tensor) -> Tensor,
    xs: (usize, usize, usize, usize),
    ws: (usize, usize, usize, usize),
) {
    let dev = gpu();
    let cpu = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, xs, &cpu).unwrap();
    let w = Tensor::randn(0f32, 0.2, ws, &cpu).unwrap();
    let y = f(&x, &w);
    let r = Tensor::randn(0f32, 1.0, y.dims(), &cpu).unwrap();
    let want = value_and_grads(f, &x, &w, &r, DType::F32, &cpu);
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
        let got = value_and_grads(f, &x, &w, &r, dtype, &dev);
        for (part, (g, c)) in ["value", "input gradient", "weight gradient"]
            .iter()
            .zip(got.iter().zip(&want))
        {
            let err = rel_l2(g, c);
            assert!(
                err < tol,
                "{name} {dtype:?} {part}: relative L2 {err:e} > {tol:e}"
            );
        }
    }
}

#[test]
fn cudnn_convolutions_match_cpu() {
    // (kernel, stride, padding, dilation, input h, input w): the model's layers and odd cases.
    for (k, s, p, d, h, w) in [
        (3, 1, 1, 1, 9, 12),
        (16, 2, 7, 1, 16, 17),
        (5, 1, 4, 2, 9, 7),
        (1, 1, 0, 1, 3, 5),
        (4, 2, 1, 1, 15, 8),
    ] {
        let f = move |x: &Tensor, wt: &Tensor| fluxflow::kernels::conv2d(x, wt, p, s, d).unwrap();
        compare_conv(
            &format!("conv2d k{k} s{s} p{p} d{d} {h}x{w}"),
            &f,
            (2, 5, h, w),
            (6, 5, k, k),
        );
    }
    // (kernel, stride, padding, output padding, dilation): the expander's layers and odd cases.
    for (k, s, p, op, d) in [
        (16, 2, 7, 0, 1),
        (4, 2, 1, 1, 1),
        (3, 1, 1, 0, 2),
        (5, 1, 4, 0, 2),
    ] {
        let f = move |x: &Tensor, wt: &Tensor| {
            fluxflow::kernels::conv_transpose2d(x, wt, p, op, s, d).unwrap()
        };
        compare_conv(
            &format!("conv_transpose2d k{k} s{s} p{p} op{op} d{d}"),
            &f,
            (2, 5, 7, 6),
            (5, 3, k, k),
        );
    }
}
