"""gankern.linear_leaky_relu on every backend available here, against PyTorch in float64."""
import math

import pytest
import torch
import torch.nn.functional as F

import gankern
from conftest import CPU_BACKENDS
from tolerances import assert_close, sqrt_scale

OP = torch.ops.gankern.linear_leaky_relu.default if gankern.backends()["cpp"]["available"] else None
needs_triton = pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton interpreter unavailable")


def make(in_shape, N, dtype, bias=True, noncontig=False, device="cpu"):
    """Random input (*, K), weight (N, K) ~ nn.Linear scale, bias (N,) — optionally non-contiguous views."""
    K = in_shape[-1]
    if noncontig:
        x = torch.randn(*in_shape[:-1], 2 * K, device=device).to(dtype)[..., ::2]          # strided last dim
        w = (torch.randn(K, N, device=device) / math.sqrt(max(K, 1))).to(dtype).t()      # transposed weight
    else:
        x = torch.randn(*in_shape, device=device)
        w = torch.randn(N, K, device=device) / math.sqrt(max(K, 1))
    b = torch.randn(N, device=device) if bias else None
    x, w = x.to(dtype), w.to(dtype)
    b = b.to(dtype) if b is not None else None
    if noncontig and K > 1 and N > 1:
        assert not x.is_contiguous() and not w.is_contiguous()
    return x, w, b


def check(backend, in_shape, N, dtype, slope, bias=True, noncontig=False, device="cpu"):
    x, w, b = make(in_shape, N, dtype, bias, noncontig, device)
    K = in_shape[-1]
    M = max(1, math.prod(in_shape[:-1]))
    leaves = [t.detach().requires_grad_() for t in (x, w, b) if t is not None]
    refs = [t.detach().double().requires_grad_() for t in leaves]
    xx, ww, bb = (leaves + [None])[:3]
    y = gankern.linear_leaky_relu(xx, ww, bb, slope, backend=backend)
    assert y.dtype == dtype and y.shape == (*in_shape[:-1], N)
    yr = F.leaky_relu(F.linear(refs[0], refs[1], refs[2] if bias else None), slope)
    assert_close(y, yr, dtype, scale=sqrt_scale(K), name="output")
    g = torch.randn(y.shape, device=device, dtype=dtype)
    grads = torch.autograd.grad(y, leaves, g)
    grads_r = torch.autograd.grad(yr, refs, g.double())
    names = ["grad_input", "grad_weight", "grad_bias"]
    scales = [sqrt_scale(N), sqrt_scale(M), sqrt_scale(M)]
    for got, exp, name, sc in zip(grads, grads_r, names, scales):
        assert got.dtype == dtype
        assert_close(got, exp, dtype, scale=sc * (2 if dtype != torch.float32 else 1), name=name)


# (input shape, out_features): sizes that are not multiples of any tile, 2-D and 3-D
CPP_CASES = [
    ((1, 1), 1, torch.float32, 0.2, True, False),
    ((7, 127), 1000, torch.float32, 0.01, True, False),
    ((127, 784), 7, torch.float32, 0.0, False, False),
    ((1000, 7), 127, torch.float32, 1.0, True, True),
    ((64, 784), 512, torch.float32, 0.2, True, True),
    ((3, 5, 127), 7, torch.float32, 0.2, True, False),
    ((2, 3, 4, 33), 65, torch.float32, -0.3, True, True),
    ((127, 1000), 784, torch.float32, -1.5, False, False),
    ((127, 784), 1000, torch.float16, 0.2, True, False),
    ((7, 1000), 127, torch.float16, 0.01, False, True),
    ((5, 7, 127), 1, torch.float16, -0.3, True, False),
    ((1000, 127), 7, torch.bfloat16, 0.2, True, True),
    ((1, 784), 127, torch.bfloat16, 0.0, True, False),
    ((7, 7), 784, torch.bfloat16, 1.0, False, False),
    ((31, 17), 9, torch.float64, 0.2, True, True),
    # above the oneDNN threshold (csrc/cpu/linear_leaky_relu.cpp: kOneDnnMinMacs = 2**25 multiply-adds)
    ((2, 64, 512), 600, torch.float32, 0.0, True, False),
    ((128, 512), 513, torch.float32, 0.01, False, True),
    # below it: MKL, the backward's dX and dW GEMMs at the same time (concurrent_bwd_gemms)
    ((2, 64, 300), 600, torch.float32, 0.0, True, False),
    ((128, 256), 257, torch.float32, 0.01, False, True),
]


@pytest.mark.needs_ext
@pytest.mark.parametrize("in_shape,N,dtype,slope,bias,noncontig", CPP_CASES,
                         ids=[f"{s}x{n}-{str(d)[6:]}-s{sl}-b{int(b)}-nc{int(nc)}" for s, n, d, sl, b, nc in CPP_CASES])
def test_cpp_matches_torch_fp64(in_shape, N, dtype, slope, bias, noncontig):
    check("cpp", in_shape, N, dtype, slope, bias, noncontig)


# The Triton interpreter is slow: small shapes (<= 130), still not multiples of the tiles.
TRITON_CASES = [
    ((1, 1), 1, torch.float32, 0.2, True, False),
    ((7, 33), 65, torch.float32, 0.0, True, True),
    ((130, 17), 3, torch.float32, 1.0, False, False),
    ((2, 5, 100), 33, torch.float32, 0.01, True, False),
    ((9, 40), 70, torch.float32, -0.3, True, False),
    ((65, 127), 7, torch.float16, 0.2, True, True),
    ((3, 64), 130, torch.float16, 0.01, False, False),
    ((65, 127), 7, torch.bfloat16, 0.2, True, False),
    ((3, 2, 64), 31, torch.bfloat16, 0.0, True, True),
    ((13, 21), 11, torch.float64, 0.2, True, False),
]


@needs_triton
@pytest.mark.parametrize("in_shape,N,dtype,slope,bias,noncontig", TRITON_CASES,
                         ids=[f"{s}x{n}-{str(d)[6:]}-s{sl}-b{int(b)}-nc{int(nc)}" for s, n, d, sl, b, nc in TRITON_CASES])
def test_triton_matches_torch_fp64(in_shape, N, dtype, slope, bias, noncontig):
    check("triton", in_shape, N, dtype, slope, bias, noncontig)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("slope", [0.2, -0.5])
def test_gradcheck_gradgradcheck_fp64(backend, slope):
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    # keep pre-activations away from 0 (the kink) so finite differences are valid
    with torch.no_grad():
        z = F.linear(x, w, b)
        b += torch.where(z.abs().min(dim=0).values.min(0).values < 0.1, 0.5, 0.0)
    f = lambda x, w, b: gankern.linear_leaky_relu(x, w, b, slope, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_penalty_double_backward(backend):
    """WGAN-GP style: gradient of the output wrt the input, then backward through it."""
    x = torch.randn(16, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    outs = []
    for be in (backend, "reference"):
        y = gankern.linear_leaky_relu(x, w, b, 0.2, backend=be)
        (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        pen = ((gx.norm(dim=1) - 1) ** 2).mean()
        outs.append(torch.autograd.grad(pen, (w, b), allow_unused=True))
    assert outs[0][1] is None or outs[1][1] is None or torch.allclose(outs[0][1], outs[1][1])
    assert_close(outs[0][0], outs[1][0], torch.float64, name="penalty grad_weight")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("slope", [0.0, 0.2])
def test_kink_and_nan_follow_torch(backend, slope):
    """z == 0 exactly (integer data) takes the slope branch as in torch; NaN propagates as in torch."""
    x = torch.randint(-2, 3, (9, 4)).float()
    w = torch.randint(-2, 3, (6, 4)).float()
    x[3, 1] = float("nan")
    xs = [x.clone().requires_grad_(), x.double().requires_grad_()]
    ws = [w.clone().requires_grad_(), w.double().requires_grad_()]
    y = gankern.linear_leaky_relu(xs[0], ws[0], None, slope, backend=backend)
    yr = F.leaky_relu(F.linear(xs[1], ws[1]), slope)
    assert (yr == 0).any()
    assert_close(y, yr, name="output")
    g = torch.randn(y.shape)
    for got, exp, name in zip(torch.autograd.grad(y, [xs[0], ws[0]], g),
                              torch.autograd.grad(yr, [xs[1], ws[1]], g.double()), ["grad_input", "grad_weight"]):
        assert_close(got, exp, torch.float32, name=name)


@pytest.mark.needs_ext
@pytest.mark.parametrize("engine,K,N", [("onednn", 512, 600), ("mkl", 512, 600),  # oneDNN-sized, also forced onto MKL
                                        ("onednn", 256, 300)])  # below the threshold: MKL, concurrent dX / dW
@pytest.mark.parametrize("slope", [0.0, 0.2])
def test_large_nan_inf_follow_torch(monkeypatch, engine, K, N, slope):
    """NaN/Inf as in torch on each GEMM path of the cpp backend."""
    monkeypatch.setenv("GANKERN_LLR_GEMM", engine)
    x, w, b = make((128, K), N, torch.float32)
    x[5, 7] = float("nan")
    x[9, 3] = float("inf")
    x[11, 0] = -float("inf")
    xs = [x.clone().requires_grad_(), x.double().requires_grad_()]
    ws = [w.clone().requires_grad_(), w.double().requires_grad_()]
    y = gankern.linear_leaky_relu(xs[0], ws[0], b, slope, backend="cpp")
    yr = F.leaky_relu(F.linear(xs[1], ws[1], b.double()), slope)
    assert yr.isnan().any() and yr.isinf().any()
    assert_close(y, yr, scale=sqrt_scale(K), name="output")
    g = torch.randn(y.shape)
    g[0, 0] = float("nan")
    (gx, gw), (gxr, gwr) = torch.autograd.grad(y, xs[0:1] + ws[0:1], g), torch.autograd.grad(yr, xs[1:] + ws[1:], g.double())
    assert_close(gx, gxr, torch.float32, scale=sqrt_scale(N), name="grad_input")
    assert gw.isnan().any() and torch.equal(gw.isnan(), gwr.isnan())
    fin = gwr.isfinite()
    assert_close(gw[fin], gwr[fin], torch.float32, scale=sqrt_scale(128), name="grad_weight")


@pytest.mark.needs_ext
@pytest.mark.parametrize("concurrent", ["1", "0"])
def test_backward_gemms_concurrent_or_not(monkeypatch, concurrent):
    """The two backward GEMMs, at the same time on two threads or one after the other: both match fp64."""
    monkeypatch.setenv("GANKERN_LLR_BWD_CONCURRENT", concurrent)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check("cpp", (127, 300), 257, torch.float32, 0.2, True, True)
        check("cpp", (3, 7, 129), 65, torch.float64, 0.01, True, False)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("in_shape,N", [((0, 5), 3), ((4, 0), 3), ((4, 5), 0), ((2, 0, 5), 3)])
def test_empty(backend, in_shape, N):
    check(backend, in_shape, N, torch.float32, 0.2)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
def test_only_needed_grads(backend):
    x, w, b = make((6, 5), 4, torch.float32)
    w.requires_grad_()
    y = gankern.linear_leaky_relu(x, w, b, 0.2, backend=backend)
    (gw,) = torch.autograd.grad(y.sum(), w)
    exp = torch.autograd.grad(F.leaky_relu(F.linear(x.double(), w.double(), b.double()), 0.2).sum(), w)[0]
    assert_close(gw, exp, name="grad_weight")
    with torch.no_grad():
        y2 = gankern.linear_leaky_relu(x, w, b, 0.2, backend=backend)
    assert y2.grad_fn is None
    assert_close(y2, F.leaky_relu(F.linear(x.double(), w.double(), b.double()), 0.2))


BAD = [
    (lambda: (torch.randn(4, 5), torch.randn(3, 6), None), "in_features"),
    (lambda: (torch.randn(4, 5), torch.randn(5), None), "weight must be 2-D"),
    (lambda: (torch.randn(4, 5), torch.randn(3, 5), torch.randn(4)), "bias must have shape"),
    (lambda: (torch.randn(4, 5), torch.randn(3, 5), torch.randn(3, 1)), "bias must have shape"),
    (lambda: (torch.randn(4, 5), torch.randn(3, 5).double(), None), "weight dtype"),
    (lambda: (torch.randn(4, 5), torch.randn(3, 5), torch.randn(3).half()), "bias dtype"),
    (lambda: (torch.randn(4, 5), torch.randn(3, 5, device="meta"), None), "weight is on"),
    (lambda: (torch.randn(4, 5), torch.randn(3, 5), torch.randn(3, device="meta")), "bias is on"),
    (lambda: (torch.randint(0, 3, (4, 5)), torch.randint(0, 3, (3, 5)), None), "input must be float32"),
    (lambda: (torch.tensor(1.0), torch.randn(3, 1), None), "at least 1 dimension"),
]


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
@pytest.mark.parametrize("args,msg", BAD, ids=[m for _, m in BAD])
def test_bad_input_clear_error(backend, args, msg):
    x, w, b = args()
    with pytest.raises((RuntimeError, ValueError, TypeError), match=msg):
        gankern.linear_leaky_relu(x, w, b, 0.2, backend=backend)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        gankern.linear_leaky_relu(torch.randn(2, 3), torch.randn(4, 3), backend="nope")


OVERLOADS = (["default"] if OP is not None else []) + (["triton"] if "triton" in CPU_BACKENDS else [])


@pytest.mark.parametrize("overload", OVERLOADS)
def test_opcheck(overload):
    """The public op and its internal ops, overload ``default`` (C++ kernels) or ``triton`` (Triton kernels)."""
    op = getattr(torch.ops.gankern.linear_leaky_relu, overload)
    fwd = getattr(torch.ops.gankern._linear_leaky_relu_fwd, overload)
    bwd = getattr(torch.ops.gankern._linear_leaky_relu_bwd, overload)
    x, w, b = make((6, 5), 4, torch.float32)
    for args in [(x, w, b, 0.2), (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), 0.2), (x, w, None, -0.3),
                 (torch.randn(2, 3, 5), w, b, 0.0)]:
        torch.library.opcheck(op, args)
    x = torch.randn(6, 5)
    y = fwd(x, w.detach(), b.detach(), 0.2)
    torch.library.opcheck(fwd, (x, w.detach(), b.detach(), 0.2))
    torch.library.opcheck(bwd, (torch.randn(6, 4), y, x, w.detach(), 0.2, [True, True, True]))
    torch.library.opcheck(bwd, (torch.randn(6, 4), y, x, w.detach(), 0.2, [False, True, False]))


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    def f(x, w, b):
        return gankern.linear_leaky_relu(x, w, b, 0.2, backend=backend).square().sum()

    cf = torch.compile(f, fullgraph=True)
    x, w, b = (t.requires_grad_() for t in make((9, 13), 7, torch.float32))
    out = cf(x, w, b)
    grads = torch.autograd.grad(out, (x, w, b))
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    outr = F.leaky_relu(F.linear(xr, wr, br), 0.2).square().sum()
    assert_close(out, outr, scale=4, name="compiled output")
    for got, exp in zip(grads, torch.autograd.grad(outr, (xr, wr, br))):
        assert_close(got, exp, scale=2, name="compiled grad")


@pytest.mark.needs_ext
def test_inference_mode_and_direct_op():
    x, w, b = make((5, 4), 3, torch.float32)
    with torch.inference_mode():
        y = OP(x, w, b, 0.2)
    assert_close(y, F.leaky_relu(F.linear(x.double(), w.double(), b.double()), 0.2))


# ---------------- GPU (skipped here; our users run them) ----------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_shape,N,slope,noncontig", [((1, 1), 1, 0.2, False), ((127, 784), 1000, 0.01, True),
                                                         ((3, 7, 1000), 127, 0.0, False), ((1024, 512), 256, -0.3, False)])
def test_gpu_matches_torch_fp64(backend, dtype, in_shape, N, slope, noncontig):
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        check(backend, in_shape, N, dtype, slope, True, noncontig, device="cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_tf32_follows_flag(backend):
    x, w, b = make((256, 512), 256, torch.float32, device="cuda")
    exp = F.leaky_relu(F.linear(x.double(), w.double(), b.double()), 0.2)
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        y = gankern.linear_leaky_relu(x, w, b, 0.2, backend=backend)
        torch.testing.assert_close(y.double(), exp, atol=5e-2, rtol=5e-3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_gradgradcheck(backend):
    args = [torch.randn(*s, dtype=torch.float64, device="cuda", requires_grad=True) for s in ((6, 5), (4, 5), (4,))]
    f = lambda x, w, b: gankern.linear_leaky_relu(x, w, b, 0.2, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.gpu
def test_gpu_opcheck_and_compile():
    x, w, b = make((6, 5), 4, torch.float32, device="cuda")
    torch.library.opcheck(torch.ops.gankern.linear_leaky_relu.default, (x.requires_grad_(), w, b, 0.2))
    cf = torch.compile(lambda x: gankern.linear_leaky_relu(x, w, b, 0.2, backend="cuda"), fullgraph=True)
    assert_close(cf(x), F.leaky_relu(F.linear(x.double(), w.double(), b.double()), 0.2))


# ---------------- issue 12 / 14 regressions ----------------
LAYOUT_CASES = {
    "bias[::2]": lambda x, w, b: (x, w, torch.randn(2 * b.shape[0])[::2]),
    "bias expanded": lambda x, w, b: (x, w, torch.randn(1).expand(b.shape[0])),
    "input[:, ::2]": lambda x, w, b: (torch.randn(x.shape[0], 2 * x.shape[1])[:, ::2], w, b),
    "input expanded": lambda x, w, b: (torch.randn(1, x.shape[1]).expand(x.shape), w, b),
    "input transposed": lambda x, w, b: (torch.randn(x.shape[1], x.shape[0]).t(), w, b),
    "weight[::2]": lambda x, w, b: (x, torch.randn(2 * w.shape[0], w.shape[1])[::2] * .05, b),
    "weight expanded": lambda x, w, b: (x, (torch.randn(1, w.shape[1]) * .05).expand(w.shape), b),
    "weight transposed": lambda x, w, b: (x, (torch.randn(w.shape[1], w.shape[0]) * .05).t(), b),
}


@pytest.mark.parametrize("layout", list(LAYOUT_CASES))
@pytest.mark.parametrize("path", ["cpp-onednn", "cpp-mkl", "cpp-small", "triton", "reference"])
def test_any_strides_every_path(monkeypatch, layout, path):
    """Strided / expanded / transposed operands on every GEMM path (2^26 MACs: above the oneDNN threshold)."""
    be, _, eng = path.partition("-")
    if be not in CPU_BACKENDS:
        pytest.skip(f"{be} unavailable")
    if eng:
        monkeypatch.setenv("GANKERN_LLR_GEMM", "mkl" if eng == "mkl" else "onednn")
    M, K, N = (256, 512, 512) if be == "cpp" and eng != "small" else (7, 9, 5)
    x, w, b = LAYOUT_CASES[layout](torch.randn(M, K), torch.randn(N, K) * .05, torch.randn(N))
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    y = gankern.linear_leaky_relu(*leaves, 0.2, backend=be)
    refs = [t.detach().double().requires_grad_() for t in (x, w, b)]
    z = F.linear(*refs)
    assert_close(y, F.leaky_relu(z, 0.2), scale=sqrt_scale(K), name="output")
    g = torch.randn(y.shape)
    # the kink: where fp32 rounding may flip the sign of z, use the mask the kernel used (its output's sign)
    m = torch.where(z.abs() < 1e-4, y.detach() > 0, z > 0)
    dz = torch.where(m, g.double(), 0.2 * g.double())
    for got, exp, name in zip(torch.autograd.grad(y, leaves, g), (dz @ refs[1], dz.t() @ refs[0], dz.sum(0)),
                              ["grad_input", "grad_weight", "grad_bias"]):
        assert_close(got, exp, scale=sqrt_scale(M), name=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("slope", [0.2, 0.0, -0.3, 1.0])
def test_lazy_r1_penalty_grads_match_torch(backend, slope):
    """Issue 14: R1 penalty alone (autograd.grad(create_graph) then backward): gradients defined where torch's are
    (zeros included), equal values, equal Adam step counts.  Slope 1 is a plain nn.Linear."""
    torch.manual_seed(0)
    init = [torch.randn(16, 8, dtype=torch.float64), torch.randn(16, dtype=torch.float64),
            torch.randn(1, 16, dtype=torch.float64), torch.randn(1, dtype=torch.float64)]
    runs = []
    for mode in ("torch", backend):
        ps = [t.clone().requires_grad_() for t in init]
        opt = torch.optim.Adam(ps, lr=1e-2)
        grads = []
        for step in range(4):
            x = torch.randn(32, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(step)).requires_grad_()
            if mode == "torch":
                z = F.linear(x, ps[0], ps[1])
                d = F.linear(z if slope == 1.0 else F.leaky_relu(z, slope), ps[2], ps[3])
            else:
                h = gankern.linear_leaky_relu(x, ps[0], ps[1], slope, backend=mode)
                d = gankern.linear_leaky_relu(h, ps[2], ps[3], 1.0, backend=mode)
            (gx,) = torch.autograd.grad(d.sum(), x, create_graph=True)
            opt.zero_grad(set_to_none=True)
            (gx.square().sum() * 5).backward()
            grads.append([p.grad for p in ps])
            opt.step()
        runs.append((grads, [int(opt.state[p]["step"]) if p in opt.state else 0 for p in ps], ps))
    (gt, st, pt), (gg, sg, pg) = runs
    for a_step, e_step in zip(gg, gt):
        for a, e, name in zip(a_step, e_step, ["w1", "b1", "w2", "b2"]):
            assert (a is None) == (e is None), f"{name}.grad: gankern {'None' if a is None else 'defined'}, torch {'None' if e is None else 'defined'}"
            if a is not None:
                assert_close(a, e, torch.float64, name=f"{name}.grad")
    assert sg == st, f"Adam step counts {sg} vs torch {st}"
    for a, e in zip(pg, pt):
        assert_close(a, e, torch.float64, name="parameters after 4 steps")


SAME_ERROR_BAD = [
    lambda: (torch.randn(4, 5), [[1.0] * 5] * 3, None, 0.2),
    lambda: (torch.randn(4, 5), torch.randn(3, 5), [1.0] * 3, 0.2),
    lambda: (torch.randn(4, 5), torch.randn(3, 5), None, "0.2"),
    lambda: (torch.randn(4, 5), torch.randn(3, 5).double(), None, 0.2),
    lambda: (torch.randn(4, 5), torch.randn(3, 5), torch.randn(3).half(), 0.2),
    lambda: (torch.randn(4, 5), torch.randn(3, 5), torch.randn(3, device="meta"), 0.2),
    lambda: (torch.randn(4, 5), torch.randn(3, 5, device="meta"), None, 0.2),
    lambda: (torch.randn(4, 5), torch.randn(3, 6), None, 0.2),
    lambda: (torch.randn(4, 5), torch.randn(5), None, 0.2),
    lambda: (torch.randn(4, 5), torch.randn(3, 5), torch.randn(4), 0.2),
    lambda: (torch.randint(0, 3, (4, 5)), torch.randint(0, 3, (3, 5)), None, 0.2),
    lambda: (torch.tensor(1.0), torch.randn(3, 1), None, 0.2),
]


@pytest.mark.parametrize("i", range(len(SAME_ERROR_BAD)))
def test_bad_input_same_error_every_backend(i):
    """One contract: the same exception type and message on every backend."""
    seen = {}
    for be in CPU_BACKENDS:
        with pytest.raises(Exception) as e:
            gankern.linear_leaky_relu(*SAME_ERROR_BAD[i](), backend=be)
        assert isinstance(e.value, (TypeError, RuntimeError, ValueError)), repr(e.value)
        seen[be] = (type(e.value), str(e.value))
    assert len(set(seen.values())) == 1, seen
