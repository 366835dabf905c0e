//! `fluxflow train` and `fluxflow resume` end to end, through the binary: the run's files,
//! refusing to overwrite, bad files, SIGTERM, a hard kill, damaged checkpoints, write failures.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, text};
use serde_json::Value;

fn tmpdir(name: &str) -> PathBuf {
    common::fresh_dir("run", name)
}

/// A tiny model on 16 generated images (12 of 32x32, 4 of 48x32): 8 steps per epoch.
fn config(dir: &Path, extra_training: &str) -> PathBuf {
    let text = format!(
        "model: {{vae_dim: 8, feature_maps_dim: 8, text_embedding_dim: 8, vae_attn_layers: 1,
         vae_attn_heads: 2, flow_heads: 2, flow_layers: 1, text_hidden: 8}}
data:
  synthetic: {{count: 16, width: 32, height: 32, seed: 1}}
training:
  n_epochs: 2
  batch_size: 2
  workers: 1
  lr: 0.001
  seed: 3
  kl_warmup_steps: 10
{extra_training}
output:
  output_path: {}
  log_interval: 1
  checkpoint_save_interval: 4
  samples_per_checkpoint: 100
  keep_last: 3
",
        dir.join("run").display()
    );
    let p = dir.join("config.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("fluxflow runs")
}

/// (global_step, step recon loss) of every training row of a run's metrics log.
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

fn wait_for(path: &Path, limit: Duration) {
    let t = Instant::now();
    while !path.exists() {
        assert!(t.elapsed() < limit, "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A run of 100 epochs, started in the background and past its first checkpoint (step 4).
fn long_run_past_first_checkpoint(dir: &Path) -> std::process::Child {
    let cfg = config(dir, "");
    let child = bin()
        .args([
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            "training.n_epochs=100",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(
        &dir.join("run/checkpoints/step-00000004"),
        Duration::from_secs(120),
    );
    child
}

#[test]
fn a_run_writes_its_files_and_refuses_to_be_overwritten() {
    let dir = tmpdir("files");
    let cfg = config(&dir, "");
    let o = run(bin().args(["train", "--config", cfg.to_str().unwrap()]));
    assert!(o.status.success(), "{}", text(&o));
    let r = dir.join("run");
    for f in [
        "run.yaml",
        "flxflow_final.safetensors",
        "text_encoder.safetensors",
        "training_state.json",
        "lr_sav.json",
        "graph/training_metrics.jsonl",
        "graph/session.json",
        "graph/report.md",
        "checkpoints/step-00000016/state.json",
        "checkpoints/step-00000008/trainer.safetensors",
    ] {
        assert!(r.join(f).exists(), "{f} missing:\n{}", text(&o));
    }
    // keep_last 3 of the checkpoints at 4, 8, 12, 16.
    assert!(!r.join("checkpoints/step-00000004").exists());
    assert_eq!(step_losses(&r).len(), 16);
    let ts: Value =
        serde_json::from_slice(&std::fs::read(r.join("training_state.json")).unwrap()).unwrap();
    assert_eq!(ts["global_step"], 16);
    let samples = std::fs::read_dir(r.join("samples")).unwrap().count();
    assert_eq!(samples, 2, "one folder per template");
    assert!(r.join("samples/synthetic_00000/00000.webp").exists());
    assert!(r.join("samples/synthetic_00000/00016.webp").exists());
    assert!(r.join("samples/synthetic_00000/gallery.png").exists());
    // Each sample's colour ranges are logged: [min, max, mean] per channel, in [-1, 1] scale.
    let log = std::fs::read_to_string(r.join("graph/training_metrics.jsonl")).unwrap();
    let sample_rows: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["extras"].get("samples").is_some())
        .collect();
    assert_eq!(sample_rows.len(), 2, "samples at steps 0 and 16");
    let r0 = &sample_rows[1]["extras"]["samples"]["synthetic_00000"]["r"];
    let v: Vec<f64> = serde_json::from_value(r0.clone()).unwrap();
    assert!(v.len() == 3 && v[0] <= v[2] && v[2] <= v[1], "{v:?}");
    // The model file is a reference checkpoint.
    let info = run(bin().args([
        "info",
        r.join("flxflow_final.safetensors").to_str().unwrap(),
    ]));
    assert!(text(&info).contains("vae_dim 8"), "{}", text(&info));

    let again = run(bin().args(["train", "--config", cfg.to_str().unwrap()]));
    assert!(!again.status.success());
    assert!(
        text(&again).contains("already holds a run"),
        "{}",
        text(&again)
    );
    assert!(text(&again).contains("--force"));
    // --force with a setting that fails late (a missing template) deletes nothing.
    let bad = run(bin().args([
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--force",
        "--set",
        "output.test_image_address=[/nonexistent/template.png]",
    ]));
    assert!(!bad.status.success());
    assert!(
        text(&bad).contains("/nonexistent/template.png"),
        "{}",
        text(&bad)
    );
    assert_eq!(step_losses(&r).len(), 16);
    assert!(r.join("checkpoints/step-00000016/state.json").exists());
    let forced = run(bin().args([
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--force",
        "--max-steps",
        "2",
    ]));
    assert!(forced.status.success(), "{}", text(&forced));
    assert_eq!(step_losses(&r).len(), 2);
}

#[test]
fn resume_after_a_hard_kill_reproduces_the_uninterrupted_losses() {
    let straight = tmpdir("straight");
    let cfg = config(&straight, "");
    let o = run(bin().args(["train", "--config", cfg.to_str().unwrap()]));
    assert!(o.status.success(), "{}", text(&o));
    let expected = step_losses(&straight.join("run"));
    assert_eq!(expected.len(), 16);

    let killed = tmpdir("killed");
    let cfg = config(&killed, "");
    let mut child = bin()
        .args(["train", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        &killed.join("run/checkpoints/step-00000004"),
        Duration::from_secs(120),
    );
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    // The kill landed while the run was going: it did not exit by itself, and its newest
    // checkpoint is one before the end, so the resume below has steps to reproduce.
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "the run ended before the kill: {status:?}"
    );
    let newest = std::fs::read_dir(killed.join("run/checkpoints"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.strip_prefix("step-")
                .and_then(|s| s.parse::<u64>().ok())
        })
        .max()
        .unwrap();
    assert!(
        newest < 16,
        "the kill landed after the last checkpoint (step {newest})"
    );
    let o = run(bin().args(["resume", "--output", killed.join("run").to_str().unwrap()]));
    assert!(o.status.success(), "{}", text(&o));
    let got = step_losses(&killed.join("run"));
    assert_eq!(
        got, expected,
        "resumed run differs from the uninterrupted one"
    );
    let session: Value =
        serde_json::from_slice(&std::fs::read(killed.join("run/graph/session.json")).unwrap())
            .unwrap();
    assert!(session["resumed_count"].as_u64().unwrap() >= 1);
}

#[test]
fn sigterm_finishes_the_step_writes_a_checkpoint_and_exits_zero() {
    let dir = tmpdir("sigterm");
    let child = long_run_past_first_checkpoint(&dir);
    let pid = child.id().to_string();
    // The step the run had logged when the signal was sent: it stops within a step or two.
    let at_signal = step_losses(&dir.join("run")).last().unwrap().0;
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("stopped by signal") && t.contains("fluxflow resume --output"),
        "{t}"
    );
    let r = dir.join("run");
    let steps = step_losses(&r);
    let last = steps.last().unwrap().0;
    assert!(
        r.join(format!("checkpoints/step-{last:08}/state.json"))
            .exists(),
        "{t}"
    );
    // 100 epochs of 8 steps were planned.
    assert!(
        (at_signal..=at_signal + 2).contains(&last) && last < 800,
        "signalled at step {at_signal}, stopped at {last}: {t}"
    );
    assert!(t.contains(&format!("at step {last}/800")), "{t}");
}

#[test]
fn resume_falls_back_when_the_newest_checkpoint_is_damaged() {
    let dir = tmpdir("damaged");
    let cfg = config(&dir, "");
    let o = run(bin().args([
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--max-steps",
        "12",
    ]));
    assert!(o.status.success(), "{}", text(&o));
    let r = dir.join("run");
    // A half-written newest checkpoint.
    let newest = r.join("checkpoints/step-00000012/trainer.safetensors");
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 3]).unwrap();
    let o = run(bin().args(["resume", "--output", r.to_str().unwrap()]));
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("step 12") && t.contains("falling back"), "{t}");
    assert!(t.contains("resuming") && t.contains("at step 8"), "{t}");
}

#[test]
fn a_failed_checkpoint_write_is_an_error_and_keeps_the_previous_one() {
    let dir = tmpdir("diskfull");
    let cfg = config(&dir, "");
    // The first checkpoint's trainer file is written; the second fails half-way.
    let o = run(bin()
        .args(["train", "--config", cfg.to_str().unwrap()])
        .env("FLUXFLOW_INJECT_WRITE_FAILURE", "trainer.safetensors:1"));
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("No space left on device")
            && t.contains("the previous checkpoint (step 4,")
            && t.contains("is intact"),
        "{t}"
    );
    let r = dir.join("run");
    let ckpts: Vec<String> = std::fs::read_dir(r.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(ckpts, vec!["step-00000004".to_string()], "{t}");
    let o = run(bin().args(["resume", "--output", r.to_str().unwrap()]));
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("at step 4"));
}

#[test]
fn unreadable_images_are_skipped_and_counted_and_empty_folders_are_errors() {
    let dir = tmpdir("badfiles");
    let data = dir.join("images");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    for i in 0..4 {
        image::RgbImage::from_fn(32, 32, |x, y| {
            image::Rgb([(x * 8) as u8, (y * 8) as u8, i * 50])
        })
        .save(data.join("sub").join(format!("img{i}.png")))
        .unwrap();
    }
    std::fs::write(data.join("broken.png"), b"\x89PNG\r\n\x1a\nnope").unwrap();
    std::fs::write(data.join("notes.txt"), b"not an image").unwrap();
    let cfg = config(&dir, "");
    let o = run(bin().args([
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--set",
        "data.synthetic=null",
        "--max-steps",
        "2",
    ]));
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("broken.png") && t.contains("1 unreadable file"),
        "{t}"
    );
    assert!(!t.contains("notes.txt"), "{t}");

    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = run(bin().args([
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--data",
        empty.to_str().unwrap(),
        "--set",
        "data.synthetic=null",
        "--output",
        dir.join("other").to_str().unwrap(),
    ]));
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("no images found") && t.contains("empty"), "{t}");
    assert!(!dir.join("other/checkpoints").exists(), "{t}");
}

#[test]
fn the_embedded_quickstart_as_shipped_reaches_22_db_on_its_templates() {
    let dir = tmpdir("quickstart");
    let out = dir.join("qs");
    // Exactly the embedded config (only the output folder moved): 480 steps.
    let o = run(bin()
        .current_dir(&dir)
        .args(["train", "--output", out.to_str().unwrap()]));
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("training finished at step 480/480"),
        "{}",
        text(&o)
    );
    // Rows every 10 steps: the running loss falls.
    let log = std::fs::read_to_string(out.join("graph/training_metrics.jsonl")).unwrap();
    let rows: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let losses: Vec<f64> = rows
        .iter()
        .filter_map(|r| r["metrics"]["vae_loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 48);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (first, last) = (mean(&losses[..5]), mean(&losses[43..]));
    assert!(last < 0.7 * first, "loss went from {first} to {last}");
    // The final template reconstructions, PSNR as logged with the samples of step 480.
    let samples = rows
        .iter()
        .rev()
        .find(|r| r["extras"].get("samples").is_some())
        .unwrap();
    assert_eq!(samples["global_step"], 480);
    let psnr: Vec<(String, f64)> = samples["extras"]["samples"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(stem, s)| (stem.clone(), s["psnr"].as_f64().unwrap()))
        .collect();
    assert_eq!(psnr.len(), 2, "{psnr:?}");
    for (stem, db) in &psnr {
        assert!(
            *db >= 22.0,
            "template {stem}: final PSNR {db:.2} dB < 22 dB"
        );
    }
    assert!(out.join("graph/training_losses.png").exists());
    assert!(out.join("graph/reconstruction_quality.png").exists());
    assert!(out.join("samples/synthetic_00000/gallery.png").exists());
}

#[test]
fn max_runtime_checkpoints_and_exits_cleanly() {
    let dir = tmpdir("runtime");
    let cfg = config(&dir, "  max_runtime: 2s\n");
    let o = run(bin().args([
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "training.n_epochs=100",
    ]));
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("max_runtime reached") && t.contains("fluxflow resume --output"),
        "{t}"
    );
    let r = dir.join("run");
    let last = step_losses(&r).last().unwrap().0;
    // 100 epochs of 8 steps were planned; 2 s of them ran.
    assert!(last < 800, "{t}");
    assert!(t.contains(&format!("at step {last}/800")), "{t}");
    assert!(
        r.join(format!("checkpoints/step-{last:08}/state.json"))
            .exists(),
        "{t}"
    );
}

#[test]
fn a_second_interrupt_exits_at_once_leaving_the_last_checkpoint_intact() {
    let dir = tmpdir("sigint2");
    let child = long_run_past_first_checkpoint(&dir);
    let pid = child.id().to_string();
    for _ in 0..2 {
        assert!(Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success());
        std::thread::sleep(Duration::from_millis(30));
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", text(&o));
    let r = dir.join("run");
    let runs = fluxflow::run::dir::RunDir::new(&r);
    let ckpts = runs.list().unwrap();
    assert!(!ckpts.is_empty());
    for (_, c) in &ckpts {
        runs.verify(c).unwrap();
    }
}

#[test]
fn resume_after_a_hard_kill_during_a_background_checkpoint_write_reproduces_the_losses() {
    let straight = tmpdir("straight-bg");
    let cfg = config(&straight, "");
    let o = run(bin().args(["train", "--config", cfg.to_str().unwrap()]));
    assert!(o.status.success(), "{}", text(&o));
    let expected = step_losses(&straight.join("run"));

    // Each checkpoint file takes 400 ms longer to write: the kill lands while step 8's
    // checkpoint is being written, with step 4's complete.
    let killed = tmpdir("killed-bg");
    let cfg = config(&killed, "");
    let mut child = bin()
        .args(["train", "--config", cfg.to_str().unwrap()])
        .env("FLUXFLOW_INJECT_WRITE_DELAY_MS", "400")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ckpts = killed.join("run/checkpoints");
    wait_for(&ckpts.join("step-00000004"), Duration::from_secs(120));
    wait_for(
        &ckpts.join(".partial-step-00000008"),
        Duration::from_secs(120),
    );
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "the run ended before the kill: {status:?}"
    );
    assert!(
        !ckpts.join("step-00000008").exists(),
        "the kill landed after the write"
    );
    let o = run(bin().args(["resume", "--output", killed.join("run").to_str().unwrap()]));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("at step 4 of 16"), "{t}");
    assert_eq!(step_losses(&killed.join("run")), expected);
}

#[test]
fn a_run_with_samples_and_checkpoints_every_step_keeps_galleries_small_and_logs_ckpt_wait() {
    let dir = tmpdir("every-step");
    let cfg = config(&dir, "");
    // 25 epochs of 8 steps: 200 steps, each with a checkpoint and template samples.
    let o = run(bin().args([
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "training.n_epochs=25",
        "--set",
        "output.checkpoint_save_interval=1",
        "--set",
        "output.samples_per_checkpoint=1",
        "--set",
        "data.synthetic.width=16",
        "--set",
        "data.synthetic.height=16",
    ]));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let r = dir.join("run");
    let summary = fluxflow::report::generate(&r).unwrap();
    assert!(!summary.galleries.is_empty());
    for g in &summary.galleries {
        // The original and 16 reconstructions, the first (step 0) and the newest among them.
        assert!(g.tiles <= 17, "{}: {} tiles", g.stem, g.tiles);
        assert_eq!(g.steps.first(), Some(&0), "{}", g.stem);
        assert_eq!(g.steps.last(), Some(&200), "{}", g.stem);
    }
    // Every sample stays on disk.
    let stem = &summary.galleries[0].stem;
    let webps = std::fs::read_dir(r.join("samples").join(stem))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "webp")
        })
        .count();
    assert_eq!(webps, 201);
    let log = std::fs::read_to_string(r.join("graph/training_metrics.jsonl")).unwrap();
    let rows: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["extras"].get("step_vae_loss").is_some())
        .collect();
    assert_eq!(rows.len(), 200);
    for row in &rows {
        let w = row["extras"]["ckpt_wait"].as_f64();
        assert!(w.is_some_and(|w| w >= 0.0), "{row}");
    }
    let md = std::fs::read_to_string(r.join("graph/report.md")).unwrap();
    assert!(
        md.contains("Checkpoint and report wait") && md.contains("`ckpt_wait`"),
        "{md}"
    );
}

#[test]
fn log_level_warning_keeps_only_warnings() {
    let dir = tmpdir("log-level");
    let cfg = config(&dir, "");
    let args = |level: &str| {
        vec![
            "train".to_string(),
            "--config".into(),
            cfg.to_str().unwrap().into(),
            "--max-steps".into(),
            "2".into(),
            "--force".into(),
            "--set".into(),
            format!("output.log_level={level}"),
            // A setting that warns, to see warnings pass.
            "--set".into(),
            "training.lambda_adv=0.25".into(),
        ]
    };
    let o = run(bin().args(args("INFO")));
    let info = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{info}");
    assert!(
        info.contains("data: ") && info.contains("step 1/2"),
        "{info}"
    );
    assert!(info.contains("warning: training.lambda_adv"), "{info}");
    let o = run(bin().args(args("WARNING")));
    let warn = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{warn}");
    assert!(
        !warn.contains("data: ") && !warn.contains("step 1/2"),
        "{warn}"
    );
    assert!(warn.contains("warning: training.lambda_adv"), "{warn}");
    // The run's own summary is the command's output, not a log line.
    assert!(String::from_utf8_lossy(&o.stdout).contains("at step 2/2"));
}

/// Rewrites a checkpoint folder as version 1 wrote it: one unkeyed trainer state, and the VAE's
/// trainer tensors without the `vae.` prefix.
fn downgrade_to_version_1(ckpt: &Path) {
    let trainer = ckpt.join("trainer.safetensors");
    let tensors = fluxflow::weights::read_tensors(&trainer).unwrap();
    let renamed: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(k, t)| (k.strip_prefix("vae.").map_or(k.clone(), str::to_string), t))
        .collect();
    assert!(renamed.keys().any(|k| k.starts_with("optim.")));
    candle_core::safetensors::save(&renamed, &trainer).unwrap();
    let path = ckpt.join("state.json");
    let mut state: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let vae = state["loop"]["trainers"]["vae"].clone();
    let m = state["loop"].as_object_mut().unwrap();
    m.remove("trainers");
    m.insert("trainer".into(), vae);
    m.insert("version".into(), 1.into());
    let size = std::fs::metadata(&trainer).unwrap().len();
    state["manifest"]["files"]["trainer.safetensors"] = size.into();
    std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
}

#[test]
fn a_version_1_checkpoint_resumes_exactly_and_a_newer_version_is_refused() {
    let dir = tmpdir("versions");
    let cfg = config(&dir, "");
    let o = run(bin().args(["train", "--config", cfg.to_str().unwrap()]));
    assert!(o.status.success(), "{}", text(&o));
    let r = dir.join("run");
    let expected = step_losses(&r);
    let state: Value = serde_json::from_slice(
        &std::fs::read(r.join("checkpoints/step-00000016/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["loop"]["version"], 2);
    assert!(state["loop"]["trainers"]["vae"].is_object());

    // Step 16's state is from a newer fluxflow: refused, named, and resume falls back to 12.
    let newest = r.join("checkpoints/step-00000016/state.json");
    let mut s: Value = serde_json::from_slice(&std::fs::read(&newest).unwrap()).unwrap();
    s["loop"]["version"] = 99.into();
    std::fs::write(&newest, serde_json::to_vec(&s).unwrap()).unwrap();
    // Step 12 as version 1 wrote it.
    downgrade_to_version_1(&r.join("checkpoints/step-00000012"));
    let o = run(bin().args(["resume", "--output", r.to_str().unwrap()]));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("state version 99 is newer"), "{t}");
    assert!(t.contains("at step 12 of 16"), "{t}");
    assert_eq!(step_losses(&r), expected, "{t}");
}
