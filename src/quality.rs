//! Reconstruction quality: PSNR, SSIM and MS-SSIM of RGB images with values in [0, 1].
//!
//! Conventions (also in `fluxflow eval --help` and the README):
//! - Images are planar [3, H, W] in [0, 1], as an 8-bit decode gives them (`v / 255`).
//! - PSNR = 10 log10(1 / MSE) over every value of the three channels; identical images give
//!   +infinity.
//! - SSIM follows Wang et al. 2004: an 11x11 Gaussian window with sigma 1.5 (normalised to sum
//!   1), K1 = 0.01, K2 = 0.03, data range 1, population (not sample) statistics; the SSIM map
//!   is averaged over the window positions that lie wholly inside the image (as scikit-image's
//!   `structural_similarity(..., gaussian_weights=True, use_sample_covariance=False)` and
//!   pytorch-msssim's `ssim` do), then over the RGB channels.
//! - MS-SSIM follows pytorch-msssim's `ms_ssim`: five scales with weights
//!   (0.0448, 0.2856, 0.3001, 0.2363, 0.1333); at each of the first four scales the contrast-
//!   structure term cs (mean over the valid window positions, per channel) and 2x2 average
//!   pooling to the next scale (an odd side is zero-padded by one pixel on both sides and the
//!   padding counted, as pytorch-msssim's `F.avg_pool2d(..., padding=s % 2)` does); at the last
//!   scale the full SSIM. Negative cs and SSIM values are clamped to 0 before the weighted
//!   product (pytorch-msssim's `relu`), so a very poor reconstruction gives 0 instead of a NaN
//!   from a fractional power of a negative number. The product is per channel, then averaged
//!   over the channels. Five scales with an 11-pixel window need a shorter side of at least
//!   [`MS_SSIM_MIN_SIDE`] (161) pixels: smaller images have no MS-SSIM (`None`).

use anyhow::{bail, Result};

/// The Gaussian window's side.
pub const WINDOW: usize = 11;
/// The Gaussian window's standard deviation.
pub const SIGMA: f64 = 1.5;
pub const K1: f64 = 0.01;
pub const K2: f64 = 0.03;
/// MS-SSIM's per-scale weights (Wang, Simoncelli and Bovik 2003).
pub const MS_SSIM_WEIGHTS: [f64; 5] = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333];
/// The smallest shorter side that MS-SSIM's five scales allow: (11 - 1) * 2^4 + 1.
pub const MS_SSIM_MIN_SIDE: usize = (WINDOW - 1) * (1 << 4) + 1;

/// A planar image: `channels` planes of `height` x `width` values in [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct Planar {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// [C, H, W], row-major.
    pub data: Vec<f64>,
}

impl Planar {
    pub fn new(channels: usize, height: usize, width: usize, data: Vec<f64>) -> Result<Self> {
        if data.len() != channels * height * width {
            bail!(
                "an image of {channels}x{height}x{width} needs {} values, got {}",
                channels * height * width,
                data.len()
            );
        }
        Ok(Self {
            channels,
            height,
            width,
            data,
        })
    }

    /// An 8-bit RGB image as [3, H, W] values `v / 255`.
    pub fn from_rgb8(img: &image::RgbImage) -> Self {
        let (w, h) = img.dimensions();
        let (w, h) = (w as usize, h as usize);
        let mut data = vec![0.0; 3 * h * w];
        for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
            for c in 0..3 {
                data[c * h * w + i] = px[c] as f64 / 255.0;
            }
        }
        Self {
            channels: 3,
            height: h,
            width: w,
            data,
        }
    }

    fn plane(&self, c: usize) -> &[f64] {
        let n = self.height * self.width;
        &self.data[c * n..(c + 1) * n]
    }
}

fn same_shape(a: &Planar, b: &Planar) -> Result<()> {
    if (a.channels, a.height, a.width) != (b.channels, b.height, b.width) {
        bail!(
            "cannot compare images of different shapes {}x{}x{} and {}x{}x{}",
            a.channels,
            a.height,
            a.width,
            b.channels,
            b.height,
            b.width
        );
    }
    if a.data.is_empty() {
        bail!("cannot compare empty images");
    }
    Ok(())
}

/// PSNR in dB for data range 1; +infinity for identical images.
pub fn psnr(a: &Planar, b: &Planar) -> Result<f64> {
    same_shape(a, b)?;
    let mse = a
        .data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        / a.data.len() as f64;
    Ok(if mse == 0.0 {
        f64::INFINITY
    } else {
        -10.0 * mse.log10()
    })
}

/// The normalised 1-D Gaussian of [`WINDOW`] taps and [`SIGMA`].
fn gaussian() -> [f64; WINDOW] {
    let mut g = [0.0; WINDOW];
    let c = (WINDOW / 2) as f64;
    for (i, v) in g.iter_mut().enumerate() {
        let d = i as f64 - c;
        *v = (-(d * d) / (2.0 * SIGMA * SIGMA)).exp();
    }
    let s: f64 = g.iter().sum();
    g.map(|v| v / s)
}

/// The separable Gaussian filter over the valid positions: [H, W] -> [H-10, W-10].
fn filter_valid(x: &[f64], h: usize, w: usize, g: &[f64; WINDOW]) -> Vec<f64> {
    let (oh, ow) = (h + 1 - WINDOW, w + 1 - WINDOW);
    let mut rows = vec![0.0; h * ow];
    for r in 0..h {
        let line = &x[r * w..(r + 1) * w];
        for c in 0..ow {
            rows[r * ow + c] = g.iter().zip(&line[c..c + WINDOW]).map(|(k, v)| k * v).sum();
        }
    }
    let mut out = vec![0.0; oh * ow];
    for r in 0..oh {
        for (k, gk) in g.iter().enumerate() {
            let src = &rows[(r + k) * ow..(r + k + 1) * ow];
            for (o, s) in out[r * ow..(r + 1) * ow].iter_mut().zip(src) {
                *o += gk * s;
            }
        }
    }
    out
}

/// Per channel: (mean SSIM, mean cs) over the valid window positions of one plane pair.
fn ssim_cs_plane(x: &[f64], y: &[f64], h: usize, w: usize) -> (f64, f64) {
    let g = gaussian();
    let (c1, c2) = (K1 * K1, K2 * K2);
    let prod = |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(p, q)| p * q).collect() };
    let mu_x = filter_valid(x, h, w, &g);
    let mu_y = filter_valid(y, h, w, &g);
    let xx = filter_valid(&prod(x, x), h, w, &g);
    let yy = filter_valid(&prod(y, y), h, w, &g);
    let xy = filter_valid(&prod(x, y), h, w, &g);
    let n = mu_x.len() as f64;
    let (mut ssim, mut cs) = (0.0, 0.0);
    for i in 0..mu_x.len() {
        let (mx, my) = (mu_x[i], mu_y[i]);
        let sxx = xx[i] - mx * mx;
        let syy = yy[i] - my * my;
        let sxy = xy[i] - mx * my;
        let cs_i = (2.0 * sxy + c2) / (sxx + syy + c2);
        let l_i = (2.0 * mx * my + c1) / (mx * mx + my * my + c1);
        ssim += l_i * cs_i;
        cs += cs_i;
    }
    (ssim / n, cs / n)
}

fn check_window(a: &Planar) -> Result<()> {
    if a.height < WINDOW || a.width < WINDOW {
        bail!(
            "SSIM needs images of at least {WINDOW}x{WINDOW} pixels, got {}x{}",
            a.width,
            a.height
        );
    }
    Ok(())
}

/// Per channel (SSIM, cs).
fn ssim_cs(a: &Planar, b: &Planar) -> Vec<(f64, f64)> {
    (0..a.channels)
        .map(|c| ssim_cs_plane(a.plane(c), b.plane(c), a.height, a.width))
        .collect()
}

/// SSIM (Wang et al. 2004; see the module documentation), averaged over the channels.
pub fn ssim(a: &Planar, b: &Planar) -> Result<f64> {
    same_shape(a, b)?;
    check_window(a)?;
    let per = ssim_cs(a, b);
    Ok(per.iter().map(|(s, _)| s).sum::<f64>() / per.len() as f64)
}

/// 2x2 average pooling, stride 2; an odd side gets one zero of padding on each end, counted
/// in the average (PyTorch's `avg_pool2d(kernel_size=2, padding=side % 2)`).
fn avg_pool2(a: &Planar) -> Planar {
    let (h, w) = (a.height, a.width);
    let (ph, pw) = (h % 2, w % 2);
    let oh = (h + 2 * ph - 2) / 2 + 1;
    let ow = (w + 2 * pw - 2) / 2 + 1;
    let mut data = Vec::with_capacity(a.channels * oh * ow);
    for c in 0..a.channels {
        let p = a.plane(c);
        for r in 0..oh {
            for q in 0..ow {
                let mut s = 0.0;
                for dr in 0..2 {
                    for dq in 0..2 {
                        let (ir, iq) = (
                            (2 * r + dr) as isize - ph as isize,
                            (2 * q + dq) as isize - pw as isize,
                        );
                        if ir >= 0 && iq >= 0 && (ir as usize) < h && (iq as usize) < w {
                            s += p[ir as usize * w + iq as usize];
                        }
                    }
                }
                data.push(s / 4.0);
            }
        }
    }
    Planar {
        channels: a.channels,
        height: oh,
        width: ow,
        data,
    }
}

/// MS-SSIM (five scales; see the module documentation), averaged over the channels; `None`
/// when the shorter side is under [`MS_SSIM_MIN_SIDE`].
pub fn ms_ssim(a: &Planar, b: &Planar) -> Result<Option<f64>> {
    same_shape(a, b)?;
    if a.height.min(a.width) < MS_SSIM_MIN_SIDE {
        return Ok(None);
    }
    let levels = MS_SSIM_WEIGHTS.len();
    let mut prod = vec![1.0; a.channels];
    let (mut x, mut y) = (a.clone(), b.clone());
    for (level, weight) in MS_SSIM_WEIGHTS.iter().enumerate() {
        let per = ssim_cs(&x, &y);
        for (p, (s, cs)) in prod.iter_mut().zip(per) {
            let v = if level + 1 < levels { cs } else { s };
            *p *= v.max(0.0).powf(*weight);
        }
        if level + 1 < levels {
            x = avg_pool2(&x);
            y = avg_pool2(&y);
        }
    }
    Ok(Some(prod.iter().sum::<f64>() / prod.len() as f64))
}

/// The three numbers of one image pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quality {
    pub psnr: f64,
    pub ssim: f64,
    /// `None` for images too small for five scales.
    pub ms_ssim: Option<f64>,
}

/// PSNR, SSIM and MS-SSIM of a reconstruction against its original.
pub fn measure(recon: &Planar, original: &Planar) -> Result<Quality> {
    Ok(Quality {
        psnr: psnr(recon, original)?,
        ssim: ssim(recon, original)?,
        ms_ssim: ms_ssim(recon, original)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaussian_sums_to_one_and_is_symmetric() {
        let g = gaussian();
        assert!((g.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        for i in 0..WINDOW {
            assert_eq!(g[i], g[WINDOW - 1 - i]);
        }
    }

    #[test]
    fn avg_pool_pads_odd_sides_like_pytorch() {
        // 3x3 of ones: padding 1 -> 2x2 outputs, each window holds one real value.
        let a = Planar::new(1, 3, 3, vec![1.0; 9]).unwrap();
        let p = avg_pool2(&a);
        assert_eq!((p.height, p.width), (2, 2));
        assert_eq!(p.data, vec![0.25, 0.5, 0.5, 1.0]);
        let b = Planar::new(1, 2, 4, (0..8).map(|v| v as f64).collect()).unwrap();
        let q = avg_pool2(&b);
        assert_eq!(q.data, vec![2.5, 4.5]);
    }
}
