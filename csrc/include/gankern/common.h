// Helpers shared by the ATen-facing C++ files (CPU kernels, CUDA glue, autograd).
// Not for .cu files: those stay free of ATen headers.
#pragma once
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <atomic>
#include <limits>

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

// at::empty with poisoning; use for every output a kernel writes.
inline at::Tensor new_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return poisoned(at::empty(sizes, opts));
}
inline at::Tensor new_empty_like(const at::Tensor& t, at::MemoryFormat fmt = at::MemoryFormat::Preserve) {
  return poisoned(at::empty_like(t, fmt));
}

// Internal kernels compute in the dtypes they are given: ATen calls inside them (at::mm, ...)
// must not be re-cast by an enclosing autocast region (the drop-in modules apply autocast's
// casting rules themselves, before calling the op).
#define GANKERN_NO_AUTOCAST() \
  c10::impl::ExcludeDispatchKeyGuard gankern_no_autocast_guard_(c10::autocast_dispatch_keyset)

}  // namespace gankern
