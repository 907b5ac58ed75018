// CPU kernels of the fused BatchNorm + ReLU (see csrc/batch_norm_relu.cpp for the op).
//
// Two memory layouts, chosen from the input without copying when possible:
//   rows   : M rows of C contiguous channels -- (N, C) inputs and channels-last (N, H, W, C);
//            vectorized across channels.
//   planar : N x C x S, S > 1 contiguous values per (n, c) -- (N, C, L), (N, C, H, W);
//            vectorized along S.
// Any other strides are made contiguous first (as torch does, the output is then contiguous).
//
// Forward (training): statistics read x once from memory: each tile is reduced with an exact
// two-pass (tile mean, then squared deviations -- the second read hits L1/L2), tiles are merged
// with Chan's update in double, in a fixed order.  The work partition depends only on the
// shape, never on the thread count, so the result is bitwise reproducible.  Then one pass
// y = max(fma(x, scale, shift), 0).
// Backward: one pass for sum(g) and sum(g * (x - mean)) per channel (g = dy gated by the ReLU
// mask, recomputed from x with the forward's fma), one elementwise pass for dx.
// ATen's Vectorized<T> uses AVX2 only when CPU_CAPABILITY_AVX2 is defined (torch's own build
// sets it per dispatch variant); otherwise it silently falls back to a slow generic version.
// The extension is compiled with -march=native: turn the AVX2 variant on when the compiler
// targets AVX2 + FMA.  (inline namespace at::vec::AVX2, so no clash with other translation units.)
#if defined(__AVX2__) && defined(__FMA__) && !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <torch/library.h>
#include <algorithm>
#include <vector>
#include "gankern/common.h"
#include "gankern/batch_norm_relu.h"

namespace gankern {

void bnr_check_args(const at::Tensor& input, const std::optional<at::Tensor>& running_mean,
                    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& bias, bool training, double momentum, double eps);

namespace {

using at::vec::Vectorized;

// ---- loads / stores in the accumulation type (float for fp32/fp16/bf16, double for fp64) ----
template <typename T>
struct VecIO {
  using acc_t = at::opmath_type<T>;
  using V = Vectorized<acc_t>;
  static constexpr int64_t W = V::size();
  static V load(const T* p) {
    if constexpr (std::is_same_v<T, acc_t>) {
      return V::loadu(p);
    } else {
      V out;
      at::vec::load_to_float<T>(p, out);
      return out;
    }
  }
  static V load(const T* p, int64_t n) {
    if constexpr (std::is_same_v<T, acc_t>) {
      return V::loadu(p, n);
    } else {
      T tmp[W];
      for (int64_t i = 0; i < W; ++i) tmp[i] = i < n ? p[i] : T(0);
      return load(tmp);
    }
  }
  static void store(T* p, const V& v) {
    if constexpr (std::is_same_v<T, acc_t>) {
      v.store(p);
    } else {
      at::vec::convert_from_float<T>(v, v).store(p, W);
    }
  }
  static void store(T* p, const V& v, int64_t n) {
    if constexpr (std::is_same_v<T, acc_t>) {
      v.store(p, n);
    } else {
      at::vec::convert_from_float<T>(v, v).store(p, n);
    }
  }
};

enum class Layout { Rows, Planar };

struct Shape {
  Layout layout;
  int64_t N, C, S;  // rows: M = N * S rows of C; planar: N x C x S
  int64_t M() const { return N * S; }
};

bool is_channels_last(const at::Tensor& x) {
  if (x.dim() == 4) return x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (x.dim() == 5) return x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return false;
}

// Returns x in a supported layout (a copy only for unusual strides) and its shape.
at::Tensor prepare(const at::Tensor& x_in, Shape& sh) {
  at::Tensor x = x_in;
  sh.N = x.size(0);
  sh.C = x.size(1);
  sh.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) sh.S *= x.size(d);
  if (x.is_contiguous()) {
    sh.layout = sh.S == 1 ? Layout::Rows : Layout::Planar;
  } else if (is_channels_last(x)) {
    sh.layout = Layout::Rows;
  } else {
    x = x.contiguous();
    sh.layout = sh.S == 1 ? Layout::Rows : Layout::Planar;
  }
  return x;
}

// dy in the same memory layout as the prepared x.
at::Tensor match_layout(const at::Tensor& dy, const at::Tensor& x) {
  if (x.is_contiguous()) return dy.contiguous();
  if (x.dim() == 4) return dy.contiguous(at::MemoryFormat::ChannelsLast);
  return dy.contiguous(at::MemoryFormat::ChannelsLast3d);
}

// A 1-D tensor of any floating dtype and stride read as acc_t (default when undefined).
template <typename acc_t>
void read_param(const std::optional<at::Tensor>& t, int64_t C, acc_t dflt, std::vector<acc_t>& out) {
  out.assign(C, dflt);
  if (!t.has_value() || !t->defined()) return;
  const int64_t st = t->stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t->scalar_type(), "bnr_read_param", [&] {
    const scalar_t* p = t->data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<acc_t>(p[c * st]);
  });
}

template <typename src_t>
void write_param(at::Tensor& t, const std::vector<src_t>& v) {
  const int64_t st = t.stride(0);
  const int64_t C = t.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "bnr_write_param", [&] {
    scalar_t* p = t.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) p[c * st] = static_cast<scalar_t>(v[c]);
  });
}

constexpr int64_t kGrainElems = 32768;  // below this much work per thread, stay single-threaded

// ------------------------------------------------------------------ statistics (training)
// Partition (a function of the shape only):
//   rows:   column blocks of kColBlock channels x row tasks (groups of kTileRows-row tiles)
//   planar: channels x n-groups (groups of tiles of whole (n, c) segments)
constexpr int64_t kColBlock = 256;
constexpr int64_t kTileRows = 32;
constexpr int64_t kMaxRowTasks = 16;

// Non-finite data (Inf/NaN): the mean is the plain sum / count and the variance NaN, as torch
// computes them (e.g. a channel holding +Inf has mean +Inf, not the NaN the Chan update gives).
inline void finish_channel(double chan_mean, double chan_m2, double plain_sum, double count, double& mean,
                           double& m2) {
  if (std::isfinite(plain_sum)) {
    mean = chan_mean;
    m2 = chan_m2;
  } else {
    mean = plain_sum / count;
    m2 = std::numeric_limits<double>::quiet_NaN();
  }
}

template <typename T>
void stats_rows(const T* x, int64_t M, int64_t C, std::vector<double>& mean_out, std::vector<double>& m2_out) {
  using IO = VecIO<T>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  constexpr int64_t W = IO::W;
  const int64_t ntiles = (M + kTileRows - 1) / kTileRows;
  const int64_t nrt = std::min<int64_t>(ntiles, kMaxRowTasks);
  const int64_t tiles_per_task = (ntiles + nrt - 1) / nrt;
  const int64_t ncb = (C + kColBlock - 1) / kColBlock;
  std::vector<double> pn(nrt, 0.0), pmean(nrt * C, 0.0), pm2(nrt * C, 0.0), psum(nrt * C, 0.0);
  const int64_t task_elems = tiles_per_task * kTileRows * std::min(C, kColBlock);
  at::parallel_for(0, nrt * ncb, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, task_elems)),
                   [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> s(kColBlock), q(kColBlock), e(kColBlock);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t rt = t / ncb, cb = t % ncb;
      const int64_t c0 = cb * kColBlock, c1 = std::min(C, c0 + kColBlock), nc = c1 - c0;
      const int64_t r_begin = std::min(M, rt * tiles_per_task * kTileRows);
      const int64_t r_end = std::min(M, r_begin + tiles_per_task * kTileRows);
      double n_acc = 0;
      double* am = &pmean[rt * C + c0];
      double* a2 = &pm2[rt * C + c0];
      double* as = &psum[rt * C + c0];
      for (int64_t r0 = r_begin; r0 < r_end; r0 += kTileRows) {
        const int64_t r1 = std::min(r_end, r0 + kTileRows);
        const acc_t inv_cnt = acc_t(1) / acc_t(r1 - r0);
        // pass 1: tile sums
        int64_t c = 0;
        for (; c + W <= nc; c += W) {
          V acc = IO::load(x + r0 * C + c0 + c);
          for (int64_t r = r0 + 1; r < r1; ++r) acc = acc + IO::load(x + r * C + c0 + c);
          (acc * V(inv_cnt)).store(&s[c]);
        }
        if (c < nc) {
          V acc = IO::load(x + r0 * C + c0 + c, nc - c);
          for (int64_t r = r0 + 1; r < r1; ++r) acc = acc + IO::load(x + r * C + c0 + c, nc - c);
          (acc * V(inv_cnt)).store(&s[c], nc - c);
        }
        // pass 2 (from cache): squared deviations from the tile mean (+ their sum, a correction term)
        c = 0;
        for (; c + W <= nc; c += W) {
          const V m = V::loadu(&s[c]);
          V sq(0), sd(0);
          for (int64_t r = r0; r < r1; ++r) {
            const V d = IO::load(x + r * C + c0 + c) - m;
            sd = sd + d;
            sq = at::vec::fmadd(d, d, sq);
          }
          sq.store(&q[c]);
          sd.store(&e[c]);
        }
        if (c < nc) {
          const V m = V::loadu(&s[c], nc - c);
          V sq(0), sd(0);
          for (int64_t r = r0; r < r1; ++r) {
            const V d = IO::load(x + r * C + c0 + c, nc - c) - m;
            sd = sd + d;
            sq = at::vec::fmadd(d, d, sq);
          }
          sq.store(&q[c], nc - c);
          sd.store(&e[c], nc - c);
        }
        const double cnt = double(r1 - r0);
        for (int64_t j = 0; j < nc; ++j) {
          double na = n_acc;
          const double corr = double(e[j]);
          const double tm = double(s[j]) + corr / cnt;
          const double t2 = std::max(0.0, double(q[j]) - corr * corr / cnt);
          bnr::chan_merge(na, am[j], a2[j], cnt, tm, t2);
          as[j] += double(s[j]) * cnt;
        }
        n_acc += cnt;
      }
      if (cb == 0) pn[rt] = n_acc;
    }
  });
  // fixed-order merge of the row tasks
  mean_out.assign(C, 0.0);
  m2_out.assign(C, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    double n = 0, m = 0, q2 = 0;
    double sum = 0;
    for (int64_t rt = 0; rt < nrt; ++rt) {
      bnr::chan_merge(n, m, q2, pn[rt], pmean[rt * C + c], pm2[rt * C + c]);
      sum += psum[rt * C + c];
    }
    finish_channel(m, q2, sum, double(M), mean_out[c], m2_out[c]);
  }
}

template <typename T>
void stats_planar(const T* x, int64_t N, int64_t C, int64_t S, std::vector<double>& mean_out,
                  std::vector<double>& m2_out) {
  using IO = VecIO<T>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  constexpr int64_t W = IO::W;
  // a tile = g consecutive (n, c) segments of one channel (about 2K values)
  const int64_t g = std::max<int64_t>(1, std::min<int64_t>(N, 2048 / S));
  const int64_t ntiles = (N + g - 1) / g;
  const int64_t nng = std::min<int64_t>(ntiles, std::max<int64_t>(1, 32 / C));
  const int64_t tiles_per_task = (ntiles + nng - 1) / nng;
  std::vector<double> pn(nng * C, 0.0), pmean(nng * C, 0.0), pm2(nng * C, 0.0), psum(nng * C, 0.0);
  const int64_t task_elems = tiles_per_task * g * S;
  at::parallel_for(0, nng * C, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, task_elems)),
                   [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t / nng, ng = t % nng;
      const int64_t n_begin = std::min(N, ng * tiles_per_task * g), n_end = std::min(N, n_begin + tiles_per_task * g);
      double na = 0, ma = 0, qa = 0, sa = 0;
      for (int64_t n0 = n_begin; n0 < n_end; n0 += g) {
        const int64_t n1 = std::min(n_end, n0 + g);
        // pass 1
        V acc0(0), acc1(0);
        acc_t tail = 0;
        for (int64_t n = n0; n < n1; ++n) {
          const T* p = x + (n * C + c) * S;
          int64_t s = 0;
          for (; s + 2 * W <= S; s += 2 * W) {
            acc0 = acc0 + IO::load(p + s);
            acc1 = acc1 + IO::load(p + s + W);
          }
          for (; s < S; ++s) tail += static_cast<acc_t>(p[s]);
        }
        const double cnt = double((n1 - n0) * S);
        const double tsum = double(at::vec::vec_reduce_all<acc_t>([](V a, V b) { return a + b; }, acc0 + acc1)) +
                            double(tail);
        sa += tsum;
        const acc_t m = static_cast<acc_t>(tsum / cnt);
        // pass 2
        V sq0(0), sq1(0), sd0(0), sd1(0);
        acc_t sqt = 0, sdt = 0;
        const V mv(m);
        for (int64_t n = n0; n < n1; ++n) {
          const T* p = x + (n * C + c) * S;
          int64_t s = 0;
          for (; s + 2 * W <= S; s += 2 * W) {
            const V d0 = IO::load(p + s) - mv, d1 = IO::load(p + s + W) - mv;
            sd0 = sd0 + d0;
            sd1 = sd1 + d1;
            sq0 = at::vec::fmadd(d0, d0, sq0);
            sq1 = at::vec::fmadd(d1, d1, sq1);
          }
          for (; s < S; ++s) {
            const acc_t d = static_cast<acc_t>(p[s]) - m;
            sdt += d;
            sqt += d * d;
          }
        }
        auto hsum = [](V v) { return double(at::vec::vec_reduce_all<acc_t>([](V a, V b) { return a + b; }, v)); };
        const double corr = hsum(sd0 + sd1) + double(sdt);
        const double q = hsum(sq0 + sq1) + double(sqt);
        bnr::chan_merge(na, ma, qa, cnt, double(m) + corr / cnt, std::max(0.0, q - corr * corr / cnt));
      }
      pn[ng * C + c] = na;
      pmean[ng * C + c] = ma;
      pm2[ng * C + c] = qa;
      psum[ng * C + c] = sa;
    }
  });
  mean_out.assign(C, 0.0);
  m2_out.assign(C, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    double n = 0, m = 0, q2 = 0;
    double sum = 0;
    for (int64_t ng = 0; ng < nng; ++ng) {
      bnr::chan_merge(n, m, q2, pn[ng * C + c], pmean[ng * C + c], pm2[ng * C + c]);
      sum += psum[ng * C + c];
    }
    finish_channel(m, q2, sum, double(N * S), mean_out[c], m2_out[c]);
  }
}

// ------------------------------------------------------------------ y = relu(x * scale + shift)
template <typename T>
void normalize_relu(const T* x, T* y, const Shape& sh, const typename VecIO<T>::acc_t* scale,
                    const typename VecIO<T>::acc_t* shift) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  constexpr int64_t W = IO::W;
  const V zero(0);
  if (sh.layout == Layout::Rows) {
    const int64_t M = sh.M(), C = sh.C;
    at::parallel_for(0, M, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, C)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* px = x + r * C;
        T* py = y + r * C;
        int64_t c = 0;
        for (; c + W <= C; c += W) {
          const V pre = at::vec::fmadd(IO::load(px + c), V::loadu(scale + c), V::loadu(shift + c));
          IO::store(py + c, at::vec::maximum(pre, zero));
        }
        if (c < C) {
          const int64_t n = C - c;
          const V pre = at::vec::fmadd(IO::load(px + c, n), V::loadu(scale + c, n), V::loadu(shift + c, n));
          IO::store(py + c, at::vec::maximum(pre, zero), n);
        }
      }
    });
  } else {
    const int64_t C = sh.C, S = sh.S;
    at::parallel_for(0, sh.N * C, std::max<int64_t>(1, kGrainElems / S), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t c = i % C;
        const V sc(scale[c]), sf(shift[c]);
        const T* px = x + i * S;
        T* py = y + i * S;
        int64_t s = 0;
        for (; s + W <= S; s += W) IO::store(py + s, at::vec::maximum(at::vec::fmadd(IO::load(px + s), sc, sf), zero));
        if (s < S)
          IO::store(py + s, at::vec::maximum(at::vec::fmadd(IO::load(px + s, S - s), sc, sf), zero), S - s);
      }
    });
  }
}

template <typename T>
void fwd_impl(const at::Tensor& x, at::Tensor& y, const Shape& sh, const std::optional<at::Tensor>& running_mean,
              const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& weight,
              const std::optional<at::Tensor>& bias, bool training, double momentum, double eps,
              at::Tensor& save_mean, at::Tensor& save_invstd) {
  using acc_t = at::opmath_type<T>;
  const int64_t C = sh.C, M = sh.M();
  std::vector<acc_t> mean(C), invstd(C);
  if (training) {
    std::vector<double> dmean, dm2;
    if (M == 0) {
      dmean.assign(C, std::numeric_limits<double>::quiet_NaN());
      dm2.assign(C, std::numeric_limits<double>::quiet_NaN());
    } else if (sh.layout == Layout::Rows) {
      stats_rows<T>(x.const_data_ptr<T>(), M, C, dmean, dm2);
    } else {
      stats_planar<T>(x.const_data_ptr<T>(), sh.N, C, sh.S, dmean, dm2);
    }
    const double Md = double(M);
    for (int64_t c = 0; c < C; ++c) {
      const double var = dm2[c] / Md;
      mean[c] = static_cast<acc_t>(dmean[c]);
      invstd[c] = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
    }
    if (running_mean.has_value() && running_mean->defined()) {
      std::vector<double> rm, rv;
      read_param<double>(running_mean, C, 0.0, rm);
      read_param<double>(running_var, C, 1.0, rv);
      for (int64_t c = 0; c < C; ++c) {
        rm[c] = bnr::running_update(rm[c], dmean[c], momentum);
        rv[c] = bnr::running_update(rv[c], dm2[c] / (Md - 1.0), momentum);
      }
      at::Tensor trm = *running_mean, trv = *running_var;
      write_param(trm, rm);
      write_param(trv, rv);
    }
  } else {
    std::vector<double> rm, rv;
    read_param<double>(running_mean, C, 0.0, rm);
    read_param<double>(running_var, C, 1.0, rv);
    for (int64_t c = 0; c < C; ++c) {
      mean[c] = static_cast<acc_t>(rm[c]);
      invstd[c] = static_cast<acc_t>(1.0 / std::sqrt(rv[c] + eps));
    }
  }
  std::vector<acc_t> w, b, scale(C), shift(C);
  read_param<acc_t>(weight, C, acc_t(1), w);
  read_param<acc_t>(bias, C, acc_t(0), b);
  for (int64_t c = 0; c < C; ++c) bnr::fold(mean[c], invstd[c], w[c], b[c], scale[c], shift[c]);
  std::copy(mean.begin(), mean.end(), save_mean.data_ptr<acc_t>());
  std::copy(invstd.begin(), invstd.end(), save_invstd.data_ptr<acc_t>());
  if (x.numel() > 0) normalize_relu<T>(x.const_data_ptr<T>(), y.data_ptr<T>(), sh, scale.data(), shift.data());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bnr_fwd_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, bool training, double momentum, double eps) {
  bnr_check_args(input, running_mean, running_var, weight, bias, training, momentum, eps);
  TORCH_CHECK(input.device().is_cpu(), "batch_norm_relu (cpu kernel): input must be a CPU tensor");
  Shape sh;
  at::Tensor x = prepare(input, sh);
  at::Tensor y = new_empty_like(x);
  const auto acc_dt = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor save_mean = new_empty({sh.C}, x.options().dtype(acc_dt));
  at::Tensor save_invstd = new_empty({sh.C}, x.options().dtype(acc_dt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_relu_fwd_cpu", [&] {
    fwd_impl<scalar_t>(x, y, sh, running_mean, running_var, weight, bias, training, momentum, eps, save_mean,
                       save_invstd);
  });
  return {y, save_mean, save_invstd};
}

// ------------------------------------------------------------------ backward
// Per-channel sums of g and g * (x - mean), with g = dy where the ReLU is open.
template <typename T>
void bwd_sums(const T* dy, const T* x, const Shape& sh, const typename VecIO<T>::acc_t* mean,
              const typename VecIO<T>::acc_t* scale, const typename VecIO<T>::acc_t* shift,
              std::vector<double>& sg, std::vector<double>& sgd) {
  using IO = VecIO<T>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  constexpr int64_t W = IO::W;
  const V zero(0);
  const int64_t C = sh.C;
  sg.assign(C, 0.0);
  sgd.assign(C, 0.0);
  if (sh.layout == Layout::Rows) {
    const int64_t M = sh.M();
    const int64_t ntiles = (M + kTileRows - 1) / kTileRows;
    const int64_t nrt = std::min<int64_t>(ntiles, kMaxRowTasks);
    const int64_t tiles_per_task = (ntiles + nrt - 1) / nrt;
    const int64_t ncb = (C + kColBlock - 1) / kColBlock;
    std::vector<double> p1(nrt * C, 0.0), p2(nrt * C, 0.0);
    const int64_t task_elems = tiles_per_task * kTileRows * std::min(C, kColBlock);
    at::parallel_for(0, nrt * ncb, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, task_elems)),
                     [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> a1(kColBlock), a2(kColBlock);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t rt = t / ncb, cb = t % ncb;
        const int64_t c0 = cb * kColBlock, c1 = std::min(C, c0 + kColBlock), nc = c1 - c0;
        const int64_t r_begin = std::min(M, rt * tiles_per_task * kTileRows);
        const int64_t r_end = std::min(M, r_begin + tiles_per_task * kTileRows);
        for (int64_t r0 = r_begin; r0 < r_end; r0 += kTileRows) {
          const int64_t r1 = std::min(r_end, r0 + kTileRows);
          for (int64_t c = 0; c < nc; c += W) {
            const int64_t n = std::min(W, nc - c);
            const int64_t cc = c0 + c;
            const V mv = V::loadu(mean + cc, n), sc = V::loadu(scale + cc, n), sf = V::loadu(shift + cc, n);
            V s1(0), s2(0);
            for (int64_t r = r0; r < r1; ++r) {
              const V xv = n == W ? IO::load(x + r * C + cc) : IO::load(x + r * C + cc, n);
              const V gv = n == W ? IO::load(dy + r * C + cc) : IO::load(dy + r * C + cc, n);
              const V g = V::blendv(gv, zero, at::vec::fmadd(xv, sc, sf) <= zero);
              s1 = s1 + g;
              s2 = at::vec::fmadd(g, xv - mv, s2);
            }
            s1.store(&a1[c], n);
            s2.store(&a2[c], n);
          }
          for (int64_t j = 0; j < nc; ++j) {
            p1[rt * C + c0 + j] += double(a1[j]);
            p2[rt * C + c0 + j] += double(a2[j]);
          }
        }
      }
    });
    for (int64_t c = 0; c < C; ++c)
      for (int64_t rt = 0; rt < nrt; ++rt) {
        sg[c] += p1[rt * C + c];
        sgd[c] += p2[rt * C + c];
      }
  } else {
    const int64_t N = sh.N, S = sh.S;
    const int64_t g = std::max<int64_t>(1, std::min<int64_t>(N, 2048 / S));
    const int64_t ntiles = (N + g - 1) / g;
    const int64_t nng = std::min<int64_t>(ntiles, std::max<int64_t>(1, 32 / C));
    const int64_t tiles_per_task = (ntiles + nng - 1) / nng;
    std::vector<double> p1(nng * C, 0.0), p2(nng * C, 0.0);
    const int64_t task_elems = tiles_per_task * g * S;
    at::parallel_for(0, nng * C, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, task_elems)),
                     [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c = t / nng, ng = t % nng;
        const int64_t n_begin = std::min(N, ng * tiles_per_task * g), n_end = std::min(N, n_begin + tiles_per_task * g);
        const V mv(mean[c]), sc(scale[c]), sf(shift[c]);
        double d1 = 0, d2 = 0;
        for (int64_t n0 = n_begin; n0 < n_end; n0 += g) {
          const int64_t n1 = std::min(n_end, n0 + g);
          V s1(0), s2(0);
          acc_t t1s = 0, t2s = 0;
          for (int64_t n = n0; n < n1; ++n) {
            const T* px = x + (n * C + c) * S;
            const T* pg = dy + (n * C + c) * S;
            int64_t s = 0;
            for (; s + W <= S; s += W) {
              const V xv = IO::load(px + s);
              const V g = V::blendv(IO::load(pg + s), zero, at::vec::fmadd(xv, sc, sf) <= zero);
              s1 = s1 + g;
              s2 = at::vec::fmadd(g, xv - mv, s2);
            }
            for (; s < S; ++s) {
              const acc_t xs = static_cast<acc_t>(px[s]);
              const acc_t pre = std::fma(xs, scale[c], shift[c]);
              const acc_t gs = bnr::relu_passes(pre) ? static_cast<acc_t>(pg[s]) : acc_t(0);
              t1s += gs;
              t2s = std::fma(gs, xs - mean[c], t2s);
            }
          }
          d1 += double(at::vec::vec_reduce_all<acc_t>([](V a, V b) { return a + b; }, s1)) + double(t1s);
          d2 += double(at::vec::vec_reduce_all<acc_t>([](V a, V b) { return a + b; }, s2)) + double(t2s);
        }
        p1[ng * C + c] = d1;
        p2[ng * C + c] = d2;
      }
    });
    for (int64_t c = 0; c < C; ++c)
      for (int64_t ng = 0; ng < nng; ++ng) {
        sg[c] += p1[ng * C + c];
        sgd[c] += p2[ng * C + c];
      }
  }
}

// dx = k1 * g + k3 * (x - mean) + k2, g = dy gated by the ReLU.
template <typename T>
void bwd_dx(const T* dy, const T* x, T* dx, const Shape& sh, const typename VecIO<T>::acc_t* mean,
            const typename VecIO<T>::acc_t* scale, const typename VecIO<T>::acc_t* shift,
            const typename VecIO<T>::acc_t* k1, const typename VecIO<T>::acc_t* k2,
            const typename VecIO<T>::acc_t* k3) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  constexpr int64_t W = IO::W;
  const V zero(0);
  auto one = [&](const V& xv, const V& gv, const V& mv, const V& sc, const V& sf, const V& a1, const V& a2,
                 const V& a3) {
    const V g = V::blendv(gv, zero, at::vec::fmadd(xv, sc, sf) <= zero);
    return at::vec::fmadd(g, a1, at::vec::fmadd(xv - mv, a3, a2));
  };
  if (sh.layout == Layout::Rows) {
    const int64_t M = sh.M(), C = sh.C;
    at::parallel_for(0, M, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, C)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* px = x + r * C;
        const T* pg = dy + r * C;
        T* pd = dx + r * C;
        int64_t c = 0;
        for (; c + W <= C; c += W)
          IO::store(pd + c, one(IO::load(px + c), IO::load(pg + c), V::loadu(mean + c), V::loadu(scale + c),
                                V::loadu(shift + c), V::loadu(k1 + c), V::loadu(k2 + c), V::loadu(k3 + c)));
        if (c < C) {
          const int64_t n = C - c;
          IO::store(pd + c, one(IO::load(px + c, n), IO::load(pg + c, n), V::loadu(mean + c, n),
                                V::loadu(scale + c, n), V::loadu(shift + c, n), V::loadu(k1 + c, n),
                                V::loadu(k2 + c, n), V::loadu(k3 + c, n)), n);
        }
      }
    });
  } else {
    const int64_t C = sh.C, S = sh.S;
    at::parallel_for(0, sh.N * C, std::max<int64_t>(1, kGrainElems / S), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t c = i % C;
        const V mv(mean[c]), sc(scale[c]), sf(shift[c]), a1(k1[c]), a2(k2[c]), a3(k3[c]);
        const T* px = x + i * S;
        const T* pg = dy + i * S;
        T* pd = dx + i * S;
        int64_t s = 0;
        for (; s + W <= S; s += W) IO::store(pd + s, one(IO::load(px + s), IO::load(pg + s), mv, sc, sf, a1, a2, a3));
        if (s < S)
          IO::store(pd + s, one(IO::load(px + s, S - s), IO::load(pg + s, S - s), mv, sc, sf, a1, a2, a3), S - s);
      }
    });
  }
}

template <typename T>
void bwd_impl(const at::Tensor& dy, const at::Tensor& x, at::Tensor& dx, const Shape& sh,
              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
              const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training, at::Tensor& gw,
              at::Tensor& gb) {
  using acc_t = at::opmath_type<T>;
  const int64_t C = sh.C, M = sh.M();
  std::vector<acc_t> mean, invstd, w, b, scale(C), shift(C), k1(C), k2(C), k3(C);
  read_param<acc_t>(save_mean, C, acc_t(0), mean);
  read_param<acc_t>(save_invstd, C, acc_t(1), invstd);
  read_param<acc_t>(weight, C, acc_t(1), w);
  read_param<acc_t>(bias, C, acc_t(0), b);
  for (int64_t c = 0; c < C; ++c) bnr::fold(mean[c], invstd[c], w[c], b[c], scale[c], shift[c]);
  std::vector<double> sg, sgd;
  if (M > 0) {
    bwd_sums<T>(dy.const_data_ptr<T>(), x.const_data_ptr<T>(), sh, mean.data(), scale.data(), shift.data(), sg, sgd);
  } else {
    sg.assign(C, 0.0);
    sgd.assign(C, 0.0);
  }
  std::vector<double> dw(C), db(C);
  for (int64_t c = 0; c < C; ++c) {
    const double is = double(invstd[c]);
    dw[c] = sgd[c] * is;
    db[c] = sg[c];
    const double a = double(w[c]) * is;
    k1[c] = static_cast<acc_t>(a);
    if (training) {
      k2[c] = static_cast<acc_t>(-a * sg[c] / double(M));
      k3[c] = static_cast<acc_t>(-a * is * is * sgd[c] / double(M));
    } else {
      k2[c] = 0;
      k3[c] = 0;
    }
  }
  write_param(gw, dw);
  write_param(gb, db);
  if (M > 0)
    bwd_dx<T>(dy.const_data_ptr<T>(), x.const_data_ptr<T>(), dx.data_ptr<T>(), sh, mean.data(), scale.data(),
              shift.data(), k1.data(), k2.data(), k3.data());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bnr_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                                           const std::optional<at::Tensor>& weight,
                                                           const std::optional<at::Tensor>& bias,
                                                           const at::Tensor& save_mean,
                                                           const at::Tensor& save_invstd, bool training) {
  TORCH_CHECK(input.dim() >= 2, "batch_norm_relu backward: input must have at least 2 dimensions");
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "batch_norm_relu backward: grad_out must have the input's shape ",
              input.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), "batch_norm_relu backward: grad_out must have dtype ",
              input.scalar_type(), ", got ", grad_out.scalar_type());
  Shape sh;
  at::Tensor x = prepare(input, sh);
  const auto acc_dt = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(save_mean.numel() == sh.C && save_invstd.numel() == sh.C && save_mean.scalar_type() == acc_dt &&
                  save_invstd.scalar_type() == acc_dt,
              "batch_norm_relu backward: save_mean/save_invstd must be ", acc_dt, " tensors of ", sh.C, " elements");
  at::Tensor dy = match_layout(grad_out, x);
  at::Tensor dx = new_empty_like(x);
  at::ScalarType pdt = acc_dt;
  if (weight.has_value() && weight->defined()) pdt = weight->scalar_type();
  else if (bias.has_value() && bias->defined()) pdt = bias->scalar_type();
  at::Tensor gw = new_empty({sh.C}, x.options().dtype(pdt));
  at::Tensor gb = new_empty({sh.C}, x.options().dtype(pdt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_relu_bwd_cpu", [&] {
    bwd_impl<scalar_t>(dy, x, dx, sh, weight, bias, save_mean, save_invstd, training, gw, gb);
  });
  return {dx, gw, gb};
}

}  // namespace
}  // namespace gankern

TORCH_LIBRARY_IMPL(gankern, CPU, m) {
  m.impl("_batch_norm_relu_fwd", &gankern::bnr_fwd_cpu);
  m.impl("_batch_norm_relu_bwd", &gankern::bnr_bwd_cpu);
}
