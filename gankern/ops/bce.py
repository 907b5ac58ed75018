"""bce_with_logits: ``F.binary_cross_entropy_with_logits`` fused, on every backend; the target may
be a Python float (GAN labels 1.0 / 0.0 / 0.9) so no label tensor is materialized.

* ``cpp`` / ``cuda``: the C++ op ``gankern::bce_with_logits(input, target?, target_scalar, weight?,
  pos_weight?, reduction:int)`` (csrc/bce.cpp: argument checks and autograd in C++), internal
  kernels ``gankern::_bce_with_logits_fwd`` / ``_bwd`` whose fake kernels are registered here.
* ``triton``: the custom op ``gankern::_bce_with_logits_triton`` (+ ``_bwd``), defined here with
  ``torch.library.custom_op``; the kernels live in gankern/triton/bce.py.
* ``reference``: gankern.reference.bce_with_logits (plain PyTorch).
"""
from __future__ import annotations

import numbers

import torch

from .. import _backends, reference

__all__ = ["bce_with_logits"]

_REDUCTION = {"none": 0, "mean": 1, "sum": 2}
_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_args(input, target, target_scalar, weight, pos_weight, reduction):
    """The C++ checks (csrc/bce.cpp: bce::check_args), for the Triton backend."""
    if input.dtype not in _FLOAT:
        raise RuntimeError(f"bce_with_logits: input must be a float32, float16, bfloat16 or float64 tensor, "
                           f"got {input.dtype}")
    if reduction not in (0, 1, 2):
        raise ValueError(f"bce_with_logits: reduction must be 0 ('none'), 1 ('mean') or 2 ('sum'), got {reduction}")
    if target is not None:
        if target.shape != input.shape:
            raise ValueError(f"Target size ({target.size()}) must be the same as input size ({input.size()})")
        if target.device != input.device:
            raise RuntimeError(f"bce_with_logits: target must be on the input's device {input.device}, "
                               f"got {target.device}")
        if target.dtype != input.dtype:
            raise RuntimeError(f"bce_with_logits: target must have the input's dtype {input.dtype}, got "
                               f"{target.dtype} (convert it, or pass a float target)")
    for name, w in (("weight", weight), ("pos_weight", pos_weight)):
        if w is None:
            continue
        if not w.is_floating_point():
            raise RuntimeError(f"bce_with_logits: {name} must be a floating-point tensor, got {w.dtype}")
        if w.device != input.device:
            raise RuntimeError(f"bce_with_logits: {name} must be on the input's device {input.device}, got {w.device}")
        try:
            ok = torch.broadcast_shapes(w.shape, input.shape) == input.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise RuntimeError(f"bce_with_logits: {name} of shape {w.size()} cannot be broadcast to the input's "
                               f"shape {input.size()}")


def _check_bwd_args(grad_out, input, target, target_scalar, weight, pos_weight, reduction, need_target):
    """The C++ checks of the backward (csrc/bce.cpp: bce::check_bwd_args)."""
    _check_args(input, target, target_scalar, weight, pos_weight, reduction)
    if grad_out.device != input.device:
        raise RuntimeError(f"bce_with_logits backward: grad_out must be on {input.device}, got {grad_out.device}")
    if reduction == 0:
        try:
            ok = torch.broadcast_shapes(grad_out.shape, input.shape) == input.shape
        except RuntimeError:
            ok = False
    else:
        ok = grad_out.numel() == 1
    if not ok:
        raise RuntimeError(f"bce_with_logits backward: grad_out has shape {list(grad_out.shape)}, expected "
                           f"{'the input' + chr(39) + 's shape' if reduction == 0 else 'a single element'}")
    if need_target and target is None:
        raise RuntimeError("bce_with_logits backward: need_target=True requires a target tensor")


def _not_differentiable(weight, pos_weight):
    for name, w in (("weight", weight), ("pos_weight", pos_weight)):
        if w is not None and w.requires_grad:
            raise RuntimeError("The function 'binary_cross_entropy_with_logits' is not differentiable with respect "
                               f"to argument '{name}'. This input cannot have requires_grad True.")


def _backward_differentiable(go, x, target, ts, w, pw, reduction, need_x, need_t):
    """torch's backward formulas in differentiable ops (create_graph=True); mirrors csrc/bce.cpp."""
    t = target if target is not None else torch.full_like(x, ts)
    scale = go if w is None else go * w
    if reduction == 1:
        scale = scale / x.numel()
    gx = gt = None
    if need_x:
        s = torch.sigmoid(x)
        gx = ((pw * t + 1 - t) * s - pw * t) if pw is not None else (s - t)
        gx = (gx * scale).to(x.dtype).expand(x.shape)
    if need_t:
        gt = (torch.nn.functional.logsigmoid(-x) - pw * torch.nn.functional.logsigmoid(x)) if pw is not None else -x
        gt = (gt * scale).to(x.dtype).expand(x.shape)
    return gx, gt


# ------------------------------------------------------------------ fake kernels of the C++ ops
def _register_cpp_fakes():
    if _backends.load_extension() is None or not hasattr(torch.ops.gankern, "_bce_with_logits_fwd"):
        return

    @torch.library.register_fake("gankern::_bce_with_logits_fwd")
    def _fwd_fake(input, target, target_scalar, weight, pos_weight, reduction):
        _check_args(input, target, target_scalar, weight, pos_weight, reduction)
        return input.new_empty(input.shape if reduction == 0 else ())

    @torch.library.register_fake("gankern::_bce_with_logits_bwd")
    def _bwd_fake(grad_out, input, target, target_scalar, weight, pos_weight, reduction, need_target):
        _check_bwd_args(grad_out, input, target, target_scalar, weight, pos_weight, reduction, need_target)
        return input.new_empty(input.shape), input.new_empty(input.shape if need_target else (0,))


_register_cpp_fakes()


# ------------------------------------------------------------------ the Triton backend as custom ops
@torch.library.custom_op("gankern::_bce_with_logits_triton", mutates_args=())
def _triton_fwd(input: torch.Tensor, target: torch.Tensor | None, target_scalar: float, weight: torch.Tensor | None,
                pos_weight: torch.Tensor | None, reduction: int) -> torch.Tensor:
    from ..triton import bce as k
    _check_args(input, target, target_scalar, weight, pos_weight, reduction)
    return k.forward(input, target, target_scalar, weight, pos_weight, reduction)


@_triton_fwd.register_fake
def _(input, target, target_scalar, weight, pos_weight, reduction):
    _check_args(input, target, target_scalar, weight, pos_weight, reduction)
    return input.new_empty(input.shape if reduction == 0 else ())


@torch.library.custom_op("gankern::_bce_with_logits_triton_bwd", mutates_args=())
def _triton_bwd(grad_out: torch.Tensor, input: torch.Tensor, target: torch.Tensor | None, target_scalar: float,
                weight: torch.Tensor | None, pos_weight: torch.Tensor | None, reduction: int,
                need_target: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from ..triton import bce as k
    _check_bwd_args(grad_out, input, target, target_scalar, weight, pos_weight, reduction, need_target)
    return k.backward(grad_out, input, target, target_scalar, weight, pos_weight, reduction, need_target)


@_triton_bwd.register_fake
def _(grad_out, input, target, target_scalar, weight, pos_weight, reduction, need_target):
    _check_bwd_args(grad_out, input, target, target_scalar, weight, pos_weight, reduction, need_target)
    return input.new_empty(input.shape), input.new_empty(input.shape if need_target else (0,))


def _triton_setup(ctx, inputs, output):
    input, target, target_scalar, weight, pos_weight, reduction = inputs
    ctx.save_for_backward(input, target, weight, pos_weight)
    ctx.target_scalar = target_scalar
    ctx.reduction = reduction


def _triton_backward(ctx, grad):
    input, target, weight, pos_weight = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    need_t = target is not None and ctx.needs_input_grad[1]
    if torch.is_grad_enabled():  # create_graph=True: differentiable formulas (double backward)
        gx, gt = _backward_differentiable(grad, input, target, ctx.target_scalar, weight, pos_weight,
                                          ctx.reduction, need_x, need_t)
    else:
        gx, gt = _triton_bwd(grad, input, target, ctx.target_scalar, weight, pos_weight, ctx.reduction, need_t)
    return (gx if need_x else None, gt if need_t else None, None, None, None, None)


_triton_fwd.register_autograd(_triton_backward, setup_context=_triton_setup)


# ------------------------------------------------------------------ public function
_cpp_op = None


def bce_with_logits(input, target, weight=None, reduction="mean", pos_weight=None, *, backend=None):
    """``F.binary_cross_entropy_with_logits(input, target, weight, reduction=reduction, pos_weight=pos_weight)``.

    ``target``: a tensor of the input's shape and dtype, or a Python float (every element's target,
    no tensor is built).  ``weight`` / ``pos_weight`` broadcast to the input (any float dtype; used in
    float32, float64 for float64 inputs).  Output dtype = input dtype.  Stable formula, float32
    accumulation for fp16/bf16, deterministic reductions.  Gradients: input and a target tensor (also
    double backward); weight / pos_weight are not differentiable (as in torch).
    ``backend``: None / "auto", "cpp", "cuda", "triton", "reference".
    """
    global _cpp_op
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
    for name, w in (("weight", weight), ("pos_weight", pos_weight)):  # for every backend alike
        if w is not None and not isinstance(w, torch.Tensor):
            raise TypeError(f"bce_with_logits: {name} must be a tensor or None, got {type(w).__name__}")
    b = _backends.select(backend, input)
    if b == "cpp" or b == "cuda":
        if _cpp_op is None:
            _cpp_op = torch.ops.gankern.bce_with_logits.default
        return _cpp_op(input, tt, ts, weight, pos_weight, red)
    # the C++ checks, same messages (one contract for every backend)
    _check_args(input, tt, ts, weight, pos_weight, red)
    if b == "triton":
        if input.dtype == torch.float64:
            raise RuntimeError("bce_with_logits: backend 'triton' supports float32, float16 and bfloat16 inputs, "
                               "got float64 (use backend='cpp', 'cuda' or 'reference')")
        if torch.is_grad_enabled():
            _not_differentiable(weight, pos_weight)
        return _triton_fwd(input, tt, ts, weight, pos_weight, red)
    if input.dtype == torch.float64:  # weights used in float64 for float64 inputs, as the kernels do
        weight = weight.double() if weight is not None else None
        pos_weight = pos_weight.double() if pos_weight is not None else None
    return reference.bce_with_logits(input, target, weight, reduction, pos_weight)
