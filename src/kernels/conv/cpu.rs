//! The CPU halves of the convolution ops: the transposed convolution as GEMM + col2im, the
//! forward convolution and the weight gradient as banded im2col + GEMM. Every column buffer holds
//! at most `COLS_BUDGET` elements.

use candle_core::{Result, Shape};
use rayon::prelude::*;

use super::Geometry;

/// Elements of the column buffer per GEMM, to bound memory on large layers.
pub(super) const COLS_BUDGET: usize = 1 << 24;

/// The transposed convolution of `x` [B, Ci, H, W] by `w` [Ci, Co, K, K] on the CPU.
pub(super) fn conv_transpose_cpu<T>(
    x: &[T],
    xs: (usize, usize, usize, usize),
    w: &[T],
    ws: (usize, usize, usize, usize),
    g: Geometry,
) -> Result<(Vec<T>, Shape)>
where
    T: candle_core::WithDType + Copy + Send + Sync + std::ops::AddAssign + Default,
{
    let (b, ci, h, wd) = xs;
    let (wci, co, k, k2) = ws;
    if wci != ci || k != k2 {
        candle_core::bail!("conv_transpose2d: kernel {ws:?} does not fit input {xs:?}");
    }
    let size = |n: usize, op: usize| -> Result<usize> {
        g.transposed_len(n, k, op).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "conv_transpose2d: input {xs:?} too small for kernel {k} and padding {}",
                g.padding
            ))
        })
    };
    let (oh, ow) = (size(h, g.output_padding.0)?, size(wd, g.output_padding.1)?);
    let hw = h * wd;
    let mut out = vec![T::default(); b * co * oh * ow];
    // The columns of output channels c0..c0+cn: W[:, c0*K*K..][Ci, cn*K*K] read transposed,
    // times X_b [Ci, H*W], written by gemm into one buffer reused for every chunk (no transposed
    // copy of W, no product tensor copied out).
    let kkw = co * k * k;
    let chunk = (COLS_BUDGET / (k * k * hw).max(1)).clamp(1, co);
    let mut cols = vec![T::default(); chunk * k * k * hw];
    for bi in 0..b {
        let xb = &x[bi * ci * hw..(bi + 1) * ci * hw];
        let out_b = &mut out[bi * co * oh * ow..(bi + 1) * co * oh * ow];
        for c0 in (0..co).step_by(chunk) {
            let cn = chunk.min(co - c0);
            let cols = &mut cols[..cn * k * k * hw];
            // SAFETY: cols holds (cn*K*K) x hw; W is ci x kkw with columns c0*K*K.. read as the
            // transposed (cn*K*K) x ci; xb is ci x hw.
            unsafe {
                gemm_into(
                    (cn * k * k, hw, ci),
                    cols.as_mut_ptr(),
                    (hw, 1),
                    false,
                    w.as_ptr().add(c0 * k * k),
                    (1, kkw),
                    xb.as_ptr(),
                    (hw, 1),
                );
            }
            let cols = &*cols;
            out_b[c0 * oh * ow..(c0 + cn) * oh * ow]
                .par_chunks_mut(oh * ow)
                .enumerate()
                .for_each(|(cl, o)| {
                    for ky in 0..k {
                        for kx in 0..k {
                            let row = &cols[((cl * k + ky) * k + kx) * hw..][..hw];
                            for iy in 0..h {
                                let oy =
                                    (iy * g.stride + ky * g.dilation) as isize - g.padding as isize;
                                if oy < 0 || oy >= oh as isize {
                                    continue;
                                }
                                let orow = &mut o[oy as usize * ow..][..ow];
                                let irow = &row[iy * wd..][..wd];
                                for (ix, v) in irow.iter().enumerate() {
                                    let ox = (ix * g.stride + kx * g.dilation) as isize
                                        - g.padding as isize;
                                    if ox >= 0 && (ox as usize) < ow {
                                        orow[ox as usize] += *v;
                                    }
                                }
                            }
                        }
                    }
                });
        }
    }
    Ok((out, Shape::from((b, co, oh, ow))))
}

/// Part of the im2col matrix of one input item `xb` [C, H, W] for a convolution of kernel
/// `kk` and output width `ow`: rows `rows` (of C*kk*kk, ordered (c, ky, kx)) by output positions
/// `pos` (of OH*OW), row-major into `out` (rows.len() x pos.len()); zeros outside the input.
#[allow(clippy::too_many_arguments)]
fn im2col_into<T: Copy + Send + Sync + Default>(
    xb: &[T],
    (h, wd): (usize, usize),
    kk: usize,
    ow: usize,
    g: Geometry,
    rows: std::ops::Range<usize>,
    pos: std::ops::Range<usize>,
    out: &mut [T],
) {
    let np = pos.len();
    let (st, d, pad) = (g.stride, g.dilation, g.padding as isize);
    out[..rows.len() * np]
        .par_chunks_mut(np)
        .enumerate()
        .for_each(|(i, orow)| {
            let row = rows.start + i;
            let (ci, ky, kx) = (row / (kk * kk), (row / kk) % kk, row % kk);
            let plane = &xb[ci * h * wd..(ci + 1) * h * wd];
            // Input column of output column ox: ox * st + off, inside the input for ox in
            // [ox_lo, ox_hi) (one division per row instead of two per element).
            let off = (kx * d) as isize - pad;
            let ox_lo = if off >= 0 {
                0
            } else {
                (-off as usize).div_ceil(st)
            };
            let ox_hi = if (wd as isize) > off {
                ((wd as isize - off) as usize).div_ceil(st).min(ow)
            } else {
                0
            };
            // Runs of positions within one output row.
            let (mut j, mut p) = (0, pos.start);
            while j < np {
                let (oy, ox0) = (p / ow, p % ow);
                let run = (ow - ox0).min(np - j);
                let dst = &mut orow[j..j + run];
                let iy = (oy * st + ky * d) as isize - pad;
                let (lo, hi) = (ox_lo.clamp(ox0, ox0 + run), ox_hi.clamp(ox0, ox0 + run));
                if iy < 0 || iy as usize >= h || lo >= hi {
                    dst.fill(T::default());
                } else {
                    let src = &plane[iy as usize * wd..][..wd];
                    dst[..lo - ox0].fill(T::default());
                    let first = (lo * st) as isize + off;
                    let mid = &mut dst[lo - ox0..hi - ox0];
                    if st == 1 {
                        mid.copy_from_slice(&src[first as usize..][..hi - lo]);
                    } else {
                        for (o, v) in mid.iter_mut().zip(src[first as usize..].iter().step_by(st)) {
                            *o = *v;
                        }
                    }
                    dst[hi - ox0..].fill(T::default());
                }
                j += run;
                p += run;
            }
        });
}

/// `dst[m x n] (+)= lhs[m x k] x rhs[k x n]` through gemm, strides in elements (row, column).
///
/// # Safety
/// Each matrix must lie within its allocation for the given shape and strides.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into<T: 'static + candle_core::WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: *const T,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const T,
    (rhs_rs, rhs_cs): (usize, usize),
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        T::from_f64(if accumulate { 1.0 } else { 0.0 }),
        T::from_f64(1.0),
        false,
        false,
        false,
        gemm::Parallelism::Rayon(rayon::current_num_threads()),
    )
}

/// y [B, K, OH, OW] = conv(x, w) on the CPU: for each batch item and band of output positions,
/// `y_b[:, band] = W [K, C*kk*kk] x cols_band` with `cols_band` [C*kk*kk, band] that part of the
/// im2col. Bound: a band's column buffer holds at most `COLS_BUDGET` elements (one position's
/// C*kk*kk at the least).
pub(super) fn conv2d_cpu<T>(
    x: &[T],
    xs: (usize, usize, usize, usize),
    w: &[T],
    ws: (usize, usize, usize, usize),
    g: Geometry,
) -> Result<(Vec<T>, Shape)>
where
    T: candle_core::WithDType + Copy + Send + Sync + Default + 'static,
{
    let (b, c, h, wd) = xs;
    let (k, wc, kk, kk2) = ws;
    if wc != c || kk != kk2 {
        candle_core::bail!("conv2d: kernel {ws:?} does not fit input {xs:?}");
    }
    let size = |n: usize| -> Result<usize> {
        g.conv_len(n, kk).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "conv2d: input {xs:?} too small for kernel {kk} and padding {}",
                g.padding
            ))
        })
    };
    let (oh, ow) = (size(h)?, size(wd)?);
    let (ckk, npos) = (c * kk * kk, oh * ow);
    let band = (COLS_BUDGET / ckk.max(1)).clamp(1, npos.max(1));
    let mut y = vec![T::default(); b * k * npos];
    let mut cols = vec![T::default(); ckk * band];
    for bi in 0..b {
        let xb = &x[bi * c * h * wd..(bi + 1) * c * h * wd];
        let yb = &mut y[bi * k * npos..(bi + 1) * k * npos];
        for p0 in (0..npos).step_by(band) {
            let n = band.min(npos - p0);
            im2col_into(xb, (h, wd), kk, ow, g, 0..ckk, p0..p0 + n, &mut cols);
            // SAFETY: yb holds k x npos (columns p0..p0+n written), w k x ckk, cols ckk x n.
            unsafe {
                gemm_into(
                    (k, n, ckk),
                    yb.as_mut_ptr().add(p0),
                    (npos, 1),
                    false,
                    w.as_ptr(),
                    (ckk, 1),
                    cols.as_ptr(),
                    (n, 1),
                );
            }
        }
    }
    Ok((y, Shape::from((b, k, oh, ow))))
}

/// dW [K, C, kk, kk] of `y = conv(x, w)` on the CPU: for each batch item and band of
/// (input channel, ky, kx) rows, `dW[:, band] += dy_b [K, OH*OW] x cols_band^T`, where
/// `cols_band` [band, OH*OW] is that part of the input's im2col; the GEMM accumulates in place.
/// Bound: a band's column buffer holds at most `COLS_BUDGET` elements (one row of OH*OW at the
/// least).
pub(super) fn weight_grad_cpu<T>(
    x: &[T],
    xs: (usize, usize, usize, usize),
    dy: &[T],
    ys: (usize, usize, usize, usize),
    kk: usize,
    g: Geometry,
) -> Result<Vec<T>>
where
    T: candle_core::WithDType + Copy + Send + Sync + Default + 'static,
{
    let (b, c, h, wd) = xs;
    let (yb, k, oh, ow) = ys;
    if yb != b {
        candle_core::bail!("conv2d weight gradient: batch {yb} of dy against {b} of x");
    }
    let ckk = c * kk * kk;
    let inner = oh * ow;
    let band = (COLS_BUDGET / inner.max(1)).clamp(1, ckk.max(1));
    let mut dw = vec![T::default(); k * ckk];
    let mut cols = vec![T::default(); band * inner];
    for bi in 0..b {
        let xb = &x[bi * c * h * wd..(bi + 1) * c * h * wd];
        let yb = &dy[bi * k * inner..(bi + 1) * k * inner];
        for r0 in (0..ckk).step_by(band) {
            let n = band.min(ckk - r0);
            im2col_into(xb, (h, wd), kk, ow, g, r0..r0 + n, 0..inner, &mut cols);
            // SAFETY: dw holds k x ckk (columns r0..r0+n accumulated), yb k x inner, cols
            // n x inner read transposed.
            unsafe {
                gemm_into(
                    (k, n, inner),
                    dw.as_mut_ptr().add(r0),
                    (ckk, 1),
                    true,
                    yb.as_ptr(),
                    (inner, 1),
                    cols.as_ptr(),
                    (1, inner),
                );
            }
        }
    }
    Ok(dw)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// im2col by its definition, one element at a time.
    fn naive(
        xb: &[f64],
        (c, h, wd): (usize, usize, usize),
        kk: usize,
        (oh, ow): (usize, usize),
        g: Geometry,
    ) -> Vec<f64> {
        let mut out = Vec::with_capacity(c * kk * kk * oh * ow);
        for row in 0..c * kk * kk {
            let (ci, ky, kx) = (row / (kk * kk), (row / kk) % kk, row % kk);
            for p in 0..oh * ow {
                let (oy, ox) = (p / ow, p % ow);
                let iy = (oy * g.stride + ky * g.dilation) as isize - g.padding as isize;
                let ix = (ox * g.stride + kx * g.dilation) as isize - g.padding as isize;
                let inside = iy >= 0 && (iy as usize) < h && ix >= 0 && (ix as usize) < wd;
                out.push(if inside {
                    xb[(ci * h + iy as usize) * wd + ix as usize]
                } else {
                    0.0
                });
            }
        }
        out
    }

    #[test]
    fn im2col_matches_its_definition_for_any_band_of_rows_and_positions() {
        // (kernel, stride, padding, dilation) over a 3 x 7 x 9 input; bands that start and end
        // inside output rows, as the column budget cuts them on large layers.
        for (kk, stride, padding, dilation) in [
            (3, 1, 1, 1),
            (8, 2, 3, 1),
            (5, 1, 4, 2),
            (3, 2, 0, 1),
            (1, 1, 0, 1),
            (4, 3, 5, 2),
        ] {
            let g = Geometry {
                padding,
                stride,
                dilation,
                output_padding: (0, 0),
            };
            let (c, h, wd) = (3, 7, 9);
            let xb: Vec<f64> = (0..c * h * wd).map(|i| i as f64 + 1.0).collect();
            let (oh, ow) = (g.conv_len(h, kk).unwrap(), g.conv_len(wd, kk).unwrap());
            let want = naive(&xb, (c, h, wd), kk, (oh, ow), g);
            let (nrows, npos) = (c * kk * kk, oh * ow);
            for (rows, pos) in [
                (0..nrows, 0..npos),
                (1..nrows - 1, 3..npos.min(3 + 2 * ow + 1)),
                (2..3, npos / 2..npos),
                (0..nrows, ow.saturating_sub(1)..npos.min(ow + 1)),
            ] {
                let mut out = vec![f64::NAN; rows.len() * pos.len()];
                im2col_into(&xb, (h, wd), kk, ow, g, rows.clone(), pos.clone(), &mut out);
                for (i, r) in rows.clone().enumerate() {
                    for (j, p) in pos.clone().enumerate() {
                        assert_eq!(
                            out[i * pos.len() + j],
                            want[r * npos + p],
                            "k{kk} s{stride} p{padding} d{dilation} row {r} position {p}"
                        );
                    }
                }
            }
        }
    }
}
