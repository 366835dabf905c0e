//! The optimizer update as one pass over a parameter's elements on the CPU.
//!
//! The tensor expressions of each [`UpdateRule`](super::UpdateRule) read and write every
//! parameter-sized tensor once per op: a centered RMSprop with momentum is about fifteen passes
//! and as many fresh tensors per parameter, 1.5 s of a Phase 1 step on two cores. Here the
//! gradient's scaling (clipping), the rule and the buffers' update happen in one loop: the
//! parameter is updated in place (as `Var::set` would copy it), each buffer is written once into
//! a new tensor (so a tensor handed out earlier by `state_tensors` keeps its values).
//!
//! Each element goes through the same IEEE operations, in the same order and precision, as the
//! tensor expressions (`affine(m, a)` is `v * m + a` with `m`, `a` converted to the element type),
//! so the results are bit-identical to them; the tests in `cpu.rs` check that for every rule
//! and variant. `rule.rs` holds what both halves compute, `cpu.rs` the CPU loops, `cuda.rs` the
//! CUDA launches; this file chooses between them.
//!
//! On CUDA (the `cuda` feature) the same passes are one kernel launch per parameter tensor
//! (`cuda.rs`, `src/kernels/cuda/optim.cu`) where the tensor expressions launch about fifteen; the kernels round every operation on its own as the CPU does, so they agree with the
//! CPU loops bit for bit (`tests/gpu.rs` checks it on a GPU). Those kernels have not yet run on
//! a GPU: they are used only when `FLUXFLOW_CUDA_UNVERIFIED` is on
//! ([`crate::kernels::unverified_cuda_paths`]); otherwise CUDA tensors take the tensor
//! expressions (`update` returns `Ok(false)`, `ema` and `sum_squares` `None`).

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod rule;

use candle_core::{DType, Device, Tensor, Var};

pub use rule::Rule;
pub(crate) use rule::{affine, lerp, Elem, MAX_BUFFERS};

use super::Buffers;

/// Updates `var` in place from `grad` (times `scale` when given, as `grad * scale`) and the
/// buffers `names` (absent ones start at zero), with `f(param, grad, buffers) -> new param`
/// updating the buffers in place; the buffers' new values replace them in `buffers`.
///
/// On CUDA, `rule` is what the kernel runs (the closures are the CPU's form of it).
///
/// Returns `Ok(false)` without touching anything when a tensor is not a contiguous tensor of the
/// parameter's dtype (f32 or f64) on the parameter's device (the CPU, or CUDA with the `cuda`
/// feature): the caller then runs the tensor expressions.
#[allow(clippy::too_many_arguments)]
pub(super) fn update<F32, F64>(
    var: &Var,
    grad: &Tensor,
    scale: Option<f64>,
    names: &[&'static str],
    buffers: &mut Buffers,
    rule: Rule,
    f32_rule: F32,
    f64_rule: F64,
) -> candle_core::Result<bool>
where
    F32: Fn(f32, f32, &mut [f32; MAX_BUFFERS]) -> f32 + Sync,
    F64: Fn(f64, f64, &mut [f64; MAX_BUFFERS]) -> f64 + Sync,
{
    if var.device().is_cuda() {
        #[cfg(feature = "cuda")]
        if crate::kernels::unverified_cuda_paths() {
            return cuda::update(var, grad, scale, names, buffers, rule);
        }
        return Ok(false);
    }
    let _ = rule;
    match var.dtype() {
        DType::F32 => cpu::update_as::<f32, _>(var, grad, scale, names, buffers, f32_rule),
        DType::F64 => cpu::update_as::<f64, _>(var, grad, scale, names, buffers, f64_rule),
        _ => Ok(false),
    }
}

/// `shadow * decay + param * (1 - decay)` as `Ema::update` composes it, in one pass into a new
/// tensor (one kernel on CUDA), or `None` when the tensors are not contiguous tensors of one
/// dtype (f32, f64) on one device.
pub fn ema(shadow: &Tensor, param: &Tensor, decay: f64) -> candle_core::Result<Option<Tensor>> {
    if shadow.device().is_cuda() {
        #[cfg(feature = "cuda")]
        if crate::kernels::unverified_cuda_paths() {
            return cuda::ema(shadow, param, decay);
        }
        return Ok(None);
    }
    match shadow.dtype() {
        DType::F32 => cpu::ema_as::<f32>(shadow, param, decay),
        DType::F64 => cpu::ema_as::<f64>(shadow, param, decay),
        _ => Ok(None),
    }
}

/// The sum of the squares of all the tensors' elements as a scalar f64 tensor on their device,
/// accumulated in f64: on the CPU each tensor in fixed chunks summed in order (the same result
/// for any thread count), on CUDA one kernel per tensor into one accumulator. `None` when a
/// tensor is not a contiguous f32/f64 tensor on the first one's device (or there are none).
pub fn sum_squares(ts: &[&Tensor]) -> candle_core::Result<Option<Tensor>> {
    let Some(first) = ts.first() else {
        return Ok(None);
    };
    if !ts.iter().all(|t| t.device().same_device(first.device())) {
        return Ok(None);
    }
    if first.device().is_cuda() {
        #[cfg(feature = "cuda")]
        if crate::kernels::unverified_cuda_paths() {
            return cuda::sum_squares(ts);
        }
        return Ok(None);
    }
    let parts: Option<Vec<f64>> = ts.iter().map(|t| cpu::sum_squares_cpu(t)).collect();
    parts
        .map(|p| Tensor::new(p.iter().sum::<f64>(), &Device::Cpu))
        .transpose()
}
