// gankern::linear_leaky_relu: schemas, argument checks, C++ autograd (shared by CPU, CUDA and Triton: the
// overloads default and triton of the public op and its internal ops).
//
//   linear_leaky_relu(input (*, K), weight (N, K), bias (N,)?, slope) -> (*, N)
//   _linear_leaky_relu_fwd(...)                        the fused kernel (per device)
//   _linear_leaky_relu_bwd(grad_output, saved, input, weight, slope, output_mask)
//       -> (grad_input, grad_weight, grad_bias)        dZ + bias column sums in one pass, then the two GEMMs
//
// The autograd Function saves (input, weight, output): for slope >= 0 the sign of the output
// is the sign of the pre-activation, so no pre-activation tensor is kept.  A negative slope
// runs the fused kernel with slope 1 (plain linear, its output z saved as sign source) and
// applies at::leaky_relu(z, slope) after it, which saves z itself: correct, not fused.
// Double backward: when grad mode is on in backward (create_graph=True) the gradients are
// computed with differentiable ATen ops (the mask from the saved output is piecewise constant).
#include <torch/library.h>
#include <torch/autograd.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include "gankern/common.h"
#include "gankern/linear_leaky_relu.h"

namespace gankern {
namespace llr {

namespace {
bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}
}  // namespace

void check_args(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, const char* op) {
  TORCH_INTERNAL_ASSERT(input.defined() && weight.defined());  // non-optional Tensors of the schema
  TORCH_CHECK(input.dim() >= 1, op, ": input must have shape (*, in_features) with at least 1 dimension; got a 0-d tensor");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (out_features, in_features); got shape ", weight.sizes());
  TORCH_CHECK(supported_dtype(input.scalar_type()), op,
              ": input must be float32, float64, float16 or bfloat16; got ", py_dtype(input.scalar_type()));
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op, ": weight dtype ", py_dtype(weight.scalar_type()),
              " does not match input dtype ", py_dtype(input.scalar_type()));
  TORCH_CHECK(weight.device() == input.device(), op, ": weight is on ", weight.device(),
              " but input is on ", input.device(), " (expected the same device)");
  TORCH_CHECK(input.size(-1) == weight.size(1), op, ": input.shape[-1] (in_features) must equal weight.shape[1]; got input shape ",
              input.sizes(), " and weight shape ", weight.sizes());
  if (bias.defined()) {
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), op, ": bias must have shape (out_features,) = (",
                weight.size(0), ",); got shape ", bias.sizes());
    TORCH_CHECK(bias.scalar_type() == input.scalar_type(), op, ": bias dtype ", py_dtype(bias.scalar_type()),
                " does not match input dtype ", py_dtype(input.scalar_type()));
    TORCH_CHECK(bias.device() == input.device(), op, ": bias is on ", bias.device(), " but input is on ",
                input.device(), " (expected the same device)");
  }
}

void check_bwd_args(const at::Tensor& grad_output, const at::Tensor& saved, const at::Tensor& input,
                    const at::Tensor& weight, const char* op) {
  check_args(input, weight, at::Tensor(), op);
  auto expect = input.sizes().vec();
  expect.back() = weight.size(0);
  TORCH_INTERNAL_ASSERT(grad_output.defined() && saved.defined());
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(expect), op, ": grad_output must have shape ",
              at::IntArrayRef(expect), "; got ", grad_output.sizes());
  TORCH_CHECK(saved.sizes() == at::IntArrayRef(expect), op, ": saved output must have shape ",
              at::IntArrayRef(expect));
  for (const at::Tensor* t : {&grad_output, &saved}) {
    TORCH_CHECK(t->scalar_type() == input.scalar_type(), op, ": grad_output/saved dtype ",
                py_dtype(t->scalar_type()), " does not match input dtype ", py_dtype(input.scalar_type()));
    TORCH_CHECK(t->device() == input.device(), op, ": grad_output/saved on ", t->device(), ", input on ", input.device());
  }
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double);
using BwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                              const at::Tensor&, double, std::array<bool, 3>);

// The public op's kernels below are templates on the implementation tag (gankern::Native /
// gankern::Triton, common.h) that names the overload of _linear_leaky_relu_fwd / _bwd they call.

constexpr char kFwdOp[] = "gankern::_linear_leaky_relu_fwd", kBwdOp[] = "gankern::_linear_leaky_relu_bwd";
template <class Impl>
const c10::TypedOperatorHandle<FwdSig>& fwd_op() { return internal_op<FwdSig, Impl, kFwdOp>(); }

template <class Impl>
const c10::TypedOperatorHandle<BwdSig>& bwd_op() { return internal_op<BwdSig, Impl, kBwdOp>(); }

// y = leaky_relu(input @ weight^T + bias, slope) for slope >= 0 (see the header comment).
// The shared backward; `nb` = bias gradient wanted.
template <class Impl>
variable_list llr_backward(AutogradContext* ctx, const at::Tensor& g, bool nx, bool nw, bool nb) {
  auto saved = ctx->get_saved_variables();
  const at::Tensor& x = saved[0];
  const at::Tensor& w = saved[1];
  const at::Tensor& y = saved[2];
  const double slope = ctx->saved_data["slope"].toDouble();
  at::Tensor gx, gw, gb;
  if (!g.defined() || !(nx || nw || nb)) return {gx, gw, gb};
  if (at::GradMode::is_enabled()) {
    // create_graph=True: differentiable ATen ops, so the gradient can be differentiated again
    // (WGAN-GP / R1 penalties), with the graph torch builds for leaky_relu(linear(x, w, b)):
    // dZ through ATen's leaky_relu_backward on the saved output y (torch has it on z; the sign is
    // the same for slope >= 0).  Its derivative with respect to y is zero (the mask is piecewise
    // constant), but it keeps y, and through y the bias, weight and input, in the graph, so a
    // penalty differentiated again gives them zero gradients where torch does, not None (an
    // optimizer skips parameters whose .grad is None: Adam's step counts would differ).  Slope 1
    // is a plain nn.Linear (gankern.nn.Linear): no activation in torch's graph, dZ = dY, and no
    // gradient reaches the bias (None), as with torch's linear.
    const int64_t N = w.size(0), K = w.size(1);
    const int64_t M = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
    at::Tensor dz = (slope == 1.0 ? g : at::leaky_relu_backward(g, y, slope, false)).reshape({M, N});
    if (nx) gx = dz.mm(w).reshape(x.sizes());
    if (nw) gw = dz.t().mm(x.reshape({M, K}));
    if (nb) gb = dz.sum(0);
  } else {
    std::tie(gx, gw, gb) = bwd_op<Impl>().call(g, y, x, w, slope, {nx, nw, nb});
  }
  return {nx ? gx : at::Tensor(), nw ? gw : at::Tensor(), nb ? gb : at::Tensor()};
}

template <class Impl>
at::Tensor llr_forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, double slope) {
  at::Tensor y;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    y = fwd_op<Impl>().call(input, weight, bias, slope);
  }
  ctx->save_for_backward({input, weight, y});
  ctx->saved_data["slope"] = slope;
  return y;
}

template <class Impl>
struct LinearLeakyReLUFn : public torch::autograd::Function<LinearLeakyReLUFn<Impl>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& bias, double slope) {
    return llr_forward<Impl>(ctx, input, weight, bias, slope);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto r = llr_backward<Impl>(ctx, grads[0], ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                ctx->needs_input_grad(2));
    return {r[0], r[1], r[2], at::Tensor()};
  }
};

template <class Impl>
struct LinearLeakyReLUNoBiasFn : public torch::autograd::Function<LinearLeakyReLUNoBiasFn<Impl>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight, double slope) {
    return llr_forward<Impl>(ctx, input, weight, std::nullopt, slope);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto r = llr_backward<Impl>(ctx, grads[0], ctx->needs_input_grad(0), ctx->needs_input_grad(1), false);
    return {r[0], r[1], at::Tensor()};
  }
};

template <class Impl>
at::Tensor apply_fn(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    double slope) {
  if (has_tensor(bias)) return LinearLeakyReLUFn<Impl>::apply(input, weight, *bias, slope);
  return LinearLeakyReLUNoBiasFn<Impl>::apply(input, weight, slope);
}

const char* kOp = "gankern.linear_leaky_relu";

template <class Impl>
at::Tensor llr_autograd(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        double slope) {
  // checked before any internal op: a tensor on another device (say `meta`) would pick that device's kernel
  check_args(input, weight, opt_tensor(bias), kOp);
  if (slope >= 0) return apply_fn<Impl>(input, weight, bias, slope);
  // negative (or NaN) slope: the output's sign no longer tells the pre-activation's sign.
  return at::leaky_relu(apply_fn<Impl>(input, weight, bias, 1.0), slope);
}

template <class Impl>
at::Tensor llr_composite(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         double slope) {
  check_args(input, weight, opt_tensor(bias), kOp);
  return fwd_op<Impl>().call(input, weight, bias, slope);
}

// _linear_leaky_relu_check: the checks alone (the reference backend runs them: one contract for every backend)
void llr_check(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
               double /*slope*/) {
  check_args(input, weight, opt_tensor(bias), kOp);
}

}  // namespace
}  // namespace llr
}  // namespace gankern

TORCH_LIBRARY_FRAGMENT(gankern, m) {
  // Every op twice: the default overload runs the C++/CUDA kernels, `.triton` the Triton kernels
  // (registered from gankern/ops/linear_leaky_relu.py); same schema, same checks and autograd.
  for (const char* ov : {"", ".triton"}) {
    auto def = [&](const char* name, const char* sig) { m.def((name + std::string(ov) + sig).c_str()); };
    def("linear_leaky_relu", "(Tensor input, Tensor weight, Tensor? bias=None, float negative_slope=0.2) -> Tensor");
    def("_linear_leaky_relu_fwd", "(Tensor input, Tensor weight, Tensor? bias, float negative_slope) -> Tensor");
    def("_linear_leaky_relu_bwd", "(Tensor grad_output, Tensor saved, Tensor input, Tensor weight, "
        "float negative_slope, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  }
  m.def("_linear_leaky_relu_check(Tensor input, Tensor weight, Tensor? bias=None, float negative_slope=0.2) -> ()");
}

TORCH_LIBRARY_IMPL(gankern, Autograd, m) {
  m.impl("linear_leaky_relu", &gankern::llr::llr_autograd<gankern::Native>);
  m.impl("linear_leaky_relu.triton", &gankern::llr::llr_autograd<gankern::Triton>);
}

TORCH_LIBRARY_IMPL(gankern, CompositeExplicitAutograd, m) {
  m.impl("linear_leaky_relu", &gankern::llr::llr_composite<gankern::Native>);
  m.impl("linear_leaky_relu.triton", &gankern::llr::llr_composite<gankern::Triton>);
}

TORCH_LIBRARY_IMPL(gankern, CompositeImplicitAutograd, m) {
  m.impl("_linear_leaky_relu_check", &gankern::llr::llr_check);
}
