// The ATen side of the CUDA kernels (csrc/cuda/<op>_glue.cpp only; built against a CUDA torch):
// the headers every glue file needs, the launchers, and the one check of a launcher's result.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include "gankern/common.h"
#include "gankern/cuda_launchers.h"

// GANKERN_CUDA_CHECK(op, launcher(...)): a launcher's cudaError_t as a c10::Error naming the op.
#define GANKERN_CUDA_CHECK(op, ...)                                                                \
  do {                                                                                             \
    const cudaError_t gankern_cuda_err_ = (__VA_ARGS__);                                           \
    TORCH_CHECK(gankern_cuda_err_ == cudaSuccess, op, ": CUDA kernel launch failed: ",             \
                cudaGetErrorString(gankern_cuda_err_));                                            \
  } while (0)

namespace gankern {
// The current CUDA stream (of the current device: the glue sets it with a CUDAGuard first).
inline cudaStream_t cuda_stream() { return at::cuda::getCurrentCUDAStream(); }
}  // namespace gankern
