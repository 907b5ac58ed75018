// ATen glue of the CUDA kernels of batch_norm_relu (csrc/cuda/batch_norm_relu.cu): argument
// checks, layout, allocation, stream.  Built only against a CUDA torch.
#include <cmath>
#include "gankern/cuda_glue.h"
#include "gankern/batch_norm_relu.h"

namespace gankern {
namespace {

bool is_channels_last(const at::Tensor& x) {
  if (x.dim() == 4) return x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (x.dim() == 5) return x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return false;
}

// x in a supported layout; rows == true: (N*S, C) with C contiguous; else contiguous N x C x S.
at::Tensor prepare(const at::Tensor& in, int64_t& N, int64_t& C, int64_t& S, bool& rows) {
  at::Tensor x = in;
  N = x.size(0);
  C = x.size(1);
  S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) S *= x.size(d);
  if (x.is_contiguous()) {
    rows = S == 1;
  } else if (is_channels_last(x)) {
    rows = true;
  } else {
    x = x.contiguous();
    rows = S == 1;
  }
  return x;
}

const void* ptr_or_null(const std::optional<at::Tensor>& t) { return has_tensor(t) ? t->data_ptr() : nullptr; }

// Contiguous version of an optional param (a copy only if it is strided).
std::optional<at::Tensor> contig(const std::optional<at::Tensor>& t) {
  if (!has_tensor(t)) return std::nullopt;
  return t->is_contiguous() ? *t : t->contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bnr_fwd_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, bool training, double momentum, double eps, double negative_slope) {
  bnr_check_args(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope);
  // bnr_check_args: every tensor on the input's device; the dispatcher chose CUDA for one of them
  TORCH_INTERNAL_ASSERT(input.is_cuda(), "batch_norm_relu (cuda kernel): got input on ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  int64_t N, C, S;
  bool rows;
  at::Tensor x = prepare(input, N, C, S, rows);
  at::Tensor y = new_empty_like(x);
  const auto acc_dt = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor save_mean = new_empty({C}, x.options().dtype(acc_dt));
  at::Tensor save_invstd = new_empty({C}, x.options().dtype(acc_dt));
  if (C == 0) return {y, save_mean, save_invstd};  // no channels: nothing to launch (a 0-block grid is an error)
  at::Tensor ws = at::empty({cuda::bnr_fwd_workspace(N, C, S, rows)}, x.options().dtype(at::kDouble));
  auto rm = contig(running_mean), rv = contig(running_var), w = contig(weight), b = contig(bias);
  at::ScalarType pdt = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto* t : {&rm, &rv, &w, &b})
    if (t->has_value()) { pdt = (*t)->scalar_type(); break; }
  const bool has_running = rm.has_value();
  GANKERN_CUDA_CHECK("batch_norm_relu (cuda) forward",
                     cuda::bnr_forward(dtype_code(x.scalar_type()), dtype_code(pdt), x.data_ptr(), y.data_ptr(), N, C,
                                       S, rows, has_running ? rm->data_ptr() : nullptr,
                                       has_running ? rv->data_ptr() : nullptr, ptr_or_null(w), ptr_or_null(b),
                                       training, momentum, eps, negative_slope, save_mean.data_ptr(),
                                       save_invstd.data_ptr(), ws.data_ptr(), cuda_stream()));
  if (training && has_running) {  // strided running stats were updated in a contiguous copy
    if (!running_mean->is_same(*rm)) running_mean->copy_(*rm);
    if (!running_var->is_same(*rv)) running_var->copy_(*rv);
  }
  return {y, save_mean, save_invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bnr_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                                                            const std::optional<at::Tensor>& weight,
                                                            const std::optional<at::Tensor>& bias,
                                                            const at::Tensor& save_mean,
                                                            const at::Tensor& save_invstd, bool training,
                                                            double negative_slope) {
  // a user error, not an invariant: the CUDA kernel runs when any one tensor is on CUDA
  TORCH_CHECK(input.is_cuda() && grad_out.is_cuda(), "batch_norm_relu (cuda) backward: tensors must be on CUDA");
  bnr_check_bwd_args(grad_out, input, save_mean, save_invstd, negative_slope);
  const c10::cuda::CUDAGuard guard(input.device());
  int64_t N, C, S;
  bool rows;
  at::Tensor x = prepare(input, N, C, S, rows);
  const auto acc_dt = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dy = x.is_contiguous() ? grad_out.contiguous()
                                    : grad_out.contiguous(x.dim() == 4 ? at::MemoryFormat::ChannelsLast
                                                                       : at::MemoryFormat::ChannelsLast3d);
  at::Tensor dx = new_empty_like(x);
  auto w = contig(weight), b = contig(bias);
  at::ScalarType pdt = w.has_value() ? w->scalar_type() : (b.has_value() ? b->scalar_type() : acc_dt);
  at::Tensor gw = new_empty({C}, x.options().dtype(pdt));
  at::Tensor gb = new_empty({C}, x.options().dtype(pdt));
  if (C == 0) return {dx, gw, gb};
  at::Tensor ws = at::empty({cuda::bnr_bwd_workspace(N, C, S, rows)}, x.options().dtype(at::kDouble));
  at::Tensor sm = save_mean.contiguous(), si = save_invstd.contiguous();
  GANKERN_CUDA_CHECK("batch_norm_relu (cuda) backward",
                     cuda::bnr_backward(dtype_code(x.scalar_type()), dtype_code(pdt), dy.data_ptr(), x.data_ptr(),
                                        dx.data_ptr(), N, C, S, rows, ptr_or_null(w), ptr_or_null(b), sm.data_ptr(),
                                        si.data_ptr(), training, negative_slope, gw.data_ptr(), gb.data_ptr(),
                                        ws.data_ptr(), cuda_stream()));
  return {dx, gw, gb};
}

}  // namespace
}  // namespace gankern

TORCH_LIBRARY_IMPL(gankern, CUDA, m) {
  m.impl("_batch_norm_relu_fwd", &gankern::bnr_fwd_cuda);
  m.impl("_batch_norm_relu_bwd", &gankern::bnr_bwd_cuda);
}
