//! Checkpoints off the critical path: the step loop takes a snapshot at a step boundary (the
//! serialised files, in memory) and hands it to one background thread, which writes it with the
//! guarantees of [`RunDir::save_checkpoint`] (whole folder under a temporary name, fsync,
//! rename, manifest, keep_last) and then the reference's files at the run's root.
//!
//! At most one write is in flight: handing over a snapshot first waits for the previous write,
//! so the memory held for checkpoints is bounded by one snapshot (the model file, the text
//! projection and the trainer file: weights, optimizer moments and EMA; about 2 GB for the
//! Phase 1 VAE with a centered, momentum RMSprop) plus the one being taken. A failed write is
//! kept and returned by the next [`Writer::check`], [`Writer::submit`] or [`Writer::finish`], so
//! training stops with it, as when checkpoints were written in the loop.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

use super::events::{Events, Level};
use crate::atomic_write::write_atomic;
use crate::run::dir::RunDir;

/// One checkpoint, serialised.
pub struct Snapshot {
    pub step: u64,
    /// The checkpoint folder's files: (name, bytes).
    pub files: Vec<(&'static str, Vec<u8>)>,
    /// `state.json` without its manifest.
    pub state: serde_json::Value,
    pub keep_last: usize,
    /// Copies of checkpoint files written atomically after the folder: (path, index into
    /// `files`); the reference's model files at the run's root.
    pub copies: Vec<(PathBuf, usize)>,
    /// Other files written atomically after the folder (the reference's state files at the
    /// run's root, the session record): (path, bytes).
    pub after: Vec<(PathBuf, Vec<u8>)>,
}

#[derive(Default)]
struct Status {
    busy: bool,
    error: Option<anyhow::Error>,
}

struct Shared {
    status: Mutex<Status>,
    idle: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The background checkpoint writer of one session.
pub struct Writer {
    tx: Option<SyncSender<Snapshot>>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl Writer {
    pub fn new(dir: RunDir) -> Result<Self> {
        let shared = Arc::new(Shared {
            status: Mutex::new(Status::default()),
            idle: Condvar::new(),
        });
        // A queue of one: submit waits until the writer is idle, so it never blocks on send.
        let (tx, rx) = sync_channel::<Snapshot>(1);
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fluxflow-checkpoint".into())
            .spawn(move || {
                for snap in rx {
                    let result = write(&dir, snap);
                    let mut st = s.lock();
                    if let Err(e) = result {
                        if st.error.is_none() {
                            st.error = Some(e);
                        }
                    }
                    st.busy = false;
                    drop(st);
                    s.idle.notify_all();
                }
            })
            .context("cannot start the checkpoint writer thread")?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            shared,
        })
    }

    /// The error of a failed write, if one has failed (without waiting).
    pub fn check(&self) -> Result<()> {
        match self.shared.lock().error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits for the write in flight; returns its error if it failed, and how long it waited.
    pub fn wait(&self) -> Result<Duration> {
        let start = std::time::Instant::now();
        let mut st = self.shared.lock();
        while st.busy {
            st = self
                .shared
                .idle
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        match st.error.take() {
            Some(e) => Err(e),
            None => Ok(start.elapsed()),
        }
    }

    /// Hands `snap` to the writer once the previous write is done; returns how long that took.
    pub fn submit(&self, snap: Snapshot) -> Result<Duration> {
        let waited = self.wait()?;
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| anyhow!("the checkpoint writer has stopped"))?;
        self.shared.lock().busy = true;
        if tx.send(snap).is_err() {
            self.shared.lock().busy = false;
            return Err(anyhow!("the checkpoint writer thread has stopped"));
        }
        Ok(waited)
    }

    /// Waits for the last write and stops the thread; the error of a failed write.
    pub fn finish(mut self) -> Result<()> {
        let result = self.wait().map(|_| ());
        self.stop();
        result
    }

    fn stop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Writer {
    /// Lets a write in flight finish (an error return from the loop must not leave half a
    /// checkpoint behind a rename that never comes: the folder is renamed whole or not at all).
    fn drop(&mut self) {
        self.stop();
    }
}

fn write(dir: &RunDir, snap: Snapshot) -> Result<()> {
    dir.save_checkpoint(snap.step, &snap.files, snap.state, snap.keep_last)?;
    for (p, i) in &snap.copies {
        let (_, bytes) = snap
            .files
            .get(*i)
            .ok_or_else(|| anyhow!("no checkpoint file {i} to copy to {}", p.display()))?;
        write_atomic(p, bytes)?;
    }
    for (p, bytes) in &snap.after {
        write_atomic(p, bytes)?;
    }
    Ok(())
}

/// Report rebuilds (summary, plots, galleries, report.md) in the background: at most one at a
/// time, and a request while one runs is dropped (the next request, or the final rebuild when
/// the session ends, covers it). A failed rebuild is a warning, never the end of training.
pub struct Reporter {
    root: PathBuf,
    metrics: PathBuf,
    running: Option<JoinHandle<Result<()>>>,
}

impl Reporter {
    pub fn new(root: &Path, metrics: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            metrics: metrics.to_path_buf(),
            running: None,
        }
    }

    /// Starts a rebuild unless one is running; returns how long the loop was held.
    pub fn kick(&mut self, ev: &mut dyn Events) -> Duration {
        let start = Instant::now();
        self.drain(ev);
        if self.running.is_none() && self.metrics.exists() {
            let root = self.root.clone();
            let spawned = std::thread::Builder::new()
                .name("fluxflow-report".into())
                .spawn(move || crate::report::generate(&root).map(|_| ()));
            match spawned {
                Ok(h) => self.running = Some(h),
                Err(e) => ev.log(Level::Warn, &format!("cannot start a report rebuild: {e}")),
            }
        }
        start.elapsed()
    }

    /// Collects a finished rebuild, logging its failure.
    pub fn drain(&mut self, ev: &mut dyn Events) {
        if self.running.as_ref().is_some_and(|h| h.is_finished()) {
            self.join(ev);
        }
    }

    fn join(&mut self, ev: &mut dyn Events) {
        if let Some(h) = self.running.take() {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => ev.log(Level::Warn, &format!("cannot update the report: {e:#}")),
                Err(_) => ev.log(
                    Level::Warn,
                    "cannot update the report: the rebuild panicked",
                ),
            }
        }
    }

    /// Waits for a running rebuild, then rebuilds once more so that the report covers the
    /// whole session.
    pub fn finish(&mut self, ev: &mut dyn Events) {
        self.join(ev);
        if self.metrics.exists() {
            if let Err(e) = crate::report::generate(&self.root) {
                ev.log(Level::Warn, &format!("cannot update the report: {e:#}"));
            }
        }
    }
}
