//! The `fluxflow` binary end to end: reconstruct and info.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use candle_core::{DType, Tensor};
use common::{parity, tiny16};
use image::{GrayImage, RgbImage, RgbaImage};

fn fluxflow(args: &[&str]) -> Output {
    common::bin()
        .args(args)
        .output()
        .expect("the fluxflow binary runs")
}

fn tmpdir(name: &str) -> PathBuf {
    common::fresh_dir("cli", name)
}

/// Sample `i` of a [B, 3, H, W] tensor in [-1, 1] as 8-bit RGB: round((y + 1) * 127.5).
fn to_rgb(t: &Tensor, i: usize) -> RgbImage {
    let t = t.get(i).unwrap().to_dtype(DType::F64).unwrap();
    let (_, h, w) = t.dims3().unwrap();
    let v: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let px = |c: usize| {
            let y = v[c * h * w + y as usize * w + x as usize].clamp(-1.0, 1.0);
            ((y + 1.0) * 127.5).round() as u8
        };
        image::Rgb([px(0), px(1), px(2)])
    })
}

fn str_of(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn reconstruct_reproduces_the_reference_posterior_mean_decode() {
    let dir = tmpdir("recon");
    let fx = tiny16();
    let ckpt = parity("tiny16.safetensors");
    for i in 0..2 {
        let input = dir.join(format!("in{i}.png"));
        to_rgb(&fx["fixture.image"], i).save(&input).unwrap();
        let out = dir.join(format!("out{i}.png"));
        let o = fluxflow(&[
            "reconstruct",
            input.to_str().unwrap(),
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--dtype",
            "f64",
        ]);
        assert!(o.status.success(), "{}", str_of(&o.stderr));
        let stdout = str_of(&o.stdout);
        assert!(
            stdout.contains("PSNR") && stdout.contains("48x32"),
            "{stdout}"
        );

        let ours = image::open(&out).unwrap().to_rgb8();
        let expected = to_rgb(&fx["fixture.recon_mean"], i);
        assert_eq!(ours.dimensions(), expected.dimensions());
        // The input went through 8 bits, so a pixel may round to the neighbouring level.
        let diffs: Vec<i32> = ours
            .as_raw()
            .iter()
            .zip(expected.as_raw())
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .collect();
        let exact = diffs.iter().filter(|d| **d == 0).count() as f64 / diffs.len() as f64;
        assert!(
            diffs.iter().all(|d| *d <= 1),
            "a pixel is off by more than one level"
        );
        assert!(exact > 0.95, "only {:.1}% of values exact", exact * 100.0);
    }
}

#[test]
fn reconstruct_converts_grey_and_rgba_and_resizes_to_a_training_size() {
    let dir = tmpdir("convert");
    let ckpt = parity("tiny16.safetensors");
    let grey = dir.join("grey.png");
    GrayImage::from_fn(50, 37, |x, y| image::Luma([(x * 5 + y) as u8]))
        .save(&grey)
        .unwrap();
    let rgba = dir.join("rgba.webp");
    RgbaImage::from_fn(32, 16, |x, y| {
        image::Rgba([x as u8 * 8, y as u8 * 16, 90, 128])
    })
    .save(&rgba)
    .unwrap();
    let jpeg = dir.join("photo.jpg");
    RgbImage::from_fn(48, 48, |x, y| image::Rgb([x as u8 * 5, y as u8 * 5, 40]))
        .save(&jpeg)
        .unwrap();
    for (input, size) in [(&grey, (64, 48)), (&rgba, (32, 16)), (&jpeg, (48, 48))] {
        // Not `rgba.webp` itself: an output over the input is refused.
        let out = dir.join(format!(
            "{}.recon.webp",
            input.file_stem().unwrap().to_string_lossy()
        ));
        let o = fluxflow(&[
            "reconstruct",
            input.to_str().unwrap(),
            "-c",
            ckpt.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--sample",
            "--seed",
            "5",
        ]);
        assert!(o.status.success(), "{}", str_of(&o.stderr));
        let img = image::open(&out).unwrap();
        assert_eq!((img.width(), img.height()), size, "{}", input.display());
    }
}

#[test]
fn reconstruct_with_bad_inputs_fails_cleanly_naming_the_file() {
    let dir = tmpdir("bad");
    let ckpt = parity("tiny16.safetensors");
    let img = dir.join("ok.png");
    RgbImage::new(16, 16).save(&img).unwrap();
    let broken = dir.join("broken.png");
    std::fs::write(&broken, b"\x89PNG\r\n\x1a\n garbage").unwrap();
    let bad_ckpt = dir.join("bad.safetensors");
    std::fs::write(&bad_ckpt, b"").unwrap();

    let cases: [(&Path, &Path, &str); 3] = [
        (&broken, &ckpt, "broken.png"),
        (&img, &bad_ckpt, "bad.safetensors"),
        (&dir.join("nope.png"), &ckpt, "nope.png"),
    ];
    for (image, checkpoint, named) in cases {
        let o = fluxflow(&[
            "reconstruct",
            image.to_str().unwrap(),
            "-c",
            checkpoint.to_str().unwrap(),
            "-o",
            dir.join("out.png").to_str().unwrap(),
        ]);
        let err = str_of(&o.stderr);
        assert!(!o.status.success());
        assert!(err.contains(named), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(!dir.join("out.png").exists());
}

#[test]
fn info_reports_dimensions_parameters_and_tensors() {
    let o = fluxflow(&["info", parity("tiny16.safetensors").to_str().unwrap()]);
    assert!(o.status.success(), "{}", str_of(&o.stderr));
    let s = str_of(&o.stdout);
    for needle in [
        "vae_dim 16",
        "flow heads 2",
        "compressor       235,213",
        "expander         1,718,239",
        "flow_processor   54,032",
        "total            2,007,484",
        "tensors: 291 (F32 x291)",
    ] {
        assert!(s.contains(needle), "{needle:?} not in:\n{s}");
    }
}

#[test]
fn sampled_reconstructions_follow_the_seed() {
    let dir = tmpdir("seed");
    let ckpt = parity("tiny16.safetensors");
    let input = dir.join("in.png");
    to_rgb(&tiny16()["fixture.image"], 0).save(&input).unwrap();
    let recon = |name: &str, extra: &[&str]| -> Vec<u8> {
        let out = dir.join(name);
        let mut args = vec![
            "reconstruct",
            input.to_str().unwrap(),
            "-c",
            ckpt.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--dtype",
            "f64",
        ];
        args.extend_from_slice(extra);
        let o = fluxflow(&args);
        assert!(o.status.success(), "{}", str_of(&o.stderr));
        image::open(&out).unwrap().to_rgb8().into_raw()
    };
    let mean = recon("mean.png", &[]);
    let a = recon("a.png", &["--sample", "--seed", "1"]);
    let again = recon("a2.png", &["--sample", "--seed", "1"]);
    let b = recon("b.png", &["--sample", "--seed", "2"]);
    assert_eq!(a, again, "the same seed gives the same reconstruction");
    assert_ne!(a, b, "another seed draws another latent");
    assert_ne!(a, mean, "a sampled latent is not the posterior mean");
}

#[test]
fn bench_prints_one_json_line_and_refuses_zero_steps() {
    let small = [
        "bench",
        "--quickstart",
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "1",
    ];
    for extra in [
        &["--json"][..],
        &["--json", "--forward-only", "--checkpointing", "on"],
    ] {
        let args: Vec<&str> = small.iter().chain(extra).copied().collect();
        let out = fluxflow(&args);
        assert!(out.status.success(), "{}", str_of(&out.stderr));
        let line = str_of(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(line.trim()).expect("one JSON line");
        for key in [
            "median_step_s",
            "images_per_s",
            "peak_rss_mb",
            "device",
            "dtype",
            "batch",
            "width",
            "height",
            "checkpointing",
            "mixed_precision",
            "forward_only",
        ] {
            assert!(v.get(key).is_some(), "{key} missing from {line}");
        }
        assert_eq!(v["forward_only"], extra.contains(&"--forward-only"));
        assert!(v["median_step_s"].as_f64().unwrap() > 0.0);
        // The quickstart names no optimizer file: the reference's default for the VAE.
        assert_eq!(v["optimizer"], "AdamW", "{line}");
    }
    // A configuration's optimizer file decides the benchmark's optimizer (the Phase 1 file:
    // RMSprop); a missing one is an error naming the setting and the file.
    let dir = tmpdir("bench-optimizer");
    let quickstart = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/quickstart.yaml"),
    )
    .unwrap();
    let optim = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/optim-config-p1.json");
    for (name, file, ok) in [
        ("p1.yaml", optim.clone(), true),
        ("missing.yaml", dir.join("no-such.json"), false),
    ] {
        let text = quickstart.replace(
            "optim_sched_config: null",
            &format!("optim_sched_config: {}", file.display()),
        );
        assert_ne!(text, quickstart, "the quickstart names optim_sched_config");
        let cfg = dir.join(name);
        std::fs::write(&cfg, text).unwrap();
        let cfg = cfg.to_str().unwrap();
        let mut args = small.to_vec();
        args.splice(1..2, ["--config", cfg]);
        args.push("--json");
        let out = fluxflow(&args);
        if ok {
            assert!(out.status.success(), "{}", str_of(&out.stderr));
            let v: serde_json::Value = serde_json::from_str(str_of(&out.stdout).trim()).unwrap();
            assert_eq!(v["optimizer"], "RMSprop");
        } else {
            assert!(!out.status.success());
            let err = str_of(&out.stderr);
            assert!(
                err.contains("optim_sched_config") && err.contains("no-such.json"),
                "{err}"
            );
        }
    }
    let out = fluxflow(&["bench", "--quickstart", "--steps", "0"]);
    assert!(!out.status.success());
    assert!(
        str_of(&out.stderr).contains("--steps 0"),
        "{}",
        str_of(&out.stderr)
    );
    let out = fluxflow(&["bench", "--quickstart", "--mixed-precision", "bf16"]);
    assert!(!out.status.success());
    assert!(
        str_of(&out.stderr).contains("CUDA"),
        "{}",
        str_of(&out.stderr)
    );
}

#[test]
fn a_misspelt_unverified_cuda_switch_is_refused_naming_the_variable() {
    let o = common::bin()
        .env("FLUXFLOW_CUDA_UNVERIFIED", "yes please")
        .args(["info", "no-such-file.safetensors"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = str_of(&o.stderr);
    assert!(
        err.contains("FLUXFLOW_CUDA_UNVERIFIED") && err.contains("yes please"),
        "{err}"
    );
    // Off and on are both accepted (on changes nothing on the CPU): the command then fails on
    // its own argument instead.
    for v in ["0", "off", "1", "ON", "true"] {
        let o = common::bin()
            .env("FLUXFLOW_CUDA_UNVERIFIED", v)
            .args(["info", "no-such-file.safetensors"])
            .output()
            .unwrap();
        let err = str_of(&o.stderr);
        assert!(!err.contains("FLUXFLOW_CUDA_UNVERIFIED"), "{v}: {err}");
        assert!(err.contains("no-such-file"), "{v}: {err}");
    }
}

#[test]
fn bench_threads_sets_every_pool_and_reports_the_count() {
    let small = [
        "bench",
        "--quickstart",
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "1",
    ];
    // --threads wins over the environment's thread settings.
    for n in ["1", "3"] {
        let args: Vec<&str> = small
            .iter()
            .copied()
            .chain(["--threads", n, "--json"])
            .collect();
        let out = common::bin()
            .args(&args)
            .env("RAYON_NUM_THREADS", "2")
            .env("CANDLE_NUM_THREADS", "2")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", str_of(&out.stderr));
        let line = str_of(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(line.trim()).expect("one JSON line");
        let n: u64 = n.parse().unwrap();
        assert_eq!(v["threads"], n, "{line}");
        assert_eq!(v["matmul_threads"], n, "{line}");
    }
    let args: Vec<&str> = small.iter().copied().chain(["--threads", "1"]).collect();
    let out = fluxflow(&args);
    assert!(out.status.success(), "{}", str_of(&out.stderr));
    assert!(
        str_of(&out.stdout).contains(", 1 thread, "),
        "{}",
        str_of(&out.stdout)
    );
    for bad in ["0", "4097", "two"] {
        let out = fluxflow(&["bench", "--quickstart", "--threads", bad]);
        let err = str_of(&out.stderr);
        assert!(!out.status.success(), "{bad}: {err}");
        assert!(
            err.contains(&format!("'{bad}' for '--threads <N>'")),
            "{bad}: {err}"
        );
    }
}
