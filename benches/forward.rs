//! One forward pass (encode with a sampled latent + decode with SPADE context) of the Phase 1
//! model, batch 2 of 64x64, on the CPU. Prints the median and the spread of the runs.
//!
//! `cargo bench --bench forward [-- RUNS]`

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use fluxflow::model::{FluxModel, ModelConfig, Noise};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(7);
    let device = Device::Cpu;
    let model = FluxModel::fresh(&ModelConfig::default(), DType::F32, &device, 0)?;
    let img = Tensor::rand(-1f32, 1.0, (2, 3, 64, 64), &device)?;
    let mut rng = StdRng::seed_from_u64(0);
    let mut once = || -> anyhow::Result<f64> {
        let t = Instant::now();
        let enc = model.compressor.forward(&img, Noise::Sampled(&mut rng))?;
        let y = model.expander.forward(&enc.packed, true)?;
        y.sum_all()?.to_scalar::<f32>()?;
        Ok(t.elapsed().as_secs_f64())
    };
    once()?; // warm-up
    let mut times = (0..runs)
        .map(|_| once())
        .collect::<anyhow::Result<Vec<_>>>()?;
    times.sort_by(f64::total_cmp);
    println!(
        "phase1 forward, batch 2 of 64x64, cpu f32, {} threads: median {:.3} s (min {:.3}, max {:.3}, {runs} runs)",
        candle_core::utils::get_num_threads(),
        times[runs / 2],
        times[0],
        times[runs - 1]
    );
    Ok(())
}
