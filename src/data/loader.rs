//! Decoding ahead of the step loop: worker threads take batches from the sampler, decode and
//! resize them, and the consumer receives them in sampler order through a bounded queue.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use image::imageops::FilterType;

use super::{BadFile, BatchSampler, Dataset, Entry, SamplerState};
use crate::image_io::load_rgb;

/// How many threads decode and how far they may run ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Decoding threads (at least 1).
    pub workers: usize,
    /// Decoded batches that may wait for the consumer (at least 1); with the batches being
    /// decoded, at most `prefetch + workers` batches are held in memory.
    pub prefetch: usize,
}

impl Default for LoaderConfig {
    /// One worker per core up to 4, four batches ahead.
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            workers: cores.clamp(1, 4),
            prefetch: 4,
        }
    }
}

/// One decoded batch: `images` is `[batch_size, 3, height, width]` row-major f32 in [-1, 1]
/// ((x / 255 - 0.5) / 0.5 of the 8-bit RGB values after the Lanczos resize).
///
/// Files that failed to decode are left out, so `batch_size` may be smaller than the sampler's
/// batch, even 0: such an empty batch is delivered (with its bucket's `height` and `width`)
/// when it names a file that failed for the first time (or when every file has failed), so
/// that the caller can report it, skip it and still save its position. A file is listed in
/// `bad` only at its first failure; from then on it is dropped from the run without being read
/// again, and batches left empty by dropped files are passed over (see [`Loader::unreadable`]).
#[derive(Debug, Clone)]
pub struct Batch {
    pub images: Vec<f32>,
    pub batch_size: usize,
    pub height: usize,
    pub width: usize,
    /// Dataset indices, full paths and captions of the images in `images`, in order.
    pub indices: Vec<usize>,
    pub paths: Vec<PathBuf>,
    pub captions: Vec<Option<String>>,
    pub bad: Vec<BadFile>,
    /// The epoch this batch belongs to and the sampler position just after it.
    pub epoch: u64,
    pub position_after: usize,
}

impl Batch {
    /// The sampler state to save once this batch has been trained on.
    pub fn state_after(&self) -> SamplerState {
        SamplerState {
            epoch: self.epoch,
            position: self.position_after,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.batch_size == 0
    }
}

/// Batches in sampler order, decoded by `workers` threads ahead of the caller: an iterator of
/// `(Batch, time the call waited for it)`. Dropping the loader stops and joins its threads
/// (each finishes at most the image it is decoding).
pub struct Loader {
    shared: Arc<Shared>,
    rx: Option<Receiver<(u64, Batch)>>,
    pending: BTreeMap<u64, Batch>,
    next_seq: u64,
    state: SamplerState,
    workers: Vec<JoinHandle<()>>,
}

struct Shared {
    root: PathBuf,
    entries: Vec<Entry>,
    /// Entries that failed to decode once: never read again.
    failed: Vec<AtomicBool>,
    failed_count: AtomicUsize,
    dispatch: Mutex<Dispatch>,
    wake: Condvar,
    stop: AtomicBool,
}

struct Dispatch {
    sampler: BatchSampler,
    /// Sequence number of the next batch a worker takes.
    next_seq: u64,
    /// Batches handed to the consumer so far; workers stay within `window` of it.
    delivered: u64,
    window: u64,
}

impl Loader {
    /// Starts the workers on `sampler` (over `dataset`) restored to `state`.
    pub fn new(
        dataset: &Dataset,
        mut sampler: BatchSampler,
        state: SamplerState,
        config: LoaderConfig,
    ) -> Result<Self> {
        if config.workers == 0 || config.prefetch == 0 {
            bail!("the loader needs at least one worker and one batch of prefetch, got {config:?}");
        }
        sampler.restore(state)?;
        let window = config.prefetch + config.workers;
        let shared = Arc::new(Shared {
            root: dataset.root.clone(),
            entries: dataset.entries.clone(),
            failed: dataset
                .entries
                .iter()
                .map(|_| AtomicBool::new(false))
                .collect(),
            failed_count: AtomicUsize::new(0),
            dispatch: Mutex::new(Dispatch {
                sampler,
                next_seq: 0,
                delivered: 0,
                window: window as u64,
            }),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        // Workers never hold more than `window` undelivered batches, so sends never block.
        let (tx, rx) = sync_channel(window);
        let mut loader = Self {
            shared: shared.clone(),
            rx: Some(rx),
            pending: BTreeMap::new(),
            next_seq: 0,
            state,
            workers: Vec::with_capacity(config.workers),
        };
        for i in 0..config.workers {
            let (shared, tx) = (shared.clone(), tx.clone());
            let handle = std::thread::Builder::new()
                .name(format!("fluxflow-loader-{i}"))
                .spawn(move || worker(&shared, &tx))
                .context("cannot start a data loader thread")?;
            loader.workers.push(handle);
        }
        Ok(loader)
    }

    /// The sampler state after the last batch returned by `next` (the state
    /// given to [`new`](Self::new) before the first): what a checkpoint saves.
    pub fn state(&self) -> SamplerState {
        self.state
    }

    /// How many of the dataset's images have failed to decode so far (each is dropped from
    /// the run at its first failure).
    pub fn unreadable(&self) -> usize {
        self.shared.failed_count.load(Ordering::SeqCst)
    }

    /// How many images the dataset lists.
    pub fn len(&self) -> usize {
        self.shared.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shared.entries.is_empty()
    }

    /// Whether every image of the dataset has failed to decode: no batch can ever be filled.
    pub fn exhausted(&self) -> bool {
        self.unreadable() >= self.len()
    }
}

/// Batches forever (the sampler rolls into the next epoch); the caller decides when to stop.
impl Iterator for Loader {
    type Item = (Batch, Duration);

    /// The next batch in sampler order and how long this call waited for it; None when the
    /// dataset has no batches (or every worker has gone).
    fn next(&mut self) -> Option<(Batch, Duration)> {
        let start = Instant::now();
        let rx = self.rx.as_ref()?;
        loop {
            if let Some(batch) = self.pending.remove(&self.next_seq) {
                self.next_seq += 1;
                self.state = batch.state_after();
                lock(&self.shared.dispatch).delivered = self.next_seq;
                self.shared.wake.notify_all();
                if batch.is_empty() && batch.bad.is_empty() && !self.exhausted() {
                    // Its files failed in a batch decoded at the same time and were named
                    // there: nothing to train on and nothing to report.
                    continue;
                }
                return Some((batch, start.elapsed()));
            }
            let (seq, batch) = rx.recv().ok()?;
            self.pending.insert(seq, batch);
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        {
            let _guard = lock(&self.shared.dispatch);
            self.shared.stop.store(true, Ordering::SeqCst);
        }
        self.shared.wake.notify_all();
        self.rx = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn lock(m: &Mutex<Dispatch>) -> MutexGuard<'_, Dispatch> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn worker(shared: &Shared, tx: &SyncSender<(u64, Batch)>) {
    loop {
        let (seq, indices, after) = {
            let mut d = lock(&shared.dispatch);
            while !shared.stop.load(Ordering::SeqCst) && d.next_seq >= d.delivered + d.window {
                d = shared.wake.wait(d).unwrap_or_else(PoisonError::into_inner);
            }
            if shared.stop.load(Ordering::SeqCst) {
                return;
            }
            let Some(indices) = next_live_batch(&mut d.sampler, &shared.failed) else {
                return;
            };
            let seq = d.next_seq;
            d.next_seq += 1;
            (seq, indices, d.sampler.state())
        };
        let built = catch_unwind(AssertUnwindSafe(|| build_batch(shared, &indices, after)));
        let batch = match built {
            Ok(Some(b)) => b,
            Ok(None) => return, // stopped mid-batch
            Err(_) => failed_batch(shared, &indices, after, "the decoder panicked"),
        };
        if tx.send((seq, batch)).is_err() {
            return;
        }
    }
}

/// The sampler's next batch without the files that have failed to decode. A batch left empty
/// is passed over, so an unreadable file no longer takes part in its bucket and a bucket of
/// unreadable files drops out of the schedule; the order of the other batches, and so a
/// resumed run's, stays the sampler's. After a whole epoch of empty batches (every file has
/// failed) the empty batch is returned, for the consumer to see that nothing is left.
fn next_live_batch(sampler: &mut BatchSampler, failed: &[AtomicBool]) -> Option<Vec<usize>> {
    let mut left = sampler.batches_per_epoch().max(1);
    loop {
        let mut batch = sampler.next_batch()?;
        batch.retain(|&i| !failed.get(i).is_some_and(|f| f.load(Ordering::SeqCst)));
        left -= 1;
        if !batch.is_empty() || left == 0 {
            return Some(batch);
        }
    }
}

/// Decodes the batch; None if the loader was stopped meanwhile.
fn build_batch(shared: &Shared, indices: &[usize], after: SamplerState) -> Option<Batch> {
    let (w, h) = bucket(shared, indices);
    let mut batch = empty_batch(w, h, after, indices.len());
    for &i in indices {
        if shared.stop.load(Ordering::SeqCst) {
            return None;
        }
        let Some(entry) = shared.entries.get(i) else {
            batch.bad.push(BadFile {
                path: shared.root.clone(),
                reason: format!("dataset index {i} out of range"),
            });
            continue;
        };
        if shared.failed[i].load(Ordering::SeqCst) {
            continue;
        }
        let path = shared.root.join(&entry.path);
        match load_rgb(&path) {
            Ok(img) => {
                let img = if img.dimensions() == (w as u32, h as u32) {
                    img
                } else {
                    image::imageops::resize(&img, w as u32, h as u32, FilterType::Lanczos3)
                };
                push_chw(&mut batch.images, img.as_raw(), w * h);
                batch.batch_size += 1;
                batch.indices.push(i);
                batch.paths.push(path);
                batch.captions.push(entry.caption.clone());
            }
            Err(e) => {
                if !shared.failed[i].swap(true, Ordering::SeqCst) {
                    shared.failed_count.fetch_add(1, Ordering::SeqCst);
                    batch.bad.push(BadFile {
                        path,
                        reason: format!("{e:#}"),
                    });
                }
            }
        }
    }
    Some(batch)
}

/// The batch's (width, height) as usize: its first valid entry's training size.
fn bucket(shared: &Shared, indices: &[usize]) -> (usize, usize) {
    indices
        .iter()
        .find_map(|&i| shared.entries.get(i))
        .map_or((0, 0), |e| (e.size.0 as usize, e.size.1 as usize))
}

fn empty_batch(w: usize, h: usize, after: SamplerState, capacity: usize) -> Batch {
    Batch {
        images: Vec::with_capacity(capacity * 3 * h * w),
        batch_size: 0,
        height: h,
        width: w,
        indices: Vec::new(),
        paths: Vec::new(),
        captions: Vec::new(),
        bad: Vec::new(),
        epoch: after.epoch,
        position_after: after.position,
    }
}

fn failed_batch(shared: &Shared, indices: &[usize], after: SamplerState, why: &str) -> Batch {
    let (w, h) = bucket(shared, indices);
    let mut batch = empty_batch(w, h, after, 0);
    batch.bad = indices
        .iter()
        .filter(|&&i| {
            let first = shared
                .failed
                .get(i)
                .is_some_and(|f| !f.swap(true, Ordering::SeqCst));
            if first {
                shared.failed_count.fetch_add(1, Ordering::SeqCst);
            }
            first
        })
        .map(|&i| BadFile {
            path: shared
                .entries
                .get(i)
                .map_or_else(|| shared.root.clone(), |e| shared.root.join(&e.path)),
            reason: why.to_string(),
        })
        .collect();
    batch
}

/// Appends interleaved RGB bytes as three planes of (x / 255 - 0.5) / 0.5.
fn push_chw(out: &mut Vec<f32>, rgb: &[u8], pixels: usize) {
    for c in 0..3 {
        out.extend(
            rgb.iter()
                .skip(c)
                .step_by(3)
                .take(pixels)
                .map(|&x| (x as f32 / 255.0 - 0.5) / 0.5),
        );
    }
}
