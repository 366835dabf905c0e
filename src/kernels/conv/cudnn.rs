//! Convolutions on cuDNN (the `cudnn` feature): a convolution's forward pass, its input gradient
//! (backward-data, which is also the transposed convolution's forward pass) and its weight
//! gradient (backward-filter), through the cuDNN API that candle's cudarc re-exports.
//!
//! Every call is phrased as one of the three passes of a forward convolution
//! `y = conv(x, w)` with `x` [B, C, H, W], `w` [K, C, kh, kw] and `y` [B, K, OH, OW]:
//! - `Forward`: (x, w) -> y
//! - `BackwardData`: (dy, w) -> dx
//! - `BackwardFilter`: (x, dy) -> dw
//!
//! The algorithm is chosen once per shape, dtype and pass by cuDNN's heuristics (what PyTorch
//! does with `cudnn.benchmark` off) and cached. Its workspace comes from the device's memory
//! pool for the call alone (stream-ordered, so freed as soon as the work is queued; the pool
//! keeps the memory cached, see `crate::device::cuda_pool`), bounded by [`WORKSPACE_CAP`]: an algorithm that
//! needs more, or whose workspace cannot be allocated, is passed over for a leaner one.
//!
//! Float32 convolutions use TF32 tensor cores exactly when candle's f32 GEMMs do
//! (`candle_core::cuda::set_gemm_reduced_precision_f32`), so one switch governs both.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{
    sys, ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType,
    FilterDescriptor, TensorDescriptor,
};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, DeviceId};
use candle_core::{DType, Layout, Result, Shape, WithDType};
use half::{bf16, f16};

/// The largest cuDNN workspace one convolution may ask for (bytes). The heuristics' choice for
/// the expander's largest layers at 1024x1024 needs 3-6 GiB; the fallbacks without workspace
/// run several times slower.
pub const WORKSPACE_CAP: usize = 8 << 30;

/// Which of a convolution's three computations to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pass {
    Forward,
    BackwardData,
    BackwardFilter,
}

/// A forward convolution's geometry: `x` [B, C, H, W], `w` [K, C, kh, kw], `y` [B, K, OH, OW].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvShape {
    pub x: [usize; 4],
    pub w: [usize; 4],
    pub y: [usize; 4],
    pub padding: usize,
    pub stride: usize,
    pub dilation: usize,
}

impl ConvShape {
    /// The shape `pass` produces.
    pub fn output(&self, pass: Pass) -> [usize; 4] {
        match pass {
            Pass::Forward => self.y,
            Pass::BackwardData => self.x,
            Pass::BackwardFilter => self.w,
        }
    }

    /// The shapes `pass` takes, in argument order.
    fn inputs(&self, pass: Pass) -> ([usize; 4], [usize; 4]) {
        match pass {
            Pass::Forward => (self.x, self.w),
            Pass::BackwardData => (self.y, self.w),
            Pass::BackwardFilter => (self.x, self.y),
        }
    }

    /// Checks that `y` is what cuDNN's forward convolution makes of `x` and `w`.
    fn check(&self) -> Result<()> {
        let [b, c, h, wd] = self.x;
        let [k, wc, kh, kw] = self.w;
        let out = |n: usize, kk: usize| -> Option<usize> {
            (n + 2 * self.padding)
                .checked_sub(self.dilation * (kk - 1) + 1)
                .map(|v| v / self.stride + 1)
        };
        let y = [b, k, out(h, kh).unwrap_or(0), out(wd, kw).unwrap_or(0)];
        if wc != c || y != self.y || kh == 0 || kw == 0 || self.stride == 0 || self.dilation == 0 {
            candle_core::bail!("cudnn convolution: inconsistent shapes {self:?}")
        }
        Ok(())
    }
}

fn dims4(l: &Layout, what: &str) -> Result<[usize; 4]> {
    let (a, b, c, d) = l.shape().dims4()?;
    if !l.is_contiguous() {
        candle_core::bail!("{what}: input must be contiguous")
    }
    Ok([a, b, c, d])
}

fn as_i32(d: [usize; 4]) -> Result<[i32; 4]> {
    let mut o = [0i32; 4];
    for (o, d) in o.iter_mut().zip(d) {
        *o = i32::try_from(d)
            .map_err(|_| candle_core::Error::Msg(format!("cudnn: dimension {d} too large")))?;
    }
    Ok(o)
}

/// A dtype cuDNN convolves in, with the type it accumulates in.
pub trait ConvDType: CudaDType + CudnnDataType + DeviceRepr + ValidAsZeroBits + WithDType {
    type Compute: CudnnDataType;
}
impl ConvDType for f32 {
    type Compute = f32;
}
impl ConvDType for f64 {
    type Compute = f64;
}
impl ConvDType for bf16 {
    type Compute = f32;
}
impl ConvDType for f16 {
    type Compute = f32;
}

#[derive(Debug, Clone, Copy)]
enum Algo {
    Fwd(sys::cudnnConvolutionFwdAlgo_t),
    Data(sys::cudnnConvolutionBwdDataAlgo_t),
    Filter(sys::cudnnConvolutionBwdFilterAlgo_t),
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    algo: Algo,
    workspace: usize,
}

type PlanKey = (DeviceId, Pass, DType, bool, ConvShape);

#[derive(Default)]
struct ThreadState {
    handles: HashMap<DeviceId, Arc<Cudnn>>,
    plans: HashMap<PlanKey, Plan>,
}

// cuDNN handles are neither Send nor Sync: one per thread and device, like candle's own.
thread_local! {
    static STATE: RefCell<ThreadState> = RefCell::new(ThreadState::default());
}

fn cudnn_err(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("cudnn: {e:?}"))
}

/// The math mode a convolution of `dtype` asks cuDNN for.
fn math_for(dtype: DType) -> sys::cudnnMathType_t {
    use sys::cudnnMathType_t as M;
    match dtype {
        DType::F32 if candle_core::cuda::gemm_reduced_precision_f32() => M::CUDNN_DEFAULT_MATH,
        DType::F32 | DType::F64 => M::CUDNN_FMA_MATH,
        _ => M::CUDNN_TENSOR_OP_MATH,
    }
}

struct Descriptors<T: ConvDType> {
    conv: ConvDescriptor<T::Compute>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
}

fn descriptors<T: ConvDType>(cudnn: &Arc<Cudnn>, s: &ConvShape) -> Result<Descriptors<T>> {
    let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    let p = s.padding as i32;
    let st = s.stride as i32;
    let d = s.dilation as i32;
    let conv = cudnn
        .create_conv2d::<T::Compute>(
            [p, p],
            [st, st],
            [d, d],
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        )
        .map_err(cudnn_err)?;
    Ok(Descriptors {
        conv,
        x: cudnn
            .create_4d_tensor::<T>(nchw, as_i32(s.x)?)
            .map_err(cudnn_err)?,
        w: cudnn
            .create_4d_filter::<T>(nchw, as_i32(s.w)?)
            .map_err(cudnn_err)?,
        y: cudnn
            .create_4d_tensor::<T>(nchw, as_i32(s.y)?)
            .map_err(cudnn_err)?,
    })
}

/// The workspace `algo` needs for `pass`.
fn workspace_of<T: ConvDType>(d: &Descriptors<T>, algo: Algo) -> Result<usize> {
    match algo {
        Algo::Fwd(a) => ConvForward {
            conv: &d.conv,
            x: &d.x,
            w: &d.w,
            y: &d.y,
        }
        .get_workspace_size(a),
        Algo::Data(a) => ConvBackwardData {
            conv: &d.conv,
            dx: &d.x,
            w: &d.w,
            dy: &d.y,
        }
        .get_workspace_size(a),
        Algo::Filter(a) => ConvBackwardFilter {
            conv: &d.conv,
            x: &d.x,
            dw: &d.w,
            dy: &d.y,
        }
        .get_workspace_size(a),
    }
    .map_err(cudnn_err)
}

/// Every algorithm of `pass`, in the order to fall back through.
fn fallbacks(pass: Pass) -> Vec<Algo> {
    use sys::cudnnConvolutionBwdDataAlgo_t as D;
    use sys::cudnnConvolutionBwdFilterAlgo_t as F;
    use sys::cudnnConvolutionFwdAlgo_t as W;
    match pass {
        Pass::Forward => [
            W::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
            W::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
            W::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
            W::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
            W::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
            W::CUDNN_CONVOLUTION_FWD_ALGO_FFT,
            W::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
            W::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
        ]
        .map(Algo::Fwd)
        .to_vec(),
        Pass::BackwardData => [
            D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
            D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED,
            D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING,
            D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT,
            D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD,
            D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
        ]
        .map(Algo::Data)
        .to_vec(),
        Pass::BackwardFilter => [
            F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
            F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
            F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED,
            F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING,
            F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
            F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
        ]
        .map(Algo::Filter)
        .to_vec(),
    }
}

/// Chooses the algorithm for `pass` under the descriptor's math mode: cuDNN's heuristic first
/// choice, or, where
/// that needs more than [`WORKSPACE_CAP`] bytes of workspace, the first of [`fallbacks`] that
/// runs within it.
fn plan<T: ConvDType>(d: &Descriptors<T>, s: &ConvShape, pass: Pass, cap: usize) -> Result<Plan> {
    let best = match pass {
        Pass::Forward => ConvForward {
            conv: &d.conv,
            x: &d.x,
            w: &d.w,
            y: &d.y,
        }
        .pick_algorithm()
        .map(Algo::Fwd),
        Pass::BackwardData => ConvBackwardData {
            conv: &d.conv,
            dx: &d.x,
            w: &d.w,
            dy: &d.y,
        }
        .pick_algorithm()
        .map(Algo::Data),
        Pass::BackwardFilter => ConvBackwardFilter {
            conv: &d.conv,
            x: &d.x,
            dw: &d.w,
            dy: &d.y,
        }
        .pick_algorithm()
        .map(Algo::Filter),
    };
    let log = std::env::var_os("FLUXFLOW_CUDNN_LOG").is_some();
    let mut tried = Vec::new();
    for algo in best.ok().into_iter().chain(fallbacks(pass)) {
        match workspace_of(d, algo) {
            Ok(ws) if ws <= cap => {
                if log {
                    eprintln!(
                        "cudnn {pass:?} {:?} x{:?} w{:?} y{:?} p{} s{} d{}: {algo:?}, {ws} B \
                         workspace (passed over: {tried:?})",
                        T::DTYPE,
                        s.x,
                        s.w,
                        s.y,
                        s.padding,
                        s.stride,
                        s.dilation
                    );
                }
                return Ok(Plan {
                    algo,
                    workspace: ws,
                });
            }
            Ok(ws) => tried.push(format!("{algo:?} needs {ws} B")),
            Err(_) => tried.push(format!("{algo:?} unsupported")),
        }
    }
    candle_core::bail!(
        "cudnn: no {} algorithm for {s:?} runs within a {cap}-byte workspace ({})",
        pass_name(pass),
        tried.join(", ")
    )
}

fn pass_name(pass: Pass) -> &'static str {
    match pass {
        Pass::Forward => "convolution",
        Pass::BackwardData => "input gradient",
        Pass::BackwardFilter => "weight gradient",
    }
}

/// Runs `pass` of the convolution `s` on `a` and `b` (see the module docs for their roles).
pub fn run<T: ConvDType>(
    dev: &CudaDevice,
    pass: Pass,
    s: &ConvShape,
    a: &CudaView<T>,
    b: &CudaView<T>,
) -> Result<CudaSlice<T>> {
    s.check()?;
    let out_len: usize = s.output(pass).iter().product();
    // SAFETY: `alloc` leaves the memory uninitialised. `out` is returned empty (out_len == 0)
    // or after the launch below has written all of it: the output descriptor describes exactly
    // out_len elements, and with beta == 0 cuDNN writes the whole output without reading it
    // (its documented contract for beta == 0). Every error path drops it unread.
    let mut out = unsafe { dev.alloc::<T>(out_len)? };
    let (ia, ib) = s.inputs(pass);
    if a.len() < ia.iter().product() || b.len() < ib.iter().product() {
        candle_core::bail!("cudnn {pass:?}: input buffers smaller than {s:?}")
    }
    if out_len == 0 {
        return Ok(out);
    }
    STATE.with(|state| -> Result<()> {
        let mut st = state.borrow_mut();
        let id = dev.id();
        let cudnn = match st.handles.get(&id) {
            Some(c) => c.clone(),
            None => {
                let c = Cudnn::new(dev.cuda_stream()).map_err(cudnn_err)?;
                st.handles.insert(id, c.clone());
                c
            }
        };
        let mut d = descriptors::<T>(&cudnn, s)?;
        d.conv
            .set_math_type(math_for(T::DTYPE))
            .map_err(cudnn_err)?;
        let key = (
            id,
            pass,
            T::DTYPE,
            candle_core::cuda::gemm_reduced_precision_f32(),
            *s,
        );
        let p = match st.plans.get(&key) {
            Some(p) => *p,
            None => {
                let p = plan(&d, s, pass, WORKSPACE_CAP)?;
                st.plans.insert(key, p);
                p
            }
        };
        // The workspace for this call; where the memory is not there, the leanest algorithm
        // from now on for this shape.
        // SAFETY (both allocs): the workspace is cuDNN's scratch memory, uninitialised by
        // `alloc`; cuDNN writes what it reads of it within the call, and we never read it.
        let (p, mut ws) = match unsafe { dev.alloc::<u8>(p.workspace.max(1)) } {
            Ok(ws) => (p, ws),
            Err(_) => {
                let lean = plan(&d, s, pass, 0)?;
                st.plans.insert(key, lean);
                // SAFETY: as above (a 1-byte workspace for the lean plan, which needs 0).
                (lean, unsafe { dev.alloc::<u8>(1)? })
            }
        };
        let mut ws = ws.slice_mut(..p.workspace.max(1));
        let one = T::from_f64(1.0);
        let zero = T::from_f64(0.0);
        // SAFETY: the descriptors describe `a`, `b` and `out` (contiguous NCHW: `a` and `b`
        // hold at least the inputs' elements, checked above; `out` exactly the output's), the
        // workspace slice holds at least what the plan's algorithm asked for (p.workspace
        // bytes), the scaling factors are T's alpha = 1 and beta = 0, and all of it lives on
        // `dev`'s stream, on which cuDNN runs (the handle was made with it).
        unsafe {
            match (pass, p.algo) {
                (Pass::Forward, Algo::Fwd(algo)) => ConvForward {
                    conv: &d.conv,
                    x: &d.x,
                    w: &d.w,
                    y: &d.y,
                }
                .launch(algo, Some(&mut ws), (one, zero), a, b, &mut out),
                (Pass::BackwardData, Algo::Data(algo)) => ConvBackwardData {
                    conv: &d.conv,
                    dx: &d.x,
                    w: &d.w,
                    dy: &d.y,
                }
                .launch(algo, Some(&mut ws), (one, zero), &mut out, b, a),
                (Pass::BackwardFilter, Algo::Filter(algo)) => ConvBackwardFilter {
                    conv: &d.conv,
                    x: &d.x,
                    dw: &d.w,
                    dy: &d.y,
                }
                .launch(algo, Some(&mut ws), (one, zero), a, &mut out, b),
                _ => unreachable!("a plan's algorithm belongs to its pass"),
            }
        }
        .map_err(cudnn_err)
    })?;
    Ok(out)
}

/// `pass` on two candle CUDA storages (contiguous, same dtype), as a new storage.
pub fn run_storage(
    pass: Pass,
    s: &ConvShape,
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let dev = a.0.device().clone();
    let out_shape = Shape::from(s.output(pass).to_vec());
    macro_rules! go {
        ($t:ty) => {{
            let out = run::<$t>(
                &dev,
                pass,
                s,
                &crate::kernels::cuda_view::<$t>(a.0, a.1, "cudnn convolution")?,
                &crate::kernels::cuda_view::<$t>(b.0, b.1, "cudnn convolution")?,
            )?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let st = match (a.0.dtype(), b.0.dtype()) {
        (DType::F32, DType::F32) => go!(f32),
        (DType::F64, DType::F64) => go!(f64),
        (DType::BF16, DType::BF16) => go!(bf16),
        (DType::F16, DType::F16) => go!(f16),
        (x, y) => candle_core::bail!("cudnn convolution: unsupported dtypes {x:?}, {y:?}"),
    };
    Ok((st, out_shape))
}

/// The shapes of `pass` from its two input layouts and the forward geometry.
pub fn shape_of(
    pass: Pass,
    l1: &Layout,
    l2: &Layout,
    padding: usize,
    stride: usize,
    dilation: usize,
    other: [usize; 4],
) -> Result<ConvShape> {
    let (a, b) = (dims4(l1, "cudnn")?, dims4(l2, "cudnn")?);
    let (x, w, y) = match pass {
        Pass::Forward => (a, b, other),
        Pass::BackwardData => (other, b, a),
        Pass::BackwardFilter => (a, other, b),
    };
    Ok(ConvShape {
        x,
        w,
        y,
        padding,
        stride,
        dilation,
    })
}
