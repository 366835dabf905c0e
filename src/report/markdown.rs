//! `graph/report.md`: the progress report's "Training Metrics" section, filled in from a run.

use std::fmt::Write;

use super::charts::PLOT_FILES;
use super::gallery::Gallery;
use super::metrics::{MetricsLog, Row, Section};
use super::session::SessionInfo;
use super::stats::{fmt_change, fmt_short, Stats};
use super::summary::{metric_keys, resumes_text, TIMING_EXTRAS};
use super::time::format_duration;

/// The Markdown text. Links are relative to `graph/`.
pub fn render(log: &MetricsLog, s: &SessionInfo, galleries: &[Gallery]) -> String {
    let mut o = String::new();
    o.push_str("## Training Metrics\n\n### Session Summary\n");
    session(&mut o, log, s);
    o.push_str("\n### Loss Progression\n\n");
    o.push_str("| Metric | Initial | Final | Change | Min | Max | Mean | Std Dev |\n");
    o.push_str("|--------|---------|-------|--------|-----|-----|------|---------|\n");
    for k in metric_keys(log) {
        if let Some(st) = stats(log, Section::Metrics, &k) {
            let c = fmt_change(st.change_pct());
            let _ = writeln!(
                o,
                "| **{}** | {} | {} | {c} | {} | {} | {} | {} |",
                display_name(&k),
                fmt_short(st.initial),
                fmt_short(st.last),
                fmt_short(st.min),
                fmt_short(st.max),
                fmt_short(st.mean),
                fmt_short(st.std)
            );
        }
    }
    o.push_str("\nChange is (final - initial) / |initial|; Std Dev is the population standard ");
    o.push_str("deviation.\n");
    observations(&mut o, log);
    o.push_str("\n#### Training Graphs\n\n");
    for (file, title, caption) in PLOT_FILES {
        let _ = writeln!(o, "![{title}]({file})\n*{caption}*\n");
    }
    quality(&mut o, log);
    learning_rates(&mut o, log);
    batch_times(&mut o, log);
    if !galleries.is_empty() {
        o.push_str("\n### Reconstruction Galleries\n\n");
        for g in galleries {
            let first = if g.has_original {
                "the original, then "
            } else {
                ""
            };
            let _ = writeln!(
                o,
                "![{stem}](../samples/{}/gallery.png)\n*`{stem}`: {first}{} reconstructions \
                 in step order*\n",
                link_escape(&g.stem),
                g.steps.len(),
                stem = g.stem,
            );
        }
    }
    if let Some(row) = log.latest_samples() {
        colour(&mut o, row);
    }
    o
}

fn session(o: &mut String, log: &MetricsLog, s: &SessionInfo) {
    let mut item = |k: &str, v: String| {
        let _ = writeln!(o, "- **{k}**: {v}");
    };
    if let Some(id) = &s.session_id {
        item("Session ID", id.clone());
    }
    if let Some(t) = &s.started {
        item("Started", t.clone());
    }
    if let (Some(a), Some(b)) = (s.first_step, s.last_step) {
        item(
            "Global Steps",
            format!("{a} → {b} (rows logged: {})", log.rows.len()),
        );
    }
    if let Some(w) = s.wall_time_s {
        let span = match (&s.first_timestamp, &s.last_timestamp) {
            (Some(a), Some(b)) => format!(" ({a} → {b})"),
            _ => String::new(),
        };
        item("Training Duration", format!("{}{span}", format_duration(w)));
    }
    item("Resumes", resumes_text(s));
    if let Some(n) = s.skipped_batches {
        item("Skipped Batches", n.to_string());
    }
    if let Some(n) = s.bad_files {
        item("Bad Files", n.to_string());
    }
    if log.malformed_lines > 0 {
        item(
            "Malformed Log Lines Skipped",
            log.malformed_lines.to_string(),
        );
    }
}

fn observations(o: &mut String, log: &MetricsLog) {
    let mut lines = Vec::new();
    if let Some(st) = stats(log, Section::Metrics, "vae_loss") {
        let c = fmt_change(st.change_pct());
        let (a, b) = (fmt_short(st.initial), fmt_short(st.last));
        lines.push(format!("VAE loss went from {a} to {b} ({c})"));
    }
    let beta = log.series(Section::Metrics, "kl_beta").points;
    if let Some(&(step, b)) = beta.last() {
        lines.push(format!(
            "KL beta reached {} at step {step:.0}",
            fmt_short(b)
        ));
    }
    if let Some(st) = stats(log, Section::Extras, "batch_time") {
        let (lo, hi, m) = (fmt_short(st.min), fmt_short(st.max), fmt_short(st.mean));
        lines.push(format!("Batch time: {lo}-{hi} s per step (mean {m} s)"));
    }
    // A wait's mean, its maximum and its share of the mean batch time.
    let wait = |key: &str| -> Option<(String, String, f64)> {
        let (w, b) = (
            stats(log, Section::Extras, key)?,
            stats(log, Section::Extras, "batch_time")?,
        );
        let share = if b.mean > 0.0 {
            w.mean / b.mean * 100.0
        } else {
            0.0
        };
        Some((fmt_short(w.mean), fmt_short(w.max), share))
    };
    if let Some((m, _, share)) = wait("data_wait") {
        lines.push(format!(
            "Data wait: mean {m} s per step ({share:.1}% of the mean batch time)"
        ));
    }
    if let Some((m, hi, share)) = wait("ckpt_wait") {
        lines.push(format!(
            "Checkpoint and report wait: mean {m} s per step, at most {hi} s ({share:.1}% of \
             the mean batch time; checkpoints are written and the report rebuilt in the \
             background)"
        ));
    }
    if !lines.is_empty() {
        o.push_str("\n**Key Observations**:\n");
        for (i, l) in lines.iter().enumerate() {
            let _ = writeln!(o, "{}. {l}", i + 1);
        }
    }
}

/// Evaluations of `output.eval_data` (live and EMA weights) and the templates' PSNR.
fn quality(o: &mut String, log: &MetricsLog) {
    let rows: Vec<&Row> = log
        .rows
        .iter()
        .filter(|r| r.metrics.contains_key("eval_ssim"))
        .collect();
    let templates = log.template_psnr();
    if rows.is_empty() && templates.is_empty() {
        return;
    }
    o.push_str("\n### Reconstruction Quality\n\n");
    if !rows.is_empty() {
        o.push_str("Held-out images (`output.eval_data`), posterior mean, 8-bit; PSNR in dB. ");
        o.push_str("SSIM and MS-SSIM as `fluxflow eval --help` defines them.\n\n");
        o.push_str("| Step | PSNR | SSIM | MS-SSIM | PSNR (EMA) | SSIM (EMA) | MS-SSIM (EMA) |\n");
        o.push_str("|------|------|------|---------|------------|------------|---------------|\n");
        // The first evaluation, then up to the last nine.
        let shown: Vec<&Row> = if rows.len() > 10 {
            std::iter::once(rows[0])
                .chain(rows[rows.len() - 9..].iter().copied())
                .collect()
        } else {
            rows
        };
        for r in shown {
            let v = |k: &str, d: usize| match r.metrics.get(k) {
                Some(Some(x)) => format!("{x:.d$}"),
                _ => "-".into(),
            };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.global_step,
                v("eval_psnr", 2),
                v("eval_ssim", 4),
                v("eval_ms_ssim", 4),
                v("eval_psnr_ema", 2),
                v("eval_ssim_ema", 4),
                v("eval_ms_ssim_ema", 4)
            );
        }
        o.push('\n');
    }
    if !templates.is_empty() {
        o.push_str("| Template | First PSNR | Final PSNR | Best PSNR |\n");
        o.push_str("|----------|------------|------------|-----------|\n");
        for (stem, points) in &templates {
            let (Some(first), Some(last)) = (points.first(), points.last()) else {
                continue;
            };
            let best = points.iter().map(|p| p.1).fold(f64::MIN, f64::max);
            let _ = writeln!(
                o,
                "| `{stem}` | {:.2} dB (step {:.0}) | {:.2} dB (step {:.0}) | {best:.2} dB |",
                first.1, first.0, last.1, last.0
            );
        }
        o.push('\n');
    }
}

fn learning_rates(o: &mut String, log: &MetricsLog) {
    let keys = log.keys(Section::LearningRates);
    if keys.is_empty() {
        return;
    }
    o.push_str(
        "### Learning Rates\n\n| Optimizer | Initial LR | Final LR | Min | Max | Change |\n",
    );
    o.push_str("|-----------|------------|----------|-----|-----|--------|\n");
    for k in keys {
        if let Some(st) = stats(log, Section::LearningRates, &k) {
            let _ = writeln!(
                o,
                "| `{k}` | {:.2e} | {:.2e} | {:.2e} | {:.2e} | {} |",
                st.initial,
                st.last,
                st.min,
                st.max,
                fmt_change(st.change_pct())
            );
        }
    }
}

fn batch_times(o: &mut String, log: &MetricsLog) {
    let rows: Vec<(&str, Stats)> = TIMING_EXTRAS
        .iter()
        .filter_map(|k| Some((*k, stats(log, Section::Extras, k)?)))
        .collect();
    if rows.is_empty() {
        return;
    }
    o.push_str("\n### Batch Time (seconds per step)\n\n");
    o.push_str("| Metric | Mean | Std Dev | Min | Max | Final |\n");
    o.push_str("|--------|------|---------|-----|-----|-------|\n");
    for (k, st) in rows {
        let f = |v: f64| format!("{v:.3}");
        let (m, sd, lo, hi, last) = (f(st.mean), f(st.std), f(st.min), f(st.max), f(st.last));
        let _ = writeln!(o, "| `{k}` | {m} | {sd} | {lo} | {hi} | {last} |");
    }
}

fn colour(o: &mut String, row: &Row) {
    let _ = writeln!(o, "\n### Colour Observation (step {})\n", row.global_step);
    o.push_str("Reconstruction channel statistics in [-1, 1]; the 8-bit columns are the same ");
    o.push_str("values as saved, (v + 1) / 2 x 255.\n\n");
    o.push_str("| Image | Channel | Min | Max | Mean | 8-bit range | 8-bit mean |\n");
    o.push_str("|-------|---------|-----|-----|------|-------------|------------|\n");
    for (stem, c) in &row.samples {
        for (name, ch) in [("R", &c.r), ("G", &c.g), ("B", &c.b)] {
            let _ = writeln!(
                o,
                "| `{stem}` | {name} | {:.3} | {:.3} | {:.3} | {}-{} | {} |",
                ch.min,
                ch.max,
                ch.mean,
                to_8bit(ch.min),
                to_8bit(ch.max),
                to_8bit(ch.mean)
            );
        }
    }
}

/// A [-1, 1] value as the saved 8-bit pixel value.
pub fn to_8bit(v: f64) -> u8 {
    ((v + 1.0) / 2.0 * 255.0).round().clamp(0.0, 255.0) as u8
}

fn stats(log: &MetricsLog, section: Section, key: &str) -> Option<Stats> {
    Stats::of(&log.series(section, key).values())
}

fn display_name(key: &str) -> String {
    match key {
        "vae_loss" => "VAE Loss".into(),
        "kl_loss" => "KL Loss".into(),
        "kl_beta" => "KL Beta".into(),
        "eval_psnr" => "Eval PSNR (dB)".into(),
        "eval_psnr_ema" => "Eval PSNR, EMA (dB)".into(),
        "eval_ssim" => "Eval SSIM".into(),
        "eval_ssim_ema" => "Eval SSIM, EMA".into(),
        other => format!("`{other}`"),
    }
}

/// Percent-encodes the characters that would end or break a Markdown link target.
fn link_escape(s: &str) -> String {
    s.replace('%', "%25")
        .replace(' ', "%20")
        .replace('(', "%28")
        .replace(')', "%29")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_bit_values_follow_the_saved_mapping() {
        assert_eq!((to_8bit(-1.0), to_8bit(0.0), to_8bit(1.0)), (0, 128, 255));
        assert_eq!(to_8bit(-3.0), 0);
        assert_eq!(link_escape("a b(1)"), "a%20b%281%29");
    }
}
