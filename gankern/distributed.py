"""Synchronized fused BatchNorm for training on several devices or machines (``gankern.nn.SyncBatchNormReLU``).

Everything here is built on ``torch.distributed`` (gloo for CPU tensors, NCCL for CUDA); there is no
home-made communication.

Synchronized BatchNorm (``gankern.nn.SyncBatchNormReLU``, ``gankern.nn.convert_sync_batchnorm``)
----------------------------------------------------------------------------------------------
Training mode, with a process group of more than one rank:

* forward: each rank computes its per-channel ``count``, ``mean`` and ``M2`` (``torch.var_mean``:
  Welford, no cancellation); **one** ``all_reduce`` (SUM, float64) of ``[n_i, n_i*m_i, M2_i + n_i*m_i^2]``
  (2C + 1 values) merges them.  That is Chan's parallel formula ``M2 = sum M2_i + sum n_i (m_i - m)^2``
  written as sums around a shift of 0: the within-rank part is exact, and only the between-rank part
  is formed as a difference, in float64, from float32 means (relative error of the variance about
  2^-52 (1 + mean^2/var): below float32 rounding while |mean| < 16000 std).  Unlike torch's
  ``all_gather`` of (mean, invstd, count), an all-reduce of sums handles unequal counts directly and
  its size does not grow with the world size.  Every rank gets the same bits, so the running
  statistics stay identical on every rank.  The normalisation + activation then runs through the
  fused eval-mode kernel (``gankern.batch_norm_relu`` with the global mean / biased variance).
* running statistics: updated with the global mean and the global unbiased variance (``n/(n-1)``).
* backward: the two per-channel sums ``sum(dy)`` and ``sum(dy * xhat)`` (dy masked by the activation)
  in **one** ``all_reduce``, then ``dx = w * invstd * (dy - sum_dy/n - xhat * sum_dy_xhat/n)``.
  ``weight`` / ``bias`` gradients stay local sums, as in torch: DistributedDataParallel reduces them.
* uneven batches and empty batches, as torch's SyncBatchNorm: a rank with no rows contributes a
  count of 0, still joins both collectives (so its peers do not hang) and returns an empty output and
  zero gradients.  Unlike torch, one value per channel on a rank is fine as long as the whole group
  has more than one (torch checks the group too, but only when the world size is 1); a group with at
  most one value per channel raises torch's ``ValueError`` on every rank.
* eval mode, world size 1, or no process group initialised: the local fused path, exactly
  ``BatchNormReLU*d``.

The GAN trainer's torchrun helpers (``DistContext``, ``setup``, ``rank_seed``, ...) live in
``gankern.gan.distributed``; their old names here stay importable.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["convert_sync_batchnorm", "sync_batch_norm_act", "sync_needed", "local_batch_norm_act", "has_batch_norm"]

# the trainer's torchrun helpers, moved to gankern.gan.distributed (imported on first use: the kernel library
# does not import the application)
_MOVED = ("DistributedError", "DistContext", "launched_by_torchrun", "rank_seed", "timeout_seconds", "setup")


def __getattr__(name):
    if name in _MOVED:
        from .gan import distributed as _app
        return getattr(_app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# =================================================================================================
# synchronized BatchNorm

def _group(process_group):
    return process_group if process_group is not None else dist.group.WORLD


def sync_needed(process_group=None) -> bool:
    """True when torch.distributed is initialised and ``process_group`` (default: WORLD) has > 1 rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(_group(process_group)) > 1


def _normalize_act(input, mean, var, weight, bias, eps, negative_slope, backend):
    """act((input - mean) / sqrt(var + eps) * weight + bias) through the fused eval-mode kernel."""
    from .ops.batch_norm_relu import batch_norm_relu
    if negative_slope == 0.0:
        return batch_norm_relu(input, mean, var, weight, bias, False, 0.0, eps, backend=backend)
    import gankern
    op = getattr(gankern, "batch_norm_leaky_relu", None)
    if op is not None:
        return op(input, mean, var, weight, bias, False, 0.0, eps, negative_slope, backend=backend)
    # Until the fused BatchNorm+LeakyReLU op exists, the same maths in torch ops.
    return F.leaky_relu(F.batch_norm(input, mean, var, weight, bias, False, 0.0, eps), negative_slope)


def local_batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps,
                         negative_slope=0.0, backend=None):
    """The unsynchronized path: ``gankern.batch_norm_relu`` (or the LeakyReLU op for a slope != 0)."""
    from .ops.batch_norm_relu import batch_norm_relu
    if negative_slope == 0.0:
        return batch_norm_relu(input, running_mean, running_var, weight, bias, training, momentum, eps,
                               backend=backend)
    import gankern
    op = getattr(gankern, "batch_norm_leaky_relu", None)
    if op is not None:
        return op(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope,
                  backend=backend)
    return F.leaky_relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps),
                        negative_slope)


class _SyncBatchNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, negative_slope,
                process_group, backend):
        C = input.shape[1]
        dims = [0] + list(range(2, input.dim()))
        n_local = input.numel() // C
        f64 = torch.float64
        buf = torch.zeros(2 * C + 1, dtype=f64, device=input.device)
        if n_local > 0:
            xs = input if input.dtype in (torch.float32, f64) else input.float()  # fp16/bf16: float32 statistics
            var, mean = torch.var_mean(xs, dim=dims, correction=0)
            mean = mean.to(f64)
            buf[0] = n_local
            buf[1:C + 1] = mean * n_local
            buf[C + 1:] = var.to(f64) * n_local + mean * mean * n_local
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=process_group)
        n = int(buf[0].item())
        if n <= 1:  # the same n on every rank: every rank raises, none hangs
            raise ValueError(f"Expected more than 1 value per channel when training, got {n} value(s) per channel "
                             f"over the {dist.get_world_size(process_group)} ranks of the process group "
                             f"(input size on this rank {tuple(input.shape)})")
        g_mean = buf[1:C + 1] / n
        g_var = (buf[C + 1:] / n - g_mean * g_mean).clamp_min_(0.0)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.copy_(running_mean.to(f64) * (1.0 - momentum) + g_mean * momentum)
                running_var.copy_(running_var.to(f64) * (1.0 - momentum) + g_var * (n / (n - 1)) * momentum)
        cdt = input.dtype
        mean_c, var_c = g_mean.to(cdt), g_var.to(cdt)
        invstd = torch.rsqrt(g_var + eps).to(cdt)
        if n_local > 0:
            y = _normalize_act(input, mean_c, var_c, weight, bias, eps, negative_slope, backend)
        else:
            y = torch.empty_like(input)
        ctx.n, ctx.slope, ctx.group, ctx.dims = n, float(negative_slope), process_group, dims
        ctx.save_for_backward(input, weight, bias, mean_c, invstd, y)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        input, weight, bias, mean, invstd, y = ctx.saved_tensors
        C, dims, n, slope = input.shape[1], ctx.dims, ctx.n, ctx.slope
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        shape = [1, C] + [1] * (input.dim() - 2)
        local = input.numel() > 0
        if local:
            xhat = (input - mean.view(shape)) * invstd.view(shape)
            if slope >= 0.0:  # the output's sign is the pre-activation's: the mask the forward used
                pos = y > 0
            else:
                z = xhat * weight.view(shape) if weight is not None else xhat
                pos = (z + bias.view(shape) if bias is not None else z) > 0
            g = torch.where(pos, grad_out, grad_out * slope) if slope != 0.0 else grad_out.masked_fill(~pos, 0)
            sum_dy = g.sum(dims)
            sum_dy_xhat = (g * xhat).sum(dims)
        else:
            sum_dy = torch.zeros(C, dtype=input.dtype, device=input.device)
            sum_dy_xhat = torch.zeros_like(sum_dy)
        grad_in = None
        if need_x:  # torch's rule: the collective runs when the input needs a gradient (on every rank alike)
            both = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(both, op=dist.ReduceOp.SUM, group=ctx.group)
            if local:
                g_dy, g_dy_xhat = both[:C] / n, both[C:] / n
                scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
                grad_in = (g - g_dy.view(shape) - xhat * g_dy_xhat.view(shape)) * scale.view(shape)
            else:
                grad_in = torch.zeros_like(input)
        gw = sum_dy_xhat.to(weight.dtype) if need_w and weight is not None else None
        gb = sum_dy.to(bias.dtype) if need_b and bias is not None else None
        return grad_in, gw, gb, None, None, None, None, None, None, None


def sync_batch_norm_act(input, running_mean, running_var, weight, bias, momentum, eps, negative_slope=0.0,
                        process_group=None, backend=None):
    """Training-mode BatchNorm + (Leaky)ReLU with statistics synchronized over ``process_group``."""
    return _SyncBatchNormAct.apply(input, weight, bias, running_mean, running_var, momentum, eps,
                                   float(negative_slope), _group(process_group), backend)


def convert_sync_batchnorm(module, process_group=None):
    """Mirror of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` that also converts gankern's fused layers.

    Every ``gankern.nn.BatchNormReLU1d/2d`` becomes a ``gankern.nn.SyncBatchNormReLU``, every
    ``BatchNormLeakyReLU1d/2d`` a ``SyncBatchNormLeakyReLU`` (keeping ``backend`` and ``negative_slope``), every torch ``BatchNorm*d`` a ``torch.nn.SyncBatchNorm``
    (torch's own conversion; note torch's SyncBatchNorm runs on GPUs only).  The same Parameter and
    buffer objects are reused (an optimizer built before keeps working), ``training`` and ``qconfig``
    are kept, and ``state_dict`` keys do not change; the state_dict of a ``SyncBatchNormReLU`` is that
    of ``torch.nn.SyncBatchNorm`` (and of ``nn.BatchNorm*d``).  Returns the converted module (a new
    object if ``module`` itself is a BatchNorm).
    """
    from . import nn as gnn
    out = module
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        out = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    elif isinstance(module, gnn._BatchNormAct) and not isinstance(module, gnn.SyncBatchNormReLU):
        slope = float(module.negative_slope)
        kw = dict(bias=module.bias is not None, backend=getattr(module, "backend", None))
        if isinstance(module, gnn._BatchNormLeakyReLU):
            out = gnn.SyncBatchNormLeakyReLU(module.num_features, module.eps, module.momentum, module.affine,
                                             module.track_running_stats, process_group, slope, **kw)
        else:
            out = gnn.SyncBatchNormReLU(module.num_features, module.eps, module.momentum, module.affine,
                                        module.track_running_stats, process_group, **kw)
            out.negative_slope = slope
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out


def has_batch_norm(module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in module.modules())
