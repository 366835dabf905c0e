//! The `fluxflow` binary: parses the command line and runs the library's commands.

use std::process::ExitCode;

use clap::Parser;
use fluxflow::cli::{Cli, Command};
use fluxflow::commands;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
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
