// The one SIMD layer of gankern's CPU kernels (csrc/cpu/*.cpp), and the one place that chooses
// the CPU capability.  Include it FIRST in a CPU kernel file, before any ATen header.
//
// Capability.  ATen's at::vec::Vectorized<T> uses AVX2 / AVX-512 only when CPU_CAPABILITY_AVX2 /
// _AVX512 is defined (torch's own build compiles each kernel once per capability with the flags
// of that capability and picks one at run time); without it, it silently falls back to a slow
// generic version.  gankern's CPU kernels are compiled once, for the machine that builds them
// (-march=native, GANKERN_NATIVE in CMakeLists.txt), so the capability follows what the compiler
// targets, with ATen's definition of each capability:
//   AVX512  when the compiler targets AVX-512 F, BW, DQ, VL and FMA (ATen's AVX512 flags),
//   AVX2    else when it targets AVX2 and FMA (ATen's AVX2 flags),
//   DEFAULT (the generic Vectorized) otherwise (a portable build, GANKERN_NATIVE=OFF).
// GANKERN_CPU_NO_AVX512 (or the older GANKERN_BNR_NO_AVX512) caps it at AVX2, for comparisons.
// Vectorized lives in the inline namespace at::vec::<CPU_CAPABILITY>, and this layer in
// gankern::simd::<capability>: every translation unit gets the same choice, and none clashes
// with torch's own variants.
//
// Two kinds of helpers, on the same capability:
//   * at::vec level (BatchNorm+ReLU): VecIO<T> (loads / stores of T in its accumulation type,
//     full and partial vectors), fma_v (one rounding, also in the generic build), relu_v /
//     gate_v (torch's NaN rules), act_v / act_grad_v;
//   * policies (BCE): a policy O provides V, W, set1, load/store of float (or double),
//     c10::Half and c10::BFloat16, keep, min0, neg, lanes and the two transcendental pieces of
//     the loss.  FloatOps: our own float exp / log1p / sigmoid on AVX-512F (F32x16) or
//     AVX2+FMA+F16C (F32x8), GCC/Clang only, else AtenVec<float>; AtenVec<double> for fp64
//     (at::vec with SLEEF).  Sum<O>: a reduction's vector accumulator.
#pragma once

#if defined(CPU_CAPABILITY) && !defined(GANKERN_CPU_SIMD_CAPABILITY)
#error "gankern/cpu_simd.h chooses CPU_CAPABILITY: include it before any ATen header, and do not define CPU_CAPABILITY"
#endif
#if defined(GANKERN_BNR_NO_AVX512) && !defined(GANKERN_CPU_NO_AVX512)
#define GANKERN_CPU_NO_AVX512
#endif
#if !defined(CPU_CAPABILITY) && !defined(GANKERN_CPU_NO_AVX512) && defined(__AVX512F__) && \
    defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && defined(__FMA__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define GANKERN_CPU_SIMD_CAPABILITY avx512
#elif !defined(CPU_CAPABILITY) && defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define GANKERN_CPU_SIMD_CAPABILITY avx2
#elif !defined(CPU_CAPABILITY)
#define GANKERN_CPU_SIMD_CAPABILITY generic
#endif

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

// The float policies use GCC/Clang vector operators on __m256/__m512 (other compilers: AtenVec<float>).
#if defined(__GNUC__) && defined(__AVX512F__)
#define GANKERN_SIMD_F32 F32x16
#elif defined(__GNUC__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define GANKERN_SIMD_F32 F32x8
#endif

namespace gankern {
namespace simd {
inline namespace GANKERN_CPU_SIMD_CAPABILITY {

using at::vec::Vectorized;

// ================================================================================= at::vec level
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kVecRegs = 32;
#else
constexpr int kVecRegs = 16;
#endif

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
  // TAIL: a partial vector of n elements.
  template <bool TAIL>
  static V ld(const T* p, int64_t n) {
    if constexpr (TAIL) return load(p, n);
    else return load(p);
  }
  template <bool TAIL>
  static void st(T* p, const V& v, int64_t n) {
    if constexpr (TAIL) store(p, v, n);
    else store(p, v);
  }
  template <bool TAIL>
  static V ldp(const acc_t* p, int64_t n) {
    if constexpr (TAIL) return V::loadu(p, n);
    else return V::loadu(p);
  }
};

// a * b + c with one rounding.  With AVX2 / AVX-512 at::vec::fmadd is the fma instruction; the
// generic fallback computes a * b + c (two roundings), which would lose the accuracy the folded
// y = x * scale + shift relies on (|x * scale| >> |y| for data far from 0): use std::fma per lane.
template <typename V>
inline V fma_v(const V& a, const V& b, const V& c) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return at::vec::fmadd(a, b, c);
#else
  using T = typename V::value_type;
  alignas(64) T va[V::size()], vb[V::size()], vc[V::size()];
  a.store(va);
  b.store(vb);
  c.store(vc);
  for (int64_t i = 0; i < V::size(); ++i) va[i] = std::fma(va[i], vb[i], vc[i]);
  return V::loadu(va);
#endif
}

// max(pre, 0) propagating NaN (as torch.relu).
template <typename V>
inline V relu_v(const V& pre) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<V, Vectorized<float>>) return V(_mm512_max_ps(_mm512_setzero_ps(), pre));
  if constexpr (std::is_same_v<V, Vectorized<double>>) return V(_mm512_max_pd(_mm512_setzero_pd(), pre));
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<V, Vectorized<float>>) return V(_mm256_max_ps(_mm256_setzero_ps(), pre));
  if constexpr (std::is_same_v<V, Vectorized<double>>) return V(_mm256_max_pd(_mm256_setzero_pd(), pre));
#endif
  return at::vec::maximum(pre, V(0));
}

// g where the ReLU passes the gradient (!(pre <= 0), bnr::relu_passes), else 0.
template <typename V>
inline V gate_v(const V& pre, const V& g) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<V, Vectorized<float>>)
    return V(_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(pre, _mm512_setzero_ps(), _CMP_NLE_UQ), g));
  if constexpr (std::is_same_v<V, Vectorized<double>>)
    return V(_mm512_maskz_mov_pd(_mm512_cmp_pd_mask(pre, _mm512_setzero_pd(), _CMP_NLE_UQ), g));
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<V, Vectorized<float>>)
    return V(_mm256_and_ps(_mm256_cmp_ps(pre, _mm256_setzero_ps(), _CMP_NLE_UQ), g));
  if constexpr (std::is_same_v<V, Vectorized<double>>)
    return V(_mm256_and_pd(_mm256_cmp_pd(pre, _mm256_setzero_pd(), _CMP_NLE_UQ), g));
#endif
  return V::blendv(g, V(0), pre <= V(0));
}

// The activation (bnr::act): LEAKY = false is relu_v; LEAKY: pre > 0 ? pre : pre * slope (NaN
// propagates).  Its gradient (bnr::act_grad): gate_v, or pre > 0 ? g : g * slope.
template <bool LEAKY, typename V>
inline V act_v(const V& pre, const V& slope) {
  if constexpr (LEAKY) return V::blendv(pre * slope, pre, pre > V(0));
  else return relu_v(pre);
}
template <bool LEAKY, typename V>
inline V act_grad_v(const V& pre, const V& g, const V& slope) {
  if constexpr (LEAKY) return V::blendv(g * slope, g, pre > V(0));
  else return gate_v(pre, g);
}

// ================================================================================= policies
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

#if defined(GANKERN_SIMD_F32) && defined(__AVX512F__)
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
#elif defined(GANKERN_SIMD_F32)
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

#if defined(GANKERN_SIMD_F32)
using FloatOps = GANKERN_SIMD_F32;
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

// A reduction's accumulator over a policy's vectors: Sum<O>::T, zero(), add(acc, v) and
// lanes(acc, out) (kLanes values, added by the caller in lane order).  fp64 sums are kept in 4
// lanes (a 256-bit vector) whatever the vector width, so that the bits of an fp64 reduction are
// the same with AVX-512 as with AVX2 and the generic build (both 4 lanes of double): with 8-lane
// vectors each vector's lower half is added first, then its upper half, which is exactly the
// 4-lane order.
template <class O>
struct Sum {
  using T = typename O::V;
  static constexpr int64_t kLanes = O::W;
  static T zero() { return O::set1(0); }
  static void add(T& a, const typename O::V& v) { a = a + v; }
  template <typename A>
  static void lanes(const T& a, A* out) { O::lanes(a, out); }
};
#if defined(CPU_CAPABILITY_AVX512)
template <>
struct Sum<AtenVec<double>> {
  using T = __m256d;
  static constexpr int64_t kLanes = 4;
  static T zero() { return _mm256_setzero_pd(); }
  static void add(T& a, const Vectorized<double>& v) {
    const __m512d w = v;
    a = _mm256_add_pd(a, _mm512_castpd512_pd256(w));
    a = _mm256_add_pd(a, _mm512_extractf64x4_pd(w, 1));
  }
  static void lanes(const T& a, double* out) { _mm256_storeu_pd(out, a); }
};
#endif

}  // namespace GANKERN_CPU_SIMD_CAPABILITY
}  // namespace simd
}  // namespace gankern
