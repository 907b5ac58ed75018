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
#include "gankern/kernel_common.h"

namespace gankern {
namespace bnr {

// (n, mean, m2) <- merge of itself with (nb, mb, m2b); m2 = sum of squared deviations.
template <typename acc_t>
GANKERN_HD void chan_merge(acc_t& n, acc_t& mean, acc_t& m2, acc_t nb, acc_t mb, acc_t m2b) {
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
GANKERN_HD void fold(float mean, float invstd, float w, float b, float& scale, float& shift) {
  scale = w * invstd;
  shift = fmaf(-mean, scale, b);
}
GANKERN_HD void fold(double mean, double invstd, double w, double b, double& scale, double& shift) {
  scale = w * invstd;
  shift = fma(-mean, scale, b);
}

// The ReLU's gradient gate as torch's threshold_backward has it: the gradient flows unless
// the pre-activation is <= 0 (so a NaN pre-activation lets it through, as in torch).
template <typename acc_t>
GANKERN_HD bool relu_passes(acc_t pre) { return !(pre <= acc_t(0)); }

// The activation: slope == 0 is torch.relu (max(pre, 0), NaN propagates, -inf -> 0), slope > 0
// is torch's leaky_relu (pre > 0 ? pre : pre * slope).  One formula for both:
template <typename acc_t>
GANKERN_HD acc_t act(acc_t pre, acc_t slope) {
  return pre <= acc_t(0) ? (slope == acc_t(0) ? acc_t(0) : pre * slope) : pre;
}
// Its gradient as torch's backward kernels have it: relu (threshold_backward on the output)
// lets the gradient through at a NaN pre-activation; leaky_relu_backward
// (pre > 0 ? g : g * slope) scales it.  Where the gate is closed with slope 0 the result is 0
// even for an infinite g (a select, not g * 0).
template <typename acc_t>
GANKERN_HD acc_t act_grad(acc_t pre, acc_t g, acc_t slope) {
  if (pre > acc_t(0)) return g;
  if (slope == acc_t(0)) return pre <= acc_t(0) ? acc_t(0) : g;
  return g * slope;
}

// Running-stat update (F.batch_norm): new = (1 - momentum) * old + momentum * batch_stat,
// with the unbiased variance var * n / (n - 1).
GANKERN_HD double running_update(double old, double batch_stat, double momentum) {
  return (1.0 - momentum) * old + momentum * batch_stat;
}

}  // namespace bnr
}  // namespace gankern

#if !defined(__CUDACC__)
// ---- ATen side (csrc/batch_norm_relu.cpp, csrc/cpu/batch_norm_relu*.cpp, csrc/cuda/batch_norm_relu_glue.cpp) ----
#include <ATen/ATen.h>
#include <optional>
namespace gankern {
// Checks every argument of the forward (defined in csrc/batch_norm_relu.cpp; TORCH_CHECK messages
// name the argument and what was expected).
void bnr_check_args(const at::Tensor& input, const std::optional<at::Tensor>& running_mean,
                    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& bias, bool training, double momentum, double eps,
                    double negative_slope);
// Checks of the internal backward's own arguments (both kernels call it: the op is callable on its own); C = the
// input's channel count.
void bnr_check_bwd_args(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& save_mean,
                        const at::Tensor& save_invstd, double negative_slope);
}  // namespace gankern
#endif
