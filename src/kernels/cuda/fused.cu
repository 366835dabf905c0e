// fluxflow's fused CUDA kernels (PTX built by build.rs under the `cuda` feature).
//
// Bezier activation: x viewed as [G, 5, S] (group g's five channels t, p0..p3 over S positions),
// y as [G, S]:  y = (1-t)^3 p0 + 3(1-t)^2 t p1 + 3(1-t) t^2 p2 + t^3 p3  with t = pre_t(x0) and
// p_i = pre_p(x_{i+1}). The backward pass recomputes the curve from x.
// Pre-activation codes: 0 sigmoid, 1 SiLU, 2 tanh, 3 none.
// Arithmetic in float for f32/bf16, in double for f64; 64-bit indexing throughout.
#include <cuda_bf16.h>
#include <stdint.h>

template <typename T, typename A> __device__ __forceinline__ A ld(const T *p);
template <> __device__ __forceinline__ float ld<float, float>(const float *p) { return *p; }
template <> __device__ __forceinline__ double ld<double, double>(const double *p) { return *p; }
template <> __device__ __forceinline__ float ld<__nv_bfloat16, float>(const __nv_bfloat16 *p) {
  return __bfloat162float(*p);
}
template <typename T, typename A> __device__ __forceinline__ void st(T *p, A v);
template <> __device__ __forceinline__ void st<float, float>(float *p, float v) { *p = v; }
template <> __device__ __forceinline__ void st<double, double>(double *p, double v) { *p = v; }
template <> __device__ __forceinline__ void st<__nv_bfloat16, float>(__nv_bfloat16 *p, float v) {
  *p = __float2bfloat16(v);
}

template <typename A> __device__ __forceinline__ A sig(A x) { return A(1) / (exp(-x) + A(1)); }

template <typename A> __device__ __forceinline__ A pre(int kind, A x) {
  switch (kind) {
  case 0: return sig(x);
  case 1: return x / (A(1) + exp(-x));
  case 2: return tanh(x);
  default: return x;
  }
}

// pre(kind, x) and its derivative.
template <typename A> __device__ __forceinline__ A pre_d(int kind, A x, A *d) {
  switch (kind) {
  case 0: { A s = sig(x); *d = s * (A(1) - s); return s; }
  case 1: { A s = sig(x); *d = s * (A(1) + x * (A(1) - s)); return x * s; }
  case 2: { A t = tanh(x); *d = A(1) - t * t; return t; }
  default: *d = A(1); return x;
  }
}

template <typename T, typename A>
__device__ void bezier_fwd(const T *x, T *y, uint64_t groups, uint64_t s, int tk, int pk) {
  const uint64_t n = groups * s;
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)blockDim.x * gridDim.x) {
    const uint64_t g = i / s, j = i - g * s;
    const T *b = x + g * 5 * s + j;
    A t = pre(tk, ld<T, A>(b));
    A p0 = pre(pk, ld<T, A>(b + s)), p1 = pre(pk, ld<T, A>(b + 2 * s));
    A p2 = pre(pk, ld<T, A>(b + 3 * s)), p3 = pre(pk, ld<T, A>(b + 4 * s));
    A t2 = t * t, t3 = t2 * t, ti = A(1) - t, ti2 = ti * ti, ti3 = ti2 * ti;
    A out = ti3 * p0 + (ti2 * t) * (p1 * A(3));
    out = out + (ti * t2) * (p2 * A(3));
    out = out + t3 * p3;
    st<T, A>(y + i, out);
  }
}

template <typename T, typename A>
__device__ void bezier_bwd(const T *x, const T *dy, T *dx, uint64_t groups, uint64_t s, int tk,
                           int pk) {
  const uint64_t n = groups * s;
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)blockDim.x * gridDim.x) {
    const uint64_t g = i / s, j = i - g * s;
    const T *b = x + g * 5 * s + j;
    T *o = dx + g * 5 * s + j;
    A g_out = ld<T, A>(dy + i);
    A dt, d0, d1, d2, d3;
    A t = pre_d(tk, ld<T, A>(b), &dt);
    A p0 = pre_d(pk, ld<T, A>(b + s), &d0), p1 = pre_d(pk, ld<T, A>(b + 2 * s), &d1);
    A p2 = pre_d(pk, ld<T, A>(b + 3 * s), &d2), p3 = pre_d(pk, ld<T, A>(b + 4 * s), &d3);
    A ti = A(1) - t, ti2 = ti * ti, t2 = t * t;
    A dcurve_dt = A(3) * (-ti2 * p0 + (ti2 - A(2) * ti * t) * p1 + (A(2) * ti * t - t2) * p2 +
                          t2 * p3);
    st<T, A>(o, g_out * dcurve_dt * dt);
    st<T, A>(o + s, g_out * ti2 * ti * d0);
    st<T, A>(o + 2 * s, g_out * A(3) * ti2 * t * d1);
    st<T, A>(o + 3 * s, g_out * A(3) * ti * t2 * d2);
    st<T, A>(o + 4 * s, g_out * t2 * t * d3);
  }
}

#define BEZIER(NAME, T, A)                                                                      \
  extern "C" __global__ void bezier_fwd_##NAME(const T *x, T *y, uint64_t groups, uint64_t s,  \
                                               int tk, int pk) {                                \
    bezier_fwd<T, A>(x, y, groups, s, tk, pk);                                                  \
  }                                                                                             \
  extern "C" __global__ void bezier_bwd_##NAME(const T *x, const T *dy, T *dx, uint64_t groups, \
                                               uint64_t s, int tk, int pk) {                    \
    bezier_bwd<T, A>(x, dy, dx, groups, s, tk, pk);                                             \
  }

BEZIER(f32, float, float)
BEZIER(f64, double, double)
BEZIER(bf16, __nv_bfloat16, float)
