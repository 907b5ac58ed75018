"""Fused Linear + LeakyReLU vs eager F.linear + F.leaky_relu vs torch.compile vs the bare GEMMs.

Shapes: batch 128 x every GAN layer below, batch 64 / 256 / 1024 x 784->512, and 2048^3.
"fwd": inference forward; "fwd+bwd": forward + torch.autograd.grad for input, weight, bias.
floor: the bare GEMMs alone (torch.mm; fwd+bwd: the three GEMMs).
"""
import pytest
import torch
import torch.nn.functional as F

import gankern
from conftest import compiled, record

LAYERS = [(784, 512), (512, 256), (256, 128), (1024, 784)]
SHAPES = [(128, k, n) for k, n in LAYERS] + [(b, 784, 512) for b in (64, 256, 1024)] + [(2048, 2048, 2048)]
IMPLS = ["gankern:cpp", "eager", "compile", "floor"]
SLOPE = 0.2


def _eager(x, w, b):
    return F.leaky_relu(F.linear(x, w, b), SLOPE)


def _ours(x, w, b):
    return gankern.linear_leaky_relu(x, w, b, SLOPE, backend="cpp")


def _make(M, K, N, grad):
    x = torch.randn(M, K, requires_grad=grad)
    w = (torch.randn(N, K) / K ** 0.5).requires_grad_(grad)
    b = torch.randn(N, requires_grad=grad)
    return x, w, b


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("M,K,N", SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in SHAPES])
def test_linear_leaky_relu_fwd(benchmark, M, K, N, impl):
    record(benchmark, op="linear_leaky_relu", impl=impl, shape=f"{M}x{K}->{N}", dtype=torch.float32, passes="fwd")
    x, w, b = _make(M, K, N, False)
    if impl == "floor":
        wt = w.t()
        fn = lambda: torch.mm(x, wt)  # noqa: E731
    else:
        f = {"gankern:cpp": _ours, "eager": _eager, "compile": compiled(_eager)}[impl]
        f(x, w, b)
        fn = lambda: f(x, w, b)  # noqa: E731
    benchmark(fn)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("M,K,N", SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in SHAPES])
def test_linear_leaky_relu_fwd_bwd(benchmark, M, K, N, impl):
    record(benchmark, op="linear_leaky_relu", impl=impl, shape=f"{M}x{K}->{N}", dtype=torch.float32, passes="fwd+bwd")
    x, w, b = _make(M, K, N, True)
    g = torch.randn(M, N)
    if impl == "floor":
        xd, wd = x.detach(), w.detach()

        def fn():
            torch.mm(xd, wd.t())
            torch.mm(g, wd)
            torch.mm(g.t(), xd)
    else:
        f = {"gankern:cpp": _ours, "eager": _eager, "compile": compiled(_eager)}[impl]

        def fn():
            return torch.autograd.grad(f(x, w, b), (x, w, b), g)
        fn()
    benchmark(fn)


# ---- bfloat16 (CPU): gankern on each reduced-precision GEMM path vs eager/compile in bf16 --------------
# impl "gankern:cpp"       the default path (native bf16 GEMMs where the CPU has bf16 units, see gankern.cpu_features)
# impl "gankern:cpp-fp32"  GANKERN_LLR_HALF_GEMM=fp32: operands widened to fp32 GEMMs
# impl "eager" / "compile" F.linear + F.leaky_relu on bf16 tensors; "floor": torch.mm in bf16
BF16_SHAPES = [(128, k, n) for k, n in LAYERS] + [(256, 784, 512)]
BF16_IMPLS = ["gankern:cpp", "gankern:cpp-fp32", "eager", "compile", "floor"]


def _bf16_fn(impl, x, w, b, monkeypatch):
    if impl == "gankern:cpp-fp32":
        monkeypatch.setenv("GANKERN_LLR_HALF_GEMM", "fp32")
    elif impl == "gankern:cpp":
        monkeypatch.delenv("GANKERN_LLR_HALF_GEMM", raising=False)
    return {"gankern:cpp": _ours, "gankern:cpp-fp32": _ours, "eager": _eager, "compile": compiled(_eager)}[impl]


@pytest.mark.parametrize("impl", BF16_IMPLS)
@pytest.mark.parametrize("M,K,N", BF16_SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in BF16_SHAPES])
def test_linear_leaky_relu_bf16_fwd_bwd(benchmark, monkeypatch, M, K, N, impl):
    bf = torch.bfloat16
    record(benchmark, op="linear_leaky_relu", impl=impl, shape=f"{M}x{K}->{N}", dtype=bf, passes="fwd+bwd")
    x, w, b = (t.detach().to(bf).requires_grad_() for t in _make(M, K, N, False))
    g = torch.randn(M, N).to(bf)
    if impl == "floor":
        xd, wd = x.detach(), w.detach()

        def fn():
            torch.mm(xd, wd.t())
            torch.mm(g, wd)
            torch.mm(g.t(), xd)
    else:
        f = _bf16_fn(impl, x, w, b, monkeypatch)

        def fn():
            return torch.autograd.grad(f(x, w, b), (x, w, b), g)
        fn()
    benchmark(fn)


@pytest.mark.parametrize("impl", BF16_IMPLS)
@pytest.mark.parametrize("M,K,N", BF16_SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in BF16_SHAPES])
def test_linear_leaky_relu_bf16_fwd(benchmark, monkeypatch, M, K, N, impl):
    bf = torch.bfloat16
    record(benchmark, op="linear_leaky_relu", impl=impl, shape=f"{M}x{K}->{N}", dtype=bf, passes="fwd")
    x, w, b = (t.to(bf) for t in _make(M, K, N, False))
    if impl == "floor":
        wt = w.t()
        fn = lambda: torch.mm(x, wt)  # noqa: E731
    else:
        f = _bf16_fn(impl, x, w, b, monkeypatch)
        f(x, w, b)
        fn = lambda: f(x, w, b)  # noqa: E731
    benchmark(fn)
