//! The fused Bezier activation: one op in place of the fifteen element-wise ops of the
//! composition in `model::bezier`, so the autograd graph keeps only the input (the backward pass
//! recomputes the curve) instead of some fifteen tensors the size of the input.
//!
//! The input is viewed as [G, 5, S]: group g's five channels (t, p0, p1, p2, p3) over S
//! positions; the output is [G, S]. The forward pass evaluates in the composition's order, so
//! the two agree to the last bits. CPU loops run in parallel over groups; CUDA (`cuda` feature)
//! runs `src/kernels/cuda/fused.cu`. Arithmetic in f32 for f32/bf16, f64 for f64.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::contiguous;
use half::bf16;
use rayon::prelude::*;

/// A pre-activation applied to t or to the control points before the curve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreAct {
    Sigmoid,
    Silu,
    Tanh,
    None,
}

impl PreAct {
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            PreAct::Sigmoid => candle_nn::ops::sigmoid(x),
            PreAct::Silu => x.silu(),
            PreAct::Tanh => x.tanh(),
            PreAct::None => Ok(x.clone()),
        }
    }
}

/// The pre-activation code of `fused.cu`.
#[cfg(feature = "cuda")]
fn code(p: PreAct) -> i32 {
    match p {
        PreAct::Sigmoid => 0,
        PreAct::Silu => 1,
        PreAct::Tanh => 2,
        PreAct::None => 3,
    }
}

/// The float arithmetic the loops need, for f32 and f64.
trait Real:
    Copy
    + Send
    + Sync
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
{
    const ONE: Self;
    const TWO: Self;
    const THREE: Self;
    fn exp(self) -> Self;
    fn tanh(self) -> Self;
}

macro_rules! real {
    ($t:ty) => {
        impl Real for $t {
            const ONE: Self = 1.0;
            const TWO: Self = 2.0;
            const THREE: Self = 3.0;
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
        }
    };
}
real!(f32);
real!(f64);

#[inline(always)]
fn sig<A: Real>(x: A) -> A {
    A::ONE / ((-x).exp() + A::ONE)
}

/// The pre-activation, as candle computes it.
#[inline(always)]
fn pre<A: Real>(kind: PreAct, x: A) -> A {
    match kind {
        PreAct::Sigmoid => sig(x),
        PreAct::Silu => x / (A::ONE + (-x).exp()),
        PreAct::Tanh => x.tanh(),
        PreAct::None => x,
    }
}

/// The pre-activation and its derivative.
#[inline(always)]
fn pre_d<A: Real>(kind: PreAct, x: A) -> (A, A) {
    match kind {
        PreAct::Sigmoid => {
            let s = sig(x);
            (s, s * (A::ONE - s))
        }
        PreAct::Silu => {
            let s = sig(x);
            (x * s, s * (A::ONE + x * (A::ONE - s)))
        }
        PreAct::Tanh => {
            let t = x.tanh();
            (t, A::ONE - t * t)
        }
        PreAct::None => (x, A::ONE),
    }
}

/// The curve in the composition's operation order.
#[inline(always)]
fn curve<A: Real>(t: A, p: [A; 4]) -> A {
    let t2 = t * t;
    let t3 = t2 * t;
    let ti = A::ONE - t;
    let ti2 = ti * ti;
    let ti3 = ti2 * ti;
    let out = ti3 * p[0] + (ti2 * t) * (p[1] * A::THREE);
    let out = out + (ti * t2) * (p[2] * A::THREE);
    out + t3 * p[3]
}

/// x [G, 5, S] -> y [G, S]; `None` when x's length is not a whole number of groups.
fn fwd_cpu<T: Copy + Send + Sync, A: Real>(
    x: &[T],
    s: usize,
    op: &BezierOp,
    to: impl Fn(T) -> A + Sync,
    from: impl Fn(A) -> T + Sync,
) -> Option<Vec<T>> {
    if s == 0 || !x.len().is_multiple_of(5 * s) {
        return None;
    }
    let n = x.len() / 5;
    // Written through its spare capacity (no zeroing pass), its length set once all of it is.
    let mut y: Vec<T> = Vec::with_capacity(n);
    y.spare_capacity_mut()[..n]
        .par_chunks_mut(s)
        .zip(x.par_chunks(5 * s))
        .for_each(|(yg, xg)| {
            for (j, o) in yg.iter_mut().enumerate() {
                let t = pre(op.t_pre, to(xg[j]));
                let p = [1, 2, 3, 4].map(|i| pre(op.p_pre, to(xg[i * s + j])));
                o.write(from(curve(t, p)));
            }
        });
    // SAFETY: y's capacity is at least n; the n spare elements split into n / s chunks of s,
    // each zipped with one of x's n / s groups of 5s (x.len() == 5n, checked above), so the
    // zip drops no chunk; every chunk's s elements are written by the loop over j. The loop
    // returned (a panic in a task would have unwound past this point), so all n are
    // initialised.
    unsafe { y.set_len(n) };
    Some(y)
}

/// (x [G, 5, S], dy [G, S]) -> dx [G, 5, S]; `None` when the lengths do not fit.
fn bwd_cpu<T: Copy + Send + Sync, A: Real>(
    x: &[T],
    dy: &[T],
    s: usize,
    op: &BezierOp,
    to: impl Fn(T) -> A + Sync,
    from: impl Fn(A) -> T + Sync,
) -> Option<Vec<T>> {
    if s == 0 || !x.len().is_multiple_of(5 * s) || dy.len() * 5 != x.len() {
        return None;
    }
    let n = x.len();
    let mut dx: Vec<T> = Vec::with_capacity(n);
    dx.spare_capacity_mut()[..n]
        .par_chunks_mut(5 * s)
        .zip(x.par_chunks(5 * s))
        .zip(dy.par_chunks(s))
        .for_each(|((dxg, xg), dyg)| {
            for j in 0..s {
                let g = to(dyg[j]);
                let (t, dt) = pre_d(op.t_pre, to(xg[j]));
                let pd = [1, 2, 3, 4].map(|i| pre_d(op.p_pre, to(xg[i * s + j])));
                let p = pd.map(|(v, _)| v);
                let (ti, t2) = (A::ONE - t, t * t);
                let ti2 = ti * ti;
                let dcurve = A::THREE
                    * (-(ti2 * p[0])
                        + (ti2 - A::TWO * ti * t) * p[1]
                        + (A::TWO * ti * t - t2) * p[2]
                        + t2 * p[3]);
                dxg[j].write(from(g * dcurve * dt));
                dxg[s + j].write(from(g * ti2 * ti * pd[0].1));
                dxg[2 * s + j].write(from(g * A::THREE * ti2 * t * pd[1].1));
                dxg[3 * s + j].write(from(g * A::THREE * ti * t2 * pd[2].1));
                dxg[4 * s + j].write(from(g * t2 * t * pd[3].1));
            }
        });
    // SAFETY: dx's capacity is at least n; its n spare elements split into G = n / 5s chunks of
    // 5s, zipped with x's G groups of 5s and dy's G groups of s (lengths checked above), so no
    // chunk is dropped; in each, j in 0..s writes elements j, s + j, .., 4s + j: all 5s of them.
    // The loop returned, so all n are initialised.
    unsafe { dx.set_len(n) };
    Some(dx)
}

/// The fused forward pass: x [.., 5 per group, S] -> y [G, S] with `out` as its shape.
#[derive(Debug, Clone)]
struct BezierOp {
    t_pre: PreAct,
    p_pre: PreAct,
    /// Positions per group.
    s: usize,
    /// The output's shape.
    out: Shape,
}

impl CustomOp1 for BezierOp {
    fn name(&self) -> &'static str {
        "fluxflow-bezier"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let s = self.s;
        let bad = || candle_core::Error::Msg(format!("{}: input not [G, 5, {s}]", self.name()));
        let out = match st {
            CpuStorage::F32(x) => CpuStorage::F32(
                fwd_cpu(contiguous(x, l, self.name())?, s, self, |v| v, |v| v).ok_or_else(bad)?,
            ),
            CpuStorage::F64(x) => CpuStorage::F64(
                fwd_cpu(contiguous(x, l, self.name())?, s, self, |v| v, |v| v).ok_or_else(bad)?,
            ),
            CpuStorage::BF16(x) => CpuStorage::BF16(
                fwd_cpu(
                    contiguous(x, l, self.name())?,
                    s,
                    self,
                    bf16::to_f32,
                    bf16::from_f32,
                )
                .ok_or_else(bad)?,
            ),
            _ => candle_core::bail!("{}: f32, f64 or bf16 input", self.name()),
        };
        Ok((out, self.out.clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        st: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = super::cuda::bezier_fwd(st, l, self.s, code(self.t_pre), code(self.p_pre))?;
        Ok((y, self.out.clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = BezierBwdOp(self.clone());
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

/// The backward pass: (x, dy) -> dx, recomputing the curve from x.
struct BezierBwdOp(BezierOp);

impl CustomOp2 for BezierBwdOp {
    fn name(&self) -> &'static str {
        "fluxflow-bezier-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (op, s, name) = (&self.0, self.0.s, self.name());
        let bad =
            || candle_core::Error::Msg(format!("{name}: x not [G, 5, {s}] or dy not [G, {s}]"));
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(dy)) => CpuStorage::F32(
                bwd_cpu(
                    contiguous(x, l1, name)?,
                    contiguous(dy, l2, name)?,
                    s,
                    op,
                    |v| v,
                    |v| v,
                )
                .ok_or_else(bad)?,
            ),
            (CpuStorage::F64(x), CpuStorage::F64(dy)) => CpuStorage::F64(
                bwd_cpu(
                    contiguous(x, l1, name)?,
                    contiguous(dy, l2, name)?,
                    s,
                    op,
                    |v| v,
                    |v| v,
                )
                .ok_or_else(bad)?,
            ),
            (CpuStorage::BF16(x), CpuStorage::BF16(dy)) => CpuStorage::BF16(
                bwd_cpu(
                    contiguous(x, l1, name)?,
                    contiguous(dy, l2, name)?,
                    s,
                    op,
                    bf16::to_f32,
                    bf16::from_f32,
                )
                .ok_or_else(bad)?,
            ),
            _ => candle_core::bail!("{name}: f32, f64 or bf16 inputs of one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let op = &self.0;
        let dx = super::cuda::bezier_bwd(s1, l1, s2, l2, op.s, code(op.t_pre), code(op.p_pre))?;
        Ok((dx, l1.shape().clone()))
    }
}

/// Whether the fused op handles `x`'s dtype and device.
pub fn supported(x: &Tensor) -> bool {
    super::fused_supported(x)
}

/// The Bezier activation of `x` grouped as [G, 5, S] (contiguous order), giving `out`
/// ([G, S] elements) with the given pre-activations.
pub fn bezier(x: &Tensor, t_pre: PreAct, p_pre: PreAct, s: usize, out: Shape) -> Result<Tensor> {
    if s == 0 || x.elem_count() != out.elem_count() * 5 {
        candle_core::bail!(
            "Bezier activation: input {:?} does not give output {out:?}",
            x.dims()
        );
    }
    x.contiguous()?.apply_op1(BezierOp {
        t_pre,
        p_pre,
        s,
        out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{check_finite_differences, rel_l2 as rel};
    use crate::model::BezierActivation;
    use candle_core::{DType, Device, Var};

    const KINDS: [PreAct; 4] = [PreAct::Sigmoid, PreAct::Silu, PreAct::Tanh, PreAct::None];

    #[test]
    fn fused_matches_composition_in_value_and_gradient_f64() {
        let dev = Device::Cpu;
        // 4-D with H != W of different parity, 1x1 images, one group; 2-D and 3-D (last axis).
        let shapes: [&[usize]; 6] = [
            &[2, 10, 3, 4],
            &[1, 5, 1, 1],
            &[3, 15, 5, 2],
            &[2, 5, 2, 3, 2],
            &[4, 10],
            &[2, 3, 15],
        ];
        for dims in shapes {
            for t_pre in KINDS {
                for p_pre in KINDS {
                    let act = BezierActivation::new(t_pre, p_pre);
                    let x = Var::randn(0f64, 1.5, dims, &dev).unwrap();
                    let fused = act.forward(x.as_tensor()).unwrap();
                    let comp = act.forward_composite(x.as_tensor()).unwrap();
                    assert_eq!(fused.dims(), comp.dims());
                    let e = rel(&fused, &comp);
                    assert!(e < 1e-12, "{dims:?} {t_pre:?}/{p_pre:?}: forward {e:e}");
                    let r = Tensor::randn(0f64, 1.0, comp.dims(), &dev).unwrap();
                    let g1 = (&fused * &r)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    let g2 = (&comp * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    let (a, b) = (g1.get(&x).unwrap(), g2.get(&x).unwrap());
                    let e = rel(a, b);
                    assert!(e < 1e-10, "{dims:?} {t_pre:?}/{p_pre:?}: gradient {e:e}");
                }
            }
        }
    }

    #[test]
    fn fused_gradient_passes_a_finite_difference_check() {
        let dev = Device::Cpu;
        for (t_pre, p_pre) in [
            (PreAct::Sigmoid, PreAct::Silu),
            (PreAct::Silu, PreAct::Tanh),
        ] {
            let act = BezierActivation::new(t_pre, p_pre);
            let x = Var::randn(0f64, 1.0, (1, 10, 2, 3), &dev).unwrap();
            let r = Tensor::randn(0f64, 1.0, (1, 2, 2, 3), &dev).unwrap();
            let loss = |x: &Tensor| (&act.forward(x).unwrap() * &r).unwrap().sum_all().unwrap();
            let f = |x: &Tensor| -> f64 { loss(x).to_scalar().unwrap() };
            let g = loss(x.as_tensor()).backward().unwrap();
            let what = format!("{t_pre:?}/{p_pre:?}");
            check_finite_differences(&f, x.as_tensor(), g.get(&x).unwrap(), 1e-7, &what);
        }
    }

    #[test]
    fn bf16_follows_f32() {
        let dev = Device::Cpu;
        let act = BezierActivation::VAE;
        let x = Tensor::randn(0f32, 1.0, (2, 10, 3, 5), &dev).unwrap();
        let y32 = act.forward(&x).unwrap();
        let y16 = act
            .forward(&x.to_dtype(DType::BF16).unwrap())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let e = rel(
            &y16.to_dtype(DType::F64).unwrap(),
            &y32.to_dtype(DType::F64).unwrap(),
        );
        assert!(e < 1e-2, "bf16 relative error {e:e}");
    }
}
