//! Which entries of an output folder a run of ours wrote: `train` refuses a folder that holds
//! anything else (a PyTorch reference run, a user's model file or notes) unless it is a run of
//! ours, and `train --force` deletes the run's files and nothing more.
//!
//! How a run knows its own files: by their exact names and places, the closed list in this
//! file, not by a record of paths kept as the run writes. Every file a run writes has a fixed
//! name or one made of a step number, so the list is short and complete; it holds as well for
//! a run that crashed at any moment (a record would have to be rewritten before each of many
//! writes from three threads, and a crash between the two would leave a file it does not name)
//! and for runs written by earlier builds, which kept no record. A name the list does not hold
//! is never deleted. Its one limit: a file a user saves exactly where the run writes one of its
//! own, under the same name (a `samples/<template>/00100.webp`), is taken for the run's.
//!
//! Two kinds of names:
//! - names only fluxflow writes, ours wherever they are found: the lock, the bucket caches
//!   `<16 hex digits>.dimensions.json`, `synthetic-data/{synthetic.json, synthetic_N.png}` and
//!   the checkpoint folders `checkpoints/step-N/` (`.partial-step-N/` and `.old-step-N/` while
//!   one is written) with their four files;
//! - names a PyTorch reference run or a user writes too (`flxflow_final.safetensors`,
//!   `training_state.json`, `lr_sav.json`, `graph/training_metrics.jsonl`, ...): ours only in a
//!   folder that holds a run of ours ([`Contents::is_run`]: its `run.yaml` or a checkpoint
//!   folder), and under `samples/` only in the folders of the run's templates (named in its
//!   `run.yaml`, when that can be read).
//!
//! Symbolic links are never ours (a run writes none) and never followed.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::{
    CONFIG_FILE, IMAGES_FILE, LOCK_FILE, MODEL_FILE, OPTIM_FILE, REFERENCE_LR_FILE,
    REFERENCE_STATE_FILE, STATE_FILE, TRAINER_FILE,
};
use crate::report::charts::PLOT_FILES;
use crate::weights::TEXT_FILE;

/// Files a run writes at its root.
const ROOT_FILES: [&str; 6] = [
    CONFIG_FILE,
    OPTIM_FILE,
    MODEL_FILE,
    TEXT_FILE,
    REFERENCE_STATE_FILE,
    REFERENCE_LR_FILE,
];

/// Files of a checkpoint folder.
const CHECKPOINT_FILES: [&str; 5] = [MODEL_FILE, TEXT_FILE, TRAINER_FILE, STATE_FILE, IMAGES_FILE];

/// Files a run (its metrics log and its report) writes in `graph/`, besides the plots.
const GRAPH_FILES: [&str; 4] = [
    "training_metrics.jsonl",
    "session.json",
    "training_summary.txt",
    "report.md",
];

/// What an output folder holds, sorted by kind. Paths are relative to the folder.
#[derive(Debug, Default)]
pub struct Contents {
    /// `run.yaml` is there.
    pub config: bool,
    /// The steps of the checkpoint folders `checkpoints/step-N/`, newest first.
    pub checkpoints: Vec<u64>,
    /// The run's files: what `train --force` deletes.
    pub run_files: Vec<PathBuf>,
    /// The run's folders, innermost first: removed by `train --force` once empty.
    pub run_folders: Vec<PathBuf>,
    /// Files fluxflow writes that a new run reuses (the lock, the bucket caches, the generated
    /// synthetic data): kept by `train --force`.
    pub caches: Vec<PathBuf>,
    /// Everything else: files and links fluxflow did not write, and folders it does not
    /// make (listed once, not entered).
    pub foreign: Vec<PathBuf>,
}

impl Contents {
    /// Whether the folder holds a run of ours: its configuration or a checkpoint folder. The
    /// one definition `train` and `resume` share.
    pub fn is_run(&self) -> bool {
        self.config || !self.checkpoints.is_empty()
    }

    /// The first foreign files, for messages: up to `n` names and how many more there are.
    pub fn foreign_list(&self, n: usize) -> String {
        let mut s = self
            .foreign
            .iter()
            .take(n)
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        if self.foreign.len() > n {
            s.push_str(&format!(" and {} more", self.foreign.len() - n));
        }
        s
    }

    /// A foreign model file (a weights file at the root, the model file first), which a new
    /// run can start from through `model_checkpoint`.
    pub fn foreign_model(&self) -> Option<&PathBuf> {
        let weights = |p: &&PathBuf| {
            p.parent() == Some(Path::new("")) && p.extension().is_some_and(|e| e == "safetensors")
        };
        self.foreign
            .iter()
            .find(|p| p.as_os_str() == MODEL_FILE)
            .or_else(|| self.foreign.iter().find(weights))
    }
}

/// A regular file, a folder, or anything else (a link, a pipe): never entered, never ours.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    File,
    Folder,
    Other,
}

/// The entries of `dir` (not following links): name and kind, sorted by name. `None` when the
/// folder does not exist.
fn entries(dir: &Path) -> Result<Option<Vec<(String, Kind)>>> {
    let read = match fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    let mut out = Vec::new();
    for e in read {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        let t = e
            .file_type()
            .with_context(|| format!("cannot read {}", e.path().display()))?;
        let kind = if t.is_file() {
            Kind::File
        } else if t.is_dir() {
            Kind::Folder
        } else {
            Kind::Other
        };
        out.push((e.file_name().to_string_lossy().into_owned(), kind));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Some(out))
}

/// `name` without the `.NAME.tmp` wrapper of an atomic write left by a crash.
fn written(name: &str) -> &str {
    name.strip_prefix('.')
        .and_then(|n| n.strip_suffix(".tmp"))
        .filter(|n| !n.is_empty())
        .unwrap_or(name)
}

fn digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// A checkpoint folder's step: `step-N`, or `.partial-step-N` / `.old-step-N` mid-write.
fn checkpoint_step(name: &str) -> Option<u64> {
    let n = name
        .strip_prefix(".partial-")
        .or_else(|| name.strip_prefix(".old-"))
        .unwrap_or(name);
    n.strip_prefix("step-")
        .filter(|s| digits(s))
        .and_then(|s| s.parse().ok())
}

fn is_bucket_cache(name: &str) -> bool {
    name.strip_suffix(".dimensions.json")
        .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn is_synthetic(name: &str) -> bool {
    name == "synthetic.json"
        || name
            .strip_prefix("synthetic_")
            .and_then(|n| n.strip_suffix(".png"))
            .is_some_and(digits)
}

fn is_sample(name: &str) -> bool {
    name == "original.png"
        || name == "gallery.png"
        || name.strip_suffix(".webp").is_some_and(digits)
}

fn is_graph(name: &str) -> bool {
    GRAPH_FILES.contains(&name) || PLOT_FILES.iter().any(|(f, _, _)| *f == name)
}

/// The template stems named by the run's `run.yaml` (`output.test_image_address`), which name
/// its sample folders; `None` when the file cannot be read as YAML.
fn template_stems(config: &Path) -> Option<Vec<String>> {
    let text = crate::paths::read_regular(config).ok()?;
    let yaml: serde_yaml::Value = serde_yaml::from_slice(&text).ok()?;
    let list = yaml
        .get("output")?
        .get("test_image_address")?
        .as_sequence()?;
    Some(
        list.iter()
            .filter_map(|v| v.as_str())
            .filter_map(|p| Path::new(p).file_stem())
            .map(|s| s.to_string_lossy().into_owned())
            .collect(),
    )
}

/// Where a file found by [`Contents::sort_files`] goes.
#[derive(Clone, Copy)]
enum Owner {
    Run,
    Cache,
}

impl Contents {
    /// Sorts the entries of the folder `rel`: each regular file that `own` accepts (its name,
    /// or the name an interrupted atomic write of it was under) is the run's or a cache, every
    /// other entry foreign. Returns false if the folder does not exist.
    fn sort_files(
        &mut self,
        root: &Path,
        rel: &Path,
        own: impl Fn(&str) -> Option<Owner>,
    ) -> Result<bool> {
        let Some(list) = entries(&root.join(rel))? else {
            return Ok(false);
        };
        for (name, kind) in list {
            let path = rel.join(&name);
            match (kind, own(written(&name))) {
                (Kind::File, Some(Owner::Run)) => self.run_files.push(path),
                (Kind::File, Some(Owner::Cache)) => self.caches.push(path),
                _ => self.foreign.push(path),
            }
        }
        Ok(true)
    }
}

/// Sorts everything under `root` (see the module's documentation). A folder that does not
/// exist is empty.
pub fn inspect(root: &Path) -> Result<Contents> {
    let mut c = Contents::default();
    let Some(top) = entries(root)? else {
        return Ok(c);
    };
    c.config = top
        .iter()
        .any(|(n, k)| n == CONFIG_FILE && *k == Kind::File);
    let ckpt_dir = Path::new("checkpoints");
    let checkpoint_folders: Vec<(String, u64)> = match entries(&root.join(ckpt_dir))? {
        Some(list)
            if top
                .iter()
                .any(|(n, k)| n == "checkpoints" && *k == Kind::Folder) =>
        {
            list.into_iter()
                .filter(|(_, k)| *k == Kind::Folder)
                .filter_map(|(n, _)| checkpoint_step(&n).map(|s| (n, s)))
                .collect()
        }
        _ => Vec::new(),
    };
    c.checkpoints = checkpoint_folders
        .iter()
        .filter(|(n, _)| n.starts_with("step-"))
        .map(|(_, s)| *s)
        .collect();
    c.checkpoints.sort_by(|a, b| b.cmp(a));
    let run = c.is_run();
    let stems = if c.config {
        template_stems(&root.join(CONFIG_FILE))
    } else {
        None
    };

    for (name, kind) in top {
        let rel = PathBuf::from(&name);
        match (name.as_str(), kind) {
            ("checkpoints", Kind::Folder) => {
                let folders: Vec<&String> = checkpoint_folders.iter().map(|(n, _)| n).collect();
                for (n, k) in entries(&root.join(ckpt_dir))?.unwrap_or_default() {
                    if k == Kind::Folder && folders.contains(&&n) {
                        let sub = ckpt_dir.join(&n);
                        c.sort_files(root, &sub, |f| {
                            CHECKPOINT_FILES.contains(&f).then_some(Owner::Run)
                        })?;
                        c.run_folders.push(sub);
                    } else {
                        c.foreign.push(ckpt_dir.join(&n));
                    }
                }
                c.run_folders.push(rel);
            }
            ("graph", Kind::Folder) => {
                c.sort_files(root, &rel, |f| (run && is_graph(f)).then_some(Owner::Run))?;
                c.run_folders.push(rel);
            }
            ("samples", Kind::Folder) => {
                for (n, k) in entries(&root.join(&rel))?.unwrap_or_default() {
                    let template = stems.as_ref().is_none_or(|s| s.contains(&n));
                    if run && k == Kind::Folder && template {
                        let sub = rel.join(&n);
                        c.sort_files(root, &sub, |f| is_sample(f).then_some(Owner::Run))?;
                        c.run_folders.push(sub);
                    } else {
                        c.foreign.push(rel.join(&n));
                    }
                }
                c.run_folders.push(rel);
            }
            ("synthetic-data", Kind::Folder) => {
                c.sort_files(root, &rel, |f| is_synthetic(f).then_some(Owner::Cache))?;
            }
            (n, Kind::File) => {
                let n = written(n);
                if n == LOCK_FILE || is_bucket_cache(n) {
                    c.caches.push(rel);
                } else if run && ROOT_FILES.contains(&n) {
                    c.run_files.push(rel);
                } else {
                    c.foreign.push(rel);
                }
            }
            _ => c.foreign.push(rel),
        }
    }
    c.foreign.sort();
    Ok(c)
}

/// Deletes the run's files ([`Contents::run_files`]), then its folders that are left empty;
/// foreign files, the caches and any folder that still holds something stay. Errors name the
/// file.
pub fn remove_run_files(root: &Path, c: &Contents) -> Result<()> {
    for rel in &c.run_files {
        let p = root.join(rel);
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", p.display())),
        }
    }
    for rel in &c.run_folders {
        // Fails, and is meant to, on a folder that still holds foreign files.
        let _ = fs::remove_dir(root.join(rel));
    }
    Ok(())
}

/// Deletes the generated images and marker of a synthetic data folder (to generate them
/// anew), keeping anything else; returns the files kept.
pub fn clear_synthetic(folder: &Path) -> Result<Vec<PathBuf>> {
    let mut kept = Vec::new();
    for (name, kind) in entries(folder)?.unwrap_or_default() {
        let p = folder.join(&name);
        if kind == Kind::File && is_synthetic(written(&name)) {
            fs::remove_file(&p).with_context(|| format!("cannot remove {}", p.display()))?;
        } else {
            kept.push(p);
        }
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_recognised_exactly() {
        assert_eq!(checkpoint_step("step-00000012"), Some(12));
        assert_eq!(checkpoint_step(".partial-step-00000012"), Some(12));
        assert_eq!(checkpoint_step("step-12a"), None);
        assert_eq!(checkpoint_step("step-"), None);
        assert!(is_bucket_cache("94d405dca9a76e70.dimensions.json"));
        assert!(!is_bucket_cache("notes.dimensions.json"));
        assert!(is_sample("00100.webp") && is_sample("gallery.png"));
        assert!(!is_sample("my-photo.webp") && !is_sample(".webp"));
        assert!(is_synthetic("synthetic_00003.png") && !is_synthetic("synthetic_x.png"));
        assert_eq!(written(".run.yaml.tmp"), "run.yaml");
        assert_eq!(written(".tmp"), ".tmp");
        assert!(is_graph("kl_loss.png") && !is_graph("notes.md"));
    }
}
