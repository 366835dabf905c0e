//! Descriptive statistics of a series, the moving average used for smoothing, number formats.

/// Initial, final, min, max, mean and population standard deviation of a series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub count: usize,
    pub initial: f64,
    pub last: f64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    /// Population standard deviation (divides by N, like `numpy.std`).
    pub std: f64,
}

impl Stats {
    /// `None` for an empty series.
    pub fn of(values: &[f64]) -> Option<Self> {
        let (&initial, &last) = (values.first()?, values.last()?);
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        Some(Self {
            count: values.len(),
            initial,
            last,
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            mean,
            std: var.sqrt(),
        })
    }

    /// `(final - initial) / |initial| x 100`; `None` when the initial value is 0.
    pub fn change_pct(&self) -> Option<f64> {
        (self.initial != 0.0).then(|| (self.last - self.initial) / self.initial.abs() * 100.0)
    }
}

/// Window of the smoothing line: `min(50, n / 5)` for more than 10 points (as the reference's
/// batch-time plot), else no smoothing.
pub fn smoothing_window(n: usize) -> Option<usize> {
    (n > 10).then(|| (n / 5).clamp(1, 50))
}

/// Trailing moving average ("valid" mode): one point per full window, at the window's last x.
pub fn moving_average(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    if window == 0 || points.len() < window {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(points.len() + 1 - window);
    let mut sum: f64 = points[..window].iter().map(|p| p.1).sum();
    out.push((points[window - 1].0, sum / window as f64));
    for i in window..points.len() {
        sum += points[i].1 - points[i - window].1;
        out.push((points[i].0, sum / window as f64));
    }
    out
}

/// Six decimals, or scientific notation for very large or small magnitudes (`training_summary.txt`).
pub fn fmt_fixed(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e6).contains(&a) {
        format!("{v:.6e}")
    } else {
        format!("{v:.6}")
    }
}

/// Three significant figures in the report's style: `0.832`, `95.9M`, `1.00e-5`.
pub fn fmt_short(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1e9 {
        format!("{:.1}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.2e}")
    }
}

/// `-64.3% ↓` / `+8.3% ↑` / `0.0%`; `n/a` without a percentage.
pub fn fmt_change(pct: Option<f64>) -> String {
    match pct {
        Some(p) if p < 0.0 && format!("{p:.1}") != "-0.0" => format!("{p:.1}% ↓"),
        Some(p) if p > 0.0 && format!("{p:.1}") != "0.0" => format!("+{p:.1}% ↑"),
        Some(_) => "0.0%".into(),
        None => "n/a".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_population_statistics() {
        let s = Stats::of(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]).unwrap();
        assert_eq!((s.mean, s.std, s.min, s.max), (5.0, 2.0, 2.0, 9.0));
        assert_eq!(s.change_pct(), Some(350.0));
        assert_eq!(Stats::of(&[]), None);
        assert_eq!(Stats::of(&[0.0, 1.0]).unwrap().change_pct(), None);
    }

    #[test]
    fn moving_average_is_valid_mode() {
        let p: Vec<(f64, f64)> = (0..5).map(|i| (i as f64, i as f64)).collect();
        assert_eq!(
            moving_average(&p, 3),
            vec![(2.0, 1.0), (3.0, 2.0), (4.0, 3.0)]
        );
        assert!(moving_average(&p, 6).is_empty());
        assert_eq!(smoothing_window(10), None);
        assert_eq!(smoothing_window(11), Some(2));
        assert_eq!(smoothing_window(1000), Some(50));
    }

    #[test]
    fn formats_match_the_report_style() {
        assert_eq!(fmt_short(0.8321), "0.832");
        assert_eq!(fmt_short(95_912_345.0), "95.9M");
        assert_eq!(fmt_short(1e-5), "1.00e-5");
        assert_eq!(fmt_fixed(0.5), "0.500000");
        assert_eq!(fmt_fixed(1e-5), "1.000000e-5");
        assert_eq!(fmt_change(Some(-64.28)), "-64.3% ↓");
        assert_eq!(fmt_change(Some(8.3)), "+8.3% ↑");
        assert_eq!(fmt_change(Some(-0.01)), "0.0%");
        assert_eq!(fmt_change(None), "n/a");
    }
}
