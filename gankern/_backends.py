"""Which backends exist on this machine, why the others do not, and which one a call uses.

Nothing here compiles anything.  The compiled extension ``gankern._C`` is imported the
first time it is needed (``load_extension``); Triton is only probed with
``importlib.util.find_spec`` until a Triton kernel actually runs.

Backends
--------
``cpp``        the compiled extension's CPU kernels (CPU tensors)
``cuda``       the compiled extension's CUDA kernels (CUDA tensors)
``triton``     Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``)
``reference``  plain PyTorch (any device)
``auto``       CUDA tensors -> triton, else cuda; CPU tensors -> cpp, else reference

An explicitly requested backend that cannot run raises a ``BackendUnavailableError``
that says why.  ``auto`` never fails: when its first choice is missing it warns once
(naming the reason) and uses the next one.  ``GANKERN_BACKEND`` overrides the default
(``backend=None``) for every call.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("cpp", "cuda", "triton", "reference")
_CHOICES = BACKENDS + ("auto",)

_ext = None
_ext_error: str | None = None
_ext_tried = False
_warned: set = set()
_resolved: dict = {}


class BackendUnavailableError(RuntimeError):
    """Raised when a backend that was asked for by name cannot run the call."""


def load_extension():
    """Import gankern._C once; return it, or None (the reason is kept for ``backends()``)."""
    global _ext, _ext_error, _ext_tried
    if not _ext_tried:
        _ext_tried = True
        try:
            _ext = importlib.import_module("gankern._C")
        except ImportError as e:  # not built, or built against another torch
            _ext_error = (f"the compiled extension gankern._C could not be imported ({e}); "
                          "build it with `pip install --no-build-isolation .` (or tools/build_inplace.sh)")
    return _ext


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _reasons() -> dict:
    """backend -> None if available, else the reason it is not."""
    ext = load_extension()
    out = {"reference": None}
    out["cpp"] = None if ext is not None else _ext_error
    if ext is None:
        out["cuda"] = _ext_error
    elif not ext.with_cuda:
        why = getattr(ext, "cuda_skip_reason", "") or "no reason recorded"
        out["cuda"] = f"gankern._C was built without CUDA kernels ({why})"
    elif not torch.cuda.is_available():
        out["cuda"] = "no CUDA device is visible (torch.cuda.is_available() is False)"
    else:
        out["cuda"] = None
    if ext is None:  # the Triton kernels are an overload of the C++ ops (their checks and autograd)
        out["triton"] = f"the Triton backend runs through the C++ ops of gankern._C, and {_ext_error}"
    elif importlib.util.find_spec("triton") is None:
        out["triton"] = "the triton package is not installed (pip install triton)"
    elif torch.cuda.is_available():
        out["triton"] = None
    elif _triton_interpret():
        out["triton"] = _interpreter_problem()  # interpreter on CPU tensors
    else:
        out["triton"] = "no CUDA device, and TRITON_INTERPRET=1 is not set (needed to run Triton kernels on CPU tensors)"
    return out


def _version(dist: str) -> tuple:
    from importlib.metadata import version
    try:
        return tuple(int(p) for p in version(dist).split(".")[:2])
    except Exception:  # not installed, or an unusual version string
        return ()


def _interpreter_problem() -> str | None:
    """Known-broken combinations for Triton's interpreter (TRITON_INTERPRET=1 on CPU tensors)."""
    if (3, 0) <= _version("triton") < (3, 7) and _version("numpy") >= (2, 4):
        return ("Triton < 3.7's interpreter fails with numpy >= 2.4 (it converts 1-element arrays to Python "
                "integers, which numpy 2.4 refuses): install numpy<2.4 or triton>=3.7 to run Triton kernels on CPU")
    return None


def backends() -> dict:
    """Every backend -> {"available": bool, "reason": str|None, "devices": [...]}."""
    devices = {"cpp": ["cpu"], "cuda": ["cuda"], "triton": ["cuda", "cpu (TRITON_INTERPRET=1)"],
               "reference": ["cpu", "cuda"]}
    return {name: {"available": why is None, "reason": why, "devices": devices[name]}
            for name, why in _reasons().items()}


def _warn_once(key, msg):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _resolve_uncached(backend: str, device_type: str) -> str:
    if backend not in _CHOICES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, _CHOICES))} or None; got {backend!r}")
    reasons = _reasons()
    if backend == "auto":
        order = ("triton", "cuda", "reference") if device_type == "cuda" else ("cpp", "reference")
        for i, cand in enumerate(order):
            if reasons[cand] is None:
                return cand
            _warn_once(("auto", cand, device_type),
                       f"gankern: backend {cand!r} is unavailable for {device_type} tensors "
                       f"({reasons[cand]}); using {order[i + 1]!r} instead")
        return "reference"
    if reasons[backend] is not None:
        raise BackendUnavailableError(f"gankern backend {backend!r} is unavailable: {reasons[backend]}")
    if backend == "cpp" and device_type != "cpu":
        raise BackendUnavailableError(f"backend 'cpp' runs on CPU tensors; got {device_type} tensors (use 'cuda' or 'triton')")
    if backend == "cuda" and device_type != "cuda":
        raise BackendUnavailableError(f"backend 'cuda' runs on CUDA tensors; got {device_type} tensors (use 'cpp')")
    if backend == "triton" and device_type not in ("cuda", "cpu"):
        raise BackendUnavailableError(f"backend 'triton' runs on CUDA tensors; got {device_type} tensors")
    if backend == "triton" and device_type == "cpu" and not _triton_interpret():
        raise BackendUnavailableError("backend 'triton' got CPU tensors: set TRITON_INTERPRET=1 before importing "
                                      "triton to run the kernels in Triton's interpreter, or use a CUDA tensor")
    return backend


# What a backend cannot do: the one table of these limits, checked by ``check_supported``.
_NO_FLOAT64 = {("triton", "bce_with_logits"), ("triton", "batch_norm_relu")}


def check_supported(backend: str, op: str, input: torch.Tensor) -> None:
    """Raise one clear error when ``backend`` cannot run ``op`` on ``input``'s dtype."""
    if input.dtype == torch.float64 and (backend, op) in _NO_FLOAT64:
        raise RuntimeError(f"{op}: backend {backend!r} supports float32, float16 and bfloat16 inputs, got float64 "
                           "(use backend='cpp', 'cuda' or 'reference')")


def select(backend: str | None, tensor: torch.Tensor) -> str:
    """The backend a call runs on: cheap (cached per (request, device type))."""
    return _resolve(_DEFAULT if backend is None else backend, tensor.device.type)


@torch.compiler.assume_constant_result
def _resolve(backend: str, device_type: str) -> str:
    # Under torch.compile dynamo runs this in Python at trace time and puts the answer in the graph as a
    # constant: a cold cache must not be traced (it imports and inspects packages, which dynamo refuses).
    key = (backend, device_type)
    got = _resolved.get(key)
    if got is None:
        got = _resolved[key] = _resolve_uncached(backend, device_type)
    return got


_DEFAULT = os.environ.get("GANKERN_BACKEND") or "auto"


def reset():
    """Forget cached decisions and re-read GANKERN_BACKEND (after changing the environment in a process)."""
    global _DEFAULT
    _DEFAULT = os.environ.get("GANKERN_BACKEND") or "auto"
    _resolved.clear()
    _warned.clear()


def set_poison(on: bool) -> None:
    """Tests only: kernels fill their outputs with NaN before writing them."""
    global POISON
    POISON = bool(on)
    ext = load_extension()
    if ext is not None:
        ext._set_poison(POISON)


POISON = False


def empty_cache() -> None:
    """Free the CPU output blocks gankern's C++ kernels keep for reuse (like torch.cuda.empty_cache()).

    Outputs of 256 KiB or more are served from a cache of freed blocks, at most
    ``GANKERN_CPU_CACHE_MB`` MiB (default 256, read once per process; 0 turns the cache off), so a
    training loop does not page-fault its buffers in again every step.
    """
    ext = load_extension()
    if ext is not None:
        ext._cpu_cache_release()


def cache_info() -> dict:
    """The CPU output-block cache: bytes held now, capacity, reuses (hits) and fresh allocations (misses)."""
    ext = load_extension()
    if ext is None:
        return {"cached_bytes": 0, "capacity_bytes": 0, "hits": 0, "misses": 0}
    cached, cap, hits, misses = ext._cpu_cache_info()
    return {"cached_bytes": cached, "capacity_bytes": cap, "hits": hits, "misses": misses}


def new_empty(shape, *, dtype, device) -> torch.Tensor:
    """torch.empty for kernel outputs (Triton launchers); NaN-filled when poisoning is on."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON and t.numel():
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t
