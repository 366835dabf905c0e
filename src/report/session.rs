//! Session facts: `graph/session.json` (reference fields plus ours) merged with the metrics rows.

use std::path::Path;

use serde_json::Value;

use super::metrics::MetricsLog;
use super::time::parse_timestamp;

/// One resume of the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Resume {
    /// When it resumed, as written.
    pub at: Option<String>,
    /// The global step it resumed at; located from the timestamps when the file lacks it.
    pub global_step: Option<i64>,
}

/// What is known about the run as a whole.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionInfo {
    pub session_id: Option<String>,
    /// `started_at`, else `created_at`, else the first row's timestamp.
    pub started: Option<String>,
    /// Number of resumes (`resumes` length, else the reference's `resumed_count`).
    pub resumed_count: usize,
    pub resumes: Vec<Resume>,
    pub skipped_batches: Option<u64>,
    pub bad_files: Option<u64>,
    pub first_step: Option<i64>,
    pub last_step: Option<i64>,
    pub first_timestamp: Option<String>,
    pub last_timestamp: Option<String>,
    /// Seconds from the first to the last parseable row timestamp (includes gaps between sessions).
    pub wall_time_s: Option<f64>,
}

impl SessionInfo {
    /// Reads `session.json` if present (a missing or unreadable file gives `Ok` with a note)
    /// and completes it from the log. Returns the info and any notes about the file.
    pub fn load(session_path: &Path, log: &MetricsLog) -> (Self, Vec<String>) {
        let mut notes = Vec::new();
        let json = if session_path.exists() {
            match std::fs::read_to_string(session_path)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str::<Value>(&t).map_err(|e| e.to_string()))
            {
                Ok(v) => v,
                Err(e) => {
                    notes.push(format!("ignored {}: {e}", session_path.display()));
                    Value::Null
                }
            }
        } else {
            Value::Null
        };
        (Self::from_parts(&json, log), notes)
    }

    /// Merges a parsed `session.json` (or `Value::Null`) with the log's rows.
    pub fn from_parts(json: &Value, log: &MetricsLog) -> Self {
        let text = |k: &str| json.get(k).and_then(Value::as_str).map(String::from);
        let first = log.rows.first();
        let last = log.rows.last();
        let mut resumes: Vec<Resume> = json
            .get("resumes")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|r| Resume {
                        at: r.get("at").and_then(Value::as_str).map(String::from),
                        global_step: r.get("global_step").and_then(Value::as_i64),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let resumed_count = json
            .get("resumed_count")
            .and_then(Value::as_u64)
            .map_or(0, |n| n as usize)
            .max(resumes.len());
        if resumes.is_empty() && resumed_count > 0 {
            // The reference keeps only the latest resume time.
            if let Some(at) = text("last_resume_at") {
                resumes.push(Resume {
                    at: Some(at),
                    global_step: None,
                });
            }
        }
        for r in &mut resumes {
            if r.global_step.is_none() {
                r.global_step = r.at.as_deref().and_then(|at| step_at(log, at));
            }
        }
        let times: Vec<f64> = log.rows.iter().filter_map(|r| r.time_s).collect();
        let wall_time_s = match (times.first(), times.last()) {
            (Some(a), Some(b)) if times.len() > 1 => Some(b - a),
            _ => None,
        };
        Self {
            session_id: text("session_id").or_else(|| first.and_then(|r| r.session_id.clone())),
            started: text("started_at")
                .or_else(|| text("created_at"))
                .or_else(|| first.and_then(|r| r.timestamp.clone())),
            resumed_count,
            resumes,
            skipped_batches: json.get("skipped_batches").and_then(Value::as_u64),
            bad_files: json.get("bad_files").and_then(Value::as_u64),
            first_step: first.map(|r| r.global_step),
            last_step: last.map(|r| r.global_step),
            first_timestamp: first.and_then(|r| r.timestamp.clone()),
            last_timestamp: last.and_then(|r| r.timestamp.clone()),
            wall_time_s,
        }
    }

    /// Global steps of the resumes that are known, for plot markers.
    pub fn resume_steps(&self) -> Vec<f64> {
        self.resumes
            .iter()
            .filter_map(|r| r.global_step)
            .map(|s| s as f64)
            .collect()
    }
}

/// The step of the first row logged at or after `at`.
fn step_at(log: &MetricsLog, at: &str) -> Option<i64> {
    let t = parse_timestamp(at)?;
    log.rows
        .iter()
        .find(|r| r.time_s.is_some_and(|rt| rt >= t))
        .map(|r| r.global_step)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::time::format_duration;

    #[test]
    fn reference_session_locates_its_last_resume_from_timestamps() {
        let log = MetricsLog::parse(
            "{\"global_step\":0,\"timestamp\":\"2025-12-07T10:00:00\",\"session_id\":\"s\"}\n\
             {\"global_step\":10,\"timestamp\":\"2025-12-07T10:10:00\"}\n\
             {\"global_step\":11,\"timestamp\":\"2025-12-07T12:00:05\"}\n",
        );
        let json = serde_json::json!({"session_id": "s", "created_at": "2025-12-07T09:59:00",
            "resumed_count": 1, "last_resume_at": "2025-12-07T12:00:00"});
        let info = SessionInfo::from_parts(&json, &log);
        assert_eq!(info.resumed_count, 1);
        assert_eq!(info.resume_steps(), vec![11.0]);
        assert_eq!(info.started.as_deref(), Some("2025-12-07T09:59:00"));
        assert_eq!(info.wall_time_s, Some(7205.0));
        assert_eq!(format_duration(7205.0), "2h 00m 05s");
    }
}
