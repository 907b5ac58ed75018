// Helpers shared by the ATen-facing C++ files (CPU kernels, CUDA glue, autograd).
// Not for .cu files: those stay free of ATen headers.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <iterator>
#include <limits>
#include <mutex>
#include <new>
#include <string>
#include <utility>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__unix__)
#include <pthread.h>
#endif
#include "gankern/kernel_common.h"

namespace gankern {

// Test-only: when on, every output buffer the kernels allocate is filled with NaN
// first, so a kernel that forgets to write an element cannot pass a test.
// Toggled from Python with gankern._C._set_poison(bool).
inline std::atomic<bool>& poison_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}

inline at::Tensor poisoned(at::Tensor t) {
  if (poison_flag().load(std::memory_order_relaxed) && t.numel() > 0) {
    if (at::isFloatingType(t.scalar_type())) t.fill_(std::numeric_limits<double>::quiet_NaN());
    else t.fill_(-1);
  }
  return t;
}

// CPU output buffers of kBlockMinBytes or more come from gankern's own blocks, kept in a bounded
// cache when freed and handed out again for the next output of the same rounded size.
//  * Why: in a training loop the same few output sizes are allocated and freed every step.  With
//    glibc, blocks of a few MiB live at the top of the heap and are trimmed back to the kernel when
//    freed (M_TRIM_THRESHOLD), or are mmapped afresh (>= 32 MiB, glibc's largest mmap threshold),
//    so every step page-faults them in again: measured at 1024x1024 fp32 BatchNorm+ReLU fwd+bwd,
//    200-1200 faults and 0.7-2.4 ms per step, depending on the allocator's history; a 64 MiB
//    clone() costs 24 ms with 4 KiB pages against 3 ms into existing memory.
//  * Blocks of 2 MiB or more are 2 MiB-aligned and advised MADV_HUGEPAGE (Linux transparent huge
//    pages in "madvise" or "always" mode): a first touch costs ~32 faults per 64 MiB, not ~16K.
//  * The cache holds at most GANKERN_CPU_CACHE_MB MiB (default 256; 0 disables it) of freed
//    blocks and drops its oldest blocks when full; gankern.empty_cache() returns them all.
//  * Reused blocks hold old data: every kernel writes its whole output (checked by the
//    NaN-poisoning tests).
// Smaller outputs use torch's allocator.
constexpr size_t kBlockMinBytes = size_t(256) << 10;
constexpr size_t kHugePageBytes = size_t(2) << 20;

struct CpuBlockCache {
  std::mutex mu;
  // freed blocks (rounded size, pointer), oldest first: a full cache drops its oldest blocks, so
  // it follows the sizes a program uses now (a handful of blocks: linear search is enough)
  std::deque<std::pair<size_t, void*>> free_blocks;
  size_t cached = 0, cap = 0;
  uint64_t hits = 0, misses = 0;
  CpuBlockCache() {
    const char* e = std::getenv("GANKERN_CPU_CACHE_MB");
    cap = size_t(256) << 20;
    if (e != nullptr && *e != '\0') {
      char* end = nullptr;
      const long long mb = std::strtoll(e, &end, 10);
      TORCH_CHECK(end != e && *end == '\0' && mb >= 0, "GANKERN_CPU_CACHE_MB must be a whole number of MiB >= 0, got '",
                  e, "'");
      cap = size_t(mb) << 20;
    }
  }
  static size_t round(size_t n) {
    const size_t q = n >= kHugePageBytes ? kHugePageBytes : size_t(64) << 10;
    return (n + q - 1) / q * q;
  }
  void* get(size_t bytes) {
    {
      std::lock_guard<std::mutex> g(mu);
      for (auto it = free_blocks.rbegin(); it != free_blocks.rend(); ++it) {  // the newest first: warm in cache
        if (it->first == bytes) {
          void* p = it->second;
          free_blocks.erase(std::next(it).base());
          cached -= bytes;
          ++hits;
          return p;
        }
      }
      ++misses;
    }
    const size_t align = bytes >= kHugePageBytes ? kHugePageBytes : 4096;
    void* p = nullptr;
    if (posix_memalign(&p, align, bytes) != 0 || p == nullptr)
      TORCH_CHECK(false, "gankern: out of memory allocating ", bytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (bytes >= kHugePageBytes) madvise(p, bytes, MADV_HUGEPAGE);  // advice only: ignore failure
#endif
    return p;
  }
  void put(void* p, size_t bytes) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> g(mu);
      if (bytes > cap) {
        drop.push_back(p);
      } else {
        free_blocks.emplace_back(bytes, p);
        cached += bytes;
        while (cached > cap) {
          drop.push_back(free_blocks.front().second);
          cached -= free_blocks.front().first;
          free_blocks.pop_front();
        }
      }
    }
    for (void* q : drop) std::free(q);  // outside the lock
  }
  void release() {
    std::deque<std::pair<size_t, void*>> all;
    {
      std::lock_guard<std::mutex> g(mu);
      all.swap(free_blocks);
      cached = 0;
    }
    for (auto& b : all) std::free(b.second);
  }
};

// Never destroyed: tensors may be freed after static destructors ran (at exit).  A child process
// forked while another thread held the lock (DataLoader workers) gets a fresh, unlocked mutex.
inline CpuBlockCache& cpu_block_cache() {
  static CpuBlockCache* c = [] {
    auto* cache = new CpuBlockCache();
#if defined(__unix__)
    pthread_atfork(nullptr, nullptr, [] { new (&cpu_block_cache().mu) std::mutex(); });
#endif
    return cache;
  }();
  return *c;
}

struct CachingCpuAllocator final : c10::Allocator {
  struct Block {
    void* p;
    size_t bytes;
  };
  static void release(void* ctx) {
    auto* b = static_cast<Block*>(ctx);
    cpu_block_cache().put(b->p, b->bytes);
    delete b;
  }
  c10::DataPtr allocate(size_t n) override {
    if (n < kBlockMinBytes) return c10::GetCPUAllocator()->allocate(n);
    const size_t bytes = CpuBlockCache::round(n);
    void* p = cpu_block_cache().get(bytes);
    return {p, new Block{p, bytes}, &release, c10::Device(c10::DeviceType::CPU)};
  }
  // the small-size branch hands out torch's own DataPtrs, whose deleter is not `release`
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

inline c10::Allocator* caching_cpu_allocator() {
  static CachingCpuAllocator a;
  return &a;
}

inline at::Tensor alloc_empty(at::IntArrayRef sizes, const at::TensorOptions& opts, at::MemoryFormat fmt) {
  if (opts.device().is_cpu() && !opts.pinned_memory() && opts.layout() == at::kStrided) {
    const int64_t n = c10::multiply_integers(sizes);
    if (n > 0 && size_t(n) * opts.dtype().itemsize() >= kBlockMinBytes)
      return at::detail::empty_generic(sizes, caching_cpu_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                       opts.dtype().toScalarType(), fmt);
  }
  return at::empty(sizes, opts.memory_format(fmt));
}

// at::empty with poisoning; use for every output a kernel writes.
inline at::Tensor new_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return poisoned(alloc_empty(sizes, opts, opts.memory_format_opt().value_or(at::MemoryFormat::Contiguous)));
}
// Preserve = the layouts the kernels produce: channels-last stays channels-last, else contiguous.
inline at::Tensor new_empty_like(const at::Tensor& t, at::MemoryFormat fmt = at::MemoryFormat::Preserve) {
  if (fmt == at::MemoryFormat::Preserve) {
    if (t.is_contiguous()) fmt = at::MemoryFormat::Contiguous;
    else if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) fmt = at::MemoryFormat::ChannelsLast;
    else if (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d)) fmt = at::MemoryFormat::ChannelsLast3d;
    else return poisoned(at::empty_like(t));
  }
  return poisoned(alloc_empty(t.sizes(), t.options(), fmt));
}

// GEMM operands (MKL, oneDNN, cuBLAS) and flat kernels take dense row-major tensors with default
// strides.  Any layout torch accepts (sliced with a step, expanded / zero strides, transposed, size-1
// dims with odd strides, which is_contiguous() ignores but oneDNN reads) goes through here first:
// a tensor already dense is returned as is (no copy), a contiguous one with odd size-1 strides is
// re-viewed with default strides, anything else is copied.
inline bool has_default_strides(const at::Tensor& t) {
  int64_t expect = 1;
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    if (t.stride(d) != expect) return false;
    expect *= std::max<int64_t>(t.size(d), 1);
  }
  return true;
}
inline at::Tensor dense(const at::Tensor& t) {
  if (!t.defined() || has_default_strides(t)) return t;
  if (!t.is_contiguous()) return t.contiguous();  // contiguous() gives default strides
  std::vector<int64_t> st(t.dim());
  int64_t expect = 1;
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    st[d] = expect;
    expect *= std::max<int64_t>(t.size(d), 1);
  }
  return t.as_strided(t.sizes(), st, t.storage_offset());
}
// A 2-D GEMM operand that may also be the transpose of a dense matrix (no copy then: every GEMM
// path takes either order); anything else as dense().
inline at::Tensor dense_or_transposed(const at::Tensor& t) {
  if (t.defined() && t.dim() == 2 && !has_default_strides(t) && t.size(0) > 1 && t.size(1) > 1 &&
      t.stride(0) == 1 && t.stride(1) == t.size(0))
    return t;
  return dense(t);
}

// Optional tensors.  Schemas take `Tensor?` (std::optional<at::Tensor>); kernels and saved
// variables use an undefined at::Tensor for "absent".  One spelling for the conversions:
inline bool has_tensor(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }
inline at::Tensor opt_tensor(const std::optional<at::Tensor>& t) { return has_tensor(t) ? *t : at::Tensor(); }
inline std::optional<at::Tensor> to_optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The implementations of an op's internal kernel ops `gankern::_<op>_fwd` / `_bwd`, as overload names:
// the public op's autograd and composite kernels are templates on one of these tags, so an op's checks
// and autograd exist once for every implementation.
struct Native { static constexpr const char* overload = ""; };        // csrc/cpu, csrc/cuda
struct Triton { static constexpr const char* overload = "triton"; };  // gankern/ops/<op>.py -> gankern/triton

// The typed handle of one internal op's overload (Impl::overload), looked up once:
//   constexpr char kFwdOp[] = "gankern::_<op>_fwd";  internal_op<FwdSig, Impl, kFwdOp>().call(...)
template <class Sig, class Impl, const char* Name>
const c10::TypedOperatorHandle<Sig>& internal_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(Name, Impl::overload).template typed<Sig>();
  return op;
}

// A shape as Python prints it, "torch.Size([2, 3])" (error messages match torch's).
inline std::string sizes_str(at::IntArrayRef s) {
  std::string o = "torch.Size([";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + "])";
}

// Dtype names as Python prints them ("torch.float32"), so that the C++ checks and their Python
// twins (Triton backend, fake kernels) raise the very same messages.
inline std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// The kernel dtype code (gankern/kernel_common.h) of a tensor dtype.  The ops' argument checks
// admit only these four, so any other dtype here is a bug.
inline DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    case at::kDouble: return DType::F64;
    default: TORCH_INTERNAL_ASSERT(false, "gankern: no kernel for dtype ", t);
  }
}

// Internal kernels compute in the dtypes they are given: ATen calls inside them (at::mm, ...)
// must not be re-cast by an enclosing autocast region (the drop-in modules apply autocast's
// casting rules themselves, before calling the op).
#define GANKERN_NO_AUTOCAST() \
  c10::impl::ExcludeDispatchKeyGuard gankern_no_autocast_guard_(c10::autocast_dispatch_keyset)

}  // namespace gankern
