// CUDA glue of gankern::_linear_leaky_relu_fwd / _bwd (built only against a CUDA torch).
// Forward: cuBLAS(Lt) GEMM through ATen with the bias in the cuBLASLt epilogue (at::addmm_out into
// a fresh output; fp32 GEMMs follow torch.backends.cuda.matmul.allow_tf32 as every at::mm does),
// then the in-place LeakyReLU kernel.  Backward: one dZ + column-sum kernel, then two GEMMs.
#include <algorithm>
#include "gankern/cuda_glue.h"
#include "gankern/linear_leaky_relu.h"

namespace gankern {
namespace llr {
namespace {

const char* kFwd = "gankern._linear_leaky_relu_fwd";
const char* kBwd = "gankern._linear_leaky_relu_bwd";

at::Tensor fwd_cuda(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias_opt,
                    double slope) {
  GANKERN_NO_AUTOCAST();
  const at::Tensor bias = opt_tensor(bias_opt);
  check_args(input, weight, bias, kFwd);
  // check_args: every tensor on the input's device; the dispatcher chose CUDA for one of them
  TORCH_INTERNAL_ASSERT(input.is_cuda(), kFwd, ": the CUDA kernel got ", input.device());
  c10::cuda::CUDAGuard guard(input.device());
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t M = c10::multiply_integers(input.sizes().slice(0, input.dim() - 1));
  auto shape = input.sizes().vec();
  shape.back() = N;
  at::Tensor out = new_empty(shape, input.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  at::Tensor out2 = out.view({M, N});
  const at::Tensor x2 = input.reshape({M, K});
  if (bias.defined()) at::addmm_out(out2, bias, x2, weight.t());  // bias in the cuBLASLt epilogue
  else at::mm_out(out2, x2, weight.t());
  if (slope != 1.0) {
    GANKERN_CUDA_CHECK(kFwd, cuda::llr_act(dtype_code(input.scalar_type()), out2.data_ptr(), nullptr, M, N, slope,
                                           cuda_stream()));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cuda(const at::Tensor& grad_output, const at::Tensor& saved,
                                                        const at::Tensor& input, const at::Tensor& weight,
                                                        double slope, std::array<bool, 3> mask) {
  GANKERN_NO_AUTOCAST();
  check_bwd_args(grad_output, saved, input, weight, kBwd);
  TORCH_INTERNAL_ASSERT(input.is_cuda(), kBwd, ": the CUDA kernel got ", input.device());  // as in fwd_cuda
  c10::cuda::CUDAGuard guard(input.device());
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t M = c10::multiply_integers(input.sizes().slice(0, input.dim() - 1));
  at::Tensor gx, gw, gb;
  if (mask[0]) gx = new_empty(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
  if (mask[1]) gw = new_empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
  if (mask[2]) gb = new_empty({N}, weight.options());
  if (!(mask[0] || mask[1] || mask[2])) return {gx, gw, gb};
  const at::Tensor g = grad_output.reshape({M, N}).contiguous();
  const at::Tensor s = saved.reshape({M, N}).contiguous();
  at::Tensor dz = at::empty({M, N}, g.options());
  const int gy = (int)std::max<int64_t>(1, std::min<int64_t>(64, (M + 63) / 64));
  const auto acc_t = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partial = mask[2] ? at::empty({gy, N}, g.options().dtype(acc_t)) : at::Tensor();
  if (M * N > 0) {
    GANKERN_CUDA_CHECK(kBwd, cuda::llr_dz_colsum(dtype_code(input.scalar_type()), g.data_ptr(), s.data_ptr(),
                                                 dz.data_ptr(), partial.defined() ? partial.data_ptr() : nullptr,
                                                 mask[2] ? gb.data_ptr() : nullptr, M, N, gy, slope, cuda_stream()));
  } else if (mask[2]) {
    gb.zero_();
  }
  if (mask[0]) {
    at::Tensor gx2 = gx.view({M, K});
    at::mm_out(gx2, dz, weight);
  }
  if (mask[1]) at::mm_out(gw, dz.t(), input.reshape({M, K}));
  return {gx, gw, gb};
}

}  // namespace
}  // namespace llr
}  // namespace gankern

TORCH_LIBRARY_IMPL(gankern, CUDA, m) {
  m.impl("_linear_leaky_relu_fwd", &gankern::llr::fwd_cuda);
  m.impl("_linear_leaky_relu_bwd", &gankern::llr::bwd_cuda);
}
