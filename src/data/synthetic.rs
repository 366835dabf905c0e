//! The synthetic quickstart dataset: simple, varied PNG images (gradients, stripes,
//! checkerboards and smooth noise under filled circles, rectangles and triangles) that a tiny
//! VAE learns visibly in a few hundred steps.

use std::f32::consts::TAU;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use image::{ImageFormat, RgbImage};

use super::rng::SplitMix64;

type Rgb = [f32; 3];

/// Writes `count` PNG images `synthetic_00000.png`, ... into `dir` (created if needed) and
/// returns their paths. Every fourth image (indices 3, 7, ...) has [`second_size`]`(size)`,
/// the others `size` (width, height), so the data has two buckets. Image `i` depends only on
/// (`seed`, `i`, its size): the same arguments give byte-identical files.
pub fn generate(dir: &Path, count: usize, size: (u32, u32), seed: u64) -> Result<Vec<PathBuf>> {
    if size.0 == 0 || size.1 == 0 {
        bail!(
            "synthetic images need a positive size, got {}x{}",
            size.0,
            size.1
        );
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the synthetic data folder {}", dir.display()))?;
    let mut paths = Vec::with_capacity(count);
    for i in 0..count {
        let (w, h) = if i % 4 == 3 { second_size(size) } else { size };
        let img = render(&mut SplitMix64::for_stream(seed, i as u64), w, h);
        let path = dir.join(format!("synthetic_{i:05}.png"));
        let mut bytes = std::io::Cursor::new(Vec::new());
        img.write_to(&mut bytes, ImageFormat::Png)
            .with_context(|| format!("cannot encode {}", path.display()))?;
        crate::atomic_write::write_atomic(&path, bytes.get_ref())?;
        paths.push(path);
    }
    Ok(paths)
}

/// The wider size of every fourth image: 1.5 x the width rounded to a multiple of 16 (at
/// least 16), same height; 32x32 -> 48x32, 64x64 -> 96x64.
pub fn second_size(size: (u32, u32)) -> (u32, u32) {
    let w = (size.0 * 3 / 2 + 8) / 16 * 16;
    (w.max(16), size.1)
}

enum Background {
    Gradient {
        a: Rgb,
        b: Rgb,
        dir: (f32, f32),
    },
    Stripes {
        a: Rgb,
        b: Rgb,
        dir: (f32, f32),
        period: f32,
    },
    Checker {
        a: Rgb,
        b: Rgb,
        cell: f32,
    },
    /// Smoothstep interpolation of a 4x4 grid of colours scattered around one base colour.
    Noise {
        grid: Vec<Rgb>,
    },
}

enum Shape {
    Circle { c: (f32, f32), r: f32 },
    Rect { min: (f32, f32), max: (f32, f32) },
    Triangle { p: [(f32, f32); 3] },
}

fn colour(rng: &mut SplitMix64) -> Rgb {
    [rng.unit(), rng.unit(), rng.unit()]
}

fn direction(rng: &mut SplitMix64) -> (f32, f32) {
    let a = rng.range(0.0, TAU);
    (a.cos(), a.sin())
}

fn render(rng: &mut SplitMix64, w: u32, h: u32) -> RgbImage {
    let (wf, hf) = (w as f32, h as f32);
    let side = wf.min(hf);
    let background = match rng.below(4) {
        0 => Background::Gradient {
            a: colour(rng),
            b: colour(rng),
            dir: direction(rng),
        },
        1 => Background::Stripes {
            a: colour(rng),
            b: colour(rng),
            dir: direction(rng),
            period: side * rng.range(0.15, 0.4),
        },
        2 => Background::Checker {
            a: colour(rng),
            b: colour(rng),
            cell: side / (2 + rng.below(4)) as f32,
        },
        _ => {
            let base = colour(rng);
            Background::Noise {
                grid: (0..16)
                    .map(|_| base.map(|c| c + rng.range(-0.3, 0.3)))
                    .collect(),
            }
        }
    };
    let shapes: Vec<(Shape, Rgb)> = (0..1 + rng.below(3))
        .map(|_| {
            let c = (rng.range(0.15, 0.85) * wf, rng.range(0.15, 0.85) * hf);
            let r = side * rng.range(0.12, 0.3);
            let shape = match rng.below(3) {
                0 => Shape::Circle { c, r },
                1 => {
                    let rh = side * rng.range(0.12, 0.3);
                    Shape::Rect {
                        min: (c.0 - r, c.1 - rh),
                        max: (c.0 + r, c.1 + rh),
                    }
                }
                _ => {
                    let a0 = rng.range(0.0, TAU);
                    let p = [0.0, 1.0, 2.0].map(|k: f32| {
                        let a = a0 + k * TAU / 3.0 + rng.range(-0.4, 0.4);
                        (c.0 + r * 1.3 * a.cos(), c.1 + r * 1.3 * a.sin())
                    });
                    Shape::Triangle { p }
                }
            };
            (shape, colour(rng))
        })
        .collect();

    let mut img = RgbImage::new(w, h);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let (cx, cy) = (x as f32 + 0.5, y as f32 + 0.5);
        let mut v = background_at(&background, cx / wf, cy / hf, cx, cy);
        for (shape, col) in &shapes {
            // 4x4 supersampling for soft edges.
            let mut cover = 0.0;
            for sy in 0..4 {
                for sx in 0..4 {
                    let p = (
                        x as f32 + (sx as f32 + 0.5) / 4.0,
                        y as f32 + (sy as f32 + 0.5) / 4.0,
                    );
                    if inside(shape, p) {
                        cover += 1.0 / 16.0;
                    }
                }
            }
            for c in 0..3 {
                v[c] += (col[c] - v[c]) * cover;
            }
        }
        px.0 = v.map(|c| (c.clamp(0.0, 1.0) * 255.0).round() as u8);
    }
    img
}

/// Background colour at relative (u, v) in [0, 1]^2 and pixel (x, y).
fn background_at(bg: &Background, u: f32, v: f32, x: f32, y: f32) -> Rgb {
    let lerp = |a: &Rgb, b: &Rgb, t: f32| -> Rgb { [0, 1, 2].map(|c| a[c] + (b[c] - a[c]) * t) };
    match bg {
        Background::Gradient { a, b, dir } => {
            // Projection of (u, v) - centre on dir, spanning [0, 1] over the image.
            let t = 0.5 + ((u - 0.5) * dir.0 + (v - 0.5) * dir.1) / (dir.0.abs() + dir.1.abs());
            lerp(a, b, t)
        }
        Background::Stripes { a, b, dir, period } => {
            let t = 0.5 + 0.5 * ((x * dir.0 + y * dir.1) * TAU / period).sin();
            lerp(a, b, t)
        }
        Background::Checker { a, b, cell } => {
            let parity = ((x / cell).floor() + (y / cell).floor()) as i64 % 2;
            if parity == 0 {
                *a
            } else {
                *b
            }
        }
        Background::Noise { grid } => {
            let smooth = |t: f32| t * t * (3.0 - 2.0 * t);
            let (gx, gy) = (u * 3.0, v * 3.0);
            let (ix, iy) = ((gx.floor() as usize).min(2), (gy.floor() as usize).min(2));
            let (tx, ty) = (smooth(gx - ix as f32), smooth(gy - iy as f32));
            let g = |i: usize, j: usize| &grid[j * 4 + i];
            let top = lerp(g(ix, iy), g(ix + 1, iy), tx);
            let bottom = lerp(g(ix, iy + 1), g(ix + 1, iy + 1), tx);
            lerp(&top, &bottom, ty)
        }
    }
}

fn inside(shape: &Shape, (x, y): (f32, f32)) -> bool {
    match shape {
        Shape::Circle { c, r } => (x - c.0).powi(2) + (y - c.1).powi(2) <= r * r,
        Shape::Rect { min, max } => x >= min.0 && x <= max.0 && y >= min.1 && y <= max.1,
        Shape::Triangle { p } => {
            let edge =
                |a: (f32, f32), b: (f32, f32)| (b.0 - a.0) * (y - a.1) - (b.1 - a.1) * (x - a.0);
            let d = [edge(p[0], p[1]), edge(p[1], p[2]), edge(p[2], p[0])];
            d.iter().all(|&e| e >= 0.0) || d.iter().all(|&e| e <= 0.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_size_is_a_distinct_bucket() {
        assert_eq!(second_size((32, 32)), (48, 32));
        assert_eq!(second_size((64, 64)), (96, 64));
        assert_eq!(second_size((8, 8)), (16, 8));
    }

    #[test]
    fn images_are_not_flat() {
        for i in 0..8 {
            let img = render(&mut SplitMix64::for_stream(1, i), 32, 32);
            let first = img.get_pixel(0, 0);
            assert!(img.pixels().any(|p| p != first), "image {i} is one colour");
        }
    }
}
