"""gankern.bce_with_logits on every backend available here, against torch in float64."""
import pytest
import torch
import torch.nn.functional as F

import gankern
from gankern import _backends
from conftest import CPU_BACKENDS, HAS_EXT
from tolerances import assert_close, sqrt_scale

REDUCTIONS = ["none", "mean", "sum"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1,), (7, 1), (127,), (1000, 1)]
# (target kind, weight kind, pos_weight kind)
VARIANTS = [("float", None, None), ("tensor", "full", None), ("tensor", "row", "row"), ("float", "scalar", "scalar")]
HAS_TRITON = "triton" in CPU_BACKENDS


def _make_weight(kind, shape, dtype):
    if kind is None:
        return None
    if kind == "full":
        return torch.rand(shape, dtype=dtype) + 0.5
    if kind == "row":  # broadcast along the leading dims
        return torch.rand(shape[-1:], dtype=dtype) * 3
    return torch.rand((), dtype=dtype) * 3  # scalar


def _inputs(shape, dtype, variant, scale=3.0):
    tk, wk, pk = variant
    x = (torch.randn(shape) * scale).to(dtype)
    target = 0.9 if tk == "float" else torch.rand(shape).to(dtype)
    return x, target, _make_weight(wk, shape, dtype), _make_weight(pk, shape, torch.float32)


def _expected(x, target, weight, pos_weight, reduction, grad_out):
    """torch in float64 from the same (rounded) inputs: (loss, d/dx, d/dtarget or None)."""
    x64 = x.detach().double().requires_grad_()
    t64 = target.detach().double().requires_grad_() if isinstance(target, torch.Tensor) else \
        torch.full_like(x64, target)
    w64 = weight.double() if weight is not None else None
    p64 = pos_weight.double() if pos_weight is not None else None
    out = F.binary_cross_entropy_with_logits(x64, t64, weight=w64, pos_weight=p64, reduction=reduction)
    if isinstance(target, torch.Tensor):
        gx, gt = torch.autograd.grad(out, (x64, t64), grad_out.double())
    else:
        (gx,), gt = torch.autograd.grad(out, (x64,), grad_out.double()), None
    return out.detach(), gx, gt


def _run_and_check(backend, x, target, weight, pos_weight, reduction, dtype, grad_scale=1.0):
    """Loss and every gradient (input, and target when it is a tensor) vs torch in float64."""
    x = x.detach().requires_grad_()
    if isinstance(target, torch.Tensor):
        target = target.detach().requires_grad_()
    out = gankern.bce_with_logits(x, target, weight, reduction, pos_weight, backend=backend)
    assert out.dtype == x.dtype
    grad_out = torch.randn(out.shape).to(dtype) * grad_scale
    ins = (x, target) if isinstance(target, torch.Tensor) else (x,)
    grads = torch.autograd.grad(out, ins, grad_out)
    e_out, e_gx, e_gt = _expected(x, target, weight, pos_weight, reduction, grad_out)
    e_out = torch.where(e_out.to(dtype).isinf(), e_out.to(dtype).double(), e_out)  # fp16 sums overflow as in torch
    n = x.numel()
    # The reference is torch itself, which rounds every fp16/bf16 intermediate ((1 - t) * x - ls
    # cancels): it needs wider tolerances than the fused kernels (float32 inside).
    k = 6.0 if backend == "reference" and dtype != torch.float32 else 1.0
    assert_close(out, e_out, dtype, scale=k * (sqrt_scale(n) if reduction != "none" else 1.0), name="loss")
    assert_close(grads[0], e_gx, dtype, scale=k, name="grad_input")
    if e_gt is not None:
        assert_close(grads[1], e_gt, dtype, scale=k, name="grad_target")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_forward_backward_vs_fp64(backend, dtype, shape, reduction, variant):
    x, target, weight, pos_weight = _inputs(shape, dtype, variant)
    _run_and_check(backend, x, target, weight, pos_weight, reduction, dtype)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large(backend, reduction, dtype):
    # cpp: 2^20 (parallel path, many chunks); triton interpreter: 20000 (> one chunk -> partials + sum kernel)
    n = (1 << 20) if backend == "cpp" else 20000
    x, target, weight, pos_weight = _inputs((n,), dtype, ("tensor", "full", "scalar"))
    _run_and_check(backend, x, target, weight, pos_weight, reduction, dtype)
    x, target, weight, pos_weight = _inputs((n // 4, 4), dtype, ("float", None, "row"))
    _run_and_check(backend, x, target, weight, pos_weight, reduction, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_non_contiguous(backend, reduction):
    base = torch.randn(33, 20) * 3
    x = base[:, ::2]                       # strided
    t = torch.rand(10, 33).t()             # transposed
    w = torch.rand(33, 1) + 0.5            # broadcast along dim 1
    pw = (torch.rand(20) * 3)[::2]         # strided, broadcast along dim 0
    assert not x.is_contiguous() and not t.is_contiguous()
    _run_and_check(backend, x, t, w, pw, reduction, torch.float32)
    # grad_out non-contiguous / expanded (reduction none)
    if reduction == "none":
        xr = x.detach().requires_grad_()
        out = gankern.bce_with_logits(xr, t, reduction="none", backend=backend)
        g = torch.randn(10).expand(33, 10)
        (gx,) = torch.autograd.grad(out, xr, g)
        _, e_gx, _ = _expected(x, t, None, None, "none", g)
        assert_close(gx, e_gx, torch.float32, name="grad_input")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("target", [0.0, 1.0, 0.9, 0.1])
def test_float_target_gan_shape(backend, target):
    x = torch.randn(64, 1) * 4
    _run_and_check(backend, x, target, None, None, "mean", torch.float32)


def _gradcheck_backends():
    return [b for b in CPU_BACKENDS if b != "triton"]  # triton: no float64 kernels


@pytest.mark.parametrize("backend", _gradcheck_backends())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("variant", [("tensor", None, None), ("tensor", "full", "row"), ("float", "scalar", "scalar")],
                         ids=lambda v: "-".join(map(str, v)))
def test_gradcheck_gradgradcheck_fp64(backend, reduction, variant):
    x, target, weight, pos_weight = _inputs((5, 3), torch.float64, variant, scale=2.0)
    x.requires_grad_()
    if pos_weight is not None:
        pos_weight = pos_weight.double()
    if isinstance(target, torch.Tensor):
        target = (target * 0.8 + 0.1).requires_grad_()
        fn = lambda a, b: gankern.bce_with_logits(a, b, weight, reduction, pos_weight, backend=backend)  # noqa: E731
        args = (x, target)
    else:
        fn = lambda a: gankern.bce_with_logits(a, target, weight, reduction, pos_weight, backend=backend)  # noqa: E731
        args = (x,)
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_fp32_vs_fp64(backend, reduction):
    # create_graph=True on every backend (triton included, in fp32): d/dx <grad_x, v>
    x = torch.randn(37, 2) * 2
    t = torch.rand(37, 2)
    pw = torch.rand(2) * 3
    v = torch.randn(37, 2)
    res = []
    for dt, b in ((torch.float32, backend), (torch.float64, "reference")):
        xx = x.to(dt).requires_grad_()
        tt = t.to(dt).requires_grad_()
        out = gankern.bce_with_logits(xx, tt, None, reduction, pw.to(dt), backend=b)
        go = torch.ones_like(out)
        gx, gt = torch.autograd.grad(out, (xx, tt), go, create_graph=True)
        h = torch.autograd.grad((gx * v.to(dt)).sum() + (gt * v.to(dt)).sum(), (xx, tt))
        res.append((gx, gt) + h)
    for a, e, name in zip(res[0], res[1], ["gx", "gt", "hx", "ht"]):
        assert_close(a, e, torch.float32, name=name)


def test_weight_requires_grad_is_rejected_as_in_torch():
    x = torch.randn(4, 3, requires_grad=True)
    t = torch.rand(4, 3)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        F.binary_cross_entropy_with_logits(x, t, weight=torch.rand(3, requires_grad=True))
    for b in CPU_BACKENDS:
        with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
            gankern.bce_with_logits(x, t, torch.rand(3, requires_grad=True), backend=b)
        with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'pos_weight'"):
            gankern.bce_with_logits(x, t, pos_weight=torch.rand(3, requires_grad=True), backend=b)
        with torch.no_grad():  # no graph: allowed, as in torch
            gankern.bce_with_logits(x, t, torch.rand(3, requires_grad=True), backend=b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_as_torch(backend, dtype):
    inf, nan = float("inf"), float("nan")
    xs = torch.tensor([inf, -inf, nan, 100.0, -100.0, 30.0, -30.0, 0.0] * 2)
    ts = torch.tensor([0.0, 1.0, 0.5, 1.0, 0.0, 1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    for pw in (None, torch.tensor(2.0)):
        for red in REDUCTIONS:
            x = xs.to(dtype).requires_grad_()
            t = ts.to(dtype).requires_grad_()
            out = gankern.bce_with_logits(x, t, None, red, pw, backend=backend)
            gx, gt = torch.autograd.grad(out, (x, t), torch.ones_like(out))
            e_out, e_gx, e_gt = _expected(x, t, None, pw, red, torch.ones_like(out))
            assert_close(out, e_out, dtype, name=f"loss pw={pw} {red}")
            assert_close(gx, e_gx, dtype, name=f"grad_input pw={pw} {red}")
            assert_close(gt, e_gt, dtype, name=f"grad_target pw={pw} {red}")


# The logits of the dense sweep below: every exp / log1p / sigmoid regime (|x| small, exp(-|x|)
# below FLT_MIN for |x| > 87.3365, denormal up to 103.9, 0 beyond), and the extremes.
_SWEEP_EXTREMES = [float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, 1.2e-38,
                   -1.2e-38, 1e-30, -1e-30, 1e30, -1e30, 87.3365, -87.3365, 87.3366, -87.3366, 88.8, -88.8, 103.9,
                   -103.9, 104.5, -104.5]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("target_kind", ["float", "tensor"])
@pytest.mark.parametrize("with_pw", [False, True], ids=["no_pw", "pw"])
def test_dense_sweep_fp32_vs_fp64(backend, target_kind, with_pw):
    # 400k logits in [-100, 100] (step 5e-4) + the extremes; not a multiple of any vector width,
    # above the C++ kernel's parallel threshold.
    x = torch.cat([torch.linspace(-100.0, 100.0, 400_001), torch.tensor(_SWEEP_EXTREMES)])
    pos_weight = torch.rand(x.shape) * 3 if with_pw else None
    targets = [0.0, 1.0, 0.9] if target_kind == "float" else [torch.rand(x.shape)]
    for target in targets:
        _run_and_check(backend, x, target, None, pos_weight, "none", torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_input(backend):
    x = torch.randn(0, 3, requires_grad=True)
    t = torch.rand(0, 3)
    m = gankern.bce_with_logits(x, t, backend=backend)
    assert m.shape == () and torch.isnan(m)
    s = gankern.bce_with_logits(x, t, reduction="sum", backend=backend)
    assert s.shape == () and s.item() == 0.0
    n = gankern.bce_with_logits(x, 1.0, reduction="none", backend=backend)
    assert n.shape == (0, 3)
    (g,) = torch.autograd.grad(m, x)
    assert g.shape == (0, 3)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
def test_deterministic(backend):
    n = (1 << 20) + 123 if backend == "cpp" else 30000
    x = torch.randn(n) * 3
    t = torch.rand(n)
    outs = []
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2, 2):
            torch.set_num_threads(nt)
            outs.append([gankern.bce_with_logits(x, t, reduction=r, backend=backend) for r in ("mean", "sum")])
    finally:
        torch.set_num_threads(threads)
    for o in outs[1:]:
        for a, b in zip(o, outs[0]):
            assert torch.equal(a, b), "reduction differs between runs / thread counts"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_input_errors(backend):
    x = torch.randn(4, 3)
    t = torch.rand(4, 3)
    bce = gankern.bce_with_logits
    with pytest.raises(ValueError, match="Target size"):
        bce(x, torch.rand(4, 2), backend=backend)
    with pytest.raises(ValueError, match="reduction"):
        bce(x, t, reduction="avg", backend=backend)
    with pytest.raises(TypeError, match="target"):
        bce(x, "1", backend=backend)
    with pytest.raises((RuntimeError, NotImplementedError), match="input|Long"):
        bce(x.long(), t.long(), backend=backend)
    with pytest.raises(RuntimeError, match="weight"):
        bce(x, t, torch.rand(5), backend=backend)
    with pytest.raises(RuntimeError, match="pos_weight"):
        bce(x, t, pos_weight=torch.rand(2, 4, 3), backend=backend)
    # gankern is stricter than torch's promotion here, on every backend (reference included): a clear error
    with pytest.raises(RuntimeError, match="target must have the input's dtype"):
        bce(x, t.double(), backend=backend)
    with pytest.raises(RuntimeError, match="weight must be a floating-point"):
        bce(x, t, torch.ones(3, dtype=torch.long), backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_device_error_message(backend):
    # No second device here: a meta target / weight (the C++ checks, on every backend that has them)
    if backend == "reference" and not HAS_EXT:
        pytest.skip("the reference backend runs the C++ checks (gankern._C not built)")
    with pytest.raises(RuntimeError, match="target must be on the input's device"):
        gankern.bce_with_logits(torch.randn(3), torch.rand(3, device="meta"), backend=backend)
    with pytest.raises(RuntimeError, match="weight must be on the input's device"):
        gankern.bce_with_logits(torch.randn(3), 1.0, torch.rand(3, device="meta"), backend=backend)


OVERLOADS = (["default"] if HAS_EXT else []) + (["triton"] if HAS_TRITON else [])


@pytest.mark.parametrize("overload", OVERLOADS)
@pytest.mark.parametrize("target_kind", ["float", "tensor"])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(overload, target_kind, reduction):
    """The public op and its internal ops, overload ``default`` (C++ kernels) or ``triton`` (Triton kernels)."""
    x = torch.randn(6, 3, requires_grad=True)
    t = torch.rand(6, 3, requires_grad=True) if target_kind == "tensor" else None
    args = (x, t, 0.9, torch.rand(3), torch.rand(1) * 2, reduction)
    torch.library.opcheck(getattr(torch.ops.gankern.bce_with_logits, overload), args)
    torch.library.opcheck(getattr(torch.ops.gankern._bce_with_logits_fwd, overload), tuple(
        a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    go = torch.randn(6, 3) if reduction == 0 else torch.randn(())
    torch.library.opcheck(getattr(torch.ops.gankern._bce_with_logits_bwd, overload),
                          (go, x.detach(), None if t is None else t.detach(), 0.9, None, torch.rand(3), reduction,
                           t is not None))


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
@pytest.mark.parametrize("target_kind", ["float", "tensor"])
def test_torch_compile_fullgraph(backend, target_kind):
    torch._dynamo.reset()

    def step(x, t, w):
        loss = gankern.bce_with_logits(x, t, w, "mean", None, backend=backend)
        return loss * 2

    x = torch.randn(64, 1)
    t = 1.0 if target_kind == "float" else torch.rand(64, 1)
    w = torch.rand(64, 1)
    cstep = torch.compile(step, fullgraph=True, backend="aot_eager")
    xe = x.clone().requires_grad_()
    xc = x.clone().requires_grad_()
    le = step(xe, t, w)
    lc = cstep(xc, t, w)
    le.backward()
    lc.backward()
    assert_close(lc, le.double(), torch.float32, name="loss")
    assert_close(xc.grad, xe.grad.double(), torch.float32, name="grad")


@pytest.mark.needs_ext
def test_torch_compile_inductor_cpp():
    torch._dynamo.reset()
    f = torch.compile(lambda x: gankern.bce_with_logits(torch.relu(x) * 2, 1.0, backend="cpp"), fullgraph=True)
    x = torch.randn(128, 1, requires_grad=True)
    out = f(x)
    out.backward()
    x2 = x.detach().double().requires_grad_()
    e = F.binary_cross_entropy_with_logits(torch.relu(x2) * 2, torch.ones_like(x2))
    e.backward()
    assert_close(out, e.detach(), torch.float32)
    assert_close(x.grad, x2.grad, torch.float32)


def test_outputs_are_poisoned_in_tests():
    assert _backends.POISON


# ------------------------------------------------------------------ GPU (skip here; run on CUDA machines)
GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 127, 1000, 1 << 20])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_gpu_forward_backward_vs_fp64(backend, dtype, n, reduction, variant):
    x, target, weight, pos_weight = _inputs((n, 1), dtype, variant)
    to = lambda a: a.cuda() if isinstance(a, torch.Tensor) else a  # noqa: E731
    x, target, weight, pos_weight = map(to, (x, target, weight, pos_weight))
    xr = x.detach().requires_grad_()
    tr = target.detach().requires_grad_() if isinstance(target, torch.Tensor) else target
    out = gankern.bce_with_logits(xr, tr, weight, reduction, pos_weight, backend=backend)
    g = torch.randn(out.shape, device="cuda").to(dtype)
    ins = (xr, tr) if isinstance(tr, torch.Tensor) else (xr,)
    grads = torch.autograd.grad(out, ins, g)
    e_out, e_gx, e_gt = _expected(x, target, weight, pos_weight, reduction, g)
    assert_close(out, e_out, dtype, scale=sqrt_scale(n) if reduction != "none" else 1.0)
    assert_close(grads[0], e_gx, dtype, name="grad_input")
    if e_gt is not None:
        assert_close(grads[1], e_gt, dtype, name="grad_target")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_deterministic(backend):
    x = torch.randn((1 << 22) + 5, device="cuda")
    a = gankern.bce_with_logits(x, 1.0, reduction="sum", backend=backend)
    b = gankern.bce_with_logits(x, 1.0, reduction="sum", backend=backend)
    assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_gradcheck_cuda_fp64():
    x = torch.randn(5, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    t = torch.rand(5, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    pw = torch.rand(3, dtype=torch.float64, device="cuda")
    fn = lambda a, b: gankern.bce_with_logits(a, b, None, "mean", pw, backend="cuda")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, t))
    assert torch.autograd.gradgradcheck(fn, (x, t))


@pytest.mark.gpu
def test_gpu_opcheck_cuda():
    x = torch.randn(6, 3, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.gankern.bce_with_logits.default, (x, None, 1.0, None, None, 1))


# ---------------- issue 12 regressions ----------------
BCE_SAME_ERROR_BAD = [
    lambda: dict(weight=torch.ones(3, device="meta")),
    lambda: dict(pos_weight=torch.ones(3, device="meta")),
    lambda: dict(target=torch.ones(4, 3, device="meta")),
    lambda: dict(weight=[1.0, 2.0, 3.0]),
    lambda: dict(pos_weight=[1.0, 2.0, 3.0]),
    lambda: dict(target=torch.ones(4, 3, dtype=torch.long)),
    lambda: dict(weight=torch.ones(3, dtype=torch.long)),
    lambda: dict(weight=torch.ones(5)),
    lambda: dict(target=torch.ones(4, 2)),
    lambda: dict(target="1"),
    lambda: dict(reduction="avg"),
    lambda: dict(input=torch.ones(4, 3, dtype=torch.long)),
]


@pytest.mark.parametrize("i", range(len(BCE_SAME_ERROR_BAD)))
def test_bad_input_same_error_every_backend(i):
    """Tensors on another device (meta), Python lists, wrong dtypes/shapes: the same exception type and message
    on every backend (before: uninitialised memory for meta, AttributeError on triton for lists)."""
    seen = {}
    for be in CPU_BACKENDS:
        kw = dict(input=torch.randn(4, 3), target=1.0)
        kw.update(BCE_SAME_ERROR_BAD[i]())
        with pytest.raises(Exception) as e:
            gankern.bce_with_logits(kw.pop("input"), kw.pop("target"), **kw, backend=be)
        assert isinstance(e.value, (TypeError, RuntimeError, ValueError)), repr(e.value)
        seen[be] = (type(e.value), str(e.value))
    assert len(set(seen.values())) == 1, seen


@pytest.mark.parametrize("overload", OVERLOADS)
@pytest.mark.parametrize("arg", ["target", "weight", "pos_weight"])
def test_other_device_public_op_and_fake_tensors(overload, arg):
    """The public op checks devices before it runs an internal op (the dispatcher would pick the meta kernel
    of the internal op, its fake), on real and on fake tensors; the fakes themselves only compute shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    op = getattr(torch.ops.gankern.bce_with_logits, overload)
    x = torch.randn(4, 3)
    args = dict(target=None, weight=None, pos_weight=None)
    args[arg] = torch.ones(4, 3, device="meta")
    call = lambda x: op(x, args["target"], 0.5, args["weight"], args["pos_weight"], 1)  # noqa: E731
    with pytest.raises(RuntimeError, match=f"{arg} must be on the input's device"):
        call(x)
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(RuntimeError, match=f"{arg} must be on the input's device"):
            call(torch.empty(4, 3))
