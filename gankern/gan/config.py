"""Every training setting in one place: ``TrainConfig`` (default, ``--help`` text and command-line form of each
field), the ``--demo`` preset as overrides of it, and ``TrainConfig.validate()``, the one check of all settings
(called by the CLI and by ``train()``).  Also the device, precision, learning-rate-schedule and memory checks the
trainer and the CLI share.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field

import torch

from .data import DATASETS
from .models import MODELS

__all__ = ["TrainConfig", "DEFAULTS", "DEMO", "LOCKED", "PRECISIONS", "PRECISION_DTYPES", "ConfigError",
           "demo_config", "validate_config", "resolve_lr_decay", "lr_factor", "resolve_device", "check_precision",
           "check_memory", "available_memory", "training_memory", "free_run_dir", "SEED_LIMIT", "Z_DIM_LIMIT"]

PRECISIONS = ("fp32", "bf16", "fp16")
PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKEND_CHOICES = ("auto", "cpp", "cuda", "triton", "reference")
SEED_LIMIT = 2 ** 40     # the sampler seeds epoch e with seed * 1_000_003 + e: must stay inside torch's 64-bit seeds
Z_DIM_LIMIT = 1 << 20


def _steps_text(v):
    return "the second half of --steps" if v == "auto" else " ".join(map(str, v))


def setting(default, help, *, shown=True, flags=None, also=(), **argparse):
    """A ``TrainConfig`` field: its default, its help text and how ``gankern train`` parses it.

    ``shown``: True appends "(default: X[; --demo: Y])" to the help, a string is shown as the default, a callable
    formats the value, False shows none.  ``flags``: the option strings (default ``--field-name``); ``also``:
    further ``(flag, argparse keywords)`` options that set the same field (e.g. ``--no-lr-decay``).  The other
    keywords go to ``argparse.add_argument`` (``type=int`` accepts integral notation such as 2e8).
    """
    meta = dict(help=help, shown=shown, flags=flags, also=tuple(also), argparse=argparse)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


class ConfigError(ValueError):
    """A setting is out of range or of the wrong type; the message names the argument and what was expected."""


@dataclass
class TrainConfig:
    """Every training setting and its default: the one place they live (``gankern train`` builds its options,
    defaults and help from these fields).

    The defaults are the recipe the README demo found to train well (MLP GAN on the digits: within 4x the
    Fréchet-distance floor with 10/10 classes): batch 128, one-sided label smoothing 0.9, generator EMA 0.999
    with BatchNorm statistics recomputed for the EMA weights, and both learning rates decaying linearly to 0
    over the second half of the run (``lr_decay="auto"``: scaled to ``steps``).
    """
    model: str = setting("mlp", "architecture", choices=MODELS)
    dataset: str = setting("digits", "digits = scikit-learn's bundled 8x8 digits; mnist / fashion-mnist are read "
                           "from --data-dir", choices=DATASETS)
    data_dir: str | None = setting(None, "folder with train-images-idx3-ubyte[.gz] + train-labels-idx1-ubyte[.gz] "
                                   "or an .npz", shown=False)
    steps: int = setting(10000, "total number of training steps", type=int)
    batch_size: int = setting(128, "batch size", type=int)
    lr: float = setting(2e-4, "Adam learning rate", type=float)
    lr_d: float | None = setting(None, "discriminator learning rate", shown="--lr", type=float)
    beta1: float = setting(0.5, "Adam beta1", type=float)
    beta2: float = setting(0.999, "Adam beta2", type=float)
    z_dim: int = setting(64, "latent size", type=int)
    seed: int = setting(0, "random seed; same seed + same machine = same losses", type=int)
    device: str = setting("auto", "auto (CUDA when present), cpu, cuda, cuda:1 ...")
    backend: str | None = setting(None, "gankern backend for the fused layers", shown="auto", choices=BACKEND_CHOICES)
    precision: str = setting("fp32", "fp32, or mixed precision with fp32 master weights: bf16 (CPU with bf16 units, "
                             "or CUDA), fp16 (CUDA only, with a gradient scaler)", choices=PRECISIONS)
    out: str = setting("runs/gan", "run folder, locked while this trainer runs")
    resume: bool = setting(False, "continue the run in --out from its newest (checksum-verified) checkpoint; a run "
                           "stopped before its first checkpoint starts over", shown=False, action="store_true")
    real_label: float = setting(0.9, "target for real images; < 1 = one-sided label smoothing, 1 = off", type=float)
    ema: float = setting(0.999, "exponential moving average of the generator (decay; 0 = off, 0.999 when given "
                         "alone); samples/eval use it", type=float, nargs="?", const=0.999)
    lr_decay: list | str | None = setting(
        "auto", "both learning rates fall linearly to 0 from step START to step END", shown=_steps_text,
        also=[("--no-lr-decay", dict(action="store_const", const=[], help="constant learning rates"))],
        type=int, nargs=2, metavar=("START", "END"))  # "auto": [steps // 2, steps]; None / []: constant
    keep: int = setting(3, "keep the newest K checkpoints", type=int)
    sample_every: int = setting(1000, "write a sample grid every N steps (0: only at the end)", type=int)
    ckpt_every: int = setting(2000, "checkpoint every N steps (0: only at the end)", type=int)
    eval_every: int = setting(0, "quality metric every N steps (0: only at the end)", type=int)
    log_every: int = setting(50, "metrics.jsonl line every N steps", type=int)
    final_eval: bool = setting(True, "skip the quality metric at the end", shown=False, flags=("--no-eval",),
                               action="store_false")
    quiet: bool = setting(False, "no progress bar or periodic lines; final summary only", shown=False,
                          action="store_true")
    demo: bool = setting(False, "the README demo preset: the default recipe, shorter (MLP GAN, digits, fused "
                         "kernels)", shown=False, action="store_true")
    compare_torch: bool = setting(False, "also time the same loop with plain-PyTorch layers and print the speed "
                                  "ratio", shown=False, action="store_true")
    sync_bn: bool | None = setting(None, "under torchrun: synchronize BatchNorm statistics over all ranks",
                                   shown="on for models with BatchNorm",
                                   action=argparse.BooleanOptionalAction)

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


def demo_config(**overrides) -> TrainConfig:
    """The ``--demo`` settings: TrainConfig's defaults with ``DEMO`` (then ``overrides``) applied."""
    return dataclasses.replace(TrainConfig(), **{**DEMO, "lr_decay": list(DEMO["lr_decay"]), "demo": True},
                               **overrides)


def free_run_dir(base):
    """``base`` if it holds no run yet, else the first free ``base-2``, ``base-3``, ..."""
    from .checkpoint import list_checkpoints

    def used(d):
        return os.path.exists(os.path.join(d, "metrics.jsonl")) or bool(list_checkpoints(d))
    if not used(base):
        return base
    i = 2
    while used(f"{base}-{i}"):
        i += 1
    return f"{base}-{i}"


# -------------------------------------------------------------------------------------------------
# learning-rate schedule

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


# -------------------------------------------------------------------------------------------------
# validation

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


def _check_names(cfg):
    if cfg.model not in MODELS:
        raise ConfigError(f"argument --model: expected one of {', '.join(MODELS)}; got {cfg.model!r}")
    if cfg.dataset not in DATASETS:
        raise ConfigError(f"argument --dataset: expected one of {', '.join(DATASETS)}; got {cfg.dataset!r}")
    if cfg.data_dir is not None and not isinstance(cfg.data_dir, str):
        raise ConfigError(f"argument --data-dir: expected a folder path; got {cfg.data_dir!r}")
    if not isinstance(cfg.out, str) or not cfg.out:
        raise ConfigError(f"argument --out: expected a folder path; got {cfg.out!r}")


def _check_numbers(cfg):
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


def _normalize_lr_decay(cfg):
    d = cfg.lr_decay
    if d == "auto":
        return  # the second half of the run's steps (resolve_lr_decay, once the steps are final)
    if not d:
        cfg.lr_decay = None
        return
    if (not isinstance(d, (list, tuple)) or len(d) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in d) or not 0 <= d[0] < d[1]):
        raise ConfigError(f"argument --lr-decay: lr_decay must be two steps START < END with START >= 0; got {d!r}")
    cfg.lr_decay = [int(d[0]), int(d[1])]


def _check_device_and_backend(cfg):
    device = resolve_device(cfg.device)
    try:
        check_precision(cfg.precision, device)
    except ValueError as e:
        raise ConfigError(f"argument --precision: {e}") from None
    if cfg.backend in ("auto", ""):
        cfg.backend = None
    if cfg.backend is None:
        return
    from .._backends import _CHOICES, _resolve_uncached
    if cfg.backend not in _CHOICES:
        raise ConfigError(f"argument --backend: expected one of {', '.join(_CHOICES)}; got {cfg.backend!r}")
    try:
        _resolve_uncached(cfg.backend, device.type)
    except Exception as e:  # BackendUnavailableError: the reason it cannot run here
        raise ConfigError(f"argument --backend: {cfg.backend!r} cannot run on device {str(device)!r} here: {e}") from e


def validate_config(cfg):
    """``TrainConfig.validate``: every setting checked, ``lr_decay`` and ``backend`` normalised; returns ``cfg``."""
    _check_names(cfg)
    _check_numbers(cfg)
    _normalize_lr_decay(cfg)
    _check_device_and_backend(cfg)
    return cfg


# -------------------------------------------------------------------------------------------------
# device, precision, memory

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


def check_precision(precision, device):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision 'fp16' runs on CUDA only (it needs a gradient scaler and fp16 tensor cores); "
                         f"the device is {device}: use --precision bf16 (or fp32) on CPU")


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
    from .models import make_models
    with torch.device("meta"):
        G, D = make_models(cfg.model, tuple(image_shape), cfg.z_dim, fused=True)
    pg = sum(p.numel() for p in G.parameters()) + sum(b.numel() for b in G.buffers())
    pd = sum(p.numel() for p in D.parameters()) + sum(b.numel() for b in D.buffers())
    per = 4 * (4 + (1 if cfg.ema else 0))
    return pg * per + pd * 4 * 4 + 4 * 2 * cfg.batch_size * (cfg.z_dim + 4 * image_shape[0] * image_shape[1])
