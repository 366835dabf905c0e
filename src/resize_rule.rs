//! The reference's rule for the size an image is trained at: both sides multiples of 16 with
//! the least aspect distortion (fluxflow-training's `resize_preserving_aspect_min_distortion`),
//! after our `data.img_size` cap on the longer side. Used by the data scan (bucket tables), the
//! loader, evaluation and `reconstruct`.

/// The reference's training size for an image of `w` x `h`: both sides multiples of 16, the
/// least aspect distortion between ceil16(short side) and the matching long side, the
/// smallest area among ties (fluxflow-training `resize_preserving_aspect_min_distortion`
/// as called by `upscale_image`).
pub fn training_size(w: u32, h: u32) -> (u32, u32) {
    let (w, h) = (w.max(1) as u64, h.max(1) as u64);
    let short = w.min(h);
    let long16 = w.max(h).div_ceil(16) * 16;
    let ratio = long16 as f64 / short as f64;
    let max_size = short.max(((short as f64 * ratio / 16.0).ceil() as u64) * 16);
    let lo = short.div_ceil(16) * 16;
    let hi = (max_size / 16) * 16;
    if lo > hi {
        return (lo as u32, lo as u32);
    }
    let orig_ratio = w as f64 / h as f64;
    let sizes: Vec<u64> = (lo..=hi).step_by(16).collect();
    let mut best: Option<(f64, u64, u64, u64)> = None; // (distortion, area, w, h)
    for &ch in &sizes {
        for &cw in &sizes {
            let d = ((cw as f64 / ch as f64) / orig_ratio).ln().abs();
            let area = cw * ch;
            let better = match best {
                None => true,
                Some((bd, ba, ..)) => d < bd || (d == bd && area < ba),
            };
            if better {
                best = Some((d, area, cw, ch));
            }
        }
    }
    match best {
        Some((_, _, bw, bh)) => (bw as u32, bh as u32),
        None => (lo as u32, lo as u32),
    }
}

/// The size an image of `w` x `h` is trained at: if `img_size` is set and the longer side
/// exceeds it, both sides are first scaled by `img_size / longer` (the longer side becomes
/// exactly `img_size`, the shorter is rounded half up, at least 1), then the reference rule
/// ([`training_size`]: multiples of 16, least distortion, smallest area) applies. With an
/// `img_size` that is not a multiple of 16 the result may therefore exceed it by up to 15.
pub fn bucket_size(w: u32, h: u32, img_size: Option<u32>) -> (u32, u32) {
    let (w, h) = capped_size(w, h, img_size);
    training_size(w, h)
}

/// (w, h) with the longer side scaled down to `img_size` (see [`bucket_size`]).
pub fn capped_size(w: u32, h: u32, img_size: Option<u32>) -> (u32, u32) {
    let long = w.max(h);
    match img_size {
        Some(cap) if cap > 0 && long > cap => {
            let scale = |s: u32| -> u32 {
                let (s, cap, long) = (s as u64, cap as u64, long as u64);
                ((s * cap + long / 2) / long).max(1) as u32
            };
            (scale(w), scale(h))
        }
        _ => (w, h),
    }
}

/// Pixels of the training size of an image of `w` x `h`.
fn training_pixels(w: u32, h: u32) -> u64 {
    let (tw, th) = training_size(w, h);
    tw as u64 * th as u64
}

/// The smallest training size an image of `w` x `h` can be given by scaling it down with its
/// aspect ratio kept: the one at 16 pixels on the shorter side (at its own size when that side
/// is already under 16).
pub fn smallest_training_size(w: u32, h: u32) -> (u32, u32) {
    let s = (16.0 / w.min(h).max(1) as f64).min(1.0);
    let (sw, sh) = scaled(w, h, s);
    training_size(sw, sh)
}

fn scaled(w: u32, h: u32, s: f64) -> (u32, u32) {
    let side = |x: u32| ((x as f64 * s).round() as u32).max(1);
    (side(w), side(h))
}

/// The size to scale an image of `w` x `h` to (aspect ratio kept) so that its training size
/// ([`training_size`]) has at most `max_pixels` pixels: `Ok(None)` when it already has, else
/// the largest such size found scaling down. The training size rounds each side up to a
/// multiple of 16, so the bound holds for what is actually computed, not only for the scaled
/// image. `Err(smallest)` when even the smallest training size keeping the aspect ratio
/// ([`smallest_training_size`]) has more pixels than `max_pixels`.
pub fn fit_within(w: u32, h: u32, max_pixels: u64) -> Result<Option<(u32, u32)>, (u32, u32)> {
    if training_pixels(w, h) <= max_pixels {
        return Ok(None);
    }
    let s_min = (16.0 / w.min(h).max(1) as f64).min(1.0);
    let mut s = (max_pixels as f64 / (w as f64 * h as f64))
        .sqrt()
        .clamp(s_min, 1.0);
    loop {
        let (sw, sh) = scaled(w, h, s);
        let pixels = training_pixels(sw, sh);
        if pixels <= max_pixels {
            return Ok(Some((sw, sh)));
        }
        if s <= s_min {
            return Err(smallest_training_size(w, h));
        }
        // At least 1% smaller each time: the rounding to multiples of 16 moves in steps.
        s = (s * (max_pixels as f64 / pixels as f64).sqrt().min(0.99)).max(s_min);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_within_bounds_the_training_size_and_refuses_what_cannot_fit() {
        // Already within: unchanged.
        assert_eq!(fit_within(64, 48, 64 * 48), Ok(None));
        // 17x17 has 289 pixels but trains at 32x32.
        assert_eq!(fit_within(17, 17, 300), Ok(Some((16, 16))));
        for (w, h, max) in [
            (4000, 3000, 20_000),
            (4000, 64, 20_000),
            (64, 4000, 20_000),
            (12_000, 12_000, 1 << 20),
            (1000, 999, 256),
            (300, 17, 5000),
        ] {
            let (sw, sh) = fit_within(w, h, max).unwrap().unwrap();
            let (tw, th) = training_size(sw, sh);
            assert!(
                tw as u64 * th as u64 <= max,
                "{w}x{h} -> {sw}x{sh} -> {tw}x{th}"
            );
            assert_eq!(sw >= sh, w >= h, "{w}x{h} -> {sw}x{sh}");
        }
        // 4000x16 cannot lose a pixel of its shorter side: it trains at 4000x16 or not at all.
        assert_eq!(fit_within(4000, 16, 64_000), Ok(None));
        assert_eq!(fit_within(4000, 16, 63_999), Err((4000, 16)));
        assert_eq!(fit_within(16_000, 64, 20_000), Err((4000, 16)));
        assert_eq!(smallest_training_size(16_000, 64), (4000, 16));
    }

    #[test]
    fn cap_scales_the_longer_side_then_applies_the_rule() {
        assert_eq!(capped_size(640, 480, Some(64)), (64, 48));
        assert_eq!(bucket_size(640, 480, Some(64)), (64, 48));
        assert_eq!(capped_size(480, 640, Some(64)), (48, 64));
        // 100 * 64 / 300 = 21.33 -> 21; 3 * 64 / 128 = 1.5 -> 2 (half up).
        assert_eq!(capped_size(300, 100, Some(64)), (64, 21));
        assert_eq!(capped_size(128, 3, Some(64)), (64, 2));
        assert_eq!(capped_size(1000, 1, Some(64)), (64, 1));
        // Below the cap, or no cap: unchanged.
        assert_eq!(capped_size(50, 40, Some(64)), (50, 40));
        assert_eq!(bucket_size(640, 480, None), training_size(640, 480));
    }
}
