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
