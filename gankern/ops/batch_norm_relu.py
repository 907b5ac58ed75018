"""batch_norm_relu / batch_norm_leaky_relu: act(F.batch_norm(...)) fused, on every backend.

One op for both: ``negative_slope == 0`` is ReLU (``batch_norm_relu``), ``negative_slope > 0`` is
LeakyReLU (``batch_norm_leaky_relu``); the kernels take the slope as an argument.

The op ``gankern::batch_norm_relu`` (csrc/batch_norm_relu.cpp: checks, autograd; its last argument
``negative_slope`` defaults to 0) runs its internal ops ``_batch_norm_relu_fwd`` / ``_bwd``: overload
``default`` for backends ``cpp`` / ``cuda``, ``triton`` for backend ``triton`` (registered here,
kernels in gankern/triton/batch_norm_relu.py).  ``reference``: gankern.reference.batch_norm_leaky_relu
(plain PyTorch, double backward included) after the same checks (``gankern::_batch_norm_relu_check``).

Every backend has one contract: the same argument checks (type, dtype, device, shape, named in the
message), no channels / an empty batch behave as torch, NaN / Inf propagate as in torch.
"""
from __future__ import annotations

import torch

from .. import _backends, reference
from . import handles, register_internal

__all__ = ["batch_norm_relu", "batch_norm_leaky_relu"]

_ops = handles("batch_norm_relu")
_PARAM_NAMES = ("running_mean", "running_var", "weight", "bias")


def _type_error(name, value):
    # the dispatcher's message for the same call of gankern::batch_norm_relu (torch/csrc/jit/python/pybind_utils.h),
    # for every backend alike (the reference backend's check op has another name)
    return RuntimeError(f"gankern::batch_norm_relu() Expected a value of type 'Optional[Tensor]' for argument "
                        f"'{name}' but instead found type '{type(value).__name__}'.\n"
                        f"Position: {1 + _PARAM_NAMES.index(name)}\nValue: {value!r}")


def _call(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope, backend):
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm_relu: input must be a tensor, got {type(input).__name__}")
    for name, t in zip(_PARAM_NAMES, (running_mean, running_var, weight, bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise _type_error(name, t)
    b = _backends.select(backend, input)
    if b == "cpp" or b == "cuda":
        return _ops.default(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope)
    if b == "triton":
        _backends.check_supported(b, "batch_norm_relu", input)
        return _ops.triton(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope)
    if _ops.check is not None:
        _ops.check(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope)
    return reference.batch_norm_leaky_relu(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                           negative_slope)


def batch_norm_relu(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                    eps=1e-5, *, backend=None):
    """``relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps))``, fused.

    Same arguments and semantics as :func:`torch.nn.functional.batch_norm`: inputs (N, C), (N, C, L),
    (N, C, H, W) (contiguous or channels-last; the output keeps the memory format; other strides are
    accepted and copied first); in training the batch statistics normalize and ``running_mean`` /
    ``running_var`` (may be None) are updated in place with the unbiased variance (an empty batch
    leaves them unchanged); in eval the running statistics are used.  fp16/bf16 inputs may take
    float32 running stats / weight / bias.  ``backend``: None / "auto", "cpp", "cuda", "triton",
    "reference".  Double backward: ``reference`` only (the others raise a clear error).
    ``batch_norm_leaky_relu(..., negative_slope=0.0)`` is this op.
    """
    return _call(input, running_mean, running_var, weight, bias, training, momentum, eps, 0.0, backend)


def batch_norm_leaky_relu(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                          eps=1e-5, negative_slope=0.2, *, backend=None):
    """``leaky_relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps),
    negative_slope)``, fused: the op of :func:`batch_norm_relu` with a slope.

    ``negative_slope`` must be a finite float >= 0 (``ValueError`` otherwise); 0 is exactly
    ``batch_norm_relu`` (``torch.relu``: -inf -> 0).  Everything else as :func:`batch_norm_relu`.
    """
    return _call(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope, backend)


# ---- the internal ops: fakes (both overloads) and the Triton kernels (overload .triton) ----
def _channels_last(x):
    return (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) or \
           (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d))


def _out_like(x):
    """The layout the kernels produce: channels-last stays channels-last, anything else contiguous."""
    if not x.is_contiguous() and _channels_last(x):
        return torch.empty_like(x, memory_format=torch.preserve_format)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fwd_fake(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope=0.0):
    C = input.shape[1]
    acc = _acc_dtype(input)
    return _out_like(input), input.new_empty((C,), dtype=acc), input.new_empty((C,), dtype=acc)


def _bwd_fake(grad_out, input, weight, bias, save_mean, save_invstd, training, negative_slope=0.0):
    C = input.shape[1]
    pdt = weight.dtype if weight is not None else (bias.dtype if bias is not None else _acc_dtype(input))
    return _out_like(input), input.new_empty((C,), dtype=pdt), input.new_empty((C,), dtype=pdt)


register_internal("_batch_norm_relu_fwd", _fwd_fake, "batch_norm_relu.forward_inplace")
register_internal("_batch_norm_relu_bwd", _bwd_fake, "batch_norm_relu.backward")
