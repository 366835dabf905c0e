//! The six plots of `graph/`: overview (2x2), losses, KL with beta, learning rates, batch
//! times, reconstruction quality (PSNR and SSIM over steps).

use std::path::{Path, PathBuf};

use anyhow::Result;
use plotters::prelude::*;

use super::metrics::{MetricsLog, Section};
use super::plot::{draw_panel, render_png, Axis, Line, Panel, PALETTE};
use super::stats::{moving_average, smoothing_window};
use crate::atomic_write::write_atomic;

/// Size of the single plots.
pub const PLOT_SIZE: (u32, u32) = (1600, 800);
/// Size of `training_overview.png` (2x2 panels).
pub const OVERVIEW_SIZE: (u32, u32) = (2000, 1300);

/// The plot files in the order the report lists them: (file name, title, caption).
pub const PLOT_FILES: [(&str, &str, &str); 6] = [
    (
        "training_overview.png",
        "Training Overview",
        "Losses, KL, learning rates and speed",
    ),
    (
        "training_losses.png",
        "Training Losses",
        "VAE loss with its moving average",
    ),
    (
        "kl_loss.png",
        "KL Loss",
        "KL divergence and the beta warm-up",
    ),
    (
        "learning_rates.png",
        "Learning Rates",
        "Learning rate schedules of all optimizers",
    ),
    (
        "batch_times.png",
        "Batch Times",
        "Seconds per step (and data wait when logged)",
    ),
    (
        "reconstruction_quality.png",
        "Reconstruction Quality",
        "PSNR (left axis) and SSIM (right axis) of output.eval_data, live and EMA weights, and each template's PSNR",
    ),
];

const STEP: &str = "Global Step";

/// Renders the six plots into `graph_dir`, atomically; returns the paths written.
pub fn write_plots(log: &MetricsLog, resumes: &[f64], graph_dir: &Path) -> Result<Vec<PathBuf>> {
    let panels = [
        losses_panel(log, resumes),
        kl_panel(log, resumes),
        lr_panel(log, resumes),
        timing_panel(log, resumes),
    ];
    let (w, h) = OVERVIEW_SIZE;
    let overview = render_png(w, h, |root| {
        for (area, panel) in root.split_evenly((2, 2)).iter().zip(&panels) {
            draw_panel(area, panel, 0.9)?;
        }
        Ok(())
    })?;
    let mut pngs = vec![overview];
    for panel in panels.iter().chain([&quality_panel(log, resumes)]) {
        pngs.push(render_png(PLOT_SIZE.0, PLOT_SIZE.1, |root| {
            draw_panel(root, panel, 1.0)
        })?);
    }
    let mut written = Vec::new();
    for ((name, _, _), bytes) in PLOT_FILES.iter().zip(pngs) {
        let path = graph_dir.join(name);
        write_atomic(&path, &bytes)?;
        written.push(path);
    }
    Ok(written)
}

/// `colour` blended towards white by `t` (0 = unchanged, 1 = white).
fn lighten(c: RGBColor, t: f64) -> RGBColor {
    let f = |v: u8| (v as f64 + (255.0 - v as f64) * t).round() as u8;
    RGBColor(f(c.0), f(c.1), f(c.2))
}

/// A raw line (light) plus its moving average (full colour) when there are enough points.
fn raw_and_smoothed(label: &str, points: Vec<(f64, f64)>, colour: RGBColor) -> Vec<Line> {
    match smoothing_window(points.len()) {
        Some(w) => {
            let smooth = moving_average(&points, w);
            let mut raw = Line::new(label, points, lighten(colour, 0.6));
            raw.width = 1;
            let avg = Line::new(
                format!("{label} (moving average, {w} steps)"),
                smooth,
                colour,
            );
            vec![raw, avg]
        }
        None => vec![Line::new(label, points, colour)],
    }
}

fn panel(title: &str, left: Axis, right: Option<Axis>, resumes: &[f64], empty: &str) -> Panel {
    Panel {
        title: title.into(),
        x_label: STEP.into(),
        left,
        right,
        resumes: resumes.to_vec(),
        empty_note: empty.into(),
    }
}

/// vae_loss (raw and smoothed) and any other `*_loss` metric except the KL term.
pub fn losses_panel(log: &MetricsLog, resumes: &[f64]) -> Panel {
    let vae = log.series(Section::Metrics, "vae_loss").points;
    let mut lines = raw_and_smoothed("vae_loss", vae, PALETTE[0]);
    let others = log
        .keys(Section::Metrics)
        .into_iter()
        .filter(|k| k.ends_with("_loss") && k != "vae_loss" && k != "kl_loss");
    for (i, k) in others.enumerate() {
        let points = log.series(Section::Metrics, &k).points;
        lines.push(Line::new(k, points, PALETTE[(i + 2) % PALETTE.len()]));
    }
    let title = "Training Loss (excluding KL)";
    panel(
        title,
        Axis::new("Loss", lines),
        None,
        resumes,
        "no loss values logged",
    )
}

/// kl_loss on the left axis, kl_beta (dashed) on the right one.
pub fn kl_panel(log: &MetricsLog, resumes: &[f64]) -> Panel {
    let kl = log.series(Section::Metrics, "kl_loss").points;
    let beta = log.series(Section::Metrics, "kl_beta").points;
    let left = Axis::new("KL divergence", vec![Line::new("kl_loss", kl, PALETTE[1])]);
    let right = (!beta.is_empty()).then(|| {
        let mut l = Line::new("kl_beta (right axis)", beta, PALETTE[2]);
        l.dashed = true;
        Axis::new("KL beta", vec![l])
    });
    let title = "KL Divergence Loss and Beta Warm-up";
    panel(title, left, right, resumes, "no kl_loss values logged")
}

/// Every learning-rate key.
pub fn lr_panel(log: &MetricsLog, resumes: &[f64]) -> Panel {
    let lines = log
        .keys(Section::LearningRates)
        .into_iter()
        .enumerate()
        .map(|(i, k)| {
            let points = log.series(Section::LearningRates, &k).points;
            Line::new(k, points, PALETTE[i % PALETTE.len()])
        })
        .collect();
    let axis = Axis::new("Learning rate", lines);
    panel(
        "Learning Rate Schedule",
        axis,
        None,
        resumes,
        "no learning rates logged",
    )
}

/// batch_time (raw and smoothed), and data_wait and ckpt_wait when logged.
pub fn timing_panel(log: &MetricsLog, resumes: &[f64]) -> Panel {
    let bt = log.series(Section::Extras, "batch_time").points;
    let mut lines = raw_and_smoothed("batch_time", bt, PALETTE[3]);
    let wait = log.series(Section::Extras, "data_wait").points;
    if !wait.is_empty() {
        lines.extend(raw_and_smoothed("data_wait", wait, PALETTE[0]));
    }
    let ckpt = log.series(Section::Extras, "ckpt_wait").points;
    if !ckpt.is_empty() {
        lines.extend(raw_and_smoothed("ckpt_wait", ckpt, PALETTE[2]));
    }
    let axis = Axis::new("Seconds per step", lines);
    panel(
        "Training Speed",
        axis,
        None,
        resumes,
        "no batch_time values logged",
    )
}

/// PSNR of the held-out images (live and EMA) and of each template on the left axis, SSIM
/// (live and EMA, dashed) on the right one.
pub fn quality_panel(log: &MetricsLog, resumes: &[f64]) -> Panel {
    let mut left = Vec::new();
    for (i, (key, label)) in [
        ("eval_psnr", "eval PSNR (live)"),
        ("eval_psnr_ema", "eval PSNR (EMA)"),
    ]
    .iter()
    .enumerate()
    {
        let points = log.series(Section::Metrics, key).points;
        if !points.is_empty() {
            left.push(Line::new(*label, points, PALETTE[i % PALETTE.len()]));
        }
    }
    for (i, (stem, points)) in log.template_psnr().into_iter().enumerate() {
        left.push(Line::new(
            format!("template {stem} PSNR"),
            points,
            PALETTE[(i + 4) % PALETTE.len()],
        ));
    }
    let mut right = Vec::new();
    for (i, (key, label)) in [
        ("eval_ssim", "eval SSIM (live, right axis)"),
        ("eval_ssim_ema", "eval SSIM (EMA, right axis)"),
    ]
    .iter()
    .enumerate()
    {
        let points = log.series(Section::Metrics, key).points;
        if !points.is_empty() {
            let mut l = Line::new(*label, points, PALETTE[i % PALETTE.len()]);
            l.dashed = true;
            right.push(l);
        }
    }
    let right = (!right.is_empty()).then(|| Axis::new("SSIM", right));
    panel(
        "Reconstruction Quality",
        Axis::new("PSNR (dB)", left),
        right,
        resumes,
        "no PSNR logged (set output.eval_data, or output.test_image_address for templates)",
    )
}
