"""Triton kernels of the fused BCE-with-logits (forward and backward).

Formulas: csrc/include/gankern/bce.h (torch's, so NaN/Inf behave as in torch); math in float32.
Weights: W_MODE / PW_MODE 0 = absent, 1 = one element (read from the pointer: no host sync),
2 = a contiguous tensor of the input's shape (other broadcasts are expanded first).

Forward:
  * reduction "none": ``_bce_fwd`` elementwise, one launch.
  * "mean" / "sum": ``_bce_fwd`` with REDUCE: each program reduces a fixed chunk of CHUNK
    elements (tile by tile, then ``tl.sum``) to one float32 partial.  N <= CHUNK: one program
    writes the final value itself (one launch).  Otherwise ``_bce_sum`` (one program) adds the
    partials in a fixed order.  No atomics: bitwise reproducible.
Backward: ``_bce_bwd`` elementwise (grad_input, and grad_target when asked), one launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backends import new_empty

BLOCK = 1024
TILES_PER_CHUNK = 8
CHUNK = BLOCK * TILES_PER_CHUNK
SUM_BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _log1p_small(e):
    # log1p(e) for e in [0, 1], accurate also when 1 + e rounds to 1 (Goldberg's trick).
    u = 1.0 + e
    return tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))


@triton.jit
def _log_sigmoid(x):
    return tl.minimum(x, 0.0) - _log1p_small(tl.exp(-tl.abs(x)))


@triton.jit
def _tile_loss(x_ptr, t_ptr, w_ptr, pw_ptr, offs, mask, t_s,
               HAS_T: tl.constexpr, W_MODE: tl.constexpr, PW_MODE: tl.constexpr):
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_T:
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        t = tl.zeros_like(x) + t_s
    ls = _log_sigmoid(x)
    if PW_MODE == 0:
        loss = (1.0 - t) * x - ls
    else:
        if PW_MODE == 1:
            pw = tl.load(pw_ptr).to(tl.float32)
        else:
            pw = tl.load(pw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        loss = (1.0 - t) * x - ((pw - 1.0) * t + 1.0) * ls
    if W_MODE == 1:
        loss = loss * tl.load(w_ptr).to(tl.float32)
    elif W_MODE == 2:
        loss = loss * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return loss


@triton.jit
def _bce_fwd(x_ptr, t_ptr, w_ptr, pw_ptr, out_ptr, N, t_s, scale,
             HAS_T: tl.constexpr, W_MODE: tl.constexpr, PW_MODE: tl.constexpr, REDUCE: tl.constexpr,
             FINAL: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr):
    pid = tl.program_id(0)
    if REDUCE:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        base = pid.to(tl.int64) * (BLOCK * TILES)
        for i in range(TILES):
            offs = base + i * BLOCK + tl.arange(0, BLOCK)
            mask = offs < N
            loss = _tile_loss(x_ptr, t_ptr, w_ptr, pw_ptr, offs, mask, t_s, HAS_T, W_MODE, PW_MODE)
            acc += tl.where(mask, loss, 0.0)
        s = tl.sum(acc, axis=0)
        if FINAL:  # one program: the result itself (mean: scale = 1 / N)
            tl.store(out_ptr, (s * scale).to(out_ptr.dtype.element_ty))
        else:      # a float32 partial
            tl.store(out_ptr + pid, s)
    else:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        loss = _tile_loss(x_ptr, t_ptr, w_ptr, pw_ptr, offs, mask, t_s, HAS_T, W_MODE, PW_MODE)
        tl.store(out_ptr + offs, loss.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bce_sum(p_ptr, out_ptr, P, scale, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, P, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(p_ptr + offs, mask=offs < P, other=0.0)
    tl.store(out_ptr, (tl.sum(acc, axis=0) * scale).to(out_ptr.dtype.element_ty))


@triton.jit
def _bce_bwd(g_ptr, x_ptr, t_ptr, w_ptr, pw_ptr, gx_ptr, gt_ptr, N, t_s, g_scale,
             HAS_T: tl.constexpr, W_MODE: tl.constexpr, PW_MODE: tl.constexpr, G_FULL: tl.constexpr,
             NEED_T: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_T:
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        t = tl.zeros_like(x) + t_s
    if G_FULL:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:  # mean / sum: one incoming value (g_scale = 1 / N for mean)
        g = tl.zeros_like(x) + tl.load(g_ptr).to(tl.float32) * g_scale
    if W_MODE == 1:
        g = g * tl.load(w_ptr).to(tl.float32)
    elif W_MODE == 2:
        g = g * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-x))
    if PW_MODE == 0:
        d = s - t
    else:
        if PW_MODE == 1:
            pw = tl.load(pw_ptr).to(tl.float32)
        else:
            pw = tl.load(pw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        pt = pw * t
        d = (pt + 1.0 - t) * s - pt
    tl.store(gx_ptr + offs, (d * g).to(gx_ptr.dtype.element_ty), mask=mask)
    if NEED_T:
        if PW_MODE == 0:
            dt = -x
        else:
            dt = _log_sigmoid(-x) - pw * _log_sigmoid(x)
        tl.store(gt_ptr + offs, (dt * g).to(gt_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------ launchers
def _weight(w, input):
    """(mode, tensor) for the kernels: 0 absent, 1 one element, 2 contiguous float32 of input's shape."""
    if w is None:
        return 0, input  # any valid pointer; never read
    w = w.to(torch.float32)
    if w.numel() == 1:
        return 1, w.reshape(())
    if w.shape != input.shape:
        w = w.expand(input.shape)
    return 2, w.contiguous()


def forward(input, target, target_scalar, weight, pos_weight, reduction):
    x = input.contiguous()
    t = target.contiguous() if target is not None else x
    N = x.numel()
    wm, w = _weight(weight, x)
    pm, pw = _weight(pos_weight, x)
    flags = dict(HAS_T=target is not None, W_MODE=wm, PW_MODE=pm)
    if reduction == 0:
        out = new_empty(x.shape, dtype=x.dtype, device=x.device)
        if N:
            _bce_fwd[(triton.cdiv(N, BLOCK),)](x, t, w, pw, out, N, target_scalar, 1.0, **flags, REDUCE=False,
                                               FINAL=False, BLOCK=BLOCK, TILES=1, num_warps=NUM_WARPS)
        return out
    scale = (1.0 / N if N else float("nan")) if reduction == 1 else 1.0
    out = new_empty((), dtype=x.dtype, device=x.device)
    P = triton.cdiv(N, CHUNK)
    if P <= 1:
        _bce_fwd[(1,)](x, t, w, pw, out, N, target_scalar, scale, **flags, REDUCE=True, FINAL=True,
                       BLOCK=BLOCK, TILES=TILES_PER_CHUNK, num_warps=NUM_WARPS)
        return out
    partial = new_empty((P,), dtype=torch.float32, device=x.device)
    _bce_fwd[(P,)](x, t, w, pw, partial, N, target_scalar, 1.0, **flags, REDUCE=True, FINAL=False,
                   BLOCK=BLOCK, TILES=TILES_PER_CHUNK, num_warps=NUM_WARPS)
    _bce_sum[(1,)](partial, out, P, scale, BLOCK=SUM_BLOCK, num_warps=NUM_WARPS)
    return out


def backward(grad_out, input, target, target_scalar, weight, pos_weight, reduction, need_target):
    x = input.contiguous()
    t = target.contiguous() if target is not None else x
    N = x.numel()
    wm, w = _weight(weight, x)
    pm, pw = _weight(pos_weight, x)
    g = grad_out.to(x.dtype)
    if reduction == 0:
        g = g.expand(x.shape).contiguous()
        g_scale = 1.0
    else:
        g = g.reshape(())
        g_scale = 1.0 / N if (reduction == 1 and N) else 1.0
    gx = new_empty(x.shape, dtype=x.dtype, device=x.device)
    gt = new_empty(x.shape, dtype=x.dtype, device=x.device) if need_target else x.new_empty((0,))
    if N:
        _bce_bwd[(triton.cdiv(N, BLOCK),)](g, x, t, w, pw, gx, gt if need_target else gx, N, target_scalar, g_scale,
                                           HAS_T=target is not None, W_MODE=wm, PW_MODE=pm, G_FULL=reduction == 0,
                                           NEED_T=bool(need_target), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return gx, gt


def aot_specs():
    from ._aot import AotSpec
    specs = []
    for dt in ("fp32", "fp16", "bf16"):
        for has_t in (False, True):
            for wm, pm in ((0, 0), (2, 2), (1, 1)):
                sig = {"x_ptr": f"*{dt}", "t_ptr": f"*{dt}", "w_ptr": "*fp32", "pw_ptr": "*fp32"}
                tag = f"{dt},target={'tensor' if has_t else 'float'},w={wm},pw={pm}"
                for reduce, final in ((False, False), (True, False), (True, True)):
                    out = "*fp32" if (reduce and not final) else f"*{dt}"
                    specs.append(AotSpec(
                        f"bce_fwd[{tag},reduce={reduce},final={final}]", _bce_fwd,
                        {**sig, "out_ptr": out, "N": "i64", "t_s": "fp32", "scale": "fp32",
                         "HAS_T": "constexpr", "W_MODE": "constexpr", "PW_MODE": "constexpr", "REDUCE": "constexpr",
                         "FINAL": "constexpr", "BLOCK": "constexpr", "TILES": "constexpr"},
                        {"HAS_T": has_t, "W_MODE": wm, "PW_MODE": pm, "REDUCE": reduce, "FINAL": final,
                         "BLOCK": BLOCK, "TILES": TILES_PER_CHUNK if reduce else 1}, num_warps=NUM_WARPS))
                for g_full in (False, True):
                    for need_t in ((False, True) if has_t else (False,)):
                        specs.append(AotSpec(
                            f"bce_bwd[{tag},g_full={g_full},need_t={need_t}]", _bce_bwd,
                            {"g_ptr": f"*{dt}", **sig, "gx_ptr": f"*{dt}", "gt_ptr": f"*{dt}", "N": "i64",
                             "t_s": "fp32", "g_scale": "fp32", "HAS_T": "constexpr", "W_MODE": "constexpr",
                             "PW_MODE": "constexpr", "G_FULL": "constexpr", "NEED_T": "constexpr",
                             "BLOCK": "constexpr"},
                            {"HAS_T": has_t, "W_MODE": wm, "PW_MODE": pm, "G_FULL": g_full, "NEED_T": need_t,
                             "BLOCK": BLOCK}, num_warps=NUM_WARPS))
        specs.append(AotSpec(f"bce_sum[{dt}]", _bce_sum, {"p_ptr": "*fp32", "out_ptr": f"*{dt}", "P": "i32",
                                                           "scale": "fp32", "BLOCK": "constexpr"},
                             {"BLOCK": SUM_BLOCK}, num_warps=NUM_WARPS))
    return specs
