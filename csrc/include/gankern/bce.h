// Fused binary_cross_entropy_with_logits: the scalar formulas (host and device), shared by the
// CPU kernels (scalar reference for the vector code), the CUDA kernels, and the docs.
//
// They are torch's formulas (aten/src/ATen/native/Loss.cpp), so NaN/Inf behave as in torch:
//   log_sigmoid(x) = min(x, 0) - log1p(exp(-|x|))                        (stable)
//   loss           = w * ((1 - t) * x - lw * log_sigmoid(x)),  lw = 1 + (pw - 1) * t   (lw = 1 without pos_weight)
//   d loss / d x   = w * ((pw * t + 1 - t) * sigmoid(x) - pw * t)        (w * (sigmoid(x) - t) without pos_weight)
//   d loss / d t   = w * (log_sigmoid(-x) - pw * log_sigmoid(x))         (w * -x without pos_weight)
// times the incoming gradient, divided by numel for reduction="mean".
// Accumulation type: float for fp16/bf16/fp32 inputs, double for fp64.
#pragma once
#include <cmath>
#include <cstdint>
#include "gankern/kernel_common.h"

namespace gankern {
namespace bce {

// Same numbering as at::Reduction.
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// Elements per reduction chunk: each chunk's partial sum is computed on its own, and the partials
// are added in chunk order (in double), so the result does not depend on the thread/block count.
constexpr int64_t kChunk = 4096;

template <typename T>
GANKERN_HD T log_sigmoid(T x) {
  using std::exp; using std::log1p; using std::fabs;
  const T e = exp(-fabs(x));
  return (x < T(0) ? x : T(0)) - log1p(e);
}

template <typename T>
GANKERN_HD T sigmoid(T x) {
  using std::exp;
  return T(1) / (T(1) + exp(-x));
}

template <typename T>
GANKERN_HD T loss(T x, T t, T w, T pw, bool has_pw) {
  const T ls = log_sigmoid(x);
  const T l = has_pw ? (T(1) - t) * x - ((pw - T(1)) * t + T(1)) * ls : (T(1) - t) * x - ls;
  return l * w;
}

template <typename T>
GANKERN_HD T grad_input(T x, T t, T w, T pw, bool has_pw) {
  const T s = sigmoid(x);
  return (has_pw ? (pw * t + T(1) - t) * s - pw * t : s - t) * w;
}

template <typename T>
GANKERN_HD T grad_target(T x, T w, T pw, bool has_pw) {
  return (has_pw ? log_sigmoid(-x) - pw * log_sigmoid(x) : -x) * w;
}

}  // namespace bce
}  // namespace gankern

#if !defined(__CUDACC__)
// ---- ATen side (csrc/bce.cpp, csrc/cpu/bce.cpp, csrc/cuda/bce_glue.cpp); not seen by .cu files ----
#include <ATen/ATen.h>
#include <optional>

namespace gankern {
namespace bce {

// Checks every argument of bce_with_logits (TORCH_CHECK messages name the argument).
void check_args(const at::Tensor& input, const std::optional<at::Tensor>& target, double target_scalar,
                const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                int64_t reduction);
// The backward kernels' checks (CPU and CUDA): check_args plus grad_out's device/shape and need_target.
void check_bwd_args(const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& target,
                    double target_scalar, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& pos_weight, int64_t reduction, bool need_target);

// The operands as the kernels read them.
struct Operands {
  at::Tensor x;   // input, contiguous
  at::Tensor t;   // target, contiguous, input dtype; undefined -> the scalar target
  at::Tensor w;   // weight in the accumulation dtype: undefined, numel 1, or contiguous with input's shape
  at::Tensor pw;  // pos_weight, same convention
};
Operands prepare(const at::Tensor& input, const std::optional<at::Tensor>& target,
                 const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight);

}  // namespace bce
}  // namespace gankern
#endif
