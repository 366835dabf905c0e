//! 2-D convolution and transposed convolution as custom ops with their own backward passes.
//!
//! - CPU: a fast transposed convolution, `cols = W^T x` (one GEMM per batch item and channel
//!   chunk), then col2im scatter-adds the columns into the output. `conv2d` is candle's forward
//!   with a backward whose input gradient uses that transposed convolution.
//! - CUDA (`cudnn` feature): every pass on cuDNN (`super::cudnn`): forward, input gradient
//!   (backward-data, also the transposed convolution's forward) and weight gradient
//!   (backward-filter); candle's naive CUDA kernels are never used.
//! - Other devices and dtypes: candle's own ops.

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous;

/// Geometry of a (transposed) convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    padding: usize,
    stride: usize,
    dilation: usize,
    /// Extra output rows and columns of a transposed convolution (per axis: a strided
    /// convolution's input gradient needs different amounts where H and W differ in parity).
    output_padding: (usize, usize),
}

/// Elements of the column buffer per GEMM, to bound memory on large layers.
const COLS_BUDGET: usize = 1 << 24;

/// The transposed convolution of `x` [B, Ci, H, W] by `w` [Ci, Co, K, K] on the CPU.
fn conv_transpose_cpu<T>(
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
    let span = g.dilation * (k - 1);
    let size = |n: usize, op: usize| -> Result<usize> {
        ((n.max(1) - 1) * g.stride + span + 1 + op)
            .checked_sub(2 * g.padding)
            .filter(|s| *s > 0 && n > 0)
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "conv_transpose2d: input {xs:?} too small for kernel {k} and padding {}",
                    g.padding
                ))
            })
    };
    let (oh, ow) = (size(h, g.output_padding.0)?, size(wd, g.output_padding.1)?);
    let hw = h * wd;
    let mut out = vec![T::default(); b * co * oh * ow];
    // W as [Ci, Co*K*K]; its transpose times X_b [Ci, H*W] gives the columns.
    let wt = Tensor::from_slice(w, (ci, co * k * k), &Device::Cpu)?
        .t()?
        .contiguous()?;
    let chunk = (COLS_BUDGET / (k * k * hw).max(1)).clamp(1, co);
    for bi in 0..b {
        let xb = Tensor::from_slice(&x[bi * ci * hw..(bi + 1) * ci * hw], (ci, hw), &Device::Cpu)?;
        let out_b = &mut out[bi * co * oh * ow..(bi + 1) * co * oh * ow];
        for c0 in (0..co).step_by(chunk) {
            let cn = chunk.min(co - c0);
            let cols = wt
                .narrow(0, c0 * k * k, cn * k * k)?
                .matmul(&xb)?
                .flatten_all()?
                .to_vec1::<T>()?;
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

/// The weight gradient cut to the kernel's size (the correlation can come out larger).
fn fit_kernel(grad_w: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (_, _, k0, k1) = w.dims4()?;
    grad_w.narrow(2, 0, k0)?.narrow(3, 0, k1)
}

fn dims4(l: &Layout) -> Result<(usize, usize, usize, usize)> {
    l.shape().dims4()
}

/// The transposed convolution as a custom op (CPU only) with candle's backward formulas.
struct ConvTransposeOp(Geometry);

impl CustomOp2 for ConvTransposeOp {
    fn name(&self) -> &'static str {
        "fluxflow-conv-transpose2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (xs, ws) = (dims4(l1)?, dims4(l2)?);
        match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                let x = contiguous(x, l1, self.name())?;
                let w = contiguous(w, l2, self.name())?;
                let (v, s) = conv_transpose_cpu(x, xs, w, ws, self.0)?;
                Ok((CpuStorage::F32(v), s))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w)) => {
                let x = contiguous(x, l1, self.name())?;
                let w = contiguous(w, l2, self.name())?;
                let (v, s) = conv_transpose_cpu(x, xs, w, ws, self.0)?;
                Ok((CpuStorage::F64(v), s))
            }
            _ => candle_core::bail!("{}: f32 or f64 inputs of one dtype", self.name()),
        }
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cudnn::{run_storage, shape_of, Pass};
        let g = self.0;
        let (b, _, h, wd) = dims4(l1)?;
        let (_, co, k, _) = dims4(l2)?;
        let out = |n: usize, op: usize| (n - 1) * g.stride + g.dilation * (k - 1) + 1 + op;
        let (oh, ow) = (out(h, g.output_padding.0), out(wd, g.output_padding.1));
        if oh <= 2 * g.padding || ow <= 2 * g.padding || h == 0 || wd == 0 {
            candle_core::bail!("conv_transpose2d: input too small for kernel {k}");
        }
        let x = [b, co, oh - 2 * g.padding, ow - 2 * g.padding];
        let s = shape_of(
            Pass::BackwardData,
            l1,
            l2,
            g.padding,
            g.stride,
            g.dilation,
            x,
        )?;
        run_storage(Pass::BackwardData, &s, (s1, l1), (s2, l2))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self.0;
        let grad = grad.contiguous()?;
        // y = convT(x, w) is the input gradient of the convolution grad -> x by w, so its
        // gradients are that convolution's forward pass and weight gradient.
        let grad_x = conv2d(&grad, w, g.padding, g.stride, g.dilation)?;
        let grad_w = weight_grad(&grad, x, w, g)?;
        Ok((Some(grad_x), Some(grad_w)))
    }
}

/// The weight gradient of the forward convolution `y = conv(x, w)` from `x` and `dy`, shaped
/// like `w` [K, C, kh, kw]: a direct GEMM over the input's im2col columns on the CPU (f32,
/// f64), cuDNN's backward-filter on CUDA, else the correlation of `x` with `dy` (candle's
/// formula).
fn weight_grad(x: &Tensor, dy: &Tensor, w: &Tensor, g: Geometry) -> Result<Tensor> {
    let (k, c, kh, kw) = w.dims4()?;
    let op = ConvFilterGradOp {
        g,
        w: [k, c, kh, kw],
    };
    let cpu = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && kh == kw;
    if cpu || (cfg!(feature = "cudnn") && x.device().is_cuda()) {
        return x.contiguous()?.apply_op2_no_bwd(&dy.contiguous()?, &op);
    }
    let grad_w = x
        .transpose(0, 1)?
        .conv2d(&dy.transpose(0, 1)?, g.padding, g.dilation, g.stride, 1)?
        .transpose(0, 1)?;
    fit_kernel(&grad_w, w)
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
    out[..rows.len() * np]
        .par_chunks_mut(np)
        .enumerate()
        .for_each(|(i, orow)| {
            let row = rows.start + i;
            let (ci, ky, kx) = (row / (kk * kk), (row / kk) % kk, row % kk);
            let plane = &xb[ci * h * wd..(ci + 1) * h * wd];
            for (j, o) in orow.iter_mut().enumerate() {
                let p = pos.start + j;
                let (oy, ox) = (p / ow, p % ow);
                let iy = (oy * g.stride + ky * g.dilation) as isize - g.padding as isize;
                let ix = (ox * g.stride + kx * g.dilation) as isize - g.padding as isize;
                *o = if iy >= 0 && (iy as usize) < h && ix >= 0 && (ix as usize) < wd {
                    plane[iy as usize * wd + ix as usize]
                } else {
                    T::default()
                };
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
fn conv2d_cpu<T>(
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
        (n + 2 * g.padding)
            .checked_sub(g.dilation * (kk - 1) + 1)
            .map(|v| v / g.stride + 1)
            .ok_or_else(|| {
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
fn weight_grad_cpu<T>(
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

/// The weight gradient as an op of (x, dy), shaped `w`: [`weight_grad_cpu`] on the CPU,
/// cuDNN's backward-filter on CUDA.
struct ConvFilterGradOp {
    g: Geometry,
    w: [usize; 4],
}

impl CustomOp2 for ConvFilterGradOp {
    fn name(&self) -> &'static str {
        "fluxflow-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [k, c, kh, kw] = self.w;
        let (xs, ys) = (dims4(l1)?, dims4(l2)?);
        if kh != kw || xs.1 != c || ys.1 != k {
            candle_core::bail!("{}: {xs:?} and {ys:?} do not fit {:?}", self.name(), self.w);
        }
        let name = self.name();
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(dy)) => CpuStorage::F32(weight_grad_cpu(
                contiguous(x, l1, name)?,
                xs,
                contiguous(dy, l2, name)?,
                ys,
                kh,
                self.g,
            )?),
            (CpuStorage::F64(x), CpuStorage::F64(dy)) => CpuStorage::F64(weight_grad_cpu(
                contiguous(x, l1, name)?,
                xs,
                contiguous(dy, l2, name)?,
                ys,
                kh,
                self.g,
            )?),
            _ => candle_core::bail!("{name}: f32 or f64 inputs of one dtype"),
        };
        Ok((out, Shape::from(self.w.to_vec())))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cudnn::{run_storage, shape_of, Pass};
        let g = self.g;
        let s = shape_of(
            Pass::BackwardFilter,
            l1,
            l2,
            g.padding,
            g.stride,
            g.dilation,
            self.w,
        )?;
        run_storage(Pass::BackwardFilter, &s, (s1, l1), (s2, l2))
    }
}

/// Whether a convolution of `x` runs as our custom op: f32/f64 on the CPU, any float dtype on
/// CUDA with cuDNN.
fn custom_path(x: &Tensor) -> bool {
    let cpu = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
    let cuda = cfg!(feature = "cudnn")
        && x.device().is_cuda()
        && matches!(
            x.dtype(),
            DType::F32 | DType::F64 | DType::BF16 | DType::F16
        );
    cpu || cuda
}

/// The transposed convolution of `x` [B, Ci, H, W] by `w` [Ci, Co, K, K] (no bias).
pub fn conv_transpose2d(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    output_padding: usize,
    stride: usize,
    dilation: usize,
) -> Result<Tensor> {
    conv_transpose2d_hw(
        x,
        w,
        padding,
        (output_padding, output_padding),
        stride,
        dilation,
    )
}

/// [`conv_transpose2d`] with separate output paddings for rows and columns.
fn conv_transpose2d_hw(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    output_padding: (usize, usize),
    stride: usize,
    dilation: usize,
) -> Result<Tensor> {
    if !custom_path(x) {
        if output_padding.0 != output_padding.1 {
            candle_core::bail!("conv_transpose2d: per-axis output padding needs the custom op");
        }
        return x.conv_transpose2d(w, padding, output_padding.0, stride, dilation);
    }
    let g = Geometry {
        padding,
        stride,
        dilation,
        output_padding,
    };
    x.contiguous()?
        .apply_op2(&w.contiguous()?, ConvTransposeOp(g))
}

/// A convolution (groups 1, no bias) whose input gradient uses the fast transposed
/// convolution on the CPU.
struct Conv2dOp(Geometry);

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "fluxflow-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, name) = (self.0, self.name());
        let (xs, ws) = (dims4(l1)?, dims4(l2)?);
        match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                let (x, w) = (contiguous(x, l1, name)?, contiguous(w, l2, name)?);
                let (y, s) = conv2d_cpu(x, xs, w, ws, g)?;
                Ok((CpuStorage::F32(y), s))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w)) => {
                let (x, w) = (contiguous(x, l1, name)?, contiguous(w, l2, name)?);
                let (y, s) = conv2d_cpu(x, xs, w, ws, g)?;
                Ok((CpuStorage::F64(y), s))
            }
            _ => candle_core::bail!("{name}: f32 or f64 inputs of one dtype"),
        }
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cudnn::{run_storage, shape_of, Pass};
        let g = self.0;
        let (b, _, h, wd) = dims4(l1)?;
        let (co, _, k, _) = dims4(l2)?;
        let out = |n: usize| -> Result<usize> {
            (n + 2 * g.padding)
                .checked_sub(g.dilation * (k - 1) + 1)
                .map(|v| v / g.stride + 1)
                .ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "conv2d: input {h}x{wd} too small for kernel {k} and padding {}",
                        g.padding
                    ))
                })
        };
        let y = [b, co, out(h)?, out(wd)?];
        let s = shape_of(Pass::Forward, l1, l2, g.padding, g.stride, g.dilation, y)?;
        run_storage(Pass::Forward, &s, (s1, l1), (s2, l2))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self.0;
        let (_, _, xh, xw) = x.dims4()?;
        let (_, _, k, _) = w.dims4()?;
        let (_, _, gh, gw) = grad.dims4()?;
        // The rows (columns) of x the strided convolution never reached come back as output
        // padding of the transposed convolution.
        let pad = |gn: usize, xn: usize| -> Result<usize> {
            let out =
                ((gn - 1) * g.stride + g.dilation * (k - 1) + 1).saturating_sub(2 * g.padding);
            xn.checked_sub(out).ok_or_else(|| {
                candle_core::Error::Msg(format!("conv2d backward: cannot map {gn} back to {xn}"))
            })
        };
        let op = (pad(gh, xh)?, pad(gw, xw)?);
        let grad = grad.contiguous()?;
        let grad_x = conv_transpose2d_hw(&grad, w, g.padding, op, g.stride, g.dilation)?;
        let grad_w = weight_grad(x, &grad, w, g)?;
        Ok((Some(grad_x), Some(grad_w)))
    }
}

/// A 2-D convolution of `x` [B, Ci, H, W] by `w` [Co, Ci, K, K] (groups 1, no bias).
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
) -> Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    if !(custom_path(x) && kh == kw) {
        return x.conv2d(w, padding, stride, dilation, 1);
    }
    let g = Geometry {
        padding,
        stride,
        dilation,
        output_padding: (0, 0),
    };
    x.contiguous()?.apply_op2(&w.contiguous()?, Conv2dOp(g))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        d.to_scalar::<f64>().unwrap()
    }

    #[test]
    fn transposed_convolution_matches_candle_in_value_and_gradients() {
        let dev = Device::Cpu;
        for (k, s, p, d, op) in [
            (16, 2, 7, 1, 0),
            (5, 1, 4, 2, 0),
            (8, 2, 3, 1, 1),
            (3, 1, 1, 1, 0),
        ] {
            let x = candle_core::Var::randn(0f64, 1.0, (2, 3, 5, 4), &dev).unwrap();
            let w = candle_core::Var::randn(0f64, 1.0, (3, 4, k, k), &dev).unwrap();
            let ours = conv_transpose2d(x.as_tensor(), w.as_tensor(), p, op, s, d).unwrap();
            let theirs = x
                .as_tensor()
                .conv_transpose2d(w.as_tensor(), p, op, s, d)
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            assert!(close(&ours, &theirs) < 1e-10, "k{k} s{s} p{p} d{d}");
            let r = Tensor::randn(0f64, 1.0, ours.dims(), &dev).unwrap();
            let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &w] {
                let (a, b) = (
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                assert!(close(a, b) < 1e-10, "gradient k{k} s{s} p{p} d{d}");
            }
        }
    }

    /// <a, b> over all elements.
    fn dot(a: &Tensor, b: &Tensor) -> f64 {
        (a * b)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn convolution_gradients_match_candle_and_the_adjoint_identity() {
        let dev = Device::Cpu;
        for (k, s, p, d, h) in [
            (8, 2, 3, 1, 16),
            (5, 1, 4, 2, 9),
            (3, 1, 1, 1, 7),
            (1, 1, 0, 1, 3),
            (8, 2, 3, 1, 15),
            (4, 2, 1, 1, 8),
        ] {
            // Widths of both parities: under stride 2 an odd extra column is never reached.
            for wd in [h + 2, h + 1] {
                let x = candle_core::Var::randn(0f64, 1.0, (2, 3, h, wd), &dev).unwrap();
                let w = candle_core::Var::randn(0f64, 1.0, (4, 3, k, k), &dev).unwrap();
                let ours = conv2d(x.as_tensor(), w.as_tensor(), p, s, d).unwrap();
                let theirs = x.as_tensor().conv2d(w.as_tensor(), p, s, d, 1).unwrap();
                assert!(close(&ours, &theirs) < 1e-10);
                let r = Tensor::randn(0f64, 1.0, ours.dims(), &dev).unwrap();
                let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let (gx, gw) = (g1.get(&x).unwrap(), g1.get(&w).unwrap());
                assert_eq!(gx.dims(), x.dims(), "k{k} s{s} {h}x{wd}");
                // The convolution is linear in x and in w, so for any probe x2 (w2):
                // <conv(x2, w), r> = <x2, dL/dx> and <conv(x, w2), r> = <w2, dL/dw>.
                let x2 = Tensor::randn(0f64, 1.0, x.dims(), &dev).unwrap();
                let w2 = Tensor::randn(0f64, 1.0, w.dims(), &dev).unwrap();
                let lhs = dot(&conv2d(&x2, w.as_tensor(), p, s, d).unwrap(), &r);
                let rel = (lhs - dot(&x2, gx)).abs() / lhs.abs().max(1.0);
                assert!(
                    rel < 1e-10,
                    "input gradient k{k} s{s} p{p} d{d} {h}x{wd}: {rel:e}"
                );
                let lhs = dot(&conv2d(x.as_tensor(), &w2, p, s, d).unwrap(), &r);
                let rel = (lhs - dot(&w2, gw)).abs() / lhs.abs().max(1.0);
                assert!(
                    rel < 1e-10,
                    "weight gradient k{k} s{s} p{p} d{d} {h}x{wd}: {rel:e}"
                );
                if (h + 2 * p - d * (k - 1) - 1) % s == (wd + 2 * p - d * (k - 1) - 1) % s {
                    // candle's own backward handles only one output padding for both axes.
                    let g2 = (&theirs * &r)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    for v in [&x, &w] {
                        let (a, b) = (
                            g1.get(v.as_tensor()).unwrap(),
                            g2.get(v.as_tensor()).unwrap(),
                        );
                        assert!(close(a, b) < 1e-10, "gradient k{k} s{s} p{p} d{d} {h}x{wd}");
                    }
                }
            }
        }
    }
}
