"""batch_norm_relu / batch_norm_leaky_relu: act(F.batch_norm(...)) fused, on every backend.

One op for both: ``negative_slope == 0`` is ReLU (``batch_norm_relu``), ``negative_slope > 0`` is
LeakyReLU (``batch_norm_leaky_relu``); the kernels take the slope as an argument.

* ``cpp`` / ``cuda``: the C++ op ``gankern::batch_norm_relu`` (csrc/batch_norm_relu.cpp; argument
  checks and autograd in C++; its last argument ``negative_slope`` defaults to 0), internal
  kernels ``gankern::_batch_norm_relu_fwd`` / ``_bwd`` whose fake kernels are registered here.
* ``triton``: the custom op ``gankern::_batch_norm_relu_triton_fwd`` (+ ``_bwd``), defined here
  with ``torch.library.custom_op``; the kernels live in gankern/triton/batch_norm_relu.py.
* ``reference``: gankern.reference.batch_norm_leaky_relu (plain PyTorch, double backward included).

Every backend has one contract: the same argument checks (type, dtype, device, shape, named in the
message), no channels / an empty batch behave as torch, NaN / Inf propagate as in torch.
"""
from __future__ import annotations

import math

import torch

from .. import _backends, reference

__all__ = ["batch_norm_relu", "batch_norm_leaky_relu"]

_PARAM_NAMES = ("running_mean", "running_var", "weight", "bias")


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


def _check_types(input, running_mean, running_var, weight, bias):
    """What the dispatcher's argument parser checks on the C++ path, with the same error type and
    message, for the backends that do not go through it (a list as weight must not end in an
    AttributeError somewhere inside)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm_relu: input must be a tensor, got {type(input).__name__}")
    for name, t in zip(_PARAM_NAMES, (running_mean, running_var, weight, bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise _type_error(name, t)


def _type_error(name, value):
    # the dispatcher's message for the same call on the C++ path (torch/csrc/jit/python/pybind_utils.h)
    return RuntimeError(f"gankern::batch_norm_relu() Expected a value of type 'Optional[Tensor]' for argument "
                        f"'{name}' but instead found type '{type(value).__name__}'.\n"
                        f"Position: {1 + _PARAM_NAMES.index(name)}\nValue: {value!r}")


def _check_slope(negative_slope):
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)) or \
            not (math.isfinite(negative_slope) and negative_slope >= 0):
        raise ValueError(f"batch_norm_leaky_relu: negative_slope must be a finite float >= 0, got {negative_slope!r}")


def _check_args(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope=0.0):
    """The C++ checks (csrc/batch_norm_relu.cpp: bnr_check_args), for the Triton and reference backends."""
    _check_types(input, running_mean, running_var, weight, bias)
    if input.dim() < 2:
        raise RuntimeError(f"batch_norm_relu: input must have at least 2 dimensions (N, C, ...), got a "
                           f"{input.dim()}-D tensor of shape {list(input.shape)}")
    dt = input.dtype
    if dt not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise RuntimeError(f"batch_norm_relu: input must be float32, float16, bfloat16 or float64, got {dt}")
    C = input.shape[1]
    reduced = dt in (torch.float16, torch.bfloat16)
    pdt = pname = None
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"batch_norm_relu: {name} must be a tensor or None, got {type(t).__name__}")
        if t.dim() != 1 or t.numel() != C:
            raise RuntimeError(f"batch_norm_relu: {name} must be a 1-D tensor of {C} elements (the channel count "
                               f"input.size(1)), got shape {list(t.shape)}")
        if t.device != input.device:
            raise RuntimeError(f"batch_norm_relu: {name} must be on the input's device {input.device}, got {t.device}")
        if not (t.dtype == dt or (reduced and t.dtype == torch.float32)):
            raise RuntimeError(f"batch_norm_relu: {name} must have the input's dtype {dt}"
                               f"{' or float32' if reduced else ''}, got {t.dtype}")
        if pdt is None:
            pdt, pname = t.dtype, name
        elif t.dtype != pdt:
            raise RuntimeError(f"batch_norm_relu: {name} has dtype {t.dtype} but {pname} has dtype {pdt}; "
                               "running_mean, running_var, weight and bias must share one dtype (as in torch)")
    if training:
        if (running_mean is None) != (running_var is None):
            raise ValueError("running_mean and running_var must either both be None or neither be None")
        per_channel = input.shape[0] * math.prod(input.shape[2:])
        if per_channel == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
    else:
        if running_mean is None:
            raise RuntimeError("batch_norm_relu: running_mean must be defined in evaluation mode (training=False)")
        if running_var is None:
            raise RuntimeError("batch_norm_relu: running_var must be defined in evaluation mode (training=False)")
    if not isinstance(momentum, (int, float)) or not math.isfinite(momentum):
        raise TypeError(f"batch_norm_relu: momentum must be a finite float, got {momentum!r}")
    if not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"batch_norm_relu: eps must be a finite float >= 0, got {eps!r}")
    _check_slope(negative_slope)


def _check_devices(input, *named):
    """The fake kernels' checks: device (a parameter on the meta device sends the call to the fake
    kernels) and dtype of every tensor argument, named as the real kernels name them."""
    reduced = input.dtype in (torch.float16, torch.bfloat16)
    for name, t in named:
        if t is None:
            continue
        if t.device != input.device:
            raise RuntimeError(f"batch_norm_relu: {name} must be on the input's device {input.device}, got {t.device}")
        if name in _PARAM_NAMES and not (t.dtype == input.dtype or (reduced and t.dtype == torch.float32)):
            raise RuntimeError(f"batch_norm_relu: {name} must have the input's dtype {input.dtype}"
                               f"{' or float32' if reduced else ''}, got {t.dtype}")


# ------------------------------------------------------------------ fake kernels of the C++ ops
def _register_cpp_fakes():
    if _backends.load_extension() is None or not hasattr(torch.ops.gankern, "_batch_norm_relu_fwd"):
        return

    @torch.library.register_fake("gankern::_batch_norm_relu_fwd")
    def _fwd_fake(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope=0.0):
        torch._check(input.dim() >= 2, lambda: "batch_norm_relu: input must have at least 2 dimensions")
        _check_slope(negative_slope)
        _check_devices(input, ("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                       ("bias", bias))
        C = input.shape[1]
        acc = _acc_dtype(input)
        return (_out_like(input), input.new_empty((C,), dtype=acc), input.new_empty((C,), dtype=acc))

    @torch.library.register_fake("gankern::_batch_norm_relu_bwd")
    def _bwd_fake(grad_out, input, weight, bias, save_mean, save_invstd, training, negative_slope=0.0):
        _check_devices(input, ("grad_out", grad_out), ("weight", weight), ("bias", bias), ("save_mean", save_mean),
                       ("save_invstd", save_invstd))
        C = input.shape[1]
        pdt = weight.dtype if weight is not None else (bias.dtype if bias is not None else _acc_dtype(input))
        return (_out_like(input), input.new_empty((C,), dtype=pdt), input.new_empty((C,), dtype=pdt))


_register_cpp_fakes()


# ------------------------------------------------------------------ the Triton backend as custom ops
# torch.library cannot attach an autograd formula to an op that mutates its inputs, so the Triton
# forward is functional: it returns the updated running stats, which the public function copies
# into running_mean / running_var (an in-place copy_ that torch.compile functionalizes).
@torch.library.custom_op("gankern::_batch_norm_relu_triton_fwd", mutates_args=())
def _triton_fwd(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                weight: torch.Tensor | None, bias: torch.Tensor | None, training: bool, momentum: float,
                eps: float, negative_slope: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (y, save_mean, save_invstd, new_running_mean, new_running_var) (the last two float32, (C,))."""
    from ..triton import batch_norm_relu as k
    _check_args(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope)
    C = input.shape[1]
    if running_mean is None:
        new_rm = torch.zeros((C,), dtype=torch.float32, device=input.device)
        new_rv = torch.ones((C,), dtype=torch.float32, device=input.device)
        y, mean, invstd = k.forward(input, None, None, weight, bias, training, momentum, eps, negative_slope)
    else:
        # contiguous float32 copies (memory_format: a strided buffer's copy keeps its strides otherwise)
        new_rm = running_mean.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
        new_rv = running_var.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
        if not training:  # eval reads the stats in their own dtype (as the cpp kernel does)
            y, mean, invstd = k.forward(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                        negative_slope)
        else:
            y, mean, invstd = k.forward(input, new_rm, new_rv, weight, bias, training, momentum, eps, negative_slope)
    return y, mean, invstd, new_rm, new_rv


@_triton_fwd.register_fake
def _(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope=0.0):
    _check_slope(negative_slope)
    _check_devices(input, ("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                   ("bias", bias))
    C = input.shape[1]
    f32 = dict(dtype=torch.float32)
    return (_out_like(input), input.new_empty((C,), **f32), input.new_empty((C,), **f32),
            input.new_empty((C,), **f32), input.new_empty((C,), **f32))


@torch.library.custom_op("gankern::_batch_norm_relu_triton_bwd", mutates_args=())
def _triton_bwd(grad_out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor | None,
                bias: torch.Tensor | None, save_mean: torch.Tensor, save_invstd: torch.Tensor,
                training: bool, negative_slope: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..triton import batch_norm_relu as k
    return k.backward(grad_out, input, weight, bias, save_mean, save_invstd, training, negative_slope)


@_triton_bwd.register_fake
def _(grad_out, input, weight, bias, save_mean, save_invstd, training, negative_slope=0.0):
    _check_devices(input, ("grad_out", grad_out), ("weight", weight), ("bias", bias), ("save_mean", save_mean),
                   ("save_invstd", save_invstd))
    C = input.shape[1]
    pdt = weight.dtype if weight is not None else (bias.dtype if bias is not None else torch.float32)
    return (_out_like(input), input.new_empty((C,), dtype=pdt), input.new_empty((C,), dtype=pdt))


def _triton_setup(ctx, inputs, output):
    input, _rm, _rv, weight, bias, training, _momentum, _eps, negative_slope = inputs
    _y, mean, invstd, new_rm, new_rv = output
    ctx.save_for_backward(input, weight, bias, mean, invstd)
    ctx.training = training
    ctx.negative_slope = negative_slope
    ctx.mark_non_differentiable(mean, invstd, new_rm, new_rv)


def _triton_backward(ctx, grad_y, *_unused):
    if torch.is_grad_enabled():
        raise RuntimeError("gankern.batch_norm_relu: double backward (create_graph=True) is not supported by the "
                           "'triton' backend; use backend='reference' for higher-order gradients")
    input, weight, bias, mean, invstd = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(input)
    gi, gw, gb = _triton_bwd(grad_y, input, weight, bias, mean, invstd, ctx.training, ctx.negative_slope)
    return (gi, None, None, gw if weight is not None else None, gb if bias is not None else None, None, None, None,
            None)


_triton_fwd.register_autograd(_triton_backward, setup_context=_triton_setup)


# ------------------------------------------------------------------ public functions
_cpp_op = None


def _run(b, input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope):
    """The Triton and reference backends (one contract with the C++ path: the same checks first)."""
    if b == "triton":
        if isinstance(input, torch.Tensor) and input.dtype == torch.float64:
            raise RuntimeError("batch_norm_relu: backend 'triton' supports float32, float16 and bfloat16 inputs, "
                               "got float64 (use backend='cpp', 'cuda' or 'reference')")
        _check_types(input, running_mean, running_var, weight, bias)
        y, _m, _i, new_rm, new_rv = _triton_fwd(input, running_mean, running_var, weight, bias, training,
                                                momentum, eps, negative_slope)
        if training and running_mean is not None:
            with torch.no_grad():
                running_mean.copy_(new_rm)
                running_var.copy_(new_rv)
        return y
    _check_args(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope)
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
    global _cpp_op
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm_relu: input must be a tensor, got {type(input).__name__}")
    b = _backends.select(backend, input)
    if b == "cpp" or b == "cuda":
        if _cpp_op is None:
            _cpp_op = torch.ops.gankern.batch_norm_relu.default
        return _cpp_op(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return _run(b, input, running_mean, running_var, weight, bias, training, momentum, eps, 0.0)


def batch_norm_leaky_relu(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                          eps=1e-5, negative_slope=0.2, *, backend=None):
    """``leaky_relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps),
    negative_slope)``, fused: the op of :func:`batch_norm_relu` with a slope.

    ``negative_slope`` must be a finite float >= 0 (``ValueError`` otherwise); 0 is exactly
    ``batch_norm_relu`` (``torch.relu``: -inf -> 0).  Everything else as :func:`batch_norm_relu`.
    """
    global _cpp_op
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm_relu: input must be a tensor, got {type(input).__name__}")
    b = _backends.select(backend, input)
    if b == "cpp" or b == "cuda":
        if _cpp_op is None:
            _cpp_op = torch.ops.gankern.batch_norm_relu.default
        return _cpp_op(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope)
    return _run(b, input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope)
