//! Images as they come from cameras and disks, through the binary and the data pipeline: a
//! JPEG cut off is refused everywhere a PNG's would be, EXIF orientation is applied,
//! symlinked folders are followed once, `--max-pixels` bounds what is computed, one huge image
//! does not stop an `eval`, an unreadable image alone in its bucket does not stop training, and
//! a long reconstruction says what it is doing.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, parity, text};
use fluxflow::data::{self, BatchSampler, Loader, LoaderConfig, SamplerState};
use image::{Rgb, RgbImage};

fn tmpdir(name: &str) -> PathBuf {
    common::fresh_dir("images", name)
}

/// Runs `cmd` to its end, failing the test (and killing the process) after `limit`.
fn run_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
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

fn pattern(w: u32, h: u32, k: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            ((x * 7 + y * k) % 256) as u8,
            ((x * y + 40 * k) % 256) as u8,
            (((x / 8 + y / 8) % 2) * 200 + 20) as u8,
        ])
    })
}

fn jpeg_bytes(img: &RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

/// A JPEG of `img` keeping only its first `keep` of 100 parts: the header (and the size)
/// is whole, the scan is cut off.
fn cut_jpeg(path: &Path, img: &RgbImage, keep: usize) {
    let bytes = jpeg_bytes(img);
    std::fs::write(path, &bytes[..bytes.len() * keep / 100]).unwrap();
}

/// `jpeg` with an EXIF block (APP1) recording `orientation` (1 to 8) inserted after SOI.
fn with_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
    // TIFF header (big-endian), one IFD entry: tag 0x0112 Orientation, SHORT, count 1.
    let mut tiff = b"MM\x00\x2a\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01".to_vec();
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // value padding, no next IFD
    let mut app1 = b"Exif\x00\x00".to_vec();
    app1.extend_from_slice(&tiff);
    let len = (app1.len() + 2) as u16;
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

/// A tiny model's configuration training on `data` into `dir/<run>`; `extra` is added to the
/// training section.
fn config(dir: &Path, data: &Path, run: &str, extra: &str) -> PathBuf {
    let text = format!(
        "model: {{vae_dim: 8, feature_maps_dim: 8, text_embedding_dim: 8, vae_attn_layers: 1,
         vae_attn_heads: 2, flow_heads: 2, flow_layers: 1, text_hidden: 8,
         use_gradient_checkpointing: false}}
data:
  data_path: {}
training:
  batch_size: 2
  lr: 0.001
  seed: 3
{extra}
output:
  output_path: {}
  log_interval: 1
  checkpoint_save_interval: 1000
  no_samples: true
",
        data.display(),
        dir.join(run).display()
    );
    let p = dir.join(format!("{run}.yaml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn reconstruct(img: &Path, out: &Path, extra: &[&str]) -> Output {
    run(bin()
        .args([
            "reconstruct",
            img.to_str().unwrap(),
            "-c",
            parity("tiny16.safetensors").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ])
        .args(extra))
}

fn eval(data: &Path, extra: &[&str]) -> Output {
    run(bin()
        .args([
            "eval",
            "-c",
            parity("tiny16.safetensors").to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ])
        .args(extra))
}

#[test]
fn a_cut_off_jpeg_is_refused_by_reconstruct_and_skipped_by_eval_and_train() {
    let dir = tmpdir("cut-jpeg");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    pattern(32, 32, 1).save(data.join("a.png")).unwrap();
    pattern(32, 32, 2).save(data.join("b.png")).unwrap();
    // 15% of the bytes missing: the decoder would fill the bottom grey.
    cut_jpeg(&data.join("cut.jpg"), &pattern(48, 32, 3), 85);

    let o = reconstruct(&data.join("cut.jpg"), &dir.join("out.png"), &[]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("cut.jpg") && t.contains("cut off") && t.contains("FF D9"),
        "{t}"
    );
    assert!(!dir.join("out.png").exists());

    let o = eval(&data, &[]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("mean of 2") && t.contains("cut.jpg: "), "{t}");
    assert!(t.contains("cut off"), "{t}");

    let cfg = config(&dir, &data, "run", "  max_steps: 2");
    let o = run(bin().args(["train", "--config", cfg.to_str().unwrap()]));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert_eq!(t.matches("skipping").count(), 1, "{t}");
    assert!(t.contains("cut.jpg") && t.contains("cut off"), "{t}");
    assert!(t.contains("1 unreadable file"), "{t}");
}

#[test]
fn a_jpeg_cut_off_after_the_scan_is_skipped_and_named_by_the_loader() {
    let dir = tmpdir("cut-after-scan");
    let root = dir.join("data");
    std::fs::create_dir_all(&root).unwrap();
    for i in 0..3 {
        std::fs::write(
            root.join(format!("img{i}.jpg")),
            jpeg_bytes(&pattern(32, 16, i)),
        )
        .unwrap();
    }
    let ds = data::scan(&root, None, None, &dir.join("cache")).unwrap();
    assert_eq!(ds.entries.len(), 3);
    let whole = std::fs::read(root.join("img1.jpg")).unwrap();
    std::fs::write(root.join("img1.jpg"), &whole[..whole.len() - 40]).unwrap();
    let sampler = BatchSampler::new(&ds, 1, 0).unwrap();
    let n = sampler.batches_per_epoch();
    let mut loader = Loader::new(
        &ds,
        sampler,
        SamplerState::default(),
        LoaderConfig::default(),
    )
    .unwrap();
    let (mut images, mut bad) = (0, Vec::new());
    for _ in 0..n {
        let (batch, _) = loader.next().unwrap();
        images += batch.batch_size;
        bad.extend(batch.bad);
    }
    assert_eq!(images, 2);
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(bad[0].path.ends_with("img1.jpg"), "{bad:?}");
    assert!(bad[0].reason.contains("cut off"), "{bad:?}");
}

#[test]
fn exif_orientation_turns_the_image_upright_in_the_scan_the_loader_and_reconstruct() {
    let dir = tmpdir("exif");
    let root = dir.join("data");
    std::fs::create_dir_all(&root).unwrap();
    // Stored 48x16: the left third red, the rest blue. Orientation 6 (rotate 90 degrees
    // clockwise) shows it 16x48 with the red part on top.
    let stored = RgbImage::from_fn(48, 16, |x, _| {
        if x < 16 {
            Rgb([250, 0, 0])
        } else {
            Rgb([0, 0, 250])
        }
    });
    let path = root.join("turned.jpg");
    std::fs::write(&path, with_orientation(&jpeg_bytes(&stored), 6)).unwrap();

    let img = fluxflow::image_io::load_rgb(&path).unwrap();
    assert_eq!(img.dimensions(), (16, 48));
    assert!(img.get_pixel(8, 4)[0] > 200 && img.get_pixel(8, 44)[2] > 200);

    let ds = data::scan(&root, None, None, &dir.join("cache")).unwrap();
    assert_eq!(ds.entries[0].original, (16, 48));
    assert_eq!(ds.entries[0].size, (16, 48));
    let sampler = BatchSampler::new(&ds, 1, 0).unwrap();
    let config = LoaderConfig {
        workers: 1,
        prefetch: 1,
    };
    let mut loader = Loader::new(&ds, sampler, SamplerState::default(), config).unwrap();
    let (batch, _) = loader.next().unwrap();
    assert_eq!((batch.width, batch.height), (16, 48));
    // Red plane, top row: near +1.
    assert!(batch.images[0] > 0.8, "{}", batch.images[0]);

    let out = dir.join("out.png");
    let o = reconstruct(&path, &out, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(image::image_dimensions(&out).unwrap(), (16, 48));
}

#[test]
fn symlinked_folders_are_followed_once_without_loops_or_duplicates() {
    let dir = tmpdir("symlinks");
    let root = dir.join("data");
    let outside = dir.join("outside");
    std::fs::create_dir_all(root.join("real")).unwrap();
    std::fs::create_dir_all(outside.join("deeper")).unwrap();
    pattern(16, 16, 1).save(root.join("real/a.png")).unwrap();
    pattern(16, 16, 2).save(outside.join("b.png")).unwrap();
    pattern(16, 16, 3)
        .save(outside.join("deeper/c.png"))
        .unwrap();
    let link = |target: &Path, name: &str| std::os::unix::fs::symlink(target, root.join(name));
    link(&outside, "linked").unwrap();
    link(&outside, "linked_again").unwrap(); // a second way to the same folder
    link(&root.join("real"), "alias").unwrap(); // a second way to a real folder
    link(&root, "loop").unwrap(); // back up the tree
    std::os::unix::fs::symlink(&root, outside.join("deeper/up")).unwrap();

    let ds = data::scan(&root, None, None, &dir.join("cache")).unwrap();
    let rels: Vec<PathBuf> = ds.entries.iter().map(|e| e.path.clone()).collect();
    assert_eq!(
        rels,
        ["linked/b.png", "linked/deeper/c.png", "real/a.png"].map(PathBuf::from)
    );
    assert!(ds.bad.is_empty(), "{:?}", ds.bad);
    let (files, _) = data::scan::image_files(&root).unwrap();
    assert_eq!(files.len(), 3);
}

#[test]
fn max_pixels_bounds_the_computed_size_even_for_extreme_aspect_ratios() {
    let dir = tmpdir("max-pixels");
    // 4000x64 at 20000 pixels: scaled to 16 pixels high, it trains at 1008x16 (the old rule,
    // scaling the image itself to 20000 pixels, trained at 1120x32 = 35840).
    let wide = dir.join("wide.png");
    pattern(4000, 64, 1).save(&wide).unwrap();
    let out = dir.join("wide.recon.png");
    let o = reconstruct(&wide, &out, &["--max-pixels", "20000"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("4000x64 is more than --max-pixels 20000"), "{t}");
    let (w, h) = image::image_dimensions(&out).unwrap();
    assert!(w * h <= 20000 && w > 10 * h, "{w}x{h}");

    // 4000x16 cannot lose a row: it needs 64000 pixels, and says so.
    let thin = dir.join("thin.png");
    pattern(4000, 16, 2).save(&thin).unwrap();
    let out = dir.join("thin.recon.png");
    let o = reconstruct(&thin, &out, &["--max-pixels", "20000"]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("thin.png")
            && t.contains("--max-pixels 20000")
            && t.contains("4000x16")
            && t.contains("64000"),
        "{t}"
    );
    assert!(!out.exists());
}

#[test]
fn one_huge_image_is_scaled_down_with_a_note_and_the_rest_are_scored() {
    let dir = tmpdir("huge");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    pattern(32, 32, 1).save(data.join("a.png")).unwrap();
    // 12000x12000 of one colour: a few hundred KB as a PNG.
    RgbImage::from_pixel(12000, 12000, Rgb([120, 80, 40]))
        .save(data.join("huge.png"))
        .unwrap();
    // A thin image that cannot fit in 4096 pixels even 16 pixels high: skipped and named.
    pattern(1000, 16, 3).save(data.join("thin.png")).unwrap();
    let json = dir.join("scores.json");
    let o = run_within(
        bin().args([
            "eval",
            "-c",
            parity("tiny16.safetensors").to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--max-pixels",
            "4096",
            "--json",
            json.to_str().unwrap(),
        ]),
        Duration::from_secs(90),
    );
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("huge.png: 12000x12000 is more than --max-pixels 4096"),
        "{t}"
    );
    assert!(
        t.contains("mean of 2") && t.contains("thin.png: 1000x16"),
        "{t}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let huge = &v["images"][1];
    assert_eq!(huge["name"], "huge.png");
    assert!(huge["width"].as_u64().unwrap() * huge["height"].as_u64().unwrap() <= 4096);
    assert_eq!(v["skipped"].as_array().unwrap().len(), 1);

    // An image whose forward pass cannot fit in memory is skipped with the estimate, and the
    // others are still scored.
    let o = eval(&data, &["--max-pixels", "4096", "--memory-budget", "3MB"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("mean of 1") && t.contains("needs about"), "{t}");
}

#[test]
fn an_unreadable_image_alone_in_its_bucket_does_not_stop_training() {
    let dir = tmpdir("lone-bad");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    pattern(32, 32, 1).save(data.join("a.png")).unwrap();
    pattern(32, 32, 2).save(data.join("b.png")).unwrap();
    // A 48x32 PNG whose header is whole and whose pixels are cut off: alone in its bucket,
    // so every epoch is [good, bad] or [bad, good] and an epoch boundary soon meets two bad.
    pattern(48, 32, 3).save(data.join("lone.png")).unwrap();
    let bytes = std::fs::read(data.join("lone.png")).unwrap();
    std::fs::write(data.join("lone.png"), &bytes[..bytes.len() / 2]).unwrap();
    let cfg = config(&dir, &data, "run", "  n_epochs: 12\n  workers: 2");
    let o = run(bin().args(["train", "--config", cfg.to_str().unwrap()]));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert_eq!(t.matches("skipping").count(), 1, "{t}");
    assert!(
        t.contains("lone.png") && t.contains("1 unreadable file"),
        "{t}"
    );
    // 12 epochs of 2 batches: the good batch of each epoch trains, the bad one is passed over.
    assert!(t.contains("training finished at step 24/24"), "{t}");
}

#[test]
fn a_reconstruction_reports_its_stages_one_line_each_off_a_terminal() {
    let dir = tmpdir("stages");
    let img = dir.join("in.png");
    pattern(64, 48, 1).save(&img).unwrap();
    let o = reconstruct(&img, &dir.join("out.png"), &[]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    assert_eq!(err.lines().count(), 3, "{err}");
    assert!(
        err.contains("reconstructing") && err.contains("at 64x48") && err.contains("encoding"),
        "{err}"
    );
    assert_eq!(err.matches("encoded in").count(), 1, "{err}");
    assert_eq!(err.matches("decoded in").count(), 1, "{err}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("PSNR"), "{out}");
}
