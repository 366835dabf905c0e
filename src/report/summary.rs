//! `graph/training_summary.txt`: session facts and per-series statistics as plain text.

use std::fmt::Write;

use super::metrics::{MetricsLog, Section, Series};
use super::session::SessionInfo;
use super::stats::{fmt_fixed, Stats};
use super::time::format_duration;

/// Metrics shown first, in this order; any other metric keys follow alphabetically.
pub const LEADING_METRICS: [&str; 3] = ["vae_loss", "kl_loss", "kl_beta"];
/// Extras that are summarised (others, such as `eta_seconds`, are not statistics of the run).
pub const TIMING_EXTRAS: [&str; 3] = ["batch_time", "data_wait", "ckpt_wait"];

/// Metric keys in display order.
pub fn metric_keys(log: &MetricsLog) -> Vec<String> {
    let all = log.keys(Section::Metrics);
    let mut keys: Vec<String> = LEADING_METRICS
        .iter()
        .filter(|k| all.iter().any(|a| a == *k))
        .map(|k| k.to_string())
        .collect();
    let rest: Vec<String> = all.into_iter().filter(|k| !keys.contains(k)).collect();
    keys.extend(rest);
    keys
}

/// The text of `training_summary.txt`.
pub fn render(log: &MetricsLog, session: &SessionInfo) -> String {
    let mut out = String::from("FluxFlow training summary\n=========================\n\n");
    for (k, v) in session_lines(log, session) {
        let _ = writeln!(out, "{:<17} {v}", format!("{k}:"));
    }
    out.push_str(concat!(
        "\nstd is the population standard deviation (divides by N, as numpy.std).\n",
        "change = (final - initial) / |initial| x 100; negative means the value went down\n",
        "(the reference script printed (initial - final) / |initial|: the opposite sign).\n",
    ));
    let sections = [
        ("METRICS", Section::Metrics, metric_keys(log)),
        (
            "LEARNING RATES",
            Section::LearningRates,
            log.keys(Section::LearningRates),
        ),
        (
            "TIMING (seconds per step)",
            Section::Extras,
            TIMING_EXTRAS.iter().map(|s| s.to_string()).collect(),
        ),
    ];
    let templates = log.template_psnr();
    if !templates.is_empty() {
        out.push_str("\nTEMPLATE PSNR (dB, 8-bit reconstruction vs template)\n");
        out.push_str(&"-".repeat(51));
        out.push('\n');
        for (stem, points) in &templates {
            if let (Some(first), Some(last)) = (points.first(), points.last()) {
                let _ = writeln!(
                    out,
                    "{stem}: {:.2} at step {:.0} -> {:.2} at step {:.0}",
                    first.1, first.0, last.1, last.0
                );
            }
        }
    }
    for (title, section, keys) in sections {
        let blocks: Vec<String> = keys
            .iter()
            .filter_map(|k| block(k, &log.series(section, k)))
            .collect();
        if blocks.is_empty() {
            continue;
        }
        let _ = write!(out, "\n{title}\n{}\n", "-".repeat(title.len()));
        for b in blocks {
            out.push_str(&b);
        }
    }
    out
}

/// Key/value lines of the session section (unknown facts are left out).
pub fn session_lines(log: &MetricsLog, s: &SessionInfo) -> Vec<(&'static str, String)> {
    let mut v = Vec::new();
    if let Some(id) = &s.session_id {
        v.push(("session id", id.clone()));
    }
    if let Some(t) = &s.started {
        v.push(("started", t.clone()));
    }
    let plural = |n: usize, w: &str| format!("{n} {w}{}", if n == 1 { "" } else { "s" });
    v.push((
        "rows read",
        format!(
            "{} ({} skipped)",
            log.rows.len(),
            plural(log.malformed_lines, "malformed line")
        ),
    ));
    if let (Some(a), Some(b)) = (s.first_step, s.last_step) {
        v.push(("global steps", format!("{a} -> {b}")));
    }
    if let Some(t) = &s.first_timestamp {
        v.push(("first logged", t.clone()));
    }
    if let Some(t) = &s.last_timestamp {
        v.push(("last logged", t.clone()));
    }
    if let Some(w) = s.wall_time_s {
        let d = format_duration(w);
        v.push((
            "wall time",
            format!("{d} (first to last row, gaps included)"),
        ));
    }
    v.push(("resumes", resumes_text(s)));
    if let Some(n) = s.skipped_batches {
        v.push(("skipped batches", n.to_string()));
    }
    if let Some(n) = s.bad_files {
        v.push(("bad files", n.to_string()));
    }
    v
}

/// `0`, or `2: step 200 (2025-12-07T12:00:00), step 400 (...)`.
pub fn resumes_text(s: &SessionInfo) -> String {
    if s.resumed_count == 0 {
        return "0".into();
    }
    let each: Vec<String> = s
        .resumes
        .iter()
        .map(|r| {
            let step = r
                .global_step
                .map_or("step unknown".into(), |g| format!("step {g}"));
            match &r.at {
                Some(at) => format!("{step} ({at})"),
                None => step,
            }
        })
        .collect();
    if each.is_empty() {
        s.resumed_count.to_string()
    } else {
        format!("{}: {}", s.resumed_count, each.join(", "))
    }
}

fn block(name: &str, series: &Series) -> Option<String> {
    let st = Stats::of(&series.values())?;
    let mut b = String::new();
    let non_finite = match series.non_finite {
        0 => String::new(),
        n => format!(", {n} non-finite left out"),
    };
    let _ = writeln!(b, "{name} ({} values{non_finite})", st.count);
    let change = st
        .change_pct()
        .map_or("n/a (initial is 0)".into(), |p| format!("{p:+.2}%"));
    let rows = [
        ("initial", fmt_fixed(st.initial)),
        ("final", fmt_fixed(st.last)),
        ("change", change),
        ("min", fmt_fixed(st.min)),
        ("max", fmt_fixed(st.max)),
        ("mean", fmt_fixed(st.mean)),
        ("std", fmt_fixed(st.std)),
    ];
    for (k, v) in rows {
        let _ = writeln!(b, "  {k:<8} {v}");
    }
    Some(b)
}
