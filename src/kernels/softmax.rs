//! Softmax over the last axis as one op whose backward pass needs only the output:
//! `dx = y * (dy - sum(dy * y))`. The composition of candle ops keeps the maximum, the shifted
//! input, its exponential and the sum for the backward pass (five tensors the size of an
//! attention score matrix); this keeps one. candle's own fused `softmax_last_dim` has no
//! backward pass at all.
//!
//! CPU: rows in parallel, in the composition's order (max, exp(x - max), sum, divide).
//! CUDA: candle's softmax kernel (float32 accumulation for 16-bit inputs). The backward pass's
//! row sums run in float32 for 16-bit inputs; its temporaries live only during the backward.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};

use super::in_f32;
use half::bf16;
use rayon::prelude::*;

/// Softmax over the last axis: one fused op (`kernels::softmax`, whose backward keeps only the
/// output) where the dtype and device allow, else candle's composition (in float32 for 16-bit
/// inputs).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if supported(x) {
        return softmax_last_dim(x);
    }
    in_f32(x, |x| candle_nn::ops::softmax(x, D::Minus1))
}

struct SoftmaxLastDim;

fn rows_cpu<T: Copy + Send + Sync>(
    x: &[T],
    n: usize,
    to: impl Fn(T) -> f64 + Sync,
    from: impl Fn(f64) -> T + Sync,
    exp: impl Fn(f64) -> f64 + Sync,
) -> Vec<T> {
    let mut y: Vec<T> = x.to_vec();
    y.par_chunks_mut(n).for_each(|row| {
        let max = row.iter().map(|v| to(*v)).fold(f64::NEG_INFINITY, f64::max);
        let mut sum = 0.0;
        for v in row.iter_mut() {
            let e = exp(to(*v) - max);
            *v = from(e);
            sum += to(*v);
        }
        for v in row.iter_mut() {
            *v = from(to(*v) / sum);
        }
    });
    y
}

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "fluxflow-softmax-last-dim"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("softmax: input must be contiguous".into()))?;
        let n = l.dims().last().copied().unwrap_or(1).max(1);
        let out = match st {
            // f32 rows in f32 arithmetic, as candle's composition computes them.
            CpuStorage::F32(x) => CpuStorage::F32(rows_cpu(
                &x[a..b],
                n,
                |v| v as f64,
                |v| v as f32,
                |v| (v as f32).exp() as f64,
            )),
            CpuStorage::F64(x) => CpuStorage::F64(rows_cpu(&x[a..b], n, |v| v, |v| v, f64::exp)),
            CpuStorage::BF16(x) => CpuStorage::BF16(rows_cpu(
                &x[a..b],
                n,
                |v| v.to_f64(),
                bf16::from_f64,
                f64::exp,
            )),
            _ => candle_core::bail!("softmax: f32, f64 or bf16 input"),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        st: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = super::cuda::softmax_last_dim(st, l)?;
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(softmax_backward(&res.detach(), grad)?))
    }
}

/// The gradient of softmax over the last axis from its output `y` and the output's gradient
/// `dy`: y * (dy - sum(dy * y)), in float32 for 16-bit types, returned in `y`'s dtype.
pub(crate) fn softmax_backward(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let dtype = y.dtype();
    let wide = |t: &Tensor| -> Result<Tensor> {
        match dtype {
            DType::BF16 | DType::F16 => t.to_dtype(DType::F32),
            _ => Ok(t.clone()),
        }
    };
    let (y, dy) = (wide(y)?, wide(dy)?);
    let dot = (&dy * &y)?.sum_keepdim(D::Minus1)?;
    y.mul(&dy.broadcast_sub(&dot)?)?.to_dtype(dtype)
}

/// Whether the fused softmax handles `x`.
pub fn supported(x: &Tensor) -> bool {
    super::fused_supported(x)
}

/// softmax(x) over the last axis.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(SoftmaxLastDim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{check_finite_differences, rel_l2 as rel};
    use candle_core::{Device, Var};

    #[test]
    fn fused_softmax_matches_composition_in_value_and_gradient_f64() {
        let dev = Device::Cpu;
        for dims in [&[2usize, 3, 7, 5][..], &[4, 1], &[1, 9], &[3, 2, 16]] {
            let x = Var::randn(0f64, 3.0, dims, &dev).unwrap();
            let ours = softmax_last_dim(x.as_tensor()).unwrap();
            let theirs = candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap();
            assert!(rel(&ours, &theirs) < 1e-12, "{dims:?}");
            let r = Tensor::randn(0f64, 1.0, dims, &dev).unwrap();
            let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let e = rel(g1.get(&x).unwrap(), g2.get(&x).unwrap());
            assert!(e < 1e-10, "{dims:?}: gradient {e:e}");
        }
    }

    #[test]
    fn fused_softmax_gradient_passes_a_finite_difference_check() {
        let dev = Device::Cpu;
        let x = Var::randn(0f64, 2.0, (2, 5), &dev).unwrap();
        let r = Tensor::randn(0f64, 1.0, (2, 5), &dev).unwrap();
        let loss = |x: &Tensor| {
            (&softmax_last_dim(x).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let f = |x: &Tensor| -> f64 { loss(x).to_scalar().unwrap() };
        let g = loss(x.as_tensor()).backward().unwrap();
        check_finite_differences(&f, x.as_tensor(), g.get(&x).unwrap(), 1e-8, "softmax");
    }
}
