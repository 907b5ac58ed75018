// CPU kernels of the fused BCE-with-logits (the op itself: csrc/bce.cpp).
//
// One pass over the elements per direction, one vector of W elements at a time (fp16/bf16 are
// widened to float in registers and rounded back to nearest-even on store).  The math runs in
// float (double for fp64 inputs) through a small vector policy:
//   - F32x16 (AVX-512F) / F32x8 (AVX2+FMA+F16C): our own float exp, log1p and sigmoid (below),
//     <= 2 ulp where the result is a normal float; with SLEEF's u10 exp + log1p the fp32 forward
//     was compute-bound at ~6x the cost of these (Zen 4, 2^24 logits); now the backward runs at
//     the speed of a memory-bound elementwise op and the forward at ~2x that of reading x;
//   - AtenVec: at::vec::Vectorized with SLEEF exp/log1p, for fp64 and for float on machines
//     without AVX2 (portable path).
// Work is cut into fixed chunks of bce::kChunk elements; for reductions each chunk yields one
// partial sum (one vector accumulator, lanes added in a fixed order) and the partials are added
// in chunk order in double: bitwise reproducible, independent of the thread count.  Inputs below
// kParallelMin elements run inline on the calling thread (no parallel region, no allocation
// beyond the output), which is what GAN-sized losses (64..1024 logits) need.
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
#include <cstdint>
#include <cstring>
#include <type_traits>
#include "gankern/common.h"
#include "gankern/bce.h"
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

// The float policies use GCC/Clang vector operators on __m256/__m512 (other compilers: portable path).
#if defined(__GNUC__) && defined(__AVX512F__)
#define GANKERN_BCE_F32 F32x16
#elif defined(__GNUC__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define GANKERN_BCE_F32 F32x8
#endif

namespace gankern {
namespace {

using at::vec::Vectorized;
constexpr int64_t kParallelMin = 1 << 16;

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

// ------------------------------------------------------------------------------------------------
// Vector policies.  Each one provides: V, W, set1, load/store of float (or double), c10::Half and
// c10::BFloat16 (full vectors; partial ones go through loadn/storen below), keep(v, m) (lanes >= m
// zeroed), min0(x) = min(x, 0), neg, lanes(v, out), and the two transcendental pieces of the loss:
//   log1p_exp_negabs(x) = log1p(exp(-|x|))   (NaN -> NaN)
//   sigmoid(x)                                (0 at -inf, 1 at +inf, NaN -> NaN)
// ------------------------------------------------------------------------------------------------

// at::vec::Vectorized (SLEEF on AVX2): fp64, and the portable float path.
template <typename acc_t>
struct AtenVec {
  using V = Vectorized<acc_t>;
  static constexpr int64_t W = V::size();
  static V set1(acc_t a) { return V(a); }
  template <typename T>
  static V load(const T* p) {
    if constexpr (std::is_same_v<T, acc_t>) {
      return V::loadu(p);
    } else {
      acc_t b[W];
      for (int64_t j = 0; j < W; ++j) b[j] = static_cast<acc_t>(p[j]);
      return V::loadu(b);
    }
  }
  template <typename T>
  static void store(T* p, const V& v) {
    if constexpr (std::is_same_v<T, acc_t>) {
      v.store(p);
    } else {
      acc_t b[W];
      v.store(b);
      for (int64_t j = 0; j < W; ++j) p[j] = static_cast<T>(b[j]);
    }
  }
  static V keep(const V& v, int64_t m) { return V::set(V(0), v, m); }
  static V min0(const V& x) { return at::vec::minimum(x, V(0)); }
  static V neg(const V& x) { return x.neg(); }
  static V fnmadd(const V& a, const V& b, const V& c) { return c - a * b; }  // contracted to an FMA where available
  static void lanes(const V& v, acc_t* out) { v.store(out); }
  static V log1p_exp_negabs(const V& x) { return x.abs().neg().exp().log1p(); }
  static V sigmoid(const V& x) { return V(1) / (V(1) + x.neg().exp()); }
};

// The float math of the SIMD policies, written once over their primitives (GCC/Clang vector
// operators on __m256/__m512 plus fmadd/fnmadd/max/round/ldexp_or_zero/select_neg/abs).
namespace f32 {
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;     // 9 significant bits: n * kLn2Hi is exact for |n| < 2^15
constexpr float kLn2Lo = -2.12194440e-4f;  // ln 2 - kLn2Hi
constexpr float kExpMin = -87.33654f;      // ln(2^-126): exp(y) >= FLT_MIN above it

// exp(y) for y <= 0 (or NaN): n = round(y / ln 2), r = y - n ln 2 (Cody-Waite, two parts, |r| <=
// ln2 / 2), exp(r) = 1 + r + r^2 P(r) with P a degree-4 near-minimax fit (approximation error
// < 0.06 ulp), times 2^n.  Results below FLT_MIN (y < kExpMin = ln 2^-126 = -87.3365) are
// flushed to 0, -inf included: an absolute error < 1.2e-38, and no denormal ever enters the
// arithmetic (denormal results take a slow path: measured 2-3x on the whole kernel on Zen 4 for
// logits in the affected ranges; the SLEEF path had it for |x| in (87, 104)).  y is clamped to kExpMin first so that n stays in
// [-126, 0]; max(kExpMin, NaN) is NaN (x86 max returns its second operand when one is NaN), a NaN
// flows through every step, and the final flush keeps it (NaN < kExpMin is false).
template <class O>
inline typename O::V exp_nonpos(typename O::V y) {
  using V = typename O::V;
  const V lo = O::set1(kExpMin);
  const V yc = O::max(lo, y);
  const V n = O::round(yc * O::set1(kLog2e));
  V r = O::fnmadd(n, O::set1(kLn2Hi), yc);
  r = O::fnmadd(n, O::set1(kLn2Lo), r);
  V p = O::set1(1.381445560e-03f);
  p = O::fmadd(p, r, O::set1(8.368785493e-03f));
  p = O::fmadd(p, r, O::set1(4.166839644e-02f));
  p = O::fmadd(p, r, O::set1(1.666651964e-01f));
  p = O::fmadd(p, r, O::set1(4.999999404e-01f));
  p = O::fmadd(p, r * r, r) + O::set1(1.0f);
  return O::ldexp_or_zero(p, n, y, lo);  // y < kExpMin: 0
}

// log1p(u) for u = 0, u in [FLT_MIN, 1], or NaN: log1p(u) = 2 atanh(s), s = u / (2 + u) in
// [0, 1/3] (no rounding of 1 + u, so small u keep their relative accuracy), 2 atanh(s) =
// 2s + 2s z Q(z), z = s^2 <= 1/9, Q a degree-3 near-minimax fit of (atanh(s)/s - 1)/z (error
// < 0.1 ulp; the Taylor series needs two more terms for a comparable error).  Below 2s = 2^-40
// the cubic term is < 2^-80 relative: z is computed from max(2s, 2^-40) (else it underflows to a
// denormal: the slow path again), and 2s + 2s (z Q) is one FMA whose result is normal.
template <class O>
inline typename O::V log1p_01(typename O::V u) {
  using V = typename O::V;
  const V s2 = (u + u) / (u + O::set1(2.0f));  // 2s
  const V b = O::max(O::set1(0x1p-40f), s2);   // NaN stays NaN
  const V z = b * b;                           // 4 s^2: the coefficients below are Q's times 4^-(k+1)
  V q = O::set1(1.401222944e-01f / 256);
  q = O::fmadd(q, z, O::set1(1.399957091e-01f / 64));
  q = O::fmadd(q, z, O::set1(2.001084983e-01f / 16));
  q = O::fmadd(q, z, O::set1(3.333320618e-01f / 4));
  return O::fmadd(s2, z * q, s2);
}

template <class O>
inline typename O::V log1p_exp_negabs(typename O::V x) {
  return log1p_01<O>(exp_nonpos<O>(O::neg(O::abs(x))));
}

// sigmoid(x) = 1 / (1 + e) for x >= 0, e / (1 + e) for x < 0, e = exp(-|x|) (no overflow; 0 for
// x < -87.3, as torch's float sigmoid).
template <class O>
inline typename O::V sigmoid(typename O::V x) {
  using V = typename O::V;
  const V e = exp_nonpos<O>(O::neg(O::abs(x)));
  return O::select_neg(x, e, O::set1(1.0f)) / (e + O::set1(1.0f));
}
}  // namespace f32

#if defined(GANKERN_BCE_F32) && defined(__AVX512F__)
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's unmasked AVX-512 wrappers (_mm512_min_ps, _mm512_scalef_ps, ...) pass
// _mm512_undefined_ps() (`__m512 __Y = __Y;`) and trip -W(maybe-)uninitialized once inlined
// (GCC bug 105593): harmless, silenced for the calls made from this struct.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
struct F32x16 {
  using V = __m512;
  static constexpr int64_t W = 16;
  static V set1(float a) { return _mm512_set1_ps(a); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static V load(const c10::BFloat16* p) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store(c10::Half* p, V v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static void store(c10::BFloat16* p, V v) {
    // c10::BFloat16(float): round to nearest even, NaN -> 0x7FC0.
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static V keep(V v, int64_t m) { return _mm512_maskz_mov_ps(static_cast<__mmask16>((1u << m) - 1), v); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V min0(V x) { return _mm512_min_ps(x, _mm512_setzero_ps()); }
  static V abs(V x) { return _mm512_abs_ps(x); }
  static V neg(V x) { return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN))); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  static V round(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // y < lo (ordered: not for NaN) ? 0 : p * 2^n
  static V ldexp_or_zero(V p, V n, V y, V lo) { return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(y, lo, _CMP_NLT_UQ), p, n); }
  static V select_neg(V x, V a, V b) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), b, a);
  }
  static void lanes(V v, float* out) { _mm512_storeu_ps(out, v); }
  static V log1p_exp_negabs(V x) { return f32::log1p_exp_negabs<F32x16>(x); }
  static V sigmoid(V x) { return f32::sigmoid<F32x16>(x); }
};
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#elif defined(GANKERN_BCE_F32)
struct F32x8 {
  using V = __m256;
  static constexpr int64_t W = 8;
  static V set1(float a) { return _mm256_set1_ps(a); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static V load(const c10::BFloat16* p) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store(c10::Half* p, V v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static void store(c10::BFloat16* p, V v) {
    // c10::BFloat16(float): round to nearest even, NaN -> 0x7FC0.
    const __m256i b = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);  // values <= 0xFFFF
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  static V keep(V v, int64_t m) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(m)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_and_ps(v, _mm256_castsi256_ps(mask));
  }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V min0(V x) { return _mm256_min_ps(x, _mm256_setzero_ps()); }
  static V abs(V x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }
  static V neg(V x) { return _mm256_xor_ps(x, _mm256_set1_ps(-0.0f)); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  static V round(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // y < lo (ordered: not for NaN) ? 0 : p * 2^n, for integral n in [-126, 0] (2^n is a normal
  // float; NaN: p is NaN too).
  static V ldexp_or_zero(V p, V n, V y, V lo) {
    const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_andnot_ps(_mm256_cmp_ps(y, lo, _CMP_LT_OQ), p * _mm256_castsi256_ps(_mm256_slli_epi32(e, 23)));
  }
  static V select_neg(V x, V a, V b) { return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ)); }

  static void lanes(V v, float* out) { _mm256_storeu_ps(out, v); }
  static V log1p_exp_negabs(V x) { return f32::log1p_exp_negabs<F32x8>(x); }
  static V sigmoid(V x) { return f32::sigmoid<F32x8>(x); }
};
#endif

#if defined(GANKERN_BCE_F32)
using FloatOps = GANKERN_BCE_F32;
#else
using FloatOps = AtenVec<float>;
#endif
// The policy for an accumulation type: our float math for float (fp32, fp16, bf16 inputs), ATen's for double.
template <typename acc_t>
using OpsFor = std::conditional_t<std::is_same_v<acc_t, float>, FloatOps, AtenVec<acc_t>>;

// Partial vectors (the last < W elements of a tensor): through a zero-padded buffer.
template <class O, typename T>
inline typename O::V loadn(const T* p, int64_t m) {
  T b[O::W];
  for (int64_t j = 0; j < O::W; ++j) b[j] = j < m ? p[j] : T(0);
  return O::load(static_cast<const T*>(b));
}
template <class O, typename T>
inline void storen(T* p, const typename O::V& v, int64_t m) {
  T b[O::W];
  O::store(b, v);
  std::memcpy(p, b, m * sizeof(T));
}
template <class O, bool kFull, typename T>
inline typename O::V ld(const T* p, int64_t m) {
  if constexpr (kFull) return O::load(p);
  else return loadn<O>(p, m);
}
template <class O, bool kFull, typename T>
inline void st(T* p, const typename O::V& v, int64_t m) {
  if constexpr (kFull) O::store(p, v);
  else storen<O>(p, v, m);
}

// f(std::true_type, i, W) for each whole vector in [b, e), then f(std::false_type, i, e - i) for the rest.
template <class O, typename F>
inline void for_vectors(int64_t b, int64_t e, F&& f) {
  int64_t i = b;
  for (; i + O::W <= e; i += O::W) f(std::true_type{}, i, O::W);
  if (i < e) f(std::false_type{}, i, e - i);
}

// Loss of the vector at i (m <= W lanes valid).
template <class O, bool kFull, typename scalar_t, typename acc_t>
inline typename O::V loss_at(const scalar_t* x, const scalar_t* t, const Ctx<acc_t>& c, int64_t i, int64_t m) {
  using V = typename O::V;
  const V one = O::set1(acc_t(1));
  const V xv = ld<O, kFull>(x + i, m);
  const V tv = t ? ld<O, kFull>(t + i, m) : O::set1(c.t_s);
  const V ls = O::min0(xv) - O::log1p_exp_negabs(xv);  // log_sigmoid(x); NaN propagates
  V l;
  if (c.has_pw) {
    const V pwv = c.pw ? ld<O, kFull>(c.pw + i, m) : O::set1(c.pw_s);
    l = O::fnmadd((pwv - one) * tv + one, ls, (one - tv) * xv);  // one rounding of the product
  } else {
    l = (one - tv) * xv - ls;
  }
  if (c.w) l = l * ld<O, kFull>(c.w + i, m);
  else if (c.w_s != acc_t(1)) l = l * O::set1(c.w_s);
  return l;
}

template <typename scalar_t>
at::Tensor forward_impl(const bce::Operands& o, double ts, int64_t reduction) {
  using acc_t = at::opmath_type<scalar_t>;
  using O = OpsFor<acc_t>;
  using V = typename O::V;
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
      for_vectors<O>(c0 * bce::kChunk, std::min(N, c1 * bce::kChunk), [&](auto full, int64_t i, int64_t m) {
        constexpr bool kFull = decltype(full)::value;
        st<O, kFull>(y + i, loss_at<O, kFull>(x, t, c, i, m), m);
      });
    };
    if (N < kParallelMin) body(0, nchunks);
    else at::parallel_for(0, nchunks, 1, body);
    return out;
  }

  c10::SmallVector<double, 16> partial(nchunks);
  auto body = [&](int64_t c0, int64_t c1) {
    for (int64_t k = c0; k < c1; ++k) {
      V acc = O::set1(acc_t(0));
      for_vectors<O>(k * bce::kChunk, std::min(N, (k + 1) * bce::kChunk), [&](auto full, int64_t i, int64_t m) {
        constexpr bool kFull = decltype(full)::value;
        const V l = loss_at<O, kFull>(x, t, c, i, m);
        acc = acc + (kFull ? l : O::keep(l, m));
      });
      acc_t lanes[O::W];
      O::lanes(acc, lanes);
      double s = 0;
      for (int64_t l = 0; l < O::W; ++l) s += static_cast<double>(lanes[l]);
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
  using O = OpsFor<acc_t>;
  using V = typename O::V;
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
    for_vectors<O>(c0 * bce::kChunk, std::min(N, c1 * bce::kChunk), [&](auto full, int64_t i, int64_t m) {
      constexpr bool kFull = decltype(full)::value;
      const V one = O::set1(acc_t(1));
      const V xv = ld<O, kFull>(x + i, m);
      const V tv = t ? ld<O, kFull>(t + i, m) : O::set1(c.t_s);
      V scale = gp ? ld<O, kFull>(gp + i, m) : O::set1(g_s);
      if (c.w) scale = scale * ld<O, kFull>(c.w + i, m);
      else if (c.w_s != acc_t(1)) scale = scale * O::set1(c.w_s);
      const V s = O::sigmoid(xv);  // 0 at -inf, NaN at NaN
      V d;
      V pwv = one;
      if (c.has_pw) {
        pwv = c.pw ? ld<O, kFull>(c.pw + i, m) : O::set1(c.pw_s);
        const V pt = pwv * tv;
        d = (pt + one - tv) * s - pt;
      } else {
        d = s - tv;
      }
      st<O, kFull>(gxp + i, d * scale, m);
      if (need_t) {
        V dt;
        if (c.has_pw) {
          // log_sigmoid(-x) - pw * log_sigmoid(x); both share log1p(exp(-|x|)).
          const V sp = O::log1p_exp_negabs(xv);
          dt = (O::min0(O::neg(xv)) - sp) - pwv * (O::min0(xv) - sp);
        } else {
          dt = O::neg(xv);
        }
        st<O, kFull>(gtp + i, dt * scale, m);
      }
    });
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
