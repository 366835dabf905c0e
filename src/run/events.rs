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

/// Passes on what `level` lets through: `DEBUG` and `INFO` everything, `WARNING` warnings only
/// (no progress lines), `ERROR` nothing (errors end the run and are printed by the caller).
pub struct Filtered<'a> {
    inner: &'a mut dyn Events,
    level: crate::config::LogLevel,
}

impl<'a> Filtered<'a> {
    pub fn new(inner: &'a mut dyn Events, level: crate::config::LogLevel) -> Self {
        Self { inner, level }
    }

    fn info(&self) -> bool {
        self.level <= crate::config::LogLevel::Info
    }
}

impl Events for Filtered<'_> {
    fn log(&mut self, level: Level, message: &str) {
        let shown = match level {
            Level::Info => self.info(),
            Level::Warn => self.level <= crate::config::LogLevel::Warning,
        };
        if shown {
            self.inner.log(level, message);
        }
    }

    fn start(&mut self, total: u64, done: u64) {
        if self.info() {
            self.inner.start(total, done);
        }
    }

    fn progress(&mut self, p: &Progress) {
        if self.info() {
            self.inner.progress(p);
        }
    }

    fn finish(&mut self) {
        self.inner.finish();
    }
}
