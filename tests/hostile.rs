//! Hostile and careless input through the binary: every case ends in bounded time with a clear
//! error (or a warning) that names its source, and nothing is lost.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use common::{bin, parity, text};
use fluxflow::memory::{activation_bytes, human_bytes, BUDGET_ENV};

fn tmpdir(name: &str) -> PathBuf {
    common::fresh_dir("hostile", name)
}

/// Runs `cmd` to its end, failing the test (and killing the process) after `limit`.
fn run_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fluxflow starts");
    // Drain both pipes on threads so that a chatty process cannot block on a full pipe.
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
            let stderr = t_err.join().unwrap();
            let tail =
                String::from_utf8_lossy(&stderr[stderr.len().saturating_sub(2000)..]).into_owned();
            panic!(
                "still running after {limit:?} ({} bytes of stderr); its tail:\n{tail}",
                stderr.len()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
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

/// A tiny model's configuration training on `data` into `dir/run`.
fn config(dir: &Path, data: &Path, extra: &str) -> PathBuf {
    let text = format!(
        "model: {{vae_dim: 8, feature_maps_dim: 8, text_embedding_dim: 8, vae_attn_layers: 1,
         vae_attn_heads: 2, flow_heads: 2, flow_layers: 1, text_hidden: 8,
         use_gradient_checkpointing: false}}
data:
  data_path: {}
training:
  n_epochs: 2
  batch_size: 2
  workers: 1
  lr: 0.001
  seed: 3
{extra}
output:
  output_path: {}
  log_interval: 1
  checkpoint_save_interval: 2
  samples_per_checkpoint: 100
  keep_last: 3
",
        data.display(),
        dir.join("run").display()
    );
    let p = dir.join("config.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

/// `n` 32x32 PNG images in `dir`.
fn images(dir: &Path, n: u32) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    (0..n)
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
fn a_folder_whose_only_image_is_cut_off_is_an_error_not_a_hang() {
    let dir = tmpdir("cutoff");
    let data = dir.join("data");
    let good = images(&dir.join("good"), 1).remove(0);
    std::fs::create_dir_all(&data).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    // A valid PNG header (the scan reads the size) and a body cut off after 42 bytes.
    std::fs::write(data.join("t.png"), &bytes[..42]).unwrap();
    let cfg = config(&dir, &data, "");
    let o = run_within(
        bin().args(["train", "--config", cfg.to_str().unwrap()]),
        Duration::from_secs(60),
    );
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("no readable image remains") && t.contains(&data.display().to_string()),
        "{t}"
    );
    // Named once, not once per attempt.
    assert_eq!(t.matches("skipping").count(), 1, "{t}");
    assert!(!dir.join("run/checkpoints/step-00000001").exists());
}

#[test]
fn a_bad_image_among_good_ones_is_named_once_and_dropped() {
    let dir = tmpdir("onebad");
    let data = dir.join("data");
    let good = images(&data, 3);
    let bytes = std::fs::read(&good[0]).unwrap();
    std::fs::write(data.join("t.png"), &bytes[..42]).unwrap();
    // Two epochs of 2 batches each: the cut-off image is drawn in both, named once.
    let cfg = config(&dir, &data, "");
    let o = run(bin().args(["train", "--config", cfg.to_str().unwrap()]));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert_eq!(t.matches("skipping").count(), 1, "{t}");
    assert!(t.contains("1 unreadable file"), "{t}");
}

/// tiny16's model with `f` applied to each `diffuser.*` tensor, saved as `path`.
fn model_variant(path: &Path, f: impl Fn(&str, &Tensor) -> Tensor) {
    let tensors = fluxflow::weights::read_tensors(&parity("tiny16.safetensors")).unwrap();
    let changed: HashMap<String, Tensor> = tensors
        .iter()
        .filter(|(k, _)| k.starts_with("diffuser."))
        .map(|(k, t)| (k.clone(), f(k, t)))
        .collect();
    candle_core::safetensors::save(&changed, path).unwrap();
}

fn reconstruct(dir: &Path, ckpt: &Path) -> Output {
    let img = dir.join("in.png");
    image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([x as u8 * 8, y as u8 * 8, 9]))
        .save(&img)
        .unwrap();
    run(bin().args([
        "reconstruct",
        img.to_str().unwrap(),
        "-c",
        ckpt.to_str().unwrap(),
        "-o",
        dir.join("out.png").to_str().unwrap(),
    ]))
}

#[test]
fn a_checkpoint_of_integer_tensors_is_refused_naming_a_tensor() {
    let dir = tmpdir("int-ckpt");
    let ckpt = dir.join("int.safetensors");
    model_variant(&ckpt, |_, t| t.to_dtype(DType::I64).unwrap());
    let o = reconstruct(&dir, &ckpt);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("int.safetensors") && t.contains("is stored as I64") && t.contains("diffuser."),
        "{t}"
    );
    assert!(!dir.join("out.png").exists());
    let o = run(bin().args(["info", ckpt.to_str().unwrap()]));
    assert!(
        !o.status.success() && text(&o).contains("is stored as I64"),
        "{}",
        text(&o)
    );
}

#[test]
fn non_finite_weights_are_refused_naming_the_tensor() {
    let dir = tmpdir("nan-ckpt");
    let ckpt = dir.join("nan.safetensors");
    let victim = "diffuser.compressor.latent_proj.0.0.weight";
    model_variant(&ckpt, |k, t| {
        if k == victim {
            (t * f64::NAN).unwrap()
        } else {
            t.clone()
        }
    });
    let o = reconstruct(&dir, &ckpt);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains(victim) && t.contains("non-finite"), "{t}");
    assert!(!dir.join("out.png").exists());
}

/// A safetensors file from its header JSON and data bytes.
fn raw_safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

#[test]
fn a_duplicated_tensor_name_is_reported_as_duplicated() {
    let dir = tmpdir("dup");
    let p = dir.join("dup.safetensors");
    let header = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    std::fs::write(&p, raw_safetensors(header, &[0u8; 12])).unwrap();
    let o = run(bin().args(["info", p.to_str().unwrap()]));
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("tensor a is listed twice") && t.contains("dup.safetensors"),
        "{t}"
    );
}

#[test]
fn a_huge_file_of_zeros_is_refused_without_reading_it() {
    let dir = tmpdir("zeros");
    let p = dir.join("zeros.safetensors");
    // 3 GB, sparse: header length 0, then nothing.
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(3 << 30).unwrap();
    drop(f);
    let o = run_within(
        bin().args(["info", p.to_str().unwrap()]),
        Duration::from_secs(20),
    );
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("zeros.safetensors") && t.contains("not a valid safetensors"),
        "{t}"
    );
    // The reader's memory bound itself is tested with a counting allocator in
    // tests/checkpoint_reader.rs.
}

#[test]
fn a_disk_full_before_the_first_checkpoint_says_no_checkpoint_exists() {
    let dir = tmpdir("diskfull-first");
    let data = dir.join("data");
    images(&data, 4);
    let cfg = config(&dir, &data, "");
    let o = run(bin()
        .args(["train", "--config", cfg.to_str().unwrap()])
        .env("FLUXFLOW_INJECT_WRITE_FAILURE", "trainer.safetensors"));
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("No space left on device"), "{t}");
    assert!(
        t.contains("no earlier checkpoint of this run exists"),
        "{t}"
    );
    assert!(!t.contains("is intact"), "{t}");
}

#[test]
fn a_state_file_beyond_its_folder_makes_resume_fall_back_with_a_warning() {
    let dir = tmpdir("state999");
    let data = dir.join("data");
    images(&data, 8);
    let cfg = config(&dir, &data, "");
    let o = run(bin().args([
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--max-steps",
        "4",
    ]));
    assert!(o.status.success(), "{}", text(&o));
    let newest = dir.join("run/checkpoints/step-00000004/state.json");
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&newest).unwrap()).unwrap();
    state["loop"]["global_step"] = 999.into();
    std::fs::write(&newest, serde_json::to_vec(&state).unwrap()).unwrap();
    let o = run(bin().args(["resume", "--output", dir.join("run").to_str().unwrap()]));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("global_step 999") && t.contains("falling back") && t.contains("at step 2 of 4"),
        "{t}"
    );
    assert!(t.contains("at step 4/4"), "{t}");
}

/// Global steps of the metrics rows that carry a training loss, in file order.
fn metric_steps(run: &Path) -> Vec<u64> {
    let log = std::fs::read_to_string(run.join("graph/training_metrics.jsonl")).unwrap_or_default();
    log.lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            v["extras"].get("step_vae_loss")?;
            v["global_step"].as_u64()
        })
        .collect()
}

#[test]
fn a_second_process_on_a_run_folder_is_refused_and_the_first_keeps_its_metrics_in_order() {
    let dir = tmpdir("two-writers");
    let data = dir.join("data");
    images(&data, 8);
    let cfg = config(&dir, &data, "");
    let run_dir = dir.join("run");
    let mut first = bin()
        .args([
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            "training.n_epochs=10",
            "--set",
            "output.checkpoint_save_interval=20",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while metric_steps(&run_dir).len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the first run never logged a step"
        );
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first run ended early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = first.id().to_string();
    let attempts: [&[&str]; 3] = [
        &["train", "--config", cfg.to_str().unwrap(), "--force"],
        &["train", "--config", cfg.to_str().unwrap()],
        &["resume", "--output", run_dir.to_str().unwrap()],
    ];
    for args in attempts {
        let o = run(bin().args(args));
        let t = text(&o);
        assert!(!o.status.success(), "{args:?}: {t}");
        assert!(
            t.contains("in use by process") && t.contains(&pid),
            "{args:?}: {t}"
        );
    }
    assert!(first.wait().unwrap().success());
    let steps = metric_steps(&run_dir);
    assert_eq!(steps, (1..=40).collect::<Vec<u64>>());
    // The lock went with the process: the folder can be used again.
    let o = run(bin().args([
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--force",
        "--max-steps",
        "1",
    ]));
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn configuration_errors_name_the_override_or_the_file_and_the_key() {
    let dir = tmpdir("config-errors");
    let base = dir.join("base.yaml");
    std::fs::write(&base, "data:\n  synthetic: {count: 4}\n").unwrap();
    let b = base.to_str().unwrap();
    let cases: &[(&str, &[&str])] = &[
        ("a.b.c=1", &["--set a.b.c=1", "unknown field `a`"]),
        (
            "training.lr=abc",
            &["--set training.lr=abc", "training.lr", "invalid type"],
        ),
        (
            "training=5",
            &["--set training=5", "training:", "invalid type"],
        ),
        (
            "model.vae_dim=-5",
            &["--set model.vae_dim=-5", "model.vae_dim", "-5"],
        ),
        (
            "training.lr=.inf",
            &["--set training.lr=.inf", "training.lr", "must be finite"],
        ),
        (
            "training.lr=-1",
            &["--set training.lr=-1", "training.lr must be positive"],
        ),
        (
            "training.lr.x=1",
            &["--set training.lr.x=1", "training.lr", "invalid type"],
        ),
        (
            "training.lr",
            &["--set training.lr", "expected section.key=value"],
        ),
        ("training.lr=[", &["--set training.lr=[", "not valid YAML"]),
        (
            "output.keep_last=0",
            &["--set output.keep_last=0", "output.keep_last"],
        ),
        // Dimensions the layers cannot take: refused up front, not at the first forward.
        (
            "model.vae_dim=48",
            &["--set model.vae_dim=48", "model.vae_dim (48)"],
        ),
        (
            "model.flow_layers=0",
            &["--set model.flow_layers=0", "model.flow_layers"],
        ),
        (
            "model.downscales=40",
            &["--set model.downscales=40", "at most 4"],
        ),
        (
            "data.synthetic.width=100000",
            &[
                "--set data.synthetic.width=100000",
                "data.synthetic.width must be at most",
            ],
        ),
    ];
    for (set, needles) in cases {
        let o = run(bin().args(["train", "--config", b, "--set", set]));
        let t = text(&o);
        assert!(!o.status.success(), "{set}: {t}");
        for n in *needles {
            assert!(t.contains(n), "{set}: expected {n:?} in {t}");
        }
        assert!(!t.contains("base.yaml"), "{set}: the file is blamed: {t}");
        assert!(!t.contains("panicked"), "{set}: {t}");
    }
    for key in [
        "training: {batch_size: -1}",
        "training: {n_epochs: -1}",
        "output: {checkpoint_save_interval: -1}",
        "output: {log_interval: -1}",
        "training: {lr: .nan}",
        "training: {kl_beta: -.inf}",
    ] {
        std::fs::write(&base, format!("data:\n  synthetic: {{count: 4}}\n{key}\n")).unwrap();
        let o = run(bin().args(["train", "--config", b]));
        let t = text(&o);
        assert!(!o.status.success(), "{key}: {t}");
        let (section, rest) = key.split_once(": {").unwrap();
        let name = rest.split(':').next().unwrap();
        assert!(
            t.contains("base.yaml") && t.contains(&format!("{section}.{name}")),
            "{key}: {t}"
        );
        assert!(!t.contains("check the key's spelling"), "{key}: {t}");
    }
}

#[test]
fn bench_refuses_bad_numbers_and_sizes_that_cannot_fit_before_allocating() {
    let cases: &[(&[&str], &str)] = &[
        (&["--quickstart", "--steps", "0"], "--steps 0"),
        (
            &["--quickstart", "--batch", "0"],
            "--batch 0: must be at least 1",
        ),
        (
            &["--quickstart", "--width", "0"],
            "--width 0: must be at least 1",
        ),
        (
            &["--quickstart", "--width", "7"],
            "--width 7: must be a multiple of",
        ),
        (
            &["--quickstart", "--height", "31"],
            "--height 31: must be a multiple of",
        ),
        // The Phase 1 model: hundreds of GB of activations, refused with the estimate against
        // the budget set below, whatever this machine's memory.
        (
            &["--height", "100000"],
            "needs about 393 GB for its activations, more than the memory budget of 64.0 GB \
             (FLUXFLOW_MEMORY_BUDGET=64G)",
        ),
    ];
    for (args, needle) in cases {
        let o = run_within(
            bin()
                .arg("bench")
                .args(*args)
                .env("RUST_BACKTRACE", "0")
                .env(BUDGET_ENV, "64G"),
            Duration::from_secs(60),
        );
        let t = text(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {t}");
        assert!(t.contains(needle), "{args:?}: expected {needle:?} in {t}");
        assert!(
            !t.contains("panicked") && !t.contains("backtrace"),
            "{args:?}: {t}"
        );
    }
}

#[test]
fn reconstruct_scales_an_image_beyond_the_pixel_budget_down_with_a_note() {
    let dir = tmpdir("big-jpeg");
    let img = dir.join("big.jpg");
    image::RgbImage::from_fn(4000, 3000, |x, y| {
        image::Rgb([(x / 16) as u8, (y / 12) as u8, ((x + y) / 28) as u8])
    })
    .save(&img)
    .unwrap();
    let out = dir.join("out.png");
    let o = run(bin().args([
        "reconstruct",
        img.to_str().unwrap(),
        "-c",
        parity("tiny16.safetensors").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--max-pixels",
        "20000",
    ]));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("4000x3000 is more than --max-pixels 20000"),
        "{t}"
    );
    let (w, h) = image::image_dimensions(&out).unwrap();
    assert!(w * h <= 20000 * 5 / 4 && w > h, "{w}x{h}");
    let o = run(bin().args([
        "reconstruct",
        "--max-pixels",
        "0",
        img.to_str().unwrap(),
        "-c",
        "x",
    ]));
    assert!(
        !o.status.success() && text(&o).contains("--max-pixels 0"),
        "{}",
        text(&o)
    );
    let help = text(&run(bin().args(["reconstruct", "--help"])));
    assert!(
        help.contains("--max-pixels") && help.contains("1048576"),
        "{help}"
    );
}

#[test]
fn settings_that_defeat_themselves_are_warned_about() {
    let dir = tmpdir("self-defeating");
    let data = dir.join("data");
    images(&data, 3);
    // A batch larger than the data set, a size cap beyond every (32x32) image.
    let cfg = config(&dir, &data, "  max_steps: 1");
    let o = run(bin().args([
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "training.batch_size=8",
        "--set",
        "data.img_size=256",
    ]));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("training.batch_size 8 is larger than the data set (3 images"),
        "{t}"
    );
    assert!(
        t.contains("data.img_size 256 is beyond every image") && t.contains("32x32"),
        "{t}"
    );

    // No model section: the full Phase 1 model. The warning comes before the first step; the
    // process is stopped once it has been seen.
    let bare = dir.join("bare.yaml");
    std::fs::write(
        &bare,
        format!(
            "data: {{data_path: {}}}\noutput: {{output_path: {}}}\n",
            data.display(),
            dir.join("bare-run").display()
        ),
    )
    .unwrap();
    let mut child = bin()
        .args(["train", "--config", bare.to_str().unwrap()])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            if seen.contains("no model section") {
                break;
            }
        }
        seen
    });
    let start = Instant::now();
    while !reader.is_finished() && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let seen = reader.join().unwrap();
    assert!(
        seen.contains("no model section")
            && seen.contains("112M parameters")
            && seen.contains("on the CPU"),
        "{seen}"
    );
}

#[test]
fn a_training_size_that_cannot_fit_is_refused_with_the_estimate_before_the_model_is_built() {
    let dir = tmpdir("too-big");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    image::RgbImage::from_fn(2048, 2048, |x, y| image::Rgb([x as u8, y as u8, 7]))
        .save(data.join("big.png"))
        .unwrap();
    // The Phase 1 model (no model section) on a 2048x2048 image: over 100 GB of activations,
    // held against a 64 GB budget (never one above the estimate: that would start the step).
    let cfg = dir.join("cfg.yaml");
    std::fs::write(
        &cfg,
        format!(
            "data: {{data_path: {}}}\noutput: {{output_path: {}}}\n",
            data.display(),
            dir.join("run").display()
        ),
    )
    .unwrap();
    let o = run_within(
        bin()
            .args(["train", "--config", cfg.to_str().unwrap()])
            .env(BUDGET_ENV, "64G"),
        Duration::from_secs(60),
    );
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("needs about 129 GB")
            && t.contains("(FLUXFLOW_MEMORY_BUDGET=64G)")
            && t.contains("2048x2048")
            && t.contains("data.img_size"),
        "{t}"
    );
    assert!(!dir.join("run/checkpoints").exists(), "{t}");
}

#[test]
fn resume_falls_back_from_a_checkpoint_whose_weights_are_not_finite() {
    let dir = tmpdir("nan-resume");
    let data = dir.join("data");
    images(&data, 8);
    let cfg = config(&dir, &data, "");
    let o = run(bin().args([
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--max-steps",
        "4",
    ]));
    assert!(o.status.success(), "{}", text(&o));
    // NaN over the newest model file's first tensor, in place (the manifest's sizes still hold).
    let model = dir.join("run/checkpoints/step-00000004/flxflow_final.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for chunk in bytes[8 + n..8 + n + 16].chunks_mut(4) {
        chunk.copy_from_slice(&f32::NAN.to_le_bytes());
    }
    std::fs::write(&model, &bytes).unwrap();
    let o = run(bin().args(["resume", "--output", dir.join("run").to_str().unwrap()]));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("non-finite") && t.contains("falling back") && t.contains("at step 2 of 4"),
        "{t}"
    );
}

#[test]
fn eval_refuses_an_image_whose_reconstruction_cannot_fit_with_the_estimate() {
    let dir = tmpdir("eval-big");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    // tiny16 (vae_dim 16) at 4096x4096 (within --max-pixels): tens of GB of activations,
    // against a 16 GiB budget given both ways (the flag wins over the variable's 1 TB).
    image::RgbImage::from_fn(4096, 4096, |x, y| image::Rgb([x as u8, y as u8, 5]))
        .save(data.join("huge.png"))
        .unwrap();
    let o = run_within(
        bin()
            .args([
                "eval",
                "--checkpoint",
                parity("tiny16.safetensors").to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--memory-budget",
                "16GiB",
                "--max-pixels",
                "16777216",
            ])
            .env(BUDGET_ENV, "1T"),
        Duration::from_secs(60),
    );
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("needs about 42.9 GB")
            && t.contains("memory budget of 17.2 GB (--memory-budget 16GiB)")
            && t.contains("4096x4096")
            && t.contains("huge.png"),
        "{t}"
    );
}

/// The embedded quickstart's model.
fn quickstart_model() -> fluxflow::model::ModelConfig {
    use fluxflow::config::{Config, Overrides, QUICKSTART};
    Config::parse(QUICKSTART, "quickstart", &Overrides::default())
        .unwrap()
        .model_config()
}

/// tiny16's model, as its checkpoint gives it.
fn tiny16_model() -> fluxflow::model::ModelConfig {
    let path = parity("tiny16.safetensors");
    fluxflow::weights::load_model(&path, DType::F32, &Device::Cpu)
        .unwrap()
        .model
        .config
}

/// Both sides of the memory check for a request whose activations are estimated at
/// `estimate` bytes: with a budget one byte below it, `cmd` is refused with the estimate and
/// the budget's source, given as `--memory-budget` and as `FLUXFLOW_MEMORY_BUDGET`; with a
/// budget of the estimate itself (given as the flag, which wins over the variable's 1 byte)
/// it is not refused. Returns that run's output. Only for requests that are cheap to run.
fn refused_below_and_run_at(what: &str, cmd: impl Fn() -> Command, estimate: u64) -> Output {
    let need = format!("needs about {} for its activations", human_bytes(estimate));
    let below = (estimate - 1).to_string();
    for (flag, source) in [
        (true, format!("(--memory-budget {below})")),
        (false, format!("({BUDGET_ENV}={below})")),
    ] {
        let mut c = cmd();
        if flag {
            c.args(["--memory-budget", &below]);
        } else {
            c.env(BUDGET_ENV, &below);
        }
        let o = run_within(&mut c, Duration::from_secs(60));
        let t = text(&o);
        assert_eq!(o.status.code(), Some(1), "{what}, budget {below}: {t}");
        assert!(
            t.contains(&need) && t.contains(&source),
            "{what}, budget {below}: expected {need:?} and {source:?} in {t}"
        );
    }
    let at = estimate.to_string();
    let o = run(cmd().args(["--memory-budget", &at]).env(BUDGET_ENV, "1"));
    let t = text(&o);
    assert!(o.status.success(), "{what}, budget {at}: {t}");
    assert!(!t.contains("needs about"), "{what}, budget {at}: {t}");
    o
}

#[test]
fn bench_is_refused_just_below_its_estimate_and_runs_at_it() {
    // The quickstart's training step at 32x32, batch 2: about 3.9 MB of activations.
    let estimate = activation_bytes(&quickstart_model(), 2, 32, 32, DType::F32, true);
    assert!(estimate < 10_000_000, "{estimate}");
    let bench = || {
        let mut c = bin();
        c.args([
            "bench",
            "--quickstart",
            "--width",
            "32",
            "--height",
            "32",
            "--steps",
            "1",
        ]);
        c
    };
    let o = refused_below_and_run_at("bench", bench, estimate);
    assert!(text(&o).contains("training step, batch 2 of 32x32"));
    // The forward pass alone is held against its own, smaller estimate.
    let forward = activation_bytes(&quickstart_model(), 2, 32, 32, DType::F32, false);
    let bench_forward = || {
        let mut c = bench();
        c.arg("--forward-only");
        c
    };
    refused_below_and_run_at("bench --forward-only", bench_forward, forward);
}

#[test]
fn train_and_resume_are_refused_just_below_their_estimate_and_run_at_it() {
    let dir = tmpdir("budget-train");
    let data = dir.join("data");
    images(&data, 2);
    // Two 32x32 images, batch 2, one step.
    let cfg = config(&dir, &data, "  max_steps: 1");
    let model = fluxflow::config::Config::load(&cfg, &Default::default())
        .unwrap()
        .model_config();
    let estimate = activation_bytes(&model, 2, 32, 32, DType::F32, true);
    let train = || {
        let mut c = bin();
        c.args(["train", "--config", cfg.to_str().unwrap()]);
        c
    };
    let o = refused_below_and_run_at("train", train, estimate);
    assert!(
        text(&o).contains("max_steps reached at step 1/"),
        "{}",
        text(&o)
    );
    let resume = || {
        let mut c = bin();
        c.args(["resume", "--output", dir.join("run").to_str().unwrap()]);
        c
    };
    // The run is complete at its max_steps 1: resume gets past the check and stops at once.
    let o = refused_below_and_run_at("resume", resume, estimate);
    assert!(text(&o).contains("resuming"), "{}", text(&o));
}

#[test]
fn reconstruct_and_eval_are_refused_just_below_their_estimate_and_run_at_it() {
    let dir = tmpdir("budget-recon");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let img = data.join("small.png");
    image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([(x * 8) as u8, (y * 8) as u8, 9]))
        .save(&img)
        .unwrap();
    let checkpoint = parity("tiny16.safetensors");
    // tiny16's forward pass of one 32x32 image: about 2.6 MB of activations.
    let estimate = activation_bytes(&tiny16_model(), 1, 32, 32, DType::F32, false);
    let reconstruct = || {
        let mut c = bin();
        c.args([
            "reconstruct",
            img.to_str().unwrap(),
            "-c",
            checkpoint.to_str().unwrap(),
            "-o",
            dir.join("out.png").to_str().unwrap(),
        ]);
        c
    };
    let o = refused_below_and_run_at("reconstruct", reconstruct, estimate);
    assert!(text(&o).contains("PSNR"), "{}", text(&o));
    let eval = || {
        let mut c = bin();
        c.args([
            "eval",
            "--checkpoint",
            checkpoint.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ]);
        c
    };
    let o = refused_below_and_run_at("eval", eval, estimate);
    assert!(text(&o).contains("small.png"), "{}", text(&o));
}

#[test]
fn a_bad_memory_budget_is_an_error_naming_the_flag_or_the_variable_and_the_value() {
    for (flag, env, needle) in [
        (Some("8X"), None, "'8X' for '--memory-budget <SIZE>'"),
        (Some("0"), None, "'0' for '--memory-budget <SIZE>'"),
        (None, Some("lots"), "FLUXFLOW_MEMORY_BUDGET=lots"),
        (None, Some("-1G"), "FLUXFLOW_MEMORY_BUDGET=-1G"),
    ] {
        let mut c = bin();
        c.args(["bench", "--quickstart", "--steps", "1"]);
        if let Some(v) = flag {
            c.args(["--memory-budget", v]);
        }
        match env {
            Some(v) => c.env(BUDGET_ENV, v),
            None => c.env_remove(BUDGET_ENV),
        };
        let o = run_within(&mut c, Duration::from_secs(60));
        let t = text(&o);
        assert!(!o.status.success(), "{flag:?} {env:?}: {t}");
        assert!(
            t.contains(needle) && !t.contains("training step,"),
            "{flag:?} {env:?}: expected {needle:?} in {t}"
        );
        // A value that is not a size says what a size is.
        assert!(flag == Some("0") || t.contains("8GiB"), "{t}");
    }
    let help = text(&run(bin().args(["bench", "--help"])));
    assert!(
        help.contains("--memory-budget <SIZE>")
            && help.contains("powers of 1000")
            && help.contains("powers of 1024")
            && help.contains("FLUXFLOW_MEMORY_BUDGET"),
        "{help}"
    );
}

/// Without a budget, the memory check sees the process's address-space limit (`ulimit -v`):
/// a request beyond it is refused with the estimate instead of aborting in the allocator.
#[cfg(target_os = "linux")]
#[test]
fn a_request_beyond_the_address_space_limit_is_refused_with_the_estimate() {
    use std::os::unix::process::CommandExt;
    const LIMIT: u64 = 2 << 30;
    // The quickstart's training step at 1024x1024, batch 2: about 4 GB of activations, more
    // than the limit (and than the address space it leaves), less than most machines have.
    let estimate = activation_bytes(&quickstart_model(), 2, 1024, 1024, DType::F32, true);
    assert!(estimate > LIMIT, "{estimate}");
    let mut c = bin();
    c.args([
        "bench",
        "--quickstart",
        "--batch",
        "2",
        "--width",
        "1024",
        "--height",
        "1024",
        "--steps",
        "1",
    ])
    .env_remove(BUDGET_ENV)
    .env("RUST_BACKTRACE", "0");
    // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
    unsafe {
        c.pre_exec(|| {
            let r = libc::rlimit {
                rlim_cur: LIMIT,
                rlim_max: LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = run_within(&mut c, Duration::from_secs(60));
    let t = text(&o);
    // An allocator abort ends the process by a signal (no exit code).
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains(&format!("needs about {}", human_bytes(estimate))),
        "{t}"
    );
    // The address space is the smallest limit, unless this machine has even less memory left.
    let machine = fluxflow::memory::available_bytes(&Device::Cpu);
    if machine.is_some_and(|m| m > LIMIT) {
        assert!(
            t.contains("address-space limit (ulimit -v: 2.15 GB"),
            "{machine:?}: {t}"
        );
    }
}
