//! `fluxflow train` and `fluxflow resume`: setting a run up (config, data, model, optimizer,
//! scheduler), restoring one from its newest complete checkpoint, and the step loop with its
//! logs, checkpoints, samples and clean stops.

mod checkpoint;
mod checks;
pub mod dir;
mod events;
mod resume_settings;
mod setup;
mod state;
mod step_loop;
mod writer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub use checkpoint::{read_loop_state, IMAGES_FILE, MODEL_FILE, TRAINER_FILE};
pub use events::{Events, Level, NoEvents, Progress};
pub use setup::{resume, start};
pub use state::LoopState;

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Every step of the run is done.
    Finished,
    /// `training.max_steps` reached.
    MaxSteps,
    /// `training.max_runtime` reached.
    MaxRuntime,
    /// SIGTERM or SIGINT.
    Signal,
}

/// What a session did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub output: PathBuf,
    pub reason: StopReason,
    pub global_step: u64,
    pub total_steps: u64,
    pub steps_this_session: u64,
    pub skipped_batches: u64,
    pub bad_files: u64,
    pub last_checkpoint: Option<PathBuf>,
}

/// Counts stop requests (SIGTERM/SIGINT); the loop stops cleanly after the current step.
#[derive(Debug, Clone, Default)]
pub struct StopSignal(Arc<AtomicUsize>);

impl StopSignal {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one request; returns how many there have been.
    pub fn request(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst) > 0
    }
}
