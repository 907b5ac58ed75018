"""gankern.linear_leaky_relu: fused ``leaky_relu(linear(input, weight, bias), negative_slope)``.

Backends: ``cpp`` / ``cuda`` -> the C++ custom op ``gankern::linear_leaky_relu`` (argument checks,
autograd incl. double backward, in C++); ``triton`` -> the custom op
``gankern::linear_leaky_relu_triton`` (kernels in ``gankern/triton/linear_leaky_relu.py``);
``reference`` -> ``gankern.reference.linear_leaky_relu``.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _backends, reference

_ext = _backends.load_extension()
_cpp_op = torch.ops.gankern.linear_leaky_relu.default if _ext is not None else None


def linear_leaky_relu(input, weight, bias=None, negative_slope=0.2, *, backend=None):
    """``F.leaky_relu(F.linear(input, weight, bias), negative_slope)``, fused.

    input (*, in_features), weight (out_features, in_features), bias (out_features,) or None.
    float32 / float64 / float16 / bfloat16 (GEMMs accumulate in fp32).  Differentiable twice.
    """
    slope = _check_types(input, weight, bias, negative_slope)
    be = _backends.select(backend, input)
    if be == "cpp" or be == "cuda":
        return _cpp_op(input, weight, bias, slope)
    _check(input, weight, bias)  # the C++ checks, same messages (one contract for every backend)
    if be == "triton":
        if slope >= 0:
            return linear_leaky_relu_triton(input, weight, bias, slope)
        # negative slope: output sign no longer gives the pre-activation sign -> keep z (torch saves it)
        return F.leaky_relu(linear_leaky_relu_triton(input, weight, bias, 1.0), slope)
    if slope == 1.0:  # a plain Linear (gankern.nn.Linear), with torch's graph for it (as the C++ autograd)
        return F.linear(input, weight, bias)
    return reference.linear_leaky_relu(input, weight, bias, slope)


def _check_types(input, weight, bias, negative_slope):
    """Python-level argument types, for every backend alike (before any backend sees them); the slope as a float."""
    op = "gankern.linear_leaky_relu"
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: input must be a torch.Tensor, got {type(input).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{op}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if isinstance(negative_slope, torch.Tensor) or not isinstance(negative_slope, numbers.Real):
        raise TypeError(f"{op}: negative_slope must be a real number, got {type(negative_slope).__name__}")
    return float(negative_slope)


def _check(input, weight, bias, op="gankern.linear_leaky_relu"):
    """The Python twin of the C++ check (Triton / reference backends, fake kernels): the same messages and types."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: weight must be a torch.Tensor, got {type(weight).__name__}")
    ok = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    if input.dim() < 1:
        raise RuntimeError(f"{op}: input must have shape (*, in_features) with at least 1 dimension; got a 0-d tensor")
    if weight.dim() != 2:
        raise RuntimeError(f"{op}: weight must be 2-D (out_features, in_features); got shape {list(weight.shape)}")
    if input.dtype not in ok:
        raise RuntimeError(f"{op}: input must be float32, float64, float16 or bfloat16; got {input.dtype}")
    if weight.dtype != input.dtype:
        raise RuntimeError(f"{op}: weight dtype {weight.dtype} does not match input dtype {input.dtype}")
    if weight.device != input.device:
        raise RuntimeError(f"{op}: weight is on {weight.device} but input is on {input.device} (expected the same device)")
    if input.shape[-1] != weight.shape[1]:
        raise RuntimeError(f"{op}: input.shape[-1] (in_features) must equal weight.shape[1]; got input shape "
                         f"{list(input.shape)} and weight shape {list(weight.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{op}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise RuntimeError(f"{op}: bias must have shape (out_features,) = ({weight.shape[0]},); got shape {list(bias.shape)}")
        if bias.dtype != input.dtype:
            raise RuntimeError(f"{op}: bias dtype {bias.dtype} does not match input dtype {input.dtype}")
        if bias.device != input.device:
            raise RuntimeError(f"{op}: bias is on {bias.device} but input is on {input.device} (expected the same device)")


def _check_bwd(grad_output, saved, input, weight):
    """The C++ check_bwd_args, for the fake kernels and the Triton backward."""
    op = "gankern._linear_leaky_relu_bwd"
    _check(input, weight, None, op)
    expect = list(_out_shape(input, weight))
    for name, t in (("grad_output", grad_output), ("saved output", saved)):
        if list(t.shape) != expect:
            raise RuntimeError(f"{op}: {name} must have shape {expect}; got {list(t.shape)}")
        if t.dtype != input.dtype:
            raise RuntimeError(f"{op}: {name} dtype {t.dtype} does not match input dtype {input.dtype}")
        if t.device != input.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but input is on {input.device} (expected the same device)")


def _out_shape(input, weight):
    return (*input.shape[:-1], weight.shape[0])


# ---- fake kernels of the C++ internal ops (torch.compile, opcheck) ----
if _ext is not None:
    @torch.library.register_fake("gankern::_linear_leaky_relu_fwd")
    def _fwd_fake(input, weight, bias, negative_slope):
        _check(input, weight, bias, "gankern._linear_leaky_relu_fwd")
        return input.new_empty(_out_shape(input, weight))

    @torch.library.register_fake("gankern::_linear_leaky_relu_bwd")
    def _bwd_fake(grad_output, saved, input, weight, negative_slope, output_mask):
        _check_bwd(grad_output, saved, input, weight)
        gx = input.new_empty(input.shape) if output_mask[0] else None
        gw = weight.new_empty(weight.shape) if output_mask[1] else None
        gb = weight.new_empty((weight.shape[0],)) if output_mask[2] else None
        return gx, gw, gb


# ---- Triton backend: its own custom op ----
@torch.library.custom_op("gankern::linear_leaky_relu_triton", mutates_args=())
def linear_leaky_relu_triton(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             negative_slope: float) -> torch.Tensor:
    from ..triton import linear_leaky_relu as k
    _check(input, weight, bias)
    return k.forward(input, weight, bias, negative_slope)


@linear_leaky_relu_triton.register_fake
def _triton_fake(input, weight, bias, negative_slope):
    _check(input, weight, bias)
    return input.new_empty(_out_shape(input, weight))


@torch.library.custom_op("gankern::_linear_leaky_relu_triton_bwd", mutates_args=())
def _linear_leaky_relu_triton_bwd(grad_output: torch.Tensor, saved: torch.Tensor, input: torch.Tensor,
                                  weight: torch.Tensor, negative_slope: float,
                                  output_mask: list[bool]) -> list[torch.Tensor]:
    from ..triton import linear_leaky_relu as k
    _check_bwd(grad_output, saved, input, weight)
    return k.backward(grad_output, saved, input, weight, negative_slope, output_mask)


@_linear_leaky_relu_triton_bwd.register_fake
def _triton_bwd_fake(grad_output, saved, input, weight, negative_slope, output_mask):
    _check_bwd(grad_output, saved, input, weight)
    # outputs that are not needed come back as empty (0,) tensors
    return [input.new_empty(input.shape) if output_mask[0] else input.new_empty((0,)),
            weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty((0,)),
            weight.new_empty((weight.shape[0],)) if output_mask[2] else weight.new_empty((0,))]


def _triton_setup(ctx, inputs, output):
    input, weight, bias, slope = inputs
    if slope < 0:
        raise ValueError("gankern::linear_leaky_relu_triton: autograd needs negative_slope >= 0 "
                         "(gankern.linear_leaky_relu handles negative slopes)")
    ctx.save_for_backward(input, weight, output)
    ctx.slope = slope
    ctx.has_bias = bias is not None


def _triton_backward(ctx, grad):
    x, w, y = ctx.saved_tensors
    nx, nw, nb = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
    if torch.is_grad_enabled():
        # create_graph=True: differentiable torch ops, with torch's graph (csrc/linear_leaky_relu.cpp,
        # same): dZ from aten's leaky_relu_backward on the saved output y (not detached): its derivative
        # wrt y is zero (the mask is piecewise constant), but it keeps bias, weight and input in the
        # graph through y, so that a penalty differentiated again gives them zero gradients, as torch
        # does, instead of None.  Slope 1 = a plain Linear: dZ = dY (torch's linear: bias grad None).
        M = math.prod(x.shape[:-1])
        dz = grad if ctx.slope == 1.0 else torch.ops.aten.leaky_relu_backward(grad, y, ctx.slope, False)
        dz = dz.reshape(M, w.shape[0])
        gx = dz.mm(w).reshape(x.shape) if nx else None
        gw = dz.t().mm(x.reshape(M, w.shape[1])) if nw else None
        gb = dz.sum(0) if nb else None
        return gx, gw, gb, None
    gx, gw, gb = _linear_leaky_relu_triton_bwd(grad, y, x, w, ctx.slope, [nx, nw, nb])
    return (gx if nx else None), (gw if nw else None), (gb if nb else None), None


linear_leaky_relu_triton.register_autograd(_triton_backward, setup_context=_triton_setup)
