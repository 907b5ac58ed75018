"""Each op in plain PyTorch: the ``reference`` backend, and the ground truth the tests
compare against (run in float64).  Any device, any dtype, autograd (incl. double
backward) from PyTorch itself.  No argument checks here: the ``reference`` backend
(gankern/ops/<op>.py) runs the op's C++ checks (``gankern::_<op>_check``) first."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bce_with_logits(input, target, weight=None, reduction="mean", pos_weight=None):
    """binary_cross_entropy_with_logits; ``target`` may be a Python float."""
    if not isinstance(target, torch.Tensor):
        target = torch.full_like(input, float(target))
    return F.binary_cross_entropy_with_logits(input, target, weight=weight, reduction=reduction,
                                              pos_weight=pos_weight)


def batch_norm_relu(input, running_mean, running_var, weight=None, bias=None, training=False,
                    momentum=0.1, eps=1e-5):
    """relu(batch_norm(...)); running stats updated in place in training mode, as torch does."""
    return batch_norm_leaky_relu(input, running_mean, running_var, weight, bias, training, momentum, eps, 0.0)


def batch_norm_leaky_relu(input, running_mean, running_var, weight=None, bias=None, training=False,
                          momentum=0.1, eps=1e-5, negative_slope=0.2):
    """leaky_relu(batch_norm(...), negative_slope); slope 0 is relu (-inf -> 0, as torch.relu).

    No channels (C == 0): an empty output and empty gradients (torch's own batch_norm raises an
    IndexError from its empty-input path when given weight / bias; that is no contract to copy).
    """
    # dense parameters: torch 2.13's CPU batch_norm backward gives a wrong grad_input for an expanded (stride 0)
    # weight (0.4 off at (6, 3)); a dense copy is the same values
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    if input.dim() >= 2 and input.shape[1] == 0:
        out = F.batch_norm(input, running_mean, running_var, None, None, training, momentum, eps)
        for p in (weight, bias):
            if p is not None:
                out = out + p.sum()  # keeps the graph: empty gradients of shape (0,)
    else:
        out = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return F.relu(out) if negative_slope == 0 else F.leaky_relu(out, negative_slope)


def linear_leaky_relu(input, weight, bias=None, negative_slope=0.2):
    """leaky_relu(linear(input, weight, bias), negative_slope)."""
    return F.leaky_relu(F.linear(input, weight, bias), negative_slope)


def bias_leaky_relu(input, bias, negative_slope=0.2, dim=1):
    """leaky_relu(input + bias broadcast along dim, negative_slope)."""
    shape = [1] * input.dim()
    shape[dim] = -1
    return F.leaky_relu(input + bias.view(shape), negative_slope)
