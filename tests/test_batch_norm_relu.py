"""gankern.batch_norm_relu == relu(F.batch_norm(...)) and gankern.batch_norm_leaky_relu ==
leaky_relu(F.batch_norm(...), slope) (one op) on every backend, against PyTorch in float64.

Covering set (not the full cross product): the cpp backend gets every layout x dtype x mode with
odd sizes, Triton (interpreter) the same layouts at small sizes, reference a few; affine on/off,
running stats on/off, momenta and zero-weight channels rotate through the cases; every test of the
op runs for slope 0 (ReLU) and 0.2 (LeakyReLU).  Edge cases of issue 12 (no channels, empty batch,
non-finite inputs in evaluation, parameter strides, argument types) are at the end; the random
fuzz is tests/test_fuzz_batch_norm.py.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import gankern
from gankern import _backends
from conftest import CPU_BACKENDS
from tolerances import assert_close, assert_close_magnitude, sqrt_scale

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SLOPES = [0.0, 0.2]


def op(backend, slope):
    """The op under test: batch_norm_relu for slope 0 (its own entry point), else batch_norm_leaky_relu."""
    if slope == 0.0:
        return lambda *a: gankern.batch_norm_relu(*a, backend=backend)
    return lambda *a: gankern.batch_norm_leaky_relu(*a, negative_slope=slope, backend=backend)


def act(y, slope):
    return F.relu(y) if slope == 0.0 else F.leaky_relu(y, slope)


# ----------------------------------------------------------------------------- helpers
def make_input(shape, fmt, dtype, device="cpu", offset=0.5, spread=2.0):
    """fmt: "contig", "cl" (channels-last), "noncontig" (a strided view)."""
    if fmt == "noncontig":
        if len(shape) == 2:  # a transposed (C, N) buffer
            x = (torch.randn(shape[::-1], device=device) * spread + offset).to(dtype).t()
        else:  # every other element of a wider last dim
            big = list(shape)
            big[-1] *= 2
            x = (torch.randn(big, device=device) * spread + offset).to(dtype)[..., ::2]
        assert not x.is_contiguous()
        return x
    x = (torch.randn(shape, device=device) * spread + offset).to(dtype)
    if fmt == "cl":
        x = x.to(memory_format=torch.channels_last)
    return x


def make_params(C, dtype, pdtype, affine, running, device="cpu", zero_weight=False):
    w = b = rm = rv = None
    if affine:
        w = torch.randn(C, device=device).to(pdtype)
        if zero_weight:
            w[0] = 0.0
        b = torch.randn(C, device=device).to(pdtype)
    if running:
        rm = torch.randn(C, device=device).to(pdtype)
        rv = (torch.rand(C, device=device) + 0.5).to(pdtype)
    return w, b, rm, rv


def clone_opt(t, **kw):
    return None if t is None else t.detach().clone().to(**kw)


def run(fn, x, w, b, rm, rv, training, momentum, eps, grad, dtype64=None, keep_strides=False):
    """Runs fn (a batch_norm_relu), returns (y, running_mean, running_var, dx, dw, db).
    keep_strides: x, w, b are passed as they are (views with their strides), not cloned."""
    kw = {} if dtype64 is None else dict(dtype=dtype64)
    keep = keep_strides and dtype64 is None
    xi = x.detach().requires_grad_() if keep else x.detach().clone().to(**kw).requires_grad_()
    wi = w.detach() if keep and w is not None else clone_opt(w, **kw)
    bi = b.detach() if keep and b is not None else clone_opt(b, **kw)
    if wi is not None:
        wi.requires_grad_()
    if bi is not None:
        bi.requires_grad_()
    rmi, rvi = clone_opt(rm, **kw), clone_opt(rv, **kw)
    y = fn(xi, rmi, rvi, wi, bi, training, momentum, eps)
    leaves = [t for t in (xi, wi, bi) if t is not None]
    grads = torch.autograd.grad(y, leaves, grad.to(y.dtype))
    dx = grads[0]
    dw = grads[1] if wi is not None else None
    db = grads[-1] if bi is not None else None
    return y, rmi, rvi, dx, dw, db


def torch64(x, rm, rv, w, b, training, momentum, eps, slope=0.0):
    return act(F.batch_norm(x, rm, rv, w, b, training, momentum, eps), slope)


def no_kink_grad(grad, x, w, b, rm, rv, training, eps):
    """Zero the upstream gradient where the fp64 pre-activation is within 1e-5 of the ReLU's kink:
    there relu' is ambiguous (fp32 and fp64 may round to opposite sides, e.g. an element equal to
    the mean with no affine), so no backend can be held to the fp64 choice."""
    d = dict(dtype=torch.float64)
    pre = F.batch_norm(x.double(), clone_opt(rm, **d), clone_opt(rv, **d), clone_opt(w, **d), clone_opt(b, **d),
                       training, 0.1, eps)
    return grad.masked_fill(pre.abs() < 1e-5, 0)


def check_against_torch(backend, shape, fmt, dtype, training, momentum=0.1, affine=True, running=True,
                        pdtype=None, zero_weight=False, eps=1e-5, slope=0.0):
    pdtype = pdtype or (dtype if dtype == torch.float64 else torch.float32)
    x = make_input(shape, fmt, dtype)
    C = shape[1]
    w, b, rm, rv = make_params(C, dtype, pdtype, affine, running or not training, zero_weight=zero_weight)
    grad = no_kink_grad(torch.randn(shape).to(dtype), x, w, b, rm, rv, training, eps)

    ours = op(backend, slope)
    ref = lambda *a: torch64(*a, slope=slope)  # noqa: E731
    y, rm1, rv1, dx, dw, db = run(ours, x, w, b, rm, rv, training, momentum, eps, grad)
    ye, rme, rve, dxe, dwe, dbe = run(ref, x, w, b, rm, rv, training, momentum, eps, grad, torch.float64)
    M = x.numel() // C
    assert_close(y, ye, dtype, name="output")
    if fmt == "cl":
        assert y.is_contiguous(memory_format=torch.channels_last), "output lost the channels-last format"
        assert dx.is_contiguous(memory_format=torch.channels_last) or dx.is_contiguous(), "grad_input layout"
    if rm is not None:
        assert_close(rm1, rme, rm1.dtype, scale=2, name="running_mean")
        assert_close(rv1, rve, rv1.dtype, scale=2, name="running_var")
    red = sqrt_scale(M) * 4  # reductions over M values
    assert_close(dx, dxe, dtype, scale=4, name="grad_input")
    if affine:
        # dweight / dbias are sums over M values of the (rounded) input: scale by their magnitude
        mag = max(1.0, dbe.abs().max().item(), dwe.abs().max().item()) if dtype != torch.float32 else red
        dt = torch.float32 if dtype == torch.float32 else dtype
        assert_close(dw.double(), dwe, dt, scale=mag if dtype != torch.float32 else red, name="grad_weight")
        assert_close(db.double(), dbe, dt, scale=mag if dtype != torch.float32 else red, name="grad_bias")


# ----------------------------------------------------------------------------- covering set
CPP_CASES = [
    ((2, 1), "contig"), ((3, 3), "contig"), ((127, 64), "contig"), ((1000, 3), "contig"), ((64, 1000), "contig"),
    ((127, 64), "noncontig"),
    ((3, 3, 7), "contig"), ((127, 64, 5), "contig"), ((2, 1000, 3), "contig"), ((3, 3, 7), "noncontig"),
    ((2, 3, 5, 7), "contig"), ((3, 64, 3, 3), "cl"), ((3, 1, 7, 9), "contig"), ((2, 3, 5, 7), "cl"),
    ((5, 6, 3, 4), "noncontig"),
]


def _variants():
    out = []
    for i, ((shape, fmt), dtype, training) in enumerate(itertools.product(CPP_CASES, DTYPES, (True, False))):
        affine = i % 3 != 1
        running = (i % 4 != 2) or not training
        momentum = (0.1, 0.0, 1.0, 0.37)[i % 4]
        zero_w = affine and i % 5 == 0
        pdtype = dtype if (dtype != torch.float32 and i % 2 == 0) else None
        tag = f"{'x'.join(map(str, shape))}-{fmt}-{str(dtype)[6:]}-{'train' if training else 'eval'}"
        out.append(pytest.param(shape, fmt, dtype, training, affine, running, momentum, zero_w, pdtype, id=tag))
    return out


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="compiled extension not built")
@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("shape,fmt,dtype,training,affine,running,momentum,zero_w,pdtype", _variants())
def test_cpp_matches_torch(shape, fmt, dtype, training, affine, running, momentum, zero_w, pdtype, slope):
    check_against_torch("cpp", shape, fmt, dtype, training, momentum, affine, running, pdtype, zero_w, slope=slope)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="compiled extension not built")
@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("shape,fmt", [((1000, 1000), "contig"), ((128, 64, 8, 8), "cl"), ((128, 64, 9, 9), "contig")])
def test_cpp_large(shape, fmt, slope):
    check_against_torch("cpp", shape, fmt, torch.float32, True, 0.1, True, True, slope=slope)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="compiled extension not built")
@pytest.mark.parametrize("slope", SLOPES + [1.7])
@pytest.mark.parametrize("training", [True, False])
def test_cpp_float64(training, slope):
    check_against_torch("cpp", (7, 5, 3), "contig", torch.float64, training, slope=slope)
    check_against_torch("cpp", (9, 4), "contig", torch.float64, training, slope=slope)


TRITON_CASES = [((3, 5), "contig"), ((16, 70), "contig"), ((7, 3, 6), "contig"), ((2, 3, 5, 7), "cl"),
                ((2, 3, 4, 5), "contig"), ((5, 4), "noncontig")]


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton not available")
@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("shape,fmt", TRITON_CASES)
@pytest.mark.parametrize("dtype,training", [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True),
                                            (torch.float16, False)])
def test_triton_matches_torch(shape, fmt, dtype, training, slope):
    i = len(shape) + shape[0]
    check_against_torch("triton", shape, fmt, dtype, training, momentum=(0.1, 0.5)[i % 2], affine=i % 3 != 0,
                        running=True, pdtype=dtype if i % 2 else None, zero_weight=True, slope=slope)


@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("shape,fmt,dtype,training", [((5, 4), "contig", torch.float32, True),
                                                       ((3, 4, 5, 2), "cl", torch.bfloat16, False)])
def test_reference_matches_torch(shape, fmt, dtype, training, slope):
    check_against_torch("reference", shape, fmt, dtype, training, slope=slope)


def test_triton_rejects_float64():
    if "triton" not in CPU_BACKENDS:
        pytest.skip("triton not available")
    with pytest.raises(RuntimeError, match="float64"):
        gankern.batch_norm_relu(torch.randn(4, 3, dtype=torch.float64), None, None, training=True, backend="triton")


# ----------------------------------------------------------------------------- gradcheck, opcheck, compile
@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(6, 4), (3, 2, 5)])
def test_gradcheck_fp64(backend, training, shape, slope):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    C = shape[1]
    w = torch.randn(C, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5

    def f(x, w, b):  # fresh running stats each call: the function must be pure for gradcheck
        return op(backend, slope)(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("slope", SLOPES)
def test_reference_double_backward(slope):
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    f = lambda x, w: op("reference", slope)(x, None, None, w, None, True)  # noqa: E731
    assert torch.autograd.gradgradcheck(f, (x, w))


@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
def test_double_backward_raises(backend, slope):
    x = torch.randn(6, 3, requires_grad=True)
    y = op(backend, slope)(x, None, None, None, None, True)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=False)
    assert g.shape == x.shape
    y = op(backend, slope)(x, None, None, None, None, True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


def _opcheck_args(training, with_stats=True, affine=True):
    x = torch.randn(8, 5, 3, requires_grad=True)
    w = torch.randn(5, requires_grad=True) if affine else None
    b = torch.randn(5, requires_grad=True) if affine else None
    rm, rv = (torch.randn(5), torch.rand(5) + 0.5) if with_stats else (None, None)
    return x, rm, rv, w, b, training, 0.1, 1e-5


OVERLOADS = (["default"] if "cpp" in CPU_BACKENDS else []) + (["triton"] if "triton" in CPU_BACKENDS else [])


@pytest.mark.parametrize("overload", OVERLOADS)
@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("training,with_stats,affine", [(True, True, True), (False, True, True), (True, False, False)])
def test_opcheck(overload, training, with_stats, affine, slope):
    """The public op and its internal ops, overload ``default`` (C++ kernels) or ``triton`` (Triton kernels)."""
    args = _opcheck_args(training, with_stats, affine)
    torch.library.opcheck(getattr(torch.ops.gankern.batch_norm_relu, overload), (*args, slope))
    x, rm, rv, w, b = args[:5]
    det = [None if t is None else t.detach() for t in (x, rm, rv, w, b)]
    fwd = getattr(torch.ops.gankern._batch_norm_relu_fwd, overload)
    torch.library.opcheck(fwd, (*det, training, 0.1, 1e-5, slope))
    y, mean, invstd = fwd(*det, training, 0.1, 1e-5, slope)
    torch.library.opcheck(getattr(torch.ops.gankern._batch_norm_relu_bwd, overload),
                          (torch.randn_like(y), det[0], det[3], det[4], mean, invstd, training, slope))


@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
@pytest.mark.parametrize("fmt", ["contig", "cl"])
def test_torch_compile_fullgraph(backend, fmt, slope):
    torch._dynamo.reset()
    shape = (6, 5, 3, 2)
    x0 = make_input(shape, fmt, torch.float32)
    w = torch.randn(5, requires_grad=True)
    b = torch.randn(5, requires_grad=True)

    def step(x, rm, rv):
        y = op(backend, slope)(x, rm, rv, w, b, True, 0.1, 1e-5)
        return (y * y).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = {}
    for name, fn in (("eager", step), ("compiled", compiled)):
        x = x0.clone().requires_grad_()
        rm, rv = torch.zeros(5), torch.ones(5)
        for _ in range(2):  # two steps: running stats must accumulate in place
            loss = fn(x, rm, rv)
        gx, gw, gb = torch.autograd.grad(loss, (x, w, b))
        out[name] = (loss, rm, rv, gx, gw, gb)
    for a, e in zip(out["compiled"], out["eager"]):
        torch.testing.assert_close(a, e)
    assert out["eager"][1].abs().sum() > 0  # the running mean did move


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="compiled extension not built")
def test_torch_compile_inductor_cpp():
    torch._dynamo.reset()
    x = torch.randn(16, 8, requires_grad=True)
    rm, rv = torch.zeros(8), torch.ones(8)
    rm2, rv2 = torch.zeros(8), torch.ones(8)
    f = lambda x, rm, rv: gankern.batch_norm_relu(x, rm, rv, None, None, True, 0.2, 1e-5, backend="cpp")  # noqa
    y1 = torch.compile(f, fullgraph=True)(x, rm, rv)
    y2 = f(x, rm2, rv2)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
@pytest.mark.parametrize("shape,fmt", [((1000, 8), "contig"), ((50, 4, 6, 5), "contig"), ((50, 4, 6, 5), "cl")])
def test_large_offset_small_spread(backend, shape, fmt):
    """Channel offset 1e4, spread 1e-2 in fp32: a naive E[x^2] - E[x]^2 would give garbage."""
    if backend == "triton":
        shape = (shape[0] // 4,) + shape[1:]
        if _backends._version("triton") < (3, 9):
            # the kernel applies fma(x, scale, shift); before 3.9 the interpreter computes tl.fma as x * y + z
            # (two roundings, ~2x the error at |x * scale| ~ 1e6), which no GPU does
            pytest.skip("Triton < 3.9's interpreter does not round tl.fma once (GPUs do)")
    C = shape[1]
    offsets = 1e4 * (1 + torch.arange(C, dtype=torch.float64) / C)
    view = (1, C) + (1,) * (len(shape) - 2)
    x = (offsets.view(view) + 1e-2 * torch.randn(shape, dtype=torch.float64)).float()
    if fmt == "cl":
        x = x.to(memory_format=torch.channels_last)
    rm, rv = torch.zeros(C), torch.ones(C)
    y = gankern.batch_norm_relu(x, rm, rv, None, None, True, 1.0, 1e-5, backend=backend)
    x64 = x.double()
    dims = [0] + list(range(2, len(shape)))
    mean64 = x64.mean(dims)
    var64 = x64.var(dims, unbiased=True)
    torch.testing.assert_close(rm.double(), mean64, rtol=1e-7, atol=0)
    torch.testing.assert_close(rv.double(), var64, rtol=1e-4, atol=0)  # the spread itself is only 1e-4
    # output: as good as torch's own fp32 kernel (the fp32 mean itself carries ~ulp(1e4) / 1e-2 error)
    ye = F.relu(F.batch_norm(x64, None, None, training=True, eps=1e-5))
    yt = F.relu(F.batch_norm(x, None, None, training=True, eps=1e-5)).double()
    err, err_torch = (y.double() - ye).abs().max().item(), (yt - ye).abs().max().item()
    assert err <= 2 * err_torch + 1e-3, (err, err_torch)


@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_inf_like_torch(backend, slope):
    x = torch.randn(9, 4, 3)
    x[2, 1, 0] = float("nan")
    x[4, 3, 1] = float("inf")
    for training in (True, False):
        rm, rv = torch.zeros(4), torch.ones(4)
        rme, rve = rm.double(), rv.double()
        y = op(backend, slope)(x, rm, rv, None, None, training)
        ye = torch64(x.double(), rme, rve, None, None, training, 0.1, 1e-5, slope)
        assert_close(y, ye, torch.float32)
        assert_close(rm, rme, torch.float32, name="running_mean")
        assert_close(rv, rve, torch.float32, name="running_var")


# The cpp statistics make one pass around a per-channel shift (the mean of the first rows), check
# its accuracy per channel, redo the pass around the computed mean when the check fails (data whose
# first rows are not representative) and fall back to an exact two-pass for non-finite data.  The
# shapes cover the rows layout fused per column block (300 x 200), split in row groups (3000 x 70,
# 20000 x 16), channels-last and planar.
HARD_SHAPES = [((300, 200), "contig"), ((3000, 70), "contig"), ((20000, 16), "contig"), ((40, 24, 9, 9), "cl"),
               ((64, 6, 7, 7), "contig")]


def _hard_data(shape, fmt, kind, dtype):
    C = shape[1]
    view = (1, C) + (1,) * (len(shape) - 2)
    offsets = (1e4 * (1 + torch.arange(C, dtype=torch.float64) / C)).view(view)
    z = torch.randn(shape, dtype=torch.float64)
    n_index = torch.arange(shape[0], dtype=torch.float64).view((-1,) + (1,) * (len(shape) - 1))
    if kind == "sorted":  # the first rows hold the smallest values of every channel
        z = z.flatten(2).sort(0).values.view(shape) if len(shape) > 2 else z.sort(0).values
    elif kind == "step":  # the last third is shifted by 50 standard deviations
        z = z + 50.0 * (n_index >= 2 * shape[0] // 3)
    elif kind == "constant":
        z = z * 0
    x = (offsets + 1e-2 * z).to(dtype)
    if fmt == "cl":
        x = x.to(memory_format=torch.channels_last)
    return x


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="compiled extension not built")
@pytest.mark.parametrize("kind", ["iid", "sorted", "step", "constant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,fmt", HARD_SHAPES)
def test_cpp_statistics_hard_data(shape, fmt, kind, dtype):
    x = _hard_data(shape, fmt, kind, dtype)
    C = shape[1]
    rm, rv = torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype)
    y = gankern.batch_norm_relu(x, rm, rv, None, None, True, 1.0, 1e-5, backend="cpp")
    x64 = x.double()
    dims = [0] + list(range(2, len(shape)))
    # an exact two-pass in fp64 (torch.var's own fp64 result is off by up to ~1e-8 on the sorted data)
    mean64 = x64.mean(dims)
    var64 = ((x64 - mean64.view((1, C) + (1,) * (len(shape) - 2))) ** 2).sum(dims) / (x64.numel() // C - 1)
    # fp32: the stored fp32 mean itself rounds at ~6e-8; fp64: x itself only holds the spread to ~1e-12 / 1e-2
    rtol_m, rtol_v = (1e-7, 1e-4) if dtype == torch.float32 else (1e-14, 1e-8)
    torch.testing.assert_close(rm.double(), mean64, rtol=rtol_m, atol=0)
    torch.testing.assert_close(rv.double(), var64, rtol=rtol_v, atol=1e-18)  # constant channels: var 0
    if dtype == torch.float64:
        ye = F.relu(F.batch_norm(x64, None, None, training=True, eps=1e-5))
        torch.testing.assert_close(y, ye, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="compiled extension not built")
@pytest.mark.parametrize("shape,fmt", [((9, 4), "contig"), ((300, 200), "contig"), ((3000, 70), "contig"),
                                       ((40, 24, 9, 9), "cl")])
def test_cpp_nan_inf_rows_like_torch(shape, fmt):
    """Inf / NaN in the first rows, the last rows, and several rows of a channel, rows layout."""
    C, M = shape[1], shape[0]
    x = torch.randn(shape)
    x[0, 0] = float("inf")  # first row: the shift itself is infinite
    x[M - 1, 1] = float("nan")
    x[M // 2, 2] = -float("inf")
    x[1, 3] = float("inf")
    x[M - 1, 3] = -float("inf")  # +Inf and -Inf: NaN mean
    if fmt == "cl":
        x = x.to(memory_format=torch.channels_last)
    for training in (True, False):
        rm, rv = torch.zeros(C), torch.ones(C)
        rme, rve = rm.double(), rv.double()
        y = gankern.batch_norm_relu(x, rm, rv, None, None, training, backend="cpp")
        ye = torch64(x.double(), rme, rve, None, None, training, 0.1, 1e-5)
        assert_close(y, ye, torch.float32)
        assert_close(rm, rme, torch.float32, name="running_mean")
        assert_close(rv, rve, torch.float32, name="running_var")


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="compiled extension not built")
@pytest.mark.parametrize("shape,fmt", [((1000, 300), "contig"), ((64, 32, 9, 9), "contig"), ((64, 32, 9, 9), "cl"),
                                       ((4000, 3, 5), "contig"), ((20000, 64), "contig")])
def test_cpp_deterministic_any_thread_count(shape, fmt):
    x0 = make_input(shape, fmt, torch.float32)
    C = shape[1]
    w, b = torch.randn(C), torch.randn(C)
    g = torch.randn(shape)
    results = []
    n0 = torch.get_num_threads()
    try:
        for threads in (n0, 1, n0):
            torch.set_num_threads(threads)
            x = x0.clone().requires_grad_()
            wi, bi = w.clone().requires_grad_(), b.clone().requires_grad_()
            rm, rv = torch.zeros(C), torch.ones(C)
            y = gankern.batch_norm_relu(x, rm, rv, wi, bi, True, backend="cpp")
            results.append((y, rm, rv, *torch.autograd.grad(y, (x, wi, bi), g)))
    finally:
        torch.set_num_threads(n0)
    for other in results[1:]:
        for a, e in zip(other, results[0]):
            assert torch.equal(a, e), "results differ between runs / thread counts"


def test_triton_deterministic():
    if "triton" not in CPU_BACKENDS:
        pytest.skip("triton not available")
    x = torch.randn(40, 6, 5)
    ys = [gankern.batch_norm_relu(x, None, None, None, None, True, backend="triton") for _ in range(2)]
    assert torch.equal(ys[0], ys[1])


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="compiled extension not built")
def test_cpp_empty_batch_eval():
    x = torch.randn(0, 3, 4)
    y = gankern.batch_norm_relu(x, torch.zeros(3), torch.ones(3), backend="cpp")
    assert y.shape == x.shape


# ----------------------------------------------------------------------------- bad input
BAD = [
    (lambda: (torch.randn(5), torch.zeros(5), torch.ones(5), None, None, False), RuntimeError, "input must have at least 2"),
    (lambda: (torch.randn(4, 3), torch.zeros(4), torch.ones(3), None, None, False), RuntimeError, "running_mean must be a 1-D tensor of 3"),
    (lambda: (torch.randn(4, 3), torch.zeros(3), torch.ones(2, 3), None, None, False), RuntimeError, "running_var must be a 1-D tensor of 3"),
    (lambda: (torch.randn(4, 3), None, None, torch.ones(4), None, True), RuntimeError, "weight must be a 1-D tensor of 3"),
    (lambda: (torch.randn(4, 3), None, None, None, torch.ones(2), True), RuntimeError, "bias must be a 1-D tensor of 3"),
    (lambda: (torch.randn(4, 3), None, None, torch.ones(3, dtype=torch.float64), None, True), RuntimeError, "weight must have the input's dtype"),
    (lambda: (torch.randn(4, 3).half(), torch.zeros(3), torch.ones(3), torch.ones(3).half(), None, True), RuntimeError, "must share one dtype"),
    (lambda: (torch.randn(4, 3), None, None, torch.ones(3, device="meta"), None, True), RuntimeError, "weight must be on the input's device"),
    (lambda: (torch.randint(0, 5, (4, 3)), None, None, None, None, True), RuntimeError, "input must be float32"),
    (lambda: (torch.randn(1, 3), None, None, None, None, True), ValueError, r"Expected more than 1 value per channel when training, got input size torch.Size\(\[1, 3\]\)"),
    (lambda: (torch.randn(1, 3, 1, 1), None, None, None, None, True), ValueError, "Expected more than 1 value per channel"),
    (lambda: (torch.randn(4, 3), None, None, None, None, False), RuntimeError, "running_mean must be defined in evaluation mode"),
    (lambda: (torch.randn(4, 3), torch.zeros(3), None, None, None, True), ValueError, "both be None or neither"),
]


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input_clear_error(backend, i):
    make, exc, msg = BAD[i]
    args = make()
    with pytest.raises(exc, match=msg):
        gankern.batch_norm_relu(*args, backend=backend)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="input must be a tensor"):
        gankern.batch_norm_relu([1.0, 2.0], None, None, training=True)


# ----------------------------------------------------------------------------- GPU (skipped here)
def _cuda_backends():
    return [b for b in ("cuda", "triton") if gankern.backends()[b]["available"]]


@pytest.mark.gpu
@pytest.mark.parametrize("shape,fmt", [((3, 5), "contig"), ((127, 64), "contig"), ((1000, 1000), "contig"),
                                       ((7, 3, 11), "contig"), ((128, 64, 8, 8), "cl"), ((3, 64, 9, 7), "contig"),
                                       ((5, 6, 3, 4), "noncontig")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("slope", SLOPES)
def test_gpu_backends_match_torch(shape, fmt, dtype, training, slope):
    for backend in _cuda_backends():
        C = shape[1]
        x = make_input(shape, fmt, dtype, device="cuda")
        w, b, rm, rv = make_params(C, dtype, torch.float32, True, True, device="cuda", zero_weight=True)
        grad = no_kink_grad(torch.randn(shape, device="cuda").to(dtype), x, w, b, rm, rv, training, 1e-5)
        ours = op(backend, slope)
        ref = lambda *a: torch64(*a, slope=slope)  # noqa: E731
        y, rm1, rv1, dx, dw, db = run(ours, x, w, b, rm, rv, training, 0.1, 1e-5, grad)
        ye, rme, rve, dxe, dwe, dbe = run(ref, x, w, b, rm, rv, training, 0.1, 1e-5, grad, torch.float64)
        M = x.numel() // C
        assert_close(y, ye, dtype, name=f"{backend} output")
        assert_close(rm1, rme, torch.float32, scale=2, name=f"{backend} running_mean")
        assert_close(rv1, rve, torch.float32, scale=2, name=f"{backend} running_var")
        assert_close(dx, dxe, dtype, scale=4, name=f"{backend} grad_input")
        mag = max(sqrt_scale(M) * 4, dbe.abs().max().item(), dwe.abs().max().item())
        assert_close(dw, dwe, torch.float32 if dtype == torch.float32 else dtype, scale=mag, name=f"{backend} dw")
        assert_close(db, dbe, torch.float32 if dtype == torch.float32 else dtype, scale=mag, name=f"{backend} db")


@pytest.mark.gpu
def test_gpu_deterministic_and_offset():
    for backend in _cuda_backends():
        x = (1e4 + 1e-2 * torch.randn(4096, 256, device="cuda", dtype=torch.float64)).float()
        outs = []
        for _ in range(2):
            rm, rv = torch.zeros(256, device="cuda"), torch.ones(256, device="cuda")
            outs.append((gankern.batch_norm_relu(x, rm, rv, None, None, True, 1.0, backend=backend), rm, rv))
        for a, e in zip(outs[0], outs[1]):
            assert torch.equal(a, e)
        torch.testing.assert_close(outs[0][2].double(), x.double().var(0), rtol=1e-4, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("slope", SLOPES)
def test_gpu_edge_cases(backend, slope):
    """Issue 12's cases on the device: no channels, empty batch, eval backward at +-inf, strided parameters."""
    if backend not in _cuda_backends():
        pytest.skip(f"{backend} not available")
    f = op(backend, slope)
    dev = "cuda"
    assert f(torch.randn(2, 0, 3, 3, device=dev), None, None, None, None, True, 0.1, 1e-5).shape == (2, 0, 3, 3)
    rm, rv = torch.randn(3, device=dev), torch.rand(3, device=dev) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    w = torch.ones(3, device=dev, requires_grad=True)
    y = f(torch.randn(0, 3, 4, device=dev), rm, rv, w, None, True, 0.1, 1e-5)
    (gw,) = torch.autograd.grad(y.sum(), w)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0) and torch.equal(gw, torch.zeros_like(gw))
    x = torch.randn(6, 3, device=dev)
    x[0, 0], x[1, 1] = float("inf"), -float("inf")
    x.requires_grad_()
    y = f(x, torch.zeros(3, device=dev), torch.ones(3, device=dev), None, None, False, 0.1, 1e-5)
    (gx,) = torch.autograd.grad(y.sum(), x)
    (ge,) = torch.autograd.grad(torch64(x, torch.zeros(3, device=dev), torch.ones(3, device=dev), None, None,
                                        False, 0.1, 1e-5, slope).sum(), x)
    torch.testing.assert_close(gx, ge)
    x = torch.randn(8, 3, device=dev)
    w, b = torch.rand(6, device=dev)[::2], torch.rand(1, device=dev).expand(3)
    y = f(x, None, None, w, b, True, 0.1, 1e-5)
    assert_close(y, torch64(x.double(), None, None, w.double(), b.double(), True, 0.1, 1e-5, slope), torch.float32)


@pytest.mark.gpu
def test_gpu_cuda_opcheck_and_gradcheck():
    if "cuda" not in _cuda_backends():
        pytest.skip("cuda backend not built")
    x = torch.randn(8, 5, 3, device="cuda", dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, device="cuda", dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(5, device="cuda", dtype=torch.float64), torch.ones(5, device="cuda", dtype=torch.float64)
    torch.library.opcheck(torch.ops.gankern.batch_norm_relu.default, (x, rm, rv, w, None, True, 0.1, 1e-5))
    f = lambda x, w: gankern.batch_norm_relu(x, rm.clone(), rv.clone(), w, None, True, backend="cuda")  # noqa
    assert torch.autograd.gradcheck(f, (x, w))


# ----------------------------------------------------------------------------- issue 12: edge cases, one contract
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import gankern.nn as gnn  # noqa: E402


def run_isolated(code, timeout=300):
    """Runs code in a fresh interpreter (same TRITON_INTERPRET): a crash (SIGFPE, SIGSEGV) is a failed
    test, not a dead test run.  Returns the completed process."""
    import os
    env = dict(os.environ)
    pre = "import os, torch, gankern, torch.nn.functional as F\n"
    return subprocess.run([sys.executable, "-c", pre + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_channels(backend):
    """C = 0 (was SIGFPE on cpp: 32 / C, i0 % C; ZeroDivisionError on Triton): an empty output like torch,
    empty gradients and running stats, in train and eval, for every layout."""
    p = run_isolated(f"""
        for slope in (0.0, 0.2):
            for shape in [(2, 0), (2, 0, 3), (2, 0, 3, 3), (0, 0, 2)]:
                for training in (True, False):
                    for affine in (False, True):
                        x = torch.randn(shape, requires_grad=True)
                        w = torch.randn(0, requires_grad=True) if affine else None
                        b = torch.randn(0, requires_grad=True) if affine else None
                        rm, rv = torch.zeros(0), torch.ones(0)
                        y = gankern.batch_norm_leaky_relu(x, rm, rv, w, b, training, 0.1, 1e-5, slope,
                                                          backend={backend!r})
                        assert y.shape == x.shape, y.shape
                        if not affine:
                            ye = F.batch_norm(x, rm.clone(), rv.clone(), None, None, training)
                            assert ye.shape == y.shape
                        leaves = [t for t in (x, w, b) if t is not None]
                        gs = torch.autograd.grad(y, leaves, torch.randn_like(y))
                        assert [g.shape for g in gs] == [t.shape for t in leaves]
            m = gnn_cls = gankern.nn.BatchNormLeakyReLU2d(0, negative_slope=slope, backend={backend!r})
            assert m(torch.randn(2, 0, 4, 4)).shape == (2, 0, 4, 4)
            m = gankern.nn.BatchNormReLU2d(0, backend={backend!r})
            assert m(torch.randn(2, 0, 4, 4)).shape == (2, 0, 4, 4)
        print("ok")
    """)
    assert p.returncode == 0 and "ok" in p.stdout, f"rc={p.returncode}\n{p.stdout}\n{p.stderr[-3000:]}"


@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape,fmt", [((0, 3), "contig"), ((0, 3, 4), "contig"), ((2, 3, 0), "contig"),
                                       ((0, 3, 2, 2), "contig"), ((0, 3, 2, 2), "cl")])
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_like_torch(backend, shape, fmt, training, slope):
    """N * spatial = 0: torch leaves the running stats unchanged (training) and gives zero weight / bias
    gradients (was: NaN running stats and NaN weight.grad on cpp, a ValueError on Triton)."""
    x = torch.randn(shape)
    if fmt == "cl":
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(3), torch.randn(3)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    grad = torch.randn(shape)
    y, rm1, rv1, dx, dw, db = run(op(backend, slope), x, w, b, rm, rv, training, 0.1, 1e-5, grad)
    ref = lambda *a: torch64(*a, slope=slope)  # noqa: E731
    ye, rme, rve, dxe, dwe, dbe = run(ref, x, w, b, rm, rv, training, 0.1, 1e-5, grad, torch.float64)
    assert y.shape == ye.shape and dx.shape == dxe.shape
    assert torch.equal(rm1, rm) and torch.equal(rv1, rv), "running stats changed on an empty batch"
    assert torch.equal(rme.float(), rm) and torch.equal(rve.float(), rv)
    assert torch.equal(dw, torch.zeros(3)) and torch.equal(db, torch.zeros(3)), (dw, db)
    assert torch.equal(dwe, torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch_module_keeps_stats(backend):
    m = gnn.BatchNormLeakyReLU1d(4, backend=backend)
    m.running_mean.uniform_()
    rm = m.running_mean.clone()
    m(torch.randn(0, 4)).sum().backward()
    assert torch.equal(m.running_mean, rm) and torch.isfinite(m.running_var).all()
    assert torch.equal(m.weight.grad, torch.zeros(4)) and torch.equal(m.bias.grad, torch.zeros(4))


@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape,fmt", [((6, 3), "contig"), ((4, 3, 5), "contig"), ((2, 3, 3, 4), "cl")])
def test_eval_backward_nonfinite_like_torch(backend, shape, fmt, slope):
    """Evaluation at +-inf / NaN inputs: the input gradient is g * weight * invstd (finite where torch's is);
    was NaN from (x - mean) * 0 in the folded formula on cpp and Triton."""
    x = torch.randn(shape)
    flat = x.view(-1)
    flat[0], flat[4], flat[7] = float("inf"), -float("inf"), float("nan")
    if fmt == "cl":
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(3), torch.randn(3)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    grad = torch.randn(shape)
    y, _, _, dx, dw, db = run(op(backend, slope), x, w, b, rm, rv, False, 0.1, 1e-5, grad)
    ref = lambda *a: torch64(*a, slope=slope)  # noqa: E731
    ye, _, _, dxe, dwe, dbe = run(ref, x, w, b, rm, rv, False, 0.1, 1e-5, grad, torch.float64)
    assert_close(y, ye, torch.float32)
    assert_close(dx, dxe, torch.float32, name="grad_input")
    assert_close(dw, dwe, torch.float32, scale=4, name="grad_weight")
    assert_close(db, dbe, torch.float32, scale=4, name="grad_bias")


@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
@pytest.mark.parametrize("scale", [1e30, 1e-30, 3e36])
def test_extreme_magnitudes_finite_like_torch(backend, scale, slope):
    """Data of magnitude 1e30 (squared deviations beyond float32) gave NaN on Triton; torch fp32 is finite.
    Output and input gradient within the fp32 tolerance of the float64 result, relative to its largest value:
    stricter than torch's own fp32 kernel, whose input gradient at 1e30 is off by 100% (its coefficient
    -w invstd^3 sgd / M underflows fp32; the dx here is ~1e-30, well inside the fp32 range)."""
    x = torch.randn(64, 4, 3) * scale
    w, b = torch.randn(4), torch.randn(4)
    g = torch.randn(64, 4, 3)
    for training in (True, False):
        rm, rv = torch.zeros(4), torch.full((4,), scale * scale if scale * scale < 1e38 else 1e38)
        y, rm1, rv1, dx, dw, db = run(op(backend, slope), x, w, b, rm, rv, training, 0.1, 1e-5, g)
        ref = lambda *a: torch64(*a, slope=slope)  # noqa: E731
        yt, rmt, rvt, dxt, _, _ = run(ref, x, w, b, rm, rv, training, 0.1, 1e-5, g)  # torch fp32
        ye, rme, rve, dxe, dwe, dbe = run(ref, x, w, b, rm, rv, training, 0.1, 1e-5, g, torch.float64)
        for name, a, t in (("output", y, yt), ("grad_input", dx, dxt), ("running_mean", rm1, rmt)):
            assert torch.isfinite(a).eq(torch.isfinite(t)).all(), f"{name}: finiteness differs from torch fp32"
        assert_close_magnitude(y, ye, torch.float32, name=f"output (training={training})")
        assert_close_magnitude(dx, dxe, torch.float32, name=f"grad_input (training={training})")


def _strided(kind, C, lo=0.0):
    """A 1-D tensor of C values with unusual strides (a view of a fresh buffer)."""
    if kind == "step":
        return (torch.rand(2 * C) + lo)[::2]
    if kind == "expanded":
        return (torch.rand(1) + lo).expand(C)
    if kind == "offset":
        return (torch.rand(C + 3) + lo)[3:]
    raise ValueError(kind)


@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["step", "expanded", "offset"])
@pytest.mark.parametrize("training", [True, False])
def test_param_strides(backend, kind, training, slope):
    """weight / bias / running stats with steps, zero strides, offsets (Triton read weight[c] as ptr + c:
    torch.rand(6)[::2] gave 0.41 relative error)."""
    C = 5
    x = torch.randn(7, C, 3, requires_grad=True)
    w, b = _strided(kind, C, 0.5).requires_grad_(), _strided(kind, C).requires_grad_()
    rm, rv = _strided("step" if kind == "expanded" else kind, C), _strided("step" if kind == "expanded" else kind, C, 0.5)
    d = dict(dtype=torch.float64)
    x64, w64, b64 = [t.detach().to(**d).requires_grad_() for t in (x, w, b)]
    rme, rve = rm.to(**d), rv.to(**d)
    grad = torch.randn(7, C, 3)
    y = op(backend, slope)(x, rm, rv, w, b, training, 0.1, 1e-5)
    gs = torch.autograd.grad(y, (x, w, b), grad)
    ye = torch64(x64, rme, rve, w64, b64, training, 0.1, 1e-5, slope)
    ge = torch.autograd.grad(ye, (x64, w64, b64), grad.double())
    assert_close(y, ye, torch.float32)
    assert_close(rm, rme, torch.float32, name="running_mean")
    assert_close(rv, rve, torch.float32, name="running_var")
    for name, a, e in zip(("grad_input", "grad_weight", "grad_bias"), gs, ge):
        assert_close(a, e, torch.float32, scale=8, name=name)


@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["expanded", "transposed", "sliced", "cl_sliced", "broadcast0"])
def test_input_strides(backend, kind, slope):
    """Inputs with any strides torch accepts: made contiguous first (or read in place), same numbers."""
    if kind == "expanded":
        x = torch.randn(1, 4, 5).expand(6, 4, 5)
    elif kind == "transposed":
        x = torch.randn(5, 4, 6).transpose(0, 2)
    elif kind == "sliced":
        x = torch.randn(9, 8, 4, 6)[::2, 1::2, :, ::3]
    elif kind == "cl_sliced":
        x = torch.randn(6, 4, 5, 7).to(memory_format=torch.channels_last)[:, :, 1:, ::2]
    else:
        x = torch.randn(4, 1).expand(4, 3)  # zero stride in C
    C = x.shape[1]
    w, b = torch.randn(C), torch.randn(C)
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    grad = torch.randn(x.shape).expand(x.shape) if kind != "broadcast0" else torch.randn(4, 1).expand(4, 3)
    for training in (True, False):
        y, rm1, rv1, dx, dw, db = run(op(backend, slope), x, w, b, rm, rv, training, 0.1, 1e-5, grad,
                                      keep_strides=True)
        ref = lambda *a: torch64(*a, slope=slope)  # noqa: E731
        ye, rme, rve, dxe, dwe, dbe = run(ref, x, w, b, rm, rv, training, 0.1, 1e-5, grad, torch.float64)
        if kind != "broadcast0" or not training:  # (broadcast0: constant channels, var 0 -> kinks everywhere)
            assert_close(y, ye, torch.float32)
            assert_close(dx, dxe, torch.float32, scale=4, name="grad_input")
        assert_close(rm1, rme, torch.float32, name="running_mean")
        assert_close(rv1, rve, torch.float32, name="running_var")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_non_tensor_argument_same_error_everywhere(backend, name):
    """A Python list as a tensor argument: the C++ path's RuntimeError (the dispatcher's message) on every
    backend (Triton raised AttributeError)."""
    args = dict(running_mean=torch.zeros(2), running_var=torch.ones(2), weight=None, bias=None)
    args[name] = [1.0, 2.0]
    with pytest.raises(RuntimeError) as ei:
        gankern.batch_norm_relu(torch.randn(4, 2), args["running_mean"], args["running_var"], args["weight"],
                                args["bias"], True, backend=backend)
    first = str(ei.value).splitlines()[0]
    assert first == (f"gankern::batch_norm_relu() Expected a value of type 'Optional[Tensor]' for argument '{name}' "
                     "but instead found type 'list'."), first


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("slope", [-0.1, -1e-30, float("nan"), float("inf")])
def test_bad_negative_slope(backend, slope):
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="negative_slope must be a finite float >= 0"):
        gankern.batch_norm_leaky_relu(x, None, None, None, None, True, negative_slope=slope, backend=backend)
    with pytest.raises(ValueError, match="negative_slope"):
        gnn.BatchNormLeakyReLU1d(3, negative_slope=slope, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_params_on_meta_or_wrong_dtype_named(backend, training):
    """Every tensor argument's device and dtype is checked with its name, on every backend (meta included)."""
    x = torch.randn(4, 3)
    base = dict(running_mean=torch.zeros(3), running_var=torch.ones(3), weight=torch.ones(3), bias=torch.zeros(3))
    for name in base:
        for bad, what in ((torch.ones(3, device="meta"), "device"), (torch.ones(3, dtype=torch.float64), "dtype")):
            a = dict(base)
            a[name] = bad
            with pytest.raises(RuntimeError, match=f"{name} must (be on the input's device|have the input's dtype)"):
                gankern.batch_norm_leaky_relu(x, a["running_mean"], a["running_var"], a["weight"], a["bias"],
                                              training, backend=backend)


@pytest.mark.parametrize("overload", OVERLOADS)
def test_fake_tensors_checked(overload):
    """Under fake tensors (torch.compile) the public op checks dtype, device and values as on real ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    op = getattr(torch.ops.gankern.batch_norm_relu, overload)
    with FakeTensorMode():
        x = torch.empty(4, 3)
        w64 = torch.empty(3, dtype=torch.float64)
        with pytest.raises(RuntimeError, match="weight must have the input's dtype"):
            op(x, None, None, w64, None, True, 0.1, 1e-5, 0.2)
        with pytest.raises(RuntimeError, match="bias must have the input's dtype"):
            op(x, None, None, None, w64, True, 0.1, 1e-5, 0.2)
        with pytest.raises(ValueError, match="negative_slope"):
            op(x, None, None, None, None, True, 0.1, 1e-5, -1.0)


@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_one_value_per_channel_training(backend, shape, slope):
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        op(backend, slope)(torch.randn(shape), None, None, None, None, True, 0.1, 1e-5)
    # eval with one value is fine (as torch)
    y = op(backend, slope)(torch.randn(shape), torch.zeros(3), torch.ones(3), None, None, False, 0.1, 1e-5)
    assert y.shape == shape


@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 1), (2, 1, 1), (1, 1, 2), (2, 5, 1, 1), (1, 2, 1, 3)])
def test_one_element_dims(backend, shape, slope):
    for training in (True, False):
        check_against_torch(backend, shape, "contig", torch.float32, training, slope=slope)


# ----------------------------------------------------------------------------- BatchNorm + LeakyReLU specifics
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_leaky_slope_zero_is_relu(backend):
    """negative_slope=0 is exactly the ReLU op (-inf -> 0, as torch.relu; leaky_relu(-inf, 0) would be NaN)."""
    x = torch.randn(8, 3)
    x[0, 0] = -float("inf")
    rm, rv = torch.zeros(3), torch.ones(3)
    a = gankern.batch_norm_leaky_relu(x, rm, rv, None, None, False, negative_slope=0.0, backend=backend)
    b = gankern.batch_norm_relu(x, rm, rv, None, None, False, backend=backend)
    assert torch.equal(a, b) and a[0, 0] == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_leaky_default_slope(backend):
    x = torch.randn(8, 3) - 5
    y = gankern.batch_norm_leaky_relu(x, torch.zeros(3), torch.ones(3), backend=backend)
    ye = F.leaky_relu(F.batch_norm(x.double(), torch.zeros(3).double(), torch.ones(3).double()), 0.2)
    assert_close(y, ye, torch.float32)


LEAKY_MODULES = [(gnn.BatchNormLeakyReLU1d, torch.nn.BatchNorm1d, (16, 6)),
                 (gnn.BatchNormLeakyReLU1d, torch.nn.BatchNorm1d, (8, 6, 5)),
                 (gnn.BatchNormLeakyReLU2d, torch.nn.BatchNorm2d, (4, 6, 3, 5))]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls,tcls,shape", LEAKY_MODULES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_leaky_modules_match_torch(backend, cls, tcls, shape, momentum):
    """Same parameters / buffers / init / state_dict as nn.BatchNorm*d, eps positional (the GAN collection's
    BatchNorm1d(out, 0.8)), train and eval, outputs, gradients and running stats vs BatchNorm -> LeakyReLU."""
    C = shape[1]
    m = cls(C, 0.8, momentum, negative_slope=0.2, backend=backend)
    t = tcls(C, 0.8, momentum)
    assert m.eps == 0.8 and m.momentum == momentum and m.negative_slope == 0.2
    assert [k for k in m.state_dict()] == [k for k in t.state_dict()]
    for k, v in t.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    with torch.no_grad():
        t.weight.uniform_(0.5, 1.5)
        t.bias.uniform_(-0.5, 0.5)
    m.load_state_dict(t.state_dict(), strict=True)
    t_act = torch.nn.Sequential(t, torch.nn.LeakyReLU(0.2))
    for training in (True, False, True):
        m.train(training)
        t_act.train(training)
        x = (torch.randn(shape) * 2 + 1).requires_grad_()
        y, ye = m(x), t_act(x)
        assert_close(y, ye.double(), torch.float32)
        g = torch.randn(shape)
        gm = torch.autograd.grad(y, (x, m.weight, m.bias), g)
        gt = torch.autograd.grad(ye, (x, t.weight, t.bias), g)
        for a, e in zip(gm, gt):
            assert_close(a, e.double(), torch.float32, scale=4)
        for k in ("running_mean", "running_var", "num_batches_tracked"):
            assert_close(getattr(m, k).double(), getattr(t, k).double(), torch.float32, name=k)
    t2 = tcls(C, 0.8, momentum)
    t2.load_state_dict(m.state_dict(), strict=True)
    assert "negative_slope=0.2" in repr(m) and "0.8" in repr(m)


def test_leaky_module_defaults_and_compile():
    m = gnn.BatchNormLeakyReLU2d(5)
    assert m.negative_slope == 0.2 and m.eps == 1e-5 and m.momentum == 0.1
    m1 = gnn.BatchNormLeakyReLU1d(5, 1e-3, 0.3, True, True, 0.1)
    assert (m1.eps, m1.momentum, m1.negative_slope) == (1e-3, 0.3, 0.1)
    torch._dynamo.reset()
    x = torch.randn(4, 5, 3, 3, requires_grad=True)
    ref = gnn.BatchNormLeakyReLU2d(5)
    ref.load_state_dict(m.state_dict())
    y = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    ye = ref(x)
    torch.testing.assert_close(y, ye)
    torch.testing.assert_close(m.running_mean, ref.running_mean)


def test_batchnorm_modules_bias_false_and_torch_without_bias_kwarg(monkeypatch):
    """torch 2.11's _NormBase has no ``bias`` keyword (issue 11): the modules must not pass one there."""
    import gankern.nn as mod
    m = gnn.BatchNormReLU1d(4, bias=False)
    assert m.bias is None and m.weight is not None
    monkeypatch.setattr(mod, "_NORMBASE_HAS_BIAS", False)
    real = mod._NormBase.__init__

    def init_211(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None,
                 dtype=None):  # torch 2.11's signature
        real(self, num_features, eps, momentum, affine, track_running_stats, device, dtype)

    monkeypatch.setattr(mod._NormBase, "__init__", init_211)
    for cls in (gnn.BatchNormReLU1d, gnn.BatchNormLeakyReLU2d):
        m = cls(4)
        assert [k for k in m.state_dict()] == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
        m = cls(4, bias=False)
        assert m.bias is None and "bias" not in m.state_dict()
        m.reset_parameters()
        x = torch.randn(3, 4) if cls is gnn.BatchNormReLU1d else torch.randn(3, 4, 2, 2)
        assert m(x).shape == x.shape
