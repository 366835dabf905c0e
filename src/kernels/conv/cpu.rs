//! The CPU halves of the convolution ops: the transposed convolution as GEMM + col2im, the
//! forward convolution and the weight gradient as banded im2col + GEMM. Every column buffer holds
//! at most `COLS_BUDGET` elements.

use std::mem::MaybeUninit;

use candle_core::{Result, Shape};
use rayon::prelude::*;

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
    check_len(x, b * ci * hw, "conv_transpose2d input")?;
    check_len(w, ci * co * k * k, "conv_transpose2d kernel")?;
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
            // cols (cn*K*K) x hw = W's columns c0*K*K.. (W is ci x kkw) read as the transposed
            // (cn*K*K) x ci, times xb ci x hw.
            let cols: &[T] = gemm_fill(
                (cn * k * k, hw, ci),
                &mut cols[..cn * k * k * hw],
                &w[c0 * k * k..],
                (1, kkw),
                xb,
                (hw, 1),
            );
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
    check_len(x, b * ci * h * wd, "conv_transpose2d input")?;
    check_len(w, ci * co * k * k, "conv_transpose2d kernel")?;
    let ph = Phases::new(g, k, oh, ow);
    let mut out = vec![T::default(); b * co * oh * ow];
    let (ohw, chw) = (oh * ow, ci * h * wd);
    let wr = phase_weights(&ph, w, ci, co, k);
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
                let cols = ph.cols(r, xb, (ci, h, wd), p0..p0 + n, &mut cols[..rows * n]);
                // tmp co x n = wr co x rows times cols rows x n.
                let tmp: &[T] = gemm_fill(
                    (co, n, rows),
                    &mut tmp[..co * n],
                    wr,
                    (rows, 1),
                    cols,
                    (n, 1),
                );
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

/// The phases' weights: for each phase r, [Co, (ci, jy, jx)] (Co x `ph.rows(r, ci)`), from
/// `w` [Ci, Co, K, K] gathered in one pass over W (read in order, each element written to its
/// phase).
fn phase_weights<T: candle_core::WithDType + Copy + Send + Sync>(
    ph: &Phases,
    w: &[T],
    ci: usize,
    co: usize,
    k: usize,
) -> Vec<Vec<T>> {
    let count = ph.count();
    let mut wr: Vec<Vec<T>> = (0..count).map(|r| output(co * ph.rows(r, ci))).collect();
    let map = ph.tap_map(k, ci);
    {
        // For each output channel o, its rows [o * rows, (o + 1) * rows) of every phase's
        // buffer, so each parallel task owns the parts it writes.
        let mut per_o: Vec<Vec<&mut [MaybeUninit<T>]>> =
            (0..co).map(|_| Vec::with_capacity(count)).collect();
        for (r, v) in wr.iter_mut().enumerate() {
            let rows = ph.rows(r, ci);
            let mut parts = v.spare_capacity_mut()[..co * rows].chunks_mut(rows.max(1));
            for dst in per_o.iter_mut() {
                dst.push(if rows == 0 {
                    &mut []
                } else {
                    parts.next().expect("co chunks of rows")
                });
            }
        }
        per_o.into_par_iter().enumerate().for_each(|(o, mut dst)| {
            for c in 0..ci {
                let kernel = &w[(c * co + o) * k * k..][..k * k];
                for &(kidx, r, _, taps, j) in &map {
                    dst[r][c * taps + j].write(kernel[kidx]);
                }
            }
        });
    }
    for (r, v) in wr.iter_mut().enumerate() {
        // SAFETY: v has room for co * rows elements (`output`). For each o < co the loop above
        // wrote, for every c < ci and every map entry of phase r, element
        // o * rows + c * taps + j of it; `tap_map` asserts that phase r's entries have j
        // running over all of 0..taps, so with rows == ci * taps that is every element below
        // co * rows. The parallel loop returned, so all its writes are done.
        unsafe { v.set_len(co * ph.rows(r, ci)) };
    }
    wr
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
        // Each phase's entries have j = 0..taps, once each (`phase_weights` relies on it).
        let mut seen: Vec<Vec<bool>> = (0..self.count())
            .map(|r| vec![false; self.taps(r)])
            .collect();
        for &(_, r, _, _, j) in &v {
            assert!(
                !std::mem::replace(&mut seen[r][j], true),
                "tap_map: phase {r} tap {j} twice"
            );
        }
        assert!(
            seen.iter().flatten().all(|s| *s),
            "tap_map: a phase's tap is missing"
        );
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
    /// `dst[(c, jy, jx), p] = x[c, qy + offset_y(jy), qx + offset_x(jx)]`, zero outside; every
    /// element of `dst` (ci * taps x pos.len()) is written, and returned initialised.
    fn cols<'a, T: Copy + Send + Sync + Default>(
        &self,
        r: usize,
        xb: &[T],
        (ci, h, wd): (usize, usize, usize),
        pos: std::ops::Range<usize>,
        dst: &'a mut [MaybeUninit<T>],
    ) -> &'a mut [T] {
        let (ry, rx) = self.phase(r);
        let (ty, tx) = (&self.ty[ry], &self.tx[rx]);
        let (nty, ntx) = (ty.len(), tx.len());
        let (_, nqx) = self.positions(r);
        let n = pos.len();
        assert_eq!(
            dst.len(),
            ci * nty * ntx * n,
            "cols: dst is not rows x positions"
        );
        let zero = MaybeUninit::new(T::default());
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
                        seg.fill(zero);
                    } else {
                        let src = &plane[iy as usize * wd..][..wd];
                        seg[..a - qx0].fill(zero);
                        let first = (a as isize + ox) as usize;
                        seg[a - qx0..z - qx0].write_copy_of_slice(&src[first..first + z - a]);
                        seg[z - qx0..].fill(zero);
                    }
                });
            });
        // SAFETY: the chunks of n (n > 0; for n == 0 dst is empty) cover dst; in each,
        // `runs` calls back with runs j..j + run that tile 0..n, and each run's `seg` is written
        // in full: by one fill, or by a fill, a copy of equal length (copy panics otherwise) and
        // a fill over [0, a - qx0), [a - qx0, z - qx0), [z - qx0, run) with a < z. The parallel
        // loop returned, so every element of dst is initialised.
        unsafe { dst.assume_init_mut() }
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
    check_len(x, b * ci * h * wd, "conv_transpose2d weight gradient input")?;
    check_len(dy, b * co * oh * ow, "conv_transpose2d weight gradient dy")?;
    let ph = Phases::new(g, k, oh, ow);
    let mut dw = vec![T::default(); ci * co * k * k];
    let (ohw, chw) = (oh * ow, ci * h * wd);
    let mut dwr: Vec<Vec<T>> = Vec::with_capacity(ph.count());
    for r in 0..ph.count() {
        let (ry, rx) = ph.phase(r);
        let (nqy, nqx) = ph.positions(r);
        let rows = ph.rows(r, ci);
        let npos = nqy * nqx;
        // dW_r, co x rows: written by the first band's GEMM (its length set then), accumulated
        // into by the others.
        let mut acc: Vec<T> = output(co * rows);
        if rows == 0 {
            dwr.push(acc);
            continue;
        }
        let band = (budget / rows.max(1)).clamp(1, npos.max(1));
        let mut cols = scratch(rows * band);
        let mut dyr = scratch(co * band);
        for bi in 0..b {
            let xb = &x[bi * chw..(bi + 1) * chw];
            let dyb = &dy[bi * co * ohw..(bi + 1) * co * ohw];
            for p0 in (0..npos).step_by(band) {
                let n = band.min(npos - p0);
                let cols = ph.cols(r, xb, (ci, h, wd), p0..p0 + n, &mut cols[..rows * n]);
                let dyr = &mut dyr[..co * n];
                dyr.par_chunks_mut(n).enumerate().for_each(|(o, dst)| {
                    let plane = &dyb[o * ohw..(o + 1) * ohw];
                    ph.runs(nqx, p0..p0 + n, |j, qy, qx0, run| {
                        let src = &plane[(qy * g.stride + ry) * ow..][..ow];
                        for (q, v) in dst[j..j + run].iter_mut().enumerate() {
                            v.write(src[(qx0 + q) * g.stride + rx]);
                        }
                    });
                });
                // SAFETY: n >= 1 (band >= 1, p0 < npos); the chunks of n cover dyr (co * n
                // elements); in each, the runs j..j + run tile 0..n and every element of each
                // run is written. The parallel loop returned.
                let dyr: &[T] = unsafe { dyr.assume_init_mut() };
                // acc co x rows (+)= dyr co x n times cols rows x n read transposed.
                if acc.is_empty() {
                    let len = co * rows;
                    let dst = &mut acc.spare_capacity_mut()[..len];
                    gemm_fill((co, rows, n), dst, dyr, (n, 1), cols, (1, n));
                    // SAFETY: gemm_fill returned its co * rows elements (acc's first co * rows,
                    // within its capacity) initialised.
                    unsafe { acc.set_len(len) };
                } else {
                    gemm_into(
                        (co, rows, n),
                        &mut acc,
                        rows,
                        true,
                        dyr,
                        (n, 1),
                        cols,
                        (1, n),
                    );
                }
            }
        }
        // No band at all (an empty batch): dW_r is zero.
        acc.resize(co * rows, T::default());
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

/// An error unless `v` holds `n` elements (what its shape says).
fn check_len<T>(v: &[T], n: usize, what: &str) -> Result<()> {
    if v.len() != n {
        candle_core::bail!("{what}: {} elements where its shape has {n}", v.len());
    }
    Ok(())
}

/// A buffer of `n` elements, not zeroed (for the column buffers, up to `COLS_BUDGET` elements
/// per call, zeroing was a few percent of a step): its writers (im2col, the GEMMs that do not
/// read their output) take its elements as `MaybeUninit` and hand back, as `&mut [T]`, only
/// what they wrote in full, so no element is read before it is written.
fn scratch<T: candle_core::WithDType>(n: usize) -> Box<[MaybeUninit<T>]> {
    // The unit tests fill it with NaN, so a read before a write shows in their exact results.
    if crate::kernels::poison_uninit() {
        return vec![MaybeUninit::new(T::from_f64(f64::NAN)); n].into_boxed_slice();
    }
    Box::new_uninit_slice(n)
}

/// An empty vector with room for `n` elements, for an output whose elements are written
/// through its spare capacity before its length is set (NaN in that spare capacity under the
/// unit tests, as for [`scratch`]).
fn output<T: candle_core::WithDType>(n: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    if crate::kernels::poison_uninit() {
        v.spare_capacity_mut()[..n].fill(MaybeUninit::new(T::from_f64(f64::NAN)));
    }
    v
}

/// Whether a `rows` x `cols` matrix with strides (`rs`, `cs`) in elements lies within a buffer
/// of `len` elements starting at its first element: its last element's offset
/// `(rows - 1) * rs + (cols - 1) * cs` is below `len` (an empty matrix touches nothing).
fn fits(len: usize, (rows, cols): (usize, usize), (rs, cs): (usize, usize)) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    (rows - 1)
        .checked_mul(rs)
        .zip((cols - 1).checked_mul(cs))
        .and_then(|(a, b)| a.checked_add(b))
        .is_some_and(|last| last < len)
}

/// `dst (+)= lhs x rhs` through gemm: `dst` m x n with row stride `dst_rs` (columns
/// contiguous), `lhs` m x k, `rhs` k x n, strides in elements (row, column). `read_dst` false:
/// `dst` is written without being read.
///
/// # Safety
/// `dst` must be valid for reads (when `read_dst`) and writes of the m x n elements
/// `dst[i * dst_rs + j]`, which must be initialised when `read_dst`, and no other thread may
/// access them during the call; `lhs` and `rhs` must be valid for reads of every element of
/// their matrices, initialised, and not written during the call (they may not overlap `dst`'s
/// elements). `dst_rs >= n` (or m <= 1), so the elements are distinct.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw<T: 'static + candle_core::WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    read_dst: bool,
    lhs: *const T,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const T,
    (rhs_rs, rhs_cs): (usize, usize),
) {
    // SAFETY: the caller's contract is gemm's. gemm (0.19) with `read_dst` false sets its
    // `alpha` to zero, and every path of gemm-common's `gemm_basic_generic` then stores into
    // dst without loading it (the k == 0 path writes zeros; gevv, gemv and the microkernels
    // take their alpha == 0 branch), so an uninitialised dst is never read. Its Rayon tasks
    // write disjoint tiles of dst: the elements are distinct (dst_rs >= n, column stride 1).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            read_dst,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            T::from_f64(if read_dst { 1.0 } else { 0.0 }),
            T::from_f64(1.0),
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        )
    }
}

/// Checks the operands of a GEMM against their slices (panics if one does not fit).
#[allow(clippy::too_many_arguments)]
fn check_gemm(
    (m, n, k): (usize, usize, usize),
    dst_len: usize,
    dst_rs: usize,
    lhs_len: usize,
    lhs_strides: (usize, usize),
    rhs_len: usize,
    rhs_strides: (usize, usize),
) {
    assert!(m <= 1 || dst_rs >= n, "gemm: overlapping rows of dst");
    assert!(
        fits(dst_len, (m, n), (dst_rs, 1)),
        "gemm: dst out of bounds"
    );
    assert!(
        fits(lhs_len, (m, k), lhs_strides),
        "gemm: lhs out of bounds"
    );
    assert!(
        fits(rhs_len, (k, n), rhs_strides),
        "gemm: rhs out of bounds"
    );
}

/// `dst (+)= lhs x rhs` (accumulating when `accumulate`), `dst` m x n with row stride `dst_rs`
/// (columns contiguous) at the start of `dst`, `lhs` m x k and `rhs` k x n with strides in
/// elements (row, column); panics if a matrix does not fit its slice.
#[allow(clippy::too_many_arguments)]
fn gemm_into<T: 'static + candle_core::WithDType>(
    mnk: (usize, usize, usize),
    dst: &mut [T],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[T],
    lhs_strides: (usize, usize),
    rhs: &[T],
    rhs_strides: (usize, usize),
) {
    check_gemm(
        mnk,
        dst.len(),
        dst_rs,
        lhs.len(),
        lhs_strides,
        rhs.len(),
        rhs_strides,
    );
    // SAFETY: every matrix lies within its slice (checked above), so each pointer is valid for
    // its elements; the slices are initialised; `dst` is borrowed exclusively, so no other
    // thread touches it and it overlaps neither `lhs` nor `rhs`, which are borrowed shared (not
    // written during the call); dst's elements are distinct (checked).
    unsafe {
        gemm_raw(
            mnk,
            dst.as_mut_ptr(),
            dst_rs,
            accumulate,
            lhs.as_ptr(),
            lhs_strides,
            rhs.as_ptr(),
            rhs_strides,
        )
    }
}

/// `dst[i * dst_rs + j] = (lhs x rhs)[i, j]` for the m x n product, writing those elements of
/// `dst` (possibly uninitialised) without reading them; panics if a matrix does not fit its
/// slice. The other elements of `dst` are left as they were.
#[allow(clippy::too_many_arguments)]
fn gemm_write<T: 'static + candle_core::WithDType>(
    mnk: (usize, usize, usize),
    dst: &mut [MaybeUninit<T>],
    dst_rs: usize,
    lhs: &[T],
    lhs_strides: (usize, usize),
    rhs: &[T],
    rhs_strides: (usize, usize),
) {
    check_gemm(
        mnk,
        dst.len(),
        dst_rs,
        lhs.len(),
        lhs_strides,
        rhs.len(),
        rhs_strides,
    );
    // SAFETY: as in `gemm_into`, with `read_dst` false: gemm only writes dst's elements (never
    // reads them), so they need not be initialised; writing a `T` into a `MaybeUninit<T>` is
    // always valid.
    unsafe {
        gemm_raw(
            mnk,
            dst.as_mut_ptr().cast::<T>(),
            dst_rs,
            false,
            lhs.as_ptr(),
            lhs_strides,
            rhs.as_ptr(),
            rhs_strides,
        )
    }
}

/// [`gemm_write`] of the whole of `dst`, m x n contiguous (`dst.len() == m * n`), returned
/// initialised.
fn gemm_fill<'a, T: 'static + candle_core::WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: &'a mut [MaybeUninit<T>],
    lhs: &[T],
    lhs_strides: (usize, usize),
    rhs: &[T],
    rhs_strides: (usize, usize),
) -> &'a mut [T] {
    assert_eq!(dst.len(), m * n, "gemm: dst is not m x n");
    gemm_write((m, n, k), dst, n, lhs, lhs_strides, rhs, rhs_strides);
    // SAFETY: gemm_write returned, having written every element (i, j), i < m, j < n, at
    // i * n + j: that is each index below m * n == dst.len() once.
    unsafe { dst.assume_init_mut() }
}

/// Part of the im2col matrix of one input item `xb` [C, H, W] for a convolution of kernel
/// `kk` and output width `ow`: rows `rows` (of C*kk*kk, ordered (c, ky, kx)) by output positions
/// `pos` (of OH*OW), row-major into the first rows.len() x pos.len() elements of `out`; zeros
/// outside the input. Returns those elements, every one written.
#[allow(clippy::too_many_arguments)]
fn im2col_into<'a, T: Copy + Send + Sync + Default>(
    xb: &[T],
    (h, wd): (usize, usize),
    kk: usize,
    ow: usize,
    g: Geometry,
    rows: std::ops::Range<usize>,
    pos: std::ops::Range<usize>,
    out: &'a mut [MaybeUninit<T>],
) -> &'a mut [T] {
    let np = pos.len();
    let (st, d, pad) = (g.stride, g.dilation, g.padding as isize);
    let zero = MaybeUninit::new(T::default());
    let out = &mut out[..rows.len() * np];
    out.par_chunks_mut(np.max(1))
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
                    dst.fill(zero);
                } else {
                    let src = &plane[iy as usize * wd..][..wd];
                    dst[..lo - ox0].fill(zero);
                    let first = ((lo * st) as isize + off) as usize;
                    let mid = &mut dst[lo - ox0..hi - ox0];
                    if st == 1 {
                        mid.write_copy_of_slice(&src[first..][..hi - lo]);
                    } else {
                        // The zip below must not stop early: src holds the last input column.
                        assert!(
                            first + (hi - lo - 1) * st < wd,
                            "im2col: column out of range"
                        );
                        for (o, v) in mid.iter_mut().zip(src[first..].iter().step_by(st)) {
                            o.write(*v);
                        }
                    }
                    dst[hi - ox0..].fill(zero);
                }
                j += run;
                p += run;
            }
        });
    // SAFETY: the chunks of np (np > 0; for np == 0 `out` is empty) cover `out`; in each, the
    // runs j..j + run tile 0..np (run >= 1) and each run's `dst` is written in full: by one
    // fill, or by fills of [0, lo - ox0) and [hi - ox0, run) around `mid` (lo < hi), which a
    // copy of equal length (it panics otherwise) or the zip writes element by element (src
    // yields at least mid.len() elements: asserted). The parallel loop returned.
    unsafe { out.assume_init_mut() }
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
    check_len(x, b * c * h * wd, "conv2d input")?;
    check_len(w, k * ckk, "conv2d kernel")?;
    let shape = Shape::from((b, k, oh, ow));
    if ckk == 0 || k * npos == 0 {
        // No input channel: no band writes y, which is zero. (Or y is empty.)
        return Ok((vec![T::default(); b * k * npos], shape));
    }
    // Written through its spare capacity by the GEMMs, its length set once all of it is.
    let mut y: Vec<T> = output(b * k * npos);
    let mut cols = scratch(if by_rows {
        row_band * npos
    } else {
        ckk * pos_band
    });
    for (bi, yb) in y.spare_capacity_mut()[..b * k * npos]
        .chunks_mut(k * npos)
        .enumerate()
    {
        let xb = &x[bi * c * h * wd..(bi + 1) * c * h * wd];
        if by_rows {
            // The first band (r0 = 0) writes all of yb k x npos; the others accumulate into it.
            let mut yb_init: Option<&mut [T]> = None;
            for r0 in (0..ckk).step_by(row_band) {
                let n = row_band.min(ckk - r0);
                let cols = im2col_into(xb, (h, wd), kk, ow, g, r0..r0 + n, 0..npos, &mut cols);
                // yb k x npos (+)= w k x ckk (columns r0..r0+n) times cols n x npos.
                let lhs = &w[r0..];
                match yb_init.as_deref_mut() {
                    None => {
                        let dst = &mut *yb;
                        yb_init =
                            Some(gemm_fill((k, npos, n), dst, lhs, (ckk, 1), cols, (npos, 1)));
                    }
                    Some(dst) => gemm_into(
                        (k, npos, n),
                        dst,
                        npos,
                        true,
                        lhs,
                        (ckk, 1),
                        cols,
                        (npos, 1),
                    ),
                }
            }
            continue;
        }
        for p0 in (0..npos).step_by(pos_band) {
            let n = pos_band.min(npos - p0);
            let cols = im2col_into(xb, (h, wd), kk, ow, g, 0..ckk, p0..p0 + n, &mut cols);
            // yb's columns p0..p0+n (k x n, row stride npos) = w k x ckk times cols ckk x n.
            gemm_write((k, n, ckk), &mut yb[p0..], npos, w, (ckk, 1), cols, (n, 1));
        }
    }
    // SAFETY: y has room for b * k * npos elements, split into b chunks yb of k * npos > 0 (one
    // per batch item, all visited). By rows: ckk > 0, so the band r0 = 0 ran and gemm_fill wrote
    // all of yb. By positions: the bands p0..p0 + n tile 0..npos and each wrote the k x n
    // block of yb at (0, p0), row stride npos: every element of yb. The GEMMs have returned.
    unsafe { y.set_len(b * k * npos) };
    Ok((y, shape))
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
    check_len(x, b * c * h * wd, "conv2d weight gradient input")?;
    check_len(dy, b * k * inner, "conv2d weight gradient dy")?;
    let band = (COLS_BUDGET / inner.max(1)).clamp(1, ckk.max(1));
    let mut dw = vec![T::default(); k * ckk];
    let mut cols = scratch(band * inner);
    for bi in 0..b {
        let xb = &x[bi * c * h * wd..(bi + 1) * c * h * wd];
        let yb = &dy[bi * k * inner..(bi + 1) * k * inner];
        for r0 in (0..ckk).step_by(band) {
            let n = band.min(ckk - r0);
            let cols = im2col_into(xb, (h, wd), kk, ow, g, r0..r0 + n, 0..inner, &mut cols);
            // dw's columns r0..r0+n (k x n, row stride ckk) += yb k x inner times cols
            // n x inner read transposed.
            let dst = &mut dw[r0..];
            gemm_into(
                (k, n, inner),
                dst,
                ckk,
                true,
                yb,
                (inner, 1),
                cols,
                (1, inner),
            );
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
    fn an_empty_batch_or_no_channels_gives_zeros() {
        let g = |stride| Geometry {
            padding: 0,
            stride,
            dilation: 1,
            output_padding: (0, 0),
        };
        // No batch item: no band runs to write the phases' sums, and dW is zero.
        let dw = conv_transpose_weight_grad_cpu::<f64>(
            &[],
            (0, 2, 3, 3),
            &[],
            (0, 3, 7, 7),
            3,
            g(2),
            COLS_BUDGET,
        )
        .unwrap();
        assert_eq!(dw, vec![0.0; 2 * 3 * 3 * 3]);
        // No input channel: no band of im2col rows, and y is zero.
        for by_rows in [None, Some(true), Some(false)] {
            let (y, shape) =
                conv2d_cpu::<f64>(&[], (2, 0, 4, 4), &[], (3, 0, 3, 3), g(1), 7, by_rows).unwrap();
            assert_eq!(shape.dims(), &[2, 3, 2, 2]);
            assert_eq!(y, vec![0.0; 2 * 3 * 2 * 2]);
        }
        // No output channel: an empty y.
        let (y, _) =
            conv2d_cpu::<f64>(&[0.0; 32], (2, 1, 4, 4), &[], (0, 1, 3, 3), g(1), 7, None).unwrap();
        assert!(y.is_empty());
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
                // One element more than the band: im2col writes only the band's.
                let mut buf = scratch::<f64>(rows.len() * pos.len() + 1);
                let out = im2col_into(&xb, (h, wd), kk, ow, g, rows.clone(), pos.clone(), &mut buf);
                assert_eq!(out.len(), rows.len() * pos.len());
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
