//! The CUDA halves of [`super::fused`]: the optimizer update, the EMA and the gradients' sum of
//! squares as one kernel launch per parameter tensor (`src/kernels/cuda/optim.cu`).
//!
//! Through the tensor expressions a centered RMSprop step with momentum is about fifteen
//! launches per parameter tensor, clipping one more, the EMA three and the norm three: thousands
//! per step, each also copying its shape to the device, which at 256x256 leaves the GPU waiting
//! on the host (`docs/performance.md`).

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, DType, InplaceOp1, Layout, Result, Shape, Storage, Tensor,
    Var, WithDType,
};

use super::super::{AdamArgs, Buffers, RmsPropArgs};
use super::rule::{Rule, MAX_BUFFERS};
use crate::kernels::cuda::{launch_cfg, ptx};
use crate::kernels::cuda_view;

const MODULE: &str = "fluxflow_optim";

// SAFETY: DeviceRepr passes the value's bytes as a kernel argument. RmsPropArgs is #[repr(C)],
// Copy, eight f64s then two u32s (72 bytes, no padding: asserted below), the layout of
// `struct RmsPropArgs` in optim.cu, which the kernels take by value.
unsafe impl DeviceRepr for RmsPropArgs {}
// SAFETY: as above, for `struct AdamArgs` in optim.cu (eight f64s, two u32s).
unsafe impl DeviceRepr for AdamArgs {}
const _: () = assert!(std::mem::size_of::<RmsPropArgs>() == 72);
const _: () = assert!(std::mem::size_of::<AdamArgs>() == 72);

/// The kernels' `have` bits (optim.cu): the gradient is scaled; buffer k has a previous value.
const HAS_SCALE: u32 = 1;
const HAS_IN0: u32 = 2;

fn suffix(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F32 => Some("f32"),
        DType::F64 => Some("f64"),
        _ => None,
    }
}

/// Whether `t` is a contiguous CUDA tensor of `dtype` with `like`'s shape.
fn fits(t: &Tensor, like: &Tensor) -> bool {
    t.device().is_cuda()
        && t.device().same_device(like.device())
        && t.dtype() == like.dtype()
        && t.is_contiguous()
        && t.shape() == like.shape()
}

/// The view of a CUDA tensor's elements.
fn view_of<'a, T: CudaDType>(storage: &'a Storage, layout: &Layout) -> Result<CudaView<'a, T>> {
    match storage {
        Storage::Cuda(s) => cuda_view::<T>(s, layout, "fused optimizer"),
        _ => candle_core::bail!("fused optimizer: a tensor is not on CUDA"),
    }
}

/// The update of one parameter, run on its storage in place; the new buffers are left in
/// `outputs`.
struct CudaUpdate<'a> {
    grad: &'a Tensor,
    /// Buffer k's previous value, if it has one.
    inputs: [Option<&'a Tensor>; MAX_BUFFERS],
    n_buffers: usize,
    scale: Option<f64>,
    rule: Rule,
    outputs: Mutex<Vec<CudaStorage>>,
}

impl CudaUpdate<'_> {
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        st: &mut CudaStorage,
        l: &Layout,
    ) -> Result<()> {
        let dev = st.device().clone();
        let (start, end) = l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("fused update: parameter not contiguous".into())
        })?;
        let n = end - start;
        let sfx = suffix(T::DTYPE).expect("run is called for f32 and f64 only");
        let (gs, gl) = self.grad.storage_and_layout();
        let g = view_of::<T>(&gs, gl)?;
        if g.len() != n {
            candle_core::bail!("fused update: {n} parameters, {} gradients", g.len());
        }
        let guards: Vec<_> = self
            .inputs
            .iter()
            .map(|t| t.map(|t| t.storage_and_layout()))
            .collect();
        let mut have = if self.scale.is_some() { HAS_SCALE } else { 0 };
        // Absent inputs and outputs get a view of the gradient: the kernel never reads an input
        // whose `have` bit is clear, nor writes an output k >= n_buffers.
        let mut ins = Vec::with_capacity(MAX_BUFFERS);
        for (k, guard) in guards.iter().enumerate() {
            match guard {
                Some((s, bl)) => {
                    ins.push(view_of::<T>(s, bl)?);
                    have |= HAS_IN0 << k;
                }
                None => ins.push(view_of::<T>(&gs, gl)?),
            }
        }
        let outs = (0..self.n_buffers)
            // SAFETY: `alloc` leaves the memory uninitialised; the outputs are handed out (in
            // `outputs`) only after the kernel below has written all n elements of each of
            // the n_buffers of them (grid-stride over i < n); an error drops them unread.
            .map(|_| unsafe { dev.alloc::<T>(n) })
            .collect::<Result<Vec<_>>>()?;
        let dummies = (self.n_buffers..MAX_BUFFERS)
            .map(|_| view_of::<T>(&gs, gl))
            .collect::<Result<Vec<_>>>()?;
        let (name, n64, nb, scale) = (
            match self.rule {
                Rule::RmsProp(_) => format!("optim_rmsprop_{sfx}"),
                Rule::Adam(_) => format!("optim_adam_{sfx}"),
            },
            n as u64,
            self.n_buffers as u32,
            self.scale.unwrap_or(1.0),
        );
        let func = dev.get_or_load_custom_func(&name, MODULE, ptx::OPTIM)?;
        {
            let p = st.as_cuda_slice_mut::<T>()?;
            let mut p = p.slice_mut(start..end);
            let mut b = func.builder();
            b.arg(&mut p);
            b.arg(&g);
            for v in &ins {
                b.arg(v);
            }
            for o in &outs {
                b.arg(o);
            }
            for d in &dummies {
                b.arg(d);
            }
            b.arg(&n64);
            b.arg(&nb);
            b.arg(&have);
            b.arg(&scale);
            match &self.rule {
                Rule::RmsProp(a) => b.arg(a),
                Rule::Adam(a) => b.arg(a),
            };
            // SAFETY: argument types and order match optim_{rmsprop,adam}_* in optim.cu; p, g,
            // the inputs and the outputs hold n elements each (g checked above, the buffers
            // have the parameter's shape: `fits`), the kernel indexes them below n, each
            // element by one thread, reads no input whose `have` bit is clear and writes no
            // output k >= n_buffers (the dummies, views of g, are never written).
            unsafe { b.launch(launch_cfg(n)) }.w()?;
        }
        let mut outputs = self.outputs.lock().expect("not shared across threads");
        outputs.extend(
            outs.into_iter()
                .map(|o| CudaStorage::wrap_cuda_slice(o, dev.clone())),
        );
        Ok(())
    }
}

impl InplaceOp1 for CudaUpdate<'_> {
    fn name(&self) -> &'static str {
        "fused-optimizer-update-cuda"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("fused CUDA update: the parameter is on the CPU")
    }

    fn cuda_fwd(&self, st: &mut CudaStorage, l: &Layout) -> Result<()> {
        match st.dtype() {
            DType::F32 => self.run::<f32>(st, l),
            DType::F64 => self.run::<f64>(st, l),
            d => candle_core::bail!("fused CUDA update: no kernel for {d:?}"),
        }
    }
}

/// [`super::update`] on CUDA: `Ok(false)`, touching nothing, unless the parameter, the
/// gradient and every buffer are contiguous f32/f64 CUDA tensors of one shape on one device.
pub(super) fn update(
    var: &Var,
    grad: &Tensor,
    scale: Option<f64>,
    names: &[&'static str],
    buffers: &mut Buffers,
    rule: Rule,
) -> Result<bool> {
    let param = var.as_tensor();
    if suffix(param.dtype()).is_none()
        || names.len() > MAX_BUFFERS
        || param.elem_count() == 0
        || !fits(param, param)
        || !fits(grad, param)
        || names
            .iter()
            .filter_map(|n| buffers.get(n))
            .any(|b| !fits(b, param))
    {
        return Ok(false);
    }
    let mut inputs = [None; MAX_BUFFERS];
    for (slot, name) in inputs.iter_mut().zip(names) {
        *slot = buffers.get(name);
    }
    let op = CudaUpdate {
        grad,
        inputs,
        n_buffers: names.len(),
        scale,
        rule,
        outputs: Mutex::new(Vec::with_capacity(names.len())),
    };
    param.inplace_op1(&op)?;
    let outputs = op.outputs.into_inner().expect("not shared across threads");
    if outputs.len() != names.len() {
        candle_core::bail!("fused CUDA update: {} buffers written", outputs.len());
    }
    for (name, st) in names.iter().zip(outputs) {
        let t = Tensor::from_storage(
            Storage::Cuda(st),
            param.shape().clone(),
            BackpropOp::none(),
            false,
        );
        buffers.insert(name, t);
    }
    Ok(true)
}

/// The EMA's `shadow * decay + param * (1 - decay)` as one kernel.
struct EmaOp {
    decay: f64,
}

impl CustomOp2 for EmaOp {
    fn name(&self) -> &'static str {
        "fused-ema-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("fused CUDA EMA: the tensors are on the CPU")
    }

    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        ls: &Layout,
        p: &CudaStorage,
        lp: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        fn go<T: CudaDType + DeviceRepr + WithDType>(
            s: &CudaStorage,
            ls: &Layout,
            p: &CudaStorage,
            lp: &Layout,
            decay: f64,
        ) -> Result<CudaStorage> {
            let dev = s.device().clone();
            let sv = cuda_view::<T>(s, ls, "EMA shadow")?;
            let pv = cuda_view::<T>(p, lp, "EMA parameter")?;
            let n = sv.len();
            if pv.len() != n {
                candle_core::bail!("fused CUDA EMA: {n} shadow, {} parameter values", pv.len());
            }
            let sfx = suffix(T::DTYPE).expect("go is called for f32 and f64 only");
            // SAFETY: `alloc` leaves the memory uninitialised; out is returned only after the
            // kernel below has written all n elements (grid-stride over i < n); an error
            // drops it unread.
            let out = unsafe { dev.alloc::<T>(n) }?;
            let func = dev.get_or_load_custom_func(&format!("ema_{sfx}"), MODULE, ptx::OPTIM)?;
            let (n64, keep) = (n as u64, 1.0 - decay);
            let mut b = func.builder();
            b.arg(&sv);
            b.arg(&pv);
            b.arg(&out);
            b.arg(&n64);
            b.arg(&decay);
            b.arg(&keep);
            // SAFETY: argument types and order match ema_* in optim.cu; s, p and out hold n
            // elements each (checked above), indexed below n, each out element by one thread.
            unsafe { b.launch(launch_cfg(n)) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
        let out = match s.dtype() {
            DType::F32 => go::<f32>(s, ls, p, lp, self.decay)?,
            DType::F64 => go::<f64>(s, ls, p, lp, self.decay)?,
            d => candle_core::bail!("fused CUDA EMA: no kernel for {d:?}"),
        };
        Ok((out, ls.shape().clone()))
    }
}

/// [`super::ema`] on CUDA: `None` unless both are contiguous f32/f64 CUDA tensors of one
/// shape, dtype and device.
pub(super) fn ema(shadow: &Tensor, param: &Tensor, decay: f64) -> Result<Option<Tensor>> {
    if suffix(shadow.dtype()).is_none()
        || shadow.elem_count() == 0
        || !fits(shadow, shadow)
        || !fits(param, shadow)
    {
        return Ok(None);
    }
    Ok(Some(shadow.apply_op2_no_bwd(param, &EmaOp { decay })?))
}

/// [`super::sum_squares`] on CUDA: every tensor's squares added, in f64, into one
/// accumulator by one kernel per tensor. `None` unless all are contiguous f32/f64 tensors on
/// the first one's CUDA device.
pub(super) fn sum_squares(ts: &[&Tensor]) -> Result<Option<Tensor>> {
    let Some(first) = ts.first() else {
        return Ok(None);
    };
    let ok = |t: &Tensor| {
        suffix(t.dtype()).is_some()
            && t.device().is_cuda()
            && t.device().same_device(first.device())
            && t.is_contiguous()
    };
    if !ts.iter().all(|t| ok(t)) {
        return Ok(None);
    }
    let dev = first.device().as_cuda_device()?.clone();
    let acc = dev.alloc_zeros::<f64>(1)?;
    for t in ts {
        if t.elem_count() == 0 {
            continue;
        }
        let (s, l) = t.storage_and_layout();
        let n = t.elem_count();
        let n64 = n as u64;
        let sfx = suffix(t.dtype()).expect("checked above");
        let func =
            dev.get_or_load_custom_func(&format!("sum_squares_{sfx}"), MODULE, ptx::OPTIM)?;
        // At most 1024 blocks of 256 threads (SUM_THREADS in optim.cu): each thread sums its
        // grid-stride share, each block adds its total once.
        let mut cfg = launch_cfg(n);
        cfg.grid_dim.0 = cfg.grid_dim.0.min(1024);
        macro_rules! launch {
            ($t:ty) => {{
                let x = view_of::<$t>(&s, l)?;
                let mut b = func.builder();
                b.arg(&x);
                b.arg(&acc);
                b.arg(&n64);
                // SAFETY: argument types and order match sum_squares_* in optim.cu; x holds n
                // elements (t is contiguous), read below n; acc is one f64 that each block
                // adds to atomically; the block size is SUM_THREADS, which its shared-memory
                // reduction assumes.
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match t.dtype() {
            DType::F32 => launch!(f32),
            _ => launch!(f64),
        }
    }
    let st = CudaStorage::wrap_cuda_slice(acc, dev);
    Ok(Some(Tensor::from_storage(
        Storage::Cuda(st),
        (),
        BackpropOp::none(),
        false,
    )))
}
