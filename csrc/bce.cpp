// gankern::bce_with_logits: binary_cross_entropy_with_logits fused into one forward and one
// backward kernel.  Schemas, argument checks, operand preparation and the C++ autograd shared
// by the CPU kernels (csrc/cpu/bce.cpp), the CUDA glue (csrc/cuda/bce_glue.cpp) and the Triton kernels
// (overload triton, gankern/ops/bce.py).
//
// The target is either a tensor (input's shape and dtype) or a float (`target` = None and
// `target_scalar`): GAN labels 1.0 / 0.0 / 0.9 need no label tensor.
//
// What the backward keeps: input, target, weight, pos_weight (references, no copies).  The
// gradient is NOT computed in the forward pass: that would cost one extra write of N elements
// in the forward and one read in the backward (the backward still has to write N and read
// the incoming gradient), i.e. more memory traffic than recomputing sigmoid(x) from x; and a
// forward without backward (eval, the generator's loss on a frozen D...) would pay for it too.
//
// Double backward (create_graph=True): the backward is then built from differentiable ATen ops
// (torch's formulas), so higher-order gradients work as in torch; otherwise the fused kernel runs.
#include <torch/library.h>
#include <torch/autograd.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <sstream>
#include "gankern/common.h"
#include "gankern/bce.h"

namespace gankern {
namespace bce {

void check_args(const at::Tensor& input, const std::optional<at::Tensor>& target, double target_scalar,
                const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                int64_t reduction) {
  TORCH_INTERNAL_ASSERT(input.defined());  // a non-optional Tensor of the schema
  const auto dt = input.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
              "bce_with_logits: input must be a float32, float16, bfloat16 or float64 tensor, got ", py_dtype(dt));
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2,
                    "bce_with_logits: reduction must be 0 ('none'), 1 ('mean') or 2 ('sum'), got ", reduction);
  if (has_tensor(target)) {
    const at::Tensor& t = *target;
    TORCH_CHECK_VALUE(t.sizes() == input.sizes(), "Target size (", sizes_str(t.sizes()),
                      ") must be the same as input size (", sizes_str(input.sizes()), ")");
    TORCH_CHECK(t.device() == input.device(), "bce_with_logits: target must be on the input's device ",
                input.device(), ", got ", t.device());
    TORCH_CHECK(t.scalar_type() == dt, "bce_with_logits: target must have the input's dtype ", py_dtype(dt), ", got ",
                py_dtype(t.scalar_type()), " (convert it, or pass a float target)");
  }
  const char* names[2] = {"weight", "pos_weight"};
  const std::optional<at::Tensor>* ts[2] = {&weight, &pos_weight};
  for (int i = 0; i < 2; ++i) {
    if (!has_tensor(*ts[i])) continue;
    const at::Tensor& w = **ts[i];
    TORCH_CHECK(at::isFloatingType(w.scalar_type()), "bce_with_logits: ", names[i],
                " must be a floating-point tensor, got ", py_dtype(w.scalar_type()));
    TORCH_CHECK(w.device() == input.device(), "bce_with_logits: ", names[i], " must be on the input's device ",
                input.device(), ", got ", w.device());
    TORCH_CHECK(at::is_expandable_to(w.sizes(), input.sizes()), "bce_with_logits: ", names[i], " of shape ",
                sizes_str(w.sizes()), " cannot be broadcast to the input's shape ", sizes_str(input.sizes()));
  }
}

void check_bwd_args(const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& target,
                    double target_scalar, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& pos_weight, int64_t reduction, bool need_target) {
  check_args(input, target, target_scalar, weight, pos_weight, reduction);
  TORCH_CHECK(grad_out.device() == input.device(), "bce_with_logits backward: grad_out must be on ",
              input.device(), ", got ", grad_out.device());
  TORCH_CHECK(reduction == kNone ? at::is_expandable_to(grad_out.sizes(), input.sizes()) : grad_out.numel() == 1,
              "bce_with_logits backward: grad_out has shape ", grad_out.sizes(), ", expected ",
              reduction == kNone ? "the input's shape" : "a single element");
  TORCH_CHECK(!need_target || has_tensor(target),
              "bce_with_logits backward: need_target=True requires a target tensor");
}

static at::Tensor prep_weight(const std::optional<at::Tensor>& w, const at::Tensor& input, at::ScalarType acc) {
  if (!has_tensor(w)) return at::Tensor();
  at::Tensor a = w->to(acc);
  if (a.numel() == 1) return a.reshape({});
  if (a.sizes() == input.sizes()) return a.contiguous();
  return a.expand(input.sizes()).contiguous();  // e.g. pos_weight (C,) for an (N, C) input
}

Operands prepare(const at::Tensor& input, const std::optional<at::Tensor>& target,
                 const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight) {
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Operands o;
  o.x = input.contiguous();
  if (has_tensor(target)) o.t = target->contiguous();
  o.w = prep_weight(weight, input, acc);
  o.pw = prep_weight(pos_weight, input, acc);
  return o;
}

}  // namespace bce

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdSig = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, double,
                          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t);
using BwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                  const std::optional<at::Tensor>&, double,
                                                  const std::optional<at::Tensor>&,
                                                  const std::optional<at::Tensor>&, int64_t, bool);

// The public op's kernels below are templates on the implementation tag (gankern::Native /
// gankern::Triton, common.h) that names the overload of _bce_with_logits_fwd / _bwd they call.

constexpr char kFwdOp[] = "gankern::_bce_with_logits_fwd", kBwdOp[] = "gankern::_bce_with_logits_bwd";
template <class Impl>
const c10::TypedOperatorHandle<FwdSig>& fwd_op() { return internal_op<FwdSig, Impl, kFwdOp>(); }
template <class Impl>
const c10::TypedOperatorHandle<BwdSig>& bwd_op() { return internal_op<BwdSig, Impl, kBwdOp>(); }

// The backward from differentiable ATen ops (torch's formulas), for create_graph=True.
std::tuple<at::Tensor, at::Tensor> backward_differentiable(const at::Tensor& go, const at::Tensor& x,
                                                           const at::Tensor& target, double ts,
                                                           const at::Tensor& w, const at::Tensor& pw,
                                                           int64_t reduction, bool need_x, bool need_t) {
  at::Tensor t = target.defined() ? target : at::full_like(x, ts);
  at::Tensor scale = go;
  if (w.defined()) scale = scale * w;
  if (reduction == bce::kMean) scale = scale / static_cast<double>(x.numel());
  at::Tensor gx, gt;
  if (need_x) {
    at::Tensor s = at::sigmoid(x);
    gx = pw.defined() ? ((pw * t + 1 - t) * s - pw * t) : (s - t);
    gx = (gx * scale).to(x.scalar_type()).expand(x.sizes());
  }
  if (need_t) {
    gt = pw.defined() ? (at::log_sigmoid(-x) - pw * at::log_sigmoid(x)) : -x;
    gt = (gt * scale).to(x.scalar_type()).expand(x.sizes());
  }
  return {gx, gt};
}

template <class Impl>
struct BceFn : public torch::autograd::Function<BceFn<Impl>> {
  // Optional tensors stay std::optional: torch::autograd::Function::apply cannot take undefined at::Tensor inputs.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const std::optional<at::Tensor>& target,
                            double target_scalar, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = fwd_op<Impl>().call(input, target, target_scalar, weight, pos_weight, reduction);
    ctx->save_for_backward({input, opt_tensor(target), opt_tensor(weight), opt_tensor(pos_weight)});
    ctx->saved_data["ts"] = target_scalar;
    ctx->saved_data["red"] = reduction;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &t = saved[1], &w = saved[2], &pw = saved[3];
    const double ts = ctx->saved_data["ts"].toDouble();
    const int64_t red = ctx->saved_data["red"].toInt();
    const at::Tensor& go = grads[0];
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_t = t.defined() && ctx->needs_input_grad(1);
    variable_list out(6);
    if (!go.defined() || (!need_x && !need_t)) return out;
    at::Tensor gx, gt;
    if (at::GradMode::is_enabled()) {
      std::tie(gx, gt) = backward_differentiable(go, x, t, ts, w, pw, red, need_x, need_t);
    } else {
      std::tie(gx, gt) =
          bwd_op<Impl>().call(go, x, to_optional(t), ts, to_optional(w), to_optional(pw), red, need_t);
    }
    out[0] = need_x ? gx : at::Tensor();
    out[1] = need_t ? gt : at::Tensor();
    return out;
  }
};

template <class Impl>
at::Tensor bce_autograd(const at::Tensor& input, const std::optional<at::Tensor>& target, double target_scalar,
                        const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                        int64_t reduction) {
  // Checked here, before the dispatcher picks a kernel for the internal op: with a tensor on
  // another device (say `meta`) it would pick that device's kernel (a fake one for meta) and
  // return uninitialised memory instead of an error.
  bce::check_args(input, target, target_scalar, weight, pos_weight, reduction);
  if (at::GradMode::is_enabled()) {
    // As torch: weight / pos_weight are not differentiable.
    TORCH_CHECK(!(has_tensor(weight) && weight->requires_grad()),
                "The function 'binary_cross_entropy_with_logits' is not differentiable with respect to argument "
                "'weight'. This input cannot have requires_grad True.");
    TORCH_CHECK(!(has_tensor(pos_weight) && pos_weight->requires_grad()),
                "The function 'binary_cross_entropy_with_logits' is not differentiable with respect to argument "
                "'pos_weight'. This input cannot have requires_grad True.");
  }
  if (!at::GradMode::is_enabled() || !(input.requires_grad() || (has_tensor(target) && target->requires_grad()))) {
    at::AutoDispatchBelowADInplaceOrView guard;  // nothing to record: skip the autograd Function
    return fwd_op<Impl>().call(input, target, target_scalar, weight, pos_weight, reduction);
  }
  return BceFn<Impl>::apply(input, target, target_scalar, weight, pos_weight, reduction);
}

template <class Impl>
at::Tensor bce_noautograd(const at::Tensor& input, const std::optional<at::Tensor>& target, double target_scalar,
                          const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                          int64_t reduction) {
  bce::check_args(input, target, target_scalar, weight, pos_weight, reduction);  // see bce_autograd
  return fwd_op<Impl>().call(input, target, target_scalar, weight, pos_weight, reduction);
}

// _bce_with_logits_check: the checks alone (the reference backend runs them: one contract for every backend)
void bce_check(const at::Tensor& input, const std::optional<at::Tensor>& target, double target_scalar,
               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
               int64_t reduction) {
  bce::check_args(input, target, target_scalar, weight, pos_weight, reduction);
}

}  // namespace
}  // namespace gankern

TORCH_LIBRARY_FRAGMENT(gankern, m) {
  // Every op twice: the default overload runs the C++/CUDA kernels, `.triton` the Triton kernels
  // (registered from gankern/ops/bce.py); same schema, same checks and autograd.
  // target: a tensor of the input's shape and dtype, or None and then target_scalar is the target
  // of every element.  reduction: 0 none, 1 mean, 2 sum (at::Reduction).
  constexpr const char* args = "(Tensor input, Tensor? target, float target_scalar, Tensor? weight, "
                               "Tensor? pos_weight, int reduction)";
  for (const char* ov : {"", ".triton"}) {
    auto def = [&](const char* name, const std::string& sig) { m.def((name + std::string(ov) + sig).c_str()); };
    def("bce_with_logits", std::string(args) + " -> Tensor");
    def("_bce_with_logits_fwd", std::string(args) + " -> Tensor");
    // -> (grad_input, grad_target); grad_target is an empty (0,) tensor unless need_target.
    def("_bce_with_logits_bwd", "(Tensor grad_out, Tensor input, Tensor? target, float target_scalar, "
        "Tensor? weight, Tensor? pos_weight, int reduction, bool need_target) -> (Tensor, Tensor)");
  }
  m.def((std::string("_bce_with_logits_check") + args + " -> ()").c_str());
}

TORCH_LIBRARY_IMPL(gankern, Autograd, m) {
  m.impl("bce_with_logits", &gankern::bce_autograd<gankern::Native>);
  m.impl("bce_with_logits.triton", &gankern::bce_autograd<gankern::Triton>);
}

TORCH_LIBRARY_IMPL(gankern, CompositeExplicitAutograd, m) {
  m.impl("bce_with_logits", &gankern::bce_noautograd<gankern::Native>);
  m.impl("bce_with_logits.triton", &gankern::bce_noautograd<gankern::Triton>);
}

TORCH_LIBRARY_IMPL(gankern, CompositeImplicitAutograd, m) {
  m.impl("_bce_with_logits_check", &gankern::bce_check);
}
