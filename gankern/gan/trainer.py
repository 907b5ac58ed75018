"""The GAN trainer: a step-based loop with checkpoints, exact resume, samples, plots and metrics.

The training step (``make_train_step``) is the tuned loop:
  * one generator forward per step: its fake batch is detached for the D step and reused for the G step;
  * the D step scores ``cat(real, fake)`` in one forward (the discriminators have no BatchNorm, so this
    equals two forwards) and adds ``BCE(D(real), real_label) + BCE(D(fake), 0)`` with float labels
    through the fused ``gankern.bce_with_logits``;
  * during the G step the discriminator's parameters have ``requires_grad=False`` (no weight grads);
  * ``torch.optim.Adam(fused=True)`` (works on CPU and CUDA in torch 2.13), optional generator EMA;
  * ``precision`` "bf16" / "fp16": mixed precision (see ``make_train_step``).

Run folder (``--out``): config.json, metrics.jsonl, samples/step_XXXXXXX.png (fixed noise),
loss.png, final_metrics.json, ckpt_XXXXXXXX.pt (the last ``keep``), .lock (held while a trainer runs).
Checkpoint and run-folder I/O (checksums, lock, atomic writes, temp-file clean-up) live in
``gankern.gan.checkpoint``; the names are re-exported here.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import glob
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import __version__
from . import distributed
from .checkpoint import (CKPT_FORMAT, CKPT_VERSION, CheckpointError, CheckpointWarning, RunFolder,  # noqa: F401
                         RunFolderError, RunLockedError, checkpoint_path, list_checkpoints, load_checkpoint,
                         payload_checksum, read_metrics, save_atomic, save_checkpoint, validate_checkpoint)
from .data import InfiniteSampler, load_dataset
from .models import make_models, set_backend


PRECISIONS = ("fp32", "bf16", "fp16")
PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Every training setting and its default: the one place they live (``gankern train`` builds its
    options' defaults and help from these fields).

    The defaults are the recipe the README demo found to train well (MLP GAN on the digits: within
    4x the Fréchet-distance floor with 10/10 classes): batch 128, one-sided label smoothing 0.9,
    generator EMA 0.999 with BatchNorm statistics recomputed for the EMA weights, and both learning
    rates decaying linearly to 0 over the second half of the run (``lr_decay="auto"``: scaled to
    ``steps``).
    """
    model: str = "mlp"
    dataset: str = "digits"
    data_dir: str | None = None
    steps: int = 10000
    batch_size: int = 128
    lr: float = 2e-4
    lr_d: float | None = None          # discriminator lr (default: lr)
    beta1: float = 0.5
    beta2: float = 0.999
    z_dim: int = 64
    seed: int = 0
    device: str = "auto"
    backend: str | None = None          # None/"auto": gankern picks per device
    precision: str = "fp32"             # fp32 | bf16 | fp16 (CUDA only): mixed precision, fp32 master weights
    out: str = "runs/gan"
    resume: bool = False
    real_label: float = 0.9             # < 1: one-sided label smoothing; 1.0 = off
    ema: float = 0.999                  # generator EMA decay; 0 = off
    lr_decay: list | str | None = "auto"  # [start, end]: both lrs fall linearly to 0 from step start to end;
    #                                      "auto": [steps // 2, steps]; None: constant
    keep: int = 3
    sample_every: int = 1000
    ckpt_every: int = 2000
    eval_every: int = 0                 # quality metric every N steps (0: only at the end)
    log_every: int = 50
    final_eval: bool = True
    quiet: bool = False
    demo: bool = False
    compare_torch: bool = False
    sync_bn: bool | None = None         # under torchrun: synchronized BatchNorm (None: when the model has BatchNorm)

    def to_dict(self):
        return dataclasses.asdict(self)

    def validate(self):
        """Check every setting (the one place: the CLI and ``train()`` both call it); ``ConfigError`` names the
        argument and what was expected.  Normalises ``lr_decay`` and ``backend="auto"``.  Returns self."""
        return validate_config(self)


DEFAULTS = TrainConfig()

# Settings that define the run: a resume must not change them.
LOCKED = ("model", "dataset", "batch_size", "lr", "lr_d", "beta1", "beta2", "z_dim", "seed", "real_label", "ema",
          "lr_decay", "precision")

# The README demo (``--demo``): the default recipe, shorter (9000 steps, ~2 min on 2 CPU cores), MLP GAN on the
# bundled 8x8 digits; only what differs from TrainConfig's defaults.
DEMO = dict(model="mlp", dataset="digits", steps=9000, lr_decay=[4500, 9000], sample_every=1000, ckpt_every=3000,
            out="runs/demo")


def resolve_lr_decay(lr_decay, steps):
    """[start, end] ints, or None; "auto" -> [steps // 2, steps]."""
    if isinstance(lr_decay, str):
        if lr_decay != "auto":
            raise ValueError(f"lr_decay must be 'auto', None or two steps [START, END]; got {lr_decay!r}")
        return [int(steps) // 2, int(steps)] if steps >= 2 else None
    if not lr_decay:
        return None
    if len(lr_decay) != 2 or not 0 <= int(lr_decay[0]) < int(lr_decay[1]):
        raise ValueError(f"lr_decay must be two steps START < END with START >= 0; got {lr_decay!r}")
    return [int(lr_decay[0]), int(lr_decay[1])]


EVAL_NOISE_SEED = 0
BN_RECAL_SEED = 1  # noise for recalibrate_batch_norm of the EMA generator


def lr_factor(step, lr_decay):
    """Learning-rate multiplier for training step ``step`` (1-based): 1 until ``start``, then linear to 0 at ``end``.

    A function of the step alone (no scheduler state), so a resumed run follows the same schedule.
    """
    if not lr_decay:
        return 1.0
    start, end = lr_decay
    if step <= start:
        return 1.0
    return max(0.0, (end - step) / (end - start))


def free_run_dir(base):
    """``base`` if it holds no run yet, else the first free ``base-2``, ``base-3``, ..."""
    def used(d):
        return os.path.exists(os.path.join(d, "metrics.jsonl")) or bool(list_checkpoints(d))
    if not used(base):
        return base
    i = 2
    while used(f"{base}-{i}"):
        i += 1
    return f"{base}-{i}"


# -------------------------------------------------------------------------------------------------
# validation (the one place for settings: TrainConfig.validate, used by the CLI and train())

class ConfigError(ValueError):
    """A setting is out of range or of the wrong type; the message names the argument and what was expected."""


SEED_LIMIT = 2 ** 40     # the sampler seeds epoch e with seed * 1_000_003 + e: must stay inside torch's 64-bit seeds
Z_DIM_LIMIT = 1 << 20


def _arg(name):
    return "--" + name.replace("_", "-")


def _check_int(cfg, name, lo, hi=None):
    v = getattr(cfg, name)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ConfigError(f"argument {_arg(name)}: expected an integer {rng}; got {v!r}")


def _check_float(cfg, name, lo, hi, lo_open=True, hi_open=False, optional=False):
    v = getattr(cfg, name)
    if v is None and optional:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
    if not ok:
        lb = ("(" if lo_open else "[") + str(lo)
        what = f"a finite number > {lo}" if hi is None and lo_open else \
            f"a finite number in {lb}, {hi}{')' if hi_open else ']'}"
        raise ConfigError(f"argument {_arg(name)}: expected {what}; got {v!r}")


def validate_config(cfg):
    from .data import DATASETS
    from .models import MODELS
    if cfg.model not in MODELS:
        raise ConfigError(f"argument --model: expected one of {', '.join(MODELS)}; got {cfg.model!r}")
    if cfg.dataset not in DATASETS:
        raise ConfigError(f"argument --dataset: expected one of {', '.join(DATASETS)}; got {cfg.dataset!r}")
    if cfg.data_dir is not None and not isinstance(cfg.data_dir, str):
        raise ConfigError(f"argument --data-dir: expected a folder path; got {cfg.data_dir!r}")
    if not isinstance(cfg.out, str) or not cfg.out:
        raise ConfigError(f"argument --out: expected a folder path; got {cfg.out!r}")
    for k in ("steps", "batch_size", "keep", "log_every"):
        _check_int(cfg, k, 1)
    _check_int(cfg, "z_dim", 1, Z_DIM_LIMIT)
    for k in ("sample_every", "ckpt_every", "eval_every"):
        _check_int(cfg, k, 0)
    _check_int(cfg, "seed", 0, SEED_LIMIT - 1)
    _check_float(cfg, "lr", 0.0, None)
    _check_float(cfg, "lr_d", 0.0, None, optional=True)
    _check_float(cfg, "beta1", 0.0, 1.0, lo_open=False, hi_open=True)
    _check_float(cfg, "beta2", 0.0, 1.0, lo_open=False, hi_open=True)
    _check_float(cfg, "real_label", 0.0, 1.0)
    _check_float(cfg, "ema", 0.0, 1.0, lo_open=False, hi_open=True)
    if cfg.lr_decay == "auto":
        pass  # the second half of the run's steps (resolve_lr_decay, once the steps are final)
    elif cfg.lr_decay:
        d = cfg.lr_decay
        if (not isinstance(d, (list, tuple)) or len(d) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                        for v in d) or not 0 <= d[0] < d[1]):
            raise ConfigError(f"argument --lr-decay: lr_decay must be two steps START < END with START >= 0; got {d!r}")
        cfg.lr_decay = [int(d[0]), int(d[1])]
    else:
        cfg.lr_decay = None
    device = resolve_device(cfg.device)
    try:
        check_precision(cfg.precision, device)
    except ValueError as e:
        raise ConfigError(f"argument --precision: {e}") from None
    if cfg.backend in ("auto", ""):
        cfg.backend = None
    if cfg.backend is not None:
        from .._backends import _CHOICES, _resolve_uncached
        if cfg.backend not in _CHOICES:
            raise ConfigError(f"argument --backend: expected one of {', '.join(_CHOICES)}; got {cfg.backend!r}")
        try:
            _resolve_uncached(cfg.backend, device.type)
        except Exception as e:  # BackendUnavailableError: the reason it cannot run here
            raise ConfigError(f"argument --backend: {cfg.backend!r} cannot run on device {str(device)!r} here: {e}") from e
    return cfg


def check_memory(what, nbytes, device):
    """Refuse (``ConfigError``) before allocating when ``nbytes`` clearly exceed the memory of ``device``."""
    avail = available_memory(device)
    if avail is not None and nbytes > avail:
        raise ConfigError(f"{what}: needs about {nbytes / 2**30:.1f} GiB of {'GPU ' if device.type == 'cuda' else ''}"
                          f"memory but only {avail / 2**30:.1f} GiB is available")


def available_memory(device):
    """Bytes of memory available on ``device`` (CPU: MemAvailable; CUDA: free device memory), or None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except Exception:
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def training_memory(cfg, image_shape):
    """A lower bound on the bytes a training run needs: fp32 weights, gradients, two Adam moments (and the EMA
    copy), plus one batch of activations of the widest layer.  Counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        G, D = make_models(cfg.model, tuple(image_shape), cfg.z_dim, fused=True)
    pg = sum(p.numel() for p in G.parameters()) + sum(b.numel() for b in G.buffers())
    pd = sum(p.numel() for p in D.parameters()) + sum(b.numel() for b in D.buffers())
    per = 4 * (4 + (1 if cfg.ema else 0))
    return pg * per + pd * 4 * 4 + 4 * 2 * cfg.batch_size * (cfg.z_dim + 4 * image_shape[0] * image_shape[1])


# -------------------------------------------------------------------------------------------------
# device / step

def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"argument --device: expected auto, cpu, cuda or cuda:N; got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"argument --device: expected auto, cpu, cuda or cuda:N; got {device!r} (the trainer runs "
                          "on CPU or CUDA devices)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"argument --device: {device!r} was requested but torch.cuda.is_available() is False")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"argument --device: {device!r} was requested but only {torch.cuda.device_count()} CUDA "
                          "device(s) are visible")
    return dev


def make_optimizers(G, D, cfg: TrainConfig, device):
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


def make_train_step(G, D, opt_g, opt_d, *, z_dim, batch_size, device, real_label=1.0, fused=True, backend=None,
                    ema=None, noise=None, precision="fp32", scaler=None, cache_casts=True):
    """The tuned training step; returns ``step(real) -> (loss_d, loss_g, d_real, d_fake)`` (tensors).

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
    ``step.weight_casts()`` counts the casts made so far.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    low = PRECISION_DTYPES[precision]
    if precision == "fp16" and scaler is None:
        raise ValueError("precision 'fp16' needs a gradient scaler (torch.amp.GradScaler) shared by both optimizers")
    if fused:
        from .. import bce_with_logits

        def bce(logits, label):
            return bce_with_logits(logits, label, backend=backend)
    else:
        ones = torch.full((batch_size, 1), float(real_label), device=device)
        zeros = torch.zeros(batch_size, 1, device=device)
        gen_target = torch.ones(batch_size, 1, device=device)
        targets = {float(real_label): ones, 0.0: zeros, 1.0: gen_target}

        def bce(logits, label):
            return F.binary_cross_entropy_with_logits(logits, targets[label])

    d_params = list(D.parameters())
    D_for_g = D.module if isinstance(D, torch.nn.parallel.DistributedDataParallel) else D
    if ema is not None:
        ema_model, decay = ema
        # parameters only: the EMA model's BatchNorm statistics are recomputed for its own weights
        # before it is used (recalibrate_batch_norm), not copied from G.
        ema_p, g_p = list(ema_model.parameters()), list(G.parameters())
        n_updates = [0]
    real_label = float(real_label)
    import contextlib
    ddp = isinstance(D, torch.nn.parallel.DistributedDataParallel) or \
        isinstance(G, torch.nn.parallel.DistributedDataParallel)
    run_d_for_g = D_for_g
    if low is None:
        amp = contextlib.nullcontext
        run_g, run_d, casts = G, D, []
    else:
        def amp():
            return torch.autocast(device.type, dtype=low)
        if cache_casts and not ddp:
            from torch.func import functional_call
            casts = [WeightCasts(G, low), WeightCasts(D, low)]

            def run_g(z):
                return functional_call(G, casts[0].params(), (z,), strict=False)

            def run_d(x):
                return functional_call(D, casts[1].params(), (x,), strict=False)
            run_d_for_g = run_d
        else:
            casts = []
            run_g, run_d = G, D

    def backward_step(loss, opt, model_casts):
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
        if model_casts is not None:
            model_casts.updated()

    def step(real):
        z = torch.randn(batch_size, z_dim, device=device) if noise is None else noise()
        with amp():
            fake = run_g(z)
        # D step: real and (detached) fake in one forward.
        for p in d_params:
            p.requires_grad_(True)
        with amp():
            logits = run_d(torch.cat([real.to(fake.dtype), fake.detach()]))
        logits = logits.float()  # the loss in fp32
        d_real, d_fake = logits[:batch_size], logits[batch_size:]
        loss_d = bce(d_real, real_label) + bce(d_fake, 0.0)
        backward_step(loss_d, opt_d, casts[1] if casts else None)
        # G step: the same fake batch, D frozen.
        for p in d_params:
            p.requires_grad_(False)
        with amp():
            logits_g = run_d_for_g(fake)
        loss_g = bce(logits_g.float(), 1.0)
        backward_step(loss_g, opt_g, casts[0] if casts else None)
        if scaler is not None:
            scaler.update()
        if ema is not None:
            n_updates[0] += 1
            w = 1.0 - min(decay, (1.0 + n_updates[0]) / (10.0 + n_updates[0]))
            with torch.no_grad():
                torch._foreach_lerp_(ema_p, g_p, w)
        return loss_d, loss_g, d_real, d_fake

    step.weight_casts = lambda: sum(c.casts for c in casts)
    step.ema_updates = (lambda: n_updates[0]) if ema is not None else (lambda: 0)
    if ema is not None:
        def _set(n):
            n_updates[0] = int(n)
        step.set_ema_updates = _set
    return step


# -------------------------------------------------------------------------------------------------
# checkpoints

def models_from_checkpoint(ckpt, device="cpu", *, use_ema=True, backend=None):
    """(generator, discriminator, image_shape, config) from a loaded checkpoint; the EMA generator if present."""
    cfg = ckpt["config"]
    shape = tuple(ckpt["image_shape"])
    G, D = make_models(cfg["model"], shape, cfg["z_dim"], fused=True, backend=backend)
    ema = use_ema and ckpt.get("G_ema") is not None
    load_state(G, ckpt["G_ema"] if ema else ckpt["G"], "generator", ckpt, shape)
    load_state(D, ckpt["D"], "discriminator", ckpt, shape)
    G, D = G.to(device), D.to(device)
    if ema and ckpt.get("G_ema_bn") != "recalibrated":  # older checkpoints: statistics copied from G
        recalibrate_batch_norm(G, cfg["z_dim"], device, BN_RECAL_SEED)
    return G, D, shape, cfg


def load_state(module, state, what, ckpt, shape, path=None):
    """``module.load_state_dict(state)`` with one clear ``CheckpointError`` when the weights do not fit."""
    try:
        return module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if ln.startswith(("size mismatch", "Missing key", "Unexpected key"))),
                      lines[0] if lines else type(e).__name__)
        cfg = ckpt.get("config", {}) if isinstance(ckpt, dict) else {}
        where = f"{path}: " if path else "checkpoint: "
        raise CheckpointError(f"{where}the {what} weights do not fit a {cfg.get('model')!r} model for "
                              f"{shape[0]}x{shape[1]} images with z_dim {cfg.get('z_dim')} ({detail[:300].rstrip('.')}); was it "
                              "written for another image size, model or z_dim?") from None


# -------------------------------------------------------------------------------------------------
# images / plots

def save_grid(images, image_shape, path, nrow=None, scale=None):
    """(n, H*W) images in [0, 1] -> one PNG grid (Pillow)."""
    from PIL import Image
    import numpy as np
    x = images.detach().float().cpu().clamp(0, 1).reshape(-1, *image_shape).numpy()
    n, h, w = x.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    pad = 1
    grid = np.ones((ncol * (h + pad) + pad, nrow * (w + pad) + pad), dtype=np.float32) * 0.5
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = x[i]
    img = Image.fromarray((grid * 255).round().astype(np.uint8), mode="L")
    scale = scale or max(1, 256 // max(grid.shape))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path


def plot_losses(metrics_jsonl, path):
    rows = read_metrics(metrics_jsonl)
    rows = [r for r in rows if "loss_d" in r]
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [r["step"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    a1.plot(steps, [r["loss_d"] for r in rows], label="D loss")
    a1.plot(steps, [r["loss_g"] for r in rows], label="G loss")
    a1.set_xlabel("step")
    a1.legend()
    a1.set_title("losses")
    a2.plot(steps, [r["d_x"] for r in rows], label="D(x)")
    a2.plot(steps, [r["d_g_z"] for r in rows], label="D(G(z))")
    a2.set_xlabel("step")
    a2.set_ylim(0, 1)
    a2.legend()
    a2.set_title("discriminator outputs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _truncate_metrics(path, step):
    """Drop metric lines written after ``step`` (a resumed run rewrites them); atomic."""
    RunFolder(os.path.dirname(os.path.abspath(path))).truncate_metrics(step)


@torch.no_grad()
def recalibrate_batch_norm(G, z_dim, device, seed, n=4096, batch=256):
    """Recompute the running statistics of every BatchNorm in ``G`` for G's own weights.

    For the EMA generator: its weights average many steps, so the running statistics of the
    training generator (a ~10-step average for momentum 0.1, measured with other weights) do not
    match them, and eval-mode samples suffer (demo, 4 seeds: Fréchet distance 3.4-7.9x the floor
    with copied statistics, 2.6-3.6x recalibrated).  ``n`` samples of noise from a private
    generator (no global RNG use; same weights -> same statistics) through G in training mode
    with a cumulative average (momentum None), as torch's BatchNorm defines it.
    """
    norms = [m for m in G.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats]
    if not norms:
        return G
    was, momenta = G.training, [m.momentum for m in norms]
    g = torch.Generator().manual_seed(seed)
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        G.train()
        for c in torch.randn(n, z_dim, generator=g).split(batch):
            G(c.to(device))
    finally:
        for m, mom in zip(norms, momenta):
            m.momentum = mom
        G.train(was)
    return G


@torch.no_grad()
def generate(G, n, z_dim, device, seed, batch=1024):
    """n samples from G in eval mode with noise from a private generator (no global RNG use)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, z_dim, generator=g)
    was = G.training
    G.eval()
    try:
        return torch.cat([G(c.to(device)).float().cpu() for c in z.split(batch)])
    finally:
        G.train(was)


# -------------------------------------------------------------------------------------------------
# the run

def check_precision(precision, device):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision 'fp16' runs on CUDA only (it needs a gradient scaler and fp16 tensor cores); "
                         f"the device is {device}: use --precision bf16 (or fp32) on CPU")


class _Log:
    def __init__(self, quiet):
        self.quiet = quiet

    def __call__(self, *a):
        if not self.quiet:
            print(*a, flush=True)


def _latest_checkpoint(out):
    ckpts = list_checkpoints(out)
    if not ckpts:
        raise CheckpointError(f"--resume: no checkpoint (ckpt_XXXXXXXX.pt) found in {out!r}")
    return ckpts[-1][1]


def train(cfg: TrainConfig, explicit: set | None = None) -> dict:
    """Run (or resume) a training run; returns a summary dict (also written to the run folder).

    Under torchrun (``torchrun --nproc_per_node=N -m gankern train ...``) each process runs one rank of a
    DistributedDataParallel job (``gankern.distributed``): ``batch_size`` is the global batch, rank 0
    alone writes the run folder.
    The settings are validated first (``TrainConfig.validate``); the run folder is locked for the whole run
    (``RunLockedError`` if another trainer holds it; under torchrun rank 0 holds the lock) and temp files of
    killed saves are removed.
    """
    cfg.validate()
    dctx = distributed.setup(resolve_device(cfg.device))
    with dctx.guard():
        cfg.out = dctx.share(lambda: cfg.out)  # rank 0's folder (e.g. --demo's free_run_dir)
        run = RunFolder(cfg.out)
        with contextlib.ExitStack() as held:
            def take_lock():  # on rank 0; a refusal is raised on every rank
                held.enter_context(run.lock())
                run.clean_temp_files()
            dctx.share(take_lock)
            return _train(cfg, set(explicit or ()), dctx, run)


def _train(cfg: TrainConfig, explicit: set, dctx, run: RunFolder) -> dict:
    log = _Log(cfg.quiet or not dctx.is_main)
    device = dctx.device
    check_precision(cfg.precision, device)
    cfg.lr_decay = resolve_lr_decay(cfg.lr_decay, cfg.steps)  # "auto" -> the second half of this run's steps
    out = cfg.out
    if dctx.is_main:
        os.makedirs(out, exist_ok=True)
    ckpt = None
    restart = False  # a run stopped before its first checkpoint is started over
    if cfg.resume:
        def read_resume():
            p = run.latest_checkpoint()
            if p is None and not run.has_run():
                raise CheckpointError(f"--resume: no checkpoint (ckpt_XXXXXXXX.pt) found in {out!r} and no run to "
                                      "continue there; to start a new run, leave out --resume")
            if p is None:
                return p, None, run.read_config() or {}
            ck = load_checkpoint(p, map_location="cpu" if dctx.enabled else device)
            return p, ck, ck["config"]
        # rank 0 reads the checkpoint and sends it to every rank (no shared file system needed)
        path, ckpt, saved = dctx.share(read_resume)
        if ckpt is None:
            restart = True
            if dctx.is_main:
                print(f"--resume: {out!r} holds a run that stopped before its first checkpoint; nothing to continue "
                      "from, so it starts over at step 0" + (" with its saved settings" if saved else ""), flush=True)
        clash = [k for k in LOCKED if k in explicit and k in saved and saved.get(k) != getattr(cfg, k)]
        if clash:
            raise ValueError("--resume continues the run with its saved settings; these differ from the checkpoint: "
                             + ", ".join(f"{k} (saved {saved.get(k)!r}, given {getattr(cfg, k)!r})" for k in clash))
        for k in LOCKED + ("data_dir",):
            if k in saved and not (k == "data_dir" and k in explicit):
                setattr(cfg, k, saved[k])
        try:
            cfg.validate()
        except ValueError as e:
            raise CheckpointError(f"{path or run.config_path}: the saved settings are invalid: {e}") from None
        if ckpt is not None:
            log(f"resuming from {path} at step {int(ckpt['step'])} (target: {cfg.steps} steps)")
        check_precision(cfg.precision, device)
        cfg.lr_decay = resolve_lr_decay(cfg.lr_decay, cfg.steps)  # a saved config may say "auto"

    data = load_dataset(cfg.dataset, cfg.data_dir)
    if ckpt is not None and tuple(ckpt["image_shape"]) != tuple(data.image_shape):
        s0, s1 = ckpt["image_shape"], data.image_shape
        raise CheckpointError(f"--resume: {path} was trained on {s0[0]}x{s0[1]} images but the data (dataset "
                              f"{cfg.dataset}{', --data-dir ' + repr(cfg.data_dir) if cfg.data_dir else ''}) holds "
                              f"{s1[0]}x{s1[1]} images; resume with the data the run was trained on")
    if len(data) < cfg.batch_size:
        raise ConfigError(f"argument --batch-size: expected at most the dataset size ({cfg.dataset}: {len(data)} "
                          f"images); got {cfg.batch_size}")
    check_memory(f"the {cfg.model} GAN for {data.image_shape[0]}x{data.image_shape[1]} images with --z-dim {cfg.z_dim} "
                 f"and --batch-size {cfg.batch_size}", training_memory(cfg, data.image_shape), device)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(cfg.seed)
    G, D = make_models(cfg.model, data.image_shape, cfg.z_dim, fused=True, backend=cfg.backend)
    G, D = G.to(device), D.to(device)
    dctx.seed_rank(cfg.seed)
    opt_g, opt_d = make_optimizers(G, D, cfg, device)
    ema_model = None
    if cfg.ema:
        if dctx.is_main:  # a copy of G before any BatchNorm is synchronized: rank 0 alone samples from it
            ema_model = copy.deepcopy(G).requires_grad_(False)
    G_train, D_train = dctx.wrap(G, D, cfg.sync_bn)  # DDP under torchrun; G, D themselves otherwise
    x = data.x.to(device)
    sampler = InfiniteSampler(len(data), cfg.batch_size, seed=cfg.seed, device=device)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    step_fn = make_train_step(G_train, D_train, opt_g, opt_d, z_dim=cfg.z_dim,
                              batch_size=dctx.local_batch_size(cfg.batch_size), device=device,
                              real_label=cfg.real_label, fused=True, backend=cfg.backend,
                              ema=(ema_model, cfg.ema) if ema_model is not None else None,
                              precision=cfg.precision, scaler=scaler)
    metrics_path = os.path.join(out, "metrics.jsonl")
    start = 0
    if ckpt is not None:
        load_state(G, ckpt["G"], "generator", ckpt, data.image_shape, path)
        load_state(D, ckpt["D"], "discriminator", ckpt, data.image_shape, path)
        try:
            opt_g.load_state_dict(ckpt["opt_G"])
            opt_d.load_state_dict(ckpt["opt_D"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{path}: the optimizer state does not fit the model ({e})") from None
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if ema_model is not None:
            if ckpt.get("G_ema") is None:
                raise CheckpointError(f"{path}: the run uses an EMA generator (--ema) but the checkpoint holds none")
            load_state(ema_model, ckpt["G_ema"], "EMA generator", ckpt, data.image_shape, path)
            step_fn.set_ema_updates(ckpt.get("ema_updates", ckpt["step"]))
        sampler.load_state_dict(ckpt["rng"]["sampler"])
        start = int(ckpt["step"])
        if not dctx.restore_rng(ckpt["rng"], cfg.seed, start):
            log(f"the checkpoint was written by a run of another world size: noise streams restart from seeds "
                f"derived from --seed and step {start} (the run continues, not bit for bit)")
        if dctx.is_main:
            run.truncate_metrics(start)
    else:
        def check_free():
            if run.list_checkpoints():
                raise FileExistsError(f"run folder {out!r} already holds a run (metrics.jsonl / checkpoints): pass "
                                      "--resume to continue it, or choose another --out")
            if run.has_run():
                if not restart:
                    print(f"{out!r} holds a run that stopped before its first checkpoint (nothing to resume): "
                          "starting over", flush=True)
                run.truncate_metrics(-1)
        dctx.share(check_free)
    if dctx.is_main:
        run.write_json("config.json", dict(cfg.to_dict(), image_shape=list(data.image_shape), device_used=str(device),
                                           gankern_version=__version__, torch_version=str(torch.__version__),
                                           world_size=dctx.world))

    fixed_z_seed = cfg.seed + 7
    recal_at = [None]

    def ready_sample_g():
        """The generator samples come from: G, or the EMA generator with BatchNorm statistics for its
        current weights (recomputed at most once per step)."""
        if ema_model is None:
            return G
        if recal_at[0] != step_fn.ema_updates():
            recalibrate_batch_norm(ema_model, cfg.z_dim, device, BN_RECAL_SEED)
            recal_at[0] = step_fn.ema_updates()
        return ema_model

    def save_ckpt(step):
        rng_ranks = dctx.rng_states()  # every rank's RNG (a collective: all ranks call save_ckpt)
        if not dctx.is_main:
            return None
        obj = {"format": CKPT_FORMAT, "format_version": CKPT_VERSION, "gankern_version": __version__,
               "torch_version": str(torch.__version__), "step": step, "config": cfg.to_dict(),
               "image_shape": list(data.image_shape),
               "G": G.state_dict(), "D": D.state_dict(),
               "G_ema": ready_sample_g().state_dict() if ema_model is not None else None, "G_ema_bn": "recalibrated" if ema_model is not None else None,
               "ema_updates": step_fn.ema_updates(),
               "opt_G": opt_g.state_dict(), "opt_D": opt_d.state_dict(),
               "scaler": scaler.state_dict() if scaler is not None else None,
               "rng": {"torch": torch.get_rng_state(),
                       "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                       "sampler": sampler.state_dict(),
                       **({"ranks": rng_ranks} if dctx.enabled else {})}}
        return run.save_checkpoint(obj, step, keep=cfg.keep)

    def save_samples(step):
        imgs = generate(ready_sample_g(), 64, cfg.z_dim, device, fixed_z_seed)
        return save_grid(imgs, data.image_shape, os.path.join(out, "samples", f"step_{step:07d}.png"))

    quality = None

    def evaluate(step):
        nonlocal quality
        from .metrics import QualityMetric
        if quality is None:
            quality = QualityMetric(data, seed=0, device=device)
        # noise seed 0, as `gankern eval` (default --seed 0): both print the same numbers for a checkpoint
        return quality.evaluate(generate(ready_sample_g(), quality.n_generate, cfg.z_dim, device, EVAL_NOISE_SEED))

    total = cfg.steps
    if start >= total:
        log(f"checkpoint is at step {start} >= --steps {total}: nothing to train")
    use_bar = (not cfg.quiet) and dctx.is_main and sys.stderr.isatty()
    bar = None
    if use_bar:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, smoothing=0.05)
    print_every = max(cfg.log_every, (total - start) // 10 or 1)
    mf = run.open_metrics() if dctx.is_main else open(os.devnull, "a")
    t0 = time.perf_counter()
    t_last, s_last = t0, start
    last_ckpt = None
    try:
        for step in range(start + 1, total + 1):
            real = x[dctx.local_rows(sampler.next())]
            if cfg.lr_decay:
                f = lr_factor(step, cfg.lr_decay)
                for opt, lr in ((opt_g, cfg.lr), (opt_d, cfg.lr_d or cfg.lr)):
                    for pg in opt.param_groups:
                        pg["lr"] = lr * f
            loss_d, loss_g, d_real, d_fake = step_fn(real)
            if step % cfg.log_every == 0 or step == total:
                now = time.perf_counter()
                sps = (step - s_last) / max(now - t_last, 1e-9)
                t_last, s_last = now, step
                with torch.no_grad():  # means over all ranks (one all-reduce under torchrun)
                    v = dctx.mean(torch.stack([loss_d.float(), loss_g.float(), torch.sigmoid(d_real.float()).mean(),
                                               torch.sigmoid(d_fake.float()).mean()])).tolist()
                    row = {"step": step, "loss_d": v[0], "loss_g": v[1], "d_x": v[2], "d_g_z": v[3],
                           "steps_per_s": round(sps, 2), "time": round(now - t0, 3)}
                if not all(math.isfinite(row[k]) for k in ("loss_d", "loss_g")):
                    raise FloatingPointError(f"non-finite loss at step {step}: {row}")
                mf.write(json.dumps(row) + "\n")
                mf.flush()
                if bar is not None:
                    bar.set_postfix(loss_d=f"{row['loss_d']:.3f}", loss_g=f"{row['loss_g']:.3f}", refresh=False)
                elif step % print_every == 0 or step == total:
                    log(f"step {step}/{total}  loss_d {row['loss_d']:.3f}  loss_g {row['loss_g']:.3f}  "
                        f"D(x) {row['d_x']:.2f}  D(G(z)) {row['d_g_z']:.2f}  {sps:.1f} steps/s")
            if bar is not None:
                bar.update(1)
            if cfg.sample_every and step % cfg.sample_every == 0 and dctx.is_main:
                save_samples(step)
            if cfg.eval_every and step % cfg.eval_every == 0 and step != total and dctx.is_main:
                m = evaluate(step)
                mf.write(json.dumps({"step": step, "eval": m}) + "\n")
                mf.flush()
                log(f"step {step}: FD {m['fd']:.3f} (floor {m['fd_floor']:.3f}, {m['fd_ratio']:.2f}x), "
                    f"{m['classes_covered']}/10 classes")
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step != total:
                last_ckpt = save_ckpt(step)
    finally:
        if bar is not None:
            bar.close()
        mf.close()
    elapsed = time.perf_counter() - t0
    trained = max(total - start, 0)
    last_ckpt = save_ckpt(max(total, start))
    if not dctx.is_main:  # rank 0 alone writes samples, plots and metrics
        return {"steps": max(total, start), "trained_steps": trained, "rank": dctx.rank, "world_size": dctx.world}
    summary = {"steps": max(total, start), "trained_steps": trained, "seconds": round(elapsed, 2),
               "steps_per_s": round(trained / elapsed, 2) if trained and elapsed > 0 else None,
               "device": str(device), "backend": cfg.backend or "auto", "checkpoint": last_ckpt,
               "world_size": dctx.world}
    files = {"checkpoint": last_ckpt, "metrics": metrics_path}
    files["samples"] = save_samples(max(total, start)) if trained or not glob.glob(os.path.join(out, "samples", "*.png")) \
        else sorted(glob.glob(os.path.join(out, "samples", "*.png")))[-1]
    try:
        files["loss_plot"] = plot_losses(metrics_path, os.path.join(out, "loss.png"))
    except ImportError:
        files["loss_plot"] = None
    if cfg.final_eval:
        m = evaluate(total)
        summary["quality"] = m
        from .metrics import format_report
        print(format_report(m), flush=True)
        goal = m["fd_ratio"] <= 4.0 and m["classes_covered"] >= 9
        summary["quality_goal_met"] = goal
    if cfg.compare_torch:
        summary["compare_torch"] = compare_speed(cfg, data, device, log=print)
    files["final_metrics"] = os.path.join(out, "final_metrics.json")
    summary["files"] = files
    run.write_json("final_metrics.json", summary)
    sps = f", {summary['steps_per_s']} steps/s" if summary["steps_per_s"] else ""
    print(f"trained {trained} steps in {elapsed:.1f}s{sps} on {device} (backend {cfg.backend or 'auto'})", flush=True)
    for k, v in files.items():
        if v:
            print(f"  {k:14s} {v}", flush=True)
    return summary


# -------------------------------------------------------------------------------------------------
# speed comparison (train --compare-torch, gankern bench)

def time_steps(cfg: TrainConfig, data, device, *, fused, steps=30, warmup=5, rounds=3):
    """Seconds per training step (median of ``rounds``) of the tuned loop with fused or plain models."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        G, D = make_models(cfg.model, data.image_shape, cfg.z_dim, fused=fused, backend=cfg.backend)
        G, D = G.to(device), D.to(device)
        opt_g, opt_d = make_optimizers(G, D, cfg, device)
        scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
        step = make_train_step(G, D, opt_g, opt_d, z_dim=cfg.z_dim, batch_size=cfg.batch_size, device=device,
                               real_label=cfg.real_label, fused=fused, backend=cfg.backend,
                               precision=cfg.precision, scaler=scaler)
        x = data.x.to(device)
        sampler = InfiniteSampler(len(data), cfg.batch_size, seed=cfg.seed, device=device)
        batches = [x[sampler.next()] for _ in range(8)]

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize()
        for i in range(warmup):
            step(batches[i % 8])
        times = []
        for _ in range(rounds):
            sync()
            t = time.perf_counter()
            for i in range(steps):
                step(batches[i % 8])
            sync()
            times.append((time.perf_counter() - t) / steps)
    return sorted(times)[len(times) // 2]


def compare_speed(cfg: TrainConfig, data, device, log=print, steps=30):
    fused = time_steps(cfg, data, device, fused=True, steps=steps)
    plain = time_steps(cfg, data, device, fused=False, steps=steps)
    fused = min(fused, time_steps(cfg, data, device, fused=True, steps=steps))
    plain = min(plain, time_steps(cfg, data, device, fused=False, steps=steps))
    res = {"gankern_ms_per_step": round(fused * 1e3, 3), "torch_ms_per_step": round(plain * 1e3, 3),
           "speedup": round(plain / fused, 3), "model": cfg.model, "batch_size": cfg.batch_size,
           "image_shape": list(data.image_shape), "device": str(device), "threads": torch.get_num_threads()}
    log(f"speed ({cfg.model}, batch {cfg.batch_size}, {data.image_shape[0]}x{data.image_shape[1]}, {device}, "
        f"{torch.get_num_threads()} threads): gankern {fused * 1e3:.2f} ms/step, plain PyTorch (same loop) "
        f"{plain * 1e3:.2f} ms/step -> {plain / fused:.2f}x")
    return res
