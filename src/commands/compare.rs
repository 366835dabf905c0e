//! `fluxflow compare`: runs side by side (see `report::compare`).

use anyhow::{bail, Result};

use crate::cli::CompareArgs;
use crate::report::compare::{compare, CompareOptions, Comparison};

pub fn run(args: &CompareArgs) -> Result<Comparison> {
    if args.last == 0 {
        bail!("--last 0: the stability figure needs at least 1 step");
    }
    for (flag, values) in [("--loss", &args.loss), ("--psnr", &args.psnr)] {
        if let Some(v) = values.iter().find(|v| !v.is_finite()) {
            bail!("{flag} {v}: a threshold must be a finite number");
        }
    }
    let mut opts = CompareOptions {
        loss_thresholds: args.loss.clone(),
        last_steps: args.last,
        ..CompareOptions::default()
    };
    if !args.psnr.is_empty() {
        opts.psnr_thresholds = args.psnr.clone();
    }
    compare(&args.runs, &args.output, &opts)
}
