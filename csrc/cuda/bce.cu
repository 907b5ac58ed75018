// CUDA kernels of the fused BCE-with-logits: plain pointers, sizes and cudaStream_t (the ATen
// glue is csrc/cuda/bce_glue.cpp).  Formulas: csrc/include/gankern/bce.h.
//
// Forward, reduction none: one elementwise kernel.
// Forward, mean/sum: each block reduces one fixed chunk of bce::kChunk elements (fixed per-thread
// order, then a fixed shared-memory tree) to a double partial; with one chunk the block writes the
// result itself (one launch), else a single-block kernel adds the partials in a fixed order.
// No atomics: bitwise reproducible run to run.
// Backward: one elementwise kernel (grad_input, and grad_target when asked).
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>
#include "gankern/bce.h"
#include "gankern/cuda_launchers.h"

namespace gankern {
namespace cuda_bce {

constexpr int kThreads = 256;
constexpr int kSumThreads = 512;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename Acc<T>::type to_acc(T v) { return static_cast<typename Acc<T>::type>(v); }
template <> __device__ __forceinline__ float to_acc<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Weight / pos_weight: mode 0 absent (value 1), 1 one element, 2 one per element.
template <typename A>
__device__ __forceinline__ A wval(const A* p, int mode, int64_t i) {
  return mode == 0 ? A(1) : (mode == 1 ? p[0] : p[i]);
}

template <typename T>
__device__ __forceinline__ typename Acc<T>::type elem_loss(const T* x, const T* t, typename Acc<T>::type t_s,
                                                           const typename Acc<T>::type* w, int w_mode,
                                                           const typename Acc<T>::type* pw, int pw_mode, int64_t i) {
  using A = typename Acc<T>::type;
  const A xv = to_acc(x[i]);
  const A tv = t ? to_acc(t[i]) : t_s;
  return bce::loss<A>(xv, tv, wval(w, w_mode, i), wval(pw, pw_mode, i), pw_mode != 0);
}

template <typename T>
__global__ void bce_fwd_none(const T* __restrict__ x, const T* __restrict__ t, typename Acc<T>::type t_s,
                             const typename Acc<T>::type* __restrict__ w, int w_mode,
                             const typename Acc<T>::type* __restrict__ pw, int pw_mode, T* __restrict__ out,
                             int64_t N) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = from_acc<T>(elem_loss(x, t, t_s, w, w_mode, pw, pw_mode, i));
}

// Block-wide sum in a fixed order (double).
__device__ __forceinline__ double block_sum(double v, double* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  return sh[0];
}

// One block per chunk.  final_out != nullptr (one chunk): writes scale * sum in T.
template <typename T>
__global__ void __launch_bounds__(kThreads) bce_fwd_reduce(
    const T* __restrict__ x, const T* __restrict__ t, typename Acc<T>::type t_s,
    const typename Acc<T>::type* __restrict__ w, int w_mode, const typename Acc<T>::type* __restrict__ pw,
    int pw_mode, double* __restrict__ partial, T* __restrict__ final_out, double scale, int64_t N) {
  using A = typename Acc<T>::type;
  __shared__ double sh[kThreads];
  const int64_t base = blockIdx.x * bce::kChunk;
  const int64_t end = base + bce::kChunk < N ? base + bce::kChunk : N;
  A acc = 0;
  for (int64_t i = base + threadIdx.x; i < end; i += kThreads) acc += elem_loss(x, t, t_s, w, w_mode, pw, pw_mode, i);
  const double s = block_sum(static_cast<double>(acc), sh);
  if (threadIdx.x == 0) {
    if (final_out) final_out[0] = from_acc<T>(static_cast<A>(s * scale));
    else partial[blockIdx.x] = s;
  }
}

template <typename T>
__global__ void __launch_bounds__(kSumThreads) bce_sum_partials(const double* __restrict__ partial, int64_t P,
                                                                 T* __restrict__ out, double scale) {
  using A = typename Acc<T>::type;
  __shared__ double sh[kSumThreads];
  double acc = 0;
  for (int64_t i = threadIdx.x; i < P; i += kSumThreads) acc += partial[i];
  const double s = block_sum(acc, sh);
  if (threadIdx.x == 0) out[0] = from_acc<T>(static_cast<A>(s * scale));
}

template <typename T>
__global__ void bce_bwd(const T* __restrict__ g, int g_full, typename Acc<T>::type g_scale, const T* __restrict__ x,
                        const T* __restrict__ t, typename Acc<T>::type t_s,
                        const typename Acc<T>::type* __restrict__ w, int w_mode,
                        const typename Acc<T>::type* __restrict__ pw, int pw_mode, T* __restrict__ gx,
                        T* __restrict__ gt, int64_t N) {
  using A = typename Acc<T>::type;
  const A g0 = g_full ? A(0) : to_acc(g[0]) * g_scale;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N; i += (int64_t)gridDim.x * blockDim.x) {
    const A xv = to_acc(x[i]);
    const A tv = t ? to_acc(t[i]) : t_s;
    const A gv = (g_full ? to_acc(g[i]) : g0) * wval(w, w_mode, i);
    const A pwv = wval(pw, pw_mode, i);
    gx[i] = from_acc<T>(bce::grad_input<A>(xv, tv, A(1), pwv, pw_mode != 0) * gv);
    if (gt) gt[i] = from_acc<T>(bce::grad_target<A>(xv, A(1), pwv, pw_mode != 0) * gv);
  }
}

static int grid_for(int64_t N, int threads) {
  int64_t b = (N + threads - 1) / threads;
  const int64_t cap = 65535LL * 32;
  return static_cast<int>(b < 1 ? 1 : (b > cap ? cap : b));
}

template <typename T>
cudaError_t fwd_launch(const void* x, const void* t, double t_s, const void* w, int w_mode, const void* pw,
                       int pw_mode, void* out, double* partial, int64_t N, int64_t reduction, cudaStream_t s) {
  using A = typename Acc<T>::type;
  const T* xp = static_cast<const T*>(x);
  const T* tp = static_cast<const T*>(t);
  const A* wp = static_cast<const A*>(w);
  const A* pwp = static_cast<const A*>(pw);
  T* op = static_cast<T*>(out);
  if (reduction == bce::kNone) {
    if (N > 0) bce_fwd_none<T><<<grid_for(N, kThreads), kThreads, 0, s>>>(xp, tp, A(t_s), wp, w_mode, pwp, pw_mode, op, N);
    return cudaGetLastError();
  }
  const double scale = reduction == bce::kMean ? (N ? 1.0 / static_cast<double>(N) : __builtin_nan("")) : 1.0;
  const int64_t P = (N + bce::kChunk - 1) / bce::kChunk;
  if (P <= 1) {
    bce_fwd_reduce<T><<<1, kThreads, 0, s>>>(xp, tp, A(t_s), wp, w_mode, pwp, pw_mode, nullptr, op, scale, N);
  } else {
    bce_fwd_reduce<T><<<static_cast<unsigned>(P), kThreads, 0, s>>>(xp, tp, A(t_s), wp, w_mode, pwp, pw_mode, partial,
                                                                   nullptr, scale, N);
    bce_sum_partials<T><<<1, kSumThreads, 0, s>>>(partial, P, op, scale);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_launch(const void* g, bool g_full, double g_scale, const void* x, const void* t, double t_s,
                       const void* w, int w_mode, const void* pw, int pw_mode, void* gx, void* gt, int64_t N,
                       cudaStream_t s) {
  using A = typename Acc<T>::type;
  if (N > 0)
    bce_bwd<T><<<grid_for(N, kThreads), kThreads, 0, s>>>(
        static_cast<const T*>(g), g_full ? 1 : 0, A(g_scale), static_cast<const T*>(x), static_cast<const T*>(t),
        A(t_s), static_cast<const A*>(w), w_mode, static_cast<const A*>(pw), pw_mode, static_cast<T*>(gx),
        static_cast<T*>(gt), N);
  return cudaGetLastError();
}

}  // namespace cuda_bce

// ---- launchers (gankern/cuda_launchers.h) ----
namespace cuda {
using cuda_bce::fwd_launch;
using cuda_bce::bwd_launch;

cudaError_t bce_forward(DType dtype, const void* x, const void* t, double t_s, const void* w, int w_mode,
                        const void* pw, int pw_mode, void* out, double* partial, int64_t N, int64_t reduction,
                        cudaStream_t s) {
  switch (dtype) {
    case DType::F32: return fwd_launch<float>(x, t, t_s, w, w_mode, pw, pw_mode, out, partial, N, reduction, s);
    case DType::F16: return fwd_launch<__half>(x, t, t_s, w, w_mode, pw, pw_mode, out, partial, N, reduction, s);
    case DType::BF16: return fwd_launch<__nv_bfloat16>(x, t, t_s, w, w_mode, pw, pw_mode, out, partial, N, reduction, s);
    case DType::F64: return fwd_launch<double>(x, t, t_s, w, w_mode, pw, pw_mode, out, partial, N, reduction, s);
  }
  return cudaErrorInvalidValue;
}

cudaError_t bce_backward(DType dtype, const void* g, bool g_full, double g_scale, const void* x, const void* t,
                         double t_s, const void* w, int w_mode, const void* pw, int pw_mode, void* gx, void* gt,
                         int64_t N, cudaStream_t s) {
  switch (dtype) {
    case DType::F32: return bwd_launch<float>(g, g_full, g_scale, x, t, t_s, w, w_mode, pw, pw_mode, gx, gt, N, s);
    case DType::F16: return bwd_launch<__half>(g, g_full, g_scale, x, t, t_s, w, w_mode, pw, pw_mode, gx, gt, N, s);
    case DType::BF16: return bwd_launch<__nv_bfloat16>(g, g_full, g_scale, x, t, t_s, w, w_mode, pw, pw_mode, gx, gt, N, s);
    case DType::F64: return bwd_launch<double>(g, g_full, g_scale, x, t, t_s, w, w_mode, pw, pw_mode, gx, gt, N, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace gankern
