"""bce_with_logits: ``F.binary_cross_entropy_with_logits`` fused, on every backend; the target may
be a Python float (GAN labels 1.0 / 0.0 / 0.9) so no label tensor is materialized.

The op ``gankern::bce_with_logits(input, target?, target_scalar, weight?, pos_weight?, reduction:int)``
(csrc/bce.cpp: checks, autograd incl. double backward) runs its internal ops
``_bce_with_logits_fwd`` / ``_bwd``: overload ``default`` for backends ``cpp`` / ``cuda``, ``triton``
for backend ``triton`` (registered here, kernels in gankern/triton/bce.py).  ``reference``:
gankern.reference.bce_with_logits after the same checks (``gankern::_bce_with_logits_check``).
"""
from __future__ import annotations

import numbers

import torch

from .. import _backends, reference
from . import handles, register_internal

__all__ = ["bce_with_logits"]

_REDUCTION = {"none": 0, "mean": 1, "sum": 2}
_ops = handles("bce_with_logits")


def bce_with_logits(input, target, weight=None, reduction="mean", pos_weight=None, *, backend=None):
    """``F.binary_cross_entropy_with_logits(input, target, weight, reduction=reduction, pos_weight=pos_weight)``.

    ``target``: a tensor of the input's shape and dtype, or a Python float (every element's target,
    no tensor is built).  ``weight`` / ``pos_weight`` broadcast to the input (any float dtype; used in
    float32, float64 for float64 inputs).  Output dtype = input dtype.  Stable formula, float32
    accumulation for fp16/bf16, deterministic reductions.  Gradients: input and a target tensor (also
    double backward); weight / pos_weight are not differentiable (as in torch).
    ``backend``: None / "auto", "cpp", "cuda", "triton", "reference".
    """
    red = _REDUCTION.get(reduction) if isinstance(reduction, str) else None
    if red is None:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"bce_with_logits: input must be a tensor, got {type(input).__name__}")
    if isinstance(target, torch.Tensor):
        tt, ts = target, 0.0
    elif isinstance(target, numbers.Real):
        tt, ts = None, float(target)
    else:
        raise TypeError(f"bce_with_logits: target must be a tensor or a float, got {type(target).__name__}")
    for name, w in (("weight", weight), ("pos_weight", pos_weight)):
        if w is not None and not isinstance(w, torch.Tensor):
            raise TypeError(f"bce_with_logits: {name} must be a tensor or None, got {type(w).__name__}")
    b = _backends.select(backend, input)
    if b == "cpp" or b == "cuda":
        return _ops.default(input, tt, ts, weight, pos_weight, red)
    if b == "triton":
        _backends.check_supported(b, "bce_with_logits", input)
        return _ops.triton(input, tt, ts, weight, pos_weight, red)
    if _ops.check is not None:
        _ops.check(input, tt, ts, weight, pos_weight, red)
    if input.dtype == torch.float64:  # weights used in float64 for float64 inputs, as the kernels do
        weight = weight.double() if weight is not None else None
        pos_weight = pos_weight.double() if pos_weight is not None else None
    return reference.bce_with_logits(input, target, weight, reduction, pos_weight)


# ---- the internal ops: fakes (both overloads) and the Triton kernels (overload .triton) ----
def _fwd_fake(input, target, target_scalar, weight, pos_weight, reduction):
    return input.new_empty(input.shape if reduction == 0 else ())


def _bwd_fake(grad_out, input, target, target_scalar, weight, pos_weight, reduction, need_target):
    return input.new_empty(input.shape), input.new_empty(input.shape if need_target else (0,))


register_internal("_bce_with_logits_fwd", _fwd_fake, "bce.forward")
register_internal("_bce_with_logits_bwd", _bwd_fake, "bce.backward")
