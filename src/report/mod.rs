//! Training report: summary text, plots, sample galleries and `report.md` from a run folder.
//!
//! Port of the reference's `generate_training_graphs.py` plus the "Training Metrics" section of
//! its progress report. Input: `<run>/graph/training_metrics.jsonl` (required),
//! `<run>/graph/session.json` and `<run>/samples/<stem>/{original.png, NNNNN.webp}` (optional).
//! Output, rewritten atomically on every call:
//! - `graph/training_summary.txt`
//! - `graph/{training_overview, training_losses, kl_loss, learning_rates, batch_times,
//!   reconstruction_quality}.png`
//! - `samples/<stem>/gallery.png` for every sample folder
//! - `graph/report.md`

pub mod charts;
pub mod compare;
pub mod gallery;
pub mod markdown;
pub mod metrics;
pub mod plot;
pub mod session;
pub mod stats;
pub mod summary;
pub mod time;

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::atomic_write::write_atomic;
pub use gallery::Gallery;
pub use metrics::MetricsLog;
pub use session::SessionInfo;

/// The metrics file, relative to the run folder.
pub const METRICS_FILE: &str = "graph/training_metrics.jsonl";
/// The session file, relative to the run folder.
pub const SESSION_FILE: &str = "graph/session.json";

/// What [`generate`] read and wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportSummary {
    /// Usable rows in the metrics file.
    pub rows: usize,
    /// Non-blank lines that were skipped as unusable.
    pub malformed_lines: usize,
    /// Every file written, in order (summary, six plots, galleries, report).
    pub files: Vec<PathBuf>,
    pub galleries: Vec<Gallery>,
    /// Things worth telling the user (an unreadable session file, undecodable samples).
    pub notes: Vec<String>,
}

/// Regenerates the whole report for the run in `run_dir`.
///
/// Fails when the `graph` folder or the metrics file is missing (the error names the path),
/// when the metrics file has no usable row, or when a file cannot be written.
pub fn generate(run_dir: &Path) -> Result<ReportSummary> {
    let graph_dir = run_dir.join("graph");
    if !graph_dir.is_dir() {
        bail!("graph folder not found: {}", graph_dir.display());
    }
    let metrics_path = run_dir.join(METRICS_FILE);
    if !metrics_path.is_file() {
        bail!("metrics file not found: {}", metrics_path.display());
    }
    let log = MetricsLog::read(&metrics_path)?;
    if log.rows.is_empty() {
        bail!(
            "no usable rows in {} ({} malformed lines skipped)",
            metrics_path.display(),
            log.malformed_lines
        );
    }
    let (session, mut notes) = SessionInfo::load(&run_dir.join(SESSION_FILE), &log);
    if log.malformed_lines > 0 {
        let n = log.malformed_lines;
        notes.push(format!(
            "skipped {n} malformed lines in {}",
            metrics_path.display()
        ));
    }

    let mut files = Vec::new();
    let summary_path = graph_dir.join("training_summary.txt");
    write_atomic(&summary_path, summary::render(&log, &session).as_bytes())?;
    files.push(summary_path);
    files.extend(charts::write_plots(
        &log,
        &session.resume_steps(),
        &graph_dir,
    )?);

    let mut galleries = Vec::new();
    let template_psnr = log.template_psnr();
    for set in gallery::find_samples(run_dir) {
        let psnr: std::collections::BTreeMap<u64, f64> = template_psnr
            .get(&set.stem)
            .into_iter()
            .flatten()
            .map(|&(step, db)| (step as u64, db))
            .collect();
        let g = gallery::write_gallery(&set, &psnr)?;
        if g.unreadable > 0 {
            notes.push(format!(
                "{} unreadable sample files in {}",
                g.unreadable,
                set.dir.display()
            ));
        }
        files.push(g.path.clone());
        galleries.push(g);
    }

    let report_path = graph_dir.join("report.md");
    write_atomic(
        &report_path,
        markdown::render(&log, &session, &galleries).as_bytes(),
    )?;
    files.push(report_path);
    Ok(ReportSummary {
        rows: log.rows.len(),
        malformed_lines: log.malformed_lines,
        files,
        galleries,
        notes,
    })
}
