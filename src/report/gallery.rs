//! `samples/<stem>/gallery.png`: the original, then every `NNNNN.webp` in step order, one
//! labelled tile each, `MAX_COLUMNS` tiles per row.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use image::imageops::{overlay, resize, FilterType};
use image::{Rgb, RgbImage};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::plot::{encode_png, ensure_font, FONT};
use crate::atomic_write::write_atomic;

/// Width of one tile in pixels; the gallery is `columns * TILE_WIDTH` wide.
pub const TILE_WIDTH: u32 = 256;
/// Tiles per row before wrapping.
pub const MAX_COLUMNS: u32 = 8;
/// Height of the label strip above each picture.
pub const LABEL_HEIGHT: u32 = 30;
/// Margin around each picture inside its tile.
pub const TILE_PAD: u32 = 6;

/// The most reconstructions a gallery shows per template (the full series stays on disk as
/// webp files): a rebuild decodes at most this many, however long the run.
pub const MAX_RECONSTRUCTIONS: usize = 16;

/// At most `most` indices of `0..n`, evenly spaced, always the first and the last.
pub fn evenly_spaced(n: usize, most: usize) -> Vec<usize> {
    if n <= most {
        return (0..n).collect();
    }
    if most <= 1 {
        return vec![n - 1];
    }
    // Strictly increasing since n > most: consecutive picks differ by at least 1.
    (0..most)
        .map(|i| ((i * (n - 1)) as f64 / (most - 1) as f64).round() as usize)
        .collect()
}

/// The sample files of one test image.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleSet {
    pub stem: String,
    pub dir: PathBuf,
    pub original: Option<PathBuf>,
    /// (step, file), ascending by step.
    pub steps: Vec<(u64, PathBuf)>,
}

/// What one gallery holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Gallery {
    pub stem: String,
    pub path: PathBuf,
    /// One per sample file (the original included).
    pub tiles: usize,
    pub columns: u32,
    pub rows: u32,
    pub tile_height: u32,
    pub has_original: bool,
    /// Sample steps in tile order.
    pub steps: Vec<u64>,
    /// Each tile's caption, in tile order (`original`, `step 100: 21.3 dB`, ...).
    pub captions: Vec<String>,
    /// Files that could not be decoded (drawn as grey tiles).
    pub unreadable: usize,
}

/// Sample folders under `<run>/samples` that hold an original or at least one step image.
pub fn find_samples(run_dir: &Path) -> Vec<SampleSet> {
    let root = run_dir.join("samples");
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Vec::new();
    };
    let mut sets: Vec<SampleSet> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| sample_set(&e.path()))
        .collect();
    sets.sort_by(|a, b| a.stem.cmp(&b.stem));
    sets
}

fn sample_set(dir: &Path) -> Option<SampleSet> {
    let stem = dir.file_name()?.to_string_lossy().into_owned();
    let mut steps: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let digits = name.strip_suffix(".webp")?;
            let ok = !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit());
            Some((digits.parse().ok().filter(|_| ok)?, e.path()))
        })
        .collect();
    steps.sort();
    let original = Some(dir.join("original.png")).filter(|p| p.is_file());
    (original.is_some() || !steps.is_empty()).then(|| SampleSet {
        stem,
        dir: dir.to_path_buf(),
        original,
        steps,
    })
}

/// Composes and writes `<set.dir>/gallery.png`, with each step's PSNR (dB, from the metrics
/// log) in its caption.
pub fn write_gallery(set: &SampleSet, psnr: &BTreeMap<u64, f64>) -> Result<Gallery> {
    ensure_font()?;
    let mut files: Vec<(String, &Path)> = Vec::new();
    if let Some(o) = &set.original {
        files.push(("original".into(), o));
    }
    let shown = evenly_spaced(set.steps.len(), MAX_RECONSTRUCTIONS);
    files.extend(
        shown
            .iter()
            .map(|&i| &set.steps[i])
            .map(|(s, p)| match psnr.get(s) {
                Some(db) => (format!("step {s}: {db:.1} dB"), p.as_path()),
                None => (format!("step {s}"), p.as_path()),
            }),
    );
    let decoded: Vec<Option<RgbImage>> = files
        .iter()
        .map(|(_, p)| image::open(p).ok().map(|i| i.to_rgb8()))
        .collect();
    let inner_w = TILE_WIDTH - 2 * TILE_PAD;
    let aspect = decoded
        .iter()
        .flatten()
        .next()
        .map_or(1.0, |i| i.height() as f64 / i.width().max(1) as f64);
    let inner_h = ((inner_w as f64 * aspect).round() as u32).clamp(32, 2 * inner_w);
    let tile_h = LABEL_HEIGHT + inner_h + 2 * TILE_PAD;
    let n = files.len() as u32;
    let columns = n.clamp(1, MAX_COLUMNS);
    let rows = n.div_ceil(columns).max(1);
    let mut canvas = RgbImage::from_pixel(columns * TILE_WIDTH, rows * tile_h, Rgb([255; 3]));
    for (i, img) in decoded.iter().enumerate() {
        let (x, y) = (
            (i as u32 % columns) * TILE_WIDTH,
            (i as u32 / columns) * tile_h,
        );
        let (px, py) = (x + TILE_PAD, y + TILE_PAD + LABEL_HEIGHT);
        match img {
            Some(img) => {
                let s = (inner_w as f64 / img.width().max(1) as f64)
                    .min(inner_h as f64 / img.height().max(1) as f64);
                let w = ((img.width() as f64 * s).round() as u32).max(1);
                let h = ((img.height() as f64 * s).round() as u32).max(1);
                let small = resize(img, w, h, FilterType::Triangle);
                let (ox, oy) = (
                    px + (inner_w - w.min(inner_w)) / 2,
                    py + (inner_h - h.min(inner_h)) / 2,
                );
                overlay(&mut canvas, &small, ox as i64, oy as i64);
            }
            None => {
                let grey = RgbImage::from_pixel(inner_w, inner_h, Rgb([200; 3]));
                overlay(&mut canvas, &grey, px as i64, py as i64);
            }
        }
    }
    draw_labels(&mut canvas, &files, &decoded, columns, tile_h)?;
    let path = set.dir.join("gallery.png");
    write_atomic(&path, &encode_png(&canvas)?)
        .with_context(|| format!("cannot write the gallery of {}", set.stem))?;
    Ok(Gallery {
        stem: set.stem.clone(),
        path,
        tiles: files.len(),
        columns,
        rows,
        tile_height: tile_h,
        has_original: set.original.is_some(),
        steps: shown.iter().map(|&i| set.steps[i].0).collect(),
        captions: files.iter().map(|(c, _)| c.clone()).collect(),
        unreadable: decoded.iter().filter(|d| d.is_none()).count(),
    })
}

fn draw_labels(
    canvas: &mut RgbImage,
    files: &[(String, &Path)],
    decoded: &[Option<RgbImage>],
    columns: u32,
    tile_h: u32,
) -> Result<()> {
    let (w, h) = canvas.dimensions();
    let buf: &mut [u8] = canvas;
    let backend = BitMapBackend::<plotters::backend::RGBPixel>::with_buffer_and_format(buf, (w, h))
        .map_err(|e| anyhow!("gallery canvas: {e}"))?;
    let root = backend.into_drawing_area();
    let style = TextStyle::from((FONT, 20).into_font()).pos(Pos::new(HPos::Center, VPos::Center));
    for (i, ((label, _), img)) in files.iter().zip(decoded).enumerate() {
        let (x, y) = (
            (i as u32 % columns) * TILE_WIDTH,
            (i as u32 / columns) * tile_h,
        );
        let text = if img.is_some() {
            label.clone()
        } else {
            format!("{label} (unreadable)")
        };
        let at = (
            (x + TILE_WIDTH / 2) as i32,
            (y + TILE_PAD + LABEL_HEIGHT / 2) as i32,
        );
        root.draw(&Text::new(text, at, style.clone()))
            .map_err(|e| anyhow!("gallery label: {e}"))?;
    }
    root.present().map_err(|e| anyhow!("gallery labels: {e}"))?;
    Ok(())
}
