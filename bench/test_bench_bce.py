"""bce_with_logits forward + backward: gankern:cpp vs eager F.binary_cross_entropy_with_logits vs
torch.compile of it.

Shapes: discriminator outputs (B, 1), B = 64, 128, 256, 1024, with the GAN label as a float (1.0:
eager / compile build the label tensor with torch.full_like, as a GAN training step does) and
with a label tensor; one bandwidth size (16M elements, float target).  fp32, mean reduction.
Pass: "fwd+bwd" = loss, then torch.autograd.grad(loss, x); plus a "fwd" pass (no autograd).
"floor" for fwd+bwd = x.sum() and its torch.autograd.grad: the autograd-engine round trip that every
fwd+bwd pays whatever the loss kernel is (on the 2-core VM this was measured on, ~120 us).
"""
import pytest
import torch
import torch.nn.functional as F

import gankern
from conftest import compiled, record

OP = "bce_with_logits"
CASES = [((b, 1), kind) for b in (64, 128, 256, 1024) for kind in ("float", "tensor")] + [((1 << 24,), "float")]
IMPLS = ["gankern:cpp", "eager", "compile", "floor"]


def eager_float(x):
    return F.binary_cross_entropy_with_logits(x, torch.full_like(x, 1.0))


def eager_tensor(x, t):
    return F.binary_cross_entropy_with_logits(x, t)


def ours_float(x):
    return gankern.bce_with_logits(x, 1.0, backend="cpp")


def ours_tensor(x, t):
    return gankern.bce_with_logits(x, t, backend="cpp")


_compiled = {}


def floor_float(x):
    return x.sum()


def floor_tensor(x, t):
    return x.sum()


def _fn(impl, kind, shape):
    if impl == "floor":
        return floor_float if kind == "float" else floor_tensor
    if impl == "gankern:cpp":
        return ours_float if kind == "float" else ours_tensor
    base = eager_float if kind == "float" else eager_tensor
    if impl == "eager":
        return base
    key = (kind, shape)
    if key not in _compiled:
        _compiled[key] = compiled(base)
    return _compiled[key]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[1]}")
def test_bce_fwd_bwd(benchmark, impl, case):
    if gankern.backends()["cpp"]["available"] is False and impl == "gankern:cpp":
        pytest.skip("gankern._C not built")
    shape, kind = case
    x = torch.randn(shape).requires_grad_()
    args = (x,) if kind == "float" else (x, torch.rand(shape))
    fn = _fn(impl, kind, shape)

    def step():
        loss = fn(*args)
        return torch.autograd.grad(loss, x)

    for _ in range(3):  # warm-up (torch.compile compiles here, not in the timed rounds)
        step()
    record(benchmark, op=OP, impl=impl, shape=f"{tuple(shape)} target={kind}", dtype=torch.float32, passes="fwd+bwd")
    benchmark(step)


@pytest.mark.parametrize("impl", ["gankern:cpp", "eager", "compile"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[1]}")
def test_bce_fwd(benchmark, impl, case):
    if gankern.backends()["cpp"]["available"] is False and impl == "gankern:cpp":
        pytest.skip("gankern._C not built")
    shape, kind = case
    x = torch.randn(shape)
    args = (x,) if kind == "float" else (x, torch.rand(shape))
    fn = _fn(impl, kind, shape)
    for _ in range(3):
        fn(*args)
    record(benchmark, op=OP, impl=impl, shape=f"{tuple(shape)} target={kind}", dtype=torch.float32, passes="fwd")
    benchmark(fn, *args)
