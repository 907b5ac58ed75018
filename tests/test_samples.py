"""Every op on the shared sample inputs (tests/samples.py): against PyTorch in float64 on every device and
backend (forward, every gradient, in-place updated arguments; outputs poisoned first, see conftest),
``torch.library.opcheck`` of the public op, and ``torch.compile(fullgraph=True)`` against eager."""
import pytest
import torch

import gankern
from conftest import device_backends
from samples import ALL, OPS
from tolerances import COMPILED_FP32, COMPILED_GRAD_FP32, assert_close

OP_NAMES = list(OPS)


def _run(spec, sample, dtype, device, fn, g=None, reference=False):
    """(output, gradients of the differentiable leaves, in-place updated arguments, g): ``fn(*args)`` on the
    sample built for (dtype, device) -- in float64 when ``reference`` --; the output's gradient ``g`` is drawn
    when not given (in the output's dtype, so the reference sees the same values)."""
    leaves, args = spec.build(sample, dtype, device, reference)
    y = fn(*args)
    if g is None and y.requires_grad:
        g = torch.randn(y.shape, device=device).to(y.dtype)
    grads = torch.autograd.grad(y, leaves, g.to(y.dtype)) if g is not None and leaves else ()
    return y, grads, spec.outs(sample, args), g


@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("op", OP_NAMES)
def test_vs_float64(op, device, backend, dtype):
    spec = OPS[op]
    info = gankern.backends()[backend]
    if not info["available"]:
        pytest.skip(f"backend {backend} unavailable: {info['reason']}")
    if dtype == torch.float64 and backend in spec.no_fp64:
        pytest.skip(f"{backend} has no float64 {op} (a clear error, tests/test_contract.py)")
    if backend == "reference" and dtype in (torch.float16, torch.bfloat16):
        pytest.skip("reference = torch's own half-precision kernels: their accuracy is torch's, not under test")
    if backend == "triton" and device == "cpu" and dtype != torch.float32:
        pytest.skip("the Triton interpreter: float32 only here (every dtype runs on a device)")
    for sample in spec.samples(device, dtype):
        y, grads, outs, g = _run(spec, sample, dtype, device, lambda *a: spec.fn(*a, backend=backend))
        ye, grads_e, outs_e, _ = _run(spec, sample, dtype, device, spec.ref, g, reference=True)
        where = f"{op} [{sample.name}]"
        assert y.dtype == dtype, where
        assert_close(y, ye, dtype, scale=sample.scale, name=f"{where} output")
        for i, (a, e) in enumerate(zip(outs, outs_e)):
            assert_close(a, e, a.dtype, scale=sample.grad_scale, name=f"{where} updated argument {i}")
        assert len(grads) == len(grads_e), where
        for i, (a, e) in enumerate(zip(grads, grads_e)):
            assert a is not None, f"{where}: gradient {i} is None"
            assert_close(a, e, a.dtype, scale=sample.grad_scale, name=f"{where} gradient {i}")


@pytest.mark.needs_ext
@pytest.mark.parametrize("overload", ["default", "triton"])
@pytest.mark.parametrize("op", OP_NAMES)
def test_opcheck(op, overload):
    """torch.library.opcheck (schema, fake kernel, autograd registration, AOT dispatch) on every sample."""
    spec = OPS[op]
    samples = spec.samples("cpu", torch.float32)
    if overload == "triton":
        samples = samples[:3]  # the interpreter: a few shapes (all of them run through the default overload)
    packet = getattr(getattr(torch.ops.gankern, op), overload)
    for sample in (s for s in samples if not s.nan_output):
        _, args = spec.build(sample, torch.float32, "cpu")
        torch.library.opcheck(packet, spec.schema_args(*args))


@pytest.mark.needs_ext
@pytest.mark.parametrize("op", OP_NAMES)
def test_compile_fullgraph_matches_eager(op):
    spec = OPS[op]
    for sample in spec.samples("cpu", torch.float32):
        torch._dynamo.reset()  # one graph per sample (their shapes, layouts and constants differ)
        compiled = torch.compile(lambda *a: spec.fn(*a, backend="cpp"), fullgraph=True, backend="aot_eager")
        y, grads, outs, g = _run(spec, sample, torch.float32, "cpu", lambda *a: spec.fn(*a, backend="cpp"))
        yc, grads_c, outs_c, _ = _run(spec, sample, torch.float32, "cpu", compiled, g)
        torch.testing.assert_close(yc, y, equal_nan=True, **COMPILED_FP32, msg=lambda m: f"{sample.name}: {m}")
        for a, e in zip(outs_c, outs):
            torch.testing.assert_close(a, e, **COMPILED_FP32)
        for a, e in zip(grads_c, grads):
            torch.testing.assert_close(a, e, equal_nan=True, **COMPILED_GRAD_FP32)
