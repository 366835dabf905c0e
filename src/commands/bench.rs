//! `fluxflow bench`: training-step throughput of a model on random images (median seconds per
//! step, images per second, peak resident memory), for comparing builds and devices.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::parse_device;
use crate::cli::BenchArgs;
use crate::config::{Config, Overrides, QUICKSTART};
use crate::model::{FluxModel, Noise};
use crate::train::factory::{optimizer_spec, scheduler_spec};
use crate::train::optim;
use crate::train::schedule::Scheduler;
use crate::train::step::{vae_params, StepOutcome, VaeTrainer};

/// Peak resident memory of this process in MiB (Linux), if known.
fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub fn run(args: &BenchArgs) -> Result<String> {
    let overrides = Overrides {
        device: args.device.clone(),
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
    let device = parse_device(&cfg.training.device)?;
    let dtype = if cfg.training.dtype == "f64" {
        DType::F64
    } else {
        DType::F32
    };
    let model = FluxModel::fresh(&cfg.model_config(), dtype, &device, 0)?;
    let spec = optimizer_spec("vae", None, 1e-5)?;
    let opt = optim::build("vae", &spec, vae_params(&model))?;
    let sched = Scheduler::build(
        "vae",
        &scheduler_spec("vae", None, 0.1, 1000)?,
        spec.lr(),
        1000,
    )?;
    let mut trainer = VaeTrainer::new(cfg.step_config(), &model, opt, sched)?;
    let (b, h, w) = (args.batch, args.height, args.width);
    let images = Tensor::rand(-1f32, 1.0, (b, 3, h, w), &device)?.to_dtype(dtype)?;
    let mut rng = StdRng::seed_from_u64(0);
    let mut times = Vec::new();
    for step in 0..args.steps + 1 {
        let t = Instant::now();
        let out = trainer.step(&model, &images, Noise::Sampled(&mut rng), step as u64 + 1)?;
        if let StepOutcome::Skipped(why) = out {
            anyhow::bail!("the benchmark step was skipped: {why}");
        }
        if step > 0 {
            times.push(t.elapsed().as_secs_f64()); // the first step warms up
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let mem = peak_rss_mib()
        .map(|m| format!(", peak resident memory {m:.0} MiB"))
        .unwrap_or_default();
    Ok(format!(
        "training step, batch {b} of {w}x{h}, vae_dim {}, {dtype:?} on {device:?}: median {median:.3} s \
         (min {:.3}, max {:.3}, {} steps), {:.2} images/s{mem}",
        cfg.model.vae_dim,
        times[0],
        times[times.len() - 1],
        times.len(),
        b as f64 / median,
    ))
}
