"""Triton kernels of the fused BatchNorm + ReLU / LeakyReLU (forward and backward).

The activation is ``relu`` for ``negative_slope == 0`` and ``leaky_relu(., negative_slope)`` for
``negative_slope > 0`` (one runtime argument, the same kernels): see ``_act`` / ``_act_grad``.

The input is seen as (N, C, S) with arbitrary strides (sN, sC, sS): (N, C) and channels-last
inputs have sC == 1 (tiles are wide in C), contiguous (N, C, L)/(N, C, H, W) have sS == 1
(tiles are long in S).  The reduction index r runs over N * S (n = r // S, s = r % S).

Forward (training):
  1. ``_bnr_stats_partial``: grid (channel blocks, row programs); each program reduces its
     fixed range of rows tile by tile (exact two-pass inside the tile, in registers) and merges
     the tiles with Chan's update -> per-program (mean, m2).  The tile statistics and merges are
     float64: squared deviations of fp32 data beyond ~1e19 overflow float32 (torch's CPU kernel
     accumulates in double as well), and the merge of many tiles keeps full precision.
  2. ``_bnr_fold``: per channel, merges the programs' partials in a fixed order (deterministic,
     no atomics), updates the running stats, writes mean / invstd and the folded scale / shift.
     In eval mode it folds the running stats instead.
  3. ``_bnr_apply``: y = act(fma(x, scale, shift)).
Backward: ``_bnr_bwd_partial`` (sum g, sum g * (x - mean), g = act'(pre) * dy -- the mask is
recomputed from x with the forward's fma), ``_bnr_bwd_final`` (fixed-order merge, dweight, dbias,
dx coefficients), ``_bnr_bwd_dx`` (evaluation: dx = g * weight * invstd only, so an infinite x
keeps the finite gradient torch gives).

Every parameter tensor is made contiguous by the launchers (the kernels index them as ``ptr + c``);
inputs with strides other than contiguous / channels-last are made contiguous too.  No channels
(C == 0) launches nothing; training on an empty batch leaves the running statistics unchanged and
gives zero weight / bias gradients (as torch).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backends import new_empty


@triton.jit
def _act(pre, slope):
    # relu for slope == 0 (NaN propagates, -inf -> 0), else leaky_relu: pre > 0 ? pre : pre * slope
    return tl.where(pre <= 0.0, tl.where(slope == 0.0, 0.0, pre * slope), pre)


@triton.jit
def _act_grad(pre, dy, slope):
    # torch: relu's threshold_backward lets dy through at a NaN pre-activation and gives 0 where
    # pre <= 0 (even for an infinite dy); leaky_relu_backward is pre > 0 ? dy : dy * slope
    return tl.where(pre > 0.0, dy, tl.where(slope == 0.0, tl.where(pre <= 0.0, 0.0, dy), dy * slope))


@triton.jit
def _bnr_stats_partial(x_ptr, pmean_ptr, pm2_ptr, psum_ptr, C, S, R, sN, sC, sS, rows_per_prog,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cc < C
    r_start = pid_r * rows_per_prog
    r_end = tl.minimum(R, r_start + rows_per_prog)
    # shift: the channel's first value (the same for every program); statistics of x - K keep
    # full fp32 precision when |mean| >> std (e.g. offset 1e4, spread 1e-2)
    K = tl.load(x_ptr + cc.to(tl.int64) * sC, mask=cmask, other=0.0).to(tl.float64)
    n_acc = tl.zeros([BLOCK_C], dtype=tl.float64)
    mean = tl.zeros([BLOCK_C], dtype=tl.float64)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    total = tl.zeros([BLOCK_C], dtype=tl.float64)  # plain sum: the non-finite rule (see _bnr_fold)
    for r0 in range(r_start, r_end, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        rmask = rr < r_end
        n = rr // S
        s = rr - n * S
        offs = n.to(tl.int64)[:, None] * sN + s.to(tl.int64)[:, None] * sS + cc.to(tl.int64)[None, :] * sC
        m = rmask[:, None] & cmask[None, :]
        xr = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float64)
        total += tl.sum(xr, axis=0)
        x = tl.where(m, xr - K[None, :], 0.0)
        cnt = tl.minimum(r_end - r0, BLOCK_R).to(tl.float64)
        t_mean = tl.sum(x, axis=0) / cnt
        d = tl.where(m, x - t_mean[None, :], 0.0)
        t_m2 = tl.sum(d * d, axis=0)
        # Chan merge of (n_acc, mean, m2) with (cnt, t_mean, t_m2)
        nn = n_acc + cnt
        f = cnt / nn
        delta = t_mean - mean
        mean = mean + delta * f
        m2 = m2 + t_m2 + delta * delta * n_acc * f
        n_acc = nn
    tl.store(pmean_ptr + pid_r * C + cc, mean, mask=cmask)
    tl.store(pm2_ptr + pid_r * C + cc, m2, mask=cmask)
    tl.store(psum_ptr + pid_r * C + cc, total, mask=cmask)


@triton.jit
def _bnr_fold(x_ptr, sC, pmean_ptr, pm2_ptr, psum_ptr, rm_ptr, rv_ptr, w_ptr, b_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr,
              C, R, rows_per_prog, n_prog_r, momentum, eps,
              TRAINING: tl.constexpr, HAS_RUNNING: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
              BLOCK_C: tl.constexpr):
    cc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cc < C
    if TRAINING:  # (R > 0: the launcher handles an empty batch)
        n_acc = tl.zeros([BLOCK_C], dtype=tl.float64)
        mean = tl.zeros([BLOCK_C], dtype=tl.float64)
        m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
        total = tl.zeros([BLOCK_C], dtype=tl.float64)
        for i in range(0, n_prog_r):
            cnt = (tl.minimum(R, (i + 1) * rows_per_prog) - i * rows_per_prog).to(tl.float64)
            pm = tl.load(pmean_ptr + i * C + cc, mask=cmask, other=0.0)
            p2 = tl.load(pm2_ptr + i * C + cc, mask=cmask, other=0.0)
            total += tl.load(psum_ptr + i * C + cc, mask=cmask, other=0.0)
            nn = n_acc + cnt
            f = cnt / nn
            delta = pm - mean
            mean = mean + delta * f
            m2 = m2 + p2 + delta * delta * n_acc * f
            n_acc = nn
        mean = mean + tl.load(x_ptr + cc.to(tl.int64) * sC, mask=cmask, other=0.0).to(tl.float64)  # undo the shift
        # non-finite data (as torch): the mean is the plain sum / count (+inf stays +inf), the variance NaN
        finite = tl.abs(total) <= 1.7976931348623157e308
        mean = tl.where(finite, mean, total / R)
        m2 = tl.where(finite, m2, total - total)  # inf - inf, NaN: NaN
        var = m2 / R
        if HAS_RUNNING:
            rm = tl.load(rm_ptr + cc, mask=cmask, other=0.0)
            rv = tl.load(rv_ptr + cc, mask=cmask, other=1.0)
            mom = momentum
            new_rm = (1.0 - mom) * rm.to(tl.float64) + mom * mean
            new_rv = (1.0 - mom) * rv.to(tl.float64) + mom * (m2 / (R - 1))
            tl.store(rm_ptr + cc, new_rm.to(rm.dtype), mask=cmask)
            tl.store(rv_ptr + cc, new_rv.to(rv.dtype), mask=cmask)
    else:
        mean = tl.load(rm_ptr + cc, mask=cmask, other=0.0).to(tl.float64)
        var = tl.load(rv_ptr + cc, mask=cmask, other=1.0).to(tl.float64)
    # in double, then rounded: 1e30-scale data has var 1e60 (beyond float32) and invstd 1e-30 (within)
    invstd = (1.0 / tl.sqrt(var + eps)).to(tl.float32)
    mean = mean.to(tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + cc, mask=cmask, other=1.0).to(tl.float32)
    else:
        w = tl.full([BLOCK_C], 1.0, dtype=tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + cc, mask=cmask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros([BLOCK_C], dtype=tl.float32)
    scale = w * invstd
    shift = tl.fma(-mean, scale, b)
    tl.store(mean_ptr + cc, mean, mask=cmask)
    tl.store(invstd_ptr + cc, invstd, mask=cmask)
    tl.store(scale_ptr + cc, scale, mask=cmask)
    tl.store(shift_ptr + cc, shift, mask=cmask)


@triton.jit
def _bnr_apply(x_ptr, y_ptr, scale_ptr, shift_ptr, C, S, R, sN, sC, sS, slope,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    cc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cmask = cc < C
    n = rr // S
    s = rr - n * S
    offs = n.to(tl.int64)[:, None] * sN + s.to(tl.int64)[:, None] * sS + cc.to(tl.int64)[None, :] * sC
    m = (rr < R)[:, None] & cmask[None, :]
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + cc, mask=cmask, other=0.0)
    shift = tl.load(shift_ptr + cc, mask=cmask, other=0.0)
    pre = tl.fma(x, scale[None, :], shift[None, :])
    y = _act(pre, slope)  # NaN propagates, as torch.relu / leaky_relu
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bnr_bwd_partial(dy_ptr, x_ptr, mean_ptr, scale_ptr, shift_ptr, p1_ptr, p2_ptr, C, S, R, sN, sC, sS,
                     rows_per_prog, slope, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cc < C
    mean = tl.load(mean_ptr + cc, mask=cmask, other=0.0)
    scale = tl.load(scale_ptr + cc, mask=cmask, other=0.0)
    shift = tl.load(shift_ptr + cc, mask=cmask, other=0.0)
    r_start = pid_r * rows_per_prog
    r_end = tl.minimum(R, r_start + rows_per_prog)
    s1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        n = rr // S
        s = rr - n * S
        offs = n.to(tl.int64)[:, None] * sN + s.to(tl.int64)[:, None] * sS + cc.to(tl.int64)[None, :] * sC
        m = (rr < r_end)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
        pre = tl.fma(x, scale[None, :], shift[None, :])
        g = _act_grad(pre, dy, slope)
        s1 += tl.sum(g, axis=0)
        s2 += tl.sum(g * (x - mean[None, :]), axis=0)
    tl.store(p1_ptr + pid_r * C + cc, s1, mask=cmask)
    tl.store(p2_ptr + pid_r * C + cc, s2, mask=cmask)


@triton.jit
def _bnr_bwd_final(p1_ptr, p2_ptr, invstd_ptr, w_ptr, dw_ptr, db_ptr, k1_ptr, k2_ptr, k3_ptr, C, R, n_prog_r,
                   TRAINING: tl.constexpr, BLOCK_C: tl.constexpr):
    # w: the weight in float32 (ones when the op has none; the launcher builds it)
    cc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cc < C
    sg = tl.zeros([BLOCK_C], dtype=tl.float32)
    sgd = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(0, n_prog_r):
        sg += tl.load(p1_ptr + i * C + cc, mask=cmask, other=0.0)
        sgd += tl.load(p2_ptr + i * C + cc, mask=cmask, other=0.0)
    invstd = tl.load(invstd_ptr + cc, mask=cmask, other=0.0)
    w = tl.load(w_ptr + cc, mask=cmask, other=1.0)
    tl.store(dw_ptr + cc, (sgd * invstd).to(dw_ptr.dtype.element_ty), mask=cmask)
    tl.store(db_ptr + cc, sg.to(db_ptr.dtype.element_ty), mask=cmask)
    a = w * invstd
    tl.store(k1_ptr + cc, a, mask=cmask)
    if TRAINING:
        tl.store(k2_ptr + cc, -a * sg / R, mask=cmask)
        tl.store(k3_ptr + cc, -a * (invstd * sgd / R), mask=cmask)  # times (x - mean) * invstd (see _bnr_bwd_dx)
    else:
        tl.store(k2_ptr + cc, tl.zeros([BLOCK_C], dtype=tl.float32), mask=cmask)
        tl.store(k3_ptr + cc, tl.zeros([BLOCK_C], dtype=tl.float32), mask=cmask)


@triton.jit
def _bnr_bwd_dx(dy_ptr, x_ptr, dx_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr, k1_ptr, k2_ptr, k3_ptr, C, S, R, sN, sC, sS,
                slope, TRAINING: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    cc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cmask = cc < C
    n = rr // S
    s = rr - n * S
    offs = n.to(tl.int64)[:, None] * sN + s.to(tl.int64)[:, None] * sS + cc.to(tl.int64)[None, :] * sC
    m = (rr < R)[:, None] & cmask[None, :]
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + cc, mask=cmask, other=0.0)[None, :]
    scale = tl.load(scale_ptr + cc, mask=cmask, other=0.0)[None, :]
    shift = tl.load(shift_ptr + cc, mask=cmask, other=0.0)[None, :]
    k1 = tl.load(k1_ptr + cc, mask=cmask, other=0.0)[None, :]
    k2 = tl.load(k2_ptr + cc, mask=cmask, other=0.0)[None, :]
    k3 = tl.load(k3_ptr + cc, mask=cmask, other=0.0)[None, :]
    pre = tl.fma(x, scale, shift)
    g = _act_grad(pre, dy, slope)
    if TRAINING:
        # (x - mean) * invstd is O(1) at any data scale; the textbook -w invstd^3 sgd / M underflows fp32 at 1e30
        invstd = tl.load(invstd_ptr + cc, mask=cmask, other=0.0)[None, :]
        dx = g * k1 + (((x - mean) * invstd) * k3 + k2)
    else:  # k2 = k3 = 0: (x - mean) * 0 would turn an infinite x's finite gradient into NaN
        dx = g * k1
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------- launchers
_FOLD_BLOCK_C = 128
_MAX_ROW_PROGS = 512


def _layout(x: torch.Tensor):
    """(x in a supported layout, N, C, S, sN, sC, sS)."""
    N, C = x.shape[0], x.shape[1]
    S = 1
    for d in x.shape[2:]:
        S *= d
    cl = (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) or \
         (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d))
    if not x.is_contiguous() and not cl:
        x = x.contiguous()
    if x.is_contiguous():
        return x, N, C, S, C * S, S, 1
    return x, N, C, S, C * S, 1, C  # channels-last: (n, s, c) with c fastest


def _blocks(C, S, sC):
    if sC == 1:  # channels innermost: wide tiles in C
        bc = min(64, triton.next_power_of_2(C))
        return max(16, 2048 // bc), bc
    return 256, 1  # planar: long tiles along the spatial axis


def _row_split(R, BLOCK_R, n_cblocks):
    tiles = triton.cdiv(R, BLOCK_R)
    n_prog = max(1, min(tiles, _MAX_ROW_PROGS // max(1, n_cblocks), 64))
    rows_per_prog = triton.cdiv(tiles, n_prog) * BLOCK_R
    n_prog = triton.cdiv(R, rows_per_prog)
    return n_prog, rows_per_prog


def _match(dy, x):
    if x.is_contiguous():
        return dy.contiguous()
    return dy.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def _contig(t):
    return None if t is None else t.contiguous()


def forward(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope=0.0):
    """-> (y, save_mean, save_invstd); running stats (contiguous) updated in place in training mode."""
    x, N, C, S, sN, sC, sS = _layout(input)
    R = N * S
    dev = x.device
    y = _empty_like(x)
    mean = new_empty((C,), dtype=torch.float32, device=dev)
    invstd = new_empty((C,), dtype=torch.float32, device=dev)
    if C == 0:
        return y, mean, invstd
    if training and R == 0:  # no data: running stats unchanged, zero gradients in the backward
        mean.zero_()
        invstd.zero_()
        return y, mean, invstd
    weight, bias = _contig(weight), _contig(bias)
    if not training:
        running_mean, running_var = _contig(running_mean), _contig(running_var)
    scale = torch.empty((C,), dtype=torch.float32, device=dev)
    shift = torch.empty((C,), dtype=torch.float32, device=dev)
    BLOCK_R, BLOCK_C = _blocks(C, S, sC)
    n_cb = triton.cdiv(C, BLOCK_C)
    has_running = running_mean is not None
    dummy = scale
    if training and R > 0:
        n_prog, rpp = _row_split(R, BLOCK_R, n_cb)
        pmean = torch.empty((n_prog, C), dtype=torch.float64, device=dev)
        pm2 = torch.empty((n_prog, C), dtype=torch.float64, device=dev)
        psum = torch.empty((n_prog, C), dtype=torch.float64, device=dev)
        _bnr_stats_partial[(n_cb, n_prog)](x, pmean, pm2, psum, C, S, R, sN, sC, sS, rpp,
                                           BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=_STATS_NUM_WARPS)
    else:
        n_prog, rpp = 0, 1
        pmean = pm2 = psum = torch.empty((1,), dtype=torch.float64, device=dev)  # (unread; the AOT signature)
    _bnr_fold[(triton.cdiv(C, _FOLD_BLOCK_C),)](
        x, sC, pmean, pm2, psum, running_mean if has_running else dummy, running_var if has_running else dummy,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        mean, invstd, scale, shift, C, R, rpp, n_prog, float(momentum), float(eps),
        TRAINING=bool(training), HAS_RUNNING=has_running, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_C=_FOLD_BLOCK_C)
    if R > 0:
        _bnr_apply[(n_cb, triton.cdiv(R, BLOCK_R))](x, y, scale, shift, C, S, R, sN, sC, sS, float(negative_slope),
                                                     BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    return y, mean, invstd


def forward_inplace(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope=0.0):
    """The internal op gankern::_batch_norm_relu_fwd.triton: forward(), with the running stats of any dtype and
    strides updated in place (the schema mutates them).  -> (y, save_mean, save_invstd)."""
    if not training or running_mean is None:  # eval reads the stats in their own dtype (as the cpp kernel does)
        return forward(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope)
    # the kernel updates contiguous float32 stats: copies (memory_format: a strided buffer's copy keeps its
    # strides otherwise), written back after
    rm = running_mean.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
    rv = running_var.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
    out = forward(input, rm, rv, weight, bias, training, momentum, eps, negative_slope)
    running_mean.copy_(rm)
    running_var.copy_(rv)
    return out


def backward(grad_out, input, weight, bias, mean, invstd, training, negative_slope=0.0):
    """-> (grad_input, grad_weight, grad_bias)."""
    x, N, C, S, sN, sC, sS = _layout(input)
    dy = _match(grad_out, x)
    R = N * S
    dev = x.device
    dx = _empty_like(x)
    pdt = weight.dtype if weight is not None else (bias.dtype if bias is not None else torch.float32)
    dw = new_empty((C,), dtype=pdt, device=dev)
    db = new_empty((C,), dtype=pdt, device=dev)
    if C == 0:
        return dx, dw, db
    if R == 0:  # no data: zero gradients (as torch), whatever the saved statistics
        return dx, dw.zero_(), db.zero_()
    mean, invstd = mean.contiguous(), invstd.contiguous()
    scale = torch.empty((C,), dtype=torch.float32, device=dev)
    shift = torch.empty((C,), dtype=torch.float32, device=dev)
    # scale / shift exactly as the forward folded them (same fma) -> same ReLU mask
    w = weight.float().contiguous() if weight is not None else torch.ones((C,), dtype=torch.float32, device=dev)
    b = bias.float().contiguous() if bias is not None else torch.zeros((C,), dtype=torch.float32, device=dev)
    _bnr_refold(mean, invstd, w, b, scale, shift, C)
    k1 = torch.empty((C,), dtype=torch.float32, device=dev)
    k2 = torch.empty_like(k1)
    k3 = torch.empty_like(k1)
    BLOCK_R, BLOCK_C = _blocks(C, S, sC)
    n_cb = triton.cdiv(C, BLOCK_C)
    slope = float(negative_slope)
    n_prog, rpp = _row_split(R, BLOCK_R, n_cb)
    p1 = torch.empty((n_prog, C), dtype=torch.float32, device=dev)
    p2 = torch.empty((n_prog, C), dtype=torch.float32, device=dev)
    _bnr_bwd_partial[(n_cb, n_prog)](dy, x, mean, scale, shift, p1, p2, C, S, R, sN, sC, sS, rpp, slope,
                                     BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    _bnr_bwd_final[(triton.cdiv(C, _FOLD_BLOCK_C),)](
        p1, p2, invstd, w, dw, db, k1, k2, k3, C, R, n_prog,
        TRAINING=bool(training), BLOCK_C=_FOLD_BLOCK_C)
    _bnr_bwd_dx[(n_cb, triton.cdiv(R, BLOCK_R))](dy, x, dx, mean, invstd, scale, shift, k1, k2, k3, C, S, R, sN, sC, sS,
                                                  slope, TRAINING=bool(training), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
                                                  num_warps=_DX_NUM_WARPS)
    return dx, dw, db


@triton.jit
def _bnr_refold_kernel(mean_ptr, invstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, C, BLOCK_C: tl.constexpr):
    cc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cc < C
    mean = tl.load(mean_ptr + cc, mask=cmask, other=0.0)
    invstd = tl.load(invstd_ptr + cc, mask=cmask, other=0.0)
    w = tl.load(w_ptr + cc, mask=cmask, other=1.0)
    b = tl.load(b_ptr + cc, mask=cmask, other=0.0)
    scale = w * invstd
    tl.store(scale_ptr + cc, scale, mask=cmask)
    tl.store(shift_ptr + cc, tl.fma(-mean, scale, b), mask=cmask)


def _bnr_refold(mean, invstd, w, b, scale, shift, C):
    _bnr_refold_kernel[(triton.cdiv(C, _FOLD_BLOCK_C),)](mean, invstd, w, b, scale, shift, C, BLOCK_C=_FOLD_BLOCK_C)


def _empty_like(x):
    """Output in x's layout (contiguous or channels-last), NaN-poisoned under test."""
    from .. import _backends
    t = torch.empty_like(x, memory_format=torch.preserve_format)
    if _backends.POISON and t.numel():
        t.fill_(float("nan"))
    return t


# ----------------------------------------------------------------------------- AOT specs
# The dx kernel holds dy, x and dx tiles at once: with 4 warps the 32x64 fp16 "rows" tile spills on sm_80.
_DX_NUM_WARPS = 8
# The statistics kernel keeps float64 partials of a 32x64 "rows" tile: with 4 warps it spills under Triton 3.6
# (255 registers, ~200 B); 8 warps halve the tile per thread.
_STATS_NUM_WARPS = 8


def aot_specs():
    from ._aot import AotSpec
    specs = []
    strides = {"C": "i32", "S": "i32", "R": "i32", "sN": "i64", "sC": "i32", "sS": "i32"}
    for dt in ("fp32", "fp16", "bf16"):
        for layout, (br, bc) in (("rows", (32, 64)), ("planar", (256, 1))):
            blk = {"BLOCK_R": br, "BLOCK_C": bc}
            cx = {"BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
            specs.append(AotSpec(
                f"batch_norm_relu_stats_partial[{dt},{layout}]", _bnr_stats_partial,
                {"x_ptr": f"*{dt}", "pmean_ptr": "*fp64", "pm2_ptr": "*fp64", "psum_ptr": "*fp64", **strides, "rows_per_prog": "i32", **cx},
                blk, num_warps=_STATS_NUM_WARPS))
            specs.append(AotSpec(
                f"batch_norm_relu_apply[{dt},{layout}]", _bnr_apply,
                {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "scale_ptr": "*fp32", "shift_ptr": "*fp32", **strides,
                 "slope": "fp32", **cx},
                blk))
            specs.append(AotSpec(
                f"batch_norm_relu_bwd_partial[{dt},{layout}]", _bnr_bwd_partial,
                {"dy_ptr": f"*{dt}", "x_ptr": f"*{dt}", "mean_ptr": "*fp32", "scale_ptr": "*fp32",
                 "shift_ptr": "*fp32", "p1_ptr": "*fp32", "p2_ptr": "*fp32", **strides, "rows_per_prog": "i32",
                 "slope": "fp32", **cx},
                blk))
            for training in (True, False):
                specs.append(AotSpec(
                    f"batch_norm_relu_bwd_dx[{dt},{layout},training={training}]", _bnr_bwd_dx,
                    {"dy_ptr": f"*{dt}", "x_ptr": f"*{dt}", "dx_ptr": f"*{dt}", "mean_ptr": "*fp32", "invstd_ptr": "*fp32",
                     "scale_ptr": "*fp32", "shift_ptr": "*fp32", "k1_ptr": "*fp32", "k2_ptr": "*fp32",
                     "k3_ptr": "*fp32", **strides, "slope": "fp32", "TRAINING": "constexpr", **cx},
                    {**blk, "TRAINING": training}, num_warps=_DX_NUM_WARPS))
        pdt = "fp32"
        for training in (True, False):
            specs.append(AotSpec(
                f"batch_norm_relu_fold[{dt},training={training}]", _bnr_fold,
                {"x_ptr": f"*{dt}", "sC": "i32", "pmean_ptr": "*fp64", "pm2_ptr": "*fp64", "psum_ptr": "*fp64", "rm_ptr": f"*{pdt}", "rv_ptr": f"*{pdt}",
                 "w_ptr": f"*{pdt}", "b_ptr": f"*{pdt}", "mean_ptr": "*fp32", "invstd_ptr": "*fp32",
                 "scale_ptr": "*fp32", "shift_ptr": "*fp32", "C": "i32", "R": "i32", "rows_per_prog": "i32",
                 "n_prog_r": "i32", "momentum": "fp32", "eps": "fp32", "TRAINING": "constexpr",
                 "HAS_RUNNING": "constexpr", "HAS_W": "constexpr", "HAS_B": "constexpr", "BLOCK_C": "constexpr"},
                {"TRAINING": training, "HAS_RUNNING": True, "HAS_W": True, "HAS_B": True, "BLOCK_C": _FOLD_BLOCK_C}))
            specs.append(AotSpec(
                f"batch_norm_relu_bwd_final[{dt},training={training}]", _bnr_bwd_final,
                {"p1_ptr": "*fp32", "p2_ptr": "*fp32", "invstd_ptr": "*fp32", "w_ptr": "*fp32", "dw_ptr": f"*{pdt}",
                 "db_ptr": f"*{pdt}", "k1_ptr": "*fp32", "k2_ptr": "*fp32", "k3_ptr": "*fp32", "C": "i32",
                 "R": "i32", "n_prog_r": "i32", "TRAINING": "constexpr", "BLOCK_C": "constexpr"},
                {"TRAINING": training, "BLOCK_C": _FOLD_BLOCK_C}))
        if dt != "fp32":  # params in the input's dtype
            specs.append(AotSpec(
                f"batch_norm_relu_fold[{dt},params={dt}]", _bnr_fold,
                {"x_ptr": f"*{dt}", "sC": "i32", "pmean_ptr": "*fp64", "pm2_ptr": "*fp64", "psum_ptr": "*fp64", "rm_ptr": f"*{dt}", "rv_ptr": f"*{dt}",
                 "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "mean_ptr": "*fp32", "invstd_ptr": "*fp32",
                 "scale_ptr": "*fp32", "shift_ptr": "*fp32", "C": "i32", "R": "i32", "rows_per_prog": "i32",
                 "n_prog_r": "i32", "momentum": "fp32", "eps": "fp32", "TRAINING": "constexpr",
                 "HAS_RUNNING": "constexpr", "HAS_W": "constexpr", "HAS_B": "constexpr", "BLOCK_C": "constexpr"},
                {"TRAINING": True, "HAS_RUNNING": True, "HAS_W": True, "HAS_B": True, "BLOCK_C": _FOLD_BLOCK_C}))
    specs.append(AotSpec(
        "batch_norm_relu_refold", _bnr_refold_kernel,
        {"mean_ptr": "*fp32", "invstd_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32", "scale_ptr": "*fp32",
         "shift_ptr": "*fp32", "C": "i32", "BLOCK_C": "constexpr"}, {"BLOCK_C": _FOLD_BLOCK_C}))
    return specs
