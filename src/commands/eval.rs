//! `fluxflow eval`: PSNR, SSIM and MS-SSIM of a checkpoint's reconstructions of a folder of
//! images, per image and on average, as a table and optionally as JSON.

use std::fmt;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::DType;
use serde::Serialize;

use super::parse_device;
use crate::atomic_write::write_atomic;
use crate::cli::EvalArgs;
use crate::data::BadFile;
use crate::eval::{evaluate, EvalSet, Evaluation};
use crate::weights::load_model;

/// What `eval` measured.
#[derive(Debug, Serialize)]
pub struct EvalReport {
    pub checkpoint: PathBuf,
    pub data: PathBuf,
    /// The checkpoint's activation (`bezier`, or a baseline's).
    pub activation: String,
    #[serde(flatten)]
    pub evaluation: Evaluation,
    /// Files that could not be decoded, with the reason.
    pub skipped: Vec<BadFile>,
    pub notes: Vec<String>,
    /// Where the JSON went, if asked.
    #[serde(skip)]
    pub json: Option<PathBuf>,
}

pub fn run(args: &EvalArgs) -> Result<EvalReport> {
    if args.limit == Some(0) {
        anyhow::bail!("--limit must be at least 1");
    }
    if args.batch == 0 {
        anyhow::bail!("--batch 0: must be at least 1 (images per forward pass)");
    }
    let device = parse_device(&args.device)?;
    let set = EvalSet::load(&args.data, args.limit, None)?;
    let model = load_model(&args.checkpoint, DType::F32, &device)?.model;
    let evaluation = evaluate(&model, &set, args.batch, DType::F32, &device)?;
    let activation = model.config.activation.to_string();
    let mut notes = Vec::new();
    if let Some(n) = evaluation.ms_ssim_note() {
        notes.push(n);
    }
    let report = EvalReport {
        checkpoint: args.checkpoint.clone(),
        data: args.data.clone(),
        activation,
        evaluation,
        skipped: set.skipped,
        notes,
        json: args.json.clone(),
    };
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        write_atomic(path, text.as_bytes())
            .with_context(|| format!("cannot write the --json output {}", path.display()))?;
    }
    Ok(report)
}

fn num(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(v) => format!("{v:.digits$}"),
        None => "-".into(),
    }
}

impl fmt::Display for EvalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = &self.evaluation;
        let width = e
            .images
            .iter()
            .map(|s| s.name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        writeln!(
            f,
            "{:<width$}  {:>9}  {:>9}  {:>7}  {:>7}",
            "image", "size", "PSNR dB", "SSIM", "MS-SSIM"
        )?;
        for s in &e.images {
            let psnr = s.psnr.map_or("inf".into(), |p| format!("{p:.2}"));
            writeln!(
                f,
                "{:<width$}  {:>9}  {:>9}  {:>7.4}  {:>7}",
                s.name,
                format!("{}x{}", s.width, s.height),
                psnr,
                s.ssim,
                num(s.ms_ssim, 4)
            )?;
        }
        let m = &e.mean;
        writeln!(
            f,
            "{:<width$}  {:>9}  {:>9}  {:>7.4}  {:>7}",
            format!("mean of {}", m.images),
            "",
            num(m.psnr, 2),
            m.ssim,
            num(m.ms_ssim, 4)
        )?;
        if !self.skipped.is_empty() {
            writeln!(f, "skipped {} unreadable file(s):", self.skipped.len())?;
            for b in &self.skipped {
                writeln!(f, "  {}: {}", b.path.display(), b.reason)?;
            }
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        if let Some(j) = &self.json {
            writeln!(f, "wrote {}", j.display())?;
        }
        Ok(())
    }
}
