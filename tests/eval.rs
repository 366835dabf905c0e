//! `fluxflow eval` through the binary: per-image and mean scores, a truncated file skipped and
//! named, the JSON output, and agreement with `reconstruct`'s PSNR.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::parity;
use image::RgbImage;

fn fluxflow(args: &[&str]) -> Output {
    common::bin()
        .args(args)
        .output()
        .expect("the fluxflow binary runs")
}

fn tmpdir(name: &str) -> PathBuf {
    common::fresh_dir("eval", name)
}

fn str_of(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn pattern(w: u32, h: u32, k: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            ((x * 7 + y * k) % 256) as u8,
            ((x * y + 40 * k) % 256) as u8,
            (((x / 8 + y / 8) % 2) * 200 + 20) as u8,
        ])
    })
}

fn write_folder(dir: &Path) {
    pattern(32, 32, 3).save(dir.join("a.png")).unwrap();
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    pattern(48, 32, 5).save(dir.join("sub/b.png")).unwrap();
    pattern(176, 176, 1).save(dir.join("c.png")).unwrap();
    // A truncated PNG: its header is there, its pixels are not.
    pattern(32, 32, 9).save(dir.join("d.png")).unwrap();
    let bytes = std::fs::read(dir.join("d.png")).unwrap();
    std::fs::write(dir.join("d.png"), &bytes[..bytes.len() / 3]).unwrap();
    std::fs::write(dir.join("notes.txt"), "not an image").unwrap();
}

#[test]
fn eval_scores_each_image_skips_the_truncated_one_and_writes_json() {
    let dir = tmpdir("scores");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_folder(&data);
    let ckpt = parity("tiny16.safetensors");
    let json = dir.join("scores.json");
    let o = fluxflow(&[
        "eval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
        "--batch",
        "2",
    ]);
    assert!(o.status.success(), "{}", str_of(&o.stderr));
    let out = str_of(&o.stdout);
    assert!(out.contains("skipped 1 file"), "{out}");
    assert!(out.contains("d.png"), "{out}");
    assert!(out.contains("mean of 3"), "{out}");
    assert!(out.contains("under 161 px"), "{out}");

    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["activation"], "bezier");
    let images = v["images"].as_array().unwrap();
    let names: Vec<&str> = images.iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a.png", "c.png", "sub/b.png"]);
    let skipped = v["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1);
    assert!(skipped[0]["path"].as_str().unwrap().ends_with("d.png"));
    for i in images {
        let p = i["psnr"].as_f64().unwrap();
        let s = i["ssim"].as_f64().unwrap();
        assert!(p.is_finite() && p > 0.0 && p < 60.0, "{i}");
        assert!(s > -1.0 && s < 1.0, "{i}");
    }
    // Only the 176x176 image is large enough for MS-SSIM.
    assert!(images[0]["ms_ssim"].is_null());
    assert!(images[2]["ms_ssim"].is_null());
    let ms = images[1]["ms_ssim"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&ms), "{ms}");
    assert_eq!(v["mean"]["images"], 3);
    assert_eq!(v["mean"]["ms_ssim_images"], 1);
    let mean: f64 = images
        .iter()
        .map(|i| i["psnr"].as_f64().unwrap())
        .sum::<f64>()
        / 3.0;
    assert!((v["mean"]["psnr"].as_f64().unwrap() - mean).abs() < 1e-9);
    assert_eq!(v["mean"]["ms_ssim"].as_f64().unwrap(), ms);

    // The PSNR of the batched evaluation is reconstruct's (one image at a time) to the digit.
    let r = fluxflow(&[
        "reconstruct",
        data.join("sub/b.png").to_str().unwrap(),
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "-o",
        dir.join("b.recon.png").to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", str_of(&r.stderr));
    let expected = format!("PSNR {:.2} dB", images[2]["psnr"].as_f64().unwrap());
    assert!(
        str_of(&r.stdout).contains(&expected),
        "{} vs {expected}",
        str_of(&r.stdout)
    );

    // --limit counts readable images only.
    let o = fluxflow(&[
        "eval",
        "-c",
        ckpt.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--limit",
        "1",
    ]);
    assert!(o.status.success(), "{}", str_of(&o.stderr));
    assert!(
        str_of(&o.stdout).contains("mean of 1"),
        "{}",
        str_of(&o.stdout)
    );
}

#[test]
fn eval_of_a_folder_without_images_names_it() {
    let dir = tmpdir("empty");
    std::fs::write(dir.join("x.png"), b"").unwrap();
    let ckpt = parity("tiny16.safetensors");
    let o = fluxflow(&[
        "eval",
        "-c",
        ckpt.to_str().unwrap(),
        "--data",
        dir.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = str_of(&o.stderr);
    assert!(
        err.contains("no readable images") && err.contains("x.png"),
        "{err}"
    );
}

/// A tiny run with a held-out folder evaluated every 2 steps.
#[test]
fn training_evaluates_the_held_out_folder_and_reports_it() {
    let dir = tmpdir("train");
    let held = dir.join("held");
    std::fs::create_dir_all(&held).unwrap();
    for k in 0..3 {
        pattern(32, 32, k + 1)
            .save(held.join(format!("h{k}.png")))
            .unwrap();
    }
    std::fs::write(held.join("broken.png"), b"\x89PNG\r\n\x1a\nnope").unwrap();
    let cfg = dir.join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "model: {{vae_dim: 8, downscales: 2, feature_maps_dim: 8, text_embedding_dim: 8,
         vae_attn_layers: 1, vae_attn_heads: 2, flow_heads: 2, flow_layers: 1, text_hidden: 8}}
data:
  synthetic: {{count: 4, width: 32, height: 32, seed: 1}}
training: {{n_epochs: 3, batch_size: 2, workers: 1, lr: 0.002, seed: 3}}
output:
  output_path: {}
  log_interval: 1
  checkpoint_save_interval: 3
  eval_data: {}
  eval_interval: 2
  eval_limit: 2
",
            dir.join("run").display(),
            held.display()
        ),
    )
    .unwrap();
    let o = common::bin()
        .args(["train", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let log = format!("{}{}", str_of(&o.stdout), str_of(&o.stderr));
    assert!(o.status.success(), "{log}");
    assert!(log.contains("eval of step 2 on 2 images"), "{log}");
    let run = dir.join("run");
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(run.join("graph/training_metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    // 4 generated images in buckets of 3 and 1: 3 steps per epoch, 9 in all. Every 2 steps,
    // then once more at the end.
    let evals: Vec<&serde_json::Value> = rows
        .iter()
        .filter(|r| r["metrics"].get("eval_psnr").is_some())
        .collect();
    let steps: Vec<u64> = evals
        .iter()
        .map(|r| r["global_step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [2, 4, 6, 8, 9]);
    for r in &evals {
        let m = &r["metrics"];
        for k in ["eval_psnr", "eval_psnr_ema"] {
            let v = m[k].as_f64().unwrap();
            assert!(v > 3.0 && v < 60.0, "{k} {v}");
        }
        for k in ["eval_ssim", "eval_ssim_ema"] {
            let v = m[k].as_f64().unwrap();
            assert!(v > -1.0 && v < 1.0, "{k} {v}");
        }
        // 32x32 images have no MS-SSIM.
        assert!(m.get("eval_ms_ssim").is_none());
        assert_eq!(r["extras"]["eval_images"], 2);
        // The EMA weights (decay 0.999) are not the live ones.
        assert_ne!(m["eval_psnr"], m["eval_psnr_ema"]);
    }
    // The templates' PSNR is logged with their samples and is the PSNR of the written image.
    let sample_row = rows
        .iter()
        .rev()
        .find(|r| r["extras"].get("samples").is_some())
        .unwrap();
    let step = sample_row["global_step"].as_u64().unwrap();
    let (stem, s) = sample_row["extras"]["samples"]
        .as_object()
        .unwrap()
        .iter()
        .next()
        .unwrap();
    let logged = s["psnr"].as_f64().unwrap();
    let sdir = run.join("samples").join(stem);
    let recon = image::open(sdir.join(format!("{step:05}.webp")))
        .unwrap()
        .to_rgb8();
    let original = image::open(sdir.join("original.png")).unwrap().to_rgb8();
    let expected = fluxflow::quality::psnr(
        &fluxflow::quality::Planar::from_rgb8(&recon),
        &fluxflow::quality::Planar::from_rgb8(&original),
    )
    .unwrap();
    assert!((logged - expected).abs() < 1e-9, "{logged} vs {expected}");

    // The gallery captions carry each step's PSNR as logged.
    let r = fluxflow::report::generate(&run).unwrap();
    let g = r.galleries.iter().find(|g| &g.stem == stem).unwrap();
    let caption = format!("step {step}: {logged:.1} dB");
    assert!(
        g.captions.contains(&caption),
        "{:?} lacks {caption}",
        g.captions
    );
    assert_eq!(g.captions[0], "original");

    let report = std::fs::read_to_string(run.join("graph/report.md")).unwrap();
    assert!(report.contains("### Reconstruction Quality"), "{report}");
    assert!(report.contains("reconstruction_quality.png"), "{report}");
    assert!(report.contains("| 9 | "), "{report}");
    let summary = std::fs::read_to_string(run.join("graph/training_summary.txt")).unwrap();
    assert!(
        summary.contains("eval_psnr_ema") && summary.contains("TEMPLATE PSNR"),
        "{summary}"
    );
    assert!(run.join("graph/reconstruction_quality.png").exists());

    // Resumed from step 6 (the step-9 checkpoint removed): the rows up to 6 stay, evaluation
    // 6 included, and steps 8 and 9 evaluate to the same numbers.
    let evals_of = |run: &Path| -> Vec<(u64, serde_json::Value)> {
        std::fs::read_to_string(run.join("graph/training_metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["metrics"].get("eval_psnr").is_some())
            .map(|r| (r["global_step"].as_u64().unwrap(), r["metrics"].clone()))
            .collect()
    };
    let before = evals_of(&run);
    std::fs::remove_dir_all(run.join("checkpoints/step-00000009")).unwrap();
    let o = common::bin()
        .args(["resume", "--output", run.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        str_of(&o.stdout),
        str_of(&o.stderr)
    );
    assert_eq!(evals_of(&run), before);

    // Resumed at its last step, the finished run has nothing to do: no evaluation is repeated.
    let o = common::bin()
        .args(["resume", "--output", run.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", str_of(&o.stderr));
    assert!(
        str_of(&o.stderr).contains("at step 9 of 9"),
        "{}",
        str_of(&o.stderr)
    );
    assert_eq!(evals_of(&run), before);
}

#[test]
fn a_missing_eval_folder_is_named_before_training() {
    let dir = tmpdir("missing");
    let o = common::bin()
        .args([
            "train",
            "--output",
            dir.join("run").to_str().unwrap(),
            "--set",
            "output.eval_data=/nonexistent/held-out",
            "--max-steps",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = str_of(&o.stderr);
    assert!(
        err.contains("output.eval_data") && err.contains("/nonexistent/held-out"),
        "{err}"
    );
}
