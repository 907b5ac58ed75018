// Fused bias + LeakyReLU for conv outputs: the formulas shared by the CPU kernels and the CUDA
// kernels (plain __host__ __device__ functions, no ATen), plus (host C++ only) the argument checks
// and the layout helper shared by the op, the CPU kernels and the CUDA glue.
//
//   y  = leaky_relu(x + b[c], slope)      c = the index along `dim` (the channel)
//   dx = dy * (y > 0 ? 1 : slope)         from the saved output: for slope >= 0, y > 0 <=> x + b > 0
//   db[c] = sum of dx over every other dimension
// Any tensor is viewed, in its memory order, as (outer, C, inner): NCHW with dim=1 is
// (N, C, H*W), channels-last is (N*H*W, C, 1), (N, C) is (N, C, 1).
#pragma once
#include "gankern/kernel_common.h"

namespace gankern {
namespace bact {

template <typename T>
GANKERN_HD T bias_leaky_relu(T x, T b, T slope) {
  const T z = x + b;
  return z > T(0) ? z : z * slope;
}

template <typename T>
GANKERN_HD T bias_leaky_relu_grad(T g, T y, T slope) { return y > T(0) ? g : g * slope; }

}  // namespace bact
}  // namespace gankern

#if !defined(__CUDACC__)
#include <ATen/ATen.h>
#include <vector>
namespace gankern {
namespace bact {
// input (..., C at dim, ...) and bias (C,): dims, sizes, dtypes, devices; returns dim normalized.
// Throws c10::Error naming the argument and what was expected.
int64_t check_args(const at::Tensor& input, const at::Tensor& bias, int64_t dim, const char* op);
// grad_output and saved (the forward's output) against each other; returns dim normalized.
int64_t check_bwd_args(const at::Tensor& grad_output, const at::Tensor& saved, int64_t dim, const char* op);

// A tensor laid out densely as (outer, C, inner) in memory.
struct Dense {
  at::Tensor t;                 // contiguous in the permuted order (t.data_ptr() is the data)
  std::vector<int64_t> perm;    // t = original.permute(perm)
  int64_t outer, C, inner;
};
// The dense order of `t` (contiguous, channels-last or channels-last-3d), or a contiguous copy.
Dense dense_view(const at::Tensor& t, int64_t dim);
// `t` again, in the same permuted layout as `like` (a copy only when `t`'s layout differs).
Dense dense_like(const at::Tensor& t, const Dense& like);
// A new (poisoned) tensor in `like`'s layout; returns it in the original dimension order.
at::Tensor new_dense(const Dense& like, const at::TensorOptions& opts);
// The dense view of a tensor made by new_dense.
inline at::Tensor permuted(const at::Tensor& t, const Dense& like) { return t.permute(like.perm); }
}  // namespace bact
}  // namespace gankern
#endif
