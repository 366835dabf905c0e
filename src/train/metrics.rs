//! `graph/training_metrics.jsonl` in the reference's record shape and `graph/session.json`
//! (the reference's fields plus the resume points and counters the report uses).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Local time as the reference writes it (`datetime.now().isoformat()`).
pub fn now_iso() -> String {
    chrono::Local::now()
        .format("%Y-%m-%dT%H:%M:%S%.6f")
        .to_string()
}

/// One resume of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resume {
    pub at: String,
    pub global_step: u64,
}

/// `graph/session.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub session_id: String,
    pub created_at: String,
    pub resumed_count: u64,
    pub last_update: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_resume_at: Option<String>,
    #[serde(default)]
    pub resumes: Vec<Resume>,
    #[serde(default)]
    pub skipped_batches: u64,
    #[serde(default)]
    pub bad_files: u64,
    #[serde(default)]
    pub started_at: String,
}

impl Session {
    pub fn new() -> Self {
        let now = now_iso();
        Self {
            session_id: chrono::Local::now().format("%Y%m%d_%H%M%S").to_string(),
            created_at: now.clone(),
            resumed_count: 0,
            last_update: now.clone(),
            last_resume_at: None,
            resumes: Vec::new(),
            skipped_batches: 0,
            bad_files: 0,
            started_at: now,
        }
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("{} is damaged", path.display()))
    }

    pub fn save(&mut self, path: &Path) -> Result<()> {
        self.last_update = now_iso();
        crate::atomic_write::write_atomic(path, &serde_json::to_vec_pretty(self)?)
    }

    /// Records a resume at `global_step`.
    pub fn mark_resumed(&mut self, global_step: u64) {
        let now = now_iso();
        self.resumed_count += 1;
        self.last_resume_at = Some(now.clone());
        self.resumes.push(Resume {
            at: now,
            global_step,
        });
    }
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

/// Appends rows to `graph/training_metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
    session_id: String,
}

impl MetricsLog {
    pub fn new(graph_dir: &Path, session_id: &str) -> Self {
        Self {
            path: graph_dir.join("training_metrics.jsonl"),
            session_id: session_id.to_string(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record: `{timestamp, session_id, epoch, batch, global_step, metrics,
    /// learning_rates, extras}`.
    pub fn log(
        &self,
        epoch: u64,
        batch: u64,
        global_step: u64,
        metrics: Map<String, Value>,
        learning_rates: Map<String, Value>,
        extras: Map<String, Value>,
    ) -> Result<()> {
        let row = json!({
            "timestamp": now_iso(),
            "session_id": self.session_id,
            "epoch": epoch,
            "batch": batch,
            "global_step": global_step,
            "metrics": metrics,
            "learning_rates": learning_rates,
            "extras": extras,
        });
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        writeln!(f, "{row}").with_context(|| format!("cannot append to {}", self.path.display()))
    }

    /// Drops the rows after `global_step` (written after the checkpoint a resume starts from),
    /// so a resumed run's log has each step once.
    pub fn truncate_after(&self, global_step: u64) -> Result<usize> {
        if !self.path.exists() {
            return Ok(0);
        }
        let text = fs::read_to_string(&self.path)
            .with_context(|| format!("cannot read {}", self.path.display()))?;
        let mut kept = String::new();
        let mut dropped = 0;
        for line in text.lines() {
            let step = serde_json::from_str::<Value>(line)
                .ok()
                .and_then(|v| v.get("global_step").and_then(Value::as_u64));
            match step {
                Some(s) if s > global_step => dropped += 1,
                Some(_) => {
                    kept.push_str(line);
                    kept.push('\n');
                }
                // A torn last line from a kill: drop it.
                None => dropped += 1,
            }
        }
        if dropped > 0 {
            crate::atomic_write::write_atomic(&self.path, kept.as_bytes())?;
        }
        Ok(dropped)
    }
}
