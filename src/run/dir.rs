//! A run's output folder and its checkpoints. Each checkpoint is a folder
//! `checkpoints/step-NNNNNNNN/` written whole under a temporary name, fsynced and renamed, so
//! the previous complete checkpoint always survives a crash, a full disk or a kill; only then
//! are the oldest beyond `keep_last` removed. A checkpoint lists its files and their sizes in
//! `state.json` (written last), which is how a damaged one is recognised.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

pub mod own;

/// The file a checkpoint's manifest and loop state live in.
pub const STATE_FILE: &str = "state.json";
/// The effective configuration kept in a run folder.
pub const CONFIG_FILE: &str = "run.yaml";
/// The optimizer JSON as the run uses it, copied into the run folder.
pub const OPTIM_FILE: &str = "optim.json";
/// The model file of a checkpoint (the reference's name), also copied to the run's root.
pub const MODEL_FILE: &str = "flxflow_final.safetensors";
/// Optimizer moments, EMA and (for non-f32 runs) exact weights, in a checkpoint.
pub const TRAINER_FILE: &str = "trainer.safetensors";
/// The data set a checkpoint trained on (`run::checkpoint::DataRecord`; absent in checkpoints
/// written before it was saved).
pub const IMAGES_FILE: &str = "images.json";
/// The reference's training state at the run's root.
pub const REFERENCE_STATE_FILE: &str = "training_state.json";
/// The reference's learning rates at the run's root.
pub const REFERENCE_LR_FILE: &str = "lr_sav.json";
/// Fault-injection hook for tests: `NAME` or `NAME:K` makes checkpoint writes of files whose
/// name contains NAME fail half-way (as a full disk would), after K successful ones.
pub const INJECT_FAILURE_ENV: &str = "FLUXFLOW_INJECT_WRITE_FAILURE";

/// Test hook: `MS` makes each checkpoint file's write take MS milliseconds longer (a slow disk),
/// so that a test can act while a background write is in flight.
pub const INJECT_DELAY_ENV: &str = "FLUXFLOW_INJECT_WRITE_DELAY_MS";

static INJECT_SEEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Whether the hook fails this write of `name`.
fn injected_failure(name: &str) -> bool {
    let Ok(spec) = std::env::var(INJECT_FAILURE_ENV) else {
        return false;
    };
    let (pattern, skip) = match spec.rsplit_once(':') {
        Some((p, k)) => (p.to_string(), k.parse::<usize>().unwrap_or(0)),
        None => (spec.clone(), 0),
    };
    if pattern.is_empty() || !name.contains(&pattern) {
        return false;
    }
    INJECT_SEEN.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= skip
}

/// The lock file of a run folder (see [`RunDir::lock`]).
pub const LOCK_FILE: &str = ".fluxflow.lock";

/// An exclusive advisory lock on a run folder, held until dropped. The operating system drops
/// it when the process ends in any way (a crash or `kill -9` included), so it is never stale.
#[derive(Debug)]
pub struct RunLock {
    _file: fs::File,
}

/// A run's output folder.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub root: PathBuf,
}

/// The manifest part of `state.json`: file name -> size in bytes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub files: BTreeMap<String, u64>,
}

impl RunDir {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    pub fn graph(&self) -> PathBuf {
        self.root.join("graph")
    }

    pub fn samples(&self) -> PathBuf {
        self.root.join("samples")
    }

    /// What the folder holds: the files of a run of ours, its caches and anything else
    /// ([`own::inspect`]).
    pub fn contents(&self) -> Result<own::Contents> {
        own::inspect(&self.root)
    }

    /// Takes the folder's exclusive lock (creating the folder if needed): one `train` or
    /// `resume` writes a run folder at a time. A second process is refused, naming the process
    /// that holds it, before it changes anything in the folder.
    pub fn lock(&self) -> Result<RunLock> {
        fs::create_dir_all(&self.root)
            .with_context(|| format!("cannot create the output folder {}", self.root.display()))?;
        let path = self.root.join(LOCK_FILE);
        // Never through a link: a lock that is a symbolic link to another file would get that
        // file truncated and overwritten with a process id.
        let opened = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path);
        let mut file = match opened {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                let target = fs::read_link(&path)
                    .map(|t| format!(" to {}", t.display()))
                    .unwrap_or_default();
                bail!(
                    "the lock file {} is a symbolic link{target}; fluxflow does not follow it \
                     (it would overwrite the file it points to): remove the link and try again",
                    path.display()
                );
            }
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        };
        let kind = file
            .metadata()
            .with_context(|| format!("cannot read {}", path.display()))?
            .file_type();
        if !kind.is_file() {
            bail!(
                "the lock file {} is not a regular file; remove it and try again",
                path.display()
            );
        }
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = std::io::Read::read_to_string(&mut file, &mut holder);
                let holder = match holder.trim() {
                    "" => "another process".to_string(),
                    pid => format!("process {pid}"),
                };
                bail!(
                    "run folder {} in use by {holder} (a train or resume of it is running); wait \
                     for it to finish or stop it first",
                    self.root.display()
                );
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
        // Who holds it, for the message above; the lock itself is what counts.
        file.set_len(0)
            .and_then(|_| file.write_all(std::process::id().to_string().as_bytes()))
            .and_then(|_| file.flush())
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(RunLock { _file: file })
    }

    /// Creates the folder structure; the error names the folder.
    pub fn create(&self) -> Result<()> {
        for d in [
            self.root.clone(),
            self.checkpoints(),
            self.graph(),
            self.samples(),
        ] {
            fs::create_dir_all(&d)
                .with_context(|| format!("cannot create the output folder {}", d.display()))?;
        }
        Ok(())
    }

    /// Complete checkpoints, newest first: (step, folder).
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        let dir = self.checkpoints();
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(step) = name
                .strip_prefix("step-")
                .and_then(|s| s.parse::<u64>().ok())
            {
                out.push((step, e.path()));
            }
        }
        out.sort_by_key(|e| std::cmp::Reverse(e.0));
        Ok(out)
    }

    /// Writes a checkpoint for `step` from (file name, bytes) pairs plus `state` (JSON) as
    /// `state.json` with the manifest, atomically, then keeps only the newest `keep_last`.
    pub fn save_checkpoint(
        &self,
        step: u64,
        files: &[(&str, Vec<u8>)],
        state: serde_json::Value,
        keep_last: usize,
    ) -> Result<PathBuf> {
        let dir = self.checkpoints();
        let name = format!("step-{step:08}");
        let partial = dir.join(format!(".partial-{name}"));
        let fin = dir.join(&name);
        if partial.exists() {
            fs::remove_dir_all(&partial)
                .with_context(|| format!("cannot remove {}", partial.display()))?;
        }
        let result = (|| -> Result<()> {
            fs::create_dir_all(&partial)
                .with_context(|| format!("cannot create {}", partial.display()))?;
            let mut manifest = Manifest::default();
            for (file, bytes) in files {
                write_synced(&partial.join(file), bytes)?;
                manifest.files.insert(file.to_string(), bytes.len() as u64);
            }
            let mut state = state;
            if let serde_json::Value::Object(m) = &mut state {
                m.insert("manifest".into(), serde_json::to_value(&manifest)?);
            }
            write_synced(
                &partial.join(STATE_FILE),
                &serde_json::to_vec_pretty(&state)?,
            )?;
            sync_dir(&partial);
            if fin.exists() {
                // The same step saved again (a stop right after a resume): replace it.
                let old = dir.join(format!(".old-{name}"));
                let _ = fs::remove_dir_all(&old);
                fs::rename(&fin, &old)?;
                fs::rename(&partial, &fin)?;
                let _ = fs::remove_dir_all(&old);
            } else {
                fs::rename(&partial, &fin)
                    .with_context(|| format!("cannot rename {}", partial.display()))?;
            }
            sync_dir(&dir);
            Ok(())
        })();
        if let Err(e) = result {
            let _ = fs::remove_dir_all(&partial);
            let previous = match self.list().unwrap_or_default().first() {
                Some((s, p)) => format!(
                    "the previous checkpoint (step {s}, {}) is intact",
                    p.display()
                ),
                None => "no earlier checkpoint of this run exists, so there is nothing to resume \
                         from yet"
                    .to_string(),
            };
            return Err(e.context(format!(
                "cannot write the checkpoint of step {step} in {}; {previous}",
                dir.display()
            )));
        }
        for (_, old) in self.list()?.into_iter().skip(keep_last.max(1)) {
            let _ = fs::remove_dir_all(old);
        }
        Ok(fin)
    }

    /// Reads a checkpoint's `state.json` and checks every file of its manifest is there with
    /// its size. Any problem is an error naming the checkpoint.
    pub fn verify(&self, ckpt: &Path) -> Result<serde_json::Value> {
        let state_path = ckpt.join(STATE_FILE);
        let text = fs::read(&state_path)
            .with_context(|| format!("cannot read {}", state_path.display()))?;
        let state: serde_json::Value = serde_json::from_slice(&text)
            .with_context(|| format!("{} is damaged (not valid JSON)", state_path.display()))?;
        let manifest: Manifest = serde_json::from_value(
            state
                .get("manifest")
                .cloned()
                .ok_or_else(|| anyhow!("{} has no manifest", state_path.display()))?,
        )?;
        for (file, size) in &manifest.files {
            let p = ckpt.join(file);
            let actual = fs::metadata(&p)
                .with_context(|| format!("{} is missing", p.display()))?
                .len();
            if actual != *size {
                bail!("{} has {actual} bytes, {size} were written", p.display());
            }
        }
        Ok(state)
    }
}

/// Writes and fsyncs a file (honouring the failure-injection hook).
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut f =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    if let Some(ms) = std::env::var(INJECT_DELAY_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    if injected_failure(&name) {
        f.write_all(&bytes[..bytes.len() / 2])?;
        bail!(
            "cannot write {}: No space left on device (injected failure)",
            path.display()
        );
    }
    f.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("cannot flush {}", path.display()))?;
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        // Makes renames durable; some filesystems refuse fsync on folders.
        let _ = d.sync_all();
    }
}
