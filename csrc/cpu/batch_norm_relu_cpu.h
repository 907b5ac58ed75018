// Internal header of the BatchNorm + ReLU CPU kernels (csrc/cpu/batch_norm_relu_*.cpp):
//   batch_norm_relu_stats.cpp      per-channel statistics (training forward)
//   batch_norm_relu_normalize.cpp  y = act(x * scale + shift), the forward (training and eval)
//   batch_norm_relu_backward.cpp   the backward
// This header: layouts, parameters, the task runner, the rows partition, and the entry points of
// the statistics.
//
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
//
// The SIMD helpers (VecIO, fma_v, relu_v, gate_v, act_v, act_grad_v) and the CPU capability:
// gankern/cpu_simd.h (first include).
#pragma once
#include "gankern/cpu_simd.h"
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <type_traits>
#include "gankern/common.h"
#include "gankern/batch_norm_relu.h"

namespace gankern {
namespace bnr_cpu {

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

inline bool is_channels_last(const at::Tensor& x) {
  if (x.dim() == 4) return x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (x.dim() == 5) return x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return false;
}

// Returns x in a supported layout (a copy only for unusual strides) and its shape.
inline at::Tensor prepare(const at::Tensor& x_in, Shape& sh) {
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
inline at::Tensor match_layout(const at::Tensor& dy, const at::Tensor& x) {
  if (x.is_contiguous()) return dy.contiguous();
  if (x.dim() == 4) return dy.contiguous(at::MemoryFormat::ChannelsLast);
  return dy.contiguous(at::MemoryFormat::ChannelsLast3d);
}

// Channels [c0, c1) of a 1-D tensor of any floating dtype and stride, read as dst_t into out[c0, c1)
// (dflt when the tensor is undefined).
template <typename dst_t>
void read_param(const std::optional<at::Tensor>& t, int64_t c0, int64_t c1, dst_t dflt, dst_t* __restrict out) {
  if (!has_tensor(t)) {
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

inline bool go_parallel(int64_t total_elems, int64_t threshold) {
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
inline void invstd_from_var(const double* var, double eps, double* out, int64_t n) {
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

// ------------------------------------------------------------------ statistics (batch_norm_relu_stats.cpp)
// Instantiated for float, double, c10::Half and c10::BFloat16.
// The shifts of columns [c0, c1): the mean of rows [r_begin, r_begin + kShiftRows) (ks indexed from c0).
template <typename T>
void shift_from_rows(const T* __restrict x, int64_t C, int64_t r_begin, int64_t r_end, int64_t c0, int64_t c1,
                     typename VecIO<T>::acc_t* __restrict ks);
// Statistics of rows [r_begin, r_end) x columns [c0, c1) of the rows layout: mean, m2 and plain
// sum, indexed by channel.  shift: the shifts computed once for all row groups (indexed by
// channel), or nullptr: the mean of the task's first kShiftRows rows.
template <typename T>
void stats_rows_task(const T* __restrict x, int64_t C, int64_t r_begin, int64_t r_end, int64_t c0, int64_t c1,
                     double* __restrict am, double* __restrict a2, double* __restrict as,
                     const typename VecIO<T>::acc_t* __restrict shift);
// Fixed-order merge of the row groups' (mean, m2, plain sum) (group g at offset g * C) into group 0.
void merge_groups(const RowsPlan& P, double* pmean, double* pm2, double* psum);
// Statistics of the planar layout (N x C x S), per channel.
template <typename T>
void stats_planar(const T* x, int64_t N, int64_t C, int64_t S, double* mean_out, double* m2_out, double* sum_out);

}  // namespace bnr_cpu
}  // namespace gankern
