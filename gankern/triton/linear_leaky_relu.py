"""Triton kernels of the fused Linear + LeakyReLU.

* ``_gemm_kernel``: C = act(A @ B + bias) with a tiled, autotuned GEMM in grouped program order
  (GROUP_M row-blocks share B tiles in L2), fp32 accumulator (fp64 for fp64 inputs), bias and
  LeakyReLU applied to the accumulator in the epilogue, one rounding into the output dtype.
  A and B are given by strides, so the same kernel runs the forward (A = x, B = W^T) and the two
  backward GEMMs (dX = dZ W, dW = dZ^T X).  fp32 operands use TF32 when
  ``torch.backends.cuda.matmul.allow_tf32`` is on (``PRECISION`` constexpr chosen at launch).
* ``_dz_kernel``: dZ = dY * (s > 0 ? 1 : slope) and the bias gradient (column sums) in one pass,
  each program owning a column block (deterministic, no atomics).

Under ``TRITON_INTERPRET=1`` (CPU tensors, tests) the autotuner is bypassed with one fixed config.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .. import _backends

_CONFIGS = [
    # BLOCK_M >= 64 and num_warps % 4 == 0 everywhere: wgmma-eligible on sm_90 for fp16/bf16 (and tf32)
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
# fp32 without TF32 (and fp64) runs on FMA units, which hold a whole BLOCK_K slice of A and B in
# registers: short BLOCK_K so that nothing spills on sm_80 / sm_90
_FMA_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 16, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
_INTERP_META = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}
_DZ_BLOCK_M, _DZ_BLOCK_N = 64, 32


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, bias_ptr, c_ptr, M, N, K,
                 stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_bias, slope,
                 HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr, ACC_F64: tl.constexpr,
                 INTERP_UPCAST: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # int32 offsets (the launcher rejects tensors with >= 2**31 elements)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    if ACC_F64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        if INTERP_UPCAST:  # Triton 3.9's interpreter computes bf16 tl.dot wrongly; exact in fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if ACC_F64:  # out_dtype must name the accumulator's dtype (Triton >= 3.7 asserts it)
            acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float64)
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0)
        acc = acc + bias.to(acc.dtype)[None, :]
    if ACT:
        acc = tl.where(acc > 0, acc, acc * slope)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_gemm_mma = triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])(_gemm_kernel)
_gemm_fma = triton.autotune(configs=_FMA_CONFIGS, key=["M", "N", "K"])(_gemm_kernel)


@triton.jit
def _dz_kernel(g_ptr, s_ptr, dz_ptr, db_ptr, M, N, slope,
               HAS_DB: tl.constexpr, ACC_F64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # g, s, dz: contiguous (M, N); db: (N,)
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if ACC_F64:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m < M)[:, None] & mask_n[None, :]
        idx = offs_m[:, None] * N + offs_n[None, :]
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(acc.dtype)
        s = tl.load(s_ptr + idx, mask=mask, other=0.0).to(acc.dtype)  # (sign test exact in fp32)
        dz = tl.where(s > 0, g, g * slope)
        tl.store(dz_ptr + idx, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if HAS_DB:
            acc += tl.sum(dz, axis=0)
    if HAS_DB:
        tl.store(db_ptr + offs_n, acc.to(db_ptr.dtype.element_ty), mask=mask_n)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _precision(dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _gemm(a, b, bias, c, slope, act):
    """c (M, N) = act(a (M, K) @ b (K, N) + bias); any strides."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return c
    if max(a.numel(), b.numel(), c.numel()) >= 2**31:
        raise ValueError("gankern.linear_leaky_relu (triton backend): tensors with 2**31 or more elements are not "
                         "supported (32-bit offsets); use backend='cuda'")
    args = (a, b, bias if bias is not None else c, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            c.stride(0), c.stride(1), bias.stride(0) if bias is not None else 0, float(slope))
    const = dict(HAS_BIAS=bias is not None, ACT=act, PRECISION=_precision(a.dtype), ACC_F64=a.dtype == torch.float64,
                 INTERP_UPCAST=False)
    if _interpret() or a.device.type == "cpu":
        const["INTERP_UPCAST"] = a.dtype == torch.bfloat16
        meta = _INTERP_META
        grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _gemm_kernel[grid](*args, **const, **meta)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        with torch.cuda.device(a.device):
            kern = _gemm_fma if const["PRECISION"] == "ieee" and a.dtype in (torch.float32, torch.float64) else _gemm_mma
            kern[grid](*args, **const)
    return c


def forward(input, weight, bias, slope):
    N, K = weight.shape
    x2 = input.reshape(math.prod(input.shape[:-1]), K)
    out = _backends.new_empty((*input.shape[:-1], N), dtype=input.dtype, device=input.device)
    _gemm(x2, weight.t(), bias, out.view(x2.shape[0], N), slope, act=float(slope) != 1.0)
    return out


def backward(grad_output, saved, input, weight, slope, output_mask):
    """-> (grad_input, grad_weight, grad_bias); an output not asked for in output_mask is None (undefined)."""
    N, K = weight.shape
    M = math.prod(input.shape[:-1])
    x2 = input.reshape(M, K)
    g = grad_output.reshape(M, N).contiguous()
    s = saved.reshape(M, N).contiguous()
    dev, dt = input.device, input.dtype
    need_x, need_w, need_b = output_mask
    dz = torch.empty((M, N), dtype=dt, device=dev)
    db = _backends.new_empty((N,), dtype=dt, device=dev) if need_b else None
    if M > 0 and N > 0:
        _dz_kernel[(triton.cdiv(N, _DZ_BLOCK_N),)](g, s, dz, db if db is not None else dz, M, N, float(slope),
                                                   HAS_DB=need_b, ACC_F64=dt == torch.float64,
                                                   BLOCK_M=_DZ_BLOCK_M, BLOCK_N=_DZ_BLOCK_N)
    elif db is not None:
        db.zero_()
    gx = gw = None
    if need_x:
        gx = _backends.new_empty(input.shape, dtype=dt, device=dev)
        _gemm(dz, weight, None, gx.view(M, K), 1.0, act=False)
        if N == 0:
            gx.zero_()
    if need_w:
        gw = _backends.new_empty((N, K), dtype=dt, device=dev)
        _gemm(dz.t(), x2, None, gw, 1.0, act=False)
        if M == 0:
            gw.zero_()
    return gx, gw, db


def aot_specs():
    """Every kernel x dtype x autotune config, for the sm_80 / sm_90 compile check."""
    from ._aot import AotSpec, configs_of
    specs = []
    ints = {k: "i32" for k in ("M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm",
                                "stride_cn", "stride_bias")}
    variants = [("fp32", "ieee"), ("fp32", "tf32"), ("fp16", "ieee"), ("bf16", "ieee")]
    for dt, prec in variants:
        fma = dt == "fp32" and prec == "ieee"
        for cfg in configs_of(_gemm_fma if fma else _gemm_mma):
            for act, has_bias in ((True, True), (False, False)):
                sig = {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "bias_ptr": f"*{dt}", "c_ptr": f"*{dt}", **ints,
                       "slope": "fp32", "HAS_BIAS": "constexpr", "ACT": "constexpr", "PRECISION": "constexpr",
                       "ACC_F64": "constexpr", "INTERP_UPCAST": "constexpr", "BLOCK_M": "constexpr",
                       "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "GROUP_M": "constexpr"}
                const = {"HAS_BIAS": has_bias, "ACT": act, "PRECISION": prec, "ACC_F64": False, "INTERP_UPCAST": False,
                         **cfg.kwargs}
                name = (f"linear_leaky_relu_gemm[{dt}{'-tf32' if prec == 'tf32' else ''},"
                        f"{'fwd' if act else 'bwd'},BM{cfg.kwargs['BLOCK_M']},BN{cfg.kwargs['BLOCK_N']},"
                        f"BK{cfg.kwargs['BLOCK_K']},w{cfg.num_warps},s{cfg.num_stages}]")
                specs.append(AotSpec(name, _gemm_kernel, sig, const, num_warps=cfg.num_warps,
                                     num_stages=cfg.num_stages, expect_wgmma=dt in ("fp16", "bf16")))
    for dt in ("fp32", "fp16", "bf16"):
        sig = {"g_ptr": f"*{dt}", "s_ptr": f"*{dt}", "dz_ptr": f"*{dt}", "db_ptr": f"*{dt}", "M": "i32", "N": "i32",
               "slope": "fp32", "HAS_DB": "constexpr", "ACC_F64": "constexpr", "BLOCK_M": "constexpr",
               "BLOCK_N": "constexpr"}
        specs.append(AotSpec(f"linear_leaky_relu_dz[{dt}]", _dz_kernel, sig,
                             {"HAS_DB": True, "ACC_F64": False, "BLOCK_M": _DZ_BLOCK_M, "BLOCK_N": _DZ_BLOCK_N},
                             num_warps=4, num_stages=2))
    return specs
