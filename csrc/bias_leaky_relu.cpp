// gankern::bias_leaky_relu: schemas, argument checks, layout helper, C++ autograd (shared by CPU, CUDA and
// Triton: the overloads default and triton of the public op and its internal ops).
//
//   bias_leaky_relu(input, bias (C,), slope, dim) -> leaky_relu(input + bias broadcast along dim, slope)
//   _bias_leaky_relu_fwd(input, bias, slope, dim)                   the fused kernel (per device)
//   _bias_leaky_relu_bwd(grad_output, saved, slope, dim, output_mask) -> (grad_input, grad_bias)
//
// The autograd Function saves only the output y: for slope >= 0 its sign is the sign of the
// pre-activation (StyleGAN2's bias_act does the same), so neither the input nor the pre-activation
// is kept.  A negative (or NaN) slope runs the kernel with slope 1 (bias only) and applies
// at::leaky_relu after it, which saves the pre-activation itself: correct, not fused.
// Double backward (create_graph=True): the input gradient is at::leaky_relu_backward(g, y, slope,
// self_is_result=true), differentiable in g (the mask) and in y (a zero gradient, as torch's own
// leaky_relu gives), so gradient penalties see the same defined-zero gradients as with torch.
#include <torch/library.h>
#include <torch/autograd.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <numeric>
#include "gankern/common.h"
#include "gankern/bias_leaky_relu.h"

namespace gankern {
namespace bact {

namespace {
bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

int64_t norm_dim(const at::Tensor& input, int64_t dim, const char* op) {
  const int64_t n = input.dim();
  TORCH_CHECK(dim >= -n && dim < n, op, ": dim must be in [", -n, ", ", n - 1, "] for a ", n,
              "-D input; got dim=", dim);
  return dim < 0 ? dim + n : dim;
}
}  // namespace

int64_t check_args(const at::Tensor& input, const at::Tensor& bias, int64_t dim, const char* op) {
  TORCH_INTERNAL_ASSERT(input.defined() && bias.defined());  // the schema has no optional tensors
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least 1 dimension (the channel dimension); got a 0-d tensor");
  TORCH_CHECK(supported_dtype(input.scalar_type()), op,
              ": input must be float32, float64, float16 or bfloat16; got ", py_dtype(input.scalar_type()));
  const int64_t d = norm_dim(input, dim, op);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == input.size(d), op, ": bias must have shape (C,) = (", input.size(d),
              ",), the size of input dimension ", d, "; got bias shape ", bias.sizes(), " for input shape ",
              input.sizes());
  TORCH_CHECK(bias.scalar_type() == input.scalar_type(), op, ": bias dtype ", py_dtype(bias.scalar_type()),
              " does not match input dtype ", py_dtype(input.scalar_type()));
  TORCH_CHECK(bias.device() == input.device(), op, ": bias is on ", bias.device(), " but input is on ",
              input.device(), " (expected the same device)");
  return d;
}

int64_t check_bwd_args(const at::Tensor& grad_output, const at::Tensor& saved, int64_t dim, const char* op) {
  TORCH_INTERNAL_ASSERT(saved.defined() && grad_output.defined());
  TORCH_CHECK(saved.dim() >= 1, op, ": saved output must be a tensor with at least 1 dimension");
  TORCH_CHECK(supported_dtype(saved.scalar_type()), op,
              ": saved output must be float32, float64, float16 or bfloat16; got ", saved.scalar_type());
  const int64_t d = norm_dim(saved, dim, op);
  TORCH_CHECK(grad_output.sizes() == saved.sizes(), op, ": grad_output must have shape ", saved.sizes(),
              " (the output's); got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == saved.scalar_type(), op, ": grad_output dtype ",
              grad_output.scalar_type(), " does not match the output dtype ", saved.scalar_type());
  TORCH_CHECK(grad_output.device() == saved.device(), op, ": grad_output is on ", grad_output.device(),
              ", the saved output on ", saved.device());
  return d;
}

namespace {
Dense make_dense(at::Tensor t, std::vector<int64_t> perm, int64_t dim) {
  at::Tensor p = t.permute(perm);
  if (!p.is_contiguous()) p = p.contiguous();
  const int64_t d = std::find(perm.begin(), perm.end(), dim) - perm.begin();
  const auto s = p.sizes();
  const int64_t outer = c10::multiply_integers(s.slice(0, d));
  const int64_t inner = c10::multiply_integers(s.slice(d + 1));
  return Dense{p, std::move(perm), outer, s[d], inner};
}
}  // namespace

Dense dense_view(const at::Tensor& t0, int64_t dim) {
  at::Tensor t = t0;
  std::vector<int64_t> perm(t.dim());
  std::iota(perm.begin(), perm.end(), int64_t(0));
  if (!t.is_contiguous()) {
    if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) perm = {0, 2, 3, 1};
    else if (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d)) perm = {0, 2, 3, 4, 1};
    else t = t.contiguous();
  }
  return make_dense(t, std::move(perm), dim);
}

Dense dense_like(const at::Tensor& t, const Dense& like) {
  at::Tensor p = t.permute(like.perm);
  if (!p.is_contiguous()) p = p.contiguous();
  return Dense{p, like.perm, like.outer, like.C, like.inner};
}

at::Tensor new_dense(const Dense& like, const at::TensorOptions& opts) {
  at::Tensor out = new_empty(like.t.sizes(), opts.memory_format(at::MemoryFormat::Contiguous));
  std::vector<int64_t> inv(like.perm.size());
  for (size_t i = 0; i < like.perm.size(); ++i) inv[like.perm[i]] = int64_t(i);
  return out.permute(inv);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, double, int64_t);
using BwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double, int64_t,
                                                  std::array<bool, 2>);

// The public op's kernels below are templates on the implementation tag (gankern::Native /
// gankern::Triton, common.h) that names the overload of _bias_leaky_relu_fwd / _bwd they call.

constexpr char kFwdOp[] = "gankern::_bias_leaky_relu_fwd", kBwdOp[] = "gankern::_bias_leaky_relu_bwd";
template <class Impl>
const c10::TypedOperatorHandle<FwdSig>& fwd_op() { return internal_op<FwdSig, Impl, kFwdOp>(); }

template <class Impl>
const c10::TypedOperatorHandle<BwdSig>& bwd_op() { return internal_op<BwdSig, Impl, kBwdOp>(); }

std::vector<int64_t> other_dims(int64_t n, int64_t dim) {
  std::vector<int64_t> r;
  for (int64_t i = 0; i < n; ++i)
    if (i != dim) r.push_back(i);
  return r;
}

template <class Impl>
struct BiasLeakyReLUFn : public torch::autograd::Function<BiasLeakyReLUFn<Impl>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& bias, double slope,
                            int64_t dim) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      y = fwd_op<Impl>().call(input, bias, slope, dim);
    }
    ctx->save_for_backward({y});
    ctx->saved_data["slope"] = slope;
    ctx->saved_data["dim"] = dim;
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor y = ctx->get_saved_variables()[0];
    const double slope = ctx->saved_data["slope"].toDouble();
    const int64_t dim = ctx->saved_data["dim"].toInt();
    const bool nx = ctx->needs_input_grad(0), nb = ctx->needs_input_grad(1);
    const at::Tensor& g = grads[0];
    at::Tensor gx, gb;
    if (g.defined() && (nx || nb)) {
      if (at::GradMode::is_enabled()) {
        // create_graph=True: differentiable ATen ops (see the header comment)
        gx = slope == 1.0 ? g : at::leaky_relu_backward(g, y, slope, /*self_is_result=*/true);
        if (nb) gb = y.dim() == 1 ? gx : gx.sum(other_dims(y.dim(), dim));
      } else {
        std::tie(gx, gb) = bwd_op<Impl>().call(g, y, slope, dim, {nx, nb});
      }
    }
    // an output that was not asked for may come back as an empty placeholder
    return {nx ? gx : at::Tensor(), nb ? gb : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

const char* kOp = "gankern.bias_leaky_relu";

template <class Impl>
at::Tensor bact_autograd(const at::Tensor& input, const at::Tensor& bias, double slope, int64_t dim) {
  // checked before any internal op: a tensor on another device (say `meta`) would pick that device's kernel
  const int64_t d = check_args(input, bias, dim, kOp);
  if (slope >= 0) return BiasLeakyReLUFn<Impl>::apply(input, bias, slope, d);
  // negative (or NaN) slope: the output's sign no longer tells the pre-activation's sign
  return at::leaky_relu(BiasLeakyReLUFn<Impl>::apply(input, bias, 1.0, d), slope);
}

template <class Impl>
at::Tensor bact_composite(const at::Tensor& input, const at::Tensor& bias, double slope, int64_t dim) {
  const int64_t d = check_args(input, bias, dim, kOp);
  return fwd_op<Impl>().call(input, bias, slope, d);
}

// _bias_leaky_relu_check: the checks alone (the reference backend runs them, so every backend has one contract)
void bact_check(const at::Tensor& input, const at::Tensor& bias, double /*slope*/, int64_t dim) {
  check_args(input, bias, dim, kOp);
}

}  // namespace
}  // namespace bact
}  // namespace gankern

TORCH_LIBRARY_FRAGMENT(gankern, m) {
  // Every op twice: the default overload runs the C++/CUDA kernels, `.triton` the Triton kernels
  // (registered from gankern/ops/bias_leaky_relu.py); same schema, same checks and autograd.
  for (const char* ov : {"", ".triton"}) {
    auto def = [&](const char* name, const char* sig) { m.def((name + std::string(ov) + sig).c_str()); };
    def("bias_leaky_relu", "(Tensor input, Tensor bias, float negative_slope=0.2, int dim=1) -> Tensor");
    def("_bias_leaky_relu_fwd", "(Tensor input, Tensor bias, float negative_slope, int dim) -> Tensor");
    def("_bias_leaky_relu_bwd", "(Tensor grad_output, Tensor saved, float negative_slope, int dim, "
        "bool[2] output_mask) -> (Tensor, Tensor)");
  }
  m.def("_bias_leaky_relu_check(Tensor input, Tensor bias, float negative_slope=0.2, int dim=1) -> ()");
}

TORCH_LIBRARY_IMPL(gankern, Autograd, m) {
  m.impl("bias_leaky_relu", &gankern::bact::bact_autograd<gankern::Native>);
  m.impl("bias_leaky_relu.triton", &gankern::bact::bact_autograd<gankern::Triton>);
}

TORCH_LIBRARY_IMPL(gankern, CompositeExplicitAutograd, m) {
  m.impl("bias_leaky_relu", &gankern::bact::bact_composite<gankern::Native>);
  m.impl("bias_leaky_relu.triton", &gankern::bact::bact_composite<gankern::Triton>);
}

TORCH_LIBRARY_IMPL(gankern, CompositeImplicitAutograd, m) {
  m.impl("_bias_leaky_relu_check", &gankern::bact::bact_check);
}
