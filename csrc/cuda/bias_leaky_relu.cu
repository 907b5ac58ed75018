// CUDA kernels of the fused bias + LeakyReLU (no ATen: plain pointers, sizes, cudaStream_t; the ATen
// glue is csrc/cuda/bias_leaky_relu_glue.cpp).  Formulas: csrc/include/gankern/bias_leaky_relu.h.
// The tensor is (outer, C, inner) in memory (inner == 1: channels-last / (N, C)).
//   * bact_fwd:  y = leaky_relu(x + b[c]) elementwise, fp32 math (fp64 for double), one rounding.
//   * bact_bwd:  dx = dy * (y > 0 ? 1 : slope) and per-block partial bias sums in one pass; then a
//                single pass adds the partials in a fixed order (no atomics: reproducible).
//       inner == 1: block (32, 8) over 32 channels x rows strided by gridDim.y * 8 (coalesced along C);
//       inner >  1: block (256) per (channel, row group): rows o = blockIdx.y, +gridDim.y, ...,
//                   threads along inner.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include "gankern/bias_leaky_relu.h"
#include "gankern/cuda_launchers.h"

namespace gankern {
namespace bact_cuda {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename A, typename T> __device__ __forceinline__ A load(const T* p) { return static_cast<A>(*p); }
template <> __device__ __forceinline__ float load<float, __half>(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ float load<float, __nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <typename T, typename A> __device__ __forceinline__ T cast(A v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half cast<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 cast<__nv_bfloat16, float>(float v) { return __float2bfloat16_rn(v); }

constexpr int kThreads = 256;
constexpr int kTX = 32, kTY = 8;
constexpr int kMaxRowGroups = 64;

template <typename T>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const T* __restrict__ x, const T* __restrict__ b,
                                                       T* __restrict__ y, int64_t total, int64_t C, int64_t inner,
                                                       double slope) {
  using A = typename Acc<T>::type;
  const A s = static_cast<A>(slope);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t c = inner == 1 ? i % C : (i / inner) % C;
    y[i] = cast<T>(gankern::bact::bias_leaky_relu<A>(load<A>(x + i), load<A>(b + c), s));
  }
}

// inner == 1: grid (ceil(C / 32), gy), block (32, 8); partial[gy][C].
template <typename T>
__global__ void bwd_rows_kernel(const T* __restrict__ g, const T* __restrict__ y, T* __restrict__ dx,
                                typename Acc<T>::type* __restrict__ partial, int64_t R, int64_t C, double slope) {
  using A = typename Acc<T>::type;
  __shared__ A red[kTY][kTX];
  const A s = static_cast<A>(slope);
  const int64_t c = (int64_t)blockIdx.x * kTX + threadIdx.x;
  A acc = 0;
  if (c < C) {
    for (int64_t r = (int64_t)blockIdx.y * kTY + threadIdx.y; r < R; r += (int64_t)gridDim.y * kTY) {
      const int64_t i = r * C + c;
      const A v = gankern::bact::bias_leaky_relu_grad<A>(load<A>(g + i), load<A>(y + i), s);
      if (dx != nullptr) dx[i] = cast<T>(v);
      acc += v;
    }
  }
  if (partial == nullptr) return;
  red[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    A t = 0;
    for (int k = 0; k < kTY; ++k) t += red[k][threadIdx.x];
    partial[(int64_t)blockIdx.y * C + c] = t;
  }
}

// inner > 1: grid (C, gy), block (256); partial[gy][C].
template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_planes_kernel(const T* __restrict__ g, const T* __restrict__ y,
                                                              T* __restrict__ dx,
                                                              typename Acc<T>::type* __restrict__ partial,
                                                              int64_t outer, int64_t C, int64_t inner, double slope) {
  using A = typename Acc<T>::type;
  __shared__ A red[kThreads];
  const A s = static_cast<A>(slope);
  const int64_t c = blockIdx.x;
  A acc = 0;
  for (int64_t o = blockIdx.y; o < outer; o += gridDim.y) {
    const int64_t base = (o * C + c) * inner;
    for (int64_t i = threadIdx.x; i < inner; i += kThreads) {
      const A v = gankern::bact::bias_leaky_relu_grad<A>(load<A>(g + base + i), load<A>(y + base + i), s);
      if (dx != nullptr) dx[base + i] = cast<T>(v);
      acc += v;
    }
  }
  if (partial == nullptr) return;
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int k = kThreads / 2; k > 0; k >>= 1) {
    if (threadIdx.x < k) red[threadIdx.x] += red[threadIdx.x + k];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[(int64_t)blockIdx.y * C + c] = red[0];
}

// db[c] = sum_k partial[k][c], k in order.
template <typename T>
__global__ void __launch_bounds__(kThreads) colsum_kernel(const typename Acc<T>::type* __restrict__ partial,
                                                          T* __restrict__ db, int64_t P, int64_t C) {
  using A = typename Acc<T>::type;
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= C) return;
  A t = 0;
  for (int64_t k = 0; k < P; ++k) t += partial[k * C + c];
  db[c] = cast<T>(t);
}

int grid_1d(int64_t n) {
  int64_t b = (n + kThreads - 1) / kThreads;
  return (int)(b < 65535 * 8 ? (b < 1 ? 1 : b) : 65535 * 8);
}

template <typename T>
cudaError_t fwd_t(const void* x, const void* b, void* y, int64_t outer, int64_t C, int64_t inner, double slope,
                  cudaStream_t st) {
  const int64_t total = outer * C * inner;
  if (total == 0) return cudaSuccess;
  fwd_kernel<T><<<grid_1d(total), kThreads, 0, st>>>(static_cast<const T*>(x), static_cast<const T*>(b),
                                                     static_cast<T*>(y), total, C, inner, slope);
  return cudaGetLastError();
}

// Number of partial rows the backward needs (the glue allocates partial[P][C] in Acc<T>).
int64_t bwd_groups_t(int64_t outer, int64_t C, int64_t inner) {
  if (inner == 1) {
    const int64_t rows_per = kTY * 16;  // >= 16 rows per thread
    int64_t gy = (outer + rows_per - 1) / rows_per;
    return gy < 1 ? 1 : (gy > kMaxRowGroups ? kMaxRowGroups : gy);
  }
  const int64_t per = (4 * kThreads + inner - 1) / inner;  // >= ~4 elements per thread
  int64_t gy = (outer + per - 1) / per;
  return gy < 1 ? 1 : (gy > kMaxRowGroups ? kMaxRowGroups : gy);
}

template <typename T>
cudaError_t bwd_t(const void* g, const void* y, void* dx, void* db, void* partial, int64_t outer, int64_t C,
                  int64_t inner, double slope, cudaStream_t st) {
  using A = typename Acc<T>::type;
  if (outer * C * inner == 0) return cudaSuccess;
  const int64_t P = bwd_groups_t(outer, C, inner);
  A* part = db != nullptr ? static_cast<A*>(partial) : nullptr;
  if (inner == 1) {
    dim3 grid((unsigned)((C + kTX - 1) / kTX), (unsigned)P);
    bwd_rows_kernel<T><<<grid, dim3(kTX, kTY), 0, st>>>(static_cast<const T*>(g), static_cast<const T*>(y),
                                                        static_cast<T*>(dx), part, outer, C, slope);
  } else {
    dim3 grid((unsigned)C, (unsigned)P);
    bwd_planes_kernel<T><<<grid, kThreads, 0, st>>>(static_cast<const T*>(g), static_cast<const T*>(y),
                                                    static_cast<T*>(dx), part, outer, C, inner, slope);
  }
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || db == nullptr) return e;
  colsum_kernel<T><<<(unsigned)((C + kThreads - 1) / kThreads), kThreads, 0, st>>>(part, static_cast<T*>(db), P, C);
  return cudaGetLastError();
}

}  // namespace bact_cuda

// ---- launchers (gankern/cuda_launchers.h) ----
namespace cuda {
using bact_cuda::fwd_t;
using bact_cuda::bwd_t;

cudaError_t bact_forward(DType dtype, const void* x, const void* b, void* y, int64_t outer, int64_t C, int64_t inner,
                         double slope, cudaStream_t st) {
  switch (dtype) {
    case DType::F32: return fwd_t<float>(x, b, y, outer, C, inner, slope, st);
    case DType::F16: return fwd_t<__half>(x, b, y, outer, C, inner, slope, st);
    case DType::BF16: return fwd_t<__nv_bfloat16>(x, b, y, outer, C, inner, slope, st);
    case DType::F64: return fwd_t<double>(x, b, y, outer, C, inner, slope, st);
  }
  return cudaErrorInvalidValue;
}

int64_t bact_bwd_groups(int64_t outer, int64_t C, int64_t inner) { return bact_cuda::bwd_groups_t(outer, C, inner); }

cudaError_t bact_backward(DType dtype, const void* g, const void* y, void* dx, void* db, void* partial,
                          int64_t outer, int64_t C, int64_t inner, double slope, cudaStream_t st) {
  switch (dtype) {
    case DType::F32: return bwd_t<float>(g, y, dx, db, partial, outer, C, inner, slope, st);
    case DType::F16: return bwd_t<__half>(g, y, dx, db, partial, outer, C, inner, slope, st);
    case DType::BF16: return bwd_t<__nv_bfloat16>(g, y, dx, db, partial, outer, C, inner, slope, st);
    case DType::F64: return bwd_t<double>(g, y, dx, db, partial, outer, C, inner, slope, st);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace gankern
