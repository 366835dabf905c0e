//! 2-D convolution and transposed convolution as custom ops with their own backward passes.
//!
//! - CPU (`cpu`): the transposed convolution per output phase (im2col + GEMM) where it has no
//!   more input than output channels, else as `cols = W^T x` then a col2im scatter (whichever
//!   column buffer is smaller; `by_phases`); its weight gradient per phase likewise; the forward
//!   convolution and its weight gradient as im2col + GEMM in bands of positions or of rows; the
//!   input gradient through the transposed convolution. Every column buffer is bounded.
//! - CUDA (`cudnn` feature): every pass on cuDNN (`super::cudnn`): forward, input gradient
//!   (backward-data, also the transposed convolution's forward) and weight gradient
//!   (backward-filter); candle's naive CUDA kernels are never used.
//! - Other devices and dtypes: candle's own ops.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::contiguous;

mod cpu;
#[cfg(feature = "cudnn")]
mod cudnn;
use cpu::{
    conv2d_cpu, conv_transpose_cpu, conv_transpose_phases_cpu, conv_transpose_weight_grad_cpu,
    weight_grad_cpu, COLS_BUDGET,
};

/// Which CPU algorithm a transposed convolution of `ci` input and `co` output channels takes:
/// per output phase (im2col + GEMM, column buffer ∝ `ci`) when `ci <= co`, else GEMM + col2im
/// (column buffer ∝ `co`).
fn by_phases(ci: usize, co: usize) -> bool {
    ci <= co
}

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

impl Geometry {
    /// Output length of the convolution along an input axis of `n` with kernel `k`; None where
    /// the padded input is shorter than the kernel's span.
    fn conv_len(&self, n: usize, k: usize) -> Option<usize> {
        (n + 2 * self.padding)
            .checked_sub(self.dilation * (k - 1) + 1)
            .map(|v| v / self.stride + 1)
    }

    /// Output length of the transposed convolution along an input axis of `n` with kernel `k`
    /// and output padding `op`; None where it would be empty.
    fn transposed_len(&self, n: usize, k: usize, op: usize) -> Option<usize> {
        if n == 0 {
            return None;
        }
        ((n - 1) * self.stride + self.dilation * (k - 1) + 1 + op)
            .checked_sub(2 * self.padding)
            .filter(|len| *len > 0)
    }
}

/// Runs `$f(x, w)` on two CPU storages of one dtype, f32 or f64, giving `(Vec, Shape)`.
macro_rules! on_f32_or_f64 {
    ($name:expr, ($s1:expr, $l1:expr), ($s2:expr, $l2:expr), |$x:ident, $w:ident| $f:expr) => {
        match ($s1, $s2) {
            (CpuStorage::F32($x), CpuStorage::F32($w)) => {
                let ($x, $w) = (contiguous($x, $l1, $name)?, contiguous($w, $l2, $name)?);
                let (v, shape) = $f;
                Ok((CpuStorage::F32(v), shape))
            }
            (CpuStorage::F64($x), CpuStorage::F64($w)) => {
                let ($x, $w) = (contiguous($x, $l1, $name)?, contiguous($w, $l2, $name)?);
                let (v, shape) = $f;
                Ok((CpuStorage::F64(v), shape))
            }
            _ => candle_core::bail!("{}: f32 or f64 inputs of one dtype", $name),
        }
    };
}

/// The weight gradient cut to the kernel's size (the correlation can come out larger).
fn fit_kernel(grad_w: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (_, _, k0, k1) = w.dims4()?;
    grad_w.narrow(2, 0, k0)?.narrow(3, 0, k1)
}

fn dims4(l: &Layout) -> Result<(usize, usize, usize, usize)> {
    l.shape().dims4()
}

/// The transposed convolution as a custom op: GEMM + col2im on the CPU, cuDNN's backward-data
/// on CUDA; its backward pass is the forward convolution and the weight gradient.
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
        on_f32_or_f64!(self.name(), (s1, l1), (s2, l2), |x, w| {
            if by_phases(ws.0, ws.1) {
                conv_transpose_phases_cpu(x, xs, w, ws, self.0, COLS_BUDGET)?
            } else {
                conv_transpose_cpu(x, xs, w, ws, self.0)?
            }
        })
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use self::cudnn::{run_storage, shape_of, Pass};
        let g = self.0;
        let (b, _, h, wd) = dims4(l1)?;
        let (_, co, k, _) = dims4(l2)?;
        let (oh, ow) = match (
            g.transposed_len(h, k, g.output_padding.0),
            g.transposed_len(wd, k, g.output_padding.1),
        ) {
            (Some(oh), Some(ow)) => (oh, ow),
            _ => candle_core::bail!(
                "conv_transpose2d: input {h}x{wd} too small for kernel {k} and padding {}",
                g.padding
            ),
        };
        let x = [b, co, oh, ow];
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
        // Only the gradients a backward pass can use: an input that carries no graph (the
        // images) gets none.
        let grad_x = match x.track_op() {
            true => Some(conv2d(&grad, w, g.padding, g.stride, g.dilation)?),
            false => None,
        };
        let grad_w = match w.track_op() {
            true => Some(transposed_weight_grad(x, &grad, w, g)?),
            false => None,
        };
        Ok((grad_x, grad_w))
    }
}

/// The weight gradient of the transposed convolution `y = convT(x, w)` from `x` and `dy`,
/// shaped like `w` [Ci, Co, K, K]: per output phase on the CPU where Ci <= Co (f32, f64; see
/// [`conv_transpose_weight_grad_cpu`]), else the weight gradient of the convolution dy -> x.
fn transposed_weight_grad(x: &Tensor, dy: &Tensor, w: &Tensor, g: Geometry) -> Result<Tensor> {
    let (ci, co, k, k2) = w.dims4()?;
    let cpu = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && k == k2;
    if cpu && by_phases(ci, co) {
        let op = TransposedFilterGradOp {
            g,
            w: [ci, co, k, k],
        };
        return x.contiguous()?.apply_op2_no_bwd(&dy.contiguous()?, &op);
    }
    weight_grad(dy, x, w, g)
}

/// The transposed convolution's weight gradient as an op of (x, dy), shaped `w`, on the CPU.
struct TransposedFilterGradOp {
    g: Geometry,
    w: [usize; 4],
}

impl CustomOp2 for TransposedFilterGradOp {
    fn name(&self) -> &'static str {
        "fluxflow-conv-transpose2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [ci, co, k, _] = self.w;
        let (xs, ys) = (dims4(l1)?, dims4(l2)?);
        if xs.1 != ci || ys.1 != co {
            candle_core::bail!("{}: {xs:?} and {ys:?} do not fit {:?}", self.name(), self.w);
        }
        on_f32_or_f64!(self.name(), (s1, l1), (s2, l2), |x, dy| {
            let dw = conv_transpose_weight_grad_cpu(x, xs, dy, ys, k, self.g, COLS_BUDGET)?;
            (dw, Shape::from(self.w.to_vec()))
        })
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
        on_f32_or_f64!(self.name(), (s1, l1), (s2, l2), |x, dy| {
            let dw = weight_grad_cpu(x, xs, dy, ys, kh, self.g)?;
            (dw, Shape::from(self.w.to_vec()))
        })
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use self::cudnn::{run_storage, shape_of, Pass};
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

/// A convolution (groups 1, no bias) as a custom op: banded im2col + GEMM on the CPU, cuDNN on
/// CUDA; its backward pass is the transposed convolution and the weight gradient.
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
        let (xs, ws) = (dims4(l1)?, dims4(l2)?);
        on_f32_or_f64!(self.name(), (s1, l1), (s2, l2), |x, w| {
            conv2d_cpu(x, xs, w, ws, self.0, COLS_BUDGET, None)?
        })
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use self::cudnn::{run_storage, shape_of, Pass};
        let g = self.0;
        let (b, _, h, wd) = dims4(l1)?;
        let (co, _, k, _) = dims4(l2)?;
        let out = |n: usize| -> Result<usize> {
            g.conv_len(n, k).ok_or_else(|| {
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
            let out = g.transposed_len(gn, k, 0).unwrap_or(0);
            xn.checked_sub(out).ok_or_else(|| {
                candle_core::Error::Msg(format!("conv2d backward: cannot map {gn} back to {xn}"))
            })
        };
        let op = (pad(gh, xh)?, pad(gw, xw)?);
        let grad = grad.contiguous()?;
        // Only the gradients a backward pass can use: the model's first layer reads the images,
        // which carry no graph, and their input gradient (a 5-channel pass cuDNN runs on its
        // slowest float32 kernel, 12 ms of a 120 ms step at 256x256 on an H200) is skipped.
        let grad_x = match x.track_op() {
            true => Some(conv_transpose2d_hw(
                &grad, w, g.padding, op, g.stride, g.dilation,
            )?),
            false => None,
        };
        let grad_w = match w.track_op() {
            true => Some(weight_grad(x, &grad, w, g)?),
            false => None,
        };
        Ok((grad_x, grad_w))
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
    use candle_core::Device;

    fn close(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        d.to_scalar::<f64>().unwrap()
    }

    #[test]
    fn an_input_without_a_graph_gets_no_gradient_and_the_weights_still_do() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1.0, (2, 5, 6, 6), &dev).unwrap();
        let w = candle_core::Var::randn(0f64, 1.0, (4, 5, 3, 3), &dev).unwrap();
        let wt = candle_core::Var::randn(0f64, 1.0, (5, 4, 4, 4), &dev).unwrap();
        for transposed in [false, true] {
            let (y, w, theirs) = if transposed {
                let y = conv_transpose2d(&x, wt.as_tensor(), 1, 0, 2, 1).unwrap();
                let t = x.conv_transpose2d(wt.as_tensor(), 1, 0, 2, 1).unwrap();
                (y, &wt, t)
            } else {
                let y = conv2d(&x, w.as_tensor(), 1, 1, 1).unwrap();
                (y, &w, x.conv2d(w.as_tensor(), 1, 1, 1, 1).unwrap())
            };
            let r = Tensor::randn(0f64, 1.0, y.dims(), &dev).unwrap();
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(g.get(&x).is_none(), "transposed {transposed}");
            let g2 = (&theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let dw = g.get(w.as_tensor()).expect("the weights' gradient");
            assert!(close(dw, g2.get(w.as_tensor()).unwrap()) < 1e-10);
        }
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
