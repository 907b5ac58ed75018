// CPU kernels of gankern::_linear_leaky_relu_fwd / _bwd.
//
// Forward (fp32):   oneDNN inner product with bias + LeakyReLU post-ops on the fp32 accumulator
//                   (one call, no second pass), for GEMMs above kOneDnnMinMacs; else (and without
//                   oneDNN, and for fp64) MKL GEMM (at::cpu::mm_out) then ONE fused pass
//                   out = leaky_relu(out + bias) (parallel over rows, vectorized over columns).
//           float16/bfloat16: one of two GEMM paths, chosen per dtype by half_gemm_path() below:
//           "native": oneDNN's reduced-precision inner product (bf16/fp16 operands, fp32 accumulator,
//           bias + LeakyReLU as post-ops on the accumulator, rounded once; AMX where present), used
//           when the CPU has dot-product units for that dtype (avx512_bf16 / amx_bf16, avx512_fp16 /
//           amx_fp16) and the GEMM is not tiny; "fp32": the operands are widened to fp32, the GEMM
//           accumulates in fp32 and the epilogue runs on the fp32 accumulator, rounding once.
// Backward: ONE pass dZ = dY * (s > 0 ? 1 : slope) fused with the bias gradient (column sums,
//           fp32/fp64 accumulators, parallel over column blocks: no reduction across threads), then
//           the GEMMs dX = dZ W (oneDNN for fp32 above the threshold, else MKL) and dW = dZ^T X (MKL)
//           (half inputs: "fp32" path: fp32 dZ and GEMMs, rounded once; "native" path: dZ rounded
//           to the input dtype, as autocast's backward does, then oneDNN's reduced-precision GEMMs).
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <c10/core/GradMode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cpu/Utils.h>
#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#include "gankern/common.h"
#include "gankern/linear_leaky_relu.h"

namespace gankern {
namespace llr {
namespace {

const char* kFwd = "gankern._linear_leaky_relu_fwd";

// GEMM engine for fp32.  torch's CPU build ships oneDNN; its fused inner product
// (mkldnn::_linear_pointwise, which torch.compile's CPU backend uses for Linear+pointwise fusion)
// applies bias + LeakyReLU as post-ops on the fp32 accumulator, inside the GEMM, so there is no
// second pass over the output, and its fp32 kernels run ~10% faster than MKL's sgemm on the
// machines we measured (AVX-512).  Used for the forward and for dX = dZ W; dW = dZ^T X stays on
// MKL (no gain measured).  Missing oneDNN (torch built without it) -> MKL GEMM + one fused pass.
// GANKERN_LLR_GEMM=mkl forces the MKL path (read per call: A/B comparisons in one process).
using LinearPointwise = c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                            const std::optional<at::Tensor>&, c10::string_view,
                                                            c10::List<std::optional<c10::Scalar>>,
                                                            std::optional<c10::string_view>)>;
// Below ~32M multiply-adds oneDNN's per-call set-up (primitive cache lookup, memory descriptors,
// ~10 us) costs more than it saves, and MKL there runs the backward's two GEMMs at the same time
// (see concurrent_bwd_gemms).  Measured fwd+bwd, 2 threads: 256x256->128 oneDNN 403 us, MKL 364 us;
// 128x512->256 655 / 628 us; 256x512->256 (2^25) equal; 128x784->512 oneDNN 1653, MKL 1792 us.
constexpr int64_t kOneDnnMinMacs = int64_t(1) << 25;

const LinearPointwise* linear_pointwise_op() {
  static const LinearPointwise* op = []() -> const LinearPointwise* {
    if (!at::hasMKLDNN()) return nullptr;
    auto h = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!h.has_value() || !h->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return nullptr;
    return new LinearPointwise(h->typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                   const std::optional<at::Tensor>&, c10::string_view,
                                                   c10::List<std::optional<c10::Scalar>>,
                                                   std::optional<c10::string_view>)>());
  }();
  return op;
}

const LinearPointwise* onednn_linear(int64_t M, int64_t N, int64_t K) {
  if (M <= 0 || N <= 0 || K <= 0 || M * N * K < kOneDnnMinMacs) return nullptr;
  const char* e = std::getenv("GANKERN_LLR_GEMM");
  if (e != nullptr && std::strcmp(e, "mkl") == 0) return nullptr;
  return linear_pointwise_op();
}

// ---- GEMM path for float16 / bfloat16 -----------------------------------------------------------
// "native" (reduced-precision oneDNN GEMMs, fp32 accumulation) when the CPU reports dot-product
// units for the dtype -- bf16: avx512_bf16 or amx_bf16; fp16: avx512_fp16 or amx_fp16 (cpuinfo, as
// torch.backends.cpu / torch._C._cpu._get_cpu_capability() report them) -- and oneDNN is there;
// else "fp32" (widened operands).  Measured (README, "Reduced precision on CPU"): AMD Zen with
// avx512_bf16 and no AMX, 1 thread, the GAN layers at batch 128-256: the bf16 inner product 1.6-3.6x
// faster than fp32's and 2.6-8x faster than widening; below ~2^18 multiply-adds (e.g. 256x128->1)
// oneDNN's per-call set-up dominates and the widened fp32 GEMM wins, so those stay on "fp32".
// Without the units oneDNN has no fp16 inner product at all (it refuses the primitive) and its bf16
// one emulates the dot products.
// GANKERN_LLR_HALF_GEMM=native|fp32 forces a path (read per call: tests and A/B comparisons);
// forcing "native" on a CPU without the units is an error, not a silent slow path.
constexpr int64_t kNativeMinMacs = int64_t(1) << 18;

bool cpu_has_units(at::ScalarType st) {
  static const std::array<bool, 2> has = [] {
    const auto caps = at::cpu::get_cpu_capabilities();
    auto flag = [&](const char* k) {
      auto it = caps.find(k);
      return it != caps.end() && it->second.isBool() && it->second.toBool();
    };
    return std::array<bool, 2>{flag("avx512_bf16") || flag("amx_bf16"), flag("avx512_fp16") || flag("amx_fp16")};
  }();
  return st == at::kBFloat16 ? has[0] : st == at::kHalf ? has[1] : false;
}

// "native", "fp32", or "auto" (no/unknown override).
const char* half_gemm_override() {
  const char* e = std::getenv("GANKERN_LLR_HALF_GEMM");
  if (e == nullptr || *e == '\0' || std::strcmp(e, "auto") == 0) return "auto";
  if (std::strcmp(e, "native") == 0) return "native";
  if (std::strcmp(e, "fp32") == 0) return "fp32";
  TORCH_CHECK(false, "GANKERN_LLR_HALF_GEMM must be auto, native or fp32; got '", e, "'");
}

// The path for a (M, K) x (K, N) GEMM of dtype st (float16/bfloat16); M*N*K == -1: the path for
// GAN-sized GEMMs (for gankern's report).
bool half_gemm_native(at::ScalarType st, int64_t M, int64_t N, int64_t K) {
  const char* o = half_gemm_override();
  const bool ok = linear_pointwise_op() != nullptr && cpu_has_units(st);
  if (std::strcmp(o, "native") == 0) {
    TORCH_CHECK(ok, "GANKERN_LLR_HALF_GEMM=native: no native ", st == at::kHalf ? "float16" : "bfloat16",
                " GEMM on this CPU (it reports no ", st == at::kHalf ? "avx512_fp16/amx_fp16" : "avx512_bf16/amx_bf16",
                at::hasMKLDNN() ? "" : ", and torch has no oneDNN", "); unset it or use GANKERN_LLR_HALF_GEMM=fp32");
    return true;
  }
  if (std::strcmp(o, "fp32") == 0) return false;
  return ok && (M < 0 || M * N * K >= kNativeMinMacs);
}

std::string half_gemm_path(at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16,
              "gankern._linear_leaky_relu_cpu_gemm: dtype must be float16 or bfloat16; got ", dtype);
  return half_gemm_native(dtype, -1, -1, -1) ? "native" : "fp32";
}

const char* kBwd = "gankern._linear_leaky_relu_bwd";

int64_t rows_of(const at::Tensor& input) {
  return c10::multiply_integers(input.sizes().slice(0, input.dim() - 1));
}

std::vector<int64_t> out_shape(const at::Tensor& input, int64_t N) {
  auto s = input.sizes().vec();
  s.back() = N;
  return s;
}

// out[i, j] = leaky(acc[i, j] + bias[j]);  acc may alias out (in place), acc_t = float or double.
template <typename out_t, typename acc_t, typename src_t = acc_t>
void epilogue(out_t* out, const src_t* acc, const acc_t* bias, int64_t M, int64_t N, acc_t slope) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const src_t* a = acc + i * N;
      out_t* o = out + i * N;
      if (bias != nullptr) {
        for (int64_t j = 0; j < N; ++j) o[j] = static_cast<out_t>(leaky_relu<acc_t>(static_cast<acc_t>(a[j]) + bias[j], slope));
      } else {
        for (int64_t j = 0; j < N; ++j) o[j] = static_cast<out_t>(leaky_relu<acc_t>(static_cast<acc_t>(a[j]), slope));
      }
    }
  });
}

// y (M, N) = act(x (M, K) @ w^T + b) with oneDNN; act = leaky_relu(slope), or none when slope == 1.
at::Tensor onednn_fwd(const LinearPointwise& op, const at::Tensor& x2, const at::Tensor& w,
                      const at::Tensor& b, double slope) {
  const std::optional<at::Tensor> bias = b.defined() ? std::optional<at::Tensor>(b) : std::nullopt;
  c10::List<std::optional<c10::Scalar>> scalars;
  if (slope == 1.0) return op.call(x2, w, bias, "none", scalars, std::nullopt);
  if (slope == 0.0) {  // oneDNN's ReLU turns NaN into 0; torch keeps NaN: our own pass
    at::Tensor y = op.call(x2, w, bias, "none", scalars, std::nullopt);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "llr_relu_pass", [&] {
      scalar_t* p = y.data_ptr<scalar_t>();  // ReLU of the rounded value == rounded ReLU
      epilogue<scalar_t, float, scalar_t>(p, p, nullptr, y.size(0), y.size(1), 0.0f);
    });
    return y;
  }
  scalars.push_back(c10::Scalar(slope));
  return op.call(x2, w, bias, "leaky_relu", scalars, std::nullopt);
}

at::Tensor fwd_cpu(const at::Tensor& input_, const at::Tensor& weight_, const std::optional<at::Tensor>& bias_opt,
                   double slope) {
  GANKERN_NO_AUTOCAST();
  check_args(input_, weight_, opt_tensor(bias_opt), kFwd);
  TORCH_INTERNAL_ASSERT(input_.device().is_cpu(), kFwd, ": the CPU kernel got ", input_.device());  // the dispatcher's choice
  // any strides torch accepts: dense operands for the GEMM paths below (oneDNN reads raw strides)
  const at::Tensor input = dense(input_), weight = dense_or_transposed(weight_);
  const at::Tensor bias = dense(opt_tensor(bias_opt));
  const int64_t N = weight.size(0), K = weight.size(1), M = rows_of(input);
  const at::Tensor x2 = input.reshape({M, K});
  const auto st = input.scalar_type();
  if (st == at::kFloat) {
    if (const LinearPointwise* op = onednn_linear(M, N, K)) return onednn_fwd(*op, x2, weight, bias, slope).view(out_shape(input, N));
  } else if (st != at::kDouble && half_gemm_native(st, M, N, K)) {  // reduced precision, native GEMM
    return onednn_fwd(*linear_pointwise_op(), x2, weight, bias, slope).view(out_shape(input, N));
  }
  at::Tensor out = new_empty(out_shape(input, N), input.options());
  if (out.numel() == 0) return out;
  at::Tensor out2 = out.view({M, N});
  if (st == at::kFloat || st == at::kDouble) {
    AT_DISPATCH_FLOATING_TYPES(st, "llr_fwd_cpu", [&] {
      const at::Tensor b = bias.defined() ? bias.contiguous() : at::Tensor();
      const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
      at::cpu::mm_out(out2, x2, weight.t());
      if (b.defined() || slope != 1.0) {
        scalar_t* o = out2.data_ptr<scalar_t>();
        epilogue<scalar_t, scalar_t>(o, o, bp, M, N, static_cast<scalar_t>(slope));
      }
    });
  } else {  // float16 / bfloat16: fp32 GEMM + epilogue on the fp32 accumulator
    at::Tensor acc = at::mm(x2.to(at::kFloat), weight.to(at::kFloat).t());
    const at::Tensor b = bias.defined() ? bias.to(at::kFloat).contiguous() : at::Tensor();
    AT_DISPATCH_REDUCED_FLOATING_TYPES(st, "llr_fwd_cpu_half", [&] {
      epilogue<scalar_t, float>(out2.data_ptr<scalar_t>(), acc.const_data_ptr<float>(),
                                b.defined() ? b.const_data_ptr<float>() : nullptr, M, N, static_cast<float>(slope));
    });
  }
  return out;
}

// Small GEMMs scale poorly over threads (128x256 @ 256x128: ~85 us on one thread, ~60 us on two),
// so when the backward needs both dX and dW on MKL and they are small, the two run at the same
// time, one per thread (MKL runs single-threaded inside a parallel region).  Each GEMM's result
// does not depend on the thread count then.  GANKERN_LLR_BWD_CONCURRENT=0 turns this off (read
// per call: A/B comparisons in one process).
constexpr int64_t kConcurrentMaxMacs = kOneDnnMinMacs;

bool concurrent_bwd_gemms(int64_t M, int64_t N, int64_t K) {
  if (at::get_num_threads() < 2 || at::in_parallel_region() || M * N * K >= kConcurrentMaxMacs) return false;
  const char* e = std::getenv("GANKERN_LLR_BWD_CONCURRENT");
  return !(e != nullptr && std::strcmp(e, "0") == 0);
}

// dz[i, j] = g[i, j] * (s[i, j] > 0 ? 1 : slope); db[j] = sum_i dz[i, j] (if db != nullptr).
// dz == nullptr (slope 1: dZ is dY itself): only the column sums.
template <typename in_t, typename dz_t, typename acc_t>
void dz_colsum(const in_t* __restrict g, const in_t* __restrict s, dz_t* __restrict dz, acc_t* __restrict db,
               int64_t M, int64_t N, acc_t slope) {
  const int64_t grain = std::max<int64_t>(16, 16384 / std::max<int64_t>(M, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    const int64_t w = n1 - n0;
    std::vector<acc_t> sum(db != nullptr ? w : 0, acc_t(0));
    acc_t* __restrict acc = sum.data();
    for (int64_t i = 0; i < M; ++i) {
      const in_t* gi = g + i * N + n0;
      const in_t* si = s + i * N + n0;
      dz_t* di = dz + i * N + n0;
      if (dz == nullptr) {
        for (int64_t j = 0; j < w; ++j) acc[j] += static_cast<acc_t>(gi[j]);
      } else if (db != nullptr) {
        for (int64_t j = 0; j < w; ++j) {
          const acc_t v = leaky_relu_grad<acc_t>(static_cast<acc_t>(gi[j]), static_cast<acc_t>(si[j]), slope);
          di[j] = static_cast<dz_t>(v);
          acc[j] += v;
        }
      } else {
        for (int64_t j = 0; j < w; ++j)
          di[j] = static_cast<dz_t>(leaky_relu_grad<acc_t>(static_cast<acc_t>(gi[j]), static_cast<acc_t>(si[j]), slope));
      }
    }
    if (db != nullptr) std::copy(sum.begin(), sum.end(), db + n0);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cpu(const at::Tensor& grad_output, const at::Tensor& saved,
                                                       const at::Tensor& input_, const at::Tensor& weight_, double slope,
                                                       std::array<bool, 3> mask) {
  GANKERN_NO_AUTOCAST();
  check_bwd_args(grad_output, saved, input_, weight_, kBwd);
  TORCH_INTERNAL_ASSERT(input_.device().is_cpu(), kBwd, ": the CPU kernel got ", input_.device());  // the dispatcher's choice
  const at::Tensor input = dense(input_), weight = dense_or_transposed(weight_);  // as in fwd_cpu
  const int64_t N = weight.size(0), K = weight.size(1), M = rows_of(input);
  const auto st = input.scalar_type();
  const bool half = !(st == at::kFloat || st == at::kDouble);
  // reduced precision on native GEMMs: dZ in the input dtype, GEMMs in it (fp32 accumulation)
  const bool native = half && half_gemm_native(st, M, N, K);
  const auto acc_type = st == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor gx, gw, gb;
  // dX on oneDNN (fp32): it allocates dX itself
  const LinearPointwise* gx_op = (mask[0] && st == at::kFloat) ? onednn_linear(M, N, K) : nullptr;
  if (mask[0] && gx_op == nullptr)
    gx = new_empty(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
  if (mask[1]) gw = new_empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
  if (mask[2]) gb = new_empty({N}, weight.options());
  if (!(mask[0] || mask[1] || mask[2])) return {gx, gw, gb};

  const at::Tensor g = dense(grad_output.reshape({M, N}));
  const at::Tensor s = dense(saved.reshape({M, N}));
  // dZ in the input dtype (fp32 for half inputs on the "fp32" path: the GEMMs then run in fp32);
  // slope 1 (a plain Linear, not on the "fp32" half path): dZ is dY itself, no pass but the bias
  // column sums
  const bool identity = slope == 1.0 && (!half || native);
  at::Tensor dz = identity ? g : alloc_empty({M, N}, input.options().dtype(native ? st : acc_type),
                                             at::MemoryFormat::Contiguous);
  at::Tensor db = mask[2] ? (half ? at::empty({N}, input.options().dtype(at::kFloat)) : gb) : at::Tensor();
  if (M * N > 0 && (!identity || db.defined())) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "llr_bwd_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      if (native) {
        dz_colsum<scalar_t, scalar_t, acc_t>(g.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
                                             identity ? nullptr : dz.data_ptr<scalar_t>(), db.defined() ? db.data_ptr<acc_t>() : nullptr,
                                             M, N, static_cast<acc_t>(slope));
      } else {
        dz_colsum<scalar_t, acc_t, acc_t>(g.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
                                          identity ? nullptr : dz.data_ptr<acc_t>(),
                                          db.defined() ? db.data_ptr<acc_t>() : nullptr, M, N,
                                          static_cast<acc_t>(slope));
      }
    });
  } else if (db.defined()) {
    db.zero_();
  }
  if (mask[2] && half) gb.copy_(db);
  auto gemm_dx = [&] {
    if (gx_op != nullptr) {
      gx = gx_op->call(dz, weight.t(), std::nullopt, "none", c10::List<std::optional<c10::Scalar>>(),
                        std::nullopt).view(input.sizes());
    } else {
      at::Tensor gx2 = gx.view({M, K});
      if (native) at::cpu::mm_out(gx2, dz, weight);  // oneDNN bf16/fp16 matmul, fp32 accumulation
      else if (half) gx2.copy_(at::mm(dz, weight.to(at::kFloat)));
      else at::cpu::mm_out(gx2, dz, weight);
    }
  };
  auto gemm_dw = [&] {
    const at::Tensor x = half && !native ? input.reshape({M, K}).to(at::kFloat) : input.reshape({M, K});
    if (half && !native) gw.copy_(at::mm(dz.t(), x));
    else at::cpu::mm_out(gw, dz.t(), x);
  };
  if (mask[0] && mask[1] && !half && gx_op == nullptr && concurrent_bwd_gemms(M, N, K)) {
    at::parallel_for(0, 2, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) i == 0 ? gemm_dx() : gemm_dw();
    });
  } else {
    if (mask[0]) gemm_dx();
    if (mask[1]) gemm_dw();
  }
  return {gx, gw, gb};
}

}  // namespace
}  // namespace llr
}  // namespace gankern

// Which GEMM path the CPU kernels take for float16/bfloat16 ("native" or "fp32"), for gankern's
// report (gankern.cpu_features) and tests.
TORCH_LIBRARY_FRAGMENT(gankern, m) {
  m.def("_linear_leaky_relu_cpu_gemm(ScalarType dtype) -> str", &gankern::llr::half_gemm_path);
}

TORCH_LIBRARY_IMPL(gankern, CPU, m) {
  m.impl("_linear_leaky_relu_fwd", &gankern::llr::fwd_cpu);
  m.impl("_linear_leaky_relu_bwd", &gankern::llr::bwd_cpu);
}
