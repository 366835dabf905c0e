//! The CPU halves of the convolution ops: the transposed convolution as GEMM + col2im, the
//! forward convolution and the weight gradient as banded im2col + GEMM. Every column buffer holds
//! at most `COLS_BUDGET` elements.

use candle_core::{Result, Shape};
use rayon::prelude::*;

use crate::kernels::SendPtr;

use super::Geometry;

/// Elements of the column buffer per GEMM, to bound memory on large layers.
pub(super) const COLS_BUDGET: usize = 1 << 24;

/// (Co, K, OH, OW) of the transposed convolution of an input `xs` [B, Ci, H, W] by a kernel
/// `ws` [Ci, Co, K, K], or an error naming the shapes.
fn transposed_output(
    xs: (usize, usize, usize, usize),
    ws: (usize, usize, usize, usize),
    g: Geometry,
) -> Result<(usize, usize, usize, usize)> {
    let (_, ci, h, wd) = xs;
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
    Ok((
        co,
        k,
        size(h, g.output_padding.0)?,
        size(wd, g.output_padding.1)?,
    ))
}

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
    let (co, k, oh, ow) = transposed_output(xs, ws, g)?;
    let hw = h * wd;
    let mut out = vec![T::default(); b * co * oh * ow];
    // The columns of output channels c0..c0+cn: W[:, c0*K*K..][Ci, cn*K*K] read transposed,
    // times X_b [Ci, H*W], written by gemm into one buffer reused for every chunk (no transposed
    // copy of W, no product tensor copied out).
    let kkw = co * k * k;
    let chunk = (COLS_BUDGET / (k * k * hw).max(1)).clamp(1, co);
    let mut cols = scratch(chunk * k * k * hw);
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

/// The transposed convolution of `x` [B, Ci, H, W] by `w` [Ci, Co, K, K] on the CPU, one
/// output phase at a time: the outputs (oy, ox) with oy = ry (mod stride), ox = rx take only the
/// kernel taps ky with ry + padding - ky*dilation divisible by the stride (ky in steps of the
/// stride for dilation 1), each reading input row oy/stride + a fixed offset. So each phase is a
/// stride-1 correlation of the input with a sub-kernel: im2col (contiguous row copies) + one GEMM
/// `[Co, Ci*taps] x [Ci*taps, positions]`, then a strided copy into the output. Its column buffer
/// is Ci*taps per position, against Co*K*K per input position of [`conv_transpose_cpu`], and
/// there is no read-modify-write scatter: the faster path when Ci <= Co (the expander's 16x16
/// upsampling, Ci 128 -> Co 640). Bound: a band's column buffer holds at most `budget`
/// elements (`COLS_BUDGET` outside the tests; one position's Ci*taps at the least), the GEMM's
/// output Co per band position.
pub(super) fn conv_transpose_phases_cpu<T>(
    x: &[T],
    xs: (usize, usize, usize, usize),
    w: &[T],
    ws: (usize, usize, usize, usize),
    g: Geometry,
    budget: usize,
) -> Result<(Vec<T>, Shape)>
where
    T: candle_core::WithDType + Copy + Send + Sync + std::ops::AddAssign + Default,
{
    let (b, ci, h, wd) = xs;
    let (co, k, oh, ow) = transposed_output(xs, ws, g)?;
    let ph = Phases::new(g, k, oh, ow);
    let mut out = vec![T::default(); b * co * oh * ow];
    let (ohw, chw) = (oh * ow, ci * h * wd);
    // The phases' weights [Co, (ci, jy, jx)], gathered in one pass over W (read in order, each
    // element written to its phase).
    let mut wr: Vec<Vec<T>> = (0..ph.count())
        .map(|r| scratch(co * ph.rows(r, ci)))
        .collect();
    {
        let dsts: Vec<SendPtr<T>> = wr.iter_mut().map(|v| SendPtr(v.as_mut_ptr())).collect();
        let map = ph.tap_map(k, ci);
        (0..co).into_par_iter().for_each(|o| {
            for c in 0..ci {
                let kernel = &w[(c * co + o) * k * k..][..k * k];
                for &(kidx, r, rows, taps, j) in &map {
                    // SAFETY: phase r holds co x rows; (o, c, j) is written once.
                    unsafe {
                        dsts[r]
                            .get()
                            .add(o * rows + c * taps + j)
                            .write(kernel[kidx])
                    };
                }
            }
        });
    }
    for r in 0..ph.count() {
        let (ry, rx) = ph.phase(r);
        let (nqy, nqx) = ph.positions(r);
        if ph.taps(r) == 0 {
            continue; // no input reaches these outputs: zeros
        }
        let rows = ph.rows(r, ci);
        let npos = nqy * nqx;
        let wr = &wr[r];
        let band = (budget / rows.max(1)).clamp(1, npos.max(1));
        let mut cols = scratch(rows * band);
        let mut tmp = scratch(co * band);
        for bi in 0..b {
            let xb = &x[bi * chw..(bi + 1) * chw];
            let out_b = &mut out[bi * co * ohw..(bi + 1) * co * ohw];
            for p0 in (0..npos).step_by(band) {
                let n = band.min(npos - p0);
                ph.cols(r, xb, (ci, h, wd), p0..p0 + n, &mut cols[..rows * n]);
                // SAFETY: tmp holds co x n, wr co x rows, cols rows x n.
                unsafe {
                    gemm_into(
                        (co, n, rows),
                        tmp.as_mut_ptr(),
                        (n, 1),
                        false,
                        wr.as_ptr(),
                        (rows, 1),
                        cols.as_ptr(),
                        (n, 1),
                    );
                }
                let tmp = &tmp[..co * n];
                out_b
                    .par_chunks_mut(ohw)
                    .zip(tmp.par_chunks(n))
                    .for_each(|(o, t)| {
                        ph.runs(nqx, p0..p0 + n, |j, qy, qx0, run| {
                            let orow = &mut o[(qy * g.stride + ry) * ow..][..ow];
                            for (q, v) in t[j..j + run].iter().enumerate() {
                                orow[(qx0 + q) * g.stride + rx] = *v;
                            }
                        });
                    });
            }
        }
    }
    Ok((out, Shape::from((b, co, oh, ow))))
}

/// The output phases of a transposed convolution (see [`conv_transpose_phases_cpu`]): for each
/// phase (ry, rx), its taps along each axis with their input offsets.
struct Phases {
    stride: usize,
    /// Per phase along y (x): (tap, input offset) of each of its taps.
    ty: Vec<Vec<(usize, isize)>>,
    tx: Vec<Vec<(usize, isize)>>,
    /// Output rows and columns.
    oh: usize,
    ow: usize,
}

impl Phases {
    fn new(g: Geometry, k: usize, oh: usize, ow: usize) -> Self {
        let (s, d, pad) = (g.stride as isize, g.dilation as isize, g.padding as isize);
        // The taps of phase r along one axis: ky with r + pad - ky*d divisible by the stride.
        let taps = |r: usize| -> Vec<(usize, isize)> {
            (0..k)
                .filter_map(|t| {
                    let num = r as isize + pad - t as isize * d;
                    (num.rem_euclid(s) == 0).then(|| (t, num.div_euclid(s)))
                })
                .collect()
        };
        Self {
            stride: g.stride,
            ty: (0..g.stride.min(oh)).map(taps).collect(),
            tx: (0..g.stride.min(ow)).map(taps).collect(),
            oh,
            ow,
        }
    }

    fn count(&self) -> usize {
        self.ty.len() * self.tx.len()
    }

    /// (ry, rx) of phase r.
    fn phase(&self, r: usize) -> (usize, usize) {
        (r / self.tx.len(), r % self.tx.len())
    }

    /// Kernel taps of phase r (ny * nx).
    fn taps(&self, r: usize) -> usize {
        let (ry, rx) = self.phase(r);
        self.ty[ry].len() * self.tx[rx].len()
    }

    /// im2col rows of phase r: (ci, jy, jx).
    fn rows(&self, r: usize, ci: usize) -> usize {
        ci * self.taps(r)
    }

    /// Output rows and columns of phase r.
    fn positions(&self, r: usize) -> (usize, usize) {
        let (ry, rx) = self.phase(r);
        (
            (self.oh - ry).div_ceil(self.stride),
            (self.ow - rx).div_ceil(self.stride),
        )
    }

    /// For every kernel tap that reaches an output (its phase is unique per axis), in the
    /// kernel's order: (ky * k + kx, phase, the phase's rows for `ci` input channels, the
    /// phase's taps, the tap's index among them).
    fn tap_map(&self, k: usize, ci: usize) -> Vec<(usize, usize, usize, usize, usize)> {
        let mut v = Vec::with_capacity(k * k);
        for (ry, ty) in self.ty.iter().enumerate() {
            for (jy, &(ky, _)) in ty.iter().enumerate() {
                for (rx, tx) in self.tx.iter().enumerate() {
                    for (jx, &(kx, _)) in tx.iter().enumerate() {
                        let r = ry * self.tx.len() + rx;
                        v.push((
                            ky * k + kx,
                            r,
                            self.rows(r, ci),
                            self.taps(r),
                            jy * tx.len() + jx,
                        ));
                    }
                }
            }
        }
        v.sort_unstable();
        v
    }

    /// `f(offset in the band, qy, first qx, run length)` for the runs of band positions
    /// `pos` (of nqy x nqx) within one output row.
    fn runs(
        &self,
        nqx: usize,
        pos: std::ops::Range<usize>,
        mut f: impl FnMut(usize, usize, usize, usize),
    ) {
        let n = pos.len();
        let (mut j, mut p) = (0, pos.start);
        while j < n {
            let (qy, qx0) = (p / nqx, p % nqx);
            let run = (nqx - qx0).min(n - j);
            f(j, qy, qx0, run);
            j += run;
            p += run;
        }
    }

    /// Phase r's im2col of one input item `xb` [ci, h, w] for band positions `pos`:
    /// `dst[(c, jy, jx), p] = x[c, qy + offset_y(jy), qx + offset_x(jx)]`, zero outside.
    fn cols<T: Copy + Send + Sync + Default>(
        &self,
        r: usize,
        xb: &[T],
        (ci, h, wd): (usize, usize, usize),
        pos: std::ops::Range<usize>,
        dst: &mut [T],
    ) {
        let (ry, rx) = self.phase(r);
        let (ty, tx) = (&self.ty[ry], &self.tx[rx]);
        let (nty, ntx) = (ty.len(), tx.len());
        let (_, nqx) = self.positions(r);
        let n = pos.len();
        debug_assert_eq!(dst.len(), ci * nty * ntx * n);
        dst.par_chunks_mut(n.max(1))
            .enumerate()
            .for_each(|(row, dst)| {
                let c = row / (nty * ntx);
                let (oy, ox) = (ty[(row / ntx) % nty].1, tx[row % ntx].1);
                let plane = &xb[c * h * wd..(c + 1) * h * wd];
                // qx with 0 <= qx + ox < wd
                let lo = (-ox).max(0) as usize;
                let hi = (wd as isize - ox).clamp(0, nqx as isize) as usize;
                self.runs(nqx, pos.clone(), |j, qy, qx0, run| {
                    let seg = &mut dst[j..j + run];
                    let iy = qy as isize + oy;
                    let (a, z) = (lo.clamp(qx0, qx0 + run), hi.clamp(qx0, qx0 + run));
                    if iy < 0 || iy as usize >= h || a >= z {
                        seg.fill(T::default());
                    } else {
                        let src = &plane[iy as usize * wd..][..wd];
                        seg[..a - qx0].fill(T::default());
                        let first = (a as isize + ox) as usize;
                        seg[a - qx0..z - qx0].copy_from_slice(&src[first..first + z - a]);
                        seg[z - qx0..].fill(T::default());
                    }
                });
            });
    }
}

/// dW [Ci, Co, K, K] of the transposed convolution `y = convT(x, w)` on the CPU, per output
/// phase: `dW_r [Co, (ci, jy, jx)] += dy_r [Co, positions] x cols_r^T` with `cols_r` the
/// phase's im2col of the input (as in [`conv_transpose_phases_cpu`]) and `dy_r` dy's outputs of
/// that phase, then each phase's taps written to their places in dW. Its column buffers hold
/// Ci*taps per position, against Co*K*K per input position for the weight gradient of the
/// equivalent convolution of dy: the faster path where Ci <= Co. Bound: a band's column buffer
/// holds at most `budget` elements (`COLS_BUDGET` outside the tests; one position's Ci*taps at
/// the least), dy_r's band Co per position, and each phase's dW_r Co*Ci*taps (all of them together: dW's size).
pub(super) fn conv_transpose_weight_grad_cpu<T>(
    x: &[T],
    xs: (usize, usize, usize, usize),
    dy: &[T],
    ys: (usize, usize, usize, usize),
    k: usize,
    g: Geometry,
    budget: usize,
) -> Result<Vec<T>>
where
    T: candle_core::WithDType + Copy + Send + Sync + Default + 'static,
{
    let (b, ci, h, wd) = xs;
    let (yb, co, oh, ow) = ys;
    let want = (
        g.transposed_len(h, k, g.output_padding.0),
        g.transposed_len(wd, k, g.output_padding.1),
    );
    if yb != b || want != (Some(oh), Some(ow)) {
        candle_core::bail!("conv_transpose2d weight gradient: dy {ys:?} does not fit x {xs:?}");
    }
    let ph = Phases::new(g, k, oh, ow);
    let mut dw = vec![T::default(); ci * co * k * k];
    let (ohw, chw) = (oh * ow, ci * h * wd);
    let mut dwr: Vec<Vec<T>> = Vec::with_capacity(ph.count());
    for r in 0..ph.count() {
        let (ry, rx) = ph.phase(r);
        let (nqy, nqx) = ph.positions(r);
        let rows = ph.rows(r, ci);
        let npos = nqy * nqx;
        let mut acc = scratch(co * rows);
        if rows == 0 {
            dwr.push(acc);
            continue;
        }
        let band = (budget / rows.max(1)).clamp(1, npos.max(1));
        let mut cols = scratch(rows * band);
        let mut dyr = scratch(co * band);
        let mut first = true;
        for bi in 0..b {
            let xb = &x[bi * chw..(bi + 1) * chw];
            let dyb = &dy[bi * co * ohw..(bi + 1) * co * ohw];
            for p0 in (0..npos).step_by(band) {
                let n = band.min(npos - p0);
                ph.cols(r, xb, (ci, h, wd), p0..p0 + n, &mut cols[..rows * n]);
                dyr[..co * n]
                    .par_chunks_mut(n)
                    .enumerate()
                    .for_each(|(o, dst)| {
                        let plane = &dyb[o * ohw..(o + 1) * ohw];
                        ph.runs(nqx, p0..p0 + n, |j, qy, qx0, run| {
                            let src = &plane[(qy * g.stride + ry) * ow..][..ow];
                            for (q, v) in dst[j..j + run].iter_mut().enumerate() {
                                *v = src[(qx0 + q) * g.stride + rx];
                            }
                        });
                    });
                // SAFETY: acc holds co x rows, dyr co x n, cols rows x n read transposed.
                unsafe {
                    gemm_into(
                        (co, rows, n),
                        acc.as_mut_ptr(),
                        (rows, 1),
                        !first,
                        dyr.as_ptr(),
                        (n, 1),
                        cols.as_ptr(),
                        (1, n),
                    );
                }
                first = false;
            }
        }
        dwr.push(acc);
    }
    {
        // dW[c, o, ky, kx] = dW_r[o, (c, j)] for the tap's phase r and index j.
        let map = ph.tap_map(k, ci);
        dw.par_chunks_mut(co * k * k)
            .enumerate()
            .for_each(|(c, dst)| {
                for (o, dst) in dst.chunks_mut(k * k).enumerate() {
                    for &(kidx, r, rows, taps, j) in &map {
                        dst[kidx] = dwr[r][o * rows + c * taps + j];
                    }
                }
            });
    }
    Ok(dw)
}

/// A buffer of `n` elements that its user writes in full before reading any (a column band
/// filled by im2col, a GEMM's output written without reading it): no zeroing pass, which for
/// the column buffers (up to `COLS_BUDGET` elements per call) was a few percent of a step.
/// This is how candle allocates its own CPU outputs (`alloc_uninit`).
// The same as candle's `alloc_uninit` for CPU storage (clippy's `uninit_vec`): the elements are
// plain floats and every one is written (by a copy, a fill or gemm without reading its output)
// before it is read.
#[allow(clippy::uninit_vec)]
fn scratch<T: candle_core::WithDType>(n: usize) -> Vec<T> {
    // The unit tests fill it with NaN, so a read before a write shows in their exact results.
    if cfg!(test) {
        return vec![T::from_f64(f64::NAN); n];
    }
    let mut v = Vec::with_capacity(n);
    // SAFETY: T is a plain float (Copy, no drop, every bit pattern valid); the callers write
    // every element before reading it (see each call).
    unsafe { v.set_len(n) };
    v
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

/// y [B, K, OH, OW] = conv(x, w) on the CPU: for each batch item, `y_b = W [K, C*kk*kk] x cols`
/// with `cols` [C*kk*kk, OH*OW] the item's im2col, built and multiplied a band at a time. Where
/// the whole im2col exceeds `COLS_BUDGET` elements, the bands are cut along whichever axis
/// costs less to revisit: output positions (each band's GEMM packs all of W again: K*C*kk*kk
/// per band) or rows (each band's GEMM accumulates into all of y_b: K*OH*OW read and written per
/// band). A transposed convolution's input gradient has C*kk*kk in the hundreds of thousands
/// (640 x 16 x 16 in the expander), where position bands re-packed 84 MB of weights per band.
/// `by_rows` forces one axis (`Some(true)`: rows, `Some(false)`: positions; the tests use it).
/// Bound: a band's column buffer holds at most `budget` elements (`COLS_BUDGET` outside the
/// tests; one position's or one row's worth at the least).
pub(super) fn conv2d_cpu<T>(
    x: &[T],
    xs: (usize, usize, usize, usize),
    w: &[T],
    ws: (usize, usize, usize, usize),
    g: Geometry,
    budget: usize,
    by_rows: Option<bool>,
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
    let pos_band = (budget / ckk.max(1)).clamp(1, npos.max(1));
    let row_band = (budget / npos.max(1)).clamp(1, ckk.max(1));
    let (pos_bands, row_bands) = (npos.div_ceil(pos_band), ckk.div_ceil(row_band));
    let by_rows =
        by_rows.unwrap_or(pos_bands > 1 && (row_bands - 1) * 2 * npos < (pos_bands - 1) * ckk);
    let mut y = scratch(b * k * npos);
    // Written by im2col before each GEMM reads it.
    let mut cols = scratch(if by_rows {
        row_band * npos
    } else {
        ckk * pos_band
    });
    for bi in 0..b {
        let xb = &x[bi * c * h * wd..(bi + 1) * c * h * wd];
        let yb = &mut y[bi * k * npos..(bi + 1) * k * npos];
        if by_rows {
            for r0 in (0..ckk).step_by(row_band) {
                let n = row_band.min(ckk - r0);
                im2col_into(xb, (h, wd), kk, ow, g, r0..r0 + n, 0..npos, &mut cols);
                // SAFETY: yb holds k x npos, w k x ckk (columns r0..r0+n read), cols n x npos.
                unsafe {
                    gemm_into(
                        (k, npos, n),
                        yb.as_mut_ptr(),
                        (npos, 1),
                        r0 > 0,
                        w.as_ptr().add(r0),
                        (ckk, 1),
                        cols.as_ptr(),
                        (npos, 1),
                    );
                }
            }
            continue;
        }
        for p0 in (0..npos).step_by(pos_band) {
            let n = pos_band.min(npos - p0);
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
    let mut cols = scratch(band * inner);
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

    /// The transposed convolution by its definition: each input element scattered through
    /// the kernel.
    fn naive_transposed(
        x: &[f64],
        (b, ci, h, wd): (usize, usize, usize, usize),
        w: &[f64],
        (co, k): (usize, usize),
        g: Geometry,
    ) -> (Vec<f64>, (usize, usize)) {
        let oh = g.transposed_len(h, k, g.output_padding.0).unwrap();
        let ow = g.transposed_len(wd, k, g.output_padding.1).unwrap();
        let mut out = vec![0.0; b * co * oh * ow];
        for bi in 0..b {
            for c in 0..ci {
                for iy in 0..h {
                    for ix in 0..wd {
                        let v = x[((bi * ci + c) * h + iy) * wd + ix];
                        for o in 0..co {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let oy = (iy * g.stride + ky * g.dilation) as isize
                                        - g.padding as isize;
                                    let ox = (ix * g.stride + kx * g.dilation) as isize
                                        - g.padding as isize;
                                    if oy < 0 || ox < 0 || oy as usize >= oh || ox as usize >= ow {
                                        continue;
                                    }
                                    out[((bi * co + o) * oh + oy as usize) * ow + ox as usize] +=
                                        v * w[((c * co + o) * k + ky) * k + kx];
                                }
                            }
                        }
                    }
                }
            }
        }
        (out, (oh, ow))
    }

    /// (kernel, geometry, input h x w) of the transposed-convolution tests: the expander's
    /// 16/2/7, convolution input gradients (stride 1, dilation 2; stride 2 with output padding
    /// on one axis), stride 3, dilation sharing a factor with the stride (phases without taps),
    /// padding past the kernel, 1x1 inputs, H != W of both parities.
    fn transposed_cases() -> Vec<(usize, Geometry, (usize, usize))> {
        [
            (16, 2, 7, 1, (0, 0), 5, 4),
            (5, 1, 4, 2, (0, 0), 7, 6),
            (8, 2, 3, 1, (1, 0), 6, 5),
            (3, 1, 1, 1, (0, 0), 1, 1),
            (4, 3, 1, 1, (2, 1), 4, 3),
            (3, 2, 0, 2, (1, 1), 3, 4),
            (2, 2, 3, 1, (0, 0), 5, 6),
            (1, 1, 0, 1, (0, 0), 3, 2),
        ]
        .into_iter()
        .map(|(k, stride, padding, dilation, output_padding, h, wd)| {
            let g = Geometry {
                padding,
                stride,
                dilation,
                output_padding,
            };
            (k, g, (h, wd))
        })
        .collect()
    }

    #[test]
    fn both_transposed_convolutions_match_the_definition() {
        for (k, g, (h, wd)) in transposed_cases() {
            let (stride, padding, dilation, op) =
                (g.stride, g.padding, g.dilation, g.output_padding);
            // ci < co (the phase path's case) and ci > co (col2im's).
            for (ci, co) in [(2, 3), (3, 2)] {
                let b = 2;
                let x: Vec<f64> = (0..b * ci * h * wd)
                    .map(|i| ((i * 7919) % 23) as f64 - 11.0)
                    .collect();
                let w: Vec<f64> = (0..ci * co * k * k)
                    .map(|i| ((i * 104729) % 19) as f64 - 9.0)
                    .collect();
                let Some(_) = g
                    .transposed_len(h, k, op.0)
                    .zip(g.transposed_len(wd, k, op.1))
                else {
                    continue;
                };
                let (want, (oh, ow)) = naive_transposed(&x, (b, ci, h, wd), &w, (co, k), g);
                let xs = (b, ci, h, wd);
                let ws = (ci, co, k, k);
                // Bands of one position, of 5 (ending mid-row), and all positions.
                let rows = ci * k * k;
                for (name, (got, shape)) in [
                    (
                        "phases",
                        conv_transpose_phases_cpu(&x, xs, &w, ws, g, COLS_BUDGET).unwrap(),
                    ),
                    (
                        "phases/1",
                        conv_transpose_phases_cpu(&x, xs, &w, ws, g, 1).unwrap(),
                    ),
                    (
                        "phases/5",
                        conv_transpose_phases_cpu(&x, xs, &w, ws, g, 5 * rows).unwrap(),
                    ),
                    ("col2im", conv_transpose_cpu(&x, xs, &w, ws, g).unwrap()),
                ] {
                    assert_eq!(shape.dims(), &[b, co, oh, ow], "{name}");
                    assert_eq!(
                        got, want,
                        "{name}: k{k} s{stride} p{padding} d{dilation} op{op:?} {h}x{wd} ci{ci} co{co}"
                    );
                }
            }
        }
    }

    #[test]
    fn transposed_weight_gradient_by_phases_matches_the_definition() {
        for (k, g, (h, wd)) in transposed_cases() {
            let (stride, padding, dilation, op) =
                (g.stride, g.padding, g.dilation, g.output_padding);
            let (Some(oh), Some(ow)) =
                (g.transposed_len(h, k, op.0), g.transposed_len(wd, k, op.1))
            else {
                continue;
            };
            for (ci, co) in [(2, 3), (3, 2)] {
                let b = 2;
                let x: Vec<f64> = (0..b * ci * h * wd)
                    .map(|i| ((i * 7919) % 23) as f64 - 11.0)
                    .collect();
                let dy: Vec<f64> = (0..b * co * oh * ow)
                    .map(|i| ((i * 104729) % 19) as f64 - 9.0)
                    .collect();
                let mut want = vec![0.0; ci * co * k * k];
                for bi in 0..b {
                    for c in 0..ci {
                        for o in 0..co {
                            for ky in 0..k {
                                for kx in 0..k {
                                    for iy in 0..h {
                                        for ix in 0..wd {
                                            let oy = (iy * stride + ky * dilation) as isize
                                                - padding as isize;
                                            let ox = (ix * stride + kx * dilation) as isize
                                                - padding as isize;
                                            if oy < 0
                                                || ox < 0
                                                || oy as usize >= oh
                                                || ox as usize >= ow
                                            {
                                                continue;
                                            }
                                            want[((c * co + o) * k + ky) * k + kx] += x
                                                [((bi * ci + c) * h + iy) * wd + ix]
                                                * dy[((bi * co + o) * oh + oy as usize) * ow
                                                    + ox as usize];
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                let (xs, ys) = ((b, ci, h, wd), (b, co, oh, ow));
                for budget in [COLS_BUDGET, 1, 5 * ci * k * k] {
                    let got =
                        conv_transpose_weight_grad_cpu(&x, xs, &dy, ys, k, g, budget).unwrap();
                    assert_eq!(
                        got, want,
                        "k{k} s{stride} p{padding} d{dilation} op{op:?} {h}x{wd} ci{ci} co{co} budget {budget}"
                    );
                }
            }
        }
    }

    #[test]
    fn convolution_bands_of_rows_or_positions_match_the_definition() {
        for (kk, stride, padding, dilation, h, wd) in [
            (3, 1, 1, 1, 7, 6),
            (5, 1, 4, 2, 6, 7),
            (8, 2, 3, 1, 9, 8),
            (16, 2, 7, 1, 10, 12),
            (1, 1, 0, 1, 1, 1),
        ] {
            let g = Geometry {
                padding,
                stride,
                dilation,
                output_padding: (0, 0),
            };
            let (b, c, k) = (2, 3, 4);
            let x: Vec<f64> = (0..b * c * h * wd)
                .map(|i| ((i * 7919) % 23) as f64 - 11.0)
                .collect();
            let w: Vec<f64> = (0..k * c * kk * kk)
                .map(|i| ((i * 104729) % 19) as f64 - 9.0)
                .collect();
            let (oh, ow) = (g.conv_len(h, kk).unwrap(), g.conv_len(wd, kk).unwrap());
            let (ckk, npos) = (c * kk * kk, oh * ow);
            let mut want = vec![0.0; b * k * npos];
            for bi in 0..b {
                let cols = naive(
                    &x[bi * c * h * wd..][..c * h * wd],
                    (c, h, wd),
                    kk,
                    (oh, ow),
                    g,
                );
                for o in 0..k {
                    for p in 0..npos {
                        want[(bi * k + o) * npos + p] =
                            (0..ckk).map(|r| w[o * ckk + r] * cols[r * npos + p]).sum();
                    }
                }
            }
            let xs = (b, c, h, wd);
            let ws = (k, c, kk, kk);
            // One band; bands of 1, of 3 and of 7 rows or positions (ending mid-row).
            for budget in [usize::MAX >> 8, 1, 3 * npos.max(ckk), 7 * npos.min(ckk)] {
                for by_rows in [Some(true), Some(false), None] {
                    let (got, shape) = conv2d_cpu(&x, xs, &w, ws, g, budget, by_rows).unwrap();
                    assert_eq!(shape.dims(), &[b, k, oh, ow]);
                    assert_eq!(
                        got, want,
                        "k{kk} s{stride} p{padding} d{dilation} {h}x{wd} budget {budget} rows {by_rows:?}"
                    );
                }
            }
        }
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
