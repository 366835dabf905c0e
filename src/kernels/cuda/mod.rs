//! Launches fluxflow's own CUDA kernels (`src/kernels/cuda/*.cu`, compiled to PTX by build.rs)
//! on candle's CUDA storages: the `cuda_fwd` halves of the fused ops in this module's siblings.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result};
use half::{bf16, f16};

pub(crate) mod ptx {
    include!(concat!(env!("OUT_DIR"), "/fluxflow_ptx.rs"));
}

const MODULE: &str = "fluxflow_fused";

/// A grid-stride launch over `n` elements.
pub(crate) fn launch_cfg(n: usize) -> LaunchConfig {
    const THREADS: u32 = 256;
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 65_535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

use super::cuda_view as view;

fn suffix(dtype: DType, what: &str) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        d => candle_core::bail!("{what}: no CUDA kernel for {d:?}"),
    })
}

/// Runs `$body` with `$t` the element type of `$dtype` (f32, f64, bf16 or f16) and wraps the slice
/// it returns as a storage on `$dev`.
macro_rules! by_dtype {
    ($dtype:expr, $what:expr, $dev:expr, |$t:ident| $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                CudaStorage::wrap_cuda_slice($body, $dev)
            }
            DType::F64 => {
                type $t = f64;
                CudaStorage::wrap_cuda_slice($body, $dev)
            }
            DType::BF16 => {
                type $t = bf16;
                CudaStorage::wrap_cuda_slice($body, $dev)
            }
            DType::F16 => {
                type $t = f16;
                CudaStorage::wrap_cuda_slice($body, $dev)
            }
            d => candle_core::bail!("{}: no CUDA kernel for {d:?}", $what),
        }
    };
}

/// The fused Bezier activation's forward pass: x [G, 5, S] -> y [G, S].
pub fn bezier_fwd(st: &CudaStorage, l: &Layout, s: usize, tk: i32, pk: i32) -> Result<CudaStorage> {
    let dev = st.device().clone();
    let n = l.shape().elem_count() / 5;
    // The kernel writes y[i] for i < groups * s: all n of them only if s divides n.
    if s == 0 || n * 5 != l.shape().elem_count() || !n.is_multiple_of(s) {
        candle_core::bail!("Bezier activation: {:?} is not [G, 5, {s}]", l.shape());
    }
    let groups = (n / s) as u64;
    let name = format!("bezier_fwd_{}", suffix(st.dtype(), "Bezier activation")?);
    fn go<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        x: CudaView<T>,
        n: usize,
        args: (u64, u64, i32, i32),
    ) -> Result<CudaSlice<T>> {
        let func = dev.get_or_load_custom_func(name, MODULE, ptx::FUSED)?;
        // SAFETY: `alloc` leaves the memory uninitialised; y is returned empty (n == 0) or
        // after the kernel below has written every element (its grid-stride loop runs i over
        // 0..groups * s == n); an error drops it unread.
        let y = unsafe { dev.alloc::<T>(n)? };
        if n == 0 {
            return Ok(y);
        }
        let mut b = func.builder();
        b.arg(&x);
        b.arg(&y);
        b.arg(&args.0);
        b.arg(&args.1);
        b.arg(&args.2);
        b.arg(&args.3);
        // SAFETY: argument types and order match bezier_fwd_* in fused.cu (const T *x, T *y,
        // u64 groups, u64 s, i32, i32); it reads x below groups * 5s == x.len() and writes y
        // below groups * s == n == y.len(), each y[i] from one thread.
        unsafe { b.launch(launch_cfg(n)) }.w()?;
        Ok(y)
    }
    let args = (groups, s as u64, tk, pk);
    let what = "Bezier activation";
    Ok(by_dtype!(st.dtype(), what, dev, |T| {
        go::<T>(&dev, &name, view(st, l, what)?, n, args)?
    }))
}

/// The fused Bezier activation's backward pass: (x [G, 5, S], dy [G, S]) -> dx [G, 5, S].
pub fn bezier_bwd(
    x: &CudaStorage,
    lx: &Layout,
    dy: &CudaStorage,
    ldy: &Layout,
    s: usize,
    tk: i32,
    pk: i32,
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let n = lx.shape().elem_count();
    if ldy.shape().elem_count() * 5 != n {
        candle_core::bail!(
            "Bezier backward: gradient {:?} does not fit {:?}",
            ldy.shape(),
            lx.shape()
        );
    }
    // The kernel writes dx for the groups * 5s first elements: all n only if s divides n / 5.
    if s == 0 || !(n / 5).is_multiple_of(s) {
        candle_core::bail!("Bezier backward: {:?} is not [G, 5, {s}]", lx.shape());
    }
    let groups = (n / 5 / s) as u64;
    let name = format!("bezier_bwd_{}", suffix(x.dtype(), "Bezier backward")?);
    fn go<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        x: CudaView<T>,
        dy: CudaView<T>,
        n: usize,
        args: (u64, u64, i32, i32),
    ) -> Result<CudaSlice<T>> {
        let func = dev.get_or_load_custom_func(name, MODULE, ptx::FUSED)?;
        // SAFETY: `alloc` leaves the memory uninitialised; dx is returned empty (n == 0) or
        // after the kernel below has written every element (thread i < groups * s writes
        // elements g*5s + j + {0, s, .., 4s}: all of 0..groups * 5s == n); an error drops it
        // unread.
        let dx = unsafe { dev.alloc::<T>(n)? };
        if n == 0 {
            return Ok(dx);
        }
        let mut b = func.builder();
        b.arg(&x);
        b.arg(&dy);
        b.arg(&dx);
        b.arg(&args.0);
        b.arg(&args.1);
        b.arg(&args.2);
        b.arg(&args.3);
        // SAFETY: argument types and order match bezier_bwd_* in fused.cu (const T *x,
        // const T *dy, T *dx, u64 groups, u64 s, i32, i32); it reads x and writes dx below
        // groups * 5s == n (their lengths), reads dy below groups * s == n / 5 (its length,
        // checked by the caller), each dx element from one thread.
        unsafe { b.launch(launch_cfg(n / 5)) }.w()?;
        Ok(dx)
    }
    let args = (groups, s as u64, tk, pk);
    let what = "Bezier backward";
    Ok(by_dtype!(x.dtype(), what, dev, |T| {
        go::<T>(
            &dev,
            &name,
            view(x, lx, what)?,
            view(dy, ldy, what)?,
            n,
            args,
        )?
    }))
}

/// Softmax over the last axis with candle's CUDA kernel (one warp per row, float32
/// accumulation for 16-bit inputs).
pub fn softmax_last_dim(st: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    use candle_core::cuda_backend::{kernel_name, kernels};
    let dev = st.device().clone();
    let n_cols = l.dims().last().copied().unwrap_or(1).max(1);
    let el = l.shape().elem_count();
    let n_rows = el / n_cols;
    // One block per row (grid.x at most 2^31 - 1) and the row length as an i32.
    if n_rows > i32::MAX as usize || n_cols > i32::MAX as usize {
        candle_core::bail!("softmax: {:?} too large for one launch", l.shape());
    }
    fn go<T: CudaDType + DeviceRepr + candle_core::WithDType>(
        dev: &CudaDevice,
        x: CudaView<T>,
        el: usize,
        n_rows: usize,
        n_cols: usize,
    ) -> Result<CudaSlice<T>> {
        let func = dev.get_or_load_func(&kernel_name::<T>("softmax"), &kernels::REDUCE)?;
        // SAFETY: `alloc` leaves the memory uninitialised; y is returned empty (el == 0) or
        // after candle's softmax kernel wrote every element (block r writes row r's n_cols
        // elements, for all n_rows == el / n_cols rows); an error drops it unread.
        let y = unsafe { dev.alloc::<T>(el)? };
        if el == 0 {
            return Ok(y);
        }
        let cfg = LaunchConfig {
            grid_dim: (n_rows as u32, 1, 1),
            block_dim: (1, 32, 1),
            shared_mem_bytes: 0,
        };
        let mut b = func.builder();
        b.arg(&x);
        b.arg(&y);
        let n = n_cols as i32;
        b.arg(&n);
        // SAFETY: the argument list of candle's softmax kernel (const T *x, T *dst, i32
        // ncols) with its launch shape (one 32-thread block per row, as candle-nn launches
        // it): rows r < n_rows of n_cols elements, within x and y (el each).
        unsafe { b.launch(cfg) }.w()?;
        Ok(y)
    }
    let what = "softmax";
    Ok(by_dtype!(st.dtype(), "softmax", dev, |T| {
        go::<T>(&dev, view(st, l, what)?, el, n_rows, n_cols)?
    }))
}

/// Launch shape of the GroupNorm kernels: one grid row per (b, c) plane of `s` elements,
/// chunks of 256 threads x 16 elements along it.
fn gn_cfg(planes: usize, s: usize) -> LaunchConfig {
    const THREADS: u32 = 256;
    let chunks = s.div_ceil(THREADS as usize * 16).clamp(1, 1024) as u32;
    LaunchConfig {
        grid_dim: (planes.max(1) as u32, chunks, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

type Arg<'a> = (&'a CudaStorage, &'a Layout);

/// Checks what the GroupNorm kernels index by: `groups` divides `c` (`gn_row`), x (and dy)
/// hold b*c*s elements, gamma (and beta) c, and the b*c planes fit a grid's x dimension.
fn gn_check(
    (b, c, s, groups): (usize, usize, usize, usize),
    x: usize,
    params: &[usize],
    what: &str,
) -> Result<()> {
    if groups == 0
        || !c.is_multiple_of(groups)
        || x != b * c * s
        || params.iter().any(|p| *p != c)
        || b * c > i32::MAX as usize
    {
        candle_core::bail!(
            "{what}: {x} values, {params:?} parameters do not fit {b}x{c}x{s}, {groups} groups"
        );
    }
    Ok(())
}

/// The per-(b, g) row statistics (4 doubles each; the first two filled: sum x and
/// sum (x - mean)^2) of GroupNorm's input.
fn gn_stats<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    sfx: &str,
    (b, c, s, groups): (usize, usize, usize, usize),
) -> Result<CudaSlice<f64>> {
    let row = dev.alloc_zeros::<f64>(4 * b * groups)?;
    if b * c * s == 0 {
        // Nothing to sum; and gn_cfg launches at least one block, which would index plane 0.
        return Ok(row);
    }
    let func = dev.get_or_load_custom_func(&format!("gn_stats_{sfx}"), MODULE, ptx::FUSED)?;
    for pass in [0i32, 1] {
        let mut l = func.builder();
        let (cc, ss, gg) = (c as u64, s as u64, groups as u64);
        l.arg(x);
        l.arg(&row);
        l.arg(&cc);
        l.arg(&ss);
        l.arg(&gg);
        l.arg(&pass);
        // SAFETY: argument types and order match gn_stats_* in fused.cu; its indices: x below
        // b*c*s and row below 4*b*groups (gn_check'ed by the callers: groups divides c).
        unsafe { l.launch(gn_cfg(b * c, s)) }.w()?;
    }
    Ok(row)
}

/// GroupNorm's forward pass: y = (x - mean) * rstd * gamma + beta.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_fwd(
    x: Arg,
    gamma: Arg,
    beta: Arg,
    b: usize,
    c: usize,
    s: usize,
    groups: usize,
    eps: f64,
) -> Result<CudaStorage> {
    let dev = x.0.device().clone();
    let sfx = suffix(x.0.dtype(), "GroupNorm")?;
    fn go<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        sfx: &str,
        (x, w, bb): (CudaView<T>, CudaView<T>, CudaView<T>),
        geom: (usize, usize, usize, usize),
        eps: f64,
    ) -> Result<CudaSlice<T>> {
        let (b, c, s, groups) = geom;
        let n = b * c * s;
        gn_check(geom, x.len(), &[w.len(), bb.len()], "GroupNorm")?;
        // SAFETY: `alloc` leaves the memory uninitialised; y is returned with one unread
        // element for n == 0 (the tensor has none), or after gn_fwd wrote all n (block
        // (plane, chunk) strides j over 0..s for each of the b*c planes); an error drops it
        // unread.
        let y = unsafe { dev.alloc::<T>(n.max(1))? };
        if n == 0 {
            return Ok(y);
        }
        let row = gn_stats(dev, &x, sfx, geom)?;
        let func = dev.get_or_load_custom_func(&format!("gn_fwd_{sfx}"), MODULE, ptx::FUSED)?;
        let mut l = func.builder();
        let (cc, ss, gg) = (c as u64, s as u64, groups as u64);
        l.arg(&x);
        l.arg(&w);
        l.arg(&bb);
        l.arg(&y);
        l.arg(&row);
        l.arg(&cc);
        l.arg(&ss);
        l.arg(&gg);
        l.arg(&eps);
        // SAFETY: argument types and order match gn_fwd_* in fused.cu; x and y indexed below
        // b*c*s, gamma and beta below c, row below 4*b*groups (gn_check above), each y
        // element written by one thread.
        unsafe { l.launch(gn_cfg(b * c, s)) }.w()?;
        Ok(y)
    }
    let geom = (b, c, s, groups);
    let w = "GroupNorm";
    Ok(by_dtype!(x.0.dtype(), "GroupNorm", dev, |T| {
        let v = (
            view(x.0, x.1, w)?,
            view(gamma.0, gamma.1, w)?,
            view(beta.0, beta.1, w)?,
        );
        go::<T>(&dev, sfx, v, geom, eps)?
    }))
}

/// GroupNorm's backward pass: (x, gamma, dy) -> [dx, dgamma, dbeta] packed.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_bwd(
    x: Arg,
    gamma: Arg,
    dy: Arg,
    b: usize,
    c: usize,
    s: usize,
    groups: usize,
    eps: f64,
) -> Result<CudaStorage> {
    let dev = x.0.device().clone();
    let sfx = suffix(x.0.dtype(), "GroupNorm backward")?;
    fn go<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        sfx: &str,
        (x, w, d): (CudaView<T>, CudaView<T>, CudaView<T>),
        geom: (usize, usize, usize, usize),
        eps: f64,
    ) -> Result<CudaSlice<T>> {
        let (b, c, s, groups) = geom;
        let n = b * c * s;
        gn_check(geom, x.len(), &[w.len()], "GroupNorm backward")?;
        if d.len() != n {
            candle_core::bail!("GroupNorm backward: dy has {} elements, x {n}", d.len());
        }
        // SAFETY: `alloc` leaves the memory uninitialised; out is returned after gn_bwd_dx
        // wrote its first n elements (when n > 0; as gn_fwd covers y) and gn_bwd_params the
        // last 2c (grid-stride over k < 2c); an error drops it unread.
        let mut out = unsafe { dev.alloc::<T>(n + 2 * c)? };
        let row = gn_stats(dev, &x, sfx, geom)?;
        let chan = dev.alloc_zeros::<f64>(2 * c)?;
        let (cc, ss, gg) = (c as u64, s as u64, groups as u64);
        let load =
            |name: &str| dev.get_or_load_custom_func(&format!("{name}_{sfx}"), MODULE, ptx::FUSED);
        if n > 0 {
            let func = load("gn_bwd_reduce")?;
            let mut l = func.builder();
            l.arg(&x);
            l.arg(&w);
            l.arg(&d);
            l.arg(&row);
            l.arg(&chan);
            l.arg(&cc);
            l.arg(&ss);
            l.arg(&gg);
            l.arg(&eps);
            // SAFETY: argument types and order match gn_bwd_reduce_* in fused.cu; x and dy
            // indexed below n, gamma below c, row below 4*b*groups, chan below 2c.
            unsafe { l.launch(gn_cfg(b * c, s)) }.w()?;
            let func = load("gn_bwd_dx")?;
            let mut dx = out.slice_mut(0..n);
            let mut l = func.builder();
            l.arg(&x);
            l.arg(&w);
            l.arg(&d);
            l.arg(&mut dx);
            l.arg(&row);
            l.arg(&cc);
            l.arg(&ss);
            l.arg(&gg);
            l.arg(&eps);
            // SAFETY: argument types and order match gn_bwd_dx_* in fused.cu; dx is out's
            // first n elements, indexed below n like x and dy, each written by one thread.
            unsafe { l.launch(gn_cfg(b * c, s)) }.w()?;
        }
        let func = load("gn_bwd_params")?;
        let mut params = out.slice_mut(n..n + 2 * c);
        let mut l = func.builder();
        l.arg(&chan);
        l.arg(&mut params);
        l.arg(&cc);
        // SAFETY: argument types and order match gn_bwd_params_* in fused.cu; chan and
        // params (out's last 2c elements) indexed below 2c.
        unsafe { l.launch(launch_cfg(2 * c)) }.w()?;
        Ok(out)
    }
    let geom = (b, c, s, groups);
    let w = "GroupNorm backward";
    Ok(by_dtype!(x.0.dtype(), "GroupNorm backward", dev, |T| {
        let v = (
            view(x.0, x.1, w)?,
            view(gamma.0, gamma.1, w)?,
            view(dy.0, dy.1, w)?,
        );
        go::<T>(&dev, sfx, v, geom, eps)?
    }))
}
