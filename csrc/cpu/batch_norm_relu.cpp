// CPU kernels of the fused BatchNorm + ReLU (see csrc/batch_norm_relu.cpp for the op).
//
// Two memory layouts, chosen from the input without copying when possible:
//   rows   : M rows of C contiguous channels -- (N, C) inputs and channels-last (N, H, W, C);
//            vectorized across channels.
//   planar : N x C x S, S > 1 contiguous values per (n, c) -- (N, C, L), (N, C, H, W);
//            vectorized along S.
// Any other strides are made contiguous first (as torch does, the output is then contiguous).
//
// Forward (training): per-channel statistics, then y = max(fma(x, scale, shift), 0).  The
// statistics are numerically safe (no E[x^2] - E[x]^2 cancellation): one pass around a per-channel
// shift with an accuracy check, falling back to an exact two-pass per tile merged with Chan's
// update (see "statistics" below).  Every reduction follows a partition that depends only on the
// shape, never on the thread count, and is merged in a fixed order: results are bitwise
// reproducible.
// Backward: one pass for sum(g) and sum(g * (x - mean)) per channel (g = dy gated by the ReLU
// mask, recomputed from x with the forward's fma), one elementwise pass for dx.
// Rows layout: when a column block's data fits in a core's L2, a task does both passes of a block
// (the second one then reads from cache; channels are independent); otherwise the two passes run
// one after the other over the same (row group, column block) tasks.
//
// The SIMD helpers (VecIO, fma_v, relu_v, gate_v, act_v, act_grad_v) and the CPU capability:
// gankern/cpu_simd.h (first include).
#include "gankern/cpu_simd.h"
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <type_traits>
#include "gankern/common.h"
#include "gankern/batch_norm_relu.h"

namespace gankern {

namespace {

using namespace simd;  // VecIO, fma_v, relu_v, gate_v, act_v, act_grad_v, kVecRegs, Vectorized

// f(std::bool_constant<B>) for a runtime bool.
template <typename F>
inline void with_bool(bool b, F&& f) {
  if (b) f(std::true_type());
  else f(std::false_type());
}

// Calls f(std::integral_constant<int, K>, std::bool_constant<TAIL>, c, n) over the columns
// [c_begin, c_end) in chunks of K vectors of W lanes: KMAX-vector chunks, then single vectors,
// then one partial vector of n < W lanes (TAIL).
template <int KMAX, typename F>
inline void for_chunks(int64_t c_begin, int64_t c_end, int64_t W, F&& f) {
  int64_t c = c_begin;
  for (; c + KMAX * W <= c_end; c += KMAX * W) f(std::integral_constant<int, KMAX>(), std::false_type(), c, W);
  for (; c + W <= c_end; c += W) f(std::integral_constant<int, 1>(), std::false_type(), c, W);
  if (c < c_end) f(std::integral_constant<int, 1>(), std::true_type(), c, c_end - c);
}

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

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Channels [c0, c1) of a 1-D tensor of any floating dtype and stride, read as dst_t into out[c0, c1)
// (dflt when the tensor is undefined).
template <typename dst_t>
void read_param(const std::optional<at::Tensor>& t, int64_t c0, int64_t c1, dst_t dflt, dst_t* __restrict out) {
  if (!has(t)) {
    std::fill(out + c0, out + c1, dflt);
    return;
  }
  const int64_t st = t->stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t->scalar_type(), "bnr_read_param", [&] {
    const scalar_t* __restrict p = t->const_data_ptr<scalar_t>();
    if (st == 1) {
      for (int64_t c = c0; c < c1; ++c) out[c] = static_cast<dst_t>(p[c]);
    } else {
      for (int64_t c = c0; c < c1; ++c) out[c] = static_cast<dst_t>(p[c * st]);
    }
  });
}

template <typename src_t>
void write_param(const at::Tensor& t, int64_t c0, int64_t c1, const src_t* __restrict v) {
  const int64_t st = t.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "bnr_write_param", [&] {
    scalar_t* __restrict p = t.mutable_data_ptr<scalar_t>();
    if (st == 1) {
      for (int64_t c = c0; c < c1; ++c) p[c] = static_cast<scalar_t>(v[c]);
    } else {
      for (int64_t c = c0; c < c1; ++c) p[c * st] = static_cast<scalar_t>(v[c]);
    }
  });
}

// Below this many elements a pass stays on the calling thread (a parallel region costs a few us):
// passes that reduce (or reduce then run the elementwise pass), and elementwise-only passes.
constexpr int64_t kParMin = 32768;
constexpr int64_t kParMinElementwise = 2 * kParMin;

bool go_parallel(int64_t total_elems, int64_t threshold) {
  return total_elems >= threshold && at::get_num_threads() > 1 && !at::in_parallel_region();
}

// Runs f(t0, t1) over the tasks [0, n): on this thread when the pass is small, else split in
// contiguous ranges (at::parallel_for's static split: two calls with the same n give every
// thread the same tasks, so a second pass over the same data finds it in that core's cache).
template <typename F>
void run_tasks(int64_t n, int64_t total_elems, const F& f) {
  if (n <= 0) return;
  if (n == 1 || !go_parallel(total_elems, kParMin)) f(0, n);
  else at::parallel_for(0, n, 1, f);
}

// Elementwise passes over rows [0, M) of C values: every thread gets >= kParMinElementwise / 2 elements.
template <typename F>
void run_rows(int64_t M, int64_t C, const F& f) {
  if (M <= 0) return;
  if (!go_parallel(M * C, kParMinElementwise)) f(0, M);
  else at::parallel_for(0, M, std::max<int64_t>(1, (kParMinElementwise / 2) / std::max<int64_t>(1, C)), f);
}

// 1 / sqrt(v + eps), vectorized (std::sqrt in a plain loop is not: errno).
void invstd_from_var(const double* var, double eps, double* out, int64_t n) {
  using VD = Vectorized<double>;
  constexpr int64_t W = VD::size();
  const VD one(1.0), ve(eps);
  int64_t c = 0;
  for (; c + W <= n; c += W) (one / (VD::loadu(var + c) + ve).sqrt()).store(out + c);
  if (c < n) (one / (VD::loadu(var + c, n - c) + ve).sqrt()).store(out + c, n - c);
}

// ------------------------------------------------------------------ rows layout: partition
// A function of the shape only (never of the thread count), so results are bitwise reproducible:
// column blocks of `width` channels x row groups of whole tiles of kTileRows rows.
//   fused: a task is one column block over all rows; it computes the block's statistics and
//     then runs the elementwise pass over the same block, while its data is still in this core's
//     L2 (chosen only when the block's data fits, see RowsPlan).  Channels are independent, so no
//     other synchronization is needed.
//   otherwise: blocks of whole rows (up to kMaxWidth channels), rows split in groups when that
//     gives too few tasks; statistics per (group, block) task, groups merged in a fixed order,
//     then the elementwise pass over the same tasks (at::parallel_for's static split gives every
//     thread the same tasks in both passes).
constexpr int64_t kTileRows = 64;  // float partial sums over at most this many rows
constexpr int64_t kSweepRows = 8;  // rows per sweep of a reduction over a column block
// Elementwise passes: rows of >= 4 KB (one page each) are processed kEwRows at a time with the
// coefficients of a column chunk in registers; shorter rows one at a time (several rows of one page
// interleaved defeat the hardware prefetchers), the coefficients then come from L1.
constexpr int64_t kEwRows = 4;
// (cached: the caller knows the data is in this core's cache, so the pass is bound by the core)
inline int64_t ew_rows(int64_t C, int64_t elem_bytes, bool cached) {
  return cached || C * elem_bytes >= 4096 ? kEwRows : 1;
}
constexpr int64_t kColGrain = 64;  // block widths are multiples of this
constexpr int64_t kMaxFusedWidth = 256;
// Not fused, blocks are whole rows up to this many channels: the passes then stream through memory
// (bands of a few hundred bytes of long rows would revisit every DRAM page once per band).
constexpr int64_t kMaxWidth = 1024;
constexpr int64_t kMinTasks = 8;
// Row groups of at least this many rows (their per-channel work -- shifts, merges -- amortized):
// forward statistics, and the backward sums (cheaper per channel).
constexpr int64_t kMinGroupRowsFwd = 256;
constexpr int64_t kMinGroupRowsBwd = 128;
constexpr int64_t kL2Budget = 384 * 1024;  // bytes of input per column block (fused)
constexpr int64_t kL2Bytes = 1024 * 1024;  // a typical L2 (this one: 1 MB, 8 ways)
constexpr int64_t kWaySpan = kL2Bytes / 8;  // bytes of one way

struct RowsPlan {
  int64_t M, C, width, ncb, ntiles, tpg, ngroups;
  bool fused;
  // elem_bytes: sizeof(T); arrays: inputs read twice (1 forward: x; 2 backward: x and dy)
  RowsPlan(int64_t M_, int64_t C_, int64_t elem_bytes, int64_t arrays, int64_t min_group_rows) : M(M_), C(C_) {
    auto round_up = [](int64_t v) { return (v + kColGrain - 1) / kColGrain * kColGrain; };
    const bool par = M * C >= kParMin;
    const int64_t w_tasks = round_up((C + kMinTasks - 1) / kMinTasks);
    const int64_t per_col = std::max<int64_t>(1, M * elem_bytes * arrays);  // bytes of a column of the block
    width = std::max(kColGrain, std::min({kL2Budget / per_col / kColGrain * kColGrain, w_tasks, kMaxFusedWidth}));
    ncb = (C + width - 1) / width;
    // Does the block stay in cache?  Rows r * row_bytes apart only fall on
    // kWaySpan / gcd(row_bytes, kWaySpan) distinct offsets of a cache way: with a power-of-two row
    // size a narrow block can use a small fraction of the cache (e.g. 1/16 for 256 B of 4 KB rows).
    const int64_t row_bytes = C * elem_bytes;
    const int64_t offsets = kWaySpan / std::gcd(row_bytes, kWaySpan);
    const double frac = std::min(1.0, double(offsets) * double(width * elem_bytes) / double(kWaySpan));
    const double bytes = double(per_col * width);
    fused = bytes <= double(kL2Budget) && bytes <= frac * double(kL2Bytes) && (ncb >= 2 || !par);
    if (!fused) {  // blocks do not stay in cache (or too few): wide blocks, rows split in groups
      width = std::min(kMaxWidth, round_up(C));
      ncb = (C + width - 1) / width;
    }
    ntiles = (M + kTileRows - 1) / kTileRows;
    int64_t want = 1;
    if (!fused && par) want = std::max<int64_t>(1, std::min((kMinTasks + ncb - 1) / ncb, M / min_group_rows));
    tpg = std::max<int64_t>(1, (ntiles + want - 1) / want);
    ngroups = std::max<int64_t>(1, (ntiles + tpg - 1) / tpg);  // every group non-empty
  }
  int64_t ntasks() const { return ngroups * ncb; }
  int64_t c0(int64_t t) const { return (t % ncb) * width; }
  int64_t c1(int64_t t) const { return std::min(C, c0(t) + width); }
  int64_t r0(int64_t t) const { return std::min(M, (t / ncb) * tpg * kTileRows); }
  int64_t r1(int64_t t) const { return std::min(M, (t / ncb + 1) * tpg * kTileRows); }
  int64_t group(int64_t t) const { return t / ncb; }
};

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
      const double tm = double(bm[j]) + corr * inv;
      const double t2 = std::max(0.0, double(bq[j]) - corr * corr * inv);
      if (n_acc == 0) {
        am[j] = tm;
        a2[j] = t2;
        as[j] = double(bs[j]);
      } else {
        const double delta = tm - am[j];
        am[j] = am[j] + delta * f;
        a2[j] = a2[j] + (t2 + delta * delta * nf);
        as[j] = as[j] + double(bs[j]);
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
  const int64_t nc = c1 - c0, rows = r_end - r_begin;
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
    sa += tsum;
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
    bnr::chan_merge(na, ma, qa, cnt, double(m) + corr / cnt, std::max(0.0, q - corr * corr / cnt));
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
  const bool update = training && has(running_mean);
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
  TORCH_CHECK(input.device().is_cpu(), "batch_norm_relu (cpu kernel): input must be a CPU tensor");
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

// ------------------------------------------------------------------ backward
// Per-channel sums of g and g * (x - mean), with g = dy where the ReLU is open (the mask
// recomputed from x with the forward's fma); then dx = k1 * g + k3 * (x - mean) + k2.
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

// TRAIN: dx = g * k1 + (x - mean) * k3 + k2; evaluation: dx = g * k1 only (k2 = k3 = 0 there, and
// (x - mean) * 0 would turn an infinite x into a NaN gradient where torch's is finite).
template <bool LEAKY, bool TRAIN, typename V>
inline V dx_one(const V& xv, const V& gv, const V& mv, const V& sc, const V& sf, const V& a1, const V& a2,
                const V& a3, const V& sl) {
  const V g = act_grad_v<LEAKY>(fma_v(xv, sc, sf), gv, sl);
  if constexpr (TRAIN) return fma_v(g, a1, fma_v(xv - mv, a3, a2));
  else return g * a1;
}

template <typename T, bool LEAKY, bool TRAIN>
void dx_block(const T* __restrict dy, const T* __restrict x, T* __restrict dx, int64_t C, int64_t rb, int64_t re,
              int64_t c0, int64_t c1, const typename VecIO<T>::acc_t* __restrict mean,
              const typename VecIO<T>::acc_t* __restrict scale, const typename VecIO<T>::acc_t* __restrict shift,
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
      V mv[K], sc[K], sf[K], a1[K], a2[K], a3[K];
      for (int k = 0; k < K; ++k) {
        mv[k] = IO::template ldp<TAIL>(mean + c + k * W, nl);
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
                                                     IO::template ld<TAIL>(pg + k * W, nl), mv[k], sc[k], sf[k],
                                                     a1[k], a2[k], a3[k], sl),
                                nl);
    });
  }
}

template <typename T, bool LEAKY, bool TRAIN>
void dx_planar(const T* __restrict dy, const T* __restrict x, T* __restrict dx, int64_t C, int64_t S, int64_t i0,
               int64_t i1, const typename VecIO<T>::acc_t* __restrict mean,
               const typename VecIO<T>::acc_t* __restrict scale, const typename VecIO<T>::acc_t* __restrict shift,
               const typename VecIO<T>::acc_t* __restrict k1, const typename VecIO<T>::acc_t* __restrict k2,
               const typename VecIO<T>::acc_t* __restrict k3, typename VecIO<T>::acc_t slope) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  const V sl(slope);
  constexpr int64_t W = IO::W;
  int64_t c = i0 % C;
  for (int64_t i = i0; i < i1; ++i, c = c + 1 == C ? 0 : c + 1) {
    const V mv(mean[c]), sc(scale[c]), sf(shift[c]), a1(k1[c]), a2(k2[c]), a3(k3[c]);
    const T* px = x + i * S;
    const T* pg = dy + i * S;
    T* pd = dx + i * S;
    int64_t s = 0;
    for (; s + W <= S; s += W)
      IO::store(pd + s, dx_one<LEAKY, TRAIN>(IO::load(px + s), IO::load(pg + s), mv, sc, sf, a1, a2, a3, sl));
    if (s < S)
      IO::store(pd + s,
                dx_one<LEAKY, TRAIN>(IO::load(px + s, S - s), IO::load(pg + s, S - s), mv, sc, sf, a1, a2, a3, sl),
                S - s);
  }
}

// dw = sgd * invstd; dx = k1 * g + k3 * (x - mean) + k2 with k1 = w * invstd and, in training,
// k2 = -k1 * sg / M, k3 = -k1 * invstd^2 * sgd / M (sg = sum(g), sgd = sum(g * (x - mean))).
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
    k3[j] = training ? static_cast<acc_t>(-a * is * is * sgd[j] * inv_M) : acc_t(0);
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
      dx_planar<T, LEAKY, TRAIN>(dy, x, dx, C, S, i0, i1, mean, scale, shift, k1, k2, k3, slope);
    });
  } else if (P.fused) {
    run_tasks(P.ntasks(), M * C, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c0 = P.c0(t), c1 = P.c1(t);
        bwd_sums_task<T, LEAKY>(dy, x, C, 0, M, c0, c1, mean, scale, shift, p1, p2, slope);
        coef(c0, c1);
        dx_block<T, LEAKY, TRAIN>(dy, x, dx, C, 0, M, c0, c1, mean, scale, shift, k1, k2, k3, true, slope);
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
        dx_block<T, LEAKY, TRAIN>(dy, x, dx, C, P.r0(t), P.r1(t), P.c0(t), P.c1(t), mean, scale, shift, k1, k2, k3,
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
  TORCH_CHECK(input.dim() >= 2, "batch_norm_relu backward: input must have at least 2 dimensions");
  TORCH_CHECK_VALUE(negative_slope >= 0 && std::isfinite(negative_slope),
                    "batch_norm_leaky_relu: negative_slope must be a finite float >= 0, got ", negative_slope);
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
}  // namespace gankern

TORCH_LIBRARY_IMPL(gankern, CPU, m) {
  m.impl("_batch_norm_relu_fwd", &gankern::bnr_fwd_cpu);
  m.impl("_batch_norm_relu_bwd", &gankern::bnr_bwd_cpu);
}
