//! Session facts: `graph/session.json` (reference fields plus ours) merged with the metrics rows.

use std::path::Path;

use serde_json::Value;

use super::metrics::MetricsLog;

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

/// Parses `YYYY-MM-DD[T ]HH:MM:SS[.frac][Z|±HH:MM]` into seconds since the Unix epoch.
/// Timestamps without an offset (Python's `isoformat()`) are read as UTC.
pub fn parse_timestamp(s: &str) -> Option<f64> {
    let s = s.trim();
    let num = |a: usize, b: usize| -> Option<i64> {
        let t = s.get(a..b)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let sep = |i: usize, c: &[u8]| s.as_bytes().get(i).is_some_and(|b| c.contains(b));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"T ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (y, mo, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (h, mi, sec) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = s.get(19..)?;
    let mut frac = 0.0;
    if let Some(r) = rest.strip_prefix('.') {
        let n = r.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        frac = format!("0.{}", &r[..n]).parse().ok()?;
        rest = &r[n..];
    }
    let offset = match rest {
        "" | "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let hm = rest[1..].replace(':', "");
            if hm.len() != 4 || !hm.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            sign * (hm[..2].parse::<i64>().ok()? * 3600 + hm[2..].parse::<i64>().ok()? * 60)
        }
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec - offset;
    Some(secs as f64 + frac)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `1h 24m 05s` style duration.
pub fn format_duration(secs: f64) -> String {
    let total = secs.max(0.0).round() as u64;
    let (h, m, s) = (total / 3600, (total / 60) % 60, total % 60);
    if h > 0 {
        format!("{h}h {m:02}m {s:02}s")
    } else {
        format!("{m}m {s:02}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_parse_with_and_without_offsets() {
        assert_eq!(parse_timestamp("1970-01-01T00:00:00"), Some(0.0));
        assert_eq!(
            parse_timestamp("2025-12-07T18:39:12"),
            Some(1_765_132_752.0)
        );
        assert_eq!(
            parse_timestamp("2025-12-07 18:39:12.5Z"),
            Some(1_765_132_752.5)
        );
        assert_eq!(
            parse_timestamp("2025-12-07T20:39:12+02:00"),
            Some(1_765_132_752.0)
        );
        assert_eq!(parse_timestamp("2025-12-07"), None);
        assert_eq!(parse_timestamp("2025-13-07T18:39:12"), None);
        assert_eq!(parse_timestamp("2025-12-07T18:39:12+2"), None);
    }

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
