//! `fluxflow train`, `fluxflow resume` and `fluxflow report`: the command-line side of a run
//! (progress bar, log lines, signals, finding the run folder).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cli::{ReportArgs, ResumeArgs, TrainArgs};
use crate::config::{Config, Overrides, QUICKSTART};
use crate::run::{self, Events, Level, Progress, RunSummary, StopReason, StopSignal};

/// Log lines to stderr; a progress bar when stderr is a terminal, else a line per log_interval.
struct Terminal {
    bar: Option<ProgressBar>,
    every: u64,
}

impl Terminal {
    fn new(every: u64) -> Self {
        Self { bar: None, every }
    }

    fn line(&self, s: &str) {
        match &self.bar {
            Some(b) => b.println(s),
            None => eprintln!("{s}"),
        }
    }
}

fn hms(secs: f64) -> String {
    if !secs.is_finite() {
        return "?".into();
    }
    let s = secs.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

impl Events for Terminal {
    fn log(&mut self, level: Level, message: &str) {
        match level {
            Level::Info => self.line(message),
            Level::Warn => self.line(&format!("warning: {message}")),
        }
    }

    fn start(&mut self, total: u64, done: u64) {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_position(done);
            self.bar = Some(bar);
        }
    }

    fn progress(&mut self, p: &Progress) {
        let msg = format!(
            "epoch {} | loss {:.4} | KL {:.4} | beta {:.2e} | lr {:.2e} | {:.2} s/step | ETA {}",
            p.epoch,
            p.loss,
            p.kl,
            p.beta,
            p.lr,
            p.secs_per_step,
            hms(p.eta_secs)
        );
        match &self.bar {
            Some(b) => {
                b.set_position(p.step);
                b.set_message(msg);
            }
            None if p.step.is_multiple_of(self.every) || p.step == p.total => {
                eprintln!("step {}/{} | {msg}", p.step, p.total)
            }
            None => {}
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// SIGTERM/SIGINT: the first finishes the step and checkpoints; a second SIGINT exits at once
/// (checkpoints are written atomically, so the last complete one survives).
fn install_signals() -> Result<StopSignal> {
    let stop = StopSignal::new();
    let s = stop.clone();
    ctrlc::set_handler(move || {
        if s.request() >= 2 {
            eprintln!("\nsecond interrupt: exiting now; the last complete checkpoint is intact");
            std::process::exit(130);
        }
        eprintln!(
            "\nstopping after this step and writing a checkpoint (interrupt again to exit at once)"
        );
    })
    .context("cannot install the signal handler")?;
    Ok(stop)
}

fn finish(summary: &RunSummary) -> String {
    let out = summary.output.display();
    let what = match summary.reason {
        StopReason::Finished => "training finished".to_string(),
        StopReason::MaxSteps => "max_steps reached".to_string(),
        StopReason::MaxRuntime => "max_runtime reached".to_string(),
        StopReason::Signal => "stopped by signal".to_string(),
    };
    let mut s = format!(
        "{what} at step {}/{}; {} step(s) this session, {} batch(es) skipped, {} unreadable file(s)",
        summary.global_step,
        summary.total_steps,
        summary.steps_this_session,
        summary.skipped_batches,
        summary.bad_files
    );
    if let Some(c) = &summary.last_checkpoint {
        s.push_str(&format!("\ncheckpoint: {}", c.display()));
    }
    s.push_str(&format!("\nreport: {}/graph/report.md", out));
    if summary.global_step < summary.total_steps {
        s.push_str(&format!("\nresume with: fluxflow resume --output {out}"));
    }
    s
}

pub fn train(args: &TrainArgs) -> Result<String> {
    let overrides = Overrides {
        data: args.data.clone(),
        output: args.output.clone(),
        max_steps: args.max_steps,
        device: args.device.clone(),
        set: args.set.clone(),
        flags: Vec::new(),
    };
    let cfg = match &args.config {
        Some(p) => Config::load(p, &overrides)?,
        None => Config::parse(QUICKSTART, "<embedded quickstart>", &overrides)?,
    };
    let mut term = Terminal::new(cfg.output.log_interval);
    let stop = install_signals()?;
    let summary = run::start(cfg, args.force, &mut term, &stop)?;
    Ok(finish(&summary))
}

/// The most recently updated run under ./runs.
fn latest_run() -> Result<PathBuf> {
    let runs = Path::new("runs");
    let mut best: Option<(SystemTime, PathBuf)> = None;
    if let Ok(rd) = std::fs::read_dir(runs) {
        for e in rd.flatten() {
            let p = e.path();
            let marker = p.join("graph").join("session.json");
            if let Ok(t) = std::fs::metadata(&marker).and_then(|m| m.modified()) {
                if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
                    best = Some((t, p));
                }
            }
        }
    }
    match best {
        Some((_, p)) => Ok(p),
        None => bail!("no run found under ./runs: pass --output DIR"),
    }
}

pub fn resume(args: &ResumeArgs) -> Result<String> {
    let out = match &args.output {
        Some(o) => o.clone(),
        None => latest_run()?,
    };
    let mut term = Terminal::new(10);
    let stop = install_signals()?;
    let summary = run::resume(&out, &mut term, &stop)?;
    Ok(finish(&summary))
}

pub fn report(args: &ReportArgs) -> Result<String> {
    let out = match &args.output {
        Some(o) => o.clone(),
        None => latest_run()?,
    };
    let r = crate::report::generate(&out)?;
    let mut s = format!(
        "{} metrics rows read ({} malformed lines skipped)",
        r.rows, r.malformed_lines
    );
    for f in &r.files {
        s.push_str(&format!("\nwrote {}", f.display()));
    }
    for n in &r.notes {
        s.push_str(&format!("\nnote: {n}"));
    }
    Ok(s)
}
