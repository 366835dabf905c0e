//! `fluxflow eval` through the binary: per-image and mean scores, a truncated file skipped and
//! named, the JSON output, and agreement with `reconstruct`'s PSNR.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::parity;
use image::RgbImage;

fn fluxflow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fluxflow"))
        .args(args)
        .output()
        .expect("the fluxflow binary runs")
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fluxflow-eval-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
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
    assert!(out.contains("skipped 1 unreadable file"), "{out}");
    assert!(out.contains("d.png"), "{out}");
    assert!(out.contains("mean of 3"), "{out}");
    assert!(out.contains("under 161 px"), "{out}");

    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
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
