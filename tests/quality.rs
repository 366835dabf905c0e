//! PSNR, SSIM and MS-SSIM (`fluxflow::quality`) against values computed independently.

use fluxflow::quality::{measure, ms_ssim, psnr, ssim, Planar, MS_SSIM_MIN_SIDE};

fn constant(h: usize, w: usize, v: f64) -> Planar {
    Planar::new(3, h, w, vec![v; 3 * h * w]).unwrap()
}

/// The test pattern and its noisy copy, built with integer arithmetic only so that the Python
/// script below builds bit-identical images.
fn pattern_and_noisy() -> (Planar, Planar) {
    let (c, h, w) = (3usize, 170usize, 181usize);
    let mut base = Vec::with_capacity(c * h * w);
    for ch in 0..c {
        for i in 0..h {
            for j in 0..w {
                base.push(((2 * i + j + 60 * ch + (i * j) % 29) % 256) as i64);
            }
        }
    }
    let mut state: u64 = 12345;
    let noisy: Vec<i64> = base
        .iter()
        .map(|&v| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let n = ((state >> 33) % 41) as i64 - 20;
            (v + n).clamp(0, 255)
        })
        .collect();
    let to = |v: Vec<i64>| Planar::new(c, h, w, v.iter().map(|&x| x as f64 / 255.0).collect());
    (to(base).unwrap(), to(noisy).unwrap())
}

#[test]
fn identical_images_give_infinity_one_and_one() {
    let (a, _) = pattern_and_noisy();
    let q = measure(&a, &a).unwrap();
    assert_eq!(q.psnr, f64::INFINITY);
    assert!((q.ssim - 1.0).abs() < 1e-12, "{}", q.ssim);
    assert!((q.ms_ssim.unwrap() - 1.0).abs() < 1e-12, "{:?}", q.ms_ssim);
}

#[test]
fn constant_offset_gives_the_closed_form_values() {
    // A constant 0.4 image against 0.5: MSE 0.01, so PSNR = 20 dB. Both variances and the
    // covariance are 0, so cs = C2 / C2 = 1 at every scale, and SSIM is the luminance term
    // (2 * 0.4 * 0.5 + C1) / (0.4^2 + 0.5^2 + C1) with C1 = 0.01^2; MS-SSIM is that term to the
    // last weight (0.1333), the cs terms being 1 (176 halves to 88, 44, 22, 11 without padding).
    let (a, b) = (constant(176, 176, 0.4), constant(176, 176, 0.5));
    let c1 = 0.01f64 * 0.01;
    let lum = (2.0 * 0.4 * 0.5 + c1) / (0.16 + 0.25 + c1);
    let q = measure(&b, &a).unwrap();
    assert!((q.psnr - 20.0).abs() < 1e-9, "{}", q.psnr);
    assert!((q.ssim - lum).abs() < 1e-12, "{} vs {lum}", q.ssim);
    let ms = q.ms_ssim.unwrap();
    assert!((ms - lum.powf(0.1333)).abs() < 1e-12, "{ms}");
}

/// Expected values from scikit-image 0.26.0 (numpy 2.4.6, scipy 1.17.1) for PSNR and SSIM, and
/// for MS-SSIM from a numpy transcription of pytorch-msssim's `ms_ssim` (same window, constants,
/// relu and padded 2x2 pooling), run as:
///
/// ```python
/// import numpy as np
/// from scipy.ndimage import correlate1d
/// from skimage.metrics import structural_similarity, peak_signal_noise_ratio
/// C, H, W = 3, 170, 181
/// i, j = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
/// base = np.stack([(2 * i + j + 60 * c + (i * j) % 29) % 256 for c in range(C)]).astype(np.int64)
/// state, noise = 12345, np.empty(C * H * W, dtype=np.int64)
/// for k in range(noise.size):
///     state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
///     noise[k] = (state >> 33) % 41 - 20
/// noisy = np.clip(base + noise.reshape(C, H, W), 0, 255)
/// x, y = base / 255.0, noisy / 255.0
/// print(peak_signal_noise_ratio(x, y, data_range=1.0))
/// print(structural_similarity(x, y, channel_axis=0, gaussian_weights=True, sigma=1.5,
///                             use_sample_covariance=False, data_range=1.0))
/// g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2)); g /= g.sum()
/// def filt(p):  # valid Gaussian filter of a 2-D plane
///     return correlate1d(correlate1d(p, g, axis=0, mode="constant")[5:-5], g, axis=1,
///                        mode="constant")[:, 5:-5]
/// def ssim_cs(a, b):
///     c1, c2 = 0.01 ** 2, 0.03 ** 2
///     mx, my = filt(a), filt(b)
///     sxx, syy, sxy = filt(a * a) - mx * mx, filt(b * b) - my * my, filt(a * b) - mx * my
///     cs = (2 * sxy + c2) / (sxx + syy + c2)
///     return (((2 * mx * my + c1) / (mx * mx + my * my + c1)) * cs).mean(), cs.mean()
/// def pool(p):  # F.avg_pool2d(kernel_size=2, padding=side % 2), count_include_pad
///     ph, pw = p.shape[0] % 2, p.shape[1] % 2
///     q = np.pad(p, ((ph, ph), (pw, pw)))
///     q = q[:q.shape[0] // 2 * 2, :q.shape[1] // 2 * 2]
///     return (q[0::2, 0::2] + q[1::2, 0::2] + q[0::2, 1::2] + q[1::2, 1::2]) / 4
/// wts = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
/// vals = []
/// for c in range(C):
///     a, b, v = x[c], y[c], 1.0
///     for lvl, wt in enumerate(wts):
///         s, cs = ssim_cs(a, b)
///         v *= max(cs if lvl < 4 else s, 0.0) ** wt
///         a, b = pool(a), pool(b)
///     vals.append(v)
/// print(float(np.mean(vals)))
/// ```
#[test]
fn noise_image_matches_scikit_image_and_pytorch_msssim() {
    let (a, b) = pattern_and_noisy();
    let p = psnr(&a, &b).unwrap();
    let s = ssim(&a, &b).unwrap();
    let m = ms_ssim(&a, &b).unwrap().unwrap();
    assert!((p - 26.848905805764787).abs() < 1e-9, "PSNR {p}");
    assert!((s - 0.6724439854511761).abs() < 1e-9, "SSIM {s}");
    assert!((m - 0.9407748884906916).abs() < 1e-9, "MS-SSIM {m}");
    // Symmetric in its arguments.
    assert!((ssim(&b, &a).unwrap() - s).abs() < 1e-12);
}

#[test]
fn small_images_have_no_ms_ssim_but_an_ssim() {
    let side = MS_SSIM_MIN_SIDE - 1;
    let a = constant(side, 400, 0.2);
    let b = constant(side, 400, 0.3);
    assert_eq!(ms_ssim(&a, &b).unwrap(), None);
    assert!(ssim(&a, &b).unwrap() < 1.0);
    let ok = constant(MS_SSIM_MIN_SIDE, MS_SSIM_MIN_SIDE, 0.2);
    assert!(ms_ssim(&ok, &ok).unwrap().is_some());
}

#[test]
fn mismatched_or_tiny_images_are_errors_not_panics() {
    let a = constant(32, 32, 0.5);
    let b = constant(32, 48, 0.5);
    assert!(psnr(&a, &b)
        .unwrap_err()
        .to_string()
        .contains("different shapes"));
    let tiny = constant(8, 8, 0.5);
    assert!(ssim(&tiny, &tiny)
        .unwrap_err()
        .to_string()
        .contains("at least 11x11"));
    assert!(Planar::new(3, 2, 2, vec![0.0; 5]).is_err());
}
