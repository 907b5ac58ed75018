// Formulas shared by the CPU kernels, the CUDA kernels and (by transcription) the Triton
// kernels of the fused BatchNorm + ReLU.  No ATen here: this header is included by .cu files.
//
// Statistics are numerically safe: the CUDA and Triton kernels (and the CPU kernel's fallback)
// reduce every tile with an exact two-pass (tile mean, then squared deviations from it) and
// combine tiles with Chan et al.'s pairwise update in a fixed order; the CPU kernel's main path is
// one pass around a per-channel shift with a per-channel accuracy check (csrc/cpu/batch_norm_relu.cpp).
// No E[x^2] - E[x]^2 cancellation, and the bits do not depend on the thread count.
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define GK_HD __host__ __device__ __forceinline__
#else
#define GK_HD inline
#endif

namespace gankern {
namespace bnr {

// (n, mean, m2) <- merge of itself with (nb, mb, m2b); m2 = sum of squared deviations.
template <typename acc_t>
GK_HD void chan_merge(acc_t& n, acc_t& mean, acc_t& m2, acc_t nb, acc_t mb, acc_t m2b) {
  if (nb == acc_t(0)) return;
  if (n == acc_t(0)) { n = nb; mean = mb; m2 = m2b; return; }
  const acc_t nn = n + nb;
  const acc_t f = nb / nn;
  const acc_t delta = mb - mean;
  mean = mean + delta * f;
  m2 = m2 + m2b + delta * delta * n * f;
  n = nn;
}

// Per-channel fold of normalization + affine: y = relu(x * scale + shift).
// Explicit fma so the forward and the backward (which recomputes the ReLU mask from x) round
// identically, whatever the compiler's contraction settings.
GK_HD void fold(float mean, float invstd, float w, float b, float& scale, float& shift) {
  scale = w * invstd;
  shift = fmaf(-mean, scale, b);
}
GK_HD void fold(double mean, double invstd, double w, double b, double& scale, double& shift) {
  scale = w * invstd;
  shift = fma(-mean, scale, b);
}

// The ReLU's gradient gate as torch's threshold_backward has it: the gradient flows unless
// the pre-activation is <= 0 (so a NaN pre-activation lets it through, as in torch).
template <typename acc_t>
GK_HD bool relu_passes(acc_t pre) { return !(pre <= acc_t(0)); }

// The activation: slope == 0 is torch.relu (max(pre, 0), NaN propagates, -inf -> 0), slope > 0
// is torch's leaky_relu (pre > 0 ? pre : pre * slope).  One formula for both:
template <typename acc_t>
GK_HD acc_t act(acc_t pre, acc_t slope) {
  return pre <= acc_t(0) ? (slope == acc_t(0) ? acc_t(0) : pre * slope) : pre;
}
// Its gradient as torch's backward kernels have it: relu (threshold_backward on the output)
// lets the gradient through at a NaN pre-activation; leaky_relu_backward
// (pre > 0 ? g : g * slope) scales it.  Where the gate is closed with slope 0 the result is 0
// even for an infinite g (a select, not g * 0).
template <typename acc_t>
GK_HD acc_t act_grad(acc_t pre, acc_t g, acc_t slope) {
  if (pre > acc_t(0)) return g;
  if (slope == acc_t(0)) return pre <= acc_t(0) ? acc_t(0) : g;
  return g * slope;
}

// Running-stat update (F.batch_norm): new = (1 - momentum) * old + momentum * batch_stat,
// with the unbiased variance var * n / (n - 1).
GK_HD double running_update(double old, double batch_stat, double momentum) {
  return (1.0 - momentum) * old + momentum * batch_stat;
}

}  // namespace bnr
}  // namespace gankern

// ---------------------------------------------------------------------------------------------
// CUDA launchers (csrc/cuda/batch_norm_relu.cu), called by csrc/cuda/batch_norm_relu_glue.cpp.
// Plain pointers and sizes.  The input is (N, C, S): rows == true means M = N*S rows of C
// contiguous channels ((N, C) and channels-last), rows == false means contiguous N x C x S.
// acc = float for fp32/fp16/bf16 inputs, double for fp64; P = the params' dtype.
#if defined(__CUDACC__) || defined(GANKERN_BNR_CUDA_DECLS)
#include <cuda_runtime_api.h>
#include <cstdint>
namespace gankern {
namespace bnr {
enum class Dtype : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

// Elements of acc type the launchers need as scratch.
int64_t cuda_fwd_workspace(int64_t N, int64_t C, int64_t S, bool rows);
int64_t cuda_bwd_workspace(int64_t N, int64_t C, int64_t S, bool rows);

// running_mean / running_var / weight / bias: contiguous (C,) of dtype pt, or nullptr.
cudaError_t cuda_forward(Dtype xt, Dtype pt, const void* x, void* y, int64_t N, int64_t C, int64_t S, bool rows,
                         void* running_mean, void* running_var, const void* weight, const void* bias,
                         bool training, double momentum, double eps, double negative_slope, void* save_mean,
                         void* save_invstd, void* workspace, cudaStream_t stream);

// grad_weight / grad_bias: (C,) of dtype pt (always written).
cudaError_t cuda_backward(Dtype xt, Dtype pt, const void* dy, const void* x, void* dx, int64_t N, int64_t C,
                          int64_t S, bool rows, const void* weight, const void* bias, const void* save_mean,
                          const void* save_invstd, bool training, double negative_slope, void* grad_weight,
                          void* grad_bias, void* workspace, cudaStream_t stream);
}  // namespace bnr
}  // namespace gankern
#endif
