// Fused Linear + LeakyReLU: the formulas shared by the CPU kernels and the CUDA kernels
// (plain __host__ __device__ functions, no ATen), plus (host C++ only) the argument check
// shared by the op, the CPU kernels and the CUDA glue.
//
//   y  = leaky_relu(x W^T + b, slope)          leaky_relu(z) = z > 0 ? z : z * slope
//   dZ = dY * (s > 0 ? 1 : slope)              s = y when slope >= 0 (same sign as z),
//                                              s = z when slope < 0 (the op saves z then)
// For slope >= 0, y > 0 <=> z > 0 (including z = 0 -> slope, NaN -> slope), exactly as
// torch's leaky_relu_backward, which tests `z > 0`.
#pragma once
#include "gankern/kernel_common.h"

namespace gankern {
namespace llr {

template <typename T>
GANKERN_HD T leaky_relu(T z, T slope) { return z > T(0) ? z : z * slope; }

// derivative factor from the saved sign source s (y for slope >= 0, z for slope < 0)
template <typename T>
GANKERN_HD T leaky_relu_grad(T g, T s, T slope) { return s > T(0) ? g : g * slope; }

}  // namespace llr
}  // namespace gankern

#if !defined(__CUDACC__)
#include <ATen/ATen.h>
namespace gankern {
namespace llr {
// Checks input (*, in), weight (out, in), bias (out,) or undefined: dims, sizes, dtypes,
// devices.  Throws c10::Error naming the argument and what was expected.
void check_args(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, const char* op);
// The 2-D internal kernels: input (M, K) exactly.
void check_args_2d(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, const char* op);
// Backward: grad_output (M, N) and saved (M, N) against input (M, K), weight (N, K).
void check_bwd_args(const at::Tensor& grad_output, const at::Tensor& saved, const at::Tensor& input,
                    const at::Tensor& weight, const char* op);
}  // namespace llr
}  // namespace gankern
#endif
