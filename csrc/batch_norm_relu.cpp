// gankern::batch_norm_relu: act(batch_norm(input, running_mean, running_var, weight, bias,
// training, momentum, eps)) fused, act = relu for negative_slope == 0 (the default) and
// leaky_relu(., negative_slope) for negative_slope > 0: one op for BatchNorm+ReLU and
// BatchNorm+LeakyReLU (Python: gankern.batch_norm_relu / gankern.batch_norm_leaky_relu).  Schemas, argument checks, and the C++ autograd shared by
// the CPU and CUDA kernels (csrc/cpu/batch_norm_relu.cpp, csrc/cuda/batch_norm_relu_glue.cpp) and the Triton
// kernels (overload triton, gankern/ops/batch_norm_relu.py).
//
// What the backward keeps: the input x (a reference, no copy), and the per-channel mean and
// inverse std.  The activation's mask is recomputed bit-exactly from x (same fma as the forward),
// so the output y is not kept alive.  x is needed anyway: in training the input gradient at
// positions where the ReLU is closed still depends on x_hat, which y (= 0 there) cannot give.
#include <torch/library.h>
#include <torch/autograd.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <sstream>
#include "gankern/common.h"

namespace gankern {

// Validates the arguments of batch_norm_relu: the public op (both overloads) and its check op call it
// before any internal op, the C++/CUDA kernels again (they are callable on their own).
void bnr_check_args(const at::Tensor& input, const std::optional<at::Tensor>& running_mean,
                    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& bias, bool training, double momentum, double eps,
                    double negative_slope) {
  TORCH_INTERNAL_ASSERT(input.defined());  // a non-optional Tensor of the schema
  TORCH_CHECK(input.dim() >= 2, "batch_norm_relu: input must have at least 2 dimensions (N, C, ...), got a ",
              input.dim(), "-D tensor of shape ", input.sizes());
  const auto dt = input.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
              "batch_norm_relu: input must be float32, float16, bfloat16 or float64, got ", py_dtype(dt));
  const c10::SymInt C = input.sym_size(1);  // symbolic under torch.compile's dynamic shapes (fake tensors)
  const bool reduced = dt == at::kHalf || dt == at::kBFloat16;
  const char* names[4] = {"running_mean", "running_var", "weight", "bias"};
  const std::optional<at::Tensor>* ts[4] = {&running_mean, &running_var, &weight, &bias};
  std::optional<at::ScalarType> pdt;
  const char* pname = nullptr;
  for (int i = 0; i < 4; ++i) {
    if (!has_tensor(*ts[i])) continue;
    const at::Tensor& t = **ts[i];
    TORCH_CHECK(t.dim() == 1 && t.sym_numel() == C, "batch_norm_relu: ", names[i], " must be a 1-D tensor of ", C,
                " elements (the channel count input.size(1)), got shape ", t.sym_sizes());
    TORCH_CHECK(t.device() == input.device(), "batch_norm_relu: ", names[i], " must be on the input's device ",
                input.device(), ", got ", t.device());
    TORCH_CHECK(t.scalar_type() == dt || (reduced && t.scalar_type() == at::kFloat),
                "batch_norm_relu: ", names[i], " must have the input's dtype ", py_dtype(dt),
                reduced ? " or float32" : "", ", got ", py_dtype(t.scalar_type()));
    if (!pdt) { pdt = t.scalar_type(); pname = names[i]; }
    TORCH_CHECK(t.scalar_type() == *pdt, "batch_norm_relu: ", names[i], " has dtype ", py_dtype(t.scalar_type()),
                " but ", pname, " has dtype ", py_dtype(*pdt),
                "; running_mean, running_var, weight and bias must share one dtype (as in torch)");
  }
  const bool has_rm = has_tensor(running_mean);
  const bool has_rv = has_tensor(running_var);
  if (training) {
    TORCH_CHECK_VALUE(has_rm == has_rv,
                      "running_mean and running_var must either both be None or neither be None");
    c10::SymInt per_channel = input.sym_size(0);
    for (int64_t d = 2; d < input.dim(); ++d) per_channel *= input.sym_size(d);
    TORCH_CHECK_VALUE(per_channel != 1, "Expected more than 1 value per channel when training, got input size ",
                      sizes_str(input.sizes()));
  } else {
    TORCH_CHECK(has_rm, "batch_norm_relu: running_mean must be defined in evaluation mode (training=False)");
    TORCH_CHECK(has_rv, "batch_norm_relu: running_var must be defined in evaluation mode (training=False)");
  }
  // bad values, as negative_slope: ValueError (torch's own batch_norm does not check them)
  TORCH_CHECK_VALUE(std::isfinite(momentum), "batch_norm_relu: momentum must be a finite float, got ", momentum);
  TORCH_CHECK_VALUE(eps >= 0 && std::isfinite(eps), "batch_norm_relu: eps must be a finite float >= 0, got ", eps);
  TORCH_CHECK_VALUE(negative_slope >= 0 && std::isfinite(negative_slope),
                    "batch_norm_leaky_relu: negative_slope must be a finite float >= 0, got ", negative_slope);
}

void bnr_check_bwd_args(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& save_mean,
                        const at::Tensor& save_invstd, double negative_slope) {
  TORCH_CHECK(input.dim() >= 2, "batch_norm_relu backward: input must have at least 2 dimensions");
  TORCH_CHECK_VALUE(negative_slope >= 0 && std::isfinite(negative_slope),
                    "batch_norm_leaky_relu: negative_slope must be a finite float >= 0, got ", negative_slope);
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "batch_norm_relu backward: grad_out must have the input's shape ",
              input.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), "batch_norm_relu backward: grad_out must have dtype ",
              input.scalar_type(), ", got ", grad_out.scalar_type());
  const int64_t C = input.size(1);
  const auto acc_dt = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(save_mean.numel() == C && save_invstd.numel() == C && save_mean.scalar_type() == acc_dt &&
                  save_invstd.scalar_type() == acc_dt,
              "batch_norm_relu backward: save_mean/save_invstd must be ", acc_dt, " tensors of ", C, " elements");
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using OptT = std::optional<at::Tensor>;
using FwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const OptT&, const OptT&, const OptT&,
                                                              const OptT&, bool, double, double, double);
using BwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const OptT&,
                                                              const OptT&, const at::Tensor&, const at::Tensor&, bool,
                                                              double);

// The public op's kernels below are templates on the implementation tag (gankern::Native /
// gankern::Triton, common.h) that names the overload of _batch_norm_relu_fwd / _bwd they call.

constexpr char kFwdOp[] = "gankern::_batch_norm_relu_fwd", kBwdOp[] = "gankern::_batch_norm_relu_bwd";
template <class Impl>
const c10::TypedOperatorHandle<FwdSig>& fwd_op() { return internal_op<FwdSig, Impl, kFwdOp>(); }

template <class Impl>
const c10::TypedOperatorHandle<BwdSig>& bwd_op() { return internal_op<BwdSig, Impl, kBwdOp>(); }

template <class Impl>
struct BatchNormReluFn : public torch::autograd::Function<BatchNormReluFn<Impl>> {
  // Optional tensors stay std::optional: Function::apply records input metadata for every
  // defined Tensor argument and rejects undefined ones.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const OptT& running_mean,
                            const OptT& running_var, const OptT& weight, const OptT& bias, bool training,
                            double momentum, double eps, double negative_slope) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, invstd] =
        fwd_op<Impl>().call(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope);
    ctx->save_for_backward({input, opt_tensor(weight), opt_tensor(bias), mean, invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["negative_slope"] = negative_slope;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "gankern.batch_norm_relu: double backward (create_graph=True) is not supported by the "
                "'cpp', 'cuda' and 'triton' backends; use backend='reference' for higher-order gradients");
    auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3],
                     &invstd = saved[4];
    const bool training = ctx->saved_data["training"].toBool();
    const double negative_slope = ctx->saved_data["negative_slope"].toDouble();
    at::Tensor go = grads[0];
    if (!go.defined()) go = at::zeros_like(input);
    auto [gi, gw, gb] = bwd_op<Impl>().call(go, input, to_optional(weight), to_optional(bias), mean, invstd, training,
                                            negative_slope);
    return {gi, at::Tensor(), at::Tensor(), weight.defined() ? gw : at::Tensor(),
            bias.defined() ? gb : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Both kernels check first: a tensor on another device (say `meta`) would otherwise pick that
// device's kernel for the internal op.
template <class Impl>
at::Tensor bnr_autograd(const at::Tensor& input, const OptT& running_mean, const OptT& running_var,
                        const OptT& weight, const OptT& bias, bool training, double momentum, double eps,
                        double negative_slope) {
  bnr_check_args(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope);
  return BatchNormReluFn<Impl>::apply(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                      negative_slope);
}

template <class Impl>
at::Tensor bnr_noautograd(const at::Tensor& input, const OptT& running_mean, const OptT& running_var,
                          const OptT& weight, const OptT& bias, bool training, double momentum, double eps,
                          double negative_slope) {
  bnr_check_args(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope);
  return std::get<0>(
      fwd_op<Impl>().call(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope));
}

// _batch_norm_relu_check: the checks alone (the reference backend runs them: one contract for every backend)
void bnr_check(const at::Tensor& input, const OptT& running_mean, const OptT& running_var, const OptT& weight,
               const OptT& bias, bool training, double momentum, double eps, double negative_slope) {
  bnr_check_args(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope);
}

}  // namespace
}  // namespace gankern

TORCH_LIBRARY_FRAGMENT(gankern, m) {
  // Every op twice: the default overload runs the C++/CUDA kernels, `.triton` the Triton kernels
  // (registered from gankern/ops/batch_norm_relu.py, updating the running stats in place as well);
  // same schema, same checks and autograd.
  // negative_slope: 0 = ReLU (batch_norm_relu), > 0 = LeakyReLU (batch_norm_leaky_relu); defaulted so
  // that calls written before the LeakyReLU variant keep working.
  for (const char* ov : {"", ".triton"}) {
    auto def = [&](const char* name, const char* sig) { m.def((name + std::string(ov) + sig).c_str()); };
    def("batch_norm_relu", "(Tensor input, Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? weight, "
        "Tensor? bias, bool training, float momentum, float eps, float negative_slope=0.0) -> Tensor");
    // -> (output, save_mean, save_invstd); save_* are float32 (float64 for float64 input), shape (C,)
    def("_batch_norm_relu_fwd", "(Tensor input, Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? weight, "
        "Tensor? bias, bool training, float momentum, float eps, float negative_slope=0.0) -> (Tensor, Tensor, Tensor)");
    // -> (grad_input, grad_weight, grad_bias)
    def("_batch_norm_relu_bwd", "(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, Tensor save_mean, "
        "Tensor save_invstd, bool training, float negative_slope=0.0) -> (Tensor, Tensor, Tensor)");
  }
  m.def("_batch_norm_relu_check(Tensor input, Tensor? running_mean, Tensor? running_var, Tensor? weight, "
        "Tensor? bias, bool training, float momentum, float eps, float negative_slope=0.0) -> ()");
}

TORCH_LIBRARY_IMPL(gankern, Autograd, m) {
  m.impl("batch_norm_relu", &gankern::bnr_autograd<gankern::Native>);
  m.impl("batch_norm_relu.triton", &gankern::bnr_autograd<gankern::Triton>);
}

TORCH_LIBRARY_IMPL(gankern, CompositeExplicitAutograd, m) {
  m.impl("batch_norm_relu", &gankern::bnr_noautograd<gankern::Native>);
  m.impl("batch_norm_relu.triton", &gankern::bnr_noautograd<gankern::Triton>);
}

TORCH_LIBRARY_IMPL(gankern, CompositeImplicitAutograd, m) {
  m.impl("_batch_norm_relu_check", &gankern::bnr_check);
}
