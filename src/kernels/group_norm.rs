//! Fused GroupNorm with its affine transform: `y = (x - mean) / sqrt(var + eps) * gamma + beta`
//! per (sample, group), as one op. The composition of candle ops keeps the grouped input, its
//! mean, the centred input, its square, the variance and the normalised input for the backward
//! pass; this keeps only its inputs and recomputes the statistics (one more read of x).
//!
//! Statistics and reductions in float64 for f64 inputs, float32 otherwise (also for bf16).
//! The backward pass returns dx, dgamma and dbeta from one op whose output packs them as
//! `[dx (B*C*H*W), dgamma (C), dbeta (C)]`.
//!
//! CPU: (sample, group) rows in parallel. CUDA (`cuda` feature): `src/kernels/cuda/fused.cu`,
//! block reductions over each channel plane with float64 atomics per row and channel; its
//! temporary buffers are 4 x B*G + 2 x C doubles.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::contiguous;

/// Geometry: x is [B, C, S] with `groups` groups of C / groups channels.
#[derive(Debug, Clone, Copy)]
struct Geom {
    b: usize,
    c: usize,
    s: usize,
    groups: usize,
    eps: f64,
}

impl Geom {
    fn per_group(&self) -> usize {
        self.c / self.groups
    }

    /// Checks that a storage of `len` elements and parameters of `params` fit the geometry.
    fn check(&self, len: usize, params: usize, what: &str) -> Result<()> {
        if len != self.b * self.c * self.s || params != self.c {
            candle_core::bail!("{what}: {len} values and {params} parameters do not fit {self:?}");
        }
        Ok(())
    }
}

/// Mean and 1/sqrt(var + eps) of one (sample, group) row of `n` values (two passes).
fn row_stats<T: Copy>(row: &[T], to: &impl Fn(T) -> f64, eps: f64, narrow: bool) -> (f64, f64) {
    let n = row.len() as f64;
    // float32 statistics for f32/bf16 inputs, as the reference's float32 model computes them.
    let r = |v: f64| if narrow { v as f32 as f64 } else { v };
    let mean = r(row.iter().map(|v| to(*v)).sum::<f64>() / n);
    let var = r(row.iter().map(|v| (to(*v) - mean).powi(2)).sum::<f64>() / n);
    (mean, 1.0 / (var + eps).sqrt())
}

fn fwd_cpu<T: Copy + Send + Sync>(
    x: &[T],
    gamma: &[T],
    beta: &[T],
    g: Geom,
    to: impl Fn(T) -> f64 + Sync,
    from: impl Fn(f64) -> T + Sync,
    narrow: bool,
) -> Vec<T> {
    let row_len = g.per_group() * g.s;
    let mut y: Vec<T> = x.to_vec();
    y.par_chunks_mut(row_len)
        .zip(x.par_chunks(row_len))
        .enumerate()
        .for_each(|(r, (yr, xr))| {
            let (mean, rstd) = row_stats(xr, &to, g.eps, narrow);
            let c0 = (r % g.groups) * g.per_group();
            for (k, (yv, xv)) in yr.iter_mut().zip(xr).enumerate() {
                let c = c0 + k / g.s;
                *yv = from((to(*xv) - mean) * rstd * to(gamma[c]) + to(beta[c]));
            }
        });
    y
}

/// dx, then per-channel dgamma and dbeta, packed into one vector.
fn bwd_cpu<T: Copy + Send + Sync>(
    x: &[T],
    gamma: &[T],
    dy: &[T],
    g: Geom,
    to: impl Fn(T) -> f64 + Sync,
    from: impl Fn(f64) -> T + Sync,
    narrow: bool,
) -> Vec<T> {
    let row_len = g.per_group() * g.s;
    let n = row_len as f64;
    let mut dx: Vec<T> = x.to_vec();
    // Per row: each channel's (sum dy * xhat, sum dy), for dgamma and dbeta.
    let partial: Vec<Vec<(f64, f64)>> = dx
        .par_chunks_mut(row_len)
        .zip(x.par_chunks(row_len).zip(dy.par_chunks(row_len)))
        .enumerate()
        .map(|(r, (dxr, (xr, dyr)))| {
            let (mean, rstd) = row_stats(xr, &to, g.eps, narrow);
            let c0 = (r % g.groups) * g.per_group();
            let (mut s1, mut s2) = (0.0, 0.0);
            let mut per_c = vec![(0.0, 0.0); g.per_group()];
            for (k, (xv, dv)) in xr.iter().zip(dyr).enumerate() {
                let xhat = (to(*xv) - mean) * rstd;
                let d = to(*dv);
                let dxhat = d * to(gamma[c0 + k / g.s]);
                s1 += dxhat;
                s2 += dxhat * xhat;
                let pc = &mut per_c[k / g.s];
                pc.0 += d * xhat;
                pc.1 += d;
            }
            let (m1, m2) = (s1 / n, s2 / n);
            for (k, (o, (xv, dv))) in dxr.iter_mut().zip(xr.iter().zip(dyr)).enumerate() {
                let xhat = (to(*xv) - mean) * rstd;
                let dxhat = to(*dv) * to(gamma[c0 + k / g.s]);
                *o = from(rstd * (dxhat - m1 - xhat * m2));
            }
            per_c
        })
        .collect();
    let mut out = dx;
    let mut dgamma = vec![0.0; g.c];
    let mut dbeta = vec![0.0; g.c];
    for (r, per_c) in partial.iter().enumerate() {
        let c0 = (r % g.groups) * g.per_group();
        for (k, (a, b)) in per_c.iter().enumerate() {
            dgamma[c0 + k] += a;
            dbeta[c0 + k] += b;
        }
    }
    out.extend(dgamma.into_iter().map(&from));
    out.extend(dbeta.into_iter().map(&from));
    out
}

/// Runs `$f` (`fwd_cpu` or `bwd_cpu`) on three CPU storages of one dtype: f32 and bf16 with
/// float32 statistics, f64 with float64 ones.
macro_rules! on_cpu_dtype {
    ($name:expr, $g:expr, ($s1:expr, $l1:expr), ($s2:expr, $l2:expr), ($s3:expr, $l3:expr), $f:ident) => {{
        let (g, name) = ($g, $name);
        macro_rules! arm {
            ($a:expr, $b:expr, $c:expr, $v:ident, $to:expr, $from:expr, $narrow:expr) => {{
                let (a, b, c) = (
                    contiguous($a, $l1, name)?,
                    contiguous($b, $l2, name)?,
                    contiguous($c, $l3, name)?,
                );
                g.check(a.len(), b.len(), name)?;
                CpuStorage::$v($f(a, b, c, g, $to, $from, $narrow))
            }};
        }
        match ($s1, $s2, $s3) {
            (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(c)) => {
                arm!(a, b, c, F32, |v| v as f64, |v| v as f32, true)
            }
            (CpuStorage::F64(a), CpuStorage::F64(b), CpuStorage::F64(c)) => {
                arm!(a, b, c, F64, |v| v, |v| v, false)
            }
            (CpuStorage::BF16(a), CpuStorage::BF16(b), CpuStorage::BF16(c)) => {
                arm!(a, b, c, BF16, bf16::to_f64, bf16::from_f64, true)
            }
            _ => candle_core::bail!("{name}: f32, f64 or bf16 inputs of one dtype"),
        }
    }};
}

struct GroupNormOp(Geom);

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "fluxflow-group-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = on_cpu_dtype!(self.name(), self.0, (s1, l1), (s2, l2), (s3, l3), fwd_cpu);
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = self.0;
        let y = super::cuda::group_norm_fwd(
            (s1, l1),
            (s2, l2),
            (s3, l3),
            g.b,
            g.c,
            g.s,
            g.groups,
            g.eps,
        )?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.0;
        let packed = x.apply_op3_no_bwd(gamma, &grad.contiguous()?, &GroupNormBwdOp(g))?;
        let n = x.elem_count();
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dgamma = packed.narrow(0, n, g.c)?;
        let dbeta = packed.narrow(0, n + g.c, g.c)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// (x, gamma, dy) -> [dx, dgamma, dbeta] packed (see the module docs).
struct GroupNormBwdOp(Geom);

impl CustomOp3 for GroupNormBwdOp {
    fn name(&self) -> &'static str {
        "fluxflow-group-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = on_cpu_dtype!(self.name(), self.0, (s1, l1), (s2, l2), (s3, l3), bwd_cpu);
        let len = l1.shape().elem_count() + 2 * self.0.c;
        Ok((out, Shape::from(len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = self.0;
        let out = super::cuda::group_norm_bwd(
            (s1, l1),
            (s2, l2),
            (s3, l3),
            g.b,
            g.c,
            g.s,
            g.groups,
            g.eps,
        )?;
        Ok((out, Shape::from(l1.shape().elem_count() + 2 * g.c)))
    }
}

/// Whether the fused op handles `x`.
pub fn supported(x: &Tensor) -> bool {
    super::fused_supported(x)
}

/// GroupNorm of `x` [B, C, ...] in `groups` groups with per-channel `gamma` and `beta` [C]
/// (ones and zeros for no affine transform), all of one dtype.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || groups == 0 || !dims[1].is_multiple_of(groups) {
        candle_core::bail!("group_norm: {groups} groups do not divide the channels of {dims:?}");
    }
    let (b, c) = (dims[0], dims[1]);
    let s: usize = dims[2..].iter().product();
    if gamma.dims() != [c] || beta.dims() != [c] {
        candle_core::bail!(
            "group_norm: gamma {:?} and beta {:?} must be [{c}]",
            gamma.dims(),
            beta.dims()
        );
    }
    let g = Geom {
        b,
        c,
        s,
        groups,
        eps,
    };
    x.contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, GroupNormOp(g))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{check_finite_differences, rel_l2 as rel};
    use candle_core::{Device, Var, D};

    /// The composition `nn::GroupNorm` used before: normalise over the grouped last axis.
    fn composite(x: &Tensor, groups: usize, w: &Tensor, b: &Tensor) -> Tensor {
        let dims = x.dims().to_vec();
        let (bs, c) = (dims[0], dims[1]);
        let s: usize = dims[2..].iter().product();
        let g = x.reshape((bs, groups, c / groups * s)).unwrap();
        let mean = g.mean_keepdim(D::Minus1).unwrap();
        let centred = g.broadcast_sub(&mean).unwrap();
        let var = centred.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let xn = centred
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .reshape(dims.as_slice())
            .unwrap();
        let mut shape = vec![1; dims.len()];
        shape[1] = c;
        xn.broadcast_mul(&w.reshape(shape.as_slice()).unwrap())
            .unwrap()
            .broadcast_add(&b.reshape(shape.as_slice()).unwrap())
            .unwrap()
    }

    #[test]
    fn fused_group_norm_matches_composition_in_value_and_gradients_f64() {
        let dev = Device::Cpu;
        // H != W of different parity, 1x1 images, one channel per group, one group. (1x1 images
        // with three channels per group: with two values a group normalises to +-1 and the
        // gradient is a cancellation of order eps / var, ill-conditioned in any implementation.)
        for (dims, groups) in [
            (&[2usize, 6, 5, 4][..], 3),
            (&[1, 6, 1, 1], 2),
            (&[3, 4, 3, 2], 4),
            (&[2, 8, 7, 3], 1),
            (&[2, 6, 9], 2),
        ] {
            let c = dims[1];
            let x = Var::randn(0f64, 2.0, dims, &dev).unwrap();
            let x = Var::from_tensor(&(x.as_tensor() + 0.5).unwrap()).unwrap();
            let w = Var::randn(1f64, 0.3, c, &dev).unwrap();
            let b = Var::randn(0f64, 0.3, c, &dev).unwrap();
            let ours =
                group_norm(x.as_tensor(), groups, w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
            let theirs = composite(x.as_tensor(), groups, w.as_tensor(), b.as_tensor());
            let e = rel(&ours, &theirs);
            assert!(e < 1e-12, "{dims:?}/{groups}: forward {e:e}");
            let r = Tensor::randn(0f64, 1.0, dims, &dev).unwrap();
            let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, v) in [("x", &x), ("gamma", &w), ("beta", &b)] {
                let e = rel(g1.get(v).unwrap(), g2.get(v).unwrap());
                assert!(e < 1e-10, "{dims:?}/{groups}: {name} gradient {e:e}");
            }
        }
    }

    #[test]
    fn fused_group_norm_gradient_passes_a_finite_difference_check() {
        let dev = Device::Cpu;
        let x = Var::randn(0f64, 1.0, (2, 4, 2, 3), &dev).unwrap();
        let w = Var::randn(1f64, 0.3, 4, &dev).unwrap();
        let b = Var::randn(0f64, 0.3, 4, &dev).unwrap();
        let r = Tensor::randn(0f64, 1.0, (2, 4, 2, 3), &dev).unwrap();
        let loss = |x: &Tensor, w: &Tensor, b: &Tensor| -> Tensor {
            let y = group_norm(x, 2, w, b, 1e-5).unwrap();
            (&y * &r).unwrap().sum_all().unwrap()
        };
        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        let grads = loss(xt, wt, bt).backward().unwrap();
        let s = |t: Tensor| -> f64 { t.to_scalar().unwrap() };
        let fx = |t: &Tensor| s(loss(t, wt, bt));
        let fw = |t: &Tensor| s(loss(xt, t, bt));
        let fb = |t: &Tensor| s(loss(xt, wt, t));
        check_finite_differences(&fx, xt, grads.get(xt).unwrap(), 1e-7, "dx");
        check_finite_differences(&fw, wt, grads.get(wt).unwrap(), 1e-7, "dgamma");
        check_finite_differences(&fb, bt, grads.get(bt).unwrap(), 1e-7, "dbeta");
    }
}
