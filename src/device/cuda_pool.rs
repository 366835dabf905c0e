//! GPU memory: the device's stream-ordered memory pool, which candle's CUDA allocations come
//! from (cudarc allocates with `cuMemAllocAsync` on the default pool).
//!
//! By default that pool hands freed memory back to the driver at every synchronisation, so each
//! training step would map and unmap its activations again; [`configure`] keeps freed memory
//! in the pool, as PyTorch's caching allocator does. [`peak_bytes`] reads the pool's high-water
//! mark of memory in use: what `bench` reports as peak GPU memory, comparable with
//! `torch.cuda.max_memory_allocated`.

use anyhow::{Context, Result};
use candle_core::cuda_backend::cudarc::driver::{result, sys};
use candle_core::Device;

fn pool(dev: &Device) -> Result<Option<sys::CUmemoryPool>> {
    let Device::Cuda(cuda) = dev else {
        return Ok(None);
    };
    let ctx = cuda.cuda_stream().context().clone();
    ctx.bind_to_thread().context("binding the CUDA context")?;
    // SAFETY: an FFI call taking a device handle (cudarc supplies the out-pointer): the handle
    // is the device of `ctx`, a live context (held by `cuda`) bound to this thread just above.
    let pool = unsafe { result::device::get_default_mem_pool(ctx.cu_device()) }
        .context("the device's default memory pool")?;
    Ok(Some(pool))
}

fn set(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute, mut v: u64) -> Result<()> {
    // SAFETY: `pool` is a device's default pool (from `pool`, valid while the device lives);
    // the driver reads the attribute's value from the pointer during the call only, and reads
    // at most 8 bytes (every CUmemPool_attribute is an int or a cuuint64_t; the two set here,
    // RELEASE_THRESHOLD and USED_MEM_HIGH, are cuuint64_t), all within the live local `v`.
    unsafe { result::mem_pool::set_attribute(pool, attr, (&mut v) as *mut u64 as *mut _) }
        .with_context(|| format!("setting the memory pool's {attr:?}"))
}

/// Keeps freed GPU memory cached in the pool between steps and resets the peak. No-op off CUDA.
pub fn configure(dev: &Device) -> Result<()> {
    if let Some(p) = pool(dev)? {
        set(
            p,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            u64::MAX,
        )?;
        reset_peak(dev)?;
    }
    Ok(())
}

/// Starts a new high-water mark of GPU memory in use.
pub fn reset_peak(dev: &Device) -> Result<()> {
    if let Some(p) = pool(dev)? {
        set(
            p,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            0,
        )?;
    }
    Ok(())
}

/// The most GPU memory in use at once since the last reset, in bytes; None off CUDA.
pub fn peak_bytes(dev: &Device) -> Result<Option<u64>> {
    let Some(p) = pool(dev)? else {
        return Ok(None);
    };
    let mut v = 0u64;
    // SAFETY: `p` is a device's default pool (from `pool`); USED_MEM_HIGH is a cuuint64_t,
    // which the driver writes into the live local `v` (8 bytes, aligned) during the call only.
    unsafe {
        result::mem_pool::get_attribute(
            p,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut v) as *mut u64 as *mut _,
        )
    }
    .context("reading the memory pool's peak")?;
    Ok(Some(v))
}

/// Free memory on the device in bytes, as the driver reports it; None off CUDA.
pub fn free_bytes(dev: &Device) -> Result<Option<u64>> {
    let Device::Cuda(cuda) = dev else {
        return Ok(None);
    };
    cuda.cuda_stream()
        .context()
        .bind_to_thread()
        .context("binding the CUDA context")?;
    let (free, _total) = result::mem_get_info().context("reading the device's free memory")?;
    Ok(Some(free as u64))
}
