// BatchNorm + ReLU CPU kernels: the backward (per-channel sums, then dx).
#include <torch/library.h>
#include "batch_norm_relu_cpu.h"

namespace gankern {
namespace bnr_cpu {
namespace {

// ------------------------------------------------------------------ backward
// Per-channel sums of g and g * (x - mean), with g = dy where the ReLU is open (the mask
// recomputed from x with the forward's fma); then dx = k1 * g + k3 * (x - mean) * invstd + k2.
// Rows layout: the same partition scheme as the forward (fused per column block when possible).

// Sums over rows [r_begin, r_end) x columns [c0, c1), outputs indexed by channel: sweeps of
// kSweepRows rows over the block (each row read sequentially), float partial sums kept in L1
// between sweeps, added in double once per tile.
template <typename T, bool LEAKY>
void bwd_sums_task(const T* __restrict dy, const T* __restrict x, int64_t C, int64_t r_begin, int64_t r_end,
                   int64_t c0, int64_t c1, const typename VecIO<T>::acc_t* __restrict mean,
                   const typename VecIO<T>::acc_t* __restrict scale, const typename VecIO<T>::acc_t* __restrict shift,
                   double* __restrict p1, double* __restrict p2, typename VecIO<T>::acc_t slope) {
  using IO = VecIO<T>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  const V sl(slope);
  constexpr int64_t W = IO::W;
  constexpr int KB = kVecRegs >= 32 ? 2 : 1;
  const int64_t nc = c1 - c0;
  alignas(64) acc_t f1[kMaxWidth], f2[kMaxWidth];
  for (int64_t t0 = r_begin; t0 < r_end; t0 += kTileRows) {
    const int64_t t1 = std::min(r_end, t0 + kTileRows);
    for (int64_t rr = t0; rr < t1; rr += kSweepRows) {
      const int64_t nr = std::min(t1, rr + kSweepRows) - rr;
      const bool init = rr == t0;
      for_chunks<KB>(c0, c1, W, [&](auto KC, auto TC, int64_t c, int64_t nl) {
        constexpr int K = decltype(KC)::value;
        constexpr bool TAIL = decltype(TC)::value;
        const int64_t j = c - c0;
        V mv[K], sc[K], sf[K], s1[K], s2[K];
        for (int k = 0; k < K; ++k) {
          mv[k] = IO::template ldp<TAIL>(mean + c + k * W, nl);
          sc[k] = IO::template ldp<TAIL>(scale + c + k * W, nl);
          sf[k] = IO::template ldp<TAIL>(shift + c + k * W, nl);
          s1[k] = init ? V(0) : V::loadu(f1 + j + k * W);
          s2[k] = init ? V(0) : V::loadu(f2 + j + k * W);
        }
        const T* px = x + rr * C + c;
        const T* pg = dy + rr * C + c;
        for (int64_t r = 0; r < nr; ++r, px += C, pg += C) {
          for (int k = 0; k < K; ++k) {
            const V xv = IO::template ld<TAIL>(px + k * W, nl);
            const V g = act_grad_v<LEAKY>(fma_v(xv, sc[k], sf[k]), IO::template ld<TAIL>(pg + k * W, nl), sl);
            s1[k] = s1[k] + g;
            s2[k] = fma_v(g, xv - mv[k], s2[k]);
          }
        }
        for (int k = 0; k < K; ++k) {
          s1[k].store(f1 + j + k * W);
          s2[k].store(f2 + j + k * W);
        }
      });
    }
    double* __restrict q1 = p1 + c0;
    double* __restrict q2 = p2 + c0;
    if (t0 == r_begin) {
      for (int64_t j = 0; j < nc; ++j) {
        q1[j] = double(f1[j]);
        q2[j] = double(f2[j]);
      }
    } else {
      for (int64_t j = 0; j < nc; ++j) {
        q1[j] += double(f1[j]);
        q2[j] += double(f2[j]);
      }
    }
  }
}

// Planar layout: a task is (channel, group of n).
template <typename T, bool LEAKY>
void bwd_sums_planar(const T* dy, const T* x, int64_t N, int64_t C, int64_t S, const typename VecIO<T>::acc_t* mean,
                     const typename VecIO<T>::acc_t* scale, const typename VecIO<T>::acc_t* shift, double* sg,
                     double* sgd, typename VecIO<T>::acc_t slope) {
  using IO = VecIO<T>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  const V sl(slope);
  constexpr int64_t W = IO::W;
  const int64_t g = std::max<int64_t>(1, std::min<int64_t>(N, 2048 / S));
  const int64_t ntiles = (N + g - 1) / g;
  const int64_t nng = std::min<int64_t>(ntiles, std::max<int64_t>(1, 32 / C));
  const int64_t tiles_per_task = (ntiles + nng - 1) / nng;
  std::unique_ptr<double[]> ws(new double[2 * nng * C]);
  double* p1 = ws.get();
  double* p2 = p1 + nng * C;
  run_tasks(nng * C, N * C * S, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t / nng, ng = t % nng;
      const int64_t n_begin = std::min(N, ng * tiles_per_task * g), n_end = std::min(N, n_begin + tiles_per_task * g);
      const acc_t mc = mean[c], scc = scale[c], sfc = shift[c];
      const V mv(mc), sc(scc), sf(sfc);
      double d1 = 0, d2 = 0;
      for (int64_t n0 = n_begin; n0 < n_end; n0 += g) {
        const int64_t n1 = std::min(n_end, n0 + g);
        V s1(0), s2(0);
        for (int64_t n = n0; n < n1; ++n) {
          const T* px = x + (n * C + c) * S;
          const T* pg = dy + (n * C + c) * S;
          int64_t s = 0;
          for (; s + W <= S; s += W) {
            const V xv = IO::load(px + s);
            const V gv = act_grad_v<LEAKY>(fma_v(xv, sc, sf), IO::load(pg + s), sl);
            s1 = s1 + gv;
            s2 = fma_v(gv, xv - mv, s2);
          }
          if (s < S) {  // missing lanes load as 0: dy = 0 there, so g = 0
            const V xv = IO::load(px + s, S - s);
            const V gv = act_grad_v<LEAKY>(fma_v(xv, sc, sf), IO::load(pg + s, S - s), sl);
            s1 = s1 + gv;
            s2 = fma_v(gv, xv - mv, s2);
          }
        }
        d1 += double(at::vec::vec_reduce_all<acc_t>([](V a, V b) { return a + b; }, s1));
        d2 += double(at::vec::vec_reduce_all<acc_t>([](V a, V b) { return a + b; }, s2));
      }
      p1[ng * C + c] = d1;
      p2[ng * C + c] = d2;
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double a = 0, b = 0;
    for (int64_t ng = 0; ng < nng; ++ng) {
      a += p1[ng * C + c];
      b += p2[ng * C + c];
    }
    sg[c] = a;
    sgd[c] = b;
  }
}

// TRAIN: dx = g * k1 + ((x - mean) * invstd) * k3 + k2; evaluation: dx = g * k1 only (k2 = k3 = 0 there, and
// (x - mean) * 0 would turn an infinite x into a NaN gradient where torch's is finite).  (x - mean) * invstd
// is O(1) at any data scale, so k3 (see bwd_coef) stays representable where the textbook coefficient
// -w invstd^3 sgd / M does not (1e30-scale fp32 data: 1e-60).
template <bool LEAKY, bool TRAIN, typename V>
inline V dx_one(const V& xv, const V& gv, const V& mv, const V& iv, const V& sc, const V& sf, const V& a1,
                const V& a2, const V& a3, const V& sl) {
  const V g = act_grad_v<LEAKY>(fma_v(xv, sc, sf), gv, sl);
  if constexpr (TRAIN) return fma_v(g, a1, fma_v((xv - mv) * iv, a3, a2));
  else return g * a1;
}

template <typename T, bool LEAKY, bool TRAIN>
void dx_block(const T* __restrict dy, const T* __restrict x, T* __restrict dx, int64_t C, int64_t rb, int64_t re,
              int64_t c0, int64_t c1, const typename VecIO<T>::acc_t* __restrict mean,
              const typename VecIO<T>::acc_t* __restrict invstd, const typename VecIO<T>::acc_t* __restrict scale, const typename VecIO<T>::acc_t* __restrict shift,
              const typename VecIO<T>::acc_t* __restrict k1, const typename VecIO<T>::acc_t* __restrict k2,
              const typename VecIO<T>::acc_t* __restrict k3, bool cached, typename VecIO<T>::acc_t slope) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  const V sl(slope);
  constexpr int64_t W = IO::W;
  constexpr int KD = kVecRegs >= 32 ? 2 : 1;
  const int64_t R = ew_rows(C, sizeof(T), cached);
  for (int64_t r0 = rb; r0 < re; r0 += R) {
    const int64_t nr = std::min(re, r0 + R) - r0;
    for_chunks<KD>(c0, c1, W, [&](auto KC, auto TC, int64_t c, int64_t nl) {
      constexpr int K = decltype(KC)::value;
      constexpr bool TAIL = decltype(TC)::value;
      V mv[K], iv[K], sc[K], sf[K], a1[K], a2[K], a3[K];
      for (int k = 0; k < K; ++k) {
        mv[k] = IO::template ldp<TAIL>(mean + c + k * W, nl);
        iv[k] = IO::template ldp<TAIL>(invstd + c + k * W, nl);
        sc[k] = IO::template ldp<TAIL>(scale + c + k * W, nl);
        sf[k] = IO::template ldp<TAIL>(shift + c + k * W, nl);
        a1[k] = IO::template ldp<TAIL>(k1 + c + k * W, nl);
        a2[k] = IO::template ldp<TAIL>(k2 + c + k * W, nl);
        a3[k] = IO::template ldp<TAIL>(k3 + c + k * W, nl);
      }
      const T* px = x + r0 * C + c;
      const T* pg = dy + r0 * C + c;
      T* pd = dx + r0 * C + c;
      for (int64_t r = 0; r < nr; ++r, px += C, pg += C, pd += C)
        for (int k = 0; k < K; ++k)
          IO::template st<TAIL>(pd + k * W,
                                dx_one<LEAKY, TRAIN>(IO::template ld<TAIL>(px + k * W, nl),
                                                     IO::template ld<TAIL>(pg + k * W, nl), mv[k], iv[k], sc[k], sf[k],
                                                     a1[k], a2[k], a3[k], sl),
                                nl);
    });
  }
}

template <typename T, bool LEAKY, bool TRAIN>
void dx_planar(const T* __restrict dy, const T* __restrict x, T* __restrict dx, int64_t C, int64_t S, int64_t i0,
               int64_t i1, const typename VecIO<T>::acc_t* __restrict mean,
               const typename VecIO<T>::acc_t* __restrict invstd, const typename VecIO<T>::acc_t* __restrict scale, const typename VecIO<T>::acc_t* __restrict shift,
               const typename VecIO<T>::acc_t* __restrict k1, const typename VecIO<T>::acc_t* __restrict k2,
               const typename VecIO<T>::acc_t* __restrict k3, typename VecIO<T>::acc_t slope) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  const V sl(slope);
  constexpr int64_t W = IO::W;
  int64_t c = i0 % C;
  for (int64_t i = i0; i < i1; ++i, c = c + 1 == C ? 0 : c + 1) {
    const V mv(mean[c]), iv(invstd[c]), sc(scale[c]), sf(shift[c]), a1(k1[c]), a2(k2[c]), a3(k3[c]);
    const T* px = x + i * S;
    const T* pg = dy + i * S;
    T* pd = dx + i * S;
    int64_t s = 0;
    for (; s + W <= S; s += W)
      IO::store(pd + s, dx_one<LEAKY, TRAIN>(IO::load(px + s), IO::load(pg + s), mv, iv, sc, sf, a1, a2, a3, sl));
    if (s < S)
      IO::store(pd + s,
                dx_one<LEAKY, TRAIN>(IO::load(px + s, S - s), IO::load(pg + s, S - s), mv, iv, sc, sf, a1, a2, a3, sl),
                S - s);
  }
}

// dw = sgd * invstd; dx = k1 * g + k3 * (x - mean) * invstd + k2 with k1 = w * invstd and, in training,
// k2 = -k1 * sg / M, k3 = -k1 * invstd * sgd / M (sg = sum(g), sgd = sum(g * (x - mean))); in double, then
// rounded (each is within range where invstd^2 alone is not).
template <typename acc_t>
inline void bwd_coef(const double* __restrict sg, const double* __restrict sgd, const acc_t* __restrict invstd,
                     const acc_t* __restrict w, double* __restrict dw, acc_t* __restrict k1, acc_t* __restrict k2,
                     acc_t* __restrict k3, int64_t n, bool training, double inv_M) {
  for (int64_t j = 0; j < n; ++j) {
    const double is = double(invstd[j]);
    dw[j] = sgd[j] * is;
    const double a = double(w[j]) * is;
    k1[j] = static_cast<acc_t>(a);
    k2[j] = training ? static_cast<acc_t>(-a * sg[j] * inv_M) : acc_t(0);
    k3[j] = training ? static_cast<acc_t>(-a * is * sgd[j] * inv_M) : acc_t(0);
  }
}

template <typename T, bool LEAKY, bool TRAIN>
void bwd_impl(const at::Tensor& dyt, const at::Tensor& xt, at::Tensor& dxt, const Shape& sh,
              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
              const at::Tensor& save_mean, const at::Tensor& save_invstd, at::Tensor& gw, at::Tensor& gb,
              double negative_slope) {
  using acc_t = at::opmath_type<T>;
  constexpr bool training = TRAIN;
  const acc_t slope = static_cast<acc_t>(negative_slope);
  const int64_t C = sh.C, M = sh.M(), S = sh.S;
  const T* x = xt.const_data_ptr<T>();
  const T* dy = dyt.const_data_ptr<T>();
  T* dx = M > 0 ? dxt.mutable_data_ptr<T>() : nullptr;
  const bool rows = sh.layout == Layout::Rows;
  const RowsPlan P(M, C, int64_t(sizeof(T)), 2, kMinGroupRowsBwd);
  const int64_t ng = rows ? P.ngroups : 1;
  // workspace: doubles p1 (sum g), p2 (sum g (x - mean)) (ng * C each), dw; then acc_t mean,
  // invstd, w, b, scale, shift, k1, k2, k3
  std::unique_ptr<double[]> ws(new double[(2 * ng + 1) * C + 9 * C]);
  double* p1 = ws.get();
  double* p2 = p1 + ng * C;
  double* dw = p2 + ng * C;
  acc_t* mean = reinterpret_cast<acc_t*>(dw + C);
  acc_t* invstd = mean + C;
  acc_t* w = invstd + C;
  acc_t* b = w + C;
  acc_t* scale = b + C;
  acc_t* shift = scale + C;
  acc_t* k1 = shift + C;
  acc_t* k2 = k1 + C;
  acc_t* k3 = k2 + C;
  read_param<acc_t>(save_mean, 0, C, acc_t(0), mean);
  read_param<acc_t>(save_invstd, 0, C, acc_t(1), invstd);
  read_param<acc_t>(weight, 0, C, acc_t(1), w);
  read_param<acc_t>(bias, 0, C, acc_t(0), b);
  for (int64_t c = 0; c < C; ++c) bnr::fold(mean[c], invstd[c], w[c], b[c], scale[c], shift[c]);
  const double inv_M = 1.0 / double(M);
  // channels [c0, c1): dw = sum(g (x - mean)) * invstd (double; db = sum(g) is p1), dx coefficients
  auto coef = [&](int64_t c0, int64_t c1) {
    bwd_coef<acc_t>(p1 + c0, p2 + c0, invstd + c0, w + c0, dw + c0, k1 + c0, k2 + c0, k3 + c0, c1 - c0, training,
                    inv_M);
  };
  if (M == 0) {  // no data: zero gradients (as torch), whatever the saved statistics
    std::fill(p1, p1 + C, 0.0);
    std::fill(dw, dw + C, 0.0);
  } else if (!rows) {
    bwd_sums_planar<T, LEAKY>(dy, x, sh.N, C, S, mean, scale, shift, p1, p2, slope);
    coef(0, C);
    run_rows(sh.N * C, S, [=](int64_t i0, int64_t i1) {
      dx_planar<T, LEAKY, TRAIN>(dy, x, dx, C, S, i0, i1, mean, invstd, scale, shift, k1, k2, k3, slope);
    });
  } else if (P.fused) {
    run_tasks(P.ntasks(), M * C, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c0 = P.c0(t), c1 = P.c1(t);
        bwd_sums_task<T, LEAKY>(dy, x, C, 0, M, c0, c1, mean, scale, shift, p1, p2, slope);
        coef(c0, c1);
        dx_block<T, LEAKY, TRAIN>(dy, x, dx, C, 0, M, c0, c1, mean, invstd, scale, shift, k1, k2, k3, true, slope);
      }
    });
  } else {
    run_tasks(P.ntasks(), M * C, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t g = P.group(t);
        bwd_sums_task<T, LEAKY>(dy, x, C, P.r0(t), P.r1(t), P.c0(t), P.c1(t), mean, scale, shift, p1 + g * C,
                                p2 + g * C, slope);
      }
    });
    for (int64_t g = 1; g < P.ngroups; ++g) {  // fixed order
      const double* __restrict q1 = p1 + g * C;
      const double* __restrict q2 = p2 + g * C;
      for (int64_t c = 0; c < C; ++c) {
        p1[c] += q1[c];
        p2[c] += q2[c];
      }
    }
    coef(0, C);
    run_tasks(P.ntasks(), M * C, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        dx_block<T, LEAKY, TRAIN>(dy, x, dx, C, P.r0(t), P.r1(t), P.c0(t), P.c1(t), mean, invstd, scale, shift, k1, k2, k3,
                                  false, slope);
    });
  }
  write_param(gw, 0, C, dw);
  write_param(gb, 0, C, p1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bnr_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                                           const std::optional<at::Tensor>& weight,
                                                           const std::optional<at::Tensor>& bias,
                                                           const at::Tensor& save_mean,
                                                           const at::Tensor& save_invstd, bool training,
                                                           double negative_slope) {
  bnr_check_bwd_args(grad_out, input, save_mean, save_invstd, negative_slope);
  Shape sh;
  at::Tensor x = prepare(input, sh);
  const auto acc_dt = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dy = match_layout(grad_out, x);
  at::Tensor dx = new_empty_like(x);
  at::ScalarType pdt = acc_dt;
  if (has_tensor(weight)) pdt = weight->scalar_type();
  else if (has_tensor(bias)) pdt = bias->scalar_type();
  at::Tensor gw = new_empty({sh.C}, x.options().dtype(pdt));
  at::Tensor gb = new_empty({sh.C}, x.options().dtype(pdt));
  if (sh.C == 0) return {dx, gw, gb};  // no channels: nothing to compute
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_relu_bwd_cpu", [&] {
    with_bool(negative_slope != 0.0, [&](auto L) {
      with_bool(training, [&](auto TR) {
        bwd_impl<scalar_t, decltype(L)::value, decltype(TR)::value>(dy, x, dx, sh, weight, bias, save_mean,
                                                                    save_invstd, gw, gb, negative_slope);
      });
    });
  });
  return {dx, gw, gb};
}

}  // namespace
}  // namespace bnr_cpu
}  // namespace gankern

TORCH_LIBRARY_IMPL(gankern, CPU, m) { m.impl("_batch_norm_relu_bwd", &gankern::bnr_cpu::bnr_bwd_cpu); }
