"""batch_norm_relu (training mode): gankern:cpp vs eager F.relu(F.batch_norm) vs torch.compile of it.

Shapes: generator blocks (Linear -> BatchNorm1d -> ReLU) batch x channels, DCGAN blocks
(ConvTranspose -> BatchNorm2d -> ReLU, contiguous and channels-last), and one bandwidth shape
(16384 x 1024 fp32) with a clone() of the input as the copy-bandwidth floor.
Passes: "fwd" (forward incl. the running-stat update) and "fwd+bwd" (forward + grads of x, w, b).
"""
import pytest
import torch
import torch.nn.functional as F

import gankern
from conftest import compiled, record

OP = "batch_norm_relu"
GEN_SHAPES = [(64, 128), (64, 1024), (128, 128), (128, 256), (128, 512), (128, 1024), (256, 512), (1024, 128),
              (1024, 1024)]
DCGAN = [((128, 256, 8, 8), "contig"), ((128, 64, 32, 32), "contig"), ((128, 256, 8, 8), "cl"),
         ((128, 64, 32, 32), "cl")]
BW_SHAPE = (16384, 1024)
CASES = [(s, "contig") for s in GEN_SHAPES] + DCGAN + [(BW_SHAPE, "contig")]
IMPLS = ["gankern:cpp", "eager", "compile"]


def eager(x, rm, rv, w, b):
    return F.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5))


def ours(x, rm, rv, w, b):
    return gankern.batch_norm_relu(x, rm, rv, w, b, True, 0.1, 1e-5, backend="cpp")


_compiled = {}


def _fn(impl, key):
    if impl == "gankern:cpp":
        return ours
    if impl == "eager":
        return eager
    if key not in _compiled:
        _compiled[key] = compiled(eager)
    return _compiled[key]


def _inputs(shape, fmt, requires_grad):
    x = torch.randn(shape)
    if fmt == "cl":
        x = x.to(memory_format=torch.channels_last)
    C = shape[1]
    w = torch.randn(C)
    b = torch.randn(C)
    if requires_grad:
        x.requires_grad_()
        w.requires_grad_()
        b.requires_grad_()
    return x, torch.zeros(C), torch.ones(C), w, b


def _label(shape, fmt):
    return "x".join(map(str, shape)) + ("-cl" if fmt == "cl" else "")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,fmt", CASES, ids=[_label(*c) for c in CASES])
def test_fwd(benchmark, impl, shape, fmt):
    if impl.startswith("gankern") and not gankern.backends()["cpp"]["available"]:
        pytest.skip("compiled extension not built")
    x, rm, rv, w, b = _inputs(shape, fmt, False)
    fn = _fn(impl, ("fwd", shape, fmt))
    record(benchmark, op=OP, impl=impl, shape=_label(shape, fmt), dtype=torch.float32, passes="fwd")
    benchmark.extra_info["bytes"] = 3 * x.numel() * 4  # stats read + normalize read + write
    with torch.no_grad():
        fn(x, rm, rv, w, b)  # compile / warm up outside the timing
        benchmark(fn, x, rm, rv, w, b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,fmt", CASES, ids=[_label(*c) for c in CASES])
def test_fwd_bwd(benchmark, impl, shape, fmt):
    if impl.startswith("gankern") and not gankern.backends()["cpp"]["available"]:
        pytest.skip("compiled extension not built")
    x, rm, rv, w, b = _inputs(shape, fmt, True)
    g = torch.randn_like(x)
    fn = _fn(impl, ("fwdbwd", shape, fmt))

    def step():
        y = fn(x, rm, rv, w, b)
        return torch.autograd.grad(y, (x, w, b), g)

    record(benchmark, op=OP, impl=impl, shape=_label(shape, fmt), dtype=torch.float32, passes="fwd+bwd")
    # fwd: 2 reads + 1 write; bwd: (x, dy) read twice + dx written
    benchmark.extra_info["bytes"] = 8 * x.numel() * 4
    step()
    benchmark(step)


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
def test_floor_clone(benchmark, passes):
    """Copy-bandwidth floor at the bandwidth shape: x.clone() (1 read + 1 write)."""
    x = torch.randn(BW_SHAPE)
    record(benchmark, op=OP, impl="floor", shape=_label(BW_SHAPE, "contig"), dtype=torch.float32, passes=passes)
    benchmark.extra_info["bytes"] = 2 * x.numel() * 4
    benchmark(x.clone)


# ----------------------------------------------------------------------------- BatchNorm + LeakyReLU
# The DCGAN discriminator's blocks (Conv -> BatchNorm2d -> LeakyReLU(0.2)) at batch 64, 64x64 images,
# and the MLP generator's Linear -> BatchNorm1d(eps=0.8) -> LeakyReLU(0.2), fwd+bwd in training.
LEAKY_OP = "batch_norm_leaky_relu"
LEAKY_CASES = [((64, 128, 16, 16), "contig"), ((64, 256, 8, 8), "contig"), ((64, 128, 16, 16), "cl"),
               ((64, 256, 8, 8), "cl"), ((64, 512, 4, 4), "contig"), ((64, 256), "contig"), ((64, 1024), "contig")]


def leaky_eager(x, rm, rv, w, b):
    return F.leaky_relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 0.8 if x.dim() == 2 else 1e-5), 0.2)


def leaky_ours(x, rm, rv, w, b):
    return gankern.batch_norm_leaky_relu(x, rm, rv, w, b, True, 0.1, 0.8 if x.dim() == 2 else 1e-5, 0.2,
                                         backend="cpp")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,fmt", LEAKY_CASES, ids=[_label(*c) for c in LEAKY_CASES])
def test_leaky_fwd_bwd(benchmark, impl, shape, fmt):
    if impl.startswith("gankern") and not gankern.backends()["cpp"]["available"]:
        pytest.skip("compiled extension not built")
    x, rm, rv, w, b = _inputs(shape, fmt, True)
    g = torch.randn_like(x)
    if impl == "gankern:cpp":
        fn = leaky_ours
    elif impl == "eager":
        fn = leaky_eager
    else:
        key = ("leaky", shape, fmt)
        if key not in _compiled:
            _compiled[key] = compiled(leaky_eager)
        fn = _compiled[key]

    def step():
        y = fn(x, rm, rv, w, b)
        return torch.autograd.grad(y, (x, w, b), g)

    record(benchmark, op=LEAKY_OP, impl=impl, shape=_label(shape, fmt), dtype=torch.float32, passes="fwd+bwd")
    benchmark.extra_info["bytes"] = 8 * x.numel() * 4
    step()
    benchmark(step)
