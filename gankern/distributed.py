"""Training on several devices or machines: synchronized fused BatchNorm and the trainer under torchrun.

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

The trainer under torchrun (``DistContext``)
--------------------------------------------
``torchrun --nproc_per_node=N -m gankern train ...`` sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/...;
``gankern.train.train`` then runs one rank of a DistributedDataParallel job (see ``setup``).  Without
those variables ``setup`` returns a single-process context whose methods do nothing.
"""
from __future__ import annotations

import contextlib
import datetime
import inspect
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["convert_sync_batchnorm", "sync_batch_norm_act", "sync_needed", "DistributedError", "DistContext",
           "launched_by_torchrun", "setup", "rank_seed"]


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


# =================================================================================================
# the trainer under torchrun

class DistributedError(RuntimeError):
    """A collective with the other ranks failed (a rank died, hung past the timeout, or disagreed)."""


_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """True when the torchrun (torch.distributed.run) environment variables are set."""
    return all(k in os.environ for k in _ENV)


def rank_seed(seed: int, rank: int) -> int:
    """The torch seed of ``rank``: ``seed`` itself on rank 0 (so a 1-rank torchrun run equals a plain run),
    an independent 63-bit seed (numpy SeedSequence of (seed, rank)) elsewhere."""
    if rank == 0:
        return int(seed)
    import numpy as np
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(rank)]).generate_state(1, np.uint64)[0]) \
        & (2 ** 63 - 1)


def timeout_seconds() -> float:
    """Timeout of every collective: ``GANKERN_DIST_TIMEOUT`` seconds (default 600)."""
    return float(os.environ.get("GANKERN_DIST_TIMEOUT", "600"))


class DistContext:
    """What one rank of a training job needs to know and do; the single-process instance is all no-ops.

    ``rank``, ``world``, ``local_rank``, ``is_main`` (rank 0: the only rank that writes files),
    ``enabled`` (a process group of > 1 ranks ... or 1, under torchrun), ``device``.
    """

    def __init__(self, device, rank=0, world=1, local_rank=0, enabled=False):
        self.device, self.rank, self.world, self.local_rank, self.enabled = device, rank, world, local_rank, enabled
        self.is_main = rank == 0

    # ---------------------------------------------------------------- set-up
    def share(self, fn):
        """Run ``fn()`` on rank 0 and give its result (or raise its exception) on every rank."""
        if not self.enabled:
            return fn()
        box = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as e:  # sent to the other ranks, then raised everywhere
                box[0] = ("err", e)
        dist.broadcast_object_list(box, src=0)
        kind, val = box[0]
        if kind == "err":
            raise val
        return val

    def local_batch_size(self, batch_size: int) -> int:
        if batch_size % self.world:
            raise ValueError(f"--batch-size is the global batch and must be divisible by the number of ranks: "
                             f"{batch_size} is not divisible by {self.world} (each rank trains on batch_size / "
                             f"world_size rows)")
        return batch_size // self.world

    def local_rows(self, idx):
        """This rank's slice of the global batch ``idx`` (rank r: rows r*b .. (r+1)*b)."""
        if not self.enabled:
            return idx
        b = idx.shape[0] // self.world
        return idx[self.rank * b:(self.rank + 1) * b]

    def seed_rank(self, seed: int):
        """After the models are built (same weights everywhere): give each rank its own noise stream."""
        if self.enabled and self.rank != 0:
            torch.manual_seed(rank_seed(seed, self.rank))

    def wrap(self, G, D, sync_bn=None):
        """(G_train, D_train): the models the training step calls.  Under torchrun they are
        DistributedDataParallel wrappers (after converting BatchNorm to the synchronized kind when
        ``sync_bn``; None = when the model has BatchNorm) that do not broadcast buffers before each
        forward (``broadcast_buffers=False``, called ``forward_sync_buffers=False`` since torch 2.13; the
        buffers are still made equal once, when DDP is built):

        * the BatchNorm running statistics need no broadcast: with synchronized BatchNorm every rank
          computes the same global statistics (same bits), so the buffers stay identical without a
          collective (tested); with ``--no-sync-bn`` each rank keeps its own, and rank 0's (the ones a
          one-device run would have had) are saved and sampled from;
        * with ``broadcast_buffers=True`` DDP copies rank 0's buffers in place before *every* forward: a
          model with BatchNorm called twice before its backward (a discriminator scoring real and fake in
          two forwards) then has a tensor saved for the backward modified in place, and torch raises "one
          of the variables needed for gradient computation has been modified by an inplace operation"
          (with cuDNN's BatchNorm, which saves the running statistics: pytorch/pytorch#175024, #22095;
          torch's CPU kernel does not save them, so on CPU it trains either way); and it costs one
          broadcast per forward.
        The unwrapped modules stay the ones to sample from, save and load (no "module." prefix).
        """
        if not self.enabled:
            return G, D
        from torch.nn.parallel import DistributedDataParallel as DDP
        out = []
        for m in (G, D):
            if sync_bn or (sync_bn is None and has_batch_norm(m)):
                m2 = convert_sync_batchnorm(m)
                assert m2 is m  # models are containers: converted in place
            kw = dict(device_ids=[self.device.index], output_device=self.device.index) \
                if self.device.type == "cuda" else {}
            # torch 2.13 renamed the option (forward_sync_buffers; buffers are still synced once at init)
            if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
                kw["forward_sync_buffers"] = False
            else:
                kw["broadcast_buffers"] = False
            out.append(DDP(m, **kw) if any(p.requires_grad for p in m.parameters()) else m)
        return tuple(out)

    # ---------------------------------------------------------------- during training
    def mean(self, t):
        """The mean of ``t`` over the ranks (identical on every rank)."""
        if not self.enabled:
            return t
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t / self.world

    def rng_states(self):
        """Every rank's RNG state, for the checkpoint rank 0 writes: [{"torch": ..., "cuda": [...]}] (all ranks call)."""
        st = {"torch": torch.get_rng_state(),
              "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []}
        if not self.enabled:
            return [st]
        allst = [None] * self.world
        dist.all_gather_object(allst, st)
        return allst

    def restore_rng(self, rng: dict, seed: int, step: int) -> bool:
        """Set this rank's RNG from a checkpoint's ``rng`` entry; True when that is exact (same world size).

        A checkpoint of another world size: rank 0 takes the saved rank-0 state, the other ranks fresh
        streams seeded from (``seed``, ``step``, rank)."""
        ranks = rng.get("ranks") or [{"torch": rng["torch"], "cuda": rng.get("cuda") or []}]
        exact = len(ranks) == self.world
        if exact or self.rank == 0:
            mine = ranks[self.rank]
            torch.set_rng_state(mine["torch"].cpu())
            if self.device.type == "cuda" and mine.get("cuda"):
                torch.cuda.set_rng_state_all([s.cpu() for s in mine["cuda"]])
        else:
            torch.manual_seed(rank_seed(int(seed) * 1_000_003 + int(step), self.rank))
        return exact

    @contextlib.contextmanager
    def guard(self):
        """Turn a failed collective into a ``DistributedError`` that says what happened; clean up at the end."""
        try:
            yield self
        except DistributedError:
            raise
        except Exception as e:
            if self.enabled and _is_comm_error(e):
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise DistributedError(
                    f"rank {self.rank} of {self.world}: a collective with the other ranks failed -- another rank "
                    f"probably exited or crashed (see its output), or did not answer within "
                    f"GANKERN_DIST_TIMEOUT={timeout_seconds():g}s: {type(e).__name__}: {first}") from e
            raise
        else:
            self.close()

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _is_comm_error(e) -> bool:
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    s = str(e)
    return any(k in s for k in ("Gloo", "gloo", "NCCL", "Connection", "connection", "Timed out", "timed out",
                                "Socket", "socket", "peer"))


def setup(device: torch.device) -> DistContext:
    """Join the torchrun job when launched by torchrun (else a single-process ``DistContext``).

    Backend: NCCL for CUDA devices (rank ``r`` uses ``cuda:LOCAL_RANK``), gloo for CPU; collectives
    time out after ``GANKERN_DIST_TIMEOUT`` seconds (default 600).
    """
    if not launched_by_torchrun():
        return DistContext(device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = datetime.timedelta(seconds=timeout_seconds())
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl", timeout=timeout, device_id=device)
    elif device.type == "cpu":
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timeout)
    else:
        raise ValueError(f"training under torchrun supports cpu (gloo) and cuda (NCCL) devices; got {device}")
    return DistContext(device, dist.get_rank(), dist.get_world_size(), local_rank, enabled=True)
