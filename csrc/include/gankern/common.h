// Helpers shared by the ATen-facing C++ files (CPU kernels, CUDA glue, autograd).
// Not for .cu files: those stay free of ATen headers.
#pragma once
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <new>
#if defined(__linux__)
#include <sys/mman.h>
#endif

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

// Very large CPU outputs come from 2 MiB-aligned memory advised MADV_HUGEPAGE (Linux transparent
// huge pages in "madvise" or "always" mode).  glibc serves every block of 32 MiB or more (its
// largest dynamic mmap threshold on 64-bit) with a fresh mmap, so with torch's allocator each such
// output page-faults on first touch: ~16K faults for 64 MiB with 4 KiB pages, ~32 with huge pages
// (measured: a 64 MiB clone() 24 ms with 4 KiB pages, 6 ms with huge pages, 3 ms into existing
// memory).  Below 32 MiB glibc reuses freed heap memory (no faults in a training loop: a 4-31 MiB
// clone() runs at 15-36 GB/s), and an aligned block of our own would be mmapped and faulted on
// every call (measured at 4 MiB: a BatchNorm eval pass 67 us -> 200-300 us), so those use torch's
// allocator.  Elsewhere (no THP, other OS) it is plain aligned memory.
constexpr size_t kHugePageBytes = size_t(2) << 20;
constexpr size_t kHugePageMinBytes = size_t(32) << 20;

struct HugePageCpuAllocator final : c10::Allocator {
  static void release(void* p) { std::free(p); }
  c10::DataPtr allocate(size_t n) override {
    if (n < kHugePageMinBytes) return c10::GetCPUAllocator()->allocate(n);
    const size_t bytes = (n + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
    void* p = nullptr;
    if (posix_memalign(&p, kHugePageBytes, bytes) != 0 || p == nullptr)
      TORCH_CHECK(false, "gankern: out of memory allocating ", n, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, bytes, MADV_HUGEPAGE);  // advice only: ignore failure
#endif
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }
  // the small-size branch hands out torch's own DataPtrs, whose deleter is not `release`
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

inline c10::Allocator* huge_page_cpu_allocator() {
  static HugePageCpuAllocator a;
  return &a;
}

inline at::Tensor alloc_empty(at::IntArrayRef sizes, const at::TensorOptions& opts, at::MemoryFormat fmt) {
  if (opts.device().is_cpu() && !opts.pinned_memory() && opts.layout() == at::kStrided) {
    const int64_t n = c10::multiply_integers(sizes);
    if (n > 0 && size_t(n) * opts.dtype().itemsize() >= kHugePageMinBytes)
      return at::detail::empty_generic(sizes, huge_page_cpu_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
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

// Internal kernels compute in the dtypes they are given: ATen calls inside them (at::mm, ...)
// must not be re-cast by an enclosing autocast region (the drop-in modules apply autocast's
// casting rules themselves, before calling the op).
#define GANKERN_NO_AUTOCAST() \
  c10::impl::ExcludeDispatchKeyGuard gankern_no_autocast_guard_(c10::autocast_dispatch_keyset)

}  // namespace gankern
