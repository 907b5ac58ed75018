// Every CUDA launcher (csrc/cuda/<op>.cu), declared once: included by the .cu file that defines
// it and by the ATen glue that calls it (csrc/cuda/<op>_glue.cpp).  No ATen here.
// Conventions (gankern/kernel_common.h): plain pointers and sizes, a gankern::DType, the stream
// last; the result is cudaGetLastError() after the last launch.
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>
#include "gankern/kernel_common.h"

namespace gankern {
namespace cuda {

// ---- batch_norm_relu (csrc/cuda/batch_norm_relu.cu) ----
// The input is (N, C, S): rows == true means M = N*S rows of C contiguous channels ((N, C) and
// channels-last), rows == false means contiguous N x C x S.  acc = float for fp32/fp16/bf16
// inputs, double for fp64 (the forward statistics are double for every dtype); pt = the params' dtype.
// Elements of double the launchers need as scratch (8-byte aligned).
int64_t bnr_fwd_workspace(int64_t N, int64_t C, int64_t S, bool rows);
int64_t bnr_bwd_workspace(int64_t N, int64_t C, int64_t S, bool rows);
// running_mean / running_var / weight / bias: contiguous (C,) of dtype pt, or nullptr.
cudaError_t bnr_forward(DType xt, DType pt, const void* x, void* y, int64_t N, int64_t C, int64_t S, bool rows,
                        void* running_mean, void* running_var, const void* weight, const void* bias, bool training,
                        double momentum, double eps, double negative_slope, void* save_mean, void* save_invstd,
                        void* workspace, cudaStream_t stream);
// grad_weight / grad_bias: (C,) of dtype pt (always written).
cudaError_t bnr_backward(DType xt, DType pt, const void* dy, const void* x, void* dx, int64_t N, int64_t C,
                         int64_t S, bool rows, const void* weight, const void* bias, const void* save_mean,
                         const void* save_invstd, bool training, double negative_slope, void* grad_weight,
                         void* grad_bias, void* workspace, cudaStream_t stream);

// ---- bce_with_logits (csrc/cuda/bce.cu) ----
// w / pw: (pointer, mode), mode 0 absent, 1 one element, 2 one per element; in float (double for
// F64).  partial: a device buffer of ceil(N / bce::kChunk) doubles (mean / sum with more than one
// chunk).
cudaError_t bce_forward(DType dtype, const void* x, const void* t, double t_s, const void* w, int w_mode,
                        const void* pw, int pw_mode, void* out, double* partial, int64_t N, int64_t reduction,
                        cudaStream_t stream);
// g: the incoming gradient in the input dtype (N elements if g_full, else one element scaled by g_scale).
cudaError_t bce_backward(DType dtype, const void* g, bool g_full, double g_scale, const void* x, const void* t,
                         double t_s, const void* w, int w_mode, const void* pw, int pw_mode, void* gx, void* gt,
                         int64_t N, cudaStream_t stream);

// ---- bias_leaky_relu (csrc/cuda/bias_leaky_relu.cu) ----
// The tensor is (outer, C, inner) in memory.
cudaError_t bact_forward(DType dtype, const void* x, const void* b, void* y, int64_t outer, int64_t C, int64_t inner,
                         double slope, cudaStream_t stream);
// Rows of the partial bias sums the backward needs (partial[P][C] in the accumulation type).
int64_t bact_bwd_groups(int64_t outer, int64_t C, int64_t inner);
cudaError_t bact_backward(DType dtype, const void* g, const void* y, void* dx, void* db, void* partial,
                          int64_t outer, int64_t C, int64_t inner, double slope, cudaStream_t stream);

// ---- linear_leaky_relu (csrc/cuda/linear_leaky_relu.cu) ----
// out = leaky_relu(out [+ bias]) in place ((M, N) contiguous).
cudaError_t llr_act(DType dtype, void* out, const void* bias, int64_t M, int64_t N, double slope,
                    cudaStream_t stream);
// dZ = dY * (s > 0 ? 1 : slope) and the column sums: partial = gy * N accumulators (double for
// F64, else float); db may be nullptr (no bias gradient).
cudaError_t llr_dz_colsum(DType dtype, const void* g, const void* s, void* dz, void* partial, void* db, int64_t M,
                          int64_t N, int gy, double slope, cudaStream_t stream);

}  // namespace cuda
}  // namespace gankern
