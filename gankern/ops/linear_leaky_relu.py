"""gankern.linear_leaky_relu: fused ``leaky_relu(linear(input, weight, bias), negative_slope)``.

The op ``gankern::linear_leaky_relu`` (csrc/linear_leaky_relu.cpp: checks, autograd incl. double
backward) runs its internal ops ``_linear_leaky_relu_fwd`` / ``_bwd``: overload ``default`` for
backends ``cpp`` / ``cuda``, ``triton`` for backend ``triton`` (registered here, kernels in
gankern/triton/linear_leaky_relu.py).  ``reference``: gankern.reference.linear_leaky_relu after the
same checks (``gankern::_linear_leaky_relu_check``).
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from .. import _backends, reference
from . import handles, register_internal

_OP = "gankern.linear_leaky_relu"
_ops = handles("linear_leaky_relu")


def linear_leaky_relu(input, weight, bias=None, negative_slope=0.2, *, backend=None):
    """``F.leaky_relu(F.linear(input, weight, bias), negative_slope)``, fused.

    input (*, in_features), weight (out_features, in_features), bias (out_features,) or None.
    float32 / float64 / float16 / bfloat16 (GEMMs accumulate in fp32).  Differentiable twice.
    """
    slope = _check_types(input, weight, bias, negative_slope)
    be = _backends.select(backend, input)
    if be == "cpp" or be == "cuda":
        return _ops.default(input, weight, bias, slope)
    if be == "triton":
        return _ops.triton(input, weight, bias, slope)
    if _ops.check is not None:
        _ops.check(input, weight, bias, slope)
    if slope == 1.0:  # a plain Linear (gankern.nn.Linear), with torch's graph for it (as the C++ autograd)
        return F.linear(input, weight, bias)
    return reference.linear_leaky_relu(input, weight, bias, slope)


def _check_types(input, weight, bias, negative_slope):
    """Python-level argument types, for every backend alike (before any backend sees them); the slope as a float."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{_OP}: input must be a torch.Tensor, got {type(input).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{_OP}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{_OP}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if isinstance(negative_slope, torch.Tensor) or not isinstance(negative_slope, numbers.Real):
        raise TypeError(f"{_OP}: negative_slope must be a real number, got {type(negative_slope).__name__}")
    return float(negative_slope)


# ---- the internal ops: fakes (both overloads) and the Triton kernels (overload .triton) ----
def _fwd_fake(input, weight, bias, negative_slope):
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


def _bwd_fake(grad_output, saved, input, weight, negative_slope, output_mask):
    # an output that was not asked for is undefined (None)
    gx = input.new_empty(input.shape) if output_mask[0] else None
    gw = weight.new_empty(weight.shape) if output_mask[1] else None
    gb = weight.new_empty((weight.shape[0],)) if output_mask[2] else None
    return gx, gw, gb


register_internal("_linear_leaky_relu_fwd", _fwd_fake, "linear_leaky_relu.forward")
register_internal("_linear_leaky_relu_bwd", _bwd_fake, "linear_leaky_relu.backward")
