// The ATen-free base of every kernel header: included by the .cu files and by the op headers
// (gankern/<op>.h), whose formulas are shared by the CPU kernels and the CUDA kernels.
// Nothing here needs ATen or the CUDA runtime.
//
//   GANKERN_HD        the one host/device qualifier of a shared formula (inline on the host,
//                     __host__ __device__ __forceinline__ under nvcc)
//   gankern::DType    the one dtype code a CUDA launcher takes (the glue maps at::ScalarType to
//                     it with gankern::dtype_code, csrc/include/gankern/common.h)
//
// CUDA launchers (declared once, in gankern/cuda_launchers.h) take plain pointers, sizes, a
// DType and a cudaStream_t, and return the cudaError_t of cudaGetLastError() after their last
// launch (cudaErrorInvalidValue for a DType they have no kernel for); the glue checks it with
// GANKERN_CUDA_CHECK (gankern/cuda_glue.h).
#pragma once

#if defined(__CUDACC__)
#define GANKERN_HD __host__ __device__ __forceinline__
#else
#define GANKERN_HD inline
#endif

namespace gankern {

// The element type of a kernel's floating-point tensors.
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

}  // namespace gankern
