//! Scanning the data folder: image files found recursively, sizes from headers only (cached),
//! training sizes by the reference rule after the `img_size` cap, captions attached.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{bail, Context, Result};

use super::cache::{self, FileStamp, Header};
use super::captions::Captions;
use super::{BadFile, Dataset, Entry};
use crate::image_io::upright_size;
use crate::resize_rule::bucket_size;

/// File extensions (compared case-insensitively) taken as images; everything else is ignored.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// Scans `root` recursively for JPEG/PNG/WebP files (sorted by relative path), reads their
/// headers for the sizes and groups them by training size, reusing
/// `<cache_dir>/<hash>.dimensions.json` when the listing (paths, modification times, lengths),
/// the folder and `img_size` are unchanged (a missing or corrupt cache is rebuilt).
///
/// Files whose header is empty, truncated or unreadable (and JPEGs cut off anywhere, which are
/// read whole) are left out and listed in `Dataset::bad`; sizes are upright (EXIF orientation
/// applied). Symlinked files and folders are followed, each folder walked once (no loops, no
/// duplicates).
/// Errors: a missing or empty folder, or one without a single usable image ("no images found
/// in <folder>"); an unreadable or malformed captions file; `img_size` of 0; a cache that
/// cannot be written.
pub fn scan(
    root: &Path,
    captions: Option<&Path>,
    img_size: Option<u32>,
    cache_dir: &Path,
) -> Result<Dataset> {
    if img_size == Some(0) {
        bail!("data.img_size must be positive, got 0");
    }
    if !root.is_dir() {
        bail!(
            "no images found in {}: the data folder does not exist or is not a folder",
            root.display()
        );
    }
    let captions = captions.map(Captions::read).transpose()?;
    let (files, mut bad) = list_images(root)?;
    if files.is_empty() {
        bail!(
            "no images found in {} (looked for .jpg, .jpeg, .png and .webp files, recursively)",
            root.display()
        );
    }

    let canonical = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    let key = cache::key(&canonical, img_size, &files);
    let cache_file = cache_dir.join(format!("{key:016x}.dimensions.json"));
    let (headers, from_cache) = match cache::load(&cache_file, &files) {
        Some(h) => (h, true),
        None => {
            let h = read_headers(root, &files);
            cache::store(&cache_file, img_size, &files, &h, |w, h| {
                bucket_size(w, h, img_size)
            })?;
            (h, false)
        }
    };

    let mut entries = Vec::with_capacity(files.len());
    for (f, h) in files.iter().zip(headers) {
        match h {
            Header::Size(w, h) => entries.push(Entry {
                path: f.rel.clone(),
                original: (w, h),
                size: bucket_size(w, h, img_size),
                caption: captions
                    .as_ref()
                    .and_then(|c| c.lookup(&f.rel))
                    .map(str::to_string),
            }),
            Header::Bad(reason) => bad.push(BadFile {
                path: root.join(&f.rel),
                reason,
            }),
        }
    }
    if entries.is_empty() {
        let first = bad
            .first()
            .map(|b| format!(" (first: {}: {})", b.path.display(), b.reason))
            .unwrap_or_default();
        bail!(
            "no images found in {}: none of its {} image files is readable{first}",
            root.display(),
            files.len()
        );
    }
    let unmatched_captions = captions
        .as_ref()
        .map_or(0, |c| c.unmatched(entries.iter().map(|e| e.path.as_path())));
    Ok(Dataset {
        root: root.to_path_buf(),
        entries,
        bad,
        cache_file,
        from_cache,
        unmatched_captions,
    })
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Image files under `root`, sorted by relative path; unreadable subfolders become BadFiles.
///
/// Symlinked files are followed. Symlinked folders are followed once: every folder is walked
/// at most once, by its canonical path, so a link back up the tree (a loop) or a second way
/// into a folder already walked adds nothing. Real folders are walked before linked ones, and
/// linked ones in path order, so a folder reached both ways is listed under its real path.
fn list_images(root: &Path) -> Result<(Vec<FileStamp>, Vec<BadFile>)> {
    let mut files = Vec::new();
    let mut bad = Vec::new();
    let mut walked: HashSet<PathBuf> = HashSet::new();
    let mut stack = vec![PathBuf::new()];
    let mut linked: BTreeSet<PathBuf> = BTreeSet::new();
    while let Some(rel_dir) = stack.pop().or_else(|| linked.pop_first()) {
        let dir = root.join(&rel_dir);
        if !walked.insert(dir.canonicalize().unwrap_or_else(|_| dir.clone())) {
            continue;
        }
        let read = match fs::read_dir(&dir) {
            Ok(r) => r,
            Err(e) if rel_dir.as_os_str().is_empty() => {
                return Err(e)
                    .with_context(|| format!("cannot list the data folder {}", dir.display()))
            }
            Err(e) => {
                bad.push(BadFile {
                    path: dir,
                    reason: format!("cannot list folder: {e}"),
                });
                continue;
            }
        };
        for item in read {
            let item = match item {
                Ok(i) => i,
                Err(e) => {
                    bad.push(BadFile {
                        path: dir.clone(),
                        reason: format!("cannot list folder: {e}"),
                    });
                    break;
                }
            };
            let rel = rel_dir.join(item.file_name());
            match item.file_type() {
                Ok(t) if t.is_dir() => {
                    stack.push(rel);
                    continue;
                }
                Ok(t) if t.is_symlink() && fs::metadata(item.path()).is_ok_and(|m| m.is_dir()) => {
                    linked.insert(rel);
                    continue;
                }
                _ => {}
            }
            if !is_image(&rel) {
                continue;
            }
            match fs::metadata(item.path()) {
                Ok(m) if m.is_file() => files.push(FileStamp {
                    rel,
                    mtime_ns: m
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_nanos()),
                    len: m.len(),
                }),
                Ok(_) => {} // a device, a pipe: not an image file
                Err(e) => bad.push(BadFile {
                    path: item.path(),
                    reason: format!("cannot stat: {e}"),
                }),
            }
        }
    }
    files.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok((files, bad))
}

/// Reads every header, split over the available cores; results in `files` order.
fn read_headers(root: &Path, files: &[FileStamp]) -> Vec<Header> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let chunk = files.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = files
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|f| read_header(&root.join(&f.rel), f.len))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .zip(files.chunks(chunk))
            .flat_map(|(h, part)| {
                h.join().unwrap_or_else(|_| {
                    vec![Header::Bad("the header reader panicked".into()); part.len()]
                })
            })
            .collect()
    })
}

fn read_header(path: &Path, len: u64) -> Header {
    if len == 0 {
        return Header::Bad("empty file".into());
    }
    match upright_size(path) {
        Ok((w, h)) if w > 0 && h > 0 => Header::Size(w, h),
        Ok((w, h)) => Header::Bad(format!("header gives an empty size {w}x{h}")),
        Err(e) => Header::Bad(format!("{e:#}")),
    }
}

/// The image files under `root` (full paths, sorted by relative path) and the subfolders that
/// could not be listed, without reading any file: what `fluxflow eval` walks.
pub fn image_files(root: &Path) -> Result<(Vec<PathBuf>, Vec<BadFile>)> {
    let (files, bad) = list_images(root)?;
    Ok((files.into_iter().map(|f| root.join(f.rel)).collect(), bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_image_extensions_count_whatever_their_case() {
        for p in ["a.jpg", "a.JPEG", "b/c.Png", "x.webp"] {
            assert!(is_image(Path::new(p)), "{p}");
        }
        for p in ["a.txt", "a.gif", "png", "a.png.tmp", "a"] {
            assert!(!is_image(Path::new(p)), "{p}");
        }
    }
}
