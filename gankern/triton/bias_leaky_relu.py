"""Triton kernels of the fused bias + LeakyReLU (forward and backward).

Formulas: csrc/include/gankern/bias_leaky_relu.h; math in float32 (float64 for float64 tensors).
The tensor is viewed in its memory order as (R, C, I) = (outer, channels, inner): NCHW is
(N, C, H*W), channels-last is (N*H*W, C, 1).
  * ``_bact_fwd``: elementwise, one launch; the channel of element k is (k // I) % C.
  * ``_bact_bwd``: dx = dy * (y > 0 ? 1 : slope) and the bias gradient in one pass: each program
    takes a [BLOCK_C, BLOCK_I] tile of (channel, inner) positions and walks rows r = pid_r,
    pid_r + n_r, ... accumulating; it writes one partial per channel, partial[pid_r * n_i + pid_i, c];
    the partials are then added in a fixed order (no atomics: reproducible).
The negative slope is passed as two float32 scalars (hi + lo) so float64 math keeps it to ~2^-48.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._backends import new_empty

FWD_BLOCK = 1024
NUM_WARPS = 4


def _bwd_warps(f64, block_c, has_dx, has_db):
    """Warps of the backward kernel, chosen by the sm_80 AOT check under Triton 3.6 / 3.7.1 / 3.9: at 4 warps the
    fp32/fp16/bf16 tiles (g, y and dx at once) spill 4-8 B, and so do the fp64 ones with BLOCK_C=1 or with both
    gradients; the other fp64 tiles spill 8-16 B at 8 warps."""
    return 4 if f64 and block_c > 1 and not (has_dx and has_db) else 8

TILE = 1024
BLOCK_I_CHOICES = (1, 4, 16, 64, 256, 1024)
TARGET_PROGRAMS = 512


@triton.jit
def _times_slope(z, s_hi, s_lo, IS_F64: tl.constexpr):
    # float64: z * (hi + lo), the slope kept to ~2^-48; else z * float32(slope), as torch does
    if IS_F64:
        return z * s_hi + z * s_lo
    return z * s_hi


@triton.jit
def _bact_fwd(x_ptr, b_ptr, y_ptr, N, C, I, s_hi, s_lo, BLOCK: tl.constexpr, IS_F64: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    c = (offs // I) % C
    acc_t = tl.float64 if IS_F64 else tl.float32
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(acc_t)
    b = tl.load(b_ptr + c, mask=m, other=0.0).to(acc_t)
    z = x + b
    y = tl.where(z > 0, z, _times_slope(z, s_hi, s_lo, IS_F64))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bact_bwd(g_ptr, y_ptr, dx_ptr, part_ptr, R, C, I, s_hi, s_lo, HAS_DX: tl.constexpr, HAS_DB: tl.constexpr,
              BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, IS_F64: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_r = tl.program_id(2)
    n_i = tl.num_programs(1)
    n_r = tl.num_programs(2)
    acc_t = tl.float64 if IS_F64 else tl.float32
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ii = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    m = (cs[:, None] < C) & (ii[None, :] < I)
    tile = cs[:, None].to(tl.int64) * I + ii[None, :]
    acc = tl.zeros((BLOCK_C, BLOCK_I), dtype=acc_t)
    row0 = pid_r.to(tl.int64)
    for k in range(0, (R - pid_r + n_r - 1) // n_r):
        offs = (row0 + k * n_r) * C * I + tile
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(acc_t)
        y = tl.load(y_ptr + offs, mask=m, other=0.0).to(acc_t)
        v = tl.where(y > 0, g, _times_slope(g, s_hi, s_lo, IS_F64))
        if HAS_DX:
            tl.store(dx_ptr + offs, v.to(dx_ptr.dtype.element_ty), mask=m)
        if HAS_DB:
            acc += v
    if HAS_DB:
        tl.store(part_ptr + (pid_r * n_i + pid_i).to(tl.int64) * C + cs, tl.sum(acc, axis=1), mask=cs < C)


def _split_slope(slope):
    hi = float(torch.tensor(slope, dtype=torch.float32))
    return hi, float(slope) - hi


def _dense(t, dim):
    """(t permuted into its memory order (contiguous), perm, R, C, I)."""
    perm = list(range(t.dim()))
    if not t.is_contiguous():
        if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
            perm = [0, 2, 3, 1]
        elif t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
            perm = [0, 2, 3, 4, 1]
        else:
            t = t.contiguous()
    p = t.permute(perm)
    if not p.is_contiguous():
        p = p.contiguous()
    d = perm.index(dim)
    return p, perm, math.prod(p.shape[:d]), p.shape[d], math.prod(p.shape[d + 1:])


def _new_like(p, perm):
    out = new_empty(p.shape, dtype=p.dtype, device=p.device)
    inv = [0] * len(perm)
    for i, q in enumerate(perm):
        inv[q] = i
    return out, out.permute(inv)


def forward(input, bias, slope, dim):
    x, perm, R, C, I = _dense(input, dim)
    y, out = _new_like(x, perm)
    N = y.numel()
    if N:
        hi, lo = _split_slope(slope)
        _bact_fwd[(triton.cdiv(N, FWD_BLOCK),)](x, bias.contiguous(), y, N, C, I, hi, lo, BLOCK=FWD_BLOCK,
                                               IS_F64=input.dtype == torch.float64, num_warps=NUM_WARPS)
    return out


def tiles(C, I):
    """(BLOCK_C, BLOCK_I) for a (C, I) plane: BLOCK_I the smallest choice covering I (<= 1024)."""
    bi = next((b for b in BLOCK_I_CHOICES if b >= I), BLOCK_I_CHOICES[-1])
    bc = min(256, TILE // bi)
    return bc, bi


def backward(grad_output, saved, slope, dim, output_mask):
    """-> (grad_input, grad_bias); an output not asked for in output_mask is None (undefined)."""
    nx, nb = bool(output_mask[0]), bool(output_mask[1])
    if not nx and not nb:
        return None, None
    y, perm, R, C, I = _dense(saved, dim)
    g = grad_output.permute(perm)
    if not g.is_contiguous():
        g = g.contiguous()
    dev, dt = saved.device, saved.dtype
    dx, gx = _new_like(y, perm) if nx else (None, None)
    acc = torch.float64 if dt == torch.float64 else torch.float32
    if y.numel() == 0:
        return gx, (torch.zeros(C, dtype=dt, device=dev) if nb else None)
    bc, bi = tiles(C, I)
    gc, gi = triton.cdiv(C, bc), triton.cdiv(I, bi)
    nr = max(1, min(R, TARGET_PROGRAMS // (gc * gi)))
    part = torch.empty((nr * gi, C), dtype=acc, device=dev) if nb else None
    hi, lo = _split_slope(slope)
    _bact_bwd[(gc, gi, nr)](g, y, dx if nx else y, part if nb else y, R, C, I, hi, lo, HAS_DX=nx, HAS_DB=nb,
                           BLOCK_C=bc, BLOCK_I=bi, IS_F64=dt == torch.float64,
                           num_warps=_bwd_warps(dt == torch.float64, bc, nx, nb))
    return gx, (part.sum(0).to(dt) if nb else None)


def aot_specs():
    from ._aot import AotSpec
    specs = []
    for dt in ("fp32", "fp16", "bf16", "fp64"):
        f64 = dt == "fp64"
        specs.append(AotSpec(f"bact_fwd[{dt}]", _bact_fwd,
                             {"x_ptr": f"*{dt}", "b_ptr": f"*{dt}", "y_ptr": f"*{dt}", "N": "i64", "C": "i64",
                              "I": "i64", "s_hi": "fp32", "s_lo": "fp32", "BLOCK": "constexpr",
                              "IS_F64": "constexpr"},
                             {"BLOCK": FWD_BLOCK, "IS_F64": f64}, num_warps=NUM_WARPS))
        part = "*fp64" if f64 else "*fp32"
        for bi in BLOCK_I_CHOICES:
            bc = min(256, TILE // bi)
            for has_dx, has_db in ((True, True), (True, False), (False, True)):
                specs.append(AotSpec(
                    f"bact_bwd[{dt},BLOCK_C={bc},BLOCK_I={bi},dx={has_dx},db={has_db}]", _bact_bwd,
                    {"g_ptr": f"*{dt}", "y_ptr": f"*{dt}", "dx_ptr": f"*{dt}", "part_ptr": part, "R": "i32",
                     "C": "i32", "I": "i32", "s_hi": "fp32", "s_lo": "fp32", "HAS_DX": "constexpr",
                     "HAS_DB": "constexpr", "BLOCK_C": "constexpr", "BLOCK_I": "constexpr", "IS_F64": "constexpr"},
                    {"HAS_DX": has_dx, "HAS_DB": has_db, "BLOCK_C": bc, "BLOCK_I": bi, "IS_F64": f64},
                    num_warps=_bwd_warps(f64, bc, has_dx, has_db)))
    return specs
