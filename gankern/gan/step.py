"""The training step: one discriminator and one generator update, as an object with its own state.

``TrainStep`` is the tuned loop:
  * one generator forward per step: its fake batch is detached for the D step and reused for the G step;
  * the D step scores ``cat(real, fake)`` in one forward (the discriminators have no BatchNorm, so this
    equals two forwards) and adds ``BCE(D(real), real_label) + BCE(D(fake), 0)`` with float labels
    through the fused ``gankern.bce_with_logits``;
  * during the G step the discriminator's parameters have ``requires_grad=False`` (no weight grads);
  * ``torch.optim.Adam(fused=True)`` (works on CPU and CUDA in torch 2.13), optional generator EMA;
  * ``precision`` "bf16" / "fp16": mixed precision (see ``TrainStep``).
It holds the models, optimizers, gradient scaler and EMA generator, and saves / restores them
(``state_dict`` / ``load_state_dict``: the checkpoint's model and optimizer entries).  The trainer, the
benchmarks and ``--compare-torch`` all use it.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .config import PRECISION_DTYPES, PRECISIONS
from .models import recalibrate_batch_norm

__all__ = ["TrainStep", "StateError", "WeightCasts", "make_train_step", "make_optimizers", "BN_RECAL_SEED"]

BN_RECAL_SEED = 1  # noise for recalibrate_batch_norm of the EMA generator


class StateError(ValueError):
    """A saved state does not fit the step (optimizer state of another model, no EMA generator saved)."""


def make_optimizers(G, D, cfg, device):
    kw = dict(betas=(cfg.beta1, cfg.beta2))
    if device.type in ("cpu", "cuda"):
        kw["fused"] = True
    return (torch.optim.Adam(G.parameters(), lr=cfg.lr, **kw),
            torch.optim.Adam(D.parameters(), lr=cfg.lr_d or cfg.lr, **kw))


class WeightCasts:
    """Reduced-precision copies of a model's GEMM weights (Linear / Conv / gankern's fused linears), each
    made once per update of its fp32 weight and reused by every forward until the next update.

    Under autocast torch casts a weight per forward (its cast cache lives for one autocast region;
    gankern's modules cast per call), so the discriminator, run twice per step, would cast its
    weights twice.  Here a copy lives until ``updated()`` is called (the step calls it after each
    optimizer step: fused Adam does not bump the parameters' version counters) or the weight's
    version counter moves (in-place changes such as ``load_state_dict``): D's copies made for the G
    step (after D's update) serve the next D step too, so every weight is cast once per step.  Gradients flow to the fp32
    weight (the copy's backward casts the gradient up), so master weights and optimizer state stay
    fp32.  BatchNorm parameters and all buffers are left in fp32.  ``casts`` counts the casts made.
    """

    _TYPES = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)

    def __init__(self, model, dtype):
        from ..nn import LinearLeakyReLU
        self.dtype = dtype
        self.casts = 0
        self.entries = []
        for name, m in model.named_modules():
            if isinstance(m, self._TYPES + (LinearLeakyReLU,)):
                for pn in ("weight", "bias"):
                    p = getattr(m, pn, None)
                    if isinstance(p, torch.nn.Parameter) and p.is_floating_point() and p.dtype != dtype:
                        self.entries.append((f"{name}.{pn}" if name else pn, p))
        self._cache = {}

    def updated(self):
        """The weights changed (an optimizer step): drop the copies."""
        self._cache.clear()

    def params(self):
        """{name: low-precision tensor} for ``torch.func.functional_call``; connected to the fp32 weight
        for autograd where it requires grad (and grad mode is on)."""
        out = {}
        track = torch.is_grad_enabled()
        for name, p in self.entries:
            hit = self._cache.get(name)
            if hit is None or hit[0] != p._version:
                hit = (p._version, p.detach().to(self.dtype))
                self._cache[name] = hit
                self.casts += 1
            out[name] = _CastUp.apply(p, hit[1]) if track and p.requires_grad else hit[1]
        return out


class _CastUp(torch.autograd.Function):
    """Forward: the cached low-precision copy of ``weight``; backward: the gradient cast to the weight's dtype."""

    @staticmethod
    def forward(ctx, weight, low):
        ctx.dtype = weight.dtype
        return low.view_as(low)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None


def _unwrapped(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _loss(fused, backend, batch_size, real_label, device):
    """``bce(logits, label)``: gankern's fused BCE with a float label, or torch's with label tensors."""
    if fused:
        from .. import bce_with_logits
        return lambda logits, label: bce_with_logits(logits, label, backend=backend)
    targets = {float(real_label): torch.full((batch_size, 1), float(real_label), device=device),
               0.0: torch.zeros(batch_size, 1, device=device), 1.0: torch.ones(batch_size, 1, device=device)}
    return lambda logits, label: F.binary_cross_entropy_with_logits(logits, targets[label])


class _Cast:
    """How a model runs under the step's precision: itself, or (bf16/fp16 with cached casts) through
    ``functional_call`` with its GEMM weights cast once per update."""

    def __init__(self, model, dtype):
        self.model, self.casts = model, (WeightCasts(model, dtype) if dtype is not None else None)

    def __call__(self, x):
        if self.casts is None:
            return self.model(x)
        from torch.func import functional_call
        return functional_call(self.model, self.casts.params(), (x,), strict=False)

    def updated(self):
        if self.casts is not None:
            self.casts.updated()


class TrainStep:
    """The tuned training step: ``step(real) -> (loss_d, loss_g, d_real, d_fake)`` (tensors).

    ``fused`` selects the loss: gankern's fused BCE with float labels, or torch's with label tensors.
    ``ema``: None or ``(ema_model, decay)``.  ``noise``: None (``torch.randn(batch_size, z_dim)`` from the
    global RNG) or a callable returning the step's noise batch.
    G and D may be DistributedDataParallel wrappers (the trainer under torchrun): the G step then calls
    D's inner module, since DDP would wait for gradients of D's frozen parameters that never come.

    ``precision`` "bf16" / "fp16": the forwards run under ``torch.autocast(device, dtype)`` with fp32
    master weights and optimizer state; the GEMM weights are cast once per step (``WeightCasts``,
    ``cache_casts=False``: autocast's own per-forward casts; DDP-wrapped models use those); BatchNorm
    statistics and the loss (logits cast up) in fp32.  fp16 needs ``scaler`` (one ``torch.amp.GradScaler``
    for both optimizers: each loss scaled, each optimizer stepped through it, ``update()`` once per step).
    ``weight_casts()`` counts the casts made so far.
    """

    def __init__(self, G, D, opt_g, opt_d, *, z_dim, batch_size, device, real_label=1.0, fused=True, backend=None,
                 ema=None, noise=None, precision="fp32", scaler=None, cache_casts=True):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
        if precision == "fp16" and scaler is None:
            raise ValueError("precision 'fp16' needs a gradient scaler (torch.amp.GradScaler) shared by both "
                             "optimizers")
        self.G, self.D = _unwrapped(G), _unwrapped(D)  # what is saved, loaded and sampled from
        self.opt_g, self.opt_d, self.scaler = opt_g, opt_d, scaler
        self.z_dim, self.batch_size, self.device, self.noise = z_dim, batch_size, device, noise
        self.real_label = float(real_label)
        self.bce = _loss(fused, backend, batch_size, real_label, device)
        self.ema_model, self.ema_decay = ema if ema is not None else (None, 0.0)
        self._ema_pairs = (list(self.ema_model.parameters()), list(self.G.parameters())) if ema is not None else None
        self.ema_count = 0          # EMA updates so far (the EMA warm-up depends on it)
        self._recalibrated_at = None  # ema_count when the EMA generator's BatchNorm statistics were recomputed
        self._d_params = list(D.parameters())
        self.amp_dtype = PRECISION_DTYPES[precision]
        ddp = self.G is not G or self.D is not D
        cast = self.amp_dtype if cache_casts and not ddp else None
        self._run_g, self._run_d = _Cast(G, cast), _Cast(D, cast)
        self._run_d_for_g = self._run_d if cast is not None else _Cast(self.D, None)

    # ---------------------------------------------------------------- the step
    def _amp(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _update(self, loss, opt, run):
        opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            opt.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)
        run.updated()

    def _update_ema(self):
        self.ema_count += 1
        w = 1.0 - min(self.ema_decay, (1.0 + self.ema_count) / (10.0 + self.ema_count))
        with torch.no_grad():
            # parameters only: the EMA model's BatchNorm statistics are recomputed for its own weights
            # before it is used (sample_model), not copied from G.
            torch._foreach_lerp_(*self._ema_pairs, w)

    def __call__(self, real):
        z = torch.randn(self.batch_size, self.z_dim, device=self.device) if self.noise is None else self.noise()
        with self._amp():
            fake = self._run_g(z)
        # D step: real and (detached) fake in one forward.
        for p in self._d_params:
            p.requires_grad_(True)
        with self._amp():
            logits = self._run_d(torch.cat([real.to(fake.dtype), fake.detach()]))
        logits = logits.float()  # the loss in fp32
        d_real, d_fake = logits[:self.batch_size], logits[self.batch_size:]
        loss_d = self.bce(d_real, self.real_label) + self.bce(d_fake, 0.0)
        self._update(loss_d, self.opt_d, self._run_d)
        # G step: the same fake batch, D frozen.
        for p in self._d_params:
            p.requires_grad_(False)
        with self._amp():
            logits_g = self._run_d_for_g(fake)
        loss_g = self.bce(logits_g.float(), 1.0)
        self._update(loss_g, self.opt_g, self._run_g)
        if self.scaler is not None:
            self.scaler.update()
        if self.ema_model is not None:
            self._update_ema()
        return loss_d, loss_g, d_real, d_fake

    # ---------------------------------------------------------------- what it knows
    def weight_casts(self):
        return sum(r.casts.casts for r in (self._run_g, self._run_d) if r.casts is not None)

    def ema_updates(self):
        return self.ema_count

    def set_ema_updates(self, n):
        self.ema_count = int(n)

    def set_lr_factor(self, lr, lr_d, factor):
        """Both learning rates scaled by ``factor`` (the schedule's value for this step)."""
        for opt, base in ((self.opt_g, lr), (self.opt_d, lr_d)):
            for group in opt.param_groups:
                group["lr"] = base * factor

    def sample_model(self):
        """The generator samples come from: G, or the EMA generator with BatchNorm statistics for its current
        weights (recomputed at most once per EMA update)."""
        if self.ema_model is None:
            return self.G
        if self._recalibrated_at != self.ema_count:
            recalibrate_batch_norm(self.ema_model, self.z_dim, self.device, BN_RECAL_SEED)
            self._recalibrated_at = self.ema_count
        return self.ema_model

    # ---------------------------------------------------------------- state
    def state_dict(self):
        """The checkpoint's model and optimizer entries (the EMA generator with recalibrated statistics)."""
        ema = self.ema_model is not None
        return {"G": self.G.state_dict(), "D": self.D.state_dict(),
                "G_ema": self.sample_model().state_dict() if ema else None,
                "G_ema_bn": "recalibrated" if ema else None, "ema_updates": self.ema_count,
                "opt_G": self.opt_g.state_dict(), "opt_D": self.opt_d.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state, fit=None):
        """Restore what ``state_dict`` saved.  ``fit(module, state_dict, what)`` loads a model's weights (default
        ``module.load_state_dict``; the trainer passes one with a clear error); ``StateError`` otherwise."""
        fit = fit or (lambda module, sd, what: module.load_state_dict(sd))
        fit(self.G, state["G"], "generator")
        fit(self.D, state["D"], "discriminator")
        try:
            self.opt_g.load_state_dict(state["opt_G"])
            self.opt_d.load_state_dict(state["opt_D"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise StateError(f"the optimizer state does not fit the model ({e})") from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema_model is not None:
            if state.get("G_ema") is None:
                raise StateError("the run uses an EMA generator (--ema) but the checkpoint holds none")
            fit(self.ema_model, state["G_ema"], "EMA generator")
            self.ema_count = int(state.get("ema_updates", state.get("step", 0)))
            self._recalibrated_at = None


def make_train_step(G, D, opt_g, opt_d, **kw) -> TrainStep:
    """``TrainStep(G, D, opt_g, opt_d, **kw)`` (the name the benchmarks and older code use)."""
    return TrainStep(G, D, opt_g, opt_d, **kw)
