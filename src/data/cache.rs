//! The bucket cache `<hash>.dimensions.json`: every image file's header result, keyed by a
//! stable hash of the folder listing so that a changed, added or removed file rebuilds it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::captions::slash_path;

/// Bumped whenever the file's meaning changes; part of the key and checked on load. 2: sizes
/// are upright (EXIF orientation applied) and cut-off JPEGs are recorded as errors.
const VERSION: u32 = 2;

/// One image file as listed: what the cache key covers.
#[derive(Debug, Clone)]
pub(crate) struct FileStamp {
    /// Relative to the data folder.
    pub rel: PathBuf,
    /// Modification time in nanoseconds since the Unix epoch (0 if the platform has none).
    pub mtime_ns: u128,
    pub len: u64,
}

/// What a header read gave: (width, height), or why it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Header {
    Size(u32, u32),
    Bad(String),
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    img_size: Option<u32>,
    files: Vec<CachedFile>,
}

#[derive(Serialize, Deserialize)]
struct CachedFile {
    path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    size: Option<[u32; 2]>,
    /// For people reading the file; recomputed from `size` on load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    training_size: Option<[u32; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// FNV-1a 64 over the format version, the data folder, the cap and the sorted listing
/// (relative path, mtime, length). Stable across runs and builds, unlike std's hasher.
pub(crate) fn key(root: &Path, img_size: Option<u32>, files: &[FileStamp]) -> u64 {
    let mut h = Fnv1a::new();
    h.write(&VERSION.to_le_bytes());
    h.write(root.to_string_lossy().as_bytes());
    h.write(&[0]);
    match img_size {
        Some(s) => {
            h.write(&[1]);
            h.write(&s.to_le_bytes());
        }
        None => h.write(&[0]),
    }
    for f in files {
        h.write(slash_path(&f.rel).as_bytes());
        h.write(&[0]);
        h.write(&f.mtime_ns.to_le_bytes());
        h.write(&f.len.to_le_bytes());
    }
    h.0
}

/// The header results stored at `path` for exactly `files`, or None when the file is
/// missing, unparseable, of another version or for another listing (the caller rebuilds).
pub(crate) fn load(path: &Path, files: &[FileStamp]) -> Option<Vec<Header>> {
    let text = std::fs::read_to_string(path).ok()?;
    let cache: CacheFile = serde_json::from_str(&text).ok()?;
    if cache.version != VERSION || cache.files.len() != files.len() {
        return None;
    }
    let mut headers = Vec::with_capacity(files.len());
    for (c, f) in cache.files.into_iter().zip(files) {
        if c.path != slash_path(&f.rel) {
            return None;
        }
        headers.push(match (c.size, c.error) {
            (Some([w, h]), None) if w > 0 && h > 0 => Header::Size(w, h),
            (None, Some(e)) => Header::Bad(e),
            _ => return None,
        });
    }
    Some(headers)
}

/// Writes the cache atomically (creating `path`'s folder if needed).
pub(crate) fn store(
    path: &Path,
    img_size: Option<u32>,
    files: &[FileStamp],
    headers: &[Header],
    training_size: impl Fn(u32, u32) -> (u32, u32),
) -> Result<()> {
    let cache = CacheFile {
        version: VERSION,
        img_size,
        files: files
            .iter()
            .zip(headers)
            .map(|(f, h)| {
                let path = slash_path(&f.rel);
                match h {
                    Header::Size(w, h) => {
                        let (tw, th) = training_size(*w, *h);
                        CachedFile {
                            path,
                            size: Some([*w, *h]),
                            training_size: Some([tw, th]),
                            error: None,
                        }
                    }
                    Header::Bad(e) => CachedFile {
                        path,
                        size: None,
                        training_size: None,
                        error: Some(e.clone()),
                    },
                }
            })
            .collect(),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the cache folder {}", dir.display()))?;
    }
    let json = serde_json::to_vec_pretty(&cache)
        .with_context(|| format!("cannot serialise the bucket cache {}", path.display()))?;
    crate::atomic_write::write_atomic(path, &json)
        .with_context(|| format!("cannot write the bucket cache {}", path.display()))
}

struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_published_vectors() {
        let mut h = Fnv1a::new();
        h.write(b"");
        assert_eq!(h.0, 0xcbf2_9ce4_8422_2325);
        let mut h = Fnv1a::new();
        h.write(b"a");
        assert_eq!(h.0, 0xaf63_dc4c_8601_ec8c);
        let mut h = Fnv1a::new();
        h.write(b"foobar");
        assert_eq!(h.0, 0x8594_4171_f739_67e8);
    }

    #[test]
    fn key_changes_with_mtime_length_cap_and_folder() {
        let f = |mtime_ns, len| FileStamp {
            rel: PathBuf::from("a/b.png"),
            mtime_ns,
            len,
        };
        let root = Path::new("/data");
        let base = key(root, None, &[f(1, 10)]);
        assert_eq!(base, key(root, None, &[f(1, 10)]));
        assert_ne!(base, key(root, None, &[f(2, 10)]));
        assert_ne!(base, key(root, None, &[f(1, 11)]));
        assert_ne!(base, key(root, Some(64), &[f(1, 10)]));
        assert_ne!(base, key(Path::new("/other"), None, &[f(1, 10)]));
    }
}
