//! Training data: the image folder scan with its cached bucket table, the seeded resumable
//! batch sampler, the parallel decoding loader and the synthetic quickstart dataset.
//!
//! The flow is `scan` (headers only, cached) -> `BatchSampler` (one training size per batch,
//! a seeded shuffle per epoch, a saveable position) -> `Loader` (worker threads decode ahead,
//! batches come out in sampler order as `[B, 3, H, W]` f32 in [-1, 1]). Nothing here prints:
//! files that cannot be used are returned as [`BadFile`] records for the caller to log and count.

mod cache;
mod captions;
pub mod loader;
pub mod record;
pub(crate) mod rng;
pub mod sampler;
pub mod scan;
pub mod synthetic;

use std::collections::BTreeMap;
use std::path::PathBuf;

pub use loader::{Batch, Loader, LoaderConfig};
pub use record::{DataChange, DataRecord};
pub use sampler::{BatchSampler, SamplerState};
pub use scan::scan;

/// A file that was skipped, and why (for the caller's warning and the summary's count).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BadFile {
    /// The full path (data folder joined with the relative path).
    pub path: PathBuf,
    pub reason: String,
}

/// One usable image of the data folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the data folder.
    pub path: PathBuf,
    /// (width, height) read from the file's header.
    pub original: (u32, u32),
    /// (width, height) the image is resized to: its bucket.
    pub size: (u32, u32),
    pub caption: Option<String>,
}

/// The scanned data folder.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub root: PathBuf,
    /// Sorted by relative path.
    pub entries: Vec<Entry>,
    /// Image files whose header could not be read; they take no part in training.
    pub bad: Vec<BadFile>,
    /// The bucket cache `<cache_dir>/<hash>.dimensions.json` this scan used or wrote.
    pub cache_file: PathBuf,
    /// True when the sizes came from an existing cache file (no header was read).
    pub from_cache: bool,
    /// Captions-file lines whose name matched no image.
    pub unmatched_captions: usize,
}

impl Dataset {
    /// Entry indices grouped by training size (width, height), sizes ascending, indices
    /// ascending within a bucket.
    pub fn buckets(&self) -> BTreeMap<(u32, u32), Vec<usize>> {
        let mut buckets: BTreeMap<(u32, u32), Vec<usize>> = BTreeMap::new();
        for (i, e) in self.entries.iter().enumerate() {
            buckets.entry(e.size).or_default().push(i);
        }
        buckets
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
