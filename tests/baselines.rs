//! ReLU/SiLU/GELU baselines (`model.activation`): the parameter-matched width, and each
//! baseline built, trained, saved, resumed, reconstructed and evaluated through the binary.

mod common;

use std::path::{Path, PathBuf};

use common::{bin, text};

use fluxflow::model::{Activation, FluxModel, ModelConfig};
use serde_json::Value;

fn tmpdir(name: &str) -> PathBuf {
    common::fresh_dir("base", name)
}

const BASELINES: [Activation; 3] = [Activation::Relu, Activation::Silu, Activation::Gelu];

#[test]
fn the_counting_store_gives_the_phase1_vae_parameter_count() {
    // compressor + expander in tests/fixtures/p1-128-manifest.json: 12,580,553 + 94,073,551.
    let n = FluxModel::vae_parameter_count(&ModelConfig::default()).unwrap();
    assert_eq!(n, 12_580_553 + 94_073_551);
}

#[test]
fn the_matched_width_is_within_two_percent_of_the_bezier_count() {
    let small = |vae_dim, downscales, heads| ModelConfig {
        vae_dim,
        downscales,
        upscales: downscales,
        vae_attn_layers: 1,
        vae_attn_heads: heads,
        ..ModelConfig::default()
    };
    for dims in [
        ModelConfig::default(),
        small(8, 2, 2),
        small(16, 4, 2),
        small(32, 3, 4),
    ] {
        let bezier = FluxModel::vae_parameter_count(&dims).unwrap() as f64;
        for act in BASELINES {
            let m = FluxModel::matched_width_mult(&dims, act).unwrap();
            let cfg = ModelConfig {
                activation: act,
                baseline_width_mult: m,
                ..dims.clone()
            };
            let n = FluxModel::vae_parameter_count(&cfg).unwrap() as f64;
            let unwidened = ModelConfig {
                baseline_width_mult: 1.0,
                ..cfg.clone()
            };
            let narrow = FluxModel::vae_parameter_count(&unwidened).unwrap() as f64;
            assert!(
                (n - bezier).abs() / bezier < 0.02,
                "{act} vae_dim {}: {n} vs Bezier {bezier} (x{m})",
                dims.vae_dim
            );
            // The plain baseline is much smaller: the widening is what matches it.
            assert!(
                narrow < 0.6 * bezier && m > 1.5,
                "{act}: {narrow} vs {bezier}, x{m}"
            );
        }
    }
}

fn config(dir: &Path, act: Activation) -> PathBuf {
    let text = format!(
        "model: {{vae_dim: 8, downscales: 2, feature_maps_dim: 8, text_embedding_dim: 8,
         vae_attn_layers: 1, vae_attn_heads: 2, flow_heads: 2, flow_layers: 1, text_hidden: 8,
         activation: {act}}}
data:
  synthetic: {{count: 4, width: 32, height: 32, seed: 1}}
training:
  n_epochs: 10
  batch_size: 2
  workers: 1
  lr: 0.002
  seed: 3
output:
  output_path: {}
  log_interval: 1
  checkpoint_save_interval: 2
  samples_per_checkpoint: 100
  keep_last: 3
",
        dir.join("run").display()
    );
    let p = dir.join("config.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

/// (global_step, step recon loss) of every training row.
fn step_losses(run: &Path) -> Vec<(u64, String)> {
    let log = std::fs::read_to_string(run.join("graph/training_metrics.jsonl")).unwrap();
    log.lines()
        .filter_map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let loss = v["extras"].get("step_vae_loss")?;
            Some((v["global_step"].as_u64().unwrap(), loss.to_string()))
        })
        .collect()
}

#[test]
fn each_baseline_trains_saves_resumes_and_reconstructs() {
    for act in BASELINES {
        let dir = tmpdir(act.name());
        let cfg = config(&dir, act);
        let o = bin()
            .args([
                "train",
                "--config",
                cfg.to_str().unwrap(),
                "--max-steps",
                "4",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{act}: {}", text(&o));
        let run = dir.join("run");
        let first = step_losses(&run);
        assert_eq!(first.len(), 4, "{act}: {first:?}");

        // The checkpoint records the activation; info reads it and prints both counts.
        let model = run.join("flxflow_final.safetensors");
        let o = bin()
            .args(["info", model.to_str().unwrap()])
            .output()
            .unwrap();
        let info = text(&o);
        assert!(o.status.success(), "{info}");
        assert!(
            info.contains(&format!("activation: {act} baseline")),
            "{info}"
        );
        assert!(
            info.contains("the Bezier VAE of these dimensions"),
            "{info}"
        );

        // Resume from step 2 (the newest checkpoint removed) reproduces steps 3 and 4.
        std::fs::remove_dir_all(run.join("checkpoints/step-00000004")).unwrap();
        let o = bin()
            .args(["resume", "--output", run.to_str().unwrap()])
            .output()
            .unwrap();
        let t = text(&o);
        assert!(o.status.success() && t.contains("at step 2"), "{act}: {t}");
        let after = step_losses(&run);
        assert_eq!(
            after[after.len() - 2..],
            first[2..],
            "{act}: resumed losses differ"
        );

        // reconstruct and eval read the activation from the checkpoint.
        let img = dir.join("in.png");
        image::RgbImage::from_fn(32, 32, |x, y| {
            image::Rgb([(x * 8) as u8, (y * 8) as u8, 90])
        })
        .save(&img)
        .unwrap();
        let o = bin()
            .args([
                "reconstruct",
                img.to_str().unwrap(),
                "-c",
                model.to_str().unwrap(),
                "-o",
                dir.join("out.png").to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            o.status.success() && text(&o).contains("PSNR"),
            "{act}: {}",
            text(&o)
        );
        let o = bin()
            .args([
                "eval",
                "-c",
                model.to_str().unwrap(),
                "--data",
                run.join("synthetic-data").to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            o.status.success() && text(&o).contains("mean of 4"),
            "{act}: {}",
            text(&o)
        );
    }
}

#[test]
fn a_bezier_model_file_keeps_the_reference_format() {
    // No activation metadata: the reference's loader and older fluxflow files read it as is.
    let dir = tmpdir("bezier");
    let cfg = ModelConfig {
        vae_dim: 8,
        downscales: 2,
        upscales: 2,
        vae_attn_layers: 1,
        vae_attn_heads: 2,
        flow_dim: 8,
        flow_heads: 2,
        flow_layers: 1,
        text_embedding_dim: 8,
        text_hidden: 8,
        ..ModelConfig::default()
    };
    let model =
        FluxModel::fresh(&cfg, candle_core::DType::F32, &candle_core::Device::Cpu, 0).unwrap();
    let path = dir.join("m.safetensors");
    fluxflow::weights::save_model(&model, &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["__metadata__"], serde_json::json!({"format": "pt"}));
    let (act, m) = fluxflow::weights::read_architecture(&path).unwrap();
    assert_eq!((act, m), (Activation::Bezier, 1.0));

    // A baseline's file records its activation and width, and loads back as that baseline.
    let gelu = ModelConfig {
        activation: Activation::Gelu,
        baseline_width_mult: 2.5,
        ..cfg
    };
    let model =
        FluxModel::fresh(&gelu, candle_core::DType::F32, &candle_core::Device::Cpu, 0).unwrap();
    fluxflow::weights::save_model(&model, &path).unwrap();
    let loaded =
        fluxflow::weights::load_model(&path, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    // (The attention head count is not recorded in a checkpoint; the rest is.)
    let expected = ModelConfig {
        vae_attn_heads: loaded.model.config.vae_attn_heads,
        ..gelu
    };
    assert_eq!(loaded.model.config, expected);
}

#[test]
fn activation_and_width_settings_are_checked_by_name() {
    use fluxflow::config::{Config, Overrides};
    let parse = |model: &str| {
        let text = format!("model: {{{model}}}\ndata: {{synthetic: {{count: 2, width: 32, height: 32, seed: 0}}}}\n");
        Config::parse(&text, "test.yaml", &Overrides::default())
    };
    let e = format!("{:#}", parse("activation: tanh").unwrap_err());
    assert!(e.contains("activation") && e.contains("tanh"), "{e}");
    let e = format!(
        "{:#}",
        parse("activation: relu, baseline_width_mult: 0").unwrap_err()
    );
    assert!(e.contains("model.baseline_width_mult"), "{e}");
    let cfg = parse("activation: silu, baseline_width_mult: 2.0").unwrap();
    assert_eq!(cfg.model_config().baseline_width_mult, 2.0);
    let cfg = parse("activation: gelu").unwrap();
    let m = cfg.model_config().baseline_width_mult;
    assert_eq!(
        m,
        FluxModel::matched_width_mult(&cfg.model_config(), Activation::Gelu).unwrap()
    );
    // The reference's model_type must agree with the activation.
    assert!(parse("model_type: bezier").is_ok());
    assert!(parse("model_type: baseline, activation: relu").is_ok());
    let e = format!("{:#}", parse("model_type: baseline").unwrap_err());
    assert!(e.contains("model.model_type") && e.contains("relu"), "{e}");
    let e = format!(
        "{:#}",
        parse("model_type: bezier, activation: gelu").unwrap_err()
    );
    assert!(e.contains("model.model_type") && e.contains("gelu"), "{e}");
    // Bezier ignores the multiplier.
    let cfg = parse("baseline_width_mult: 3.0").unwrap();
    assert_eq!(cfg.model_config(), ModelConfig::default());
}
