// BatchNorm + ReLU CPU kernels: the per-channel statistics of the training forward (the layouts,
// the partition and the entry points: batch_norm_relu_cpu.h).
#include "batch_norm_relu_cpu.h"

namespace gankern {
namespace bnr_cpu {

namespace {
// ------------------------------------------------------------------ statistics (training)
// A task reduces its column block over its rows [r0, r1) in one pass around a per-channel shift
// K, the mean of the first kShiftRows rows (of the input, shared by all row groups): sums of d = x - K and d^2, in float over a tile of
// kTileRows rows, then added in double.  mean = K + sum(d) / n, m2 = sum(d^2) - sum(d)^2 / n.
// This loses at most a factor 1 / (1 - kShiftTol) of relative accuracy against an exact
// two-pass as long as sum(d)^2 <= kShiftTol * n * sum(d^2) (K within one standard deviation of
// the mean for kShiftTol = 1/2), which is checked for every channel.  A granule of kColGrain
// channels that fails is redone around its own mean just computed (accurate, so this passes for
// finite data), and if that fails too or the data is not finite, chunk by chunk with the exact
// method: a two-pass per tile (the tile's mean, then deviations from it, from L1/L2) merged with
// Chan's update.  So there is no E[x^2] - E[x]^2 cancellation, whatever the data; for typical
// (i.i.d.) batches x is read once (plus its first kShiftRows rows).
// Outputs per channel: mean, m2 (sum of squared deviations) and the plain sum (which decides the
// non-finite rule, see finite_rule).
constexpr int64_t kShiftRows = 16;
constexpr double kShiftTol = 0.5;

// Sum, mean and m2 of the values p[i * stride] (i < n) in double, two-pass: the exact paths' rescue when a
// tile's float sums are not finite for finite data (|x - mean| beyond ~1e19 squares past float's range; sums of
// ~1e37 values overflow), as torch's CPU kernel (double accumulation) stays finite there.  Non-finite data gives
// a non-finite sum here too (the non-finite rule, finite_rule, then decides).
template <typename T>
void tile_stats_double(const T* __restrict p, int64_t stride, int64_t n, double& sum, double& mean, double& m2) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += double(p[i * stride]);
  const double m = s / double(n);
  double q = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = double(p[i * stride]) - m;
    q += d * d;
  }
  sum = s;
  mean = m;
  m2 = q;
}

// Exact statistics of one column chunk over rows [r_begin, r_end): two-pass per tile, tiles merged
// with Chan's update (in double, vectorized across the chunk's channels).  Also the plain sum.
template <typename T, int K, bool TAIL>
void stats_chunk_exact(const T* __restrict x, int64_t C, int64_t r_begin, int64_t r_end, int64_t c, int64_t nl,
                       double* __restrict am, double* __restrict a2, double* __restrict as) {
  using IO = VecIO<T>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  constexpr int64_t W = IO::W;
  const int64_t n = TAIL ? nl : K * W;
  double n_acc = 0;
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kTileRows) {
    const int64_t cnt = std::min(r_end, r0 + kTileRows) - r0;
    const T* __restrict p0 = x + r0 * C + c;
    V sum[K], m[K], sd[K], sq[K];
    for (int k = 0; k < K; ++k) sum[k] = IO::template ld<TAIL>(p0 + k * W, nl);
    for (int64_t r = 1; r < cnt; ++r)
      for (int k = 0; k < K; ++k) sum[k] = sum[k] + IO::template ld<TAIL>(p0 + r * C + k * W, nl);
    const V inv_cnt(acc_t(1) / acc_t(cnt));
    for (int k = 0; k < K; ++k) {
      m[k] = sum[k] * inv_cnt;
      sd[k] = V(0);
      sq[k] = V(0);
    }
    for (int64_t r = 0; r < cnt; ++r)
      for (int k = 0; k < K; ++k) {
        const V d = IO::template ld<TAIL>(p0 + r * C + k * W, nl) - m[k];
        sd[k] = sd[k] + d;
        sq[k] = fma_v(d, d, sq[k]);
      }
    alignas(64) acc_t bs[K * W], bm[K * W], bd[K * W], bq[K * W];
    for (int k = 0; k < K; ++k) {
      sum[k].store(bs + k * W);
      m[k].store(bm + k * W);
      sd[k].store(bd + k * W);
      sq[k].store(bq + k * W);
    }
    const double cntd = double(cnt), inv = 1.0 / cntd;
    const double f = cntd / (n_acc + cntd), nf = n_acc * f;
    for (int64_t j = 0; j < n; ++j) {
      const double corr = double(bd[j]);
      double tm = double(bm[j]) + corr * inv;
      double t2 = std::max(0.0, double(bq[j]) - corr * corr * inv);
      double ts = double(bs[j]);
      // the raw float sums decide (t2 is clamped by std::max, which turns an inf - inf NaN into 0)
      if (!std::isfinite(ts) || !std::isfinite(corr) || !std::isfinite(double(bq[j])))
        tile_stats_double(p0 + j, C, cnt, ts, tm, t2);
      if (n_acc == 0) {
        am[j] = tm;
        a2[j] = t2;
        as[j] = ts;
      } else {
        const double delta = tm - am[j];
        am[j] = am[j] + delta * f;
        a2[j] = a2[j] + (t2 + delta * delta * nf);
        as[j] = as[j] + ts;
      }
    }
    n_acc += cntd;
  }
}

// out[0, c1 - c0) = sum over rows [ra, rb) of the block's columns (float), in sweeps of kSweepRows rows.
template <typename T>
void block_colsum(const T* __restrict x, int64_t C, int64_t ra, int64_t rb, int64_t c0, int64_t c1,
                  typename VecIO<T>::acc_t* __restrict out) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  constexpr int64_t W = IO::W;
  constexpr int KS = kVecRegs >= 32 ? 4 : 2;
  for (int64_t rr = ra; rr < rb; rr += kSweepRows) {
    const int64_t nr = std::min(rb, rr + kSweepRows) - rr;
    const bool init = rr == ra;
    for_chunks<KS>(c0, c1, W, [&](auto KC, auto TC, int64_t c, int64_t nl) {
      constexpr int K = decltype(KC)::value;
      constexpr bool TAIL = decltype(TC)::value;
      auto* o = out + (c - c0);
      V s[K];
      for (int k = 0; k < K; ++k) s[k] = init ? V(0) : V::loadu(o + k * W);
      const T* p = x + rr * C + c;
      for (int64_t r = 0; r < nr; ++r, p += C)
        for (int k = 0; k < K; ++k) s[k] = s[k] + IO::template ld<TAIL>(p + k * W, nl);
      for (int k = 0; k < K; ++k) s[k].store(o + k * W);
    });
  }
}

// One pass over rows [r_begin, r_end) of the block around shift ks[0, nc): gd = sum(x - K),
// gq = sum((x - K)^2), float per tile, double across tiles.
template <typename T>
void block_shifted(const T* __restrict x, int64_t C, int64_t r_begin, int64_t r_end, int64_t c0, int64_t c1,
                   const typename VecIO<T>::acc_t* __restrict ks, double* __restrict gd, double* __restrict gq) {
  using IO = VecIO<T>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  constexpr int64_t W = IO::W;
  constexpr int KS = kVecRegs >= 32 ? 4 : 2;
  const int64_t nc = c1 - c0;
  alignas(64) acc_t fd[kMaxWidth], fq[kMaxWidth];
  const V one(1);
  for (int64_t t0 = r_begin; t0 < r_end; t0 += kTileRows) {
    const int64_t t1 = std::min(r_end, t0 + kTileRows);
    for (int64_t rr = t0; rr < t1; rr += kSweepRows) {
      const int64_t nr = std::min(t1, rr + kSweepRows) - rr;
      const bool init = rr == t0;
      for_chunks<KS>(c0, c1, W, [&](auto KC, auto TC, int64_t c, int64_t nl) {
        constexpr int K = decltype(KC)::value;
        constexpr bool TAIL = decltype(TC)::value;
        const int64_t j = c - c0;
        V m[K], nk[K], sd[K], sq[K];
        for (int k = 0; k < K; ++k) {
          m[k] = IO::template ldp<TAIL>(ks + j + k * W, nl);
          nk[k] = V(0) - m[k];
          sd[k] = init ? V(0) : V::loadu(fd + j + k * W);
          sq[k] = init ? V(0) : V::loadu(fq + j + k * W);
        }
        const T* p = x + rr * C + c;
        for (int64_t r = 0; r < nr; ++r, p += C) {
          for (int k = 0; k < K; ++k) {
            // half of the subtractions as fma(x, 1, -K) (the same result): balances the add and fma ports
            const V xv = IO::template ld<TAIL>(p + k * W, nl);
            const V d = (k & 1) ? fma_v(xv, one, nk[k]) : xv - m[k];
            sd[k] = sd[k] + d;
            sq[k] = fma_v(d, d, sq[k]);
          }
        }
        for (int k = 0; k < K; ++k) {
          sd[k].store(fd + j + k * W);
          sq[k].store(fq + j + k * W);
        }
      });
    }
    if (t0 == r_begin) {
      for (int64_t j = 0; j < nc; ++j) {
        gd[j] = double(fd[j]);
        gq[j] = double(fq[j]);
      }
    } else {
      for (int64_t j = 0; j < nc; ++j) {
        gd[j] += double(fd[j]);
        gq[j] += double(fq[j]);
      }
    }
  }
}

// The shift check for channels [0, n): sum(d)^2 <= kShiftTol * rows * sum(d^2), sum(d^2) finite.
inline bool shift_ok(const double* __restrict gd, const double* __restrict gq, int64_t n, int64_t rows) {
  const double lim = kShiftTol * double(rows);
  bool ok = true;
  for (int64_t j = 0; j < n; ++j) ok &= (gd[j] * gd[j] <= lim * gq[j]) & (gq[j] <= std::numeric_limits<double>::max());
  return ok;
}

}  // namespace

// Statistics of rows [r_begin, r_end) x columns [c0, c1); outputs indexed by channel.
// shift: (indexed by channel) the shifts computed once for all row groups, or nullptr: the mean of
// the task's first kShiftRows rows.
template <typename T>
void shift_from_rows(const T* __restrict x, int64_t C, int64_t r_begin, int64_t r_end, int64_t c0, int64_t c1,
                     typename VecIO<T>::acc_t* __restrict ks) {
  using acc_t = typename VecIO<T>::acc_t;
  const int64_t kr = std::min(r_end - r_begin, kShiftRows);
  alignas(64) acc_t sum[kMaxWidth];  // block_colsum stores whole vectors
  block_colsum<T>(x, C, r_begin, r_begin + kr, c0, c1, sum);
  const acc_t inv_kr = acc_t(1) / acc_t(kr);
  for (int64_t j = 0; j < c1 - c0; ++j) ks[j] = sum[j] * inv_kr;
}

template <typename T>
void stats_rows_task(const T* __restrict x, int64_t C, int64_t r_begin, int64_t r_end, int64_t c0, int64_t c1,
                     double* __restrict am, double* __restrict a2, double* __restrict as,
                     const typename VecIO<T>::acc_t* __restrict shift) {
  using IO = VecIO<T>;
  using acc_t = typename IO::acc_t;
  constexpr int64_t W = IO::W;
  constexpr int KS = kVecRegs >= 32 ? 4 : 2;
  const int64_t rows = r_end - r_begin;
  const double nd = double(rows), inv_n = 1.0 / nd;
  alignas(64) acc_t ks[kMaxWidth];
  alignas(64) double gd[kMaxWidth], gq[kMaxWidth];
  if (shift) std::copy(shift + c0, shift + c1, ks);
  else shift_from_rows<T>(x, C, r_begin, r_end, c0, c1, ks);
  block_shifted<T>(x, C, r_begin, r_end, c0, c1, ks, gd, gq);
  // the check, per granule of kColGrain channels: a granule that fails is redone on its own
  for (int64_t g0 = c0; g0 < c1; g0 += kColGrain) {
    const int64_t g1 = std::min(c1, g0 + kColGrain), j0 = g0 - c0, n = g1 - g0;
    bool ok = shift_ok(gd + j0, gq + j0, n, rows);
    if (!ok) {
      // again around the mean just found, if finite
      bool fin = true;
      for (int64_t j = j0; j < j0 + n; ++j) {
        const double m = double(ks[j]) + gd[j] * inv_n;
        fin &= std::abs(m) <= double(std::numeric_limits<acc_t>::max());
        ks[j] = static_cast<acc_t>(m);
      }
      if (fin) {
        block_shifted<T>(x, C, r_begin, r_end, g0, g1, ks + j0, gd + j0, gq + j0);
        ok = shift_ok(gd + j0, gq + j0, n, rows);
      }
    }
    if (ok) {
      for (int64_t j = j0; j < j0 + n; ++j) {
        const double e = gd[j];
        am[c0 + j] = double(ks[j]) + e * inv_n;
        a2[c0 + j] = std::max(0.0, gq[j] - e * e * inv_n);
        as[c0 + j] = double(ks[j]) * nd + e;
      }
    } else {
      for_chunks<KS>(g0, g1, W, [&](auto KC, auto TC, int64_t c, int64_t nl) {
        stats_chunk_exact<T, decltype(KC)::value, decltype(TC)::value>(x, C, r_begin, r_end, c, nl, am + c, a2 + c,
                                                                        as + c);
      });
    }
  }
}

// Fixed-order merge of the row groups' (mean, m2, plain sum) (group g at offset g * C) into group 0.
void merge_groups(const RowsPlan& P, double* pmean, double* pm2, double* psum) {
  const int64_t C = P.C;
  double* __restrict m0 = pmean;
  double* __restrict q0 = pm2;
  double* __restrict s0 = psum;
  double n = double(P.r1(0) - P.r0(0));
  for (int64_t g = 1; g < P.ngroups; ++g) {
    const int64_t t = g * P.ncb;
    const double nb = double(P.r1(t) - P.r0(t));
    const double f = nb / (n + nb), nf = n * f;
    const double* __restrict gm = pmean + g * C;
    const double* __restrict g2 = pm2 + g * C;
    const double* __restrict gs = psum + g * C;
    for (int64_t c = 0; c < C; ++c) {
      const double delta = gm[c] - m0[c];
      m0[c] = m0[c] + delta * f;
      q0[c] = q0[c] + (g2[c] + delta * delta * nf);
      s0[c] += gs[c];
    }
    n += nb;
  }
}

namespace {

// Planar layout: a task is (channel, group of n) -- one channel per task unless C is small; a
// tile = g consecutive (n, c) segments of S values (about 2K values).  The same scheme as the rows
// layout: one pass around a shift (the mean of the task's first >= 64 values) with the check, the
// redo, and the exact fallback (two-pass per tile, Chan merges).
template <typename T>
struct PlanarVec {
  using IO = VecIO<T>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  static constexpr int64_t W = IO::W;
  static acc_t hsum(const V& v) { return at::vec::vec_reduce_all<acc_t>([](V a, V b) { return a + b; }, v); }
  // f(V values, V shift) over one segment of S values; the tail vector's missing lanes load as 0
  // and see a shift of 0 (so x - shift = 0 there).
  template <typename F>
  static void segment(const T* p, int64_t S, const V& k, const V& k_tail, F&& f) {
    int64_t s = 0;
    for (; s + W <= S; s += W) f(IO::load(p + s), k);
    if (s < S) f(IO::load(p + s, S - s), k_tail);
  }
};

template <typename T>
void planar_task_exact(const T* x, int64_t C, int64_t S, int64_t c, int64_t n_begin, int64_t n_end, int64_t g,
                       double& na, double& ma, double& qa, double& sa) {
  using PV = PlanarVec<T>;
  using acc_t = typename PV::acc_t;
  using V = typename PV::V;
  na = ma = qa = sa = 0;
  const V zero(0);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += g) {
    const int64_t n1 = std::min(n_end, n0 + g);
    V acc(0);
    for (int64_t n = n0; n < n1; ++n)
      PV::segment(x + (n * C + c) * S, S, zero, zero, [&](const V& v, const V&) { acc = acc + v; });
    const double cnt = double((n1 - n0) * S);
    const double tsum = double(PV::hsum(acc));
    const acc_t m = static_cast<acc_t>(tsum / cnt);
    alignas(64) acc_t kb[PV::W];
    std::fill(kb, kb + PV::W, m);
    const V mv(m), mt = V::loadu(kb, S % PV::W);
    V sd(0), sq(0);
    for (int64_t n = n0; n < n1; ++n)
      PV::segment(x + (n * C + c) * S, S, mv, mt, [&](const V& v, const V& k) {
        const V d = v - k;
        sd = sd + d;
        sq = fma_v(d, d, sq);
      });
    const double corr = double(PV::hsum(sd)), q = double(PV::hsum(sq));
    double tm = double(m) + corr / cnt, t2 = std::max(0.0, q - corr * corr / cnt), ts = tsum;
    if (!std::isfinite(ts) || !std::isfinite(corr) || !std::isfinite(q)) {  // see tile_stats_double; segment by segment
      double n_t = 0;
      ts = tm = t2 = 0;
      for (int64_t n = n0; n < n1; ++n) {
        double s1, m1, q1;
        tile_stats_double(x + (n * C + c) * S, 1, S, s1, m1, q1);
        bnr::chan_merge(n_t, tm, t2, double(S), m1, q1);
        ts += s1;
      }
    }
    sa += ts;
    bnr::chan_merge(na, ma, qa, cnt, tm, t2);
  }
}

// One pass around the shift k over segments [n_begin, n_end) of channel c; true when the shift
// check passes.
template <typename T>
bool planar_task_shifted(const T* x, int64_t C, int64_t S, int64_t c, int64_t n_begin, int64_t n_end, int64_t g,
                         typename VecIO<T>::acc_t k, double& gd, double& gq) {
  using PV = PlanarVec<T>;
  using acc_t = typename PV::acc_t;
  using V = typename PV::V;
  alignas(64) acc_t kb[PV::W];
  std::fill(kb, kb + PV::W, k);
  const V kv(k), kt = V::loadu(kb, S % PV::W);
  gd = gq = 0;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += g) {
    const int64_t n1 = std::min(n_end, n0 + g);
    V sd0(0), sq0(0), sd1(0), sq1(0);
    for (int64_t n = n0; n < n1; ++n) {
      const T* p = x + (n * C + c) * S;
      int64_t s = 0;
      for (; s + 2 * PV::W <= S; s += 2 * PV::W) {
        const V d0 = VecIO<T>::load(p + s) - kv, d1 = VecIO<T>::load(p + s + PV::W) - kv;
        sd0 = sd0 + d0;
        sq0 = fma_v(d0, d0, sq0);
        sd1 = sd1 + d1;
        sq1 = fma_v(d1, d1, sq1);
      }
      if (s + PV::W <= S) {
        const V d = VecIO<T>::load(p + s) - kv;
        sd0 = sd0 + d;
        sq0 = fma_v(d, d, sq0);
        s += PV::W;
      }
      if (s < S) {
        const V d = VecIO<T>::load(p + s, S - s) - kt;
        sd1 = sd1 + d;
        sq1 = fma_v(d, d, sq1);
      }
    }
    gd += double(PV::hsum(sd0 + sd1));
    gq += double(PV::hsum(sq0 + sq1));
  }
  const double n = double((n_end - n_begin) * S);
  return gd * gd <= kShiftTol * n * gq && gq <= std::numeric_limits<double>::max();
}

}  // namespace

template <typename T>
void stats_planar(const T* x, int64_t N, int64_t C, int64_t S, double* mean_out, double* m2_out, double* sum_out) {
  using PV = PlanarVec<T>;
  using acc_t = typename PV::acc_t;
  using V = typename PV::V;
  const int64_t g = std::max<int64_t>(1, std::min<int64_t>(N, 2048 / S));
  const int64_t ntiles = (N + g - 1) / g;
  const int64_t nng = std::min<int64_t>(ntiles, std::max<int64_t>(1, 32 / C));
  const int64_t tiles_per_task = (ntiles + nng - 1) / nng;
  std::unique_ptr<double[]> ws(new double[4 * nng * C]);
  double* pn = ws.get();
  double* pmean = pn + nng * C;
  double* pm2 = pmean + nng * C;
  double* psum = pm2 + nng * C;
  run_tasks(nng * C, N * C * S, [&](int64_t t0, int64_t t1) {
    const V zero(0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t / nng, ng = t % nng;
      const int64_t n_begin = std::min(N, ng * tiles_per_task * g), n_end = std::min(N, n_begin + tiles_per_task * g);
      const int64_t i = ng * C + c;
      pn[i] = double((n_end - n_begin) * S);
      if (n_end == n_begin) {
        pmean[i] = pm2[i] = psum[i] = 0;
        continue;
      }
      // shift: the mean of the first >= 64 values
      const int64_t ks = std::min(n_end - n_begin, std::max<int64_t>(1, (64 + S - 1) / S));
      V acc(0);
      for (int64_t n = n_begin; n < n_begin + ks; ++n)
        PV::segment(x + (n * C + c) * S, S, zero, zero, [&](const V& v, const V&) { acc = acc + v; });
      acc_t k = static_cast<acc_t>(double(PV::hsum(acc)) / double(ks * S));
      double gd, gq;
      bool ok = planar_task_shifted<T>(x, C, S, c, n_begin, n_end, g, k, gd, gq);
      if (!ok) {
        const double m = double(k) + gd / pn[i];
        if (std::abs(m) <= double(std::numeric_limits<acc_t>::max())) {
          k = static_cast<acc_t>(m);
          ok = planar_task_shifted<T>(x, C, S, c, n_begin, n_end, g, k, gd, gq);
        }
      }
      if (ok) {
        pmean[i] = double(k) + gd / pn[i];
        pm2[i] = std::max(0.0, gq - gd * gd / pn[i]);
        psum[i] = double(k) * pn[i] + gd;
      } else {
        double na;
        planar_task_exact<T>(x, C, S, c, n_begin, n_end, g, na, pmean[i], pm2[i], psum[i]);
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double n = 0, m = 0, q2 = 0;
    double sum = 0;
    for (int64_t ng = 0; ng < nng; ++ng) {
      bnr::chan_merge(n, m, q2, pn[ng * C + c], pmean[ng * C + c], pm2[ng * C + c]);
      sum += psum[ng * C + c];
    }
    mean_out[c] = m;
    m2_out[c] = q2;
    sum_out[c] = sum;
  }
}


template void shift_from_rows<float>(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, VecIO<float>::acc_t*);
template void stats_rows_task<float>(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, double*, double*, double*,
                                  const VecIO<float>::acc_t*);
template void stats_planar<float>(const float*, int64_t, int64_t, int64_t, double*, double*, double*);
template void shift_from_rows<double>(const double*, int64_t, int64_t, int64_t, int64_t, int64_t, VecIO<double>::acc_t*);
template void stats_rows_task<double>(const double*, int64_t, int64_t, int64_t, int64_t, int64_t, double*, double*, double*,
                                  const VecIO<double>::acc_t*);
template void stats_planar<double>(const double*, int64_t, int64_t, int64_t, double*, double*, double*);
template void shift_from_rows<c10::Half>(const c10::Half*, int64_t, int64_t, int64_t, int64_t, int64_t, VecIO<c10::Half>::acc_t*);
template void stats_rows_task<c10::Half>(const c10::Half*, int64_t, int64_t, int64_t, int64_t, int64_t, double*, double*, double*,
                                  const VecIO<c10::Half>::acc_t*);
template void stats_planar<c10::Half>(const c10::Half*, int64_t, int64_t, int64_t, double*, double*, double*);
template void shift_from_rows<c10::BFloat16>(const c10::BFloat16*, int64_t, int64_t, int64_t, int64_t, int64_t, VecIO<c10::BFloat16>::acc_t*);
template void stats_rows_task<c10::BFloat16>(const c10::BFloat16*, int64_t, int64_t, int64_t, int64_t, int64_t, double*, double*, double*,
                                  const VecIO<c10::BFloat16>::acc_t*);
template void stats_planar<c10::BFloat16>(const c10::BFloat16*, int64_t, int64_t, int64_t, double*, double*, double*);

}  // namespace bnr_cpu
}  // namespace gankern
