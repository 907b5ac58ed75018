"""Fused bias + LeakyReLU on a conv output vs eager (x + b.view(1, C, 1, 1), F.leaky_relu) vs torch.compile.

Shapes: the DCGAN 64x64 discriminator/generator activations at batch 64 (NCHW and channels-last),
and one large shape.  "fwd+bwd": forward + torch.autograd.grad for input and bias.
floor: one clone() of the input (a read and a write of the tensor).
"""
import pytest
import torch
import torch.nn.functional as F

import gankern
from conftest import compiled, record

SHAPES = [(64, 64, 32, 32), (64, 128, 16, 16), (64, 256, 8, 8), (64, 512, 4, 4), (64, 128, 16, 16, "cl"),
          (256, 64, 64, 64)]
IMPLS = ["gankern:cpp", "eager", "compile", "floor"]
SLOPE = 0.2


def _eager(x, b):
    return F.leaky_relu(x + b.view(1, -1, 1, 1), SLOPE)


def _ours(x, b):
    return gankern.bias_leaky_relu(x, b, SLOPE, backend="cpp")


def _make(shape, grad):
    cl = shape[-1] == "cl"
    x = torch.randn(*shape[:4])
    if cl:
        x = x.to(memory_format=torch.channels_last)
    return x.requires_grad_(grad), torch.randn(shape[1], requires_grad=grad)


def _id(s):
    return "x".join(map(str, s[:4])) + ("-cl" if s[-1] == "cl" else "")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=[_id(s) for s in SHAPES])
def test_bias_leaky_relu_fwd_bwd(benchmark, shape, impl):
    record(benchmark, op="bias_leaky_relu", impl=impl, shape=_id(shape), dtype=torch.float32, passes="fwd+bwd")
    x, b = _make(shape, True)
    g = torch.randn_like(x)
    if impl == "floor":
        xd = x.detach()
        fn = xd.clone  # noqa: E731
    else:
        f = {"gankern:cpp": _ours, "eager": _eager, "compile": compiled(_eager)}[impl]

        def fn():
            return torch.autograd.grad(f(x, b), (x, b), g)
        fn()
    benchmark(fn)
