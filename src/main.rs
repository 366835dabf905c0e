//! The `fluxflow` binary: parses the command line and runs the library's commands.

use std::process::ExitCode;

use clap::Parser;
use fluxflow::cli::{Cli, Command};
use fluxflow::commands;

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    match run(cli) {
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

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Reconstruct(args) => {
            let args_max_pixels = args.max_pixels;
            let r = commands::reconstruct::run(&args)?;
            let (w, h) = r.size;
            if let Some((w, h)) = r.downscaled {
                eprintln!(
                    "note: {}x{} is more than --max-pixels {}; scaled down to {w}x{h} first",
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
        Command::Info(args) => println!("{}", commands::info::run(&args)?),
        Command::Train(args) => println!("{}", commands::train::train(&args)?),
        Command::Resume(args) => println!("{}", commands::train::resume(&args)?),
        Command::Report(args) => println!("{}", commands::train::report(&args)?),
        Command::Compare(args) => {
            let c = commands::compare::run(&args)?;
            println!("wrote {}", c.markdown.display());
            for p in &c.plots {
                println!("wrote {}", p.display());
            }
        }
        Command::Bench(args) => println!("{}", commands::bench::run(&args)?),
    }
    Ok(())
}
