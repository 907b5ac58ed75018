"""The GAN trainer under torchrun (``DistContext``).

``torchrun --nproc_per_node=N -m gankern train ...`` sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/...;
``gankern.gan.trainer.train`` then runs one rank of a DistributedDataParallel job (see ``setup``).  Without
those variables ``setup`` returns a single-process context whose methods do nothing.  The synchronized
BatchNorm it converts the models to is the kernel library's (``gankern.distributed``).
"""
from __future__ import annotations

import contextlib
import datetime
import inspect
import os

import torch
import torch.distributed as dist

from ..distributed import convert_sync_batchnorm, has_batch_norm

__all__ = ["DistributedError", "DistContext", "launched_by_torchrun", "setup", "rank_seed", "timeout_seconds"]

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
