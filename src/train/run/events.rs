//! What a run reports while it goes: log lines and progress. The library prints nothing; the
//! command line decides how to show them (a progress bar on a terminal, plain lines otherwise).

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
}

/// The state shown by the progress bar after each step.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub step: u64,
    pub total: u64,
    pub epoch: u64,
    pub loss: f64,
    pub kl: f64,
    pub beta: f64,
    pub lr: f64,
    pub secs_per_step: f64,
    pub eta_secs: f64,
}

/// Receives a run's log lines and progress.
pub trait Events {
    fn log(&mut self, _level: Level, _message: &str) {}
    /// The loop starts at `done` of `total` steps.
    fn start(&mut self, _total: u64, _done: u64) {}
    fn progress(&mut self, _p: &Progress) {}
    fn finish(&mut self) {}
}

/// Discards everything (tests, library use).
#[derive(Debug, Default)]
pub struct NoEvents;

impl Events for NoEvents {}
