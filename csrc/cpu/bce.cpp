// CPU kernels of the fused BCE-with-logits (the op itself: csrc/bce.cpp).
//
// One pass over the elements per direction.  Work is cut into fixed chunks of bce::kChunk
// elements; a chunk is processed in tiles of kTile elements: fp16/bf16 tiles are widened to
// float in a small stack buffer, then at::vec::Vectorized math (exp/log1p: SLEEF on AVX2)
// computes in float (double for fp64 inputs).  For reductions each chunk yields one partial
// sum (vector lanes added in a fixed order) and the partials are added in chunk order in
// double: bitwise reproducible, independent of the thread count.  Inputs below kParallelMin
// elements run inline on the calling thread (no parallel region, no allocation beyond the
// output), which is what GAN-sized losses (64..1024 logits) need.
#if defined(__AVX2__) && defined(__FMA__) && !defined(CPU_CAPABILITY)
// Use ATen's AVX2 vector types (and the SLEEF exp/log1p that libtorch_cpu exports) rather than
// the scalar fallback of the DEFAULT capability.
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>
#include <algorithm>
#include <type_traits>
#include "gankern/common.h"
#include "gankern/bce.h"

namespace gankern {
namespace {

using at::vec::Vectorized;
constexpr int64_t kTile = 256;
constexpr int64_t kParallelMin = 1 << 16;
static_assert(bce::kChunk % kTile == 0, "chunks are whole tiles");

template <typename acc_t>
struct Ctx {
  const acc_t* w = nullptr;   // full weight (N), or nullptr
  const acc_t* pw = nullptr;  // full pos_weight (N), or nullptr
  acc_t w_s = 1, pw_s = 1;    // scalar weight / pos_weight (when the pointers are null)
  bool has_pw = false;
  acc_t t_s = 0;              // scalar target (when there is no target tensor)
};

template <typename acc_t>
void fill_ctx(Ctx<acc_t>& c, const bce::Operands& o, double ts) {
  c.t_s = static_cast<acc_t>(ts);
  if (o.w.defined()) {
    if (o.w.dim() == 0) c.w_s = o.w.data_ptr<acc_t>()[0];
    else c.w = o.w.data_ptr<acc_t>();
  }
  if (o.pw.defined()) {
    c.has_pw = true;
    if (o.pw.dim() == 0) c.pw_s = o.pw.data_ptr<acc_t>()[0];
    else c.pw = o.pw.data_ptr<acc_t>();
  }
}

// n elements of src (scalar_t) as acc_t: the pointer itself when the types match, else widened into buf.
template <typename scalar_t, typename acc_t>
inline const acc_t* widen(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<acc_t>(src[j]);
    return buf;
  }
}

template <typename acc_t>
inline Vectorized<acc_t> ld(const acc_t* p, int64_t m) {
  using V = Vectorized<acc_t>;
  return m == V::size() ? V::loadu(p) : V::loadu(p, m);
}

template <typename acc_t>
inline Vectorized<acc_t> log_sigmoid_v(const Vectorized<acc_t>& x, const Vectorized<acc_t>& zero) {
  // min(x, 0) - log1p(exp(-|x|)); NaN propagates through log1p.
  return at::vec::minimum(x, zero) - x.abs().neg().exp().log1p();
}

// Loss of n <= kTile elements starting at i0 -> out[0..n).
template <typename scalar_t, typename acc_t>
inline void tile_loss(const scalar_t* x, const scalar_t* t, const Ctx<acc_t>& c, int64_t i0, int64_t n,
                      acc_t* out) {
  using V = Vectorized<acc_t>;
  acc_t xb[kTile], tb[kTile];
  const acc_t* xa = widen<scalar_t, acc_t>(x + i0, n, xb);
  const acc_t* ta = t ? widen<scalar_t, acc_t>(t + i0, n, tb) : nullptr;
  const V one(1), zero(0);
  for (int64_t j = 0; j < n; j += V::size()) {
    const int64_t m = std::min<int64_t>(V::size(), n - j);
    const V xv = ld(xa + j, m);
    const V tv = ta ? ld(ta + j, m) : V(c.t_s);
    const V ls = log_sigmoid_v(xv, zero);
    V l;
    if (c.has_pw) {
      const V pwv = c.pw ? ld(c.pw + i0 + j, m) : V(c.pw_s);
      l = (one - tv) * xv - ((pwv - one) * tv + one) * ls;
    } else {
      l = (one - tv) * xv - ls;
    }
    if (c.w) l = l * ld(c.w + i0 + j, m);
    else if (c.w_s != acc_t(1)) l = l * V(c.w_s);
    l.store(out + j, m);
  }
}

template <typename scalar_t>
at::Tensor forward_impl(const bce::Operands& o, double ts, int64_t reduction) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  const int64_t N = o.x.numel();
  Ctx<acc_t> c;
  fill_ctx(c, o, ts);
  const scalar_t* x = o.x.data_ptr<scalar_t>();
  const scalar_t* t = o.t.defined() ? o.t.data_ptr<scalar_t>() : nullptr;
  const int64_t nchunks = (N + bce::kChunk - 1) / bce::kChunk;

  if (reduction == bce::kNone) {
    at::Tensor out = new_empty(o.x.sizes(), o.x.options());
    scalar_t* y = out.data_ptr<scalar_t>();
    auto body = [&](int64_t c0, int64_t c1) {
      acc_t lb[kTile];
      for (int64_t i = c0 * bce::kChunk, end = std::min(N, c1 * bce::kChunk); i < end; i += kTile) {
        const int64_t n = std::min(kTile, end - i);
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          tile_loss<scalar_t, acc_t>(x, t, c, i, n, y + i);
        } else {
          tile_loss<scalar_t, acc_t>(x, t, c, i, n, lb);
          for (int64_t j = 0; j < n; ++j) y[i + j] = static_cast<scalar_t>(lb[j]);
        }
      }
    };
    if (N < kParallelMin) body(0, nchunks);
    else at::parallel_for(0, nchunks, 1, body);
    return out;
  }

  c10::SmallVector<double, 16> partial(nchunks);
  auto body = [&](int64_t c0, int64_t c1) {
    acc_t lb[kTile];
    for (int64_t k = c0; k < c1; ++k) {
      V acc(0);
      for (int64_t i = k * bce::kChunk, end = std::min(N, (k + 1) * bce::kChunk); i < end; i += kTile) {
        const int64_t n = std::min(kTile, end - i);
        tile_loss<scalar_t, acc_t>(x, t, c, i, n, lb);
        for (int64_t j = 0; j < n; j += V::size()) acc = acc + ld(lb + j, std::min<int64_t>(V::size(), n - j));
      }
      acc_t lanes[V::size()];
      acc.store(lanes);
      double s = 0;
      for (int64_t l = 0; l < V::size(); ++l) s += static_cast<double>(lanes[l]);
      partial[k] = s;
    }
  };
  if (N < kParallelMin) body(0, nchunks);
  else at::parallel_for(0, nchunks, 1, body);
  double s = 0;
  for (int64_t k = 0; k < nchunks; ++k) s += partial[k];
  if (reduction == bce::kMean) s = N ? s / static_cast<double>(N) : std::numeric_limits<double>::quiet_NaN();
  at::Tensor out = new_empty({}, o.x.options());
  out.data_ptr<scalar_t>()[0] = static_cast<scalar_t>(s);
  return out;
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> backward_impl(const at::Tensor& grad_out, const bce::Operands& o, double ts,
                                                 int64_t reduction, bool need_t) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  const int64_t N = o.x.numel();
  Ctx<acc_t> c;
  fill_ctx(c, o, ts);
  const scalar_t* x = o.x.data_ptr<scalar_t>();
  const scalar_t* t = o.t.defined() ? o.t.data_ptr<scalar_t>() : nullptr;
  at::Tensor go;  // reduction none: the incoming gradient, contiguous
  acc_t g_s = 0;  // mean / sum: the incoming scalar gradient (divided by N for mean)
  if (reduction == bce::kNone) {
    go = grad_out.expand(o.x.sizes()).contiguous();
  } else {
    g_s = grad_out.item<acc_t>();
    if (reduction == bce::kMean) g_s = static_cast<acc_t>(static_cast<double>(g_s) / static_cast<double>(N));
  }
  const scalar_t* gp = go.defined() ? go.data_ptr<scalar_t>() : nullptr;
  at::Tensor gx = new_empty(o.x.sizes(), o.x.options());
  at::Tensor gt = need_t ? new_empty(o.x.sizes(), o.x.options()) : at::empty({0}, o.x.options());
  scalar_t* gxp = gx.data_ptr<scalar_t>();
  scalar_t* gtp = need_t ? gt.data_ptr<scalar_t>() : nullptr;
  const int64_t nchunks = (N + bce::kChunk - 1) / bce::kChunk;

  auto body = [&](int64_t c0, int64_t c1) {
    acc_t xb[kTile], tb[kTile], gb[kTile], ob[kTile], ob2[kTile];
    const V one(1), zero(0);
    for (int64_t i = c0 * bce::kChunk, end = std::min(N, c1 * bce::kChunk); i < end; i += kTile) {
      const int64_t n = std::min(kTile, end - i);
      const acc_t* xa = widen<scalar_t, acc_t>(x + i, n, xb);
      const acc_t* ta = t ? widen<scalar_t, acc_t>(t + i, n, tb) : nullptr;
      const acc_t* ga = gp ? widen<scalar_t, acc_t>(gp + i, n, gb) : nullptr;
      acc_t* oa = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(gxp + i) : ob;
      acc_t* oa2 = (std::is_same_v<scalar_t, acc_t> && need_t) ? reinterpret_cast<acc_t*>(gtp + i) : ob2;
      for (int64_t j = 0; j < n; j += V::size()) {
        const int64_t m = std::min<int64_t>(V::size(), n - j);
        const V xv = ld(xa + j, m);
        const V tv = ta ? ld(ta + j, m) : V(c.t_s);
        V scale = ga ? ld(ga + j, m) : V(g_s);
        if (c.w) scale = scale * ld(c.w + i + j, m);
        else if (c.w_s != acc_t(1)) scale = scale * V(c.w_s);
        const V e = xv.neg().exp();
        const V s = one / (one + e);  // sigmoid(x); 0 at -inf, NaN at NaN
        V d;
        V pwv;
        if (c.has_pw) {
          pwv = c.pw ? ld(c.pw + i + j, m) : V(c.pw_s);
          const V pt = pwv * tv;
          d = (pt + one - tv) * s - pt;
        } else {
          d = s - tv;
        }
        (d * scale).store(oa + j, m);
        if (need_t) {
          V dt;
          if (c.has_pw) dt = log_sigmoid_v(xv.neg(), zero) - pwv * log_sigmoid_v(xv, zero);
          else dt = xv.neg();
          (dt * scale).store(oa2 + j, m);
        }
      }
      if constexpr (!std::is_same_v<scalar_t, acc_t>) {
        for (int64_t j = 0; j < n; ++j) gxp[i + j] = static_cast<scalar_t>(ob[j]);
        if (need_t)
          for (int64_t j = 0; j < n; ++j) gtp[i + j] = static_cast<scalar_t>(ob2[j]);
      }
    }
  };
  if (N < kParallelMin) body(0, nchunks);
  else at::parallel_for(0, nchunks, 1, body);
  return {gx, gt};
}

at::Tensor bce_fwd_cpu(const at::Tensor& input, const std::optional<at::Tensor>& target, double target_scalar,
                       const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                       int64_t reduction) {
  bce::check_args(input, target, target_scalar, weight, pos_weight, reduction);
  const bce::Operands o = bce::prepare(input, target, weight, pos_weight);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bce_with_logits_fwd",
                                         [&] { return forward_impl<scalar_t>(o, target_scalar, reduction); });
}

std::tuple<at::Tensor, at::Tensor> bce_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                               const std::optional<at::Tensor>& target, double target_scalar,
                                               const std::optional<at::Tensor>& weight,
                                               const std::optional<at::Tensor>& pos_weight, int64_t reduction,
                                               bool need_target) {
  bce::check_bwd_args(grad_out, input, target, target_scalar, weight, pos_weight, reduction, need_target);
  const bce::Operands o = bce::prepare(input, target, weight, pos_weight);
  const at::Tensor g = grad_out.scalar_type() == input.scalar_type() ? grad_out : grad_out.to(input.scalar_type());
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bce_with_logits_bwd",
                                         [&] { return backward_impl<scalar_t>(g, o, target_scalar, reduction,
                                                                              need_target); });
}

}  // namespace
}  // namespace gankern

TORCH_LIBRARY_IMPL(gankern, CPU, m) {
  m.impl("_bce_with_logits_fwd", &gankern::bce_fwd_cpu);
  m.impl("_bce_with_logits_bwd", &gankern::bce_bwd_cpu);
}
