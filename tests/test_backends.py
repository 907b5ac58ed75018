"""Backend selection (gankern._backends): the choice is made once per (request, device type), also under torch.compile."""
import pytest
import torch

import gankern
from gankern import _backends


@pytest.fixture
def cold_cache():
    _backends.reset()
    torch._dynamo.reset()
    yield
    _backends.reset()


@pytest.mark.parametrize("op", ["linear_leaky_relu", "bias_leaky_relu", "batch_norm_relu", "bce"])
def test_compile_fullgraph_with_a_cold_backend_cache(cold_cache, op):
    """The first call of a process may happen inside torch.compile (torch 2.11's dynamo refuses to trace the
    package lookups behind the choice; CI failed there): the choice runs in Python at trace time."""
    x = torch.randn(4, 6, requires_grad=True)
    w, b, t = torch.randn(3, 6), torch.randn(3), torch.rand(4, 6)
    calls = {
        "linear_leaky_relu": lambda x: gankern.linear_leaky_relu(x, w, b),
        "bias_leaky_relu": lambda x: gankern.bias_leaky_relu(x, b.new_ones(6)),
        "batch_norm_relu": lambda x: gankern.batch_norm_relu(x, None, None, training=True),
        "bce": lambda x: gankern.bce_with_logits(x, t),
    }
    assert not _backends._resolved
    got = torch.compile(calls[op], fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, calls[op](x))
    assert _backends._resolved  # the choice was made and cached


def test_select_caches_and_reset_forgets(cold_cache, monkeypatch):
    x = torch.zeros(1)
    assert _backends.select("reference", x) == "reference"
    assert _backends._resolved == {("reference", "cpu"): "reference"}
    monkeypatch.setenv("GANKERN_BACKEND", "reference")
    _backends.reset()
    assert not _backends._resolved and _backends.select(None, x) == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        _backends.select("nope", x)


def test_triton_needs_the_extension(cold_cache, monkeypatch):
    """The Triton kernels are the `.triton` overload of the C++ ops: without gankern._C only reference runs."""
    monkeypatch.setattr(_backends, "_ext", None)
    monkeypatch.setattr(_backends, "_ext_tried", True)
    monkeypatch.setattr(_backends, "_ext_error", "the compiled extension gankern._C could not be imported (test)")
    got = gankern.backends()
    assert not got["triton"]["available"] and "C++ ops of gankern._C" in got["triton"]["reason"]
    assert not got["cpp"]["available"] and got["reference"]["available"]
    with pytest.raises(gankern.BackendUnavailableError, match="gankern._C"):
        _backends.select("triton", torch.zeros(1))


@pytest.mark.parametrize("op", ["bce_with_logits", "batch_norm_relu"])
def test_backend_limits_in_one_place(op):
    x64 = torch.zeros(1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=f"{op}: backend 'triton' supports float32, float16 and bfloat16 inputs, "
                                           "got float64"):
        _backends.check_supported("triton", op, x64)
    for backend in ("cpp", "cuda", "reference"):
        _backends.check_supported(backend, op, x64)
    _backends.check_supported("triton", op, x64.float())
