"""One file per op: the public function (Python-level argument handling, backend choice) and the
registration of the Triton kernels as the ``.triton`` overload of the op's internal C++ ops.

Each op ``gankern::<op>`` is defined once, in C++ (csrc/<op>.cpp: schema, checks, autograd), with
two overloads: ``default`` (C++/CUDA kernels) and ``triton`` (the kernels in gankern/triton/<op>.py);
``gankern::_<op>_check`` runs its checks alone (for the reference backend).
"""
from __future__ import annotations

import importlib
from typing import Callable, NamedTuple, Optional

import torch

from .. import _backends


class Handles(NamedTuple):
    """The overloads a public function calls, looked up once (None without gankern._C)."""
    default: Optional[Callable]   # backends cpp / cuda
    triton: Optional[Callable]    # backend triton
    check: Optional[Callable]     # gankern::_<op>_check, the checks alone (backend reference)


def handles(op: str) -> Handles:
    if _backends.load_extension() is None:
        return Handles(None, None, None)
    packet = getattr(torch.ops.gankern, op)
    return Handles(packet.default, packet.triton, getattr(torch.ops.gankern, f"_{op}_check").default)


def register_internal(name: str, fake: Callable, kernel: str) -> None:
    """For the internal C++ op ``gankern::<name>``: ``fake`` (output shapes only: the public op has checked
    the arguments) for both overloads, and ``kernel`` ("<module>.<function>" in gankern.triton, imported on
    the first call) as the CPU and CUDA implementation of its ``.triton`` overload (CPU = Triton's
    interpreter, TRITON_INTERPRET=1).  Nothing is compiled here."""
    if _backends.load_extension() is None:
        return
    for qualname in (f"gankern::{name}", f"gankern::{name}.triton"):
        torch.library.register_fake(qualname)(fake)
    module, function = kernel.rsplit(".", 1)
    fn = None

    def impl(*args):
        nonlocal fn
        if fn is None:
            fn = getattr(importlib.import_module(f"gankern.triton.{module}"), function)
        return fn(*args)

    impl.__name__ = impl.__qualname__ = f"{name}_triton"
    torch.library.impl(f"gankern::{name}.triton", ("CPU", "CUDA"))(impl)
