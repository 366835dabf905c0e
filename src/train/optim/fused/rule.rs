//! What a fused optimizer update computes, shared by its CPU loops (`super::cpu`) and CUDA
//! kernels (`super::cuda`): the rule and its constants, the element types and the element
//! arithmetic in the tensor expressions' order.

use candle_core::{CpuStorage, WithDType};

use super::super::{AdamArgs, RmsPropArgs};

/// The rule a fused update runs, with its constants for the step: what the CUDA kernels take
/// (on the CPU, the rule's closures are built from the same constants).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    RmsProp(RmsPropArgs),
    /// Adam and AdamW (`AdamArgs::DECOUPLED`).
    Adam(AdamArgs),
}

/// At most this many buffers per parameter (RMSprop: square_avg, momentum, grad_avg).
pub(crate) const MAX_BUFFERS: usize = 3;

/// f32 and f64: what the fused loops run on.
pub(crate) trait Elem:
    WithDType
    + Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
{
    fn sqrt(self) -> Self;
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
}

impl Elem for f32 {
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl Elem for f64 {
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
}

/// `v * m + a` as candle's `affine` computes it.
#[inline(always)]
pub(crate) fn affine<T: Elem>(v: T, m: T, a: T) -> T {
    v * m + a
}

/// `torch.lerp(start, end, w)` as `common::lerp` composes it, with `w` and `1 - w` converted;
/// `small`: |w| < 0.5.
#[inline(always)]
pub(crate) fn lerp<T: Elem>(start: T, end: T, small: bool, wt: T, one_minus_wt: T) -> T {
    let zero = T::zero();
    let diff = end - start;
    if small {
        start + affine(diff, wt, zero)
    } else {
        end - affine(diff, one_minus_wt, zero)
    }
}
