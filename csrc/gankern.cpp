// The extension module gankern._C.
// Importing it runs the static registrations of every op (TORCH_LIBRARY_FRAGMENT in
// csrc/<op>.cpp, kernels in csrc/cpu/<op>.cpp and csrc/cuda/<op>_glue.cpp).
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include "gankern/common.h"

// The library itself; each op adds its schemas with TORCH_LIBRARY_FRAGMENT(gankern, m).
TORCH_LIBRARY(gankern, m) {}

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "gankern compiled kernels (CPU always; CUDA when built against a CUDA torch)";
#ifdef GANKERN_WITH_CUDA
  mod.attr("with_cuda") = true;
  mod.attr("cuda_archs") = GANKERN_CUDA_ARCHS_STR;
#else
  mod.attr("with_cuda") = false;
  mod.attr("cuda_archs") = "";
#endif
#ifdef GANKERN_CUDA_SKIP_REASON
  mod.attr("cuda_skip_reason") = GANKERN_CUDA_SKIP_REASON;  // why the CUDA kernels were not built ("" if they were)
#else
  mod.attr("cuda_skip_reason") = "";
#endif
  mod.def("_set_poison", [](bool on) { gankern::poison_flag() = on; },
          "Fill kernel outputs with NaN before writing them (tests only).");
  mod.def("_get_poison", []() { return gankern::poison_flag().load(); });
  mod.def("parallel_info", []() { return at::get_parallel_info(); });
  mod.def("_cpu_cache_release", []() { gankern::cpu_block_cache().release(); },
          "Free the cached CPU output blocks (gankern.empty_cache()).");
  mod.def("_cpu_cache_info", []() {
    auto& c = gankern::cpu_block_cache();
    std::lock_guard<std::mutex> g(c.mu);
    return std::make_tuple(c.cached, c.cap, c.hits, c.misses);
  });
}
