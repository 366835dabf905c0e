// The optimizer's per-parameter work on CUDA, one kernel launch per parameter tensor instead of
// one per tensor op (PTX built by build.rs under the `cuda` feature):
// - optim_rmsprop_* / optim_adam_*: the gradient's clipping factor, the rule and its buffers in
//   one pass; the parameter is updated in place, each buffer written once into a new array.
//   These mirror the `kernel` closures of src/train/optim/{rmsprop,adam}.rs operation for
//   operation; every product, sum, quotient and square root is rounded on its own (the _rn
//   intrinsics: no FMA contraction), as on the CPU, so the results are bit-identical to the CPU's.
// - ema_*: the EMA's shadow * decay + param * (1 - decay) into a new array.
// - sum_squares_*: adds the sum of squares of a tensor's elements, in double, to *out.
// Element types: float and double. 64-bit indexing throughout.
#include <stdint.h>

template <typename T> struct R;
template <> struct R<float> {
  static __device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
  static __device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
  static __device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
  static __device__ __forceinline__ float div(float a, float b) { return __fdiv_rn(a, b); }
  static __device__ __forceinline__ float sqrt(float a) { return __fsqrt_rn(a); }
};
template <> struct R<double> {
  static __device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
  static __device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }
  static __device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
  static __device__ __forceinline__ double div(double a, double b) { return __ddiv_rn(a, b); }
  static __device__ __forceinline__ double sqrt(double a) { return __dsqrt_rn(a); }
};

// candle's affine: v * m + a, rounded twice.
template <typename T> __device__ __forceinline__ T aff(T v, T m, T a) {
  return R<T>::add(R<T>::mul(v, m), a);
}

// torch.lerp as src/train/optim/fused.rs's `lerp` composes it.
template <typename T>
__device__ __forceinline__ T lerp_(T start, T end, bool small, T wt, T one_minus_wt) {
  const T diff = R<T>::sub(end, start);
  return small ? R<T>::add(start, aff(diff, wt, T(0))) : R<T>::sub(end, aff(diff, one_minus_wt, T(0)));
}

// Flags shared by both rules' launches.
#define HAS_SCALE 1u // multiply the gradient by `scale` first (clipping, loss scaling)
#define HAS_IN0 2u   // buffer k's previous value is given (else zero): HAS_IN0 << k
// RmsPropArgs.flags
#define RMS_WD 1u
#define RMS_MOMENTUM 2u
#define RMS_CENTERED 4u
#define RMS_LERP_SMALL 8u
// AdamArgs.flags
#define ADAM_DECAY 1u
#define ADAM_DECOUPLED 2u
#define ADAM_LERP_SMALL 4u
#define ADAM_AMSGRAD 8u

// Laid out as RmsPropArgs in src/train/optim/rmsprop.rs (#[repr(C)]).
struct RmsPropArgs {
  double alpha, one_minus_alpha, weight_decay, momentum, wt, one_minus_wt, eps, neg_lr;
  uint32_t flags, pad;
};

// Laid out as AdamArgs in src/train/optim/adam.rs (#[repr(C)]).
struct AdamArgs {
  double decay, wt, one_minus_wt, beta2, one_minus_beta2, inv_bc2, eps, neg_step;
  uint32_t flags, pad;
};

#define MAX_BUFFERS 3

template <typename T>
__device__ __forceinline__ void load_buffers(T *b, const T *i0, const T *i1, const T *i2,
                                             uint32_t have, uint64_t i) {
  const T *in[MAX_BUFFERS] = {i0, i1, i2};
#pragma unroll
  for (int k = 0; k < MAX_BUFFERS; ++k) b[k] = (have & (HAS_IN0 << k)) ? in[k][i] : T(0);
}

template <typename T>
__device__ __forceinline__ void store_buffers(const T *b, T *o0, T *o1, T *o2, uint32_t n_buffers,
                                              uint64_t i) {
  T *out[MAX_BUFFERS] = {o0, o1, o2};
#pragma unroll
  for (int k = 0; k < MAX_BUFFERS; ++k)
    if ((uint32_t)k < n_buffers) out[k][i] = b[k];
}

// Buffers: [square_avg, momentum_buffer if momentum, grad_avg if centered].
template <typename T>
__device__ void rmsprop(T *p, const T *g, const T *i0, const T *i1, const T *i2, T *o0, T *o1,
                        T *o2, uint64_t n, uint32_t n_buffers, uint32_t have, double scale,
                        RmsPropArgs a) {
  typedef R<T> r;
  const T zero = T(0), sc = T(scale), alpha = T(a.alpha), one_minus_alpha = T(a.one_minus_alpha);
  const T wd = T(a.weight_decay), m = T(a.momentum), wt = T(a.wt), omwt = T(a.one_minus_wt);
  const T one = T(1), eps = T(a.eps), neg_lr = T(a.neg_lr);
  const bool has_wd = a.flags & RMS_WD, has_m = a.flags & RMS_MOMENTUM;
  const bool centered = a.flags & RMS_CENTERED, small = a.flags & RMS_LERP_SMALL;
  const int kg = has_m ? 2 : 1;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    T b[MAX_BUFFERS];
    load_buffers(b, i0, i1, i2, have, i);
    const T pv = p[i];
    T gv = (have & HAS_SCALE) ? aff(g[i], sc, zero) : g[i];
    if (has_wd) gv = r::add(gv, aff(pv, wd, zero));
    b[0] = r::add(aff(b[0], alpha, zero), r::mul(aff(gv, one_minus_alpha, zero), gv));
    T avg;
    if (centered) {
      b[kg] = lerp_(b[kg], gv, small, wt, omwt);
      avg = r::sqrt(r::sub(b[0], r::mul(b[kg], b[kg])));
    } else {
      avg = r::sqrt(b[0]);
    }
    avg = aff(avg, one, eps);
    if (has_m) {
      b[1] = r::add(aff(b[1], m, zero), r::div(gv, avg));
      p[i] = r::add(pv, aff(b[1], neg_lr, zero));
    } else {
      p[i] = r::add(pv, r::div(aff(gv, neg_lr, zero), avg));
    }
    store_buffers(b, o0, o1, o2, n_buffers, i);
  }
}

// Buffers: [exp_avg, exp_avg_sq, max_exp_avg_sq if amsgrad].
template <typename T>
__device__ void adam(T *p, const T *g, const T *i0, const T *i1, const T *i2, T *o0, T *o1, T *o2,
                     uint64_t n, uint32_t n_buffers, uint32_t have, double scale, AdamArgs a) {
  typedef R<T> r;
  const T zero = T(0), sc = T(scale), decay = T(a.decay), wt = T(a.wt), omwt = T(a.one_minus_wt);
  const T beta2 = T(a.beta2), one_minus_beta2 = T(a.one_minus_beta2), inv_bc2 = T(a.inv_bc2);
  const T one = T(1), eps = T(a.eps), neg_step = T(a.neg_step);
  const bool has_decay = a.flags & ADAM_DECAY, decoupled = a.flags & ADAM_DECOUPLED;
  const bool small = a.flags & ADAM_LERP_SMALL, amsgrad = a.flags & ADAM_AMSGRAD;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    T b[MAX_BUFFERS];
    load_buffers(b, i0, i1, i2, have, i);
    T pv = p[i];
    T gv = (have & HAS_SCALE) ? aff(g[i], sc, zero) : g[i];
    if (has_decay) {
      if (decoupled)
        pv = aff(pv, decay, zero);
      else
        gv = r::add(gv, aff(pv, decay, zero));
    }
    b[0] = lerp_(b[0], gv, small, wt, omwt);
    b[1] = r::add(aff(b[1], beta2, zero), r::mul(aff(gv, one_minus_beta2, zero), gv));
    T second = b[1];
    if (amsgrad) {
      // candle's maximum: a < b ? b : a
      if (b[2] < b[1]) b[2] = b[1];
      second = b[2];
    }
    const T denom = aff(aff(r::sqrt(second), inv_bc2, zero), one, eps);
    p[i] = r::add(pv, r::div(aff(b[0], neg_step, zero), denom));
    store_buffers(b, o0, o1, o2, n_buffers, i);
  }
}

template <typename T> __device__ void ema(const T *s, const T *p, T *out, uint64_t n, double d, double k) {
  const T dd = T(d), kk = T(k), zero = T(0);
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x)
    out[i] = R<T>::add(aff(s[i], dd, zero), aff(p[i], kk, zero));
}

// One block of SUM_THREADS threads: each thread sums its grid-stride share, then a tree in
// shared memory, then one atomicAdd per block.
#define SUM_THREADS 256
template <typename T> __device__ void sum_squares(const T *x, double *out, uint64_t n) {
  __shared__ double part[SUM_THREADS];
  double acc = 0.0;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    const double v = (double)x[i];
    acc += v * v;
  }
  part[threadIdx.x] = acc;
  __syncthreads();
  for (unsigned w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) atomicAdd(out, part[0]);
}

#define OPTIM(NAME, T)                                                                          \
  extern "C" __global__ void optim_rmsprop_##NAME(T *p, const T *g, const T *i0, const T *i1,   \
                                                  const T *i2, T *o0, T *o1, T *o2, uint64_t n, \
                                                  uint32_t n_buffers, uint32_t have,            \
                                                  double scale, RmsPropArgs a) {                \
    rmsprop<T>(p, g, i0, i1, i2, o0, o1, o2, n, n_buffers, have, scale, a);                     \
  }                                                                                             \
  extern "C" __global__ void optim_adam_##NAME(T *p, const T *g, const T *i0, const T *i1,      \
                                               const T *i2, T *o0, T *o1, T *o2, uint64_t n,    \
                                               uint32_t n_buffers, uint32_t have, double scale, \
                                               AdamArgs a) {                                    \
    adam<T>(p, g, i0, i1, i2, o0, o1, o2, n, n_buffers, have, scale, a);                        \
  }                                                                                             \
  extern "C" __global__ void ema_##NAME(const T *s, const T *p, T *out, uint64_t n, double d,    \
                                        double k) {                                             \
    ema<T>(s, p, out, n, d, k);                                                                 \
  }                                                                                             \
  extern "C" __global__ void sum_squares_##NAME(const T *x, double *out, uint64_t n) {          \
    sum_squares<T>(x, out, n);                                                                  \
  }

OPTIM(f32, float)
OPTIM(f64, double)
