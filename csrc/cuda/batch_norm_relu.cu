// CUDA kernels of the fused BatchNorm + ReLU.  Plain kernels + launchers (no ATen); the glue
// is csrc/cuda/batch_norm_relu_glue.cpp.
//
// Forward (training): per-channel partial statistics of x - K (K = the channel's first value) over a fixed split
// of the rows, in double for every input dtype (each thread Welford, then a fixed-order Chan merge inside the
// block: shared memory / warp shuffles; plus the plain sum for non-finite data), a second kernel merging the partials in a fixed order (deterministic, no atomics)
// that also updates the running stats and folds scale/shift, then one elementwise pass.
// Backward: partial (sum g, sum g*(x-mean)) the same way, a per-channel final kernel, and one
// elementwise pass for dx = g k1 + ((x - mean) invstd) k3 + k2 (the textbook k3 = -w invstd^3 sgd / M
// underflows float at 1e30-scale data; (x - mean) invstd is O(1) at any scale).  The activation's mask is recomputed from x with the forward's fma.
// Activation: relu for negative_slope == 0, leaky_relu for negative_slope > 0 (bnr::act /
// bnr::act_grad, shared with the CPU kernels).  Training on an empty batch (N * S == 0) leaves
// the running statistics unchanged and gives zero weight / bias gradients (as torch).
// The split of the work depends only on the shape, so the bits are reproducible.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cfloat>
#include <cstdint>
#include "gankern/batch_norm_relu.h"
#include "gankern/cuda_launchers.h"

namespace gankern {
namespace bnr {
namespace {

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T> __device__ __forceinline__ T from_acc(double v);
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

__device__ __forceinline__ float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return fma(a, b, c); }
__device__ __forceinline__ float rsqrt_acc(float v) { return 1.0f / sqrtf(v); }
__device__ __forceinline__ double rsqrt_acc(double v) { return 1.0 / sqrt(v); }

constexpr int kRowsTX = 32, kRowsTY = 8;  // rows kernels: 32 channels x 8 row lanes
constexpr int kPlanarThreads = 256;       // planar kernels: threads along the reduction

struct Plan {
  int64_t nprog, rows_per_prog;
};

Plan make_plan(int64_t N, int64_t C, int64_t S, bool rows) {
  const int64_t R = N * S;
  int64_t nprog;
  if (rows) {
    const int64_t cblocks = (C + kRowsTX - 1) / kRowsTX;
    nprog = (R + 127) / 128;
    const int64_t cap = cblocks >= 2048 ? 1 : 2048 / cblocks;
    nprog = nprog < cap ? nprog : cap;
  } else {
    nprog = (R + 2047) / 2048;
    const int64_t cap = C >= 2048 ? 1 : 2048 / C;
    nprog = nprog < cap ? nprog : cap;
  }
  if (nprog < 1) nprog = 1;
  Plan p;
  p.rows_per_prog = (R + nprog - 1) / nprog;
  if (p.rows_per_prog < 1) p.rows_per_prog = 1;
  p.nprog = (R + p.rows_per_prog - 1) / p.rows_per_prog;
  if (p.nprog < 1) p.nprog = 1;
  return p;
}

// ------------------------------------------------------------------ forward statistics
template <typename T, typename A>
__global__ void stats_rows_kernel(const T* __restrict__ x, int64_t R, int64_t C, int64_t rows_per_prog,
                                  A* __restrict__ pn, A* __restrict__ pmean, A* __restrict__ pm2, A* __restrict__ psum) {
  __shared__ A sn[kRowsTY][kRowsTX], sm[kRowsTY][kRowsTX], s2[kRowsTY][kRowsTX], ss[kRowsTY][kRowsTX];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = int64_t(blockIdx.x) * kRowsTX + tx;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_prog;
  const int64_t r1 = r0 + rows_per_prog < R ? r0 + rows_per_prog : R;
  A n = 0, mean = 0, m2 = 0, sum = 0;
  if (c < C) {
    const A K = to_acc(x[c]);  // shift: the channel's first value (see fold_kernel)
    for (int64_t r = r0 + ty; r < r1; r += kRowsTY) {
      const A xv = A(to_acc(x[r * C + c]));
      const A v = xv - K;
      sum += xv;  // plain sum: the non-finite rule (see fold_kernel)
      n += A(1);
      const A d = v - mean;
      mean += d / n;
      m2 = fma_acc(d, v - mean, m2);
    }
  }
  sn[ty][tx] = n;
  sm[ty][tx] = mean;
  s2[ty][tx] = m2;
  ss[ty][tx] = sum;
  __syncthreads();
  if (ty == 0 && c < C) {
    for (int j = 1; j < kRowsTY; ++j) {
      chan_merge(n, mean, m2, sn[j][tx], sm[j][tx], s2[j][tx]);
      sum += ss[j][tx];
    }
    const int64_t o = int64_t(blockIdx.y) * C + c;
    pn[o] = n;
    pmean[o] = mean;
    pm2[o] = m2;
    psum[o] = sum;
  }
}

template <typename T, typename A>
__global__ void stats_planar_kernel(const T* __restrict__ x, int64_t R, int64_t C, int64_t S, int64_t rows_per_prog,
                                    A* __restrict__ pn, A* __restrict__ pmean, A* __restrict__ pm2, A* __restrict__ psum) {
  __shared__ A wn[kPlanarThreads / 32], wm[kPlanarThreads / 32], w2[kPlanarThreads / 32], ws[kPlanarThreads / 32];
  const int64_t c = blockIdx.x;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_prog;
  const int64_t r1 = r0 + rows_per_prog < R ? r0 + rows_per_prog : R;
  A n = 0, mean = 0, m2 = 0, sum = 0;
  const A K = to_acc(x[c * S]);  // shift: the channel's first value (see fold_kernel)
  for (int64_t r = r0 + threadIdx.x; r < r1; r += kPlanarThreads) {
    const int64_t nn = r / S, s = r - nn * S;
    const A xv = A(to_acc(x[(nn * C + c) * S + s]));
    const A v = xv - K;
    sum += xv;  // plain sum: the non-finite rule (see fold_kernel)
    n += A(1);
    const A d = v - mean;
    mean += d / n;
    m2 = fma_acc(d, v - mean, m2);
  }
  for (int off = 16; off > 0; off >>= 1) {  // fixed shuffle tree
    const A on = __shfl_down_sync(0xffffffffu, n, off);
    const A om = __shfl_down_sync(0xffffffffu, mean, off);
    const A o2 = __shfl_down_sync(0xffffffffu, m2, off);
    sum += __shfl_down_sync(0xffffffffu, sum, off);
    chan_merge(n, mean, m2, on, om, o2);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) { wn[warp] = n; wm[warp] = mean; w2[warp] = m2; ws[warp] = sum; }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int j = 1; j < kPlanarThreads / 32; ++j) {
      chan_merge(n, mean, m2, wn[j], wm[j], w2[j]);
      sum += ws[j];
    }
    const int64_t o = int64_t(blockIdx.y) * C + c;
    pn[o] = n;
    pmean[o] = mean;
    pm2[o] = m2;
    psum[o] = sum;
  }
}

// Per channel: merge partials (training) or read the running stats (eval); running-stat update;
// save mean / invstd; fold scale / shift.  The partials are statistics of x - K, K = the
// channel's first value, so that fp32 keeps full precision when |mean| >> std, and they are double
// (W) for every input dtype: squared deviations of fp32/bf16 data beyond ~1e19 overflow float (torch's CPU
// kernel accumulates in double as well; the Triton kernels do the same).  mean / invstd are computed in W,
// then rounded: 1e30-scale data has var 1e60 (beyond float) and invstd 1e-30 (within).
// Non-finite data (as torch's CPU kernel): the mean is the plain sum / count (+inf stays +inf), the variance NaN.
template <typename T, typename P, typename A, typename W>
__global__ void fold_kernel(const T* __restrict__ x, int64_t S, bool rows, const W* __restrict__ pn,
                            const W* __restrict__ pmean, const W* __restrict__ pm2, const W* __restrict__ psum,
                            int64_t nprog, int64_t C, int64_t R, P* running_mean, P* running_var,
                            const P* __restrict__ weight, const P* __restrict__ bias, bool training, double momentum,
                            double eps, A* __restrict__ save_mean, A* __restrict__ save_invstd, A* __restrict__ scale,
                            A* __restrict__ shift) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  A mean, invstd;
  if (training && R == 0) {  // no data: running stats unchanged; the backward gives zero gradients
    mean = A(0);
    invstd = A(0);
  } else if (training) {
    W n = 0, m = 0, m2 = 0, total = 0;
    for (int64_t i = 0; i < nprog; ++i) {
      chan_merge(n, m, m2, pn[i * C + c], pmean[i * C + c], pm2[i * C + c]);
      total += psum[i * C + c];
    }
    m += W(to_acc(x[rows ? c : c * S]));  // undo the shift
    if (!(fabs(total) <= DBL_MAX)) {  // an input was inf / NaN (finite fp32 sums cannot overflow double)
      m = total / W(R);
      m2 = total - total;  // inf - inf or NaN: NaN
    }
    const W var = m2 / W(R);
    mean = A(m);
    invstd = A(W(1) / sqrt(var + W(eps)));
    if (running_mean != nullptr) {
      const W mom = W(momentum);
      running_mean[c] = from_acc<P>(A((W(1) - mom) * W(to_acc(running_mean[c])) + mom * m));
      running_var[c] = from_acc<P>(A((W(1) - mom) * W(to_acc(running_var[c])) + mom * (m2 / W(R - 1))));
    }
  } else {
    mean = to_acc(running_mean[c]);
    invstd = A(W(1) / sqrt(W(to_acc(running_var[c])) + W(eps)));
  }
  const A w = weight != nullptr ? A(to_acc(weight[c])) : A(1);
  const A b = bias != nullptr ? A(to_acc(bias[c])) : A(0);
  A sc, sf;
  fold(mean, invstd, w, b, sc, sf);
  save_mean[c] = mean;
  save_invstd[c] = invstd;
  scale[c] = sc;
  shift[c] = sf;
}

template <typename T, typename A>
__global__ void apply_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t total, int64_t C, int64_t S,
                             bool rows, const A* __restrict__ scale, const A* __restrict__ shift, A slope) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = rows ? i % C : (i / S) % C;
    const A pre = fma_acc(A(to_acc(x[i])), scale[c], shift[c]);
    y[i] = from_acc<T>(act(pre, slope));  // NaN propagates, as torch.relu / leaky_relu
  }
}

// ------------------------------------------------------------------ backward
template <typename T, typename P, typename A>
__device__ __forceinline__ void channel_fold(int64_t c, const P* weight, const P* bias, const A* mean,
                                             const A* invstd, A& m, A& sc, A& sf) {
  const A w = weight != nullptr ? A(to_acc(weight[c])) : A(1);
  const A b = bias != nullptr ? A(to_acc(bias[c])) : A(0);
  m = mean[c];
  fold(m, invstd[c], w, b, sc, sf);
}

template <typename T, typename P, typename A>
__global__ void bwd_rows_kernel(const T* __restrict__ dy, const T* __restrict__ x, int64_t R, int64_t C,
                                int64_t rows_per_prog, const P* weight, const P* bias, const A* __restrict__ mean,
                                const A* __restrict__ invstd, A* __restrict__ p1, A* __restrict__ p2, A slope) {
  __shared__ A s1[kRowsTY][kRowsTX], s2[kRowsTY][kRowsTX];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = int64_t(blockIdx.x) * kRowsTX + tx;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_prog;
  const int64_t r1 = r0 + rows_per_prog < R ? r0 + rows_per_prog : R;
  A a1 = 0, a2 = 0;
  if (c < C) {
    A m, sc, sf;
    channel_fold<T, P, A>(c, weight, bias, mean, invstd, m, sc, sf);
    for (int64_t r = r0 + ty; r < r1; r += kRowsTY) {
      const A xv = to_acc(x[r * C + c]);
      const A g = act_grad(fma_acc(xv, sc, sf), A(to_acc(dy[r * C + c])), slope);
      a1 += g;
      a2 = fma_acc(g, xv - m, a2);
    }
  }
  s1[ty][tx] = a1;
  s2[ty][tx] = a2;
  __syncthreads();
  if (ty == 0 && c < C) {
    for (int j = 1; j < kRowsTY; ++j) { a1 += s1[j][tx]; a2 += s2[j][tx]; }
    p1[int64_t(blockIdx.y) * C + c] = a1;
    p2[int64_t(blockIdx.y) * C + c] = a2;
  }
}

template <typename T, typename P, typename A>
__global__ void bwd_planar_kernel(const T* __restrict__ dy, const T* __restrict__ x, int64_t R, int64_t C, int64_t S,
                                  int64_t rows_per_prog, const P* weight, const P* bias, const A* __restrict__ mean,
                                  const A* __restrict__ invstd, A* __restrict__ p1, A* __restrict__ p2, A slope) {
  __shared__ A w1[kPlanarThreads / 32], w2[kPlanarThreads / 32];
  const int64_t c = blockIdx.x;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_prog;
  const int64_t r1 = r0 + rows_per_prog < R ? r0 + rows_per_prog : R;
  A m, sc, sf;
  channel_fold<T, P, A>(c, weight, bias, mean, invstd, m, sc, sf);
  A a1 = 0, a2 = 0;
  for (int64_t r = r0 + threadIdx.x; r < r1; r += kPlanarThreads) {
    const int64_t nn = r / S, s = r - nn * S;
    const int64_t o = (nn * C + c) * S + s;
    const A xv = to_acc(x[o]);
    const A g = act_grad(fma_acc(xv, sc, sf), A(to_acc(dy[o])), slope);
    a1 += g;
    a2 = fma_acc(g, xv - m, a2);
  }
  for (int off = 16; off > 0; off >>= 1) {
    a1 += __shfl_down_sync(0xffffffffu, a1, off);
    a2 += __shfl_down_sync(0xffffffffu, a2, off);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) { w1[warp] = a1; w2[warp] = a2; }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int j = 1; j < kPlanarThreads / 32; ++j) { a1 += w1[j]; a2 += w2[j]; }
    p1[int64_t(blockIdx.y) * C + c] = a1;
    p2[int64_t(blockIdx.y) * C + c] = a2;
  }
}

template <typename P, typename A>
__global__ void bwd_final_kernel(const A* __restrict__ p1, const A* __restrict__ p2, int64_t nprog, int64_t C,
                                 int64_t R, const P* weight, const A* __restrict__ invstd, bool training,
                                 P* __restrict__ grad_weight, P* __restrict__ grad_bias, A* __restrict__ k1,
                                 A* __restrict__ k2, A* __restrict__ k3) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  A sg = 0, sgd = 0;
  for (int64_t i = 0; i < nprog; ++i) { sg += p1[i * C + c]; sgd += p2[i * C + c]; }
  const A is = invstd[c];
  const A w = weight != nullptr ? A(to_acc(weight[c])) : A(1);
  if (R == 0) {  // no data: zero gradients (as torch), whatever the saved statistics
    grad_weight[c] = from_acc<P>(A(0));
    grad_bias[c] = from_acc<P>(A(0));
    k1[c] = k2[c] = k3[c] = A(0);
    return;
  }
  grad_weight[c] = from_acc<P>(sgd * is);
  grad_bias[c] = from_acc<P>(sg);
  const A a = w * is;
  k1[c] = a;
  k2[c] = training ? -a * sg / A(R) : A(0);
  k3[c] = training ? -a * (is * sgd / A(R)) : A(0);  // times (x - mean) * invstd: in range at any data scale
}

template <typename T, typename P, typename A>
__global__ void bwd_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, int64_t total,
                              int64_t C, int64_t S, bool rows, const P* weight, const P* bias,
                              const A* __restrict__ mean, const A* __restrict__ invstd, const A* __restrict__ k1,
                              const A* __restrict__ k2, const A* __restrict__ k3, bool training, A slope) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = rows ? i % C : (i / S) % C;
    A m, sc, sf;
    channel_fold<T, P, A>(c, weight, bias, mean, invstd, m, sc, sf);
    const A xv = to_acc(x[i]);
    const A g = act_grad(fma_acc(xv, sc, sf), A(to_acc(dy[i])), slope);
    // evaluation: g * k1 only ((x - mean) * 0 would make an infinite x's finite gradient NaN)
    dx[i] = from_acc<T>(training ? fma_acc(g, k1[c], fma_acc((xv - m) * invstd[c], k3[c], k2[c])) : g * k1[c]);
  }
}

int elementwise_blocks(int64_t total) {
  int64_t b = (total + 255) / 256;
  return int(b < 65535 * 8 ? (b < 1 ? 1 : b) : 65535 * 8);
}

template <typename T, typename P, typename A>
cudaError_t forward_impl(const T* x, T* y, int64_t N, int64_t C, int64_t S, bool rows, P* rm, P* rv, const P* w,
                         const P* b, bool training, double momentum, double eps, double slope, A* save_mean,
                         A* save_invstd, void* ws, cudaStream_t st) {
  const int64_t R = N * S;
  const Plan p = make_plan(N, C, S, rows);
  using W = double;  // the statistics (see fold_kernel)
  W* pn = static_cast<W*>(ws);
  W* pmean = pn + p.nprog * C;
  W* pm2 = pmean + p.nprog * C;
  W* psum = pm2 + p.nprog * C;
  A* scale = reinterpret_cast<A*>(psum + p.nprog * C);
  A* shift = scale + C;
  if (training && R > 0) {
    if (rows) {
      dim3 grid(unsigned((C + kRowsTX - 1) / kRowsTX), unsigned(p.nprog));
      stats_rows_kernel<T, W><<<grid, dim3(kRowsTX, kRowsTY), 0, st>>>(x, R, C, p.rows_per_prog, pn, pmean, pm2, psum);
    } else {
      dim3 grid(unsigned(C), unsigned(p.nprog));
      stats_planar_kernel<T, W><<<grid, kPlanarThreads, 0, st>>>(x, R, C, S, p.rows_per_prog, pn, pmean, pm2, psum);
    }
  }
  fold_kernel<T, P, A, W><<<unsigned((C + 127) / 128), 128, 0, st>>>(x, S, rows, pn, pmean, pm2, psum, training && R > 0 ? p.nprog : 0, C, R,
                                                              rm, rv, w, b, training, momentum, eps, save_mean,
                                                              save_invstd, scale, shift);
  const int64_t total = R * C;
  if (total > 0)
    apply_kernel<T, A><<<elementwise_blocks(total), 256, 0, st>>>(x, y, total, C, S, rows, scale, shift, A(slope));
  return cudaGetLastError();
}

template <typename T, typename P, typename A>
cudaError_t backward_impl(const T* dy, const T* x, T* dx, int64_t N, int64_t C, int64_t S, bool rows, const P* w,
                          const P* b, const A* mean, const A* invstd, bool training, double slope, P* gw, P* gb,
                          void* ws, cudaStream_t st) {
  const int64_t R = N * S;
  const Plan p = make_plan(N, C, S, rows);
  A* p1 = static_cast<A*>(ws);
  A* p2 = p1 + p.nprog * C;
  A* k1 = p2 + p.nprog * C;
  A* k2 = k1 + C;
  A* k3 = k2 + C;
  if (R > 0) {
    if (rows) {
      dim3 grid(unsigned((C + kRowsTX - 1) / kRowsTX), unsigned(p.nprog));
      bwd_rows_kernel<T, P, A><<<grid, dim3(kRowsTX, kRowsTY), 0, st>>>(dy, x, R, C, p.rows_per_prog, w, b, mean,
                                                                        invstd, p1, p2, A(slope));
    } else {
      dim3 grid(unsigned(C), unsigned(p.nprog));
      bwd_planar_kernel<T, P, A><<<grid, kPlanarThreads, 0, st>>>(dy, x, R, C, S, p.rows_per_prog, w, b, mean,
                                                                  invstd, p1, p2, A(slope));
    }
  }
  bwd_final_kernel<P, A><<<unsigned((C + 127) / 128), 128, 0, st>>>(p1, p2, R > 0 ? p.nprog : 0, C, R, w, invstd,
                                                                   training, gw, gb, k1, k2, k3);
  const int64_t total = R * C;
  if (total > 0)
    bwd_dx_kernel<T, P, A><<<elementwise_blocks(total), 256, 0, st>>>(dy, x, dx, total, C, S, rows, w, b, mean,
                                                                      invstd, k1, k2, k3, training, A(slope));
  return cudaGetLastError();
}

}  // namespace
}  // namespace bnr

// ------------------------------------------------------------------ launchers (gankern/cuda_launchers.h)
namespace cuda {
using bnr::make_plan;

int64_t bnr_fwd_workspace(int64_t N, int64_t C, int64_t S, bool rows) {
  return 4 * make_plan(N, C, S, rows).nprog * C + 2 * C;  // double partials; scale / shift (float or double)
}
int64_t bnr_bwd_workspace(int64_t N, int64_t C, int64_t S, bool rows) {
  return 2 * make_plan(N, C, S, rows).nprog * C + 3 * C;
}

#define GK_BNR_FWD(T, P, A)                                                                                     \
  return bnr::forward_impl<T, P, A>(static_cast<const T*>(x), static_cast<T*>(y), N, C, S, rows,                     \
                               static_cast<P*>(running_mean), static_cast<P*>(running_var),                     \
                               static_cast<const P*>(weight), static_cast<const P*>(bias), training, momentum, eps, \
                               negative_slope, static_cast<A*>(save_mean), static_cast<A*>(save_invstd), workspace, \
                               stream)

cudaError_t bnr_forward(DType xt, DType pt, const void* x, void* y, int64_t N, int64_t C, int64_t S, bool rows,
                         void* running_mean, void* running_var, const void* weight, const void* bias,
                         bool training, double momentum, double eps, double negative_slope, void* save_mean,
                         void* save_invstd, void* workspace, cudaStream_t stream) {
  if (xt == DType::F32 && pt == DType::F32) GK_BNR_FWD(float, float, float);
  if (xt == DType::F64 && pt == DType::F64) GK_BNR_FWD(double, double, double);
  if (xt == DType::F16 && pt == DType::F32) GK_BNR_FWD(__half, float, float);
  if (xt == DType::F16 && pt == DType::F16) GK_BNR_FWD(__half, __half, float);
  if (xt == DType::BF16 && pt == DType::F32) GK_BNR_FWD(__nv_bfloat16, float, float);
  if (xt == DType::BF16 && pt == DType::BF16) GK_BNR_FWD(__nv_bfloat16, __nv_bfloat16, float);
  return cudaErrorInvalidValue;
}

#define GK_BNR_BWD(T, P, A)                                                                                        \
  return bnr::backward_impl<T, P, A>(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<T*>(dx), N, C, S, \
                                rows, static_cast<const P*>(weight), static_cast<const P*>(bias),                 \
                                static_cast<const A*>(save_mean), static_cast<const A*>(save_invstd), training,    \
                                negative_slope, static_cast<P*>(grad_weight), static_cast<P*>(grad_bias), workspace, \
                                stream)

cudaError_t bnr_backward(DType xt, DType pt, const void* dy, const void* x, void* dx, int64_t N, int64_t C,
                          int64_t S, bool rows, const void* weight, const void* bias, const void* save_mean,
                          const void* save_invstd, bool training, double negative_slope, void* grad_weight,
                          void* grad_bias, void* workspace, cudaStream_t stream) {
  if (xt == DType::F32 && pt == DType::F32) GK_BNR_BWD(float, float, float);
  if (xt == DType::F64 && pt == DType::F64) GK_BNR_BWD(double, double, double);
  if (xt == DType::F16 && pt == DType::F32) GK_BNR_BWD(__half, float, float);
  if (xt == DType::F16 && pt == DType::F16) GK_BNR_BWD(__half, __half, float);
  if (xt == DType::BF16 && pt == DType::F32) GK_BNR_BWD(__nv_bfloat16, float, float);
  if (xt == DType::BF16 && pt == DType::BF16) GK_BNR_BWD(__nv_bfloat16, __nv_bfloat16, float);
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace gankern
