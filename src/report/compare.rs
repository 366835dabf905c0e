//! `fluxflow compare`: runs side by side (ours or the PyTorch reference's run folders, read from
//! `graph/training_metrics.jsonl`): loss and evaluation metrics at matching steps, steps to
//! reach loss and PSNR thresholds, loss variance over the last steps, throughput; as
//! `comparison.md` plus overlay plots (`compare_loss.png`, `compare_quality.png`).

use std::fmt::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::metrics::{MetricsLog, Section};
use super::plot::{draw_panel, render_png, Axis, Line, Panel, PALETTE};
use super::stats::{fmt_short, moving_average, smoothing_window, Stats};
use super::METRICS_FILE;
use crate::atomic_write::write_atomic;

/// What to compare and how.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Loss levels whose first crossing is reported; empty: chosen from the runs.
    pub loss_thresholds: Vec<f64>,
    /// PSNR levels (dB) whose first crossing is reported.
    pub psnr_thresholds: Vec<f64>,
    /// Stability: the loss variance over the last this many steps of each run.
    pub last_steps: u64,
    /// Matching steps at which the losses are tabled.
    pub points: usize,
}

impl Default for CompareOptions {
    fn default() -> Self {
        Self {
            loss_thresholds: Vec::new(),
            psnr_thresholds: vec![15.0, 20.0, 25.0, 30.0],
            last_steps: 100,
            points: 5,
        }
    }
}

/// One run's series.
pub struct RunSeries {
    pub name: String,
    pub dir: PathBuf,
    /// `metrics.vae_loss` (ours: a rolling mean; the reference's as it logged it).
    pub loss: Vec<(f64, f64)>,
    /// Per-step losses (`extras.step_vae_loss`, ours only); the stability figure prefers them.
    pub step_loss: Vec<(f64, f64)>,
    /// Held-out PSNR: `eval_psnr`, else the mean template PSNR per sample row.
    pub psnr: Vec<(f64, f64)>,
    /// Where `psnr` came from.
    pub psnr_source: &'static str,
    pub psnr_ema: Vec<(f64, f64)>,
    pub ssim: Vec<(f64, f64)>,
    pub ms_ssim: Vec<(f64, f64)>,
    pub batch_time: Vec<f64>,
    /// `training.batch_size` from the run's `run.yaml` (or `config.yaml`), when there.
    pub batch_size: Option<f64>,
    /// What was read but not used, for the user: the metrics file's malformed lines.
    pub warnings: Vec<String>,
}

impl RunSeries {
    /// Reads a run folder. Errors name the folder and the missing file.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(METRICS_FILE);
        if !path.is_file() {
            bail!(
                "{} is not a run folder: no {}",
                dir.display(),
                path.display()
            );
        }
        let log = MetricsLog::read(&path)?;
        if log.rows.is_empty() {
            bail!(
                "{} has no usable rows ({} malformed line(s){})",
                path.display(),
                log.malformed_lines,
                if log.malformed_lines > 0 {
                    format!(": {}", log.malformed_line_numbers(10))
                } else {
                    String::new()
                }
            );
        }
        let mut warnings = Vec::new();
        if log.malformed_lines > 0 {
            warnings.push(format!(
                "{}: skipped {} malformed line(s) (not a JSON row with an integer global_step): \
                 line {}",
                path.display(),
                log.malformed_lines,
                log.malformed_line_numbers(10)
            ));
        }
        let m = |k: &str| log.series(Section::Metrics, k).points;
        let (psnr, psnr_source) = match m("eval_psnr") {
            p if !p.is_empty() => (p, "eval_data"),
            _ => {
                let mut by_step: std::collections::BTreeMap<i64, Vec<f64>> = Default::default();
                for points in log.template_psnr().values() {
                    for &(s, v) in points {
                        by_step.entry(s as i64).or_default().push(v);
                    }
                }
                let p: Vec<(f64, f64)> = by_step
                    .into_iter()
                    .map(|(s, v)| (s as f64, v.iter().sum::<f64>() / v.len() as f64))
                    .collect();
                let src = if p.is_empty() { "none" } else { "templates" };
                (p, src)
            }
        };
        let batch_size = ["run.yaml", "config.yaml"].iter().find_map(|f| {
            let text = std::fs::read_to_string(dir.join(f)).ok()?;
            let v: serde_yaml::Value = serde_yaml::from_str(&text).ok()?;
            v.get("training")?.get("batch_size")?.as_f64()
        });
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        Ok(Self {
            name,
            dir: dir.to_path_buf(),
            loss: m("vae_loss"),
            step_loss: log.series(Section::Extras, "step_vae_loss").points,
            psnr,
            psnr_source,
            psnr_ema: m("eval_psnr_ema"),
            ssim: m("eval_ssim"),
            ms_ssim: m("eval_ms_ssim"),
            batch_time: log.series(Section::Extras, "batch_time").values(),
            batch_size,
            warnings,
        })
    }

    fn last_step(&self) -> f64 {
        self.loss.last().map_or(0.0, |p| p.0)
    }

    /// Population variance of the loss over the steps after `last - n` (per-step losses when
    /// logged, else `vae_loss`), and the number of values it used.
    pub fn stability(&self, n: u64) -> Option<(f64, usize)> {
        let series = if self.step_loss.is_empty() {
            &self.loss
        } else {
            &self.step_loss
        };
        let last = series.last()?.0;
        let tail: Vec<f64> = series
            .iter()
            .filter(|p| p.0 > last - n as f64)
            .map(|p| p.1)
            .collect();
        let st = Stats::of(&tail)?;
        Some((st.std * st.std, st.count))
    }

    /// Median seconds per step.
    pub fn median_batch_time(&self) -> Option<f64> {
        let mut v: Vec<f64> = self
            .batch_time
            .iter()
            .copied()
            .filter(|x| *x > 0.0)
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let k = v.len() / 2;
        Some(if v.len() % 2 == 1 {
            v[k]
        } else {
            (v[k - 1] + v[k]) / 2.0
        })
    }
}

/// The value logged at `step` or, failing that, the last one before it.
pub fn value_at(series: &[(f64, f64)], step: f64) -> Option<f64> {
    series
        .iter()
        .take_while(|p| p.0 <= step)
        .last()
        .map(|p| p.1)
}

/// The first step at which `series` is at or below (`below`) / at or above `level`.
pub fn first_reaching(series: &[(f64, f64)], level: f64, below: bool) -> Option<f64> {
    series
        .iter()
        .find(|p| if below { p.1 <= level } else { p.1 >= level })
        .map(|p| p.0)
}

/// What [`compare`] wrote.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub markdown: PathBuf,
    pub plots: Vec<PathBuf>,
    /// What was read but not used (also listed in the markdown).
    pub warnings: Vec<String>,
}

/// Default loss thresholds: the highest final loss among the runs (a level every run
/// reached at its end) and twice it, to 3 significant digits.
fn default_loss_thresholds(runs: &[RunSeries]) -> Vec<f64> {
    let worst = runs
        .iter()
        .filter_map(|r| r.loss.last().map(|p| p.1))
        .fold(f64::NAN, f64::max);
    if !worst.is_finite() || worst <= 0.0 {
        return Vec::new();
    }
    let round3 = |v: f64| {
        let e = 10f64.powi(2 - v.log10().floor() as i32);
        (v * e).ceil() / e
    };
    vec![round3(2.0 * worst), round3(worst)]
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

fn step_cell(v: Option<f64>) -> String {
    v.map_or("not reached".into(), |s| format!("{s:.0}"))
}

/// Renders `comparison.md` and the overlay plots into `out_dir`.
pub fn compare(dirs: &[PathBuf], out_dir: &Path, opts: &CompareOptions) -> Result<Comparison> {
    if dirs.len() < 2 {
        bail!("compare needs at least two run folders, got {}", dirs.len());
    }
    let mut runs = dirs
        .iter()
        .map(|d| RunSeries::load(d))
        .collect::<Result<Vec<_>>>()?;
    // Distinct names for the table and the legends.
    for i in 0..runs.len() {
        if runs[..i].iter().any(|r| r.name == runs[i].name) {
            runs[i].name = format!("{} ({})", runs[i].name, i + 1);
        }
    }
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let loss_levels = if opts.loss_thresholds.is_empty() {
        default_loss_thresholds(&runs)
    } else {
        opts.loss_thresholds.clone()
    };

    let mut o = String::from("# Run comparison\n\n");
    o.push_str("| Run | Folder | Last step | Final loss | Eval PSNR source |\n");
    o.push_str("|-----|--------|-----------|------------|------------------|\n");
    for r in &runs {
        let _ = writeln!(
            o,
            "| {} | `{}` | {:.0} | {} | {} |",
            r.name,
            r.dir.display(),
            r.last_step(),
            r.loss.last().map_or("-".into(), |p| fmt_short(p.1)),
            r.psnr_source
        );
    }

    // Losses at matching steps: evenly spaced up to the shortest run's last step.
    let common = runs
        .iter()
        .map(RunSeries::last_step)
        .fold(f64::INFINITY, f64::min);
    if common.is_finite() && common > 0.0 {
        let n = opts.points.max(1);
        let steps: Vec<f64> = (1..=n)
            .map(|i| (common * i as f64 / n as f64).round())
            .collect();
        o.push_str("\n## Loss at matching steps\n\n`vae_loss` as logged at the step or the last row before it.\n\n| Step |");
        for r in &runs {
            let _ = write!(o, " {} |", r.name);
        }
        o.push_str("\n|------|");
        o.push_str(&"---|".repeat(runs.len()));
        o.push('\n');
        for s in steps {
            let _ = write!(o, "| {s:.0} |");
            for r in &runs {
                let _ = write!(
                    o,
                    " {} |",
                    value_at(&r.loss, s).map_or("-".into(), fmt_short)
                );
            }
            o.push('\n');
        }
    }

    // Evaluation metrics at the steps every run with any evaluated.
    let evaluated: Vec<&RunSeries> = runs.iter().filter(|r| !r.psnr.is_empty()).collect();
    let mut eval_steps: Vec<f64> = evaluated
        .first()
        .map(|r| r.psnr.iter().map(|p| p.0).collect())
        .unwrap_or_default();
    for r in evaluated.iter().skip(1) {
        eval_steps.retain(|s| r.psnr.iter().any(|p| p.0 == *s));
    }
    if !eval_steps.is_empty() {
        o.push_str("\n## Reconstruction quality at matching steps\n\nPSNR (dB) / SSIM / MS-SSIM of each run's held-out images with the live weights (PSNR from the templates where a run has no `output.eval_data`).\n\n| Step |");
        for r in &runs {
            let _ = write!(o, " {} |", r.name);
        }
        o.push_str("\n|------|");
        o.push_str(&"---|".repeat(runs.len()));
        o.push('\n');
        let at = |series: &[(f64, f64)], s: f64| series.iter().find(|p| p.0 == s).map(|p| p.1);
        for s in eval_steps {
            let _ = write!(o, "| {s:.0} |");
            for r in &runs {
                let _ = write!(
                    o,
                    " {} / {} / {} |",
                    cell(at(&r.psnr, s), 2),
                    cell(at(&r.ssim, s), 4),
                    cell(at(&r.ms_ssim, s), 4)
                );
            }
            o.push('\n');
        }
    }

    o.push_str("\n## Steps to reach\n\nThe first logged step with `vae_loss` at or below the level, or PSNR at or above it.\n\n| Threshold |");
    for r in &runs {
        let _ = write!(o, " {} |", r.name);
    }
    o.push_str("\n|-----------|");
    o.push_str(&"---|".repeat(runs.len()));
    o.push('\n');
    for &level in &loss_levels {
        let _ = write!(o, "| loss <= {} |", fmt_short(level));
        for r in &runs {
            let _ = write!(o, " {} |", step_cell(first_reaching(&r.loss, level, true)));
        }
        o.push('\n');
    }
    for &level in &opts.psnr_thresholds {
        let _ = write!(o, "| PSNR >= {level} dB |");
        for r in &runs {
            let v = if r.psnr.is_empty() {
                "-".into()
            } else {
                step_cell(first_reaching(&r.psnr, level, false))
            };
            let _ = write!(o, " {v} |");
        }
        o.push('\n');
    }

    let _ = write!(
        o,
        "\n## Stability and speed\n\nStability: the population variance of the per-step loss \
         (`extras.step_vae_loss`; `vae_loss` where a run has none) over each run's last {} \
         steps. Speed: the median seconds per step; images/s = batch size / that.\n\n",
        opts.last_steps
    );
    o.push_str("| Run | Loss variance | Values | Median s/step | Images/s |\n");
    o.push_str("|-----|---------------|--------|---------------|----------|\n");
    for r in &runs {
        let (var, n) = r
            .stability(opts.last_steps)
            .map_or(("-".into(), 0), |(v, n)| (format!("{v:.3e}"), n));
        let bt = r.median_batch_time();
        let ips = match (bt, r.batch_size) {
            (Some(t), Some(b)) => format!("{:.2}", b / t),
            _ => "-".into(),
        };
        let _ = writeln!(o, "| {} | {var} | {n} | {} | {ips} |", r.name, cell(bt, 3));
    }

    let plots = write_plots(&runs, out_dir)?;
    o.push_str("\n## Plots\n\n");
    for p in &plots {
        if let Some(name) = p.file_name() {
            let name = name.to_string_lossy();
            let _ = writeln!(o, "![{name}]({name})\n");
        }
    }
    let warnings: Vec<String> = runs.iter().flat_map(|r| r.warnings.clone()).collect();
    if !warnings.is_empty() {
        o.push_str("## Notes\n\n");
        for w in &warnings {
            let _ = writeln!(o, "- {w}");
        }
    }
    let markdown = out_dir.join("comparison.md");
    write_atomic(&markdown, o.as_bytes())?;
    Ok(Comparison {
        markdown,
        plots,
        warnings,
    })
}

fn write_plots(runs: &[RunSeries], out_dir: &Path) -> Result<Vec<PathBuf>> {
    let colour = |i: usize| PALETTE[i % PALETTE.len()];
    let mut loss_lines = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        let points = r.loss.clone();
        match smoothing_window(points.len()) {
            Some(w) => loss_lines.push(Line::new(
                format!("{} (moving average, {w})", r.name),
                moving_average(&points, w),
                colour(i),
            )),
            None => loss_lines.push(Line::new(r.name.clone(), points, colour(i))),
        }
    }
    let loss = Panel {
        title: "VAE loss".into(),
        x_label: "Global Step".into(),
        left: Axis::new("Loss", loss_lines),
        right: None,
        resumes: vec![],
        empty_note: "no vae_loss logged".into(),
    };
    let mut left = Vec::new();
    let mut right = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        left.push(Line::new(
            format!("{} PSNR ({})", r.name, r.psnr_source),
            r.psnr.clone(),
            colour(i),
        ));
        let mut s = Line::new(
            format!("{} SSIM (right axis)", r.name),
            r.ssim.clone(),
            colour(i),
        );
        s.dashed = true;
        right.push(s);
    }
    let has_ssim = right.iter().any(|l| !l.points.is_empty());
    let quality = Panel {
        title: "Reconstruction quality".into(),
        x_label: "Global Step".into(),
        left: Axis::new("PSNR (dB)", left),
        right: has_ssim.then(|| Axis::new("SSIM", right)),
        resumes: vec![],
        empty_note: "no PSNR logged (output.eval_data or templates)".into(),
    };
    let mut written = Vec::new();
    for (name, panel) in [("compare_loss.png", loss), ("compare_quality.png", quality)] {
        let bytes = render_png(1600, 800, |root| draw_panel(root, &panel, 1.0))?;
        let path = out_dir.join(name);
        write_atomic(&path, &bytes)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_and_lookups() {
        let s = [(1.0, 0.9), (2.0, 0.5), (4.0, 0.3), (5.0, 0.4)];
        assert_eq!(first_reaching(&s, 0.5, true), Some(2.0));
        assert_eq!(first_reaching(&s, 0.1, true), None);
        assert_eq!(first_reaching(&s, 0.4, false), Some(1.0));
        assert_eq!(value_at(&s, 3.0), Some(0.5));
        assert_eq!(value_at(&s, 0.5), None);
    }
}
