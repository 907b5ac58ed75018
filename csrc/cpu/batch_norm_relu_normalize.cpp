// BatchNorm + ReLU CPU kernels: y = act(x * scale + shift) and the forward (training: with the
// statistics of batch_norm_relu_stats.cpp; evaluation: from the running statistics).
#include <torch/library.h>
#include "batch_norm_relu_cpu.h"

namespace gankern {
namespace bnr_cpu {
namespace {

// ------------------------------------------------------------------ y = relu(x * scale + shift)
// Rows [rb, re) x columns [c0, c1) of the rows layout.  Plain value parameters: nothing the stores
// could alias.
template <typename T, bool LEAKY>
void normalize_block(const T* __restrict x, T* __restrict y, int64_t C, int64_t rb, int64_t re, int64_t c0,
                     int64_t c1, const typename VecIO<T>::acc_t* __restrict scale,
                     const typename VecIO<T>::acc_t* __restrict shift, bool cached, typename VecIO<T>::acc_t slope) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  const V sl(slope);
  constexpr int64_t W = IO::W;
  constexpr int KN = kVecRegs >= 32 ? 4 : 2;
  const int64_t R = ew_rows(C, sizeof(T), cached);
  for (int64_t r0 = rb; r0 < re; r0 += R) {
    const int64_t nr = std::min(re, r0 + R) - r0;
    for_chunks<KN>(c0, c1, W, [&](auto KC, auto TC, int64_t c, int64_t nl) {
      constexpr int K = decltype(KC)::value;
      constexpr bool TAIL = decltype(TC)::value;
      V sc[K], sf[K];
      for (int k = 0; k < K; ++k) {
        sc[k] = IO::template ldp<TAIL>(scale + c + k * W, nl);
        sf[k] = IO::template ldp<TAIL>(shift + c + k * W, nl);
      }
      const T* px = x + r0 * C + c;
      T* py = y + r0 * C + c;
      for (int64_t r = 0; r < nr; ++r, px += C, py += C)
        for (int k = 0; k < K; ++k)
          IO::template st<TAIL>(
              py + k * W, act_v<LEAKY>(fma_v(IO::template ld<TAIL>(px + k * W, nl), sc[k], sf[k]), sl), nl);
    });
  }
}

// Segments [i0, i1) of the planar layout (segment i = (n, c) with c = i % C).
template <typename T, bool LEAKY>
void normalize_planar(const T* __restrict x, T* __restrict y, int64_t C, int64_t S, int64_t i0, int64_t i1,
                      const typename VecIO<T>::acc_t* __restrict scale,
                      const typename VecIO<T>::acc_t* __restrict shift, typename VecIO<T>::acc_t slope) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  const V sl(slope);
  constexpr int64_t W = IO::W;
  int64_t c = i0 % C;
  for (int64_t i = i0; i < i1; ++i) {
    const V sc(scale[c]), sf(shift[c]);
    const T* px = x + i * S;
    T* py = y + i * S;
    int64_t s = 0;
    for (; s + W <= S; s += W) IO::store(py + s, act_v<LEAKY>(fma_v(IO::load(px + s), sc, sf), sl));
    if (s < S) IO::store(py + s, act_v<LEAKY>(fma_v(IO::load(px + s, S - s), sc, sf), sl), S - s);
    if (++c == C) c = 0;
  }
}

// ------------------------------------------------------------------ forward
// Non-finite data (Inf/NaN): the mean is the plain sum / count and the variance NaN, as torch
// computes them (e.g. a channel holding +Inf has mean +Inf, not the NaN of the Chan update).
// var = the biased variance.
inline void finite_rule(double* __restrict mean, double* __restrict m2, const double* __restrict sum,
                        double* __restrict var, int64_t n, double inv_M) {
  for (int64_t j = 0; j < n; ++j) {
    const bool fin = std::isfinite(sum[j]);
    mean[j] = fin ? mean[j] : sum[j] * inv_M;
    m2[j] = fin ? m2[j] : std::numeric_limits<double>::quiet_NaN();
    var[j] = m2[j] * inv_M;
  }
}

template <typename acc_t>
inline void fold_range(const double* __restrict dmean, const double* __restrict dinv, const acc_t* __restrict w,
                       const acc_t* __restrict b, acc_t* __restrict mean, acc_t* __restrict invstd,
                       acc_t* __restrict scale, acc_t* __restrict shift, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    mean[j] = static_cast<acc_t>(dmean[j]);
    invstd[j] = static_cast<acc_t>(dinv[j]);
    bnr::fold(mean[j], invstd[j], w[j], b[j], scale[j], shift[j]);
  }
}

// running <- (1 - momentum) * running + momentum * stat * factor
inline void running_range(double* __restrict running, const double* __restrict stat, double factor, double momentum,
                          int64_t n) {
  for (int64_t j = 0; j < n; ++j) running[j] = bnr::running_update(running[j], stat[j] * factor, momentum);
}

template <typename T, bool LEAKY>
void fwd_impl(const at::Tensor& xt, at::Tensor& yt, const Shape& sh, const std::optional<at::Tensor>& running_mean,
              const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& weight,
              const std::optional<at::Tensor>& bias, bool training, double momentum, double eps,
              at::Tensor& save_mean, at::Tensor& save_invstd, double negative_slope) {
  using acc_t = at::opmath_type<T>;
  const acc_t slope = static_cast<acc_t>(negative_slope);
  const int64_t C = sh.C, M = sh.M(), S = sh.S;
  const T* x = xt.const_data_ptr<T>();
  T* y = yt.mutable_data_ptr<T>();
  const bool rows = sh.layout == Layout::Rows;
  const RowsPlan P(M, C, int64_t(sizeof(T)), 1, kMinGroupRowsFwd);
  const int64_t ng = rows && training ? P.ngroups : 1;
  // workspace: doubles pmean, pm2, psum (ng * C each), dvar; then acc_t w, b, scale, shift, kshift
  std::unique_ptr<double[]> ws(new double[(3 * ng + 1) * C + 5 * C]);
  double* pmean = ws.get();
  double* pm2 = pmean + ng * C;
  double* psum = pm2 + ng * C;
  double* dvar = psum + ng * C;
  acc_t* w = reinterpret_cast<acc_t*>(dvar + C);
  acc_t* b = w + C;
  acc_t* scale = b + C;
  acc_t* shift = scale + C;
  acc_t* kshift = shift + C;  // the statistics' per-channel shifts (row groups)
  acc_t* mean = save_mean.mutable_data_ptr<acc_t>();
  acc_t* invstd = save_invstd.mutable_data_ptr<acc_t>();
  read_param<acc_t>(weight, 0, C, acc_t(1), w);
  read_param<acc_t>(bias, 0, C, acc_t(0), b);
  const bool update = training && has_tensor(running_mean);
  const double Md = double(M);
  // Channels [c0, c1): from (pmean, pm2, psum) -- or the running stats in evaluation -- to
  // save_mean / save_invstd, the running-stat update and the folded scale / shift.
  const double inv_M = 1.0 / Md, inv_M1 = 1.0 / (Md - 1.0);
  auto finish = [&](int64_t c0, int64_t c1) {
    const int64_t n = c1 - c0;
    if (training) {
      finite_rule(pmean + c0, pm2 + c0, psum + c0, dvar + c0, n, inv_M);
    } else {
      read_param<double>(running_mean, c0, c1, 0.0, pmean);
      read_param<double>(running_var, c0, c1, 1.0, dvar);
    }
    invstd_from_var(dvar + c0, eps, dvar + c0, n);
    fold_range<acc_t>(pmean + c0, dvar + c0, w + c0, b + c0, mean + c0, invstd + c0, scale + c0, shift + c0, n);
    if (update) {
      // running_mean <- (1 - momentum) * running_mean + momentum * mean (in double), same for the
      // unbiased variance; dvar / psum are free now
      read_param<double>(running_mean, c0, c1, 0.0, dvar);
      running_range(dvar + c0, pmean + c0, 1.0, momentum, n);
      write_param(*running_mean, c0, c1, dvar);
      read_param<double>(running_var, c0, c1, 1.0, psum);
      running_range(psum + c0, pm2 + c0, inv_M1, momentum, n);
      write_param(*running_var, c0, c1, psum);
    }
  };
  if (training && M == 0) {
    // No data (as torch): the running statistics stay as they are, the output is empty; saved
    // mean 0 and inverse std 0 (the backward then gives zero weight / bias gradients).
    std::fill(mean, mean + C, acc_t(0));
    std::fill(invstd, invstd + C, acc_t(0));
    return;
  }
  if (!training) {
    finish(0, C);
    if (M == 0) return;
    if (rows) run_rows(M, C, [=](int64_t r0, int64_t r1) { normalize_block<T, LEAKY>(x, y, C, r0, r1, 0, C, scale, shift, false, slope); });
    else run_rows(sh.N * C, S, [=](int64_t i0, int64_t i1) { normalize_planar<T, LEAKY>(x, y, C, S, i0, i1, scale, shift, slope); });
    return;
  }
  if (!rows) {
    stats_planar<T>(x, sh.N, C, S, pmean, pm2, psum);
    finish(0, C);
    run_rows(sh.N * C, S, [=](int64_t i0, int64_t i1) { normalize_planar<T, LEAKY>(x, y, C, S, i0, i1, scale, shift, slope); });
    return;
  }
  if (P.fused) {
    run_tasks(P.ntasks(), M * C, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c0 = P.c0(t), c1 = P.c1(t);
        stats_rows_task<T>(x, C, 0, M, c0, c1, pmean, pm2, psum, nullptr);
        finish(c0, c1);
        normalize_block<T, LEAKY>(x, y, C, 0, M, c0, c1, scale, shift, true, slope);
      }
    });
  } else {
    // one shift per channel for all row groups (the mean of the first rows): a group then reads
    // only its own rows
    for (int64_t t = 0; t < P.ncb; ++t) shift_from_rows<T>(x, C, 0, M, P.c0(t), P.c1(t), kshift + P.c0(t));
    run_tasks(P.ntasks(), M * C, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t g = P.group(t);
        stats_rows_task<T>(x, C, P.r0(t), P.r1(t), P.c0(t), P.c1(t), pmean + g * C, pm2 + g * C, psum + g * C,
                           kshift);
      }
    });
    merge_groups(P, pmean, pm2, psum);
    finish(0, C);
    run_tasks(P.ntasks(), M * C, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) normalize_block<T, LEAKY>(x, y, C, P.r0(t), P.r1(t), P.c0(t), P.c1(t), scale, shift, false, slope);
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bnr_fwd_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, bool training, double momentum, double eps, double negative_slope) {
  bnr_check_args(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope);
  TORCH_INTERNAL_ASSERT(input.device().is_cpu(), "batch_norm_relu (cpu kernel): got input on ", input.device());  // the dispatcher's choice
  Shape sh;
  at::Tensor x = prepare(input, sh);
  at::Tensor y = new_empty_like(x);
  const auto acc_dt = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor save_mean = new_empty({sh.C}, x.options().dtype(acc_dt));
  at::Tensor save_invstd = new_empty({sh.C}, x.options().dtype(acc_dt));
  if (sh.C == 0) return {y, save_mean, save_invstd};  // no channels: nothing to compute (no division by C)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_relu_fwd_cpu", [&] {
    with_bool(negative_slope != 0.0, [&](auto L) {
      fwd_impl<scalar_t, decltype(L)::value>(x, y, sh, running_mean, running_var, weight, bias, training, momentum,
                                             eps, save_mean, save_invstd, negative_slope);
    });
  });
  return {y, save_mean, save_invstd};
}

}  // namespace
}  // namespace bnr_cpu
}  // namespace gankern

TORCH_LIBRARY_IMPL(gankern, CPU, m) { m.impl("_batch_norm_relu_fwd", &gankern::bnr_cpu::bnr_fwd_cpu); }
