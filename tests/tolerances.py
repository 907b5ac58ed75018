"""The one place where test tolerances live.

Every numerical test computes the expected value with PyTorch in float64 from the same
inputs, then compares the backend's result (upcast to float64) with ``assert_close``
below.  Tolerances depend only on the dtype the op computed in (and, for reductions /
GEMMs, a ``scale`` argument the test passes when the error grows with a length).
"""
import math

import torch

TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


# Named pairs (``torch.testing.assert_close(a, b, **PAIR)`` / ``torch.allclose``) for the comparisons that are
# not "one result vs float64"; each holds the values its tests have always used.
# A fused model vs the plain torch model after the same optimizer step from the same start (both float32):
STEP_FP32 = dict(rtol=1e-4, atol=1e-5)
# torch.compile vs eager in float32: outputs, and parameter gradients (inductor may reorder reductions)
COMPILED_FP32 = dict(rtol=1e-4, atol=1e-5)
COMPILED_GRAD_FP32 = dict(rtol=1e-3, atol=1e-5)
# a float32 BatchNorm+ReLU computed in a forked child vs float64 (torch.allclose: the child exits with the answer)
FORK_CHILD_FP32 = dict(rtol=1e-5, atol=1e-4)
# CUDA variants of float32 model tests: TF32 may be on for the GEMMs, so their scale is this many times the CPU one
CUDA_TF32_WIDEN = 16


def tol(dtype, scale=1.0):
    """Tolerances for ``dtype``; ``scale`` widens them for long reductions (e.g. sqrt(K))."""
    t = TOL[dtype]
    return dict(atol=t["atol"] * scale, rtol=t["rtol"] * scale)


def assert_close(actual, expected64, dtype=None, scale=1.0, name="output"):
    """Compare against a float64 expectation.  NaN/Inf must match exactly in position."""
    dtype = dtype or actual.dtype
    assert actual.shape == expected64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    torch.testing.assert_close(actual.detach().double(), expected64.detach().double(), equal_nan=True,
                               msg=lambda m: f"{name} ({dtype}): {m}", **tol(dtype, scale))


def assert_close_magnitude(actual, expected64, dtype=None, name="output"):
    """``assert_close`` for data of any magnitude (1e-30, 1e30): the absolute tolerance is relative to the
    largest expected value, so an answer that is off by 100% at 1e-30 fails (a plain atol would pass it)."""
    dtype = dtype or actual.dtype
    big = expected64.detach().double().abs().max().item()
    t = TOL[dtype]
    torch.testing.assert_close(actual.detach().double(), expected64.detach().double(), equal_nan=True,
                               atol=t["atol"] * big, rtol=t["rtol"], msg=lambda m: f"{name} ({dtype}): {m}")


def sqrt_scale(n):
    return max(1.0, math.sqrt(n) / 4)


def assert_same(a, b, where=""):
    """Bit-exact equality of nested state (tensors: same dtype and bits; dicts, lists, plain values): resume tests."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where
