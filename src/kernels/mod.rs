//! Custom ops where candle's are slow. On the CPU, candle's transposed convolution (used by the
//! expander and by every convolution's input gradient) is a naive loop; `conv` replaces it with
//! matrix products (per output phase, or with a col2im scatter). On CUDA (`cudnn` feature) every
//! convolution pass runs on cuDNN (`conv::cudnn`), never on candle's naive kernels.
//!
//! Each op keeps its CPU and CUDA halves side by side: the fused ops (`bezier`, `group_norm`,
//! `softmax`) have `cpu_fwd` and `cuda_fwd` in one file, the CUDA half launching the kernels of
//! `cuda/` (`cuda/mod.rs` and its `.cu` sources, compiled by build.rs); the convolutions have
//! `conv/cpu.rs` and `conv/cudnn.rs` under `conv/mod.rs`, which chooses.

pub mod attention;
pub mod bezier;
pub mod conv;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub mod group_norm;
pub mod softmax;

pub use conv::{conv2d, conv_transpose2d};

use candle_core::{DType, Layout, Result, Tensor};

/// The environment variable that turns on the CUDA paths built since the last GPU verification
/// (`scripts/gpu-check.sh` on a GPU): the one-launch optimizer update, EMA and gradient norm
/// (`train::optim::fused::cuda`) and the chunked attention's op in training
/// ([`attention::attention`]). Off (unset, `0`, `off`, `false`), CUDA runs the paths that
/// passed the last GPU run (the tensor expressions, the whole score matrix); `1`, `on` or
/// `true` turns them on. The CPU is not affected.
pub const UNVERIFIED_CUDA_ENV: &str = "FLUXFLOW_CUDA_UNVERIFIED";

/// The switch's value for `v`: `Some(true)` for `1`/`on`/`true`, `Some(false)` for
/// `0`/`off`/`false` or empty, `None` for anything else.
pub fn parse_switch(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "on" | "true" => Some(true),
        "" | "0" | "off" | "false" => Some(false),
        _ => None,
    }
}

/// Whether [`UNVERIFIED_CUDA_ENV`] turns the unverified CUDA paths on (read once; a value
/// [`parse_switch`] does not take counts as off, and the binary refuses it at start-up).
pub fn unverified_cuda_paths() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var(UNVERIFIED_CUDA_ENV)
            .ok()
            .and_then(|v| parse_switch(&v))
            .unwrap_or(false)
    })
}

/// A raw pointer that parallel loops share to write disjoint elements of one buffer.
///
/// Every dereference is `unsafe` and its SAFETY comment must show: the pointer is valid for the
/// element it touches (inside the allocation, which outlives the parallel loop), and no two
/// threads touch the same element (each task owns a disjoint set of indices), so each element
/// is accessed as through its own `&mut T`. That is the access that splitting a `&mut [T]` into
/// disjoint `&mut` parts hands to other threads, which is `Send` (and so usable from a
/// shared `Sync` closure) exactly when `T: Send`: a value written by a worker thread ends up
/// owned by the thread that owns the buffer. Hence the `T: Send` bound on both impls. Reading
/// one element from several threads at once is not what this type is for (it would need
/// `T: Sync`); nothing does that.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: see the type's documentation: moving the pointer to another thread only lets that
// thread (in `unsafe` code that proves disjointness) move `T` values into or out of elements
// that no other thread touches, which is sound for `T: Send`.
unsafe impl<T: Send> Send for SendPtr<T> {}
// SAFETY: a shared `&SendPtr<T>` only gives out copies of the pointer (`get`); what the threads
// then do with it is the disjoint, per-element exclusive access above, sound for `T: Send`.
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not its field).
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// Runs `f` on `x` in float32 where `x` is a 16-bit float (statistics and reductions that
/// bfloat16 would round away), and casts the result back.
pub fn in_f32(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    match x.dtype() {
        DType::BF16 | DType::F16 => f(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype()),
        _ => f(x),
    }
}

/// Whether the CPU kernels fill the buffers they allocate without zeroing with NaN before
/// writing them: under `cfg(test)` they do, so a read before a write shows in the tests' exact
/// results; `FLUXFLOW_NO_POISON` (set by `scripts/memcheck.sh`) turns that off, so such a read
/// is a read of never-written memory that valgrind reports. Outside the tests: never.
pub(crate) fn poison_uninit() -> bool {
    cfg!(test) && std::env::var_os("FLUXFLOW_NO_POISON").is_none()
}

/// The part of a CPU storage's data that a contiguous layout describes.
pub(crate) fn contiguous<'a, T>(data: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// The part of a CUDA storage a contiguous layout describes, as a typed view.
#[cfg(feature = "cudnn")]
pub(crate) fn cuda_view<'a, T: candle_core::cuda_backend::CudaDType>(
    st: &'a candle_core::CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: input must be contiguous")))?;
    Ok(st.as_cuda_slice::<T>()?.slice(a..b))
}

/// Whether the fused ops (Bezier activation, GroupNorm, softmax) handle `x`: f32, f64 or bf16,
/// on the CPU or (with the `cuda` feature) on CUDA.
pub(crate) fn fused_supported(x: &Tensor) -> bool {
    // float16 only on CUDA (mixed precision's fp16): the CPU halves have no float16 arm.
    let cpu = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64 | DType::BF16);
    let cuda = cfg!(feature = "cuda")
        && x.device().is_cuda()
        && matches!(
            x.dtype(),
            DType::F32 | DType::F64 | DType::BF16 | DType::F16
        );
    cpu || cuda
}

/// ||a - b|| / ||b|| (||a - b|| where b is zero), for the kernels' tests (f64 tensors).
#[cfg(test)]
pub(crate) fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let d: f64 = (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    let n: f64 = b.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
    if n == 0.0 {
        d.sqrt()
    } else {
        (d / n).sqrt()
    }
}

/// Checks `grad`, the analytic gradient of `f` at `x` (f64), against central differences
/// (step 1e-6): |numeric - analytic| <= tol * (1 + |numeric|) for every element.
#[cfg(test)]
pub(crate) fn check_finite_differences(
    f: &dyn Fn(&Tensor) -> f64,
    x: &Tensor,
    grad: &Tensor,
    tol: f64,
    what: &str,
) {
    let g = grad.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let base = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    for i in 0..base.len() {
        let at = |d: f64| {
            let mut v = base.clone();
            v[i] += d;
            Tensor::from_vec(v, x.dims(), x.device()).unwrap()
        };
        let fd = (f(&at(1e-6)) - f(&at(-1e-6))) / 2e-6;
        assert!(
            (fd - g[i]).abs() <= tol * (1.0 + fd.abs()),
            "{what}, element {i}: analytic {} numeric {fd}",
            g[i]
        );
    }
}

#[cfg(test)]
mod switch_tests {
    use super::parse_switch;

    #[test]
    fn the_unverified_cuda_switch_takes_on_and_off_words_only() {
        for v in ["1", "on", "ON", "true", " True "] {
            assert_eq!(parse_switch(v), Some(true), "{v:?}");
        }
        for v in ["", "0", "off", "false", "OFF"] {
            assert_eq!(parse_switch(v), Some(false), "{v:?}");
        }
        for v in ["yes", "2", "of"] {
            assert_eq!(parse_switch(v), None, "{v:?}");
        }
    }
}
