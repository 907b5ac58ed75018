"""gankern.bias_leaky_relu on every backend available here, against PyTorch in float64."""
import pytest
import torch
import torch.nn.functional as F

import gankern
from conftest import CPU_BACKENDS, HAS_EXT
from tolerances import assert_close, sqrt_scale

needs_triton = pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton interpreter unavailable")
KERNEL_BACKENDS = [b for b in CPU_BACKENDS if b != "reference"]


def make(shape, dim, dtype, layout="contiguous", device="cpu"):
    """Random input of `shape` in `layout` ("contiguous", "channels_last", "noncontig", "expanded") and bias (C,)."""
    if layout == "noncontig":
        x = torch.randn(*shape[:-1], 2 * shape[-1], device=device).to(dtype)[..., ::2]
        assert x.numel() <= 1 or not x.is_contiguous()
    elif layout == "expanded":
        x = torch.randn(1, *shape[1:], device=device).to(dtype).expand(*shape)
    else:
        x = torch.randn(*shape, device=device).to(dtype)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
    b = torch.randn(shape[dim], device=device).to(dtype)
    return x, b


def ref(x, b, slope, dim):
    shape = [1] * x.dim()
    shape[dim] = -1
    return F.leaky_relu(x + b.view(shape), slope)


def check(backend, shape, dim, dtype, slope, layout="contiguous", device="cpu"):
    x, b = make(shape, dim, dtype, layout, device)
    xx, bb = x.detach().requires_grad_(), b.detach().requires_grad_()
    xr, br = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y = gankern.bias_leaky_relu(xx, bb, slope, dim, backend=backend)
    assert y.dtype == dtype and y.shape == x.shape
    if layout == "channels_last" and backend != "reference" and not x.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last)
    yr = ref(xr, br, slope, dim)
    # half: the kernels round once (x + b in fp32); torch would round twice
    assert_close(y, yr, dtype, name="output")
    g = torch.randn(y.shape, device=device).to(dtype)
    gx, gb = torch.autograd.grad(y, (xx, bb), g)
    gxr, gbr = torch.autograd.grad(yr, (xr, br), g.double())
    assert gx.dtype == dtype and gb.dtype == dtype
    assert_close(gx, gxr, dtype, name="grad_input")
    n = max(1, x.numel() // max(1, shape[dim]))
    assert_close(gb, gbr, dtype, scale=sqrt_scale(n) * (2 if dtype != torch.float32 else 1), name="grad_bias")


CASES = [  # shape, dim, dtype, slope, layout
    ((2, 3, 5, 7), 1, torch.float64, 0.2, "contiguous"),
    ((2, 3, 5, 7), 1, torch.float64, 0.2, "channels_last"),
    ((7, 127), 1, torch.float64, 0.0, "contiguous"),
    ((127, 7), 1, torch.float64, 0.01, "noncontig"),
    ((1, 1, 1, 1), 1, torch.float64, 0.2, "contiguous"),
    ((1, 7, 1, 1), 1, torch.float64, 0.2, "channels_last"),
    ((3, 127, 2, 3), 1, torch.float64, 1.0, "channels_last"),
    ((4, 7, 3, 3), 1, torch.float64, 0.2, "expanded"),
    ((5, 6, 7), -1, torch.float64, 0.3, "contiguous"),
    ((5, 6, 7), 0, torch.float64, 0.3, "noncontig"),
    ((127,), 0, torch.float64, 0.2, "contiguous"),
    ((3, 4, 2, 3, 5), 1, torch.float64, 0.2, "contiguous"),
    ((4, 7, 3, 3), 1, torch.float64, -0.5, "contiguous"),
    ((4, 7, 3, 3), 1, torch.float64, 2.5, "channels_last"),
    ((8, 64, 16, 16), 1, torch.float32, 0.2, "contiguous"),
    ((8, 64, 16, 16), 1, torch.float32, 0.2, "channels_last"),
    ((3, 1000), 1, torch.float32, 0.0, "contiguous"),
    ((2, 7, 33, 31), 1, torch.float32, 0.2, "noncontig"),
    ((4, 16, 8, 8), 1, torch.float16, 0.2, "contiguous"),
    ((4, 16, 8, 8), 1, torch.float16, 0.0, "channels_last"),
    ((4, 16, 8, 8), 1, torch.bfloat16, 0.2, "contiguous"),
    ((7, 127), 1, torch.bfloat16, 0.2, "contiguous"),
]
IDS = [f"{s}-d{d}-{str(t)[6:]}-s{sl}-{lay}" for s, d, t, sl, lay in CASES]


@pytest.mark.needs_ext
@pytest.mark.parametrize("shape,dim,dtype,slope,layout", CASES, ids=IDS)
def test_cpp_matches_torch_fp64(shape, dim, dtype, slope, layout):
    check("cpp", shape, dim, dtype, slope, layout)


TRITON_CASES = [c for c in CASES if c[0] != (8, 64, 16, 16)]


@needs_triton
@pytest.mark.parametrize("shape,dim,dtype,slope,layout", TRITON_CASES,
                         ids=[i for c, i in zip(CASES, IDS) if c[0] != (8, 64, 16, 16)])
def test_triton_matches_torch_fp64(shape, dim, dtype, slope, layout):
    check("triton", shape, dim, dtype, slope, layout)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4), (0, 5)])
def test_empty(backend, shape):
    check(backend, shape, 1, torch.float64, 0.2)
    check(backend, shape, 1, torch.float64, 0.2, "channels_last" if len(shape) == 4 else "contiguous")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("slope", [0.2, 0.0, -0.5])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_gradgradcheck_fp64(backend, slope, layout):
    x, b = make((2, 3, 4, 5), 1, torch.float64, layout)
    with torch.no_grad():  # keep pre-activations away from the kink so finite differences are valid
        z = x + b.view(1, -1, 1, 1)
        x = torch.where(z.abs() < 0.1, x + 0.5, x)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(), b.requires_grad_()
    f = lambda x, b: gankern.bias_leaky_relu(x, b, slope, 1, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, b))
    assert torch.autograd.gradgradcheck(f, (x, b))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_penalty_gives_torchs_zero_grads(backend):
    """R1 / WGAN-GP through conv -> bias_leaky_relu: the penalty's gradients (incl. the defined-zero bias
    gradient torch gives) match conv + bias + leaky_relu in torch."""
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(1, 6, 6, 6, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    res = []
    for fused in (True, False):
        h = F.conv2d(x, w, None if fused else b)
        h = gankern.bias_leaky_relu(h, b, 0.2, backend=backend) if fused else F.leaky_relu(h, 0.2)
        out = F.conv2d(h, w2).sum()
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        pen = gx.square().sum()
        res.append(torch.autograd.grad(pen, (w, b, w2), allow_unused=True))
    for got, exp, name in zip(res[0], res[1], ("w", "b", "w2")):
        assert (got is None) == (exp is None), name
        assert_close(got, exp, torch.float64, name=f"penalty grad {name}")
    assert res[0][1] is not None and torch.count_nonzero(res[0][1]) == 0  # torch: zeros, not None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("slope", [0.0, 0.2])
def test_kink_nan_inf_follow_torch(backend, slope):
    x = torch.randint(-2, 3, (3, 4, 5, 5)).float()
    b = torch.randint(-1, 2, (4,)).float()
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    x[2, 3, 1, 1] = -float("inf")
    xs, bs = [x.clone().requires_grad_(), x.double().requires_grad_()], [b.clone().requires_grad_(), b.double().requires_grad_()]
    y = gankern.bias_leaky_relu(xs[0], bs[0], slope, backend=backend)
    yr = F.leaky_relu(xs[1] + bs[1].view(1, -1, 1, 1), slope)
    assert (yr == 0).any() and yr.isnan().any()
    assert_close(y, yr, name="output")
    g = torch.randn(y.shape)
    for got, exp, name in zip(torch.autograd.grad(y, [xs[0], bs[0]], g),
                              torch.autograd.grad(yr, [xs[1], bs[1]], g.double()), ["grad_input", "grad_bias"]):
        assert_close(got, exp, torch.float32, scale=4, name=name)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_only_needed_grads_and_no_grad(backend):
    x, b = make((3, 4, 5, 6), 1, torch.float32)
    b.requires_grad_()
    y = gankern.bias_leaky_relu(x, b, 0.2, backend=backend)
    (gb,) = torch.autograd.grad(y.sum(), b)
    exp_gb = torch.where(ref(x.double(), b.detach().double(), 0.2, 1) > 0, 1.0, 0.2).sum((0, 2, 3))
    assert_close(gb, exp_gb,
                 torch.float32, scale=4, name="grad_bias")
    x.requires_grad_()
    b.requires_grad_(False)
    (gx,) = torch.autograd.grad(gankern.bias_leaky_relu(x, b, 0.2, backend=backend).sum(), x)
    assert_close(gx, torch.where(ref(x.double(), b.double(), 0.2, 1) > 0, 1.0, 0.2), name="grad_input")
    with torch.no_grad():
        y2 = gankern.bias_leaky_relu(x, b, 0.2, backend=backend)
    assert y2.grad_fn is None
    with torch.inference_mode():
        y3 = gankern.bias_leaky_relu(x, b, 0.2, backend=backend)
    assert_close(y3, ref(x.double(), b.double(), 0.2, 1))


@pytest.mark.needs_ext
def test_bias_sum_does_not_depend_on_thread_count():
    x, b = make((16, 32, 20, 20), 1, torch.float32, "channels_last")
    x.requires_grad_(), b.requires_grad_()
    g = torch.randn(x.shape)
    out = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append(torch.autograd.grad(gankern.bias_leaky_relu(x, b, 0.2, backend="cpp"), (x, b), g))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


BAD = [
    (lambda: (torch.randn(2, 3, 4), torch.randn(4)), {}, "bias must have shape"),
    (lambda: (torch.randn(2, 3, 4), torch.randn(3, 1)), {}, "bias must have shape"),
    (lambda: (torch.randn(2, 3, 4), torch.randn(3).double()), {}, "bias dtype"),
    (lambda: (torch.randn(2, 3, 4), torch.randn(3, device="meta")), {}, "bias is on"),
    (lambda: (torch.randint(0, 3, (2, 3)), torch.randint(0, 3, (3,))), {}, "input must be float32"),
    (lambda: (torch.tensor(1.0), torch.randn(1)), {}, "at least 1 dimension"),
    (lambda: (torch.randn(2, 3, 4), torch.randn(3)), {"dim": 3}, r"dim must be in \[-3, 2\]"),
    (lambda: (torch.randn(2, 3, 4), torch.randn(3)), {"dim": -4}, r"dim must be in \[-3, 2\]"),
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
@pytest.mark.parametrize("args,kw,msg", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_clear_error(backend, args, kw, msg):
    x, b = args()
    with pytest.raises(RuntimeError, match=msg):
        gankern.bias_leaky_relu(x, b, 0.2, backend=backend, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_types(backend):
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        gankern.bias_leaky_relu([1.0], torch.randn(1), backend=backend)
    if backend != "cpp":
        with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
            gankern.bias_leaky_relu(torch.randn(2, 3), None, backend=backend)
    else:
        with pytest.raises((TypeError, RuntimeError)):
            gankern.bias_leaky_relu(torch.randn(2, 3), None, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        gankern.bias_leaky_relu(torch.randn(2, 3), torch.randn(3), backend="nope")


OVERLOADS = (["default"] if HAS_EXT else []) + (["triton"] if "triton" in CPU_BACKENDS else [])


@pytest.mark.parametrize("overload", OVERLOADS)
def test_opcheck(overload):
    """The public op and its internal ops, overload ``default`` (C++ kernels) or ``triton`` (Triton kernels)."""
    op = getattr(torch.ops.gankern.bias_leaky_relu, overload)
    fwd = getattr(torch.ops.gankern._bias_leaky_relu_fwd, overload)
    bwd = getattr(torch.ops.gankern._bias_leaky_relu_bwd, overload)
    for layout in ("contiguous", "channels_last"):
        x, b = make((2, 3, 4, 5), 1, torch.float32, layout)
        for args in [(x, b, 0.2, 1), (x.clone().requires_grad_(), b.clone().requires_grad_(), 0.2, 1),
                     (x, b, -0.3, 1), (x.clone().requires_grad_(), b, 0.0, 1)]:
            torch.library.opcheck(op, args)
        y = fwd(x, b, 0.2, 1)
        torch.library.opcheck(fwd, (x, b, 0.2, 1))
        for mask in ([True, True], [False, True], [True, False]):
            torch.library.opcheck(bwd, (torch.randn(x.shape), y, 0.2, 1, mask))
    x2, b2 = make((7, 5), 1, torch.float32)
    torch.library.opcheck(op, (x2.requires_grad_(), b2, 0.2, -1))


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_torch_compile_fullgraph(backend, layout):
    torch._dynamo.reset()
    w = torch.randn(6, 3, 3, 3, requires_grad=True)

    def f(x, b):
        return gankern.bias_leaky_relu(F.conv2d(x, w), b, 0.2, backend=backend).square().sum()

    cf = torch.compile(f, fullgraph=True)
    x, b = make((2, 3, 9, 9), 1, torch.float32, layout)
    b = torch.randn(6, requires_grad=True)
    x.requires_grad_()
    out = cf(x, b)
    grads = torch.autograd.grad(out, (x, b, w))
    xr, br, wr = (t.detach().double().requires_grad_() for t in (x, b, w))
    outr = ref(F.conv2d(xr, wr), br, 0.2, 1).square().sum()
    assert_close(out, outr, scale=8, name="compiled output")
    for got, exp, name in zip(grads, torch.autograd.grad(outr, (xr, br, wr)), "xbw"):
        assert_close(got, exp, scale=8, name=f"compiled grad {name}")


# ---------------- GPU (skipped here; our users run them) ----------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,layout,slope", [((1, 1, 1, 1), "contiguous", 0.2), ((64, 64, 32, 32), "contiguous", 0.2),
                                                ((64, 64, 32, 32), "channels_last", 0.0), ((7, 127), "contiguous", 0.2),
                                                ((3, 7, 33, 31), "noncontig", 0.01), ((2, 3, 5, 7), "contiguous", -0.3)])
def test_gpu_matches_torch_fp64(backend, dtype, shape, layout, slope):
    check(backend, shape, 1, dtype, slope, layout, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_gradgradcheck_opcheck_compile(backend):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, device="cuda", requires_grad=True)
    f = lambda x, b: gankern.bias_leaky_relu(x, b, 0.2, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, b))
    assert torch.autograd.gradgradcheck(f, (x, b))
    if backend == "cuda":
        torch.library.opcheck(torch.ops.gankern.bias_leaky_relu.default, (x.float(), b.float(), 0.2, 1))
    cf = torch.compile(f, fullgraph=True)
    assert_close(cf(x, b), ref(x, b, 0.2, 1))
