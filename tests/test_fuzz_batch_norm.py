"""Property-based fuzz of BatchNorm + ReLU / LeakyReLU (one op) against PyTorch in float64.

Random shapes (0, 1 and primes in every dimension), dtypes (fp32 / fp16 / bf16 / fp64), layouts and
strides of the input (contiguous, channels-last, sliced with a step, transposed, expanded) and of the
parameters (sliced, offset, expanded), train / eval, momentum float or None (the modules' cumulative
average), affine or not, running stats or not, slopes 0 / 0.2 / 1 / 3, on every backend that runs
here (cpp, triton through its interpreter, reference): the output, every gradient (input, weight,
bias) and the running stats, with the tolerances of tests/tolerances.py.

Fixed seed (``derandomize=True``) and a bounded number of examples, so CI takes about a minute;
``GANKERN_FUZZ_EXAMPLES=N`` runs N examples per test instead.  Degenerate inputs, where a crash is
possible (no channels, an empty batch, one value per channel), run in a child pytest process: a
crash there (SIGFPE, SIGSEGV) fails ``test_fuzz_degenerate``, it does not end the test run.
"""
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gankern
import gankern.nn as gnn
from conftest import CPU_BACKENDS
from tolerances import assert_close, sqrt_scale

N_EXAMPLES = int(os.environ.get("GANKERN_FUZZ_EXAMPLES", "0"))
CHILD = os.environ.get("GANKERN_FUZZ_CHILD") == "1"


def _settings(default):
    return settings(max_examples=N_EXAMPLES or default, derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


SIZES = [1, 2, 3, 5, 7, 13]
CHANNELS = [1, 2, 3, 5, 7, 17]
SLOPES = [0.0, 0.2, 1.0, 3.0]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@st.composite
def examples(draw, degenerate=False):
    backend = draw(st.sampled_from(CPU_BACKENDS))
    nd = draw(st.sampled_from([2, 3, 4]))
    if degenerate:  # no channels, an empty batch / spatial dim, or one value per channel
        kind = draw(st.sampled_from(["c0", "empty", "one"]))
        C = 0 if kind == "c0" else draw(st.sampled_from(CHANNELS))
        if kind == "one":
            shape = (1, C) + (1,) * (nd - 2)
        else:
            shape = [draw(st.sampled_from([0] + SIZES)), C] + [draw(st.sampled_from([0, 1, 2, 3])) for _ in range(nd - 2)]
            if kind == "empty" and all(s != 0 for i, s in enumerate(shape) if i != 1):
                shape[draw(st.sampled_from([0] + list(range(2, nd))))] = 0
            shape = tuple(shape)
    else:
        shape = (draw(st.sampled_from(SIZES)), draw(st.sampled_from(CHANNELS))) + \
            tuple(draw(st.sampled_from(SIZES[:4] if nd == 4 else SIZES)) for _ in range(nd - 2))
    dtype = draw(st.sampled_from(DTYPES if backend != "triton" else DTYPES[:3]))
    layouts = ["contig", "step", "transposed", "expanded"] + (["cl", "cl_step"] if nd == 4 else [])
    layout = draw(st.sampled_from(layouts))
    training = draw(st.booleans())
    momentum = draw(st.sampled_from([0.1, 0.0, 1.0, 0.37, None]))
    affine = draw(st.booleans())
    running = draw(st.booleans()) or not training
    slope = draw(st.sampled_from(SLOPES))
    reduced = dtype in (torch.float16, torch.bfloat16)
    pdtype = draw(st.sampled_from([torch.float32, dtype])) if reduced else dtype
    playout = draw(st.sampled_from(["contig", "step", "offset", "expanded"]))
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.8]))
    offset = draw(st.sampled_from([0.0, 3.0, -50.0]))
    return dict(backend=backend, shape=shape, dtype=dtype, layout=layout, training=training, momentum=momentum,
                affine=affine, running=running, slope=slope, pdtype=pdtype, playout=playout, eps=eps, offset=offset)


def make_input(shape, dtype, layout, offset):
    def rnd(s):
        return (torch.randn(s, dtype=torch.float64) * 2 + offset).to(dtype)
    nd = len(shape)
    if layout == "step":
        big = list(shape)
        big[-1] = 2 * big[-1]
        return rnd(big)[..., ::2]
    if layout == "transposed":
        if nd == 2:
            return rnd(shape[::-1]).t()
        s = list(shape)
        s[-1], s[-2] = s[-2], s[-1]
        return rnd(s).transpose(-1, -2)
    if layout == "expanded":
        return rnd((1,) + tuple(shape[1:])).expand(shape)
    if layout == "cl":
        return rnd(shape).to(memory_format=torch.channels_last)
    if layout == "cl_step":
        big = list(shape)
        big[2] = 2 * big[2]
        return rnd(big).to(memory_format=torch.channels_last)[:, :, ::2]
    return rnd(shape)


def make_param(C, dtype, layout, lo, spread):
    def rnd(n):
        return (torch.rand(n, dtype=torch.float64) * spread + lo).to(dtype)
    if layout == "step":
        return rnd(2 * C)[::2]
    if layout == "offset":
        return rnd(C + 3)[3:]
    if layout == "expanded":
        return rnd(1).expand(C)
    return rnd(C)


def act(y, slope):
    return F.relu(y) if slope == 0 else F.leaky_relu(y, slope)


def expected(x, rm, rv, w, b, training, momentum, eps, slope):
    """float64 torch; for C == 0 the empty result (torch itself raises IndexError there with weights)."""
    if x.shape[1] == 0:
        out = F.batch_norm(x, rm, rv, None, None, training, momentum, eps)
        for p in (w, b):
            if p is not None:
                out = out + p.sum()
        return act(out, slope)
    return act(F.batch_norm(x, rm, rv, w, b, training, momentum, eps), slope)


def check(ex):
    backend, shape, dtype, training, slope = ex["backend"], ex["shape"], ex["dtype"], ex["training"], ex["slope"]
    C = shape[1]
    x = make_input(shape, dtype, ex["layout"], ex["offset"])
    assert tuple(x.shape) == tuple(shape)
    pdt = ex["pdtype"]
    w = make_param(C, pdt, ex["playout"], 0.5, 1.0) if ex["affine"] else None
    b = make_param(C, pdt, ex["playout"], -0.5, 1.0) if ex["affine"] else None
    if ex["running"]:
        rm = make_param(C, pdt, "step" if ex["playout"] == "step" else "contig", -1.0, 2.0)
        rv = make_param(C, pdt, "contig", 0.5, 1.0)
    else:
        rm = rv = None
    momentum = ex["momentum"]
    per_channel = math.prod(shape) // C if C else shape[0] * math.prod(shape[2:])
    if momentum is None:
        return check_module(ex, x, w, b, rm, rv)
    eps = ex["eps"]
    fn = (lambda *a: gankern.batch_norm_relu(*a, backend=backend)) if slope == 0 else \
        (lambda *a: gankern.batch_norm_leaky_relu(*a, negative_slope=slope, backend=backend))
    if training and per_channel == 1:
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            fn(x, rm, rv, w, b, training, momentum, eps)
        return

    # ours: the tensors as they are (strides kept), fresh copies of the running stats
    xi = x.detach().requires_grad_()
    wi = None if w is None else w.detach().requires_grad_()
    bi = None if b is None else b.detach().requires_grad_()
    rmi = None if rm is None else rm.clone()
    rvi = None if rv is None else rv.clone()
    y = fn(xi, rmi, rvi, wi, bi, training, momentum, eps)

    d = dict(dtype=torch.float64)
    x64 = x.detach().to(**d).requires_grad_()
    w64 = None if w is None else w.detach().to(**d).requires_grad_()
    b64 = None if b is None else b.detach().to(**d).requires_grad_()
    rm64 = None if rm is None else rm.to(**d)
    rv64 = None if rv is None else rv.to(**d)
    ye = expected(x64, rm64, rv64, w64, b64, training, momentum, eps, slope)
    # upstream gradient, zero where the float64 pre-activation is within 1e-4 of the kink (relu' ambiguous)
    pre = F.batch_norm(x64.detach(), None if rm64 is None else rm64.clone(), None if rv64 is None else rv64.clone(),
                       None if w64 is None else w64.detach(), None if b64 is None else b64.detach(), training,
                       momentum, eps) if C else x64.detach()
    grad = torch.randn(shape, dtype=torch.float64).masked_fill(pre.abs() < 1e-4, 0)

    assert_close(y, ye, dtype, name="output")
    if rm is not None:
        assert_close(rmi, rm64, rmi.dtype, scale=2, name="running_mean")
        assert_close(rvi, rv64, rvi.dtype, scale=2, name="running_var")
    leaves = [t for t in (xi, wi, bi) if t is not None]
    leaves64 = [t for t in (x64, w64, b64) if t is not None]
    gs = torch.autograd.grad(y, leaves, grad.to(y.dtype))
    ges = torch.autograd.grad(ye, leaves64, grad)
    assert_close(gs[0], ges[0], dtype, scale=4 * max(1.0, abs(slope)), name="grad_input")
    M = max(1, per_channel)
    for name, a, e in zip(("grad_weight", "grad_bias"), gs[1:], ges[1:]):
        if dtype in (torch.float32, torch.float64):
            sc = sqrt_scale(M) * 4 * max(1.0, abs(slope))
            tdt = dtype
        else:  # sums over M rounded inputs: scale by their magnitude
            sc = max(1.0, ges[1].abs().max().item() if ges[1].numel() else 1.0,
                     ges[2].abs().max().item() if ges[2].numel() else 1.0) * max(1.0, abs(slope))
            tdt = dtype
        assert_close(a.double(), e, tdt, scale=sc, name=name)


def check_module(ex, x, w, b, rm, rv):
    """momentum=None: the modules (cumulative moving average), against nn.BatchNorm*d -> activation."""
    backend, shape, slope = ex["backend"], ex["shape"], ex["slope"]
    if ex["dtype"] not in (torch.float32, torch.float64) or ex["pdtype"] != ex["dtype"]:
        return
    C = shape[1]
    nd = len(shape)
    if nd == 4:
        cls, tcls = gnn.BatchNormLeakyReLU2d, torch.nn.BatchNorm2d
    else:
        cls, tcls = gnn.BatchNormLeakyReLU1d, torch.nn.BatchNorm1d
    dt = ex["dtype"]
    m = cls(C, ex["eps"], None, ex["affine"], ex["running"], slope, dtype=dt, backend=backend)
    t = tcls(C, ex["eps"], None, ex["affine"], ex["running"], dtype=torch.float64)
    if ex["affine"]:
        with torch.no_grad():
            m.weight.copy_(w)
            m.bias.copy_(b)
    t.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in m.state_dict().items()})
    m.train(ex["training"])
    t.train(ex["training"])
    per_channel = math.prod(shape) // C
    for step in range(2):
        xi = x.detach().requires_grad_()
        if ex["training"] and per_channel == 1:
            with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
                m(xi)
            return
        y = m(xi)
        x64 = x.detach().double().requires_grad_()
        ye = act(t(x64), slope)
        assert_close(y, ye, dt, name=f"module output (step {step})")
        g = torch.randn(shape, dtype=torch.float64)
        gy = torch.autograd.grad(y, xi, g.to(dt))[0]
        ge = torch.autograd.grad(ye, x64, g)[0]
        if ex["training"]:  # kinks: compare only away from them
            keep = (ye.detach().abs() > 1e-4).double()
            gy, ge = gy * keep, ge * keep
        if not ex["training"] or slope in (1.0,):
            assert_close(gy, ge, dt, scale=4 * max(1.0, slope), name="module grad_input")
        if ex["running"]:
            assert_close(m.running_mean, t.running_mean, dt, scale=2, name="module running_mean")
            assert_close(m.running_var, t.running_var, dt, scale=2, name="module running_var")
            assert int(m.num_batches_tracked) == int(t.num_batches_tracked)


@pytest.mark.skipif(not CPU_BACKENDS, reason="no backend")
@_settings(30)
@given(ex=examples())
def test_fuzz_batch_norm(ex):
    if ex["dtype"] == torch.float64 and ex["backend"] == "triton":
        return
    check(ex)


@pytest.mark.skipif(not CHILD, reason="runs in the child process of test_fuzz_degenerate")
@_settings(20)
@given(ex=examples(degenerate=True))
def test_fuzz_degenerate_child(ex):
    check(ex)


def test_fuzz_degenerate():
    """No channels / empty batch / one value per channel, every backend, in a child process (a crash fails
    this test instead of ending the run)."""
    env = dict(os.environ, GANKERN_FUZZ_CHILD="1")
    no_xdist = ["-n", "0"] if importlib.util.find_spec("xdist") is not None else []  # pytest-xdist is optional
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *no_xdist,
                        __file__ + "::test_fuzz_degenerate_child"], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(__file__), timeout=1200)
    tail = (p.stdout + p.stderr)[-4000:]
    assert p.returncode == 0, f"child exited with {p.returncode} (negative = killed by a signal):\n{tail}"
    assert "1 passed" in p.stdout, tail
