"""gankern.bias_leaky_relu: fused ``leaky_relu(input + bias broadcast along dim, negative_slope)``.

For conv outputs (the conv runs without its bias): NCHW or channels-last, any rank >= 1.
The op ``gankern::bias_leaky_relu`` (csrc/bias_leaky_relu.cpp: checks, autograd incl. double
backward) runs its internal ops ``_bias_leaky_relu_fwd`` / ``_bwd``: overload ``default`` for
backends ``cpp`` / ``cuda``, ``triton`` for backend ``triton`` (registered here, kernels in
gankern/triton/bias_leaky_relu.py).  ``reference``: gankern.reference.bias_leaky_relu after the
same checks (``gankern::_bias_leaky_relu_check``).
"""
from __future__ import annotations

import torch

from .. import _backends, reference
from . import handles, register_internal

_OP = "gankern.bias_leaky_relu"
_ops = handles("bias_leaky_relu")


def bias_leaky_relu(input, bias, negative_slope=0.2, dim=1, *, backend=None):
    """``F.leaky_relu(input + bias.view(<C at dim>), negative_slope)``, fused (slope 0 = ReLU, 1 = bias only).

    input (..., C, ...) with C at ``dim``; bias (C,).  float32 / float64 / float16 / bfloat16 (math in
    float32, float64 for float64).  The output keeps a channels-last input's layout.  Differentiable
    twice; the backward keeps only the output (for ``negative_slope >= 0``).
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{_OP}: input must be a torch.Tensor, got {type(input).__name__}")
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{_OP}: bias must be a torch.Tensor, got {type(bias).__name__}")
    be = _backends.select(backend, input)
    if be == "cpp" or be == "cuda":
        return _ops.default(input, bias, negative_slope, dim)
    if be == "triton":
        return _ops.triton(input, bias, negative_slope, dim)
    if _ops.check is not None:
        _ops.check(input, bias, negative_slope, dim)
    return reference.bias_leaky_relu(input, bias, negative_slope, dim)


def _layout_like(t):
    """An empty tensor with ``t``'s shape in the layout the kernels write (channels-last stays)."""
    if not t.is_contiguous() and t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.empty_like(t, memory_format=torch.channels_last)
    if not t.is_contiguous() and t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.empty_like(t, memory_format=torch.channels_last_3d)
    return torch.empty_like(t, memory_format=torch.contiguous_format)


# ---- the internal ops: fakes (both overloads) and the Triton kernels (overload .triton) ----
def _fwd_fake(input, bias, negative_slope, dim):
    return _layout_like(input)


def _bwd_fake(grad_output, saved, negative_slope, dim, output_mask):
    # an output that was not asked for is undefined (None)
    gx = _layout_like(saved) if output_mask[0] else None
    gb = saved.new_empty((saved.shape[dim],)) if output_mask[1] else None
    return gx, gb


register_internal("_bias_leaky_relu_fwd", _fwd_fake, "bias_leaky_relu.forward")
register_internal("_bias_leaky_relu_bwd", _bwd_fake, "bias_leaky_relu.backward")
