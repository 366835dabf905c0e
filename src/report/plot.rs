//! Line-chart panels drawn with plotters into an in-memory RGB buffer, encoded as PNG.
//!
//! Text uses DejaVu Sans from the `dejavu` crate, registered with plotters' `ab_glyph` font
//! table, so no system font or font library is needed. Log axes are drawn as linear axes over
//! `log10(y)` with `10^v` tick labels, so every panel goes through one code path.

use std::sync::OnceLock;

use anyhow::{anyhow, Result};
use image::{ImageEncoder, RgbImage};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::register_font;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// The font family name every text in the report uses.
pub const FONT: &str = "sans-serif";

/// matplotlib's tab10 colours, the reference plots' palette.
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

const RESUME_COLOUR: RGBColor = RGBColor(70, 70, 70);

/// Registers the embedded DejaVu Sans (regular and bold) once per process.
pub fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
            && register_font(FONT, FontStyle::Bold, dejavu::sans::bold()).is_ok()
    });
    ok.then_some(())
        .ok_or_else(|| anyhow!("the embedded DejaVu Sans font could not be loaded"))
}

/// One plotted line.
#[derive(Debug, Clone)]
pub struct Line {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub colour: RGBColor,
    pub width: u32,
    pub dashed: bool,
}

impl Line {
    pub fn new(label: impl Into<String>, points: Vec<(f64, f64)>, colour: RGBColor) -> Self {
        Self {
            label: label.into(),
            points,
            colour,
            width: 2,
            dashed: false,
        }
    }
}

/// A y axis and its lines; log scale when every value is positive and they span > 2 decades.
#[derive(Debug, Clone)]
pub struct Axis {
    pub label: String,
    pub lines: Vec<Line>,
    pub log: bool,
}

impl Axis {
    pub fn new(label: &str, lines: Vec<Line>) -> Self {
        let lines: Vec<Line> = lines.into_iter().filter(|l| !l.points.is_empty()).collect();
        let ys = lines.iter().flat_map(|l| l.points.iter().map(|p| p.1));
        let log = needs_log(ys);
        let label = if log {
            format!("{label} (log scale)")
        } else {
            label.to_string()
        };
        Self { label, lines, log }
    }

    fn y(&self, v: f64) -> f64 {
        if self.log {
            v.log10()
        } else {
            v
        }
    }

    fn range(&self) -> (f64, f64) {
        let ys = self.lines.iter().flat_map(|l| l.points.iter());
        let (lo, hi) = min_max(ys.map(|p| self.y(p.1)));
        pad(lo, hi, 0.05)
    }
}

/// True when all values are > 0 and max/min > 100.
pub fn needs_log(values: impl Iterator<Item = f64>) -> bool {
    let (mut lo, mut hi, mut any) = (f64::INFINITY, 0.0f64, false);
    for v in values {
        if v <= 0.0 {
            return false;
        }
        (lo, hi, any) = (lo.min(v), hi.max(v), true);
    }
    any && hi / lo > 100.0
}

/// A titled chart: left axis, optional right axis, vertical markers at resume steps.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub left: Axis,
    pub right: Option<Axis>,
    pub resumes: Vec<f64>,
    /// Shown in the middle when the panel has no data.
    pub empty_note: String,
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing failed: {e}")
}

/// Draws onto a fresh white `width x height` canvas and returns the PNG bytes.
pub fn render_png(
    width: u32,
    height: u32,
    draw: impl FnOnce(&Area) -> Result<()>,
) -> Result<Vec<u8>> {
    let mut buf = vec![255u8; width as usize * height as usize * 3];
    {
        let backend =
            BitMapBackend::with_buffer_and_format(&mut buf, (width, height)).map_err(err)?;
        let root = backend.into_drawing_area();
        draw(&root)?;
        root.present().map_err(err)?;
    }
    let img = RgbImage::from_raw(width, height, buf).ok_or_else(|| anyhow!("bad canvas size"))?;
    encode_png(&img)
}

/// PNG bytes of an RGB image.
pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| anyhow!("PNG encoding failed: {e}"))?;
    Ok(out)
}

/// Draws one panel filling `area`; `scale` multiplies every font size.
pub fn draw_panel(area: &Area, p: &Panel, scale: f64) -> Result<()> {
    ensure_font()?;
    let px = |s: f64| (s * scale).round() as u32;
    let title = (FONT, px(28.0), FontStyle::Bold).into_font();
    let lines = p
        .left
        .lines
        .iter()
        .chain(p.right.iter().flat_map(|a| &a.lines));
    let xs = lines.flat_map(|l| l.points.iter().map(|q| q.0));
    let has_data = xs.clone().next().is_some();
    if !has_data {
        let m = px(14.0);
        let inner = area
            .margin(m, m, m, m)
            .titled(&p.title, title)
            .map_err(err)?;
        let (w, h) = inner.dim_in_pixel();
        let style =
            TextStyle::from((FONT, px(22.0)).into_font()).pos(Pos::new(HPos::Center, VPos::Center));
        let at = (w as i32 / 2, h as i32 / 2);
        inner
            .draw(&Text::new(p.empty_note.clone(), at, style))
            .map_err(err)?;
        return Ok(());
    }
    let (x0, x1) = pad_x(min_max(xs.chain(p.resumes.iter().copied())));
    let (y0, y1) = p.left.range();
    let (r0, r1) = p.right.as_ref().map_or((0.0, 1.0), Axis::range);
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, title)
        .margin(px(14.0))
        .x_label_area_size(px(56.0))
        .y_label_area_size(px(100.0))
        .right_y_label_area_size(if p.right.is_some() { px(100.0) } else { 0 })
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?
        .set_secondary_coord(x0..x1, r0..r1);
    let left_fmt = tick_formatter(p.left.log, y1 - y0);
    chart
        .configure_mesh()
        .x_desc(&p.x_label)
        .y_desc(&p.left.label)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .x_labels(((x1 - x0).floor() as usize + 1).clamp(2, 10))
        .y_label_formatter(&left_fmt)
        .y_labels(if p.left.log { log_ticks(y0, y1) } else { 8 })
        .label_style((FONT, px(17.0)))
        .axis_desc_style((FONT, px(20.0)))
        .light_line_style(RGBColor(240, 240, 240))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()
        .map_err(err)?;
    if let Some(right) = &p.right {
        let right_fmt = tick_formatter(right.log, r1 - r0);
        chart
            .configure_secondary_axes()
            .y_desc(&right.label)
            .y_label_formatter(&right_fmt)
            .y_labels(if right.log { log_ticks(r0, r1) } else { 8 })
            .label_style((FONT, px(17.0)))
            .axis_desc_style((FONT, px(20.0)))
            .draw()
            .map_err(err)?;
    }
    for (i, &x) in p.resumes.iter().enumerate() {
        let style = RESUME_COLOUR.stroke_width(2);
        let anno = chart
            .draw_series(DashedLineSeries::new([(x, y0), (x, y1)], 8, 6, style))
            .map_err(err)?;
        if i == 0 {
            anno.label("resume")
                .legend(move |(a, b)| PathElement::new([(a, b), (a + 20, b)], style));
        }
    }
    // Solid lines go down as separate segments: plotters' thick polylines grow long miter
    // spikes at the sharp turns of noisy loss curves.
    macro_rules! draw_lines {
        ($axis:expr, $draw:ident) => {
            for l in &$axis.lines {
                let pts: Vec<(f64, f64)> = l.points.iter().map(|&(x, y)| (x, $axis.y(y))).collect();
                let style = l.colour.stroke_width(l.width);
                let anno = if l.dashed {
                    chart.$draw(DashedLineSeries::new(pts, 10, 6, style))
                } else {
                    chart.$draw(segments(&pts, style))
                }
                .map_err(err)?;
                anno.label(&l.label)
                    .legend(move |(a, b)| PathElement::new([(a, b), (a + 20, b)], style));
            }
        };
    }
    draw_lines!(p.left, draw_series);
    if let Some(right) = &p.right {
        draw_lines!(right, draw_secondary_series);
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, px(17.0)))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(err)?;
    Ok(())
}

/// One path per pair of neighbouring points (a lone point becomes a short dash).
fn segments(pts: &[(f64, f64)], style: ShapeStyle) -> Vec<PathElement<(f64, f64)>> {
    if let [(x, y)] = pts {
        return vec![PathElement::new([(x - 0.25, *y), (x + 0.25, *y)], style)];
    }
    pts.windows(2)
        .map(|w| PathElement::new([w[0], w[1]], style))
        .collect()
}

/// Tick labels: `10^v` on log axes; on linear axes enough significant digits for the span.
fn tick_formatter(log: bool, span: f64) -> impl Fn(&f64) -> String {
    move |v: &f64| {
        if log {
            fmt_sig(10f64.powf(*v), 3)
        } else {
            let mag = v.abs().max(span.abs());
            let digits = if span > 0.0 && mag > 0.0 {
                ((mag / span).log10().ceil() as i32 + 2).clamp(2, 8)
            } else {
                3
            };
            fmt_sig(*v, digits as usize)
        }
    }
}

/// Number of y labels that puts log-axis ticks on whole decades.
fn log_ticks(lo: f64, hi: f64) -> usize {
    ((hi - lo).ceil() as usize + 1).clamp(2, 12)
}

/// `v` with `sig` significant digits, trailing zeros removed; scientific outside [1e-3, 1e5).
pub fn fmt_sig(v: f64, sig: usize) -> String {
    let a = v.abs();
    if a == 0.0 || !v.is_finite() {
        return if v.is_finite() {
            "0".into()
        } else {
            v.to_string()
        };
    }
    let sig = sig.max(1);
    if !(1e-3..1e5).contains(&a) {
        let s = format!("{:.*e}", sig - 1, v);
        match s.split_once('e') {
            Some((m, e)) => format!("{}e{e}", trim_zeros(m)),
            None => s,
        }
    } else {
        let decimals = (sig as i32 - 1 - a.log10().floor() as i32).max(0) as usize;
        trim_zeros(&format!("{v:.decimals$}")).to_string()
    }
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

fn min_max(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    vals.filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        })
}

fn pad(lo: f64, hi: f64, frac: f64) -> (f64, f64) {
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo <= f64::EPSILON * hi.abs().max(1e-300) {
        let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - d, hi + d);
    }
    let d = (hi - lo) * frac;
    (lo - d, hi + d)
}

fn pad_x((lo, hi): (f64, f64)) -> (f64, f64) {
    if !lo.is_finite() || !hi.is_finite() {
        (0.0, 1.0)
    } else if hi <= lo {
        (lo - 1.0, hi + 1.0)
    } else {
        (lo, hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels_are_short_and_exact_enough() {
        assert_eq!(fmt_sig(1e-5, 3), "1e-5");
        assert_eq!(fmt_sig(9.986e-6, 4), "9.986e-6");
        assert_eq!(fmt_sig(0.25, 3), "0.25");
        assert_eq!(fmt_sig(1200.0, 3), "1200");
        assert_eq!(fmt_sig(1.2e8, 3), "1.2e8");
        assert_eq!(tick_formatter(true, 3.0)(&-5.0), "1e-5");
        assert_eq!(tick_formatter(false, 2e-8)(&9.998e-6), "9.998e-6");
    }

    #[test]
    fn log_scale_only_for_positive_values_over_two_decades() {
        assert!(needs_log([1.0, 1000.0].into_iter()));
        assert!(!needs_log([1.0, 50.0].into_iter()));
        assert!(!needs_log([0.0, 1000.0].into_iter()));
        assert!(!needs_log(std::iter::empty()));
    }
}
