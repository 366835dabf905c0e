//! The training report: summary numbers checked by hand, plots and galleries decoded, tolerant
//! reading of reference-shaped and damaged logs, errors that name the missing path.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use fluxflow::report::gallery::{LABEL_HEIGHT, MAX_COLUMNS, TILE_PAD, TILE_WIDTH};
use fluxflow::report::{generate, ReportSummary};
use image::{Rgb, RgbImage};
use serde_json::json;

const PLOTS: [&str; 6] = [
    "training_overview.png",
    "training_losses.png",
    "kl_loss.png",
    "learning_rates.png",
    "batch_times.png",
    "reconstruction_quality.png",
];

/// A run folder under the temp dir, removed when the test passes (kept for a look when it fails).
struct Run(PathBuf);

impl std::ops::Deref for Run {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn tmpdir(name: &str) -> Run {
    let d = std::env::temp_dir().join(format!("fluxflow-report-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("graph")).unwrap();
    Run(d)
}

fn write_lines(run: &Path, lines: &[String]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(run.join("graph/training_metrics.jsonl"), text).unwrap();
}

/// Five rows whose statistics are worked out by hand in `summary_numbers_match_hand_computed_values`.
fn hand_rows() -> Vec<String> {
    let vae = [0.8, 0.6, 0.5, 0.4, 0.2];
    let kl = [100.0, 110.0, 120.0, 130.0, 140.0];
    let beta = [0.0, 1e-5, 2e-5, 3e-5, 4e-5];
    let vae_lr = [1e-5, 1e-5, 8e-6, 6e-6, 5e-6];
    let bt = [1.0, 2.0, 3.0, 4.0, 5.0];
    let wait = [0.1, 0.1, 0.2, 0.2, 0.4];
    let times = ["10:15:00", "10:15:20", "10:15:40", "10:16:00", "10:16:40"];
    (0..5)
        .map(|i| {
            let mut extras = json!({"batch_time": bt[i], "data_wait": wait[i], "eta_seconds": 9.0});
            if i == 4 {
                extras["samples"] = json!({"template": {
                    "r": [-1.0, 0.5, -0.2], "g": [-0.9, 0.4, -0.1], "b": [-0.7, 0.3, 0.0]}});
            }
            json!({
                "timestamp": format!("2025-12-07T{}.000001", times[i]),
                "session_id": "20251207_101500",
                "epoch": 0,
                "batch": i * 100,
                "global_step": i * 100,
                "metrics": {"vae_loss": vae[i], "kl_loss": kl[i], "kl_beta": beta[i]},
                "learning_rates": {"flow_lr": 1e-5, "vae_lr": vae_lr[i]},
                "extras": extras,
            })
            .to_string()
        })
        .collect()
}

fn hand_run(name: &str) -> Run {
    let run = tmpdir(name);
    write_lines(&run, &hand_rows());
    let session = json!({
        "session_id": "20251207_101500",
        "created_at": "2025-12-07T10:14:00",
        "started_at": "2025-12-07T10:14:30",
        "resumed_count": 1,
        "last_update": "2025-12-07T10:16:40",
        "resumes": [{"at": "2025-12-07T10:15:40", "global_step": 200}],
        "skipped_batches": 3,
        "bad_files": 1,
    });
    std::fs::write(run.join("graph/session.json"), session.to_string()).unwrap();
    run
}

fn block(name: &str, n: usize, rows: [&str; 7]) -> String {
    let keys = ["initial", "final", "change", "min", "max", "mean", "std"];
    let mut b = format!("{name} ({n} values)\n");
    for (k, v) in keys.iter().zip(rows) {
        b.push_str(&format!("  {k:<8} {v}\n"));
    }
    b
}

#[test]
fn summary_numbers_match_hand_computed_values() {
    let run = hand_run("summary");
    let s = generate(&run).unwrap();
    assert_eq!((s.rows, s.malformed_lines), (5, 0));
    let text = std::fs::read_to_string(run.join("graph/training_summary.txt")).unwrap();
    // vae_loss: mean 2.5/5; deviations +-0.3, +-0.1, 0 -> variance 0.2/5 = 0.04.
    let vae = [
        "0.800000", "0.200000", "-75.00%", "0.200000", "0.800000", "0.500000", "0.200000",
    ];
    // kl_loss: deviations +-20, +-10, 0 -> variance 1000/5 = 200, std 14.1421356.
    let kl = [
        "100.000000",
        "140.000000",
        "+40.00%",
        "100.000000",
        "140.000000",
        "120.000000",
        "14.142136",
    ];
    // kl_beta: starts at 0, so no percentage; variance (4+1+0+1+4)e-10/5 = 2e-10.
    let beta = [
        "0.000000",
        "4.000000e-5",
        "n/a (initial is 0)",
        "0.000000",
        "4.000000e-5",
        "2.000000e-5",
        "1.414214e-5",
    ];
    // vae_lr: mean 39e-6/5 = 7.8e-6; squared deviations (e-12) 4.84+4.84+0.04+3.24+7.84 = 20.8.
    let vae_lr = [
        "1.000000e-5",
        "5.000000e-6",
        "-50.00%",
        "5.000000e-6",
        "1.000000e-5",
        "7.800000e-6",
        "2.039608e-6",
    ];
    let flow_lr = [
        "1.000000e-5",
        "1.000000e-5",
        "+0.00%",
        "1.000000e-5",
        "1.000000e-5",
        "1.000000e-5",
        "0.000000",
    ];
    // batch_time 1..5: mean 3, variance 2; data_wait: mean 0.2, variance 0.06/5 = 0.012.
    let bt = [
        "1.000000", "5.000000", "+400.00%", "1.000000", "5.000000", "3.000000", "1.414214",
    ];
    let wait = [
        "0.100000", "0.400000", "+300.00%", "0.100000", "0.400000", "0.200000", "0.109545",
    ];
    for (name, rows) in [
        ("vae_loss", vae),
        ("kl_loss", kl),
        ("kl_beta", beta),
        ("flow_lr", flow_lr),
        ("vae_lr", vae_lr),
        ("batch_time", bt),
        ("data_wait", wait),
    ] {
        let b = block(name, 5, rows);
        assert!(text.contains(&b), "missing block\n{b}\nin\n{text}");
    }
    for line in [
        "session id:       20251207_101500",
        "started:          2025-12-07T10:14:30",
        "rows read:        5 (0 malformed lines skipped)",
        "global steps:     0 -> 400",
        "wall time:        1m 40s (first to last row, gaps included)",
        "resumes:          1: step 200 (2025-12-07T10:15:40)",
        "skipped batches:  3",
        "bad files:        1",
        "std is the population standard deviation (divides by N, as numpy.std).",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing line {line:?} in\n{text}"
        );
    }
    assert!(
        !text.contains("eta_seconds"),
        "ETA is not a statistic of the run"
    );
    // Metric order: the three reference metrics first.
    let pos = |k: &str| text.find(&format!("\n{k} (")).unwrap();
    assert!(pos("vae_loss") < pos("kl_loss") && pos("kl_loss") < pos("kl_beta"));
}

fn distinct_colours(img: &RgbImage) -> usize {
    img.pixels().map(|p| p.0).collect::<HashSet<_>>().len()
}

/// Pixels drawn in a series colour (the tab10 palette): a data line across a panel paints
/// hundreds of them; axes, grid, text and the legend's swatches alone paint few.
fn line_pixels(img: &RgbImage) -> usize {
    let palette: HashSet<[u8; 3]> = fluxflow::report::plot::PALETTE
        .iter()
        .map(|c| [c.0, c.1, c.2])
        .collect();
    img.pixels().filter(|p| palette.contains(&p.0)).count()
}

#[test]
fn plots_decode_at_their_promised_size_and_are_not_blank() {
    let run = hand_run("plots");
    let s = generate(&run).unwrap();
    for name in PLOTS {
        let path = run.join("graph").join(name);
        assert!(s.files.contains(&path), "{name} not reported as written");
        let img = image::open(&path).unwrap().to_rgb8();
        assert!(
            img.width() >= 1000 && img.height() >= 500,
            "{name}: {:?}",
            img.dimensions()
        );
        let n = distinct_colours(&img);
        assert!(n > 30, "{name} looks blank: {n} colours");
        // These logs hold no evaluation rows: the quality plot has nothing to draw.
        let lines = line_pixels(&img);
        assert!(
            lines > 500 || name == "reconstruction_quality.png",
            "{name} has no data lines: {lines} pixels in series colours"
        );
    }
    let overview = image::open(run.join("graph/training_overview.png")).unwrap();
    assert!(overview.width() > 1600 && overview.height() > 1000);
}

fn write_sample(path: &Path, w: u32, h: u32, shade: u8) {
    let img = RgbImage::from_fn(w, h, |x, y| {
        Rgb([shade, (x * 255 / w) as u8, (y * 255 / h) as u8])
    });
    img.save(path).unwrap();
}

#[test]
fn gallery_has_one_labelled_tile_per_sample_in_step_order() {
    let run = hand_run("gallery");
    let dir = run.join("samples/template");
    std::fs::create_dir_all(&dir).unwrap();
    write_sample(&dir.join("original.png"), 80, 40, 10);
    for (i, step) in ["00000", "01100", "00100"].iter().enumerate() {
        write_sample(&dir.join(format!("{step}.webp")), 80, 40, 60 * i as u8);
    }
    std::fs::write(dir.join("notes.txt"), "not a sample").unwrap();
    let first = generate(&run).unwrap();
    // Twice: the gallery written the first time is not read back as a sample.
    let s = generate(&run).unwrap();
    assert_eq!(first.galleries, s.galleries);
    let g = &s.galleries[0];
    assert_eq!(
        (g.tiles, g.steps.clone(), g.has_original),
        (4, vec![0, 100, 1100], true)
    );
    let img = image::open(dir.join("gallery.png")).unwrap().to_rgb8();
    // 2:1 pictures: inner width 244 -> picture height 122.
    let tile_h = LABEL_HEIGHT + (TILE_WIDTH - 2 * TILE_PAD) / 2 + 2 * TILE_PAD;
    assert_eq!(img.dimensions(), (4 * TILE_WIDTH, tile_h));
    for t in 0..4 {
        // Each label strip holds dark text pixels; each picture area holds the picture.
        let x0 = t * TILE_WIDTH;
        let dark = (x0..x0 + TILE_WIDTH)
            .flat_map(|x| (TILE_PAD..TILE_PAD + LABEL_HEIGHT).map(move |y| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&c| c < 100))
            .count();
        assert!(dark > 20, "tile {t} has no label");
        let centre = img
            .get_pixel(x0 + TILE_WIDTH / 2, TILE_PAD + LABEL_HEIGHT + 61)
            .0;
        assert_ne!(centre, [255, 255, 255], "tile {t} has no picture");
    }
    let report = std::fs::read_to_string(run.join("graph/report.md")).unwrap();
    assert!(report.contains("![template](../samples/template/gallery.png)"));
}

#[test]
fn gallery_wraps_into_rows_and_marks_unreadable_files() {
    let run = hand_run("wrap");
    let dir = run.join("samples/cat photo");
    std::fs::create_dir_all(&dir).unwrap();
    for step in 0..10 {
        write_sample(&dir.join(format!("{:05}.webp", step * 100)), 30, 30, 100);
    }
    std::fs::write(dir.join("01000.webp"), b"not an image").unwrap();
    let s = generate(&run).unwrap();
    let g = &s.galleries[0];
    assert_eq!(
        (g.tiles, g.columns, g.rows, g.unreadable),
        (11, MAX_COLUMNS, 2, 1)
    );
    let img = image::open(dir.join("gallery.png")).unwrap();
    assert_eq!(
        (img.width(), img.height()),
        (MAX_COLUMNS * TILE_WIDTH, 2 * g.tile_height)
    );
    assert!(s.notes.iter().any(|n| n.contains("1 unreadable")));
    let report = std::fs::read_to_string(run.join("graph/report.md")).unwrap();
    assert!(report.contains("(../samples/cat%20photo/gallery.png)"));
}

#[test]
fn report_md_fills_the_training_metrics_section() {
    let run = hand_run("markdown");
    generate(&run).unwrap();
    let md = std::fs::read_to_string(run.join("graph/report.md")).unwrap();
    for want in [
        "## Training Metrics",
        "- **Session ID**: 20251207_101500",
        "- **Resumes**: 1: step 200 (2025-12-07T10:15:40)",
        "- **Skipped Batches**: 3",
        "| **VAE Loss** | 0.800 | 0.200 | -75.0% ↓ | 0.200 | 0.800 | 0.500 | 0.200 |",
        "| **KL Loss** | 100.0 | 140.0 | +40.0% ↑ | 100.0 | 140.0 | 120.0 | 14.142 |",
        "| **KL Beta** | 0 | 4.00e-5 | n/a |",
        "| `vae_lr` | 1.00e-5 | 5.00e-6 | 5.00e-6 | 1.00e-5 | -50.0% ↓ |",
        "| `batch_time` | 3.000 | 1.414 | 1.000 | 5.000 | 5.000 |",
        "| `data_wait` | 0.200 | 0.110 | 0.100 | 0.400 | 0.400 |",
        "### Colour Observation (step 400)",
        "| `template` | R | -1.000 | 0.500 | -0.200 | 0-191 | 102 |",
        "| `template` | B | -0.700 | 0.300 | 0.000 | 38-166 | 128 |",
    ] {
        assert!(md.contains(want), "missing {want:?} in\n{md}");
    }
    for plot in PLOTS {
        assert!(md.contains(&format!("]({plot})")), "no link to {plot}");
    }
}

/// The reference's record shape: no data_wait, no samples, no resumes, `NaN` as Python writes it.
fn reference_rows(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let kl = if i == 7 {
                "NaN".to_string()
            } else {
                format!("{}", 1e8 / (1.0 + i as f64))
            };
            let beta = i as f64 * 1e-7;
            let lr = 1e-5 * (1.0 - i as f64 / (2.0 * n as f64));
            format!(
                "{{\"timestamp\": \"2025-12-07T18:{:02}:{:02}.123456\", \"session_id\": \
                 \"20251207_183704\", \"epoch\": 0, \"batch\": {i}, \"global_step\": {i}, \
                 \"metrics\": {{\"vae_loss\": {}, \"kl_loss\": {kl}, \"kl_beta\": {beta}}}, \
                 \"learning_rates\": {{\"flow_lr\": 1e-05, \"vae_lr\": {lr}}}, \
                 \"extras\": {{\"batch_time\": {}, \"eta_seconds\": 100.0}}}}",
                39 + i / 60,
                i % 60,
                0.8 - 0.01 * i as f64 + 0.05 * ((i * 7 % 5) as f64),
                4.0 + (i % 3) as f64,
            )
        })
        .collect()
}

#[test]
fn reference_shaped_log_without_our_extras_works() {
    let run = tmpdir("reference");
    write_lines(&run, &reference_rows(40));
    let session = json!({"session_id": "20251207_183704", "created_at": "2025-12-07T18:37:04",
        "resumed_count": 0, "last_update": "2025-12-07T18:39:39"});
    std::fs::write(run.join("graph/session.json"), session.to_string()).unwrap();
    let s: ReportSummary = generate(&run).unwrap();
    assert_eq!((s.rows, s.malformed_lines), (40, 0));
    assert!(s.galleries.is_empty());
    assert_eq!(s.files.len(), 8, "summary, six plots, report");
    let text = std::fs::read_to_string(run.join("graph/training_summary.txt")).unwrap();
    assert!(
        text.contains("kl_loss (39 values, 1 non-finite left out)"),
        "{text}"
    );
    assert!(text.contains("resumes:          0\n"));
    assert!(!text.contains("data_wait") && !text.contains("skipped batches"));
    let md = std::fs::read_to_string(run.join("graph/report.md")).unwrap();
    assert!(md.contains("- **Started**: 2025-12-07T18:37:04"));
    assert!(!md.contains("Colour Observation") && !md.contains("Galleries"));
    for name in PLOTS {
        let img = image::open(run.join("graph").join(name)).unwrap().to_rgb8();
        assert!(distinct_colours(&img) > 30, "{name} looks blank");
        // These logs hold no evaluation rows: the quality plot has nothing to draw.
        let lines = line_pixels(&img);
        assert!(
            lines > 500 || name == "reconstruction_quality.png",
            "{name} has no data lines: {lines} pixels in series colours"
        );
    }
}

#[test]
fn malformed_lines_are_skipped_and_counted() {
    let run = tmpdir("malformed");
    let mut lines = reference_rows(6);
    lines.insert(
        2,
        "{\"global_step\": 3, \"metrics\": {\"vae_loss\": 0.5".into(),
    );
    lines.insert(4, "this is not json".into());
    lines.insert(5, String::new());
    lines.push("{\"metrics\": {\"vae_loss\": 0.5}}".into());
    write_lines(&run, &lines);
    let s = generate(&run).unwrap();
    assert_eq!((s.rows, s.malformed_lines), (6, 3));
    assert!(s
        .notes
        .iter()
        .any(|n| n.contains("skipped 3 malformed lines")));
    let text = std::fs::read_to_string(run.join("graph/training_summary.txt")).unwrap();
    assert!(text.contains("rows read:        6 (3 malformed lines skipped)"));
    let md = std::fs::read_to_string(run.join("graph/report.md")).unwrap();
    assert!(md.contains("- **Malformed Log Lines Skipped**: 3"));
}

#[test]
fn missing_inputs_give_errors_that_name_the_path() {
    let run = tmpdir("missing");
    let metrics = run.join("graph/training_metrics.jsonl");
    let e = generate(&run).unwrap_err().to_string();
    assert!(e.contains(&metrics.display().to_string()), "{e}");
    std::fs::remove_dir_all(run.join("graph")).unwrap();
    let e = generate(&run).unwrap_err().to_string();
    assert!(e.contains(&run.join("graph").display().to_string()), "{e}");
    std::fs::create_dir_all(run.join("graph")).unwrap();
    std::fs::write(&metrics, "garbage\n\n").unwrap();
    let e = generate(&run).unwrap_err().to_string();
    assert!(
        e.contains("no usable rows") && e.contains("1 malformed"),
        "{e}"
    );
}
