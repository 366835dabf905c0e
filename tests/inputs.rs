//! Every input checked where it enters, in its own terms, through the binary: flags and
//! `--set` values bounded and named, a resumed run's `state.json` and `run.yaml` checked, a
//! changed schedule length or data set honoured with a warning, and the smaller commands'
//! arguments and files (`compare`, `eval`, `info`) refused or reported by name.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, text};

fn tmpdir(name: &str) -> PathBuf {
    common::fresh_dir("inputs", name)
}

/// Runs `cmd` to its end, failing the test (and killing the process) after `limit`.
fn run_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fluxflow starts");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

fn run(cmd: &mut Command) -> Output {
    run_within(cmd, Duration::from_secs(120))
}

/// Asserts that `o` failed cleanly (exit 1, no panic) with every needle in its output.
fn refused(what: &str, o: &Output, needles: &[&str]) -> String {
    let t = text(o);
    assert_eq!(o.status.code(), Some(1), "{what}: {t}");
    for n in needles {
        assert!(t.contains(n), "{what}: expected {n:?} in {t}");
    }
    assert!(
        !t.contains("panicked") && !t.contains("backtrace"),
        "{what}: {t}"
    );
    t
}

/// A tiny model on 16 generated 32x32 images: 8 steps per epoch at batch 2.
fn config(dir: &Path, extra_training: &str) -> PathBuf {
    let text = format!(
        "model: {{vae_dim: 8, feature_maps_dim: 8, text_embedding_dim: 8, vae_attn_layers: 1,
         vae_attn_heads: 2, flow_heads: 2, flow_layers: 1, text_hidden: 8,
         use_gradient_checkpointing: false}}
data:
  synthetic: {{count: 16, width: 32, height: 32, seed: 1}}
training:
  n_epochs: 2
  batch_size: 2
  workers: 1
  lr: 0.001
  seed: 3
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

/// `n` 32x32 PNG images in `dir`, named `img{first}.png` onwards.
fn images(dir: &Path, first: u32, n: u32) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    (first..first + n)
        .map(|i| {
            let p = dir.join(format!("img{i}.png"));
            image::RgbImage::from_fn(32, 32, |x, y| {
                image::Rgb([(x * 8) as u8, (y * 8) as u8, (i * 40) as u8])
            })
            .save(&p)
            .unwrap();
            p
        })
        .collect()
}

#[test]
fn flags_and_overrides_beyond_their_bounds_are_refused_naming_them() {
    let dir = tmpdir("bounds");
    let out = dir.join("out");
    let o = out.to_str().unwrap();
    let cases: &[(&[&str], &[&str])] = &[
        // Finite in float64, infinite in float32 (the training dtype).
        (
            &["--set", "training.lr=1e39"],
            &["--set training.lr=1e39", "training.lr is 1e39", "float32"],
        ),
        // Positive in float64, 0 in float32.
        (
            &["--set", "training.lr=1e-50"],
            &["--set training.lr=1e-50", "training.lr", "float32"],
        ),
        (
            &["--set", "training.kl_beta=1e6"],
            &[
                "--set training.kl_beta=1e6",
                "training.kl_beta must be at most 1000",
            ],
        ),
        (
            &["--set", "training.workers=100000"],
            &[
                "--set training.workers=100000",
                "training.workers must be at most 256",
            ],
        ),
        (
            &["--set", "model.baseline_width_mult=1e9"],
            &[
                "--set model.baseline_width_mult=1e9",
                "model.baseline_width_mult",
                "at most 64",
            ],
        ),
        (
            &[
                "--set",
                "model.activation=relu",
                "--set",
                "model.baseline_width_mult=1e9",
            ],
            &["--set model.baseline_width_mult=1e9", "at most 64"],
        ),
        (
            &["--set", "model.vae_dim=1048576"],
            &[
                "--set model.vae_dim=1048576",
                "model.vae_dim must be at most 65536",
            ],
        ),
        (
            &["--set", "training.max_steps=10000000000000"],
            &[
                "--set training.max_steps=10000000000000",
                "training.max_steps must be at most",
            ],
        ),
        (
            &["--set", "training.n_epochs=18446744073709551615"],
            &["training.n_epochs must be at most"],
        ),
        // The flag, not the file, is named.
        (
            &["--max-steps", "0"],
            &["--max-steps 0: must be at least 1"],
        ),
        (
            &["--max-steps", "18446744073709551615"],
            &["--max-steps 18446744073709551615", "at most 1000000000000"],
        ),
    ];
    for (args, needles) in cases {
        let o = run(bin().args(["train", "-o", o]).args(*args));
        let t = refused(&format!("{args:?}"), &o, needles);
        assert!(
            !t.contains("quickstart"),
            "{args:?}: the file is blamed: {t}"
        );
    }
    assert!(
        !out.exists(),
        "a refused configuration created its output folder"
    );
}

#[test]
fn a_model_too_large_for_memory_is_refused_before_it_is_allocated() {
    // Widths within their bounds whose weights alone need terabytes.
    let dir = tmpdir("huge-model");
    let o = run_within(
        bin().env_remove("FLUXFLOW_MEMORY_BUDGET").args([
            "train",
            "-o",
            dir.join("run").to_str().unwrap(),
            "--set",
            "model.vae_dim=8192",
        ]),
        Duration::from_secs(60),
    );
    refused(
        "vae_dim 8192",
        &o,
        &["needs about", "TB for its weights", "model.vae_dim"],
    );
}

#[test]
fn data_for_a_configuration_that_generates_its_images_is_refused_naming_both() {
    let dir = tmpdir("data-synthetic");
    let data = dir.join("data");
    images(&data, 0, 2);
    let out = dir.join("out");
    // The embedded quickstart, and a configuration file, both synthetic.
    let cfg = config(&dir, "");
    for extra in [vec![], vec!["--config", cfg.to_str().unwrap()]] {
        let o = run(bin()
            .args(["train", "--data", data.to_str().unwrap()])
            .args(["-o", out.to_str().unwrap()])
            .args(&extra));
        refused(
            &format!("{extra:?}"),
            &o,
            &[
                &format!("--data {}", data.display()),
                "data.synthetic",
                "--set data.synthetic=null",
            ],
        );
    }
    // A folder that does not exist, or a file, is always an error.
    for (missing, why) in [
        (dir.join("no-such-folder"), "does not exist"),
        (data.join("img0.png"), "is not a folder"),
    ] {
        let o = run(bin()
            .args(["train", "--data", missing.to_str().unwrap()])
            .args(["--set", "data.synthetic=null"])
            .args(["-o", out.to_str().unwrap()]));
        refused(why, &o, &[&format!("--data {}", missing.display()), why]);
    }
    assert!(!out.exists());
}

#[test]
fn bench_bounds_its_steps_and_names_its_own_flags() {
    let cases: &[(&[&str], &[&str])] = &[
        // A capacity overflow before: never allocated by the step count.
        (
            &["--quickstart", "--steps", "18446744073709551615"],
            &["--steps 18446744073709551615: must be at most 1000000"],
        ),
        (
            &["--quickstart", "--mixed-precision", "fp16"],
            &["--mixed-precision fp16 runs on CUDA only", "--device cuda"],
        ),
        (
            &[
                "--quickstart",
                "--mixed-precision",
                "bf16",
                "--device",
                "cpu",
            ],
            &["--mixed-precision bf16 runs on CUDA only"],
        ),
    ];
    for (args, needles) in cases {
        let o = run_within(bin().arg("bench").args(*args), Duration::from_secs(60));
        let t = refused(&format!("{args:?}"), &o, needles);
        assert!(
            !t.contains("--set"),
            "{args:?}: names a --set never typed: {t}"
        );
    }
    // With a configuration the check is the configuration's, still naming the flag.
    let dir = tmpdir("bench-flags");
    let cfg = dir.join("cpu.yaml");
    std::fs::write(
        &cfg,
        "model: {vae_dim: 8, feature_maps_dim: 8, text_embedding_dim: 8, vae_attn_layers: 1,
         vae_attn_heads: 2, flow_heads: 2, flow_layers: 1, text_hidden: 8}
data: {data_path: unused}
",
    )
    .unwrap();
    let o = run_within(
        bin().args([
            "bench",
            "--config",
            cfg.to_str().unwrap(),
            "--mixed-precision",
            "fp16",
        ]),
        Duration::from_secs(60),
    );
    let t = refused("config", &o, &["--mixed-precision fp16", "CUDA"]);
    assert!(!t.contains("--set"), "{t}");
}

/// Every file under `dir`, by relative path, with its bytes.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

/// Copies a folder tree.
fn copy_tree(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    for (rel, bytes) in files(from) {
        let p = to.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn resume(run: &Path) -> Output {
    run_within(
        bin().args(["resume", "--output", run.to_str().unwrap()]),
        Duration::from_secs(120),
    )
}

/// A finished 4-step run of the tiny configuration (one checkpoint, at step 4), trained once
/// per test binary and copied for each case.
fn finished_run(dir: &Path) -> PathBuf {
    let cfg = config(dir, "");
    let o = run(bin().args([
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--max-steps",
        "4",
    ]));
    assert!(o.status.success(), "{}", text(&o));
    dir.join("run")
}

#[test]
fn state_json_values_outside_their_domain_are_refused_naming_file_key_and_value() {
    let dir = tmpdir("state-values");
    let pristine = finished_run(&dir);
    let state_rel = Path::new("checkpoints/step-00000004/state.json");
    // (edit of state.json's "loop", the key path and value the error must name)
    type Edit = fn(&mut serde_json::Value);
    let cases: &[(Edit, &str, &str)] = &[
        (
            |s| s["trainers"]["vae"]["optimizer"]["lr"] = "NaN".into(),
            "loop.trainers.vae.optimizer.lr",
            "NaN",
        ),
        (
            |s| s["trainers"]["vae"]["scheduler"]["lr"] = "-1e-3".into(),
            "loop.trainers.vae.scheduler.lr",
            "-0.001",
        ),
        // Finite in float64, infinite in float32.
        (
            |s| s["trainers"]["vae"]["scheduler"]["base_lr"] = "1e39".into(),
            "loop.trainers.vae.scheduler.base_lr",
            "1e39",
        ),
        (
            |s| s["trainers"]["vae"]["optimizer"]["spec"]["lr"] = (-1.0).into(),
            "loop.trainers.vae.optimizer.spec",
            "-1",
        ),
        (
            |s| s["trainers"]["vae"]["config"]["ema_decay"] = 5.0.into(),
            "loop.trainers.vae.config.ema_decay",
            "5",
        ),
        (
            |s| s["trainers"]["vae"]["config"]["kl_beta"] = 1e6.into(),
            "loop.trainers.vae.config.kl_beta",
            "1000000",
        ),
        (
            |s| s["trainers"]["vae"]["config"]["kl_beta"] = (-1.0).into(),
            "loop.trainers.vae.config.kl_beta",
            "-1",
        ),
        (
            |s| s["sampler"]["epoch"] = 1_000_000_000_000_000_000u64.into(),
            "loop.sampler.epoch",
            "1000000000000000000",
        ),
        (
            |s| s["total_steps"] = 1_000_000_000_000_000_000u64.into(),
            "loop.total_steps",
            "1000000000000000000",
        ),
        (
            |s| s["sampler"]["position"] = 99.into(),
            "loop.sampler.position",
            "99",
        ),
        (
            |s| s["trainers"]["vae"]["adaptive"]["recon"]["capacity"] = 0.into(),
            "loop.trainers.vae.adaptive.recon.capacity",
            "0",
        ),
        (
            |s| s["vae_avg"]["items"][0] = "NaN".into(),
            "loop.vae_avg",
            "invalid type",
        ),
        (
            |s| s["trainers"]["vae"]["config"]["kl_beta"] = "abc".into(),
            "loop.trainers.vae.config.kl_beta",
            "abc",
        ),
    ];
    for (i, (edit, key, value)) in cases.iter().enumerate() {
        let run = dir.join(format!("case{i}"));
        copy_tree(&pristine, &run);
        let state_path = run.join(state_rel);
        let mut state = read_json(&state_path);
        edit(&mut state["loop"]);
        std::fs::write(&state_path, serde_json::to_vec_pretty(&state).unwrap()).unwrap();
        let before = files(&run.join("checkpoints"));
        let o = resume(&run);
        refused(key, &o, &[&state_path.display().to_string(), key, value]);
        // Refused before anything was trained or written.
        assert!(
            files(&run.join("checkpoints")) == before,
            "{key}: the checkpoints changed"
        );
    }
}

#[test]
fn run_yaml_values_are_checked_on_resume_in_the_training_dtype() {
    let dir = tmpdir("run-yaml-values");
    let run = finished_run(&dir);
    let yaml = run.join("run.yaml");
    let text0 = std::fs::read_to_string(&yaml).unwrap();
    for (from, to, needles) in [
        (
            "  lr: 0.001",
            "  lr: 1.0e39",
            &["training.lr is 1e39", "float32"][..],
        ),
        (
            "  ema_decay: 0.999",
            "  ema_decay: 5.0",
            &["training.ema_decay", "5"][..],
        ),
        (
            "  workers: 1",
            "  workers: 100000",
            &["training.workers", "100000"][..],
        ),
    ] {
        assert!(text0.contains(from), "{from} not in run.yaml");
        std::fs::write(&yaml, text0.replace(from, to)).unwrap();
        let o = resume(&run);
        let mut all = needles.to_vec();
        let named = yaml.display().to_string();
        all.push(&named);
        refused(to, &o, &all);
    }
}

/// (global_step, vae_lr) of every metrics row with a training loss.
fn lrs(run: &Path) -> Vec<(u64, f64)> {
    let log = std::fs::read_to_string(run.join("graph/training_metrics.jsonl")).unwrap();
    log.lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["extras"].get("step_vae_loss")?;
            Some((
                v["global_step"].as_u64().unwrap(),
                v["learning_rates"]["vae_lr"].as_f64()?,
            ))
        })
        .collect()
}

#[test]
fn a_max_steps_changed_in_run_yaml_is_honoured_on_resume_with_a_warning() {
    let dir = tmpdir("max-steps");
    // 8 steps, checkpoints at 4 and 8; the one at 8 is dropped so the run resumes mid-cosine.
    let cfg = config(&dir, "");
    let o = run(bin().args([
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--max-steps",
        "8",
    ]));
    assert!(o.status.success(), "{}", text(&o));
    let run_dir = dir.join("run");
    std::fs::remove_dir_all(run_dir.join("checkpoints/step-00000008")).unwrap();
    let yaml = run_dir.join("run.yaml");
    let y = std::fs::read_to_string(&yaml).unwrap();
    assert!(y.contains("max_steps: 8"));
    std::fs::write(&yaml, y.replace("max_steps: 8", "max_steps: 12")).unwrap();
    let o = resume(&run_dir);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("the run's length changed from 8 to 12 steps")
            && t.contains("training.max_steps 12")
            && t.contains(&yaml.display().to_string())
            && t.contains("CosineAnnealingLR now reaches its eta_min 1e-4 at step 12"),
        "{t}"
    );
    assert!(t.contains("at step 12/12"), "{t}");
    let state = read_json(&run_dir.join("checkpoints/step-00000012/state.json"));
    assert_eq!(state["loop"]["total_steps"], 12);
    assert_eq!(state["loop"]["trainers"]["vae"]["scheduler"]["t_max"], 12);
    // The learning rate falls on from where it was, without a jump, to eta_min at step 12.
    let lr = lrs(&run_dir);
    let at = |s: u64| lr.iter().rev().find(|p| p.0 == s).unwrap().1;
    for s in 4..12 {
        assert!(at(s + 1) < at(s), "lr rose at step {}: {lr:?}", s + 1);
    }
    assert!((at(12) - 1e-4).abs() < 1e-12, "{lr:?}");

    // Lowered below the step reached: nothing left to train, and nothing touched.
    let y = std::fs::read_to_string(&yaml).unwrap();
    std::fs::write(&yaml, y.replace("max_steps: 12", "max_steps: 6")).unwrap();
    let before = files(&run_dir.join("checkpoints"));
    let o = resume(&run_dir);
    refused(
        "max_steps 6",
        &o,
        &[
            &yaml.display().to_string(),
            "training.max_steps 6",
            "6 steps long",
            "at step 12",
        ],
    );
    assert!(files(&run_dir.join("checkpoints")) == before);
}

/// A tiny model's configuration training on the image folder `data`.
fn data_config(dir: &Path, data: &Path) -> PathBuf {
    let text = std::fs::read_to_string(config(dir, "")).unwrap().replace(
        "  synthetic: {count: 16, width: 32, height: 32, seed: 1}",
        &format!("  data_path: {}", data.display()),
    );
    let p = dir.join("config.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn a_data_set_changed_under_a_resumed_run_is_trained_on_with_a_warning_counting_the_changes() {
    let dir = tmpdir("data-changed");
    let data = dir.join("data");
    let first = images(&data, 0, 8);
    let cfg = data_config(&dir, &data);
    // 4 batches per epoch; 6 steps, stopped mid-epoch 1 with a checkpoint at step 6.
    let o = run(bin().args([
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--max-steps",
        "6",
        "--set",
        "output.checkpoint_save_interval=3",
    ]));
    assert!(o.status.success(), "{}", text(&o));
    let run_dir = dir.join("run");
    let ckpt = run_dir.join("checkpoints/step-00000006");
    let images_json = read_json(&ckpt.join("images.json"));
    assert_eq!(images_json["images"].as_array().unwrap().len(), 8);
    let state = read_json(&ckpt.join("state.json"));
    assert_eq!(state["loop"]["sampler"]["epoch"], 1);
    assert_eq!(state["loop"]["sampler"]["position"], 2);

    // Two images removed, three added: 9 images, 5 batches per epoch.
    std::fs::remove_file(&first[0]).unwrap();
    std::fs::remove_file(&first[5]).unwrap();
    images(&data, 20, 3);
    let yaml = run_dir.join("run.yaml");
    let y = std::fs::read_to_string(&yaml).unwrap();
    std::fs::write(&yaml, y.replace("max_steps: 6", "max_steps: 10")).unwrap();
    let o = resume(&run_dir);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("the data set in")
            && t.contains("3 image(s) added, 2 removed")
            && t.contains("added: img20.png, img21.png, img22.png")
            && t.contains("removed: img0.png, img5.png")
            && t.contains("(9 images, 5 batches per epoch) from the start of epoch 2"),
        "{t}"
    );
    assert!(t.contains("at step 10/10"), "{t}");
    let ckpt = run_dir.join("checkpoints/step-00000010");
    let now = read_json(&ckpt.join("images.json"));
    let names: Vec<&str> = now["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i[0].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 9);
    assert!(names.contains(&"img21.png") && !names.contains(&"img0.png"));
    let state = read_json(&ckpt.join("state.json"));
    assert_eq!(state["loop"]["steps_per_epoch"], 5);
    assert_eq!(state["loop"]["sampler"]["epoch"], 2);
    assert_eq!(state["loop"]["sampler"]["position"], 4);

    // A checkpoint that lists no images (written before they were recorded): a changed number
    // of batches per epoch is still noticed, and said to be all that is known.
    let mut state = read_json(&ckpt.join("state.json"));
    state["manifest"]["files"]
        .as_object_mut()
        .unwrap()
        .remove("images.json");
    std::fs::write(ckpt.join("state.json"), serde_json::to_vec(&state).unwrap()).unwrap();
    std::fs::remove_file(ckpt.join("images.json")).unwrap();
    images(&data, 30, 2);
    let y = std::fs::read_to_string(&yaml).unwrap();
    std::fs::write(&yaml, y.replace("max_steps: 10", "max_steps: 11")).unwrap();
    let o = resume(&run_dir);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("an epoch had 5 batches, now 6") && t.contains("is not known"),
        "{t}"
    );
}

/// A reference-shaped run folder: `graph/training_metrics.jsonl` with `lines`.
fn metrics_run(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let run = dir.join(name);
    std::fs::create_dir_all(run.join("graph")).unwrap();
    std::fs::write(run.join("graph/training_metrics.jsonl"), lines.join("\n")).unwrap();
    run
}

fn row(step: u64, loss: f64) -> String {
    format!(
        r#"{{"global_step": {step}, "metrics": {{"vae_loss": {loss}}}, "extras": {{"batch_time": 0.5}}}}"#
    )
}

#[test]
fn compare_names_malformed_lines_and_refuses_thresholds_that_mean_nothing() {
    let dir = tmpdir("compare");
    let good: Vec<String> = (1..=6).map(|s| row(s, 1.0 / s as f64)).collect();
    let a = metrics_run(&dir, "a", &good);
    let mut lines = good.clone();
    lines.insert(2, "{not json".into());
    lines.insert(4, r#"{"global_step": "five"}"#.into());
    let b = metrics_run(&dir, "b", &lines);
    let out = dir.join("cmp");
    let (a_s, b_s, out_s) = (
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let o = run(bin().args(["compare", a_s, b_s, "-o", out_s]));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let metrics = b.join("graph/training_metrics.jsonl");
    let warning = format!(
        "{}: skipped 2 malformed line(s) (not a JSON row with an integer global_step): line 3 and 5",
        metrics.display()
    );
    assert!(t.contains(&format!("warning: {warning}")), "{t}");
    let md = std::fs::read_to_string(out.join("comparison.md")).unwrap();
    assert!(md.contains(&warning), "{md}");
    assert!(!t.contains(&a.join("graph").display().to_string()), "{t}");

    for (args, needle) in [
        (
            &["--psnr", "NaN"][..],
            "--psnr NaN: a threshold must be a finite number",
        ),
        (
            &["--loss", "inf"][..],
            "--loss inf: a threshold must be a finite number",
        ),
        (&["--last", "0"][..], "--last 0"),
    ] {
        let o = run(bin().args(["compare", a_s, b_s, "-o", out_s]).args(args));
        refused(needle, &o, &[needle]);
    }
}

#[test]
fn eval_refuses_a_batch_of_zero() {
    let dir = tmpdir("eval-batch");
    let data = dir.join("data");
    images(&data, 0, 1);
    let ckpt = common::parity("tiny16.safetensors");
    let o = run(bin().args([
        "eval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--batch",
        "0",
    ]));
    refused("--batch 0", &o, &["--batch 0: must be at least 1"]);
}

/// `file` rewritten with its safetensors metadata changed by `edit`.
fn with_metadata(
    file: &Path,
    out: &Path,
    edit: impl Fn(&mut serde_json::Map<String, serde_json::Value>),
) {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let obj = header.as_object_mut().unwrap();
    let meta = obj
        .entry("__metadata__")
        .or_insert_with(|| serde_json::json!({}));
    edit(meta.as_object_mut().unwrap());
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut v = (h.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(&h);
    v.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(out, v).unwrap();
}

#[test]
fn info_reports_non_finite_weights_by_tensor_and_count() {
    let dir = tmpdir("info-nan");
    let file = dir.join("nan.safetensors");
    let victim = "diffuser.compressor.latent_proj.0.0.weight";
    let mut tensors = common::tiny16();
    let t = &tensors[victim];
    let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    v[0] = f32::NAN;
    v[3] = f32::INFINITY;
    let n = v.len();
    let bad = candle_core::Tensor::from_vec(v, t.shape(), t.device()).unwrap();
    tensors.insert(victim.into(), bad);
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let o = run(bin().args(["info", file.to_str().unwrap()]));
    refused(
        "NaN weights",
        &o,
        &[
            "non-finite values (NaN or infinity) in 1 tensor(s)",
            &format!("{victim}: 2 of {}", fluxflow::commands::info::group(n)),
            "1 tensor(s) hold non-finite values",
            // What it is reported beside: the description still comes.
            "model dimensions",
        ],
    );
}

#[test]
fn info_says_which_metadata_contradicts_which_tensor_shapes() {
    let dir = tmpdir("info-meta");
    let tiny = common::parity("tiny16.safetensors");
    // A baseline activation recorded on a Bezier-shaped file.
    let relu_on_bezier = dir.join("relu-on-bezier.safetensors");
    with_metadata(&tiny, &relu_on_bezier, |m| {
        m.insert("fluxflow.activation".into(), "relu".into());
    });
    let o = run(bin().args(["info", relu_on_bezier.to_str().unwrap()]));
    refused(
        "relu metadata",
        &o,
        &[
            "its metadata says fluxflow.activation = relu",
            "its tensor shapes are a Bezier model's",
            "diffuser.compressor.latent_proj.1.0.weight has 80 output channels, 5 x the 16",
        ],
    );

    // A baseline file: without its metadata it would be read as Bezier; with another width
    // multiplier its shapes do not match.
    let cfg = fluxflow::model::ModelConfig {
        vae_dim: 8,
        flow_dim: 8,
        flow_heads: 2,
        flow_layers: 1,
        vae_attn_layers: 1,
        vae_attn_heads: 2,
        text_embedding_dim: 8,
        text_hidden: 8,
        activation: fluxflow::model::Activation::Relu,
        baseline_width_mult: 3.0,
        ..fluxflow::model::ModelConfig::default()
    };
    let model = fluxflow::model::FluxModel::fresh(
        &cfg,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        0,
    )
    .unwrap();
    let baseline = dir.join("flxflow_final.safetensors");
    fluxflow::weights::save_model(&model, &baseline).unwrap();
    let o = run(bin().args(["info", baseline.to_str().unwrap()]));
    assert!(o.status.success(), "{}", text(&o));
    let stripped = dir.join("stripped.safetensors");
    with_metadata(&baseline, &stripped, |m| {
        m.remove("fluxflow.activation");
        m.remove("fluxflow.baseline_width_mult");
    });
    let o = run(bin().args(["info", stripped.to_str().unwrap()]));
    refused(
        "no metadata",
        &o,
        &[
            "no fluxflow.activation in its metadata, which means a Bezier model",
            "its tensor shapes are a baseline's",
        ],
    );
    let other_width = dir.join("width.safetensors");
    with_metadata(&baseline, &other_width, |m| {
        m.insert("fluxflow.baseline_width_mult".into(), "2".into());
    });
    let o = run(bin().args(["info", other_width.to_str().unwrap()]));
    refused(
        "width 2",
        &o,
        &[
            "its tensor shapes do not match the model its metadata describes",
            "fluxflow.baseline_width_mult = 2",
        ],
    );
}

#[test]
fn step_settings_edited_in_run_yaml_are_said_on_resume_and_loss_weights_followed() {
    let dir = tmpdir("step-settings");
    let run_dir = finished_run(&dir);
    let yaml = run_dir.join("run.yaml");
    let y = std::fs::read_to_string(&yaml).unwrap();
    for from in ["  kl_beta: 0.0001", "  train_spade: true", "  max_steps: 4"] {
        assert!(y.contains(from), "{from} not in run.yaml");
    }
    let y = y
        .replace("  kl_beta: 0.0001", "  kl_beta: 0.001")
        .replace("  train_spade: true", "  train_spade: false")
        .replace("  max_steps: 4", "  max_steps: 6");
    std::fs::write(&yaml, y).unwrap();
    let o = resume(&run_dir);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("training.kl_beta is 0.001 in run.yaml, 0.0001 in the checkpoint: training goes on with 0.001"),
        "{t}"
    );
    assert!(
        t.contains("training.train_spade is false in run.yaml, true in the checkpoint")
            && t.contains("goes on with true"),
        "{t}"
    );
    let state = read_json(&run_dir.join("checkpoints/step-00000006/state.json"));
    let c = &state["loop"]["trainers"]["vae"]["config"];
    assert_eq!(c["kl_beta"], 0.001);
    assert_eq!(c["use_spade"], true);
}
