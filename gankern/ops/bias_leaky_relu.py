"""gankern.bias_leaky_relu: fused ``leaky_relu(input + bias broadcast along dim, negative_slope)``.

For conv outputs (the conv runs without its bias): NCHW or channels-last, any rank >= 1.
Backends: ``cpp`` / ``cuda`` -> the C++ custom op ``gankern::bias_leaky_relu`` (argument checks,
autograd incl. double backward, in C++); ``triton`` -> the custom op
``gankern::bias_leaky_relu_triton`` (kernels in ``gankern/triton/bias_leaky_relu.py``);
``reference`` -> ``gankern.reference.bias_leaky_relu``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backends, reference

_ext = _backends.load_extension()
_cpp_op = torch.ops.gankern.bias_leaky_relu.default if _ext is not None else None
_OP = "gankern.bias_leaky_relu"


def bias_leaky_relu(input, bias, negative_slope=0.2, dim=1, *, backend=None):
    """``F.leaky_relu(input + bias.view(<C at dim>), negative_slope)``, fused (slope 0 = ReLU, 1 = bias only).

    input (..., C, ...) with C at ``dim``; bias (C,).  float32 / float64 / float16 / bfloat16 (math in
    float32, float64 for float64).  The output keeps a channels-last input's layout.  Differentiable
    twice; the backward keeps only the output (for ``negative_slope >= 0``).
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{_OP}: input must be a torch.Tensor, got {type(input).__name__}")
    be = _backends.select(backend, input)
    if be == "cpp" or be == "cuda":
        return _cpp_op(input, bias, negative_slope, dim)
    if be == "triton":
        d = _check(input, bias, dim)
        slope = float(negative_slope)
        if slope >= 0:
            return bias_leaky_relu_triton(input, bias, slope, d)
        return F.leaky_relu(bias_leaky_relu_triton(input, bias, 1.0, d), slope)
    return reference.bias_leaky_relu(input, bias, negative_slope, dim)


def _check(input, bias, dim, op=_OP):
    """The Python twin of the C++ check (Triton backend, fake kernels): the same messages, RuntimeError.
    Returns ``dim`` normalized."""
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{op}: bias must be a torch.Tensor, got {type(bias).__name__}")
    if input.dim() < 1:
        raise RuntimeError(f"{op}: input must have at least 1 dimension (the channel dimension); got a 0-d tensor")
    if input.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise RuntimeError(f"{op}: input must be float32, float64, float16 or bfloat16; got {input.dtype}")
    n = input.dim()
    if not isinstance(dim, int) or isinstance(dim, bool) or not -n <= dim < n:
        raise RuntimeError(f"{op}: dim must be in [{-n}, {n - 1}] for a {n}-D input; got dim={dim}")
    d = dim % n
    if bias.dim() != 1 or bias.shape[0] != input.shape[d]:
        raise RuntimeError(f"{op}: bias must have shape (C,) = ({input.shape[d]},), the size of input dimension {d}; "
                           f"got bias shape {list(bias.shape)} for input shape {list(input.shape)}")
    if bias.dtype != input.dtype:
        raise RuntimeError(f"{op}: bias dtype {bias.dtype} does not match input dtype {input.dtype}")
    if bias.device != input.device:
        raise RuntimeError(f"{op}: bias is on {bias.device} but input is on {input.device} (expected the same device)")
    return d


def _layout_like(t):
    """An empty tensor with ``t``'s shape in the layout the kernels write (channels-last stays)."""
    if not t.is_contiguous() and t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.empty_like(t, memory_format=torch.channels_last)
    if not t.is_contiguous() and t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.empty_like(t, memory_format=torch.channels_last_3d)
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _bias_grad(gx, dim):
    return gx if gx.dim() == 1 else gx.sum([i for i in range(gx.dim()) if i != dim])


# ---- fake kernels of the C++ internal ops (torch.compile, opcheck) ----
if _ext is not None:
    @torch.library.register_fake("gankern::_bias_leaky_relu_fwd")
    def _fwd_fake(input, bias, negative_slope, dim):
        _check(input, bias, dim, "gankern._bias_leaky_relu_fwd")
        return _layout_like(input)

    @torch.library.register_fake("gankern::_bias_leaky_relu_bwd")
    def _bwd_fake(grad_output, saved, negative_slope, dim, output_mask):
        gx = _layout_like(saved) if output_mask[0] else None
        gb = saved.new_empty((saved.shape[dim],)) if output_mask[1] else None
        return gx, gb


# ---- Triton backend: its own custom op ----
@torch.library.custom_op("gankern::bias_leaky_relu_triton", mutates_args=())
def bias_leaky_relu_triton(input: torch.Tensor, bias: torch.Tensor, negative_slope: float, dim: int) -> torch.Tensor:
    from ..triton import bias_leaky_relu as k
    d = _check(input, bias, dim)
    return k.forward(input, bias, negative_slope, d)


@bias_leaky_relu_triton.register_fake
def _triton_fake(input, bias, negative_slope, dim):
    _check(input, bias, dim)
    return _layout_like(input)


@torch.library.custom_op("gankern::_bias_leaky_relu_triton_bwd", mutates_args=())
def _bias_leaky_relu_triton_bwd(grad_output: torch.Tensor, saved: torch.Tensor, negative_slope: float, dim: int,
                                output_mask: list[bool]) -> list[torch.Tensor]:
    from ..triton import bias_leaky_relu as k
    return k.backward(grad_output, saved, negative_slope, dim, output_mask)


@_bias_leaky_relu_triton_bwd.register_fake
def _triton_bwd_fake(grad_output, saved, negative_slope, dim, output_mask):
    # outputs that are not needed come back as empty (0,) tensors
    return [_layout_like(saved) if output_mask[0] else saved.new_empty((0,)),
            saved.new_empty((saved.shape[dim],)) if output_mask[1] else saved.new_empty((0,))]


def _triton_setup(ctx, inputs, output):
    input, bias, slope, dim = inputs
    if not slope >= 0:
        raise ValueError("gankern::bias_leaky_relu_triton: autograd needs negative_slope >= 0 "
                         "(gankern.bias_leaky_relu handles negative slopes)")
    ctx.save_for_backward(output)
    ctx.slope = slope
    ctx.dim = dim % input.dim()


def _triton_backward(ctx, grad):
    (y,) = ctx.saved_tensors
    nx, nb = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if torch.is_grad_enabled():
        # create_graph=True: differentiable in grad (the mask) and in y (zero, as torch's leaky_relu)
        gx = grad if ctx.slope == 1.0 else torch.ops.aten.leaky_relu_backward(grad, y, ctx.slope, True)
        return (gx if nx else None), (_bias_grad(gx, ctx.dim) if nb else None), None, None
    gx, gb = _bias_leaky_relu_triton_bwd(grad, y, ctx.slope, ctx.dim, [nx, nb])
    return (gx if nx else None), (gb if nb else None), None, None


bias_leaky_relu_triton.register_autograd(_triton_backward, setup_context=_triton_setup)
