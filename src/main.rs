//! The `fluxflow` binary: parses the command line and runs the library's commands.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use fluxflow::cli::{Cli, Command};
use fluxflow::commands;

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    match check_environment()
        .and_then(|()| apply_resources(&cli))
        .and_then(|()| run(cli))
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// glibc gives blocks above its mmap threshold back to the operating system when they are freed,
/// and trims the heap's top, so a tensor allocated after one of the same size was freed costs
/// a page fault and a zeroed page per 4 KiB: a fifth of a CPU training step was the kernel
/// faulting pages in (`perf`). Raising both thresholds keeps freed memory in the heap for the
/// next op. Measured side by side (Phase 1 `bench` at 64x64, 2 cores): 8.5 s per step against
/// 11.1 s, peak resident memory 3% higher. Large blocks of other threads' arenas still fall
/// back to mmap.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt(3) takes no pointers and only sets glibc allocator parameters (it takes
    // the arena lock itself); it is called first thing in `main`, before any allocation that
    // could depend on the old values and before any other thread exists. Its return value
    // (0: parameter refused) needs no handling: both values are accepted by glibc 2.36, and a
    // refusal would only leave the defaults.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Refuses a value of `FLUXFLOW_CUDA_UNVERIFIED` that is neither on nor off, so a typo never
/// silently leaves the switch off.
fn check_environment() -> anyhow::Result<()> {
    use fluxflow::kernels::{parse_switch, UNVERIFIED_CUDA_ENV};
    if let Ok(v) = std::env::var(UNVERIFIED_CUDA_ENV) {
        if parse_switch(&v).is_none() {
            anyhow::bail!("{UNVERIFIED_CUDA_ENV}={v:?}: use 1, on or true (or 0, off, false)");
        }
    }
    Ok(())
}

/// The command's `--threads` and `--memory-budget` (or `FLUXFLOW_MEMORY_BUDGET`), set for the
/// whole process before any work starts.
fn apply_resources(cli: &Cli) -> anyhow::Result<()> {
    let resources = cli.command.resources().cloned().unwrap_or_default();
    if let Some(n) = resources.threads {
        use_threads(n)?;
    }
    fluxflow::memory::init_budget(resources.memory_budget)?;
    Ok(())
}

/// Runs the CPU computation on `n` threads. Three things size it, each when first used:
/// rayon's global pool (fluxflow's kernels, candle's parallel loops, and gemm, which works in
/// the pool it is called from) reads `RAYON_NUM_THREADS`; candle splits each matrix product
/// into `candle_core::utils::get_num_threads()` parts and sizes its own rayon pool by it
/// (`RAYON_NUM_THREADS`, else the physical cores); candle's barrier pool (its element-wise
/// maps) reads `CANDLE_NUM_THREADS` first. All are set here, before any of them exists, and
/// the global pool is built at that size.
fn use_threads(n: usize) -> anyhow::Result<()> {
    // Called before any other thread exists (see `main`), so nothing reads the environment
    // while it changes.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .with_context(|| format!("--threads {n}: cannot start the thread pool"))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Reconstruct(args) => {
            let args_max_pixels = args.max_pixels;
            let mut shown = StageDisplay::default();
            let r = commands::reconstruct::run(&args, &mut |s| shown.show(&args.image, s));
            shown.finish();
            let r = r?;
            let (w, h) = r.size;
            if let Some((sw, sh)) = r.downscaled {
                eprintln!(
                    "note: {}x{} is more than --max-pixels {} at its training size; scaled \
                     down to {sw}x{sh} first (reconstructed at {w}x{h})",
                    r.input_size.0, r.input_size.1, args_max_pixels
                );
            }
            let resized = if r.size != r.input_size {
                format!(" (resized from {}x{})", r.input_size.0, r.input_size.1)
            } else {
                String::new()
            };
            println!(
                "wrote {} ({w}x{h}{resized}); PSNR {:.2} dB",
                r.output.display(),
                r.psnr_db
            );
        }
        Command::Eval(args) => print!("{}", commands::eval::run(&args)?),
        Command::Info(args) => {
            let info = commands::info::run(&args)?;
            println!("{info}");
            if !info.non_finite.is_empty() {
                anyhow::bail!(
                    "{}: {} tensor(s) hold non-finite values (listed above): the weights are \
                     damaged or come from a run that diverged",
                    args.checkpoint.display(),
                    info.non_finite.len()
                );
            }
        }
        Command::Train(args) => println!("{}", commands::train::train(&args)?),
        Command::Resume(args) => println!("{}", commands::train::resume(&args)?),
        Command::Report(args) => println!("{}", commands::train::report(&args)?),
        Command::Compare(args) => {
            let c = commands::compare::run(&args)?;
            for w in &c.warnings {
                eprintln!("warning: {w}");
            }
            println!("wrote {}", c.markdown.display());
            for p in &c.plots {
                println!("wrote {}", p.display());
            }
        }
        Command::Bench(args) => println!("{}", commands::bench::run(&args)?),
    }
    Ok(())
}

/// `reconstruct`'s progress: on a terminal a spinner with the stage and its elapsed time, and
/// a line as each stage ends; otherwise just one line per stage on stderr.
#[derive(Default)]
struct StageDisplay {
    bar: Option<indicatif::ProgressBar>,
}

impl StageDisplay {
    fn show(&mut self, image: &std::path::Path, stage: &commands::reconstruct::Stage) {
        use commands::reconstruct::Stage;
        let (line, next) = match stage {
            Stage::Encoding {
                size: (w, h),
                tokens,
            } => (
                format!(
                    "reconstructing {} at {w}x{h} ({tokens} latent positions): encoding, then \
                     decoding",
                    image.display()
                ),
                Some("encoding"),
            ),
            Stage::Decoding(t) => (
                format!("encoded in {:.1} s", t.as_secs_f64()),
                Some("decoding"),
            ),
            Stage::Decoded(t) => (format!("decoded in {:.1} s", t.as_secs_f64()), None),
        };
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
        if self.bar.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let bar = indicatif::ProgressBar::new_spinner();
            if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            {
                bar.set_style(style);
            }
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            self.bar = Some(bar);
        }
        if let (Some(bar), Some(next)) = (&self.bar, next) {
            bar.reset_elapsed();
            bar.set_message(next);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
