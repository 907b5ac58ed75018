// ATen glue of the CUDA BCE-with-logits kernels (csrc/cuda/bce.cu): argument checks (shared
// with the CPU kernels: bce::check_args), operand preparation, device guard, stream, allocation.
// Built only against a CUDA torch (CMakeLists.txt).
#include "gankern/cuda_glue.h"
#include "gankern/bce.h"

namespace gankern {
namespace {

// (pointer, mode): mode 0 absent, 1 one element, 2 one per element (see bce::prepare).
std::pair<const void*, int> wptr(const at::Tensor& w) {
  if (!w.defined()) return {nullptr, 0};
  return {w.data_ptr(), w.dim() == 0 ? 1 : 2};
}

at::Tensor bce_fwd_cuda(const at::Tensor& input, const std::optional<at::Tensor>& target, double target_scalar,
                        const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                        int64_t reduction) {
  bce::check_args(input, target, target_scalar, weight, pos_weight, reduction);
  const c10::cuda::CUDAGuard guard(input.device());
  const bce::Operands o = bce::prepare(input, target, weight, pos_weight);
  const int64_t N = o.x.numel();
  at::Tensor out = reduction == bce::kNone ? new_empty(o.x.sizes(), o.x.options()) : new_empty({}, o.x.options());
  at::Tensor partial;
  const int64_t P = (N + bce::kChunk - 1) / bce::kChunk;
  if (reduction != bce::kNone && P > 1) partial = at::empty({P}, o.x.options().dtype(at::kDouble));
  auto [w, wm] = wptr(o.w);
  auto [pw, pm] = wptr(o.pw);
  GANKERN_CUDA_CHECK("bce_with_logits (cuda) forward",
                     cuda::bce_forward(dtype_code(o.x.scalar_type()), o.x.data_ptr(),
                                       o.t.defined() ? o.t.data_ptr() : nullptr, target_scalar, w, wm, pw, pm,
                                       out.data_ptr(), partial.defined() ? partial.data_ptr<double>() : nullptr, N,
                                       reduction, cuda_stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> bce_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                                                const std::optional<at::Tensor>& target, double target_scalar,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& pos_weight, int64_t reduction,
                                                bool need_target) {
  bce::check_bwd_args(grad_out, input, target, target_scalar, weight, pos_weight, reduction, need_target);
  const c10::cuda::CUDAGuard guard(input.device());
  const bce::Operands o = bce::prepare(input, target, weight, pos_weight);
  const int64_t N = o.x.numel();
  at::Tensor g = grad_out.to(o.x.scalar_type());
  g = reduction == bce::kNone ? g.expand(o.x.sizes()).contiguous() : g.reshape({}).contiguous();
  const double g_scale = (reduction == bce::kMean && N) ? 1.0 / static_cast<double>(N) : 1.0;
  at::Tensor gx = new_empty(o.x.sizes(), o.x.options());
  at::Tensor gt = need_target ? new_empty(o.x.sizes(), o.x.options()) : at::empty({0}, o.x.options());
  auto [w, wm] = wptr(o.w);
  auto [pw, pm] = wptr(o.pw);
  GANKERN_CUDA_CHECK("bce_with_logits (cuda) backward",
                     cuda::bce_backward(dtype_code(o.x.scalar_type()), g.data_ptr(), reduction == bce::kNone, g_scale,
                                        o.x.data_ptr(), o.t.defined() ? o.t.data_ptr() : nullptr, target_scalar, w,
                                        wm, pw, pm, gx.data_ptr(), need_target ? gt.data_ptr() : nullptr, N,
                                        cuda_stream()));
  return {gx, gt};
}

}  // namespace
}  // namespace gankern

TORCH_LIBRARY_IMPL(gankern, CUDA, m) {
  m.impl("_bce_with_logits_fwd", &gankern::bce_fwd_cuda);
  m.impl("_bce_with_logits_bwd", &gankern::bce_bwd_cuda);
}
