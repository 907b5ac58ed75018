// ATen glue of the CUDA bias + LeakyReLU kernels (csrc/cuda/bias_leaky_relu.cu): argument checks
// (shared with the CPU kernels: bact::check_args), the dense (outer, C, inner) view, device guard,
// stream, allocation.  Built only against a CUDA torch (CMakeLists.txt).
#include "gankern/cuda_glue.h"
#include "gankern/bias_leaky_relu.h"

namespace gankern {
namespace {

const char* kFwd = "gankern._bias_leaky_relu_fwd";
const char* kBwd = "gankern._bias_leaky_relu_bwd";

at::Tensor bact_fwd_cuda(const at::Tensor& input, const at::Tensor& bias, double slope, int64_t dim) {
  const int64_t d = bact::check_args(input, bias, dim, kFwd);
  const c10::cuda::CUDAGuard guard(input.device());
  const bact::Dense x = bact::dense_view(input, d);
  const at::Tensor b = bias.contiguous();
  at::Tensor out = bact::new_dense(x, input.options());
  if (out.numel() == 0) return out;
  GANKERN_CUDA_CHECK(kFwd, cuda::bact_forward(dtype_code(input.scalar_type()), x.t.const_data_ptr(),
                                               b.const_data_ptr(), out.data_ptr(), x.outer, x.C, x.inner, slope,
                                               cuda_stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> bact_bwd_cuda(const at::Tensor& grad_output, const at::Tensor& saved, double slope,
                                                 int64_t dim, std::array<bool, 2> mask) {
  const int64_t d = bact::check_bwd_args(grad_output, saved, dim, kBwd);
  at::Tensor gx, gb;
  if (!(mask[0] || mask[1])) return {gx, gb};
  const c10::cuda::CUDAGuard guard(saved.device());
  const bact::Dense y = bact::dense_view(saved, d);
  const bact::Dense g = bact::dense_like(grad_output, y);
  if (mask[0]) gx = bact::new_dense(y, saved.options());
  if (mask[1]) gb = new_empty({y.C}, saved.options());
  if (saved.numel() == 0) {
    if (mask[1]) gb.zero_();
    return {gx, gb};
  }
  at::Tensor partial;
  if (mask[1]) {
    const auto acc = saved.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    partial = at::empty({cuda::bact_bwd_groups(y.outer, y.C, y.inner), y.C}, saved.options().dtype(acc));
  }
  GANKERN_CUDA_CHECK(kBwd, cuda::bact_backward(dtype_code(saved.scalar_type()), g.t.const_data_ptr(),
                                                y.t.const_data_ptr(), mask[0] ? gx.data_ptr() : nullptr,
                                                mask[1] ? gb.data_ptr() : nullptr,
                                                mask[1] ? partial.data_ptr() : nullptr, y.outer, y.C, y.inner, slope,
                                                cuda_stream()));
  return {gx, gb};
}

}  // namespace
}  // namespace gankern

TORCH_LIBRARY_IMPL(gankern, CUDA, m) {
  m.impl("_bias_leaky_relu_fwd", &gankern::bact_fwd_cuda);
  m.impl("_bias_leaky_relu_bwd", &gankern::bact_bwd_cuda);
}
