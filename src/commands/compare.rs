//! `fluxflow compare`: runs side by side (see `report::compare`).

use anyhow::Result;

use crate::cli::CompareArgs;
use crate::report::compare::{compare, CompareOptions, Comparison};

pub fn run(args: &CompareArgs) -> Result<Comparison> {
    let mut opts = CompareOptions {
        loss_thresholds: args.loss.clone(),
        last_steps: args.last.max(1),
        ..CompareOptions::default()
    };
    if !args.psnr.is_empty() {
        opts.psnr_thresholds = args.psnr.clone();
    }
    compare(&args.runs, &args.output, &opts)
}
