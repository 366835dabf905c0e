//! Reads `graph/training_metrics.jsonl` (the reference's record shape plus our extras) tolerantly.
//!
//! One JSON object per line. Blank lines are ignored; lines that are not JSON objects with an
//! integer `global_step` are skipped and counted. Python's `json.dumps` writes non-finite floats
//! as bare `NaN` / `Infinity` / `-Infinity`, which are not JSON: they are read as missing values
//! (and counted per series) instead of losing the whole line.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Map, Value};

use super::time::parse_timestamp;

/// Min, max and mean of one colour channel of a reconstruction, in [-1, 1] scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChannelStats {
    pub min: f64,
    pub max: f64,
    pub mean: f64,
}

/// R, G, B statistics of one sample reconstruction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleColour {
    pub r: ChannelStats,
    pub g: ChannelStats,
    pub b: ChannelStats,
    /// PSNR (dB) of the 8-bit reconstruction against the template, when logged.
    pub psnr: Option<f64>,
}

/// One logged row. Missing sections are empty maps; non-finite values are `None`.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub timestamp: Option<String>,
    /// Seconds since the Unix epoch, when `timestamp` parses.
    pub time_s: Option<f64>,
    pub session_id: Option<String>,
    pub epoch: Option<i64>,
    pub batch: Option<i64>,
    pub global_step: i64,
    pub metrics: BTreeMap<String, Option<f64>>,
    pub learning_rates: BTreeMap<String, Option<f64>>,
    /// Numeric extras only (`batch_time`, `data_wait`, `eta_seconds`, ...).
    pub extras: BTreeMap<String, Option<f64>>,
    /// `extras.samples`: image stem -> colour statistics.
    pub samples: BTreeMap<String, SampleColour>,
}

/// Which section of a row a series comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Metrics,
    LearningRates,
    Extras,
}

/// Values of one key over the run, in file order.
#[derive(Debug, Clone, Default)]
pub struct Series {
    /// (global_step, value) for every row holding a finite value.
    pub points: Vec<(f64, f64)>,
    /// Rows where the key was present but its value was NaN/Infinity/null.
    pub non_finite: usize,
}

impl Series {
    pub fn values(&self) -> Vec<f64> {
        self.points.iter().map(|p| p.1).collect()
    }
}

/// The parsed log.
#[derive(Debug, Clone, Default)]
pub struct MetricsLog {
    pub rows: Vec<Row>,
    /// Lines that were neither blank nor a usable record.
    pub malformed_lines: usize,
    /// Their line numbers (1-based), in file order.
    pub malformed_at: Vec<usize>,
}

impl MetricsLog {
    /// Reads and parses a metrics file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read metrics file {}", path.display()))?;
        Ok(Self::parse(&text))
    }

    /// Parses the text of a metrics file; never fails, counts bad lines instead.
    pub fn parse(text: &str) -> Self {
        let mut log = Self::default();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match parse_row(line) {
                Some(row) => log.rows.push(row),
                None => {
                    log.malformed_lines += 1;
                    log.malformed_at.push(i + 1);
                }
            }
        }
        log
    }

    /// "3, 7 and 12" (at most `most` numbers, then how many more): the malformed lines' numbers.
    pub fn malformed_line_numbers(&self, most: usize) -> String {
        let shown: Vec<String> = self
            .malformed_at
            .iter()
            .take(most)
            .map(usize::to_string)
            .collect();
        let more = self.malformed_at.len().saturating_sub(most);
        match (shown.split_last(), more) {
            (None, _) => String::new(),
            (Some((last, [])), 0) => last.clone(),
            (Some((last, rest)), 0) => format!("{} and {last}", rest.join(", ")),
            (Some(_), more) => format!("{} and {more} more", shown.join(", ")),
        }
    }

    /// All keys of a section that occur in any row, sorted.
    pub fn keys(&self, section: Section) -> Vec<String> {
        let mut keys: Vec<String> = Vec::new();
        for row in &self.rows {
            for k in section_of(row, section).keys() {
                if !keys.contains(k) {
                    keys.push(k.clone());
                }
            }
        }
        keys.sort();
        keys
    }

    /// The series of one key of one section.
    pub fn series(&self, section: Section, key: &str) -> Series {
        let mut s = Series::default();
        for row in &self.rows {
            match section_of(row, section).get(key) {
                Some(Some(v)) => s.points.push((row.global_step as f64, *v)),
                Some(None) => s.non_finite += 1,
                None => {}
            }
        }
        s
    }

    /// Template PSNRs by image stem: (global_step, dB) in file order.
    pub fn template_psnr(&self) -> BTreeMap<String, Vec<(f64, f64)>> {
        let mut out: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for row in &self.rows {
            for (stem, c) in &row.samples {
                if let Some(p) = c.psnr {
                    out.entry(stem.clone())
                        .or_default()
                        .push((row.global_step as f64, p));
                }
            }
        }
        out
    }

    /// The last row that carries sample colour statistics.
    pub fn latest_samples(&self) -> Option<&Row> {
        self.rows.iter().rev().find(|r| !r.samples.is_empty())
    }
}

fn section_of(row: &Row, section: Section) -> &BTreeMap<String, Option<f64>> {
    match section {
        Section::Metrics => &row.metrics,
        Section::LearningRates => &row.learning_rates,
        Section::Extras => &row.extras,
    }
}

fn parse_row(line: &str) -> Option<Row> {
    let value: Value = serde_json::from_str(&replace_non_finite(line)).ok()?;
    let obj = value.as_object()?;
    let global_step = obj.get("global_step")?.as_i64()?;
    let timestamp = obj
        .get("timestamp")
        .and_then(Value::as_str)
        .map(String::from);
    let extras = obj.get("extras").and_then(Value::as_object);
    Some(Row {
        time_s: timestamp.as_deref().and_then(parse_timestamp),
        timestamp,
        session_id: obj
            .get("session_id")
            .and_then(Value::as_str)
            .map(String::from),
        epoch: obj.get("epoch").and_then(Value::as_i64),
        batch: obj.get("batch").and_then(Value::as_i64),
        global_step,
        metrics: numbers(obj.get("metrics").and_then(Value::as_object)),
        learning_rates: numbers(obj.get("learning_rates").and_then(Value::as_object)),
        extras: numbers(extras),
        samples: extras
            .and_then(|e| e.get("samples"))
            .and_then(Value::as_object)
            .map(samples)
            .unwrap_or_default(),
    })
}

/// Numeric entries of an object; `null` (a replaced NaN) becomes `None`, other types are dropped.
fn numbers(obj: Option<&Map<String, Value>>) -> BTreeMap<String, Option<f64>> {
    let mut out = BTreeMap::new();
    for (k, v) in obj.into_iter().flatten() {
        match v {
            Value::Number(n) => {
                out.insert(k.clone(), n.as_f64().filter(|x| x.is_finite()));
            }
            Value::Null => {
                out.insert(k.clone(), None);
            }
            _ => {}
        }
    }
    out
}

fn samples(obj: &Map<String, Value>) -> BTreeMap<String, SampleColour> {
    let channel = |v: &Value, c: &str| -> Option<ChannelStats> {
        let a = v.get(c)?.as_array()?;
        let f = |i: usize| a.get(i).and_then(Value::as_f64);
        Some(ChannelStats {
            min: f(0)?,
            max: f(1)?,
            mean: f(2)?,
        })
    };
    obj.iter()
        .filter_map(|(stem, v)| {
            let colour = SampleColour {
                r: channel(v, "r")?,
                g: channel(v, "g")?,
                b: channel(v, "b")?,
                psnr: v.get("psnr").and_then(Value::as_f64),
            };
            Some((stem.clone(), colour))
        })
        .collect()
}

/// Replaces the bare tokens `NaN`, `Infinity` and `-Infinity` outside strings with `null`.
fn replace_non_finite(line: &str) -> std::borrow::Cow<'_, str> {
    if !line.contains("NaN") && !line.contains("Infinity") {
        return line.into();
    }
    let mut out = String::with_capacity(line.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = line;
    while let Some(c) = rest.chars().next() {
        if in_string {
            in_string = escaped || c != '"';
            escaped = !escaped && c == '\\';
        } else if c == '"' {
            in_string = true;
        } else {
            let token = ["-Infinity", "Infinity", "NaN"]
                .into_iter()
                .find(|t| rest.starts_with(t));
            if let Some(t) = token {
                out.push_str("null");
                rest = &rest[t.len()..];
                continue;
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_tokens_become_missing_values_but_strings_are_kept() {
        let line = r#"{"global_step": 3, "session_id": "NaN \"x\" Infinity", "metrics": {"vae_loss": NaN, "kl_loss": -Infinity, "kl_beta": 0.5}}"#;
        let row = parse_row(line).unwrap();
        assert_eq!(row.session_id.as_deref(), Some("NaN \"x\" Infinity"));
        assert_eq!(row.metrics["vae_loss"], None);
        assert_eq!(row.metrics["kl_loss"], None);
        assert_eq!(row.metrics["kl_beta"], Some(0.5));
    }

    #[test]
    fn rows_without_integer_step_or_object_are_malformed() {
        let text = "{\"global_step\": 1}\n\n[1,2]\n{\"global_step\": \"2\"}\n{not json\n{\"global_step\": 2, \"metrics\": {\"vae_loss\": 1.5}}\n";
        let log = MetricsLog::parse(text);
        assert_eq!(log.rows.len(), 2);
        assert_eq!(log.malformed_lines, 3);
        assert_eq!(log.malformed_at, vec![3, 4, 5]);
        assert_eq!(log.malformed_line_numbers(10), "3, 4 and 5");
        assert_eq!(log.malformed_line_numbers(2), "3, 4 and 1 more");
        let s = log.series(Section::Metrics, "vae_loss");
        assert_eq!(s.points, vec![(2.0, 1.5)]);
    }

    #[test]
    fn samples_are_read_from_extras() {
        let line = r#"{"global_step": 100, "extras": {"samples": {"template": {"r": [-1, 0.5, -0.2], "g": [-0.9, 0.4, -0.1], "b": [-0.8, 0.3, 0.0]}, "bad": {"r": [1]}}}}"#;
        let row = parse_row(line).unwrap();
        assert_eq!(row.samples.len(), 1);
        assert_eq!(row.samples["template"].g.max, 0.4);
        assert!(row.extras.is_empty());
    }
}
