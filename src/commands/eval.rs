//! `fluxflow eval`: PSNR, SSIM and MS-SSIM of a checkpoint's reconstructions of a folder of
//! images, per image and on average, as a table and optionally as JSON.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::DType;
use serde::Serialize;

use super::parse_device;
use crate::atomic_write::write_atomic;
use crate::cli::EvalArgs;
use crate::data::scan::IMAGE_EXTENSIONS;
use crate::data::BadFile;
use crate::eval::{evaluate_fitting, EvalSet, Evaluation};
use crate::paths::{canonical, refuse_overwrite};
use crate::weights::{load_model, TEXT_FILE};

/// What `eval` measured.
#[derive(Debug, Serialize)]
pub struct EvalReport {
    pub checkpoint: PathBuf,
    pub data: PathBuf,
    /// The checkpoint's activation (`bezier`, or a baseline's).
    pub activation: String,
    #[serde(flatten)]
    pub evaluation: Evaluation,
    /// Files that could not be decoded, or fit in --max-pixels or in memory, with the reason.
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
    if args.max_pixels < 256 {
        anyhow::bail!(
            "--max-pixels {}: must be at least 256 (16x16)",
            args.max_pixels
        );
    }
    if let Some(json) = &args.json {
        refuse_json_over_inputs(json, args)?;
    }
    let device = parse_device(&args.device)?;
    let set = EvalSet::load(&args.data, args.limit, None, Some(args.max_pixels))?;
    let model = load_model(&args.checkpoint, DType::F32, &device)?.model;
    let (evaluation, unfit) = evaluate_fitting(&model, &set, args.batch, DType::F32, &device)?;
    if evaluation.images.is_empty() {
        let first = unfit
            .first()
            .map(|b| format!(": {}: {}", b.path.display(), b.reason))
            .unwrap_or_default();
        anyhow::bail!(
            "no image of {} could be evaluated{first}",
            args.data.display()
        );
    }
    let activation = model.config.activation.to_string();
    let mut notes: Vec<String> = set
        .scaled
        .iter()
        .map(|s| {
            format!(
                "{}: {}x{} is more than --max-pixels {} at its training size; scaled down to \
                 {}x{} first",
                s.name, s.from.0, s.from.1, args.max_pixels, s.to.0, s.to.1
            )
        })
        .collect();
    if let Some(n) = evaluation.ms_ssim_note() {
        notes.push(n);
    }
    let mut skipped = set.skipped;
    skipped.extend(unfit);
    let report = EvalReport {
        checkpoint: args.checkpoint.clone(),
        data: args.data.clone(),
        activation,
        evaluation,
        skipped,
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

/// Refuses a `--json` path that is the checkpoint, the text projection file read with it, or
/// an image of the data folder (one that exists, or one that would become part of it).
fn refuse_json_over_inputs(json: &Path, args: &EvalArgs) -> Result<()> {
    let text_file = args.checkpoint.with_file_name(TEXT_FILE);
    refuse_overwrite(
        "--json",
        json,
        &[
            ("the checkpoint being evaluated", &args.checkpoint),
            (
                "the text projection file read with the checkpoint",
                &text_file,
            ),
        ],
    )?;
    let image = json
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)));
    let (out, data) = (canonical(json), canonical(&args.data));
    if image && out.starts_with(&data) {
        anyhow::bail!(
            "--json {}: that is an image of the data folder {}, which eval reads; name a file \
             outside the data folder, or one that is not an image",
            json.display(),
            args.data.display()
        );
    }
    Ok(())
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
            writeln!(f, "skipped {} file(s):", self.skipped.len())?;
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
