// fluxflow's fused CUDA kernels (PTX built by build.rs under the `cuda` feature).
//
// Bezier activation: x viewed as [G, 5, S] (group g's five channels t, p0..p3 over S positions),
// y as [G, S]:  y = (1-t)^3 p0 + 3(1-t)^2 t p1 + 3(1-t) t^2 p2 + t^3 p3  with t = pre_t(x0) and
// p_i = pre_p(x_{i+1}). The backward pass recomputes the curve from x.
// Pre-activation codes: 0 sigmoid, 1 SiLU, 2 tanh, 3 none.
// Arithmetic in float for f32/bf16/f16, in double for f64; 64-bit indexing throughout.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

template <typename T, typename A> __device__ __forceinline__ A ld(const T *p);
template <> __device__ __forceinline__ float ld<float, float>(const float *p) { return *p; }
template <> __device__ __forceinline__ double ld<double, double>(const double *p) { return *p; }
template <> __device__ __forceinline__ float ld<__nv_bfloat16, float>(const __nv_bfloat16 *p) {
  return __bfloat162float(*p);
}
template <> __device__ __forceinline__ float ld<__half, float>(const __half *p) {
  return __half2float(*p);
}
template <typename T, typename A> __device__ __forceinline__ void st(T *p, A v);
template <> __device__ __forceinline__ void st<float, float>(float *p, float v) { *p = v; }
template <> __device__ __forceinline__ void st<double, double>(double *p, double v) { *p = v; }
template <> __device__ __forceinline__ void st<__nv_bfloat16, float>(__nv_bfloat16 *p, float v) {
  *p = __float2bfloat16(v);
}
template <> __device__ __forceinline__ void st<__half, float>(__half *p, float v) {
  *p = __float2half(v);
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
BEZIER(f16, __half, float)

// GroupNorm over x [B, C, S] in G groups (C/G channels each), with per-channel gamma/beta.
// Reductions: each block handles a chunk of one (b, c) plane, reduces it in shared memory and
// adds the result to float64 accumulators per (b, g) row (and per channel c in the backward
// pass) with atomicAdd. Grid: (B*C planes, chunks per plane); blocks of a multiple of 32.
// Row accumulators `row` hold 4 doubles per (b, g): sum x, sum (x - mean)^2, and in the
// backward pass sum dxhat, sum dxhat * xhat. Channel accumulators `chan` hold sum dy * xhat
// (C doubles) then sum dy (C doubles).

template <int N>
__device__ __forceinline__ void block_sum(double (&v)[N], double (*shared)[32]) {
  // Warp reduction, then across warps through shared memory; lane 0 of warp 0 has the sums.
  for (int k = 0; k < N; ++k)
    for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0)
    for (int k = 0; k < N; ++k) shared[k][warp] = v[k];
  __syncthreads();
  if (warp == 0) {
    const int nw = (blockDim.x + 31) >> 5;
    for (int k = 0; k < N; ++k) {
      v[k] = lane < nw ? shared[k][lane] : 0.0;
      for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], o);
    }
  }
}

struct GnGeom {
  uint64_t c, s, groups;
};

__device__ __forceinline__ uint64_t gn_row(uint64_t plane, GnGeom g) {
  const uint64_t b = plane / g.c, c = plane % g.c;
  return b * g.groups + c / (g.c / g.groups);
}

__device__ __forceinline__ double gn_n(GnGeom g) { return (double)(g.c / g.groups) * g.s; }

// pass 0: row[4r] += sum x; pass 1: row[4r+1] += sum (x - mean)^2.
template <typename T, typename A>
__device__ void gn_stats(const T *x, double *row, GnGeom g, int pass) {
  __shared__ double shared[1][32];
  const uint64_t plane = blockIdx.x, r = gn_row(plane, g);
  const T *xp = x + plane * g.s;
  const double mean = pass ? row[4 * r] / gn_n(g) : 0.0;
  double v[1] = {0.0};
  for (uint64_t j = blockIdx.y * (uint64_t)blockDim.x + threadIdx.x; j < g.s;
       j += (uint64_t)blockDim.x * gridDim.y) {
    const double d = (double)ld<T, A>(xp + j) - mean;
    v[0] += pass ? d * d : d;
  }
  block_sum<1>(v, shared);
  if (threadIdx.x == 0) atomicAdd(&row[4 * r + pass], v[0]);
}

template <typename A>
__device__ __forceinline__ void gn_mean_rstd(const double *row, uint64_t r, GnGeom g, double eps,
                                             A *mean, A *rstd) {
  const double n = gn_n(g);
  *mean = (A)(row[4 * r] / n);
  *rstd = (A)(1.0 / sqrt(row[4 * r + 1] / n + eps));
}

template <typename T, typename A>
__device__ void gn_fwd(const T *x, const T *gamma, const T *beta, T *y, const double *row,
                       GnGeom g, double eps) {
  const uint64_t plane = blockIdx.x, c = plane % g.c, r = gn_row(plane, g);
  A mean, rstd;
  gn_mean_rstd(row, r, g, eps, &mean, &rstd);
  const A w = ld<T, A>(gamma + c), bb = ld<T, A>(beta + c);
  for (uint64_t j = blockIdx.y * (uint64_t)blockDim.x + threadIdx.x; j < g.s;
       j += (uint64_t)blockDim.x * gridDim.y) {
    const uint64_t i = plane * g.s + j;
    st<T, A>(y + i, (ld<T, A>(x + i) - mean) * rstd * w + bb);
  }
}

// row[4r+2] += sum dxhat, row[4r+3] += sum dxhat*xhat; chan[c] += sum dy*xhat, chan[C+c] += sum dy.
template <typename T, typename A>
__device__ void gn_bwd_reduce(const T *x, const T *gamma, const T *dy, double *row, double *chan,
                              GnGeom g, double eps) {
  __shared__ double shared[4][32];
  const uint64_t plane = blockIdx.x, c = plane % g.c, r = gn_row(plane, g);
  A mean, rstd;
  gn_mean_rstd(row, r, g, eps, &mean, &rstd);
  const A w = ld<T, A>(gamma + c);
  double v[4] = {0.0, 0.0, 0.0, 0.0};
  for (uint64_t j = blockIdx.y * (uint64_t)blockDim.x + threadIdx.x; j < g.s;
       j += (uint64_t)blockDim.x * gridDim.y) {
    const uint64_t i = plane * g.s + j;
    const A xhat = (ld<T, A>(x + i) - mean) * rstd, d = ld<T, A>(dy + i), dxhat = d * w;
    v[0] += dxhat;
    v[1] += (double)dxhat * xhat;
    v[2] += (double)d * xhat;
    v[3] += d;
  }
  block_sum<4>(v, shared);
  if (threadIdx.x == 0) {
    atomicAdd(&row[4 * r + 2], v[0]);
    atomicAdd(&row[4 * r + 3], v[1]);
    atomicAdd(&chan[c], v[2]);
    atomicAdd(&chan[g.c + c], v[3]);
  }
}

template <typename T, typename A>
__device__ void gn_bwd_dx(const T *x, const T *gamma, const T *dy, T *dx, const double *row,
                          GnGeom g, double eps) {
  const uint64_t plane = blockIdx.x, c = plane % g.c, r = gn_row(plane, g);
  A mean, rstd;
  gn_mean_rstd(row, r, g, eps, &mean, &rstd);
  const double n = gn_n(g);
  const A m1 = (A)(row[4 * r + 2] / n), m2 = (A)(row[4 * r + 3] / n);
  const A w = ld<T, A>(gamma + c);
  for (uint64_t j = blockIdx.y * (uint64_t)blockDim.x + threadIdx.x; j < g.s;
       j += (uint64_t)blockDim.x * gridDim.y) {
    const uint64_t i = plane * g.s + j;
    const A xhat = (ld<T, A>(x + i) - mean) * rstd, dxhat = ld<T, A>(dy + i) * w;
    st<T, A>(dx + i, rstd * (dxhat - m1 - xhat * m2));
  }
}

// dgamma and dbeta from the channel accumulators, after dx in the packed output.
template <typename T, typename A>
__device__ void gn_bwd_params(const double *chan, T *out, uint64_t c) {
  for (uint64_t k = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; k < 2 * c;
       k += (uint64_t)blockDim.x * gridDim.x)
    st<T, A>(out + k, (A)chan[k]);
}

#define GROUP_NORM(NAME, T, A)                                                                  \
  extern "C" __global__ void gn_stats_##NAME(const T *x, double *row, uint64_t c, uint64_t s,  \
                                             uint64_t groups, int pass) {                       \
    gn_stats<T, A>(x, row, GnGeom{c, s, groups}, pass);                                         \
  }                                                                                             \
  extern "C" __global__ void gn_fwd_##NAME(const T *x, const T *gamma, const T *beta, T *y,    \
                                           const double *row, uint64_t c, uint64_t s,           \
                                           uint64_t groups, double eps) {                       \
    gn_fwd<T, A>(x, gamma, beta, y, row, GnGeom{c, s, groups}, eps);                            \
  }                                                                                             \
  extern "C" __global__ void gn_bwd_reduce_##NAME(const T *x, const T *gamma, const T *dy,     \
                                                  double *row, double *chan, uint64_t c,        \
                                                  uint64_t s, uint64_t groups, double eps) {    \
    gn_bwd_reduce<T, A>(x, gamma, dy, row, chan, GnGeom{c, s, groups}, eps);                    \
  }                                                                                             \
  extern "C" __global__ void gn_bwd_dx_##NAME(const T *x, const T *gamma, const T *dy, T *dx,  \
                                              const double *row, uint64_t c, uint64_t s,        \
                                              uint64_t groups, double eps) {                    \
    gn_bwd_dx<T, A>(x, gamma, dy, dx, row, GnGeom{c, s, groups}, eps);                          \
  }                                                                                             \
  extern "C" __global__ void gn_bwd_params_##NAME(const double *chan, T *out, uint64_t c) {    \
    gn_bwd_params<T, A>(chan, out, c);                                                          \
  }

GROUP_NORM(f32, float, float)
GROUP_NORM(f64, double, double)
GROUP_NORM(bf16, __nv_bfloat16, float)
GROUP_NORM(f16, __half, float)
