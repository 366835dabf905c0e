//! `fluxflow compare` through the binary: two small runs of ours (Bezier and ReLU) and a run
//! folder in the reference's shape, side by side.

mod common;

use std::path::{Path, PathBuf};

use common::{bin, text};

fn tmpdir(name: &str) -> PathBuf {
    common::fresh_dir("cmp", name)
}

fn train(dir: &Path, name: &str, activation: &str, held: &Path) -> PathBuf {
    let run = dir.join(name);
    let cfg = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &cfg,
        format!(
            "model: {{vae_dim: 8, downscales: 2, feature_maps_dim: 8, text_embedding_dim: 8,
         vae_attn_layers: 1, vae_attn_heads: 2, flow_heads: 2, flow_layers: 1, text_hidden: 8,
         activation: {activation}}}
data:
  synthetic: {{count: 4, width: 32, height: 32, seed: 1}}
training: {{n_epochs: 2, batch_size: 2, workers: 1, lr: 0.002, seed: 3}}
output:
  output_path: {}
  log_interval: 1
  checkpoint_save_interval: 3
  eval_data: {}
",
            run.display(),
            held.display()
        ),
    )
    .unwrap();
    let o = bin()
        .args(["train", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    run
}

/// A run folder as the reference writes it: metrics rows only, no eval, a config.yaml.
fn reference_run(dir: &Path) -> PathBuf {
    let run = dir.join("reference");
    std::fs::create_dir_all(run.join("graph")).unwrap();
    let losses = [0.9, 0.7, 0.5, 0.45, 0.4, 0.42];
    let mut lines = String::new();
    for (i, l) in losses.iter().enumerate() {
        lines.push_str(&format!(
            "{{\"timestamp\": \"2025-12-07T10:15:{:02}.000001\", \"session_id\": \"s\", \"epoch\": 0, \
             \"batch\": {i}, \"global_step\": {}, \"metrics\": {{\"vae_loss\": {l}, \"kl_loss\": 1.0, \
             \"kl_beta\": 0.0}}, \"learning_rates\": {{\"vae_lr\": 1e-5}}, \"extras\": {{\"batch_time\": 0.5}}}}\n",
            i * 2,
            i + 1
        ));
    }
    std::fs::write(run.join("graph/training_metrics.jsonl"), lines).unwrap();
    std::fs::write(run.join("config.yaml"), "training:\n  batch_size: 4\n").unwrap();
    run
}

#[test]
fn compare_writes_its_table_and_plots() {
    let dir = tmpdir("runs");
    let held = dir.join("held");
    std::fs::create_dir_all(&held).unwrap();
    for k in 0..2u32 {
        image::RgbImage::from_fn(32, 32, |x, y| {
            image::Rgb([(x * 8 + k * 50) as u8, (y * 8) as u8, ((x + y) * 4) as u8])
        })
        .save(held.join(format!("h{k}.png")))
        .unwrap();
    }
    let a = train(&dir, "bezier", "bezier", &held);
    let b = train(&dir, "relu", "relu", &held);
    let r = reference_run(&dir);
    let out = dir.join("cmp");
    let o = bin()
        .args([
            "compare",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
            r.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--loss",
            "0.5",
            "--psnr",
            "5",
            "--last",
            "3",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let md = std::fs::read_to_string(out.join("comparison.md")).unwrap();
    for name in ["compare_loss.png", "compare_quality.png"] {
        let png = image::open(out.join(name)).unwrap();
        assert_eq!((png.width(), png.height()), (1600, 800));
        assert!(md.contains(&format!("]({name})")), "{md}");
    }
    // One header column per run, in order.
    assert!(md.contains("| Step | bezier | relu | reference |"), "{md}");
    // Our runs evaluated at steps 3 and 6 (checkpoints; 6 is also the end).
    let quality = md.split("## Reconstruction quality").nth(1).unwrap();
    assert!(
        quality.contains("\n| 3 |") && quality.contains("\n| 6 |"),
        "{md}"
    );
    // The reference run: loss 0.5 first at step 3; variance of (0.45, 0.4, 0.42) over its last 3
    // steps = 0.0012667 / 3 = 4.222e-4; 4 images / 0.5 s = 8 images/s; no PSNR.
    let reach = md.split("## Steps to reach").nth(1).unwrap();
    let loss_row = reach
        .lines()
        .find(|l| l.starts_with("| loss <= 0.5"))
        .unwrap();
    assert!(loss_row.trim_end().ends_with("| 3 |"), "{loss_row}");
    let psnr_row = reach
        .lines()
        .find(|l| l.starts_with("| PSNR >= 5 dB"))
        .unwrap();
    assert!(psnr_row.trim_end().ends_with("| - |"), "{psnr_row}");
    let ref_row = md
        .lines()
        .find(|l| l.starts_with("| reference | 4.222e-4 | 3 |"))
        .unwrap_or_else(|| panic!("{md}"));
    assert!(ref_row.contains("| 0.500 | 8.00 |"), "{ref_row}");
    // Our runs log per-step losses and their batch size.
    let ours = md
        .lines()
        .find(|l| l.starts_with("| relu | ") && l.contains("e-"))
        .unwrap_or_else(|| panic!("{md}"));
    assert!(!ours.ends_with("| - |"), "{ours}");

    // One run is not a comparison; a folder without metrics is named.
    let o = bin()
        .args(["compare", a.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let o = bin()
        .args([
            "compare",
            a.to_str().unwrap(),
            held.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        text(&o).contains("is not a run folder") && text(&o).contains("held"),
        "{}",
        text(&o)
    );
}
