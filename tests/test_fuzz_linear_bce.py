"""Property-based fuzz of linear_leaky_relu and bce_with_logits on every backend that runs here, against
torch in float64: random shapes (0, 1, primes), dtypes, layouts (sliced, expanded, transposed, offset),
slopes, reductions, float / tensor targets, broadcast weights, NaN/Inf; forward and every gradient.

The examples run in a child pytest process (tests with `inner` in their name, only when
GANKERN_FUZZ_CHILD=1): a crash there is a failed test here.  Fixed seed, bounded examples;
GANKERN_FUZZ_EXAMPLES=N for more."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import gankern
from conftest import CPU_BACKENDS
from fuzz_util import dims, dtypes, fuzz_settings, layouts, make_tensor, run_child_pytest
from tolerances import TOL, assert_close, sqrt_scale

CHILD = os.environ.get("GANKERN_FUZZ_CHILD") == "1"
child_only = pytest.mark.skipif(not CHILD, reason="runs in the child process of test_fuzz_isolated")
HALF = (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("op", ["llr", "bce"])
def test_fuzz_isolated(op):
    rc, out = run_child_pytest(__file__, f"inner and {op}")
    assert rc == 0, f"fuzz child exited with {rc} (negative = killed by that signal):\n{out}"


# ------------------------------------------------------------------ Linear + LeakyReLU
@st.composite
def llr_cases(draw):
    be = draw(st.sampled_from(CPU_BACKENDS))
    big = be == "cpp" and draw(st.booleans()) and draw(st.booleans())  # above the oneDNN threshold (2^25 MACs)
    if big:
        batch, K, N, dt = [draw(st.sampled_from([257, 300]))], draw(st.sampled_from([384, 509])), \
            draw(st.sampled_from([256, 263])), torch.float32
    else:
        batch = draw(st.lists(dims, min_size=1, max_size=2))
        K, N, dt = draw(dims), draw(dims), draw(dtypes)
    return dict(be=be, batch=batch, K=K, N=N, dtype=dt, xl=draw(layouts), wl=draw(layouts),
                bl=draw(st.sampled_from(["none", "contiguous", "sliced", "expanded", "offset"])),
                gl=draw(layouts), slope=draw(st.sampled_from([0.0, 0.2, 1.0, -0.3])),
                engine=draw(st.sampled_from(["onednn", "mkl"])), nan=draw(st.booleans()) and dt in (torch.float32, torch.float64),
                double=draw(st.booleans()) and dt == torch.float64, seed=draw(st.integers(0, 2**31 - 1)))


def check_llr(c):
    gen = torch.Generator().manual_seed(c["seed"])
    dt, K, N, slope = c["dtype"], c["K"], c["N"], c["slope"]
    x = make_tensor((*c["batch"], K), dt, c["xl"], gen)
    w = make_tensor((N, K), dt, c["wl"], gen, 1 / math.sqrt(max(K, 1)))
    b = None if c["bl"] == "none" else make_tensor((N,), dt, c["bl"], gen)
    if c["nan"] and x.numel():
        x = x.clone()
        x[(0,) * x.dim()] = float("nan")
        x[tuple(d - 1 for d in x.shape)] = float("inf")
    os.environ["GANKERN_LLR_GEMM"] = c["engine"]
    leaves = [t.detach().requires_grad_() for t in (x, w, b) if t is not None]
    xx, ww, bb = (leaves + [None])[:3]
    y = gankern.linear_leaky_relu(xx, ww, bb, slope, backend=c["be"])
    assert y.dtype == dt and y.shape == (*c["batch"], N)
    x64, w64 = x.double(), w.double()
    b64 = b.double() if b is not None else None
    z64 = F.linear(x64, w64, b64)
    assert_close(y, F.leaky_relu(z64, slope), dt, scale=sqrt_scale(K), name="output")
    g = make_tensor(y.shape, dt, c["gl"], gen)
    grads = torch.autograd.grad(y, leaves, g, allow_unused=False)
    # expected gradients in float64; where |z| is within rounding of 0 (the kink) either branch is right:
    # take the mask the backend used (sign of its output, or of its z for negative slopes)
    eps = 1.2e-7 if dt != torch.float64 else 2.3e-16
    bound = 4 * max(K, 1) * eps * (x64.abs().nan_to_num(0) @ w64.abs().t() + (b64.abs() if b is not None else 0))
    m = z64 > 0
    amb = z64.abs() <= bound
    if amb.any():
        zs = y if slope >= 0 else gankern.linear_leaky_relu(x, w, b, 1.0, backend=c["be"])
        m = torch.where(amb, zs.detach() > 0, m)
    M = max(1, math.prod(c["batch"]))
    Mr = math.prod(c["batch"])
    dz = torch.where(m, g.double(), g.double() * slope).reshape(Mr, N)
    exp = [(dz @ w64).reshape(x.shape), dz.t() @ x64.reshape(Mr, K)] + ([dz.sum(0)] if b is not None else [])
    k = 2 if dt in HALF else 1
    for got, e, name, sc in zip(grads, exp, ["grad_input", "grad_weight", "grad_bias"],
                                [sqrt_scale(N), sqrt_scale(M), sqrt_scale(M)]):
        assert got.dtype == dt
        assert_close(got, e, dt, scale=sc * k, name=name)
    if c["double"]:  # penalty on the input gradient, then backward: gradients defined where torch's are
        outs = []
        for be in (c["be"], "torch"):
            ls = [t.detach().requires_grad_() for t in (x, w, b) if t is not None]
            lx, lw, lb = (ls + [None])[:3]
            if be == "torch":
                z = F.linear(lx, lw, lb)
                yy = z if slope == 1.0 else F.leaky_relu(z, slope)
            else:
                yy = gankern.linear_leaky_relu(lx, lw, lb, slope, backend=be)
            (gx,) = torch.autograd.grad((yy * g.double()).sum(), lx, create_graph=True)
            gx.square().sum().backward()
            outs.append([t.grad for t in ls])
        for a, e, name in zip(*outs, ["x", "weight", "bias"]):
            assert (a is None) == (e is None), f"penalty grad of {name}: {a is None=} vs torch {e is None=}"
            if a is not None:
                assert_close(a, e, torch.float64, scale=sqrt_scale(M * N), name=f"penalty grad_{name}")


@child_only
@fuzz_settings(150)
@given(llr_cases())
def test_inner_llr(case):
    try:
        check_llr(case)
    finally:
        os.environ.pop("GANKERN_LLR_GEMM", None)


# ------------------------------------------------------------------ BCE with logits
@st.composite
def bce_cases(draw):
    be = draw(st.sampled_from(CPU_BACKENDS))
    shape = draw(st.lists(dims, min_size=0, max_size=3))
    dt = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16] + ([torch.float64] if be != "triton" else [])))

    def wshape():
        kind = draw(st.sampled_from(["none", "full", "suffix", "ones", "scalar"]))
        if kind == "none":
            return None
        if kind == "full":
            return list(shape)
        if kind == "scalar":
            return []
        s = list(shape[draw(st.integers(0, len(shape))):])
        return [1 if draw(st.booleans()) else d for d in s] if kind == "ones" else s
    return dict(be=be, shape=shape, dtype=dt, xl=draw(layouts), tl=draw(layouts),
                target=draw(st.sampled_from(["tensor", 0.0, 1.0, 0.9])), w=wshape(), pw=wshape(),
                wdt=draw(st.sampled_from([torch.float32, torch.float64, dt])), wl=draw(layouts),
                reduction=draw(st.sampled_from(["none", "mean", "sum"])),
                nan=draw(st.booleans()) and dt != torch.bfloat16, seed=draw(st.integers(0, 2**31 - 1)))


def check_bce(c):
    gen = torch.Generator().manual_seed(c["seed"])
    dt, shape = c["dtype"], c["shape"]
    x = make_tensor(shape, dt, c["xl"], gen, 3.0)
    if c["nan"] and x.numel() >= 2:
        x = x.clone()
        x[(0,) * x.dim()] = float("nan")
        x[tuple(d - 1 for d in x.shape)] = float("-inf")
    if c["target"] == "tensor":
        t = make_tensor(shape, torch.float32, c["tl"], gen).sigmoid().to(dt)
    else:
        t = c["target"]
    w = None if c["w"] is None else (make_tensor(c["w"], c["wdt"], c["wl"], gen).abs() + 0.5)
    pw = None if c["pw"] is None else (make_tensor(c["pw"], c["wdt"], c["wl"], gen).abs() * 2)
    xx = x.detach().requires_grad_()
    tt = t.detach().requires_grad_() if isinstance(t, torch.Tensor) else t
    out = gankern.bce_with_logits(xx, tt, w, c["reduction"], pw, backend=c["be"])
    assert out.dtype == dt
    x64 = x.detach().double().requires_grad_()
    t64 = tt.detach().double().requires_grad_() if isinstance(t, torch.Tensor) else torch.full_like(x64, t)
    e = F.binary_cross_entropy_with_logits(x64, t64, weight=None if w is None else w.double(),
                                           pos_weight=None if pw is None else pw.double(), reduction=c["reduction"])
    go = make_tensor(out.shape, dt, c["tl"], gen)
    ins = (xx, tt) if isinstance(t, torch.Tensor) else (xx,)
    grads = torch.autograd.grad(out, ins, go)
    eg = torch.autograd.grad(e, (x64, t64) if isinstance(t, torch.Tensor) else (x64,), go.double())
    e = torch.where(e.to(dt).isinf(), e.to(dt).double(), e.detach())  # fp16 sums overflow as in torch
    n = max(x.numel(), 1)
    k = (6.0 if c["be"] == "reference" and dt != torch.float32 and dt != torch.float64 else 1.0) * 3 * \
        (1.0 if w is None else 2.0) * (1.0 if pw is None else 3.0)
    assert_close(out, e, dt, scale=k * (sqrt_scale(n) if c["reduction"] != "none" else 1.0), name="loss")
    for got, ex, name in zip(grads, eg, ["grad_input", "grad_target"]):
        assert got.dtype == dt
        assert_close(got, ex, dt, scale=k, name=name)


@child_only
@fuzz_settings(200)
@given(bce_cases())
def test_inner_bce(case):
    check_bce(case)
