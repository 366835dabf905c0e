//! `fluxflow bench`: training-step throughput of a model on random images (median seconds per
//! step, images per second, peak resident memory), for comparing builds and devices.

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::cli::{BenchArgs, Switch};
use crate::config::limits::MAX_BENCH_STEPS;
use crate::config::{Config, OptimFile, Overrides, QUICKSTART};
use crate::model::{FluxModel, Noise};
use crate::train::optim;
use crate::train::precision::MixedPrecision;
use crate::train::schedule::Scheduler;
use crate::train::step::{vae_params, StepOutcome, VaeTrainer};

/// The most warm-up steps `bench` runs while fp16 loss scaling skips them (16 halvings take a
/// fresh scale of 2^16 to 1).
const MAX_WARMUP: usize = 20;

/// The Phase 1 optimizer settings (`configs/optim-config-p1.json`): what the benchmark's default
/// model trains with (RMSprop, centered, with momentum), as the reference's benchmark does.
const PHASE1_OPTIM: &str = include_str!("../../configs/optim-config-p1.json");

/// Peak resident memory of this process in MiB (Linux), if known.
fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub fn run(args: &BenchArgs) -> Result<String> {
    if args.steps == 0 {
        anyhow::bail!("--steps 0: the benchmark needs at least one timed step");
    }
    if args.steps > MAX_BENCH_STEPS {
        anyhow::bail!("--steps {}: must be at most {MAX_BENCH_STEPS}", args.steps);
    }
    for (flag, v) in [
        ("--batch", args.batch),
        ("--width", args.width),
        ("--height", args.height),
    ] {
        if v == 0 {
            anyhow::bail!("{flag} 0: must be at least 1");
        }
    }
    if let Some(mp) = args.mixed_precision.filter(|mp| *mp != MixedPrecision::No) {
        // Without a configuration the device is the flag's alone (the CPU by default).
        let on_cpu = args.device.as_deref().is_none_or(|d| d.trim() == "cpu");
        if on_cpu && args.config.is_none() {
            anyhow::bail!(
                "--mixed-precision {mp} runs on CUDA only: add --device cuda (the benchmark \
                 runs on the CPU without it), or leave --mixed-precision out"
            );
        }
    }
    // The benchmark's settings go through the configuration, whose checks name their flags.
    let mut flags = Vec::new();
    if let Some(c) = args.checkpointing {
        let on = c == Switch::On;
        flags.push((
            format!("model.use_gradient_checkpointing={on}"),
            format!("--checkpointing {}", if on { "on" } else { "off" }),
        ));
    }
    if let Some(mp) = args.mixed_precision {
        flags.push((
            format!("training.mixed_precision={mp}"),
            format!("--mixed-precision {mp}"),
        ));
    }
    let overrides = Overrides {
        device: args.device.clone(),
        flags,
        ..Overrides::default()
    };
    let cfg = match &args.config {
        Some(p) => Config::load(p, &overrides)?,
        None if args.quickstart => Config::parse(QUICKSTART, "<embedded quickstart>", &overrides)?,
        // The Phase 1 model's dimensions.
        None => Config::parse(
            "data: {data_path: unused}\n",
            "<phase 1 defaults>",
            &overrides,
        )?,
    };
    let device = cfg.training.device.open()?;
    let tf32 = device.is_cuda() && args.tf32 == Switch::On;
    #[cfg(feature = "cuda")]
    candle_core::cuda::set_gemm_reduced_precision_f32(tf32);
    let dtype = cfg.training.dtype.dtype();
    let model_cfg = cfg.model_config();
    // The VAE halves the image `downscales` times and the expander doubles it back.
    let multiple = 1usize << model_cfg.downscales;
    for (flag, v) in [("--width", args.width), ("--height", args.height)] {
        if v % multiple != 0 {
            anyhow::bail!(
                "{flag} {v}: must be a multiple of {multiple} (the model halves it {} times)",
                model_cfg.downscales
            );
        }
    }
    crate::memory::check_model_fits(&model_cfg, dtype, !args.forward_only, &device)?;
    let model = FluxModel::fresh(&model_cfg, dtype, &device, 0)?;
    let act_dtype = cfg.step_config().mixed_precision.compute_dtype(dtype);
    crate::memory::check_fits(
        &format!(
            "a {} of {} image(s) of {}x{}",
            if args.forward_only {
                "forward pass"
            } else {
                "training step"
            },
            args.batch,
            args.width,
            args.height
        ),
        crate::memory::activation_bytes(
            &model_cfg,
            args.batch,
            args.height,
            args.width,
            act_dtype,
            !args.forward_only,
        ),
        &device,
    )?;
    // The VAE's optimizer as a run of this configuration would build it; without a
    // configuration, the Phase 1 settings.
    let optim = match (&args.config, &cfg.optimization.optim_sched_config) {
        (None, _) if !args.quickstart => OptimFile::parse(PHASE1_OPTIM)?,
        (_, None) => OptimFile::default(),
        (_, Some(p)) => {
            OptimFile::load(p).with_context(|| "optimization.optim_sched_config".to_string())?
        }
    };
    let spec = optim.optimizer("vae", cfg.training.lr)?;
    let opt = optim::build("vae", &spec, vae_params(&model))?;
    let sched = Scheduler::build(
        "vae",
        &optim.scheduler("vae", cfg.training.lr_min, 1000)?,
        spec.lr(),
        1000,
    )?;
    let step_cfg = cfg.step_config();
    let recompute = step_cfg.recompute;
    let mixed = step_cfg.mixed_precision;
    let mut trainer = VaeTrainer::new(step_cfg, &model, opt, sched)?;
    let (b, h, w) = (args.batch, args.height, args.width);
    let images = Tensor::rand(-1f32, 1.0, (b, 3, h, w), &device)?.to_dtype(dtype)?;
    let mut rng = StdRng::seed_from_u64(0);
    // Grown step by step: never allocated by a number the user gives.
    let mut times = Vec::new();
    let compute = mixed.compute_dtype(dtype);
    // Warm-up: one step, or with fp16 as many as the loss scale needs to settle (a fresh scale
    // of 2^16 overflows at first and is halved per skipped step, as in a training run's first
    // steps), so that the timed steps are the ones a run spends its time on.
    let mut warmup = 0usize;
    let mut warming = true;
    let mut skipped = 0usize;
    let mut step_no = 0u64;
    loop {
        let t = Instant::now();
        step_no += 1;
        let applied = if args.forward_only {
            // What `reconstruct` and the samples run: encode and decode, no gradients.
            let x = images.to_dtype(compute)?;
            let enc = model.compressor.forward(&x, Noise::Sampled(&mut rng))?;
            let out = model
                .expander
                .forward(&enc.packed, cfg.training.train_spade)?;
            // Waits for the device: the value is read back.
            out.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
            true
        } else {
            let out = trainer.step(&model, &images, Noise::Sampled(&mut rng), step_no)?;
            !matches!(out, StepOutcome::Skipped(_))
        };
        let elapsed = t.elapsed().as_secs_f64();
        if warming {
            warmup += 1;
            warming = !applied;
            if warming && warmup >= MAX_WARMUP {
                anyhow::bail!(
                    "each of the first {MAX_WARMUP} benchmark steps was skipped \
                     (non-finite gradients at every loss scale tried)"
                );
            }
            continue;
        }
        if !applied {
            skipped += 1;
        }
        times.push(elapsed);
        if times.len() == args.steps {
            break;
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let rss = peak_rss_mib();
    #[cfg(feature = "cuda")]
    let gpu_mib =
        crate::device::cuda_pool::peak_bytes(&device)?.map(|b| b as f64 / (1u64 << 20) as f64);
    #[cfg(not(feature = "cuda"))]
    let gpu_mib: Option<f64> = None;
    // The CPU threads the step ran on (`--threads`, see src/main.rs): the pool's, and the
    // parts candle splits a matrix product into (one per physical core by default).
    let threads = rayon::current_num_threads();
    let matmul_threads = candle_core::utils::get_num_threads();
    if args.json {
        let round = |v: Option<f64>| v.map(|m| (m * 10.0).round() / 10.0);
        return Ok(serde_json::json!({
            "impl": "fluxflow",
            "device": format!("{device:?}"),
            "dtype": format!("{dtype:?}").to_lowercase(),
            "tf32": tf32,
            "threads": threads,
            "matmul_threads": matmul_threads,
            "batch": b,
            "width": w,
            "height": h,
            "vae_dim": cfg.model.vae_dim,
            "checkpointing": recompute,
            "optimizer": spec.kind(),
            "mixed_precision": mixed.name(),
            "forward_only": args.forward_only,
            "unverified_cuda": crate::kernels::unverified_cuda_paths(),
            "steps": times.len(),
            "warmup_steps": warmup,
            "skipped_steps": skipped,
            "median_step_s": median,
            "min_step_s": times[0],
            "max_step_s": times[times.len() - 1],
            "images_per_s": b as f64 / median,
            "peak_rss_mb": round(rss),
            "peak_gpu_mb": round(gpu_mib),
        })
        .to_string());
    }
    let mut mem = rss
        .map(|m| format!(", peak resident memory {m:.0} MiB"))
        .unwrap_or_default();
    if let Some(g) = gpu_mib {
        mem += &format!(", peak GPU memory {g:.0} MiB");
    }
    let plural = if threads == 1 { "" } else { "s" };
    let threads = if matmul_threads == threads {
        format!("{threads} thread{plural}")
    } else {
        format!("{threads} thread{plural} ({matmul_threads} per matrix product)")
    };
    Ok(format!(
        "{}, batch {b} of {w}x{h}, vae_dim {}, {dtype:?} on {device:?}, {threads}, {}, \
         checkpointing {}, mixed precision {mixed}: median {median:.3} s \
         (min {:.3}, max {:.3}, {} steps{}), {:.2} images/s{mem}",
        if args.forward_only {
            "forward pass"
        } else {
            "training step"
        },
        cfg.model.vae_dim,
        spec.kind(),
        if recompute { "on" } else { "off" },
        times[0],
        times[times.len() - 1],
        times.len(),
        match (warmup, skipped) {
            (1, 0) => String::new(),
            (w, 0) => format!(" after {w} warm-up steps"),
            (w, s) => format!(" after {w} warm-up steps, {s} skipped by loss scaling"),
        },
        b as f64 / median,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::OptimizerSpec;

    #[test]
    fn the_default_benchmark_trains_with_the_phase1_rmsprop() {
        let spec = OptimFile::parse(PHASE1_OPTIM)
            .unwrap()
            .optimizer("vae", 1e-6)
            .unwrap();
        let OptimizerSpec::RmsProp(c) = spec else {
            panic!("Phase 1's VAE optimizer is {}", spec.kind());
        };
        assert!(
            c.centered && c.momentum == 0.9 && c.alpha == 0.95 && c.lr == 1e-5,
            "{c:?}"
        );
    }
}
