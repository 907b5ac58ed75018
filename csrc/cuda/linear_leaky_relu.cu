// CUDA kernels of the fused Linear + LeakyReLU (no ATen: plain pointers, sizes, cudaStream_t).
// The GEMMs run in cuBLAS(Lt) through ATen in linear_leaky_relu_glue.cpp (the bias goes into the
// cuBLASLt epilogue via at::addmm); cuBLASLt has no LeakyReLU epilogue, so these kernels do:
//   * llr_act_cuda:        out = leaky_relu(out [+ bias]) in place, fp32 math, one rounding
//   * llr_dz_colsum_cuda:  dZ = dY * (s > 0 ? 1 : slope) and the bias gradient (column sums) in one
//                          pass: per-block partial column sums (fp32/fp64), then a deterministic
//                          second pass over the partials (no atomics).
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include "gankern/linear_leaky_relu.h"
#include "gankern/cuda_launchers.h"

namespace gankern {
namespace llr_cuda {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename A, typename T> __device__ __forceinline__ A load(const T* p) { return static_cast<A>(*p); }
template <> __device__ __forceinline__ float load<float, __half>(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ float load<float, __nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <typename T, typename A> __device__ __forceinline__ T cast(A v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half cast<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 cast<__nv_bfloat16, float>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__global__ void act_kernel(T* __restrict__ out, const T* __restrict__ bias, int64_t M, int64_t N, double slope) {
  using A = typename Acc<T>::type;
  const int64_t total = M * N;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    A v = load<A>(out + i);
    if (bias != nullptr) v += load<A>(bias + (i % N));
    out[i] = cast<T>(gankern::llr::leaky_relu<A>(v, static_cast<A>(slope)));
  }
}

constexpr int kTX = 32, kTY = 8;

// grid (ceil(N / 32), gy); block (32, 8).  Rows strided by gy * 8; partial[gy][N] column sums.
template <typename T>
__global__ void dz_kernel(const T* __restrict__ g, const T* __restrict__ s, T* __restrict__ dz,
                          typename Acc<T>::type* __restrict__ partial, int64_t M, int64_t N, double slope) {
  using A = typename Acc<T>::type;
  __shared__ A red[kTY][kTX];
  const int64_t col = (int64_t)blockIdx.x * kTX + threadIdx.x;
  A acc = 0;
  if (col < N) {
    for (int64_t r = (int64_t)blockIdx.y * kTY + threadIdx.y; r < M; r += (int64_t)gridDim.y * kTY) {
      const int64_t i = r * N + col;
      const A v = gankern::llr::leaky_relu_grad<A>(load<A>(g + i), load<A>(s + i), static_cast<A>(slope));
      dz[i] = cast<T>(v);
      acc += v;
    }
  }
  if (partial == nullptr) return;
  red[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < N) {
    A t = 0;
#pragma unroll
    for (int y = 0; y < kTY; ++y) t += red[y][threadIdx.x];
    partial[(int64_t)blockIdx.y * N + col] = t;
  }
}

template <typename T>
__global__ void colsum_kernel(const typename Acc<T>::type* __restrict__ partial, T* __restrict__ db, int gy, int64_t N) {
  using A = typename Acc<T>::type;
  const int64_t col = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (col >= N) return;
  A t = 0;
  for (int y = 0; y < gy; ++y) t += partial[(int64_t)y * N + col];
  db[col] = cast<T>(t);
}

template <typename T>
cudaError_t act(void* out, const void* bias, int64_t M, int64_t N, double slope, cudaStream_t st) {
  const int64_t total = M * N;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  act_kernel<T><<<(unsigned)(blocks < 65535 ? blocks : 65535), threads, 0, st>>>(
      static_cast<T*>(out), static_cast<const T*>(bias), M, N, slope);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dz_colsum(const void* g, const void* s, void* dz, void* partial, void* db, int64_t M, int64_t N, int gy,
                      double slope, cudaStream_t st) {
  using A = typename Acc<T>::type;
  if (M == 0 || N == 0) return cudaSuccess;
  dim3 grid((unsigned)((N + kTX - 1) / kTX), (unsigned)gy), block(kTX, kTY);
  dz_kernel<T><<<grid, block, 0, st>>>(static_cast<const T*>(g), static_cast<const T*>(s), static_cast<T*>(dz),
                                       db != nullptr ? static_cast<A*>(partial) : nullptr, M, N, slope);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || db == nullptr) return e;
  colsum_kernel<T><<<(unsigned)((N + 255) / 256), 256, 0, st>>>(static_cast<const A*>(partial), static_cast<T*>(db), gy, N);
  return cudaGetLastError();
}

}  // namespace llr_cuda

// ---- launchers (gankern/cuda_launchers.h) ----
namespace cuda {

cudaError_t llr_act(DType dtype, void* out, const void* bias, int64_t M, int64_t N, double slope, cudaStream_t st) {
  switch (dtype) {
    case DType::F32: return llr_cuda::act<float>(out, bias, M, N, slope, st);
    case DType::F16: return llr_cuda::act<__half>(out, bias, M, N, slope, st);
    case DType::BF16: return llr_cuda::act<__nv_bfloat16>(out, bias, M, N, slope, st);
    case DType::F64: return llr_cuda::act<double>(out, bias, M, N, slope, st);
  }
  return cudaErrorInvalidValue;
}

cudaError_t llr_dz_colsum(DType dtype, const void* g, const void* s, void* dz, void* partial, void* db, int64_t M,
                          int64_t N, int gy, double slope, cudaStream_t st) {
  switch (dtype) {
    case DType::F32: return llr_cuda::dz_colsum<float>(g, s, dz, partial, db, M, N, gy, slope, st);
    case DType::F16: return llr_cuda::dz_colsum<__half>(g, s, dz, partial, db, M, N, gy, slope, st);
    case DType::BF16: return llr_cuda::dz_colsum<__nv_bfloat16>(g, s, dz, partial, db, M, N, gy, slope, st);
    case DType::F64: return llr_cuda::dz_colsum<double>(g, s, dz, partial, db, M, N, gy, slope, st);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace gankern
