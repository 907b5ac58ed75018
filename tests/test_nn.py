"""gankern.nn modules vs the torch modules they replace (expected values from torch in float64)."""
import copy
import inspect
import math
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gankern
import gankern.nn as gnn
from conftest import CPU_BACKENDS, HAS_EXT
from tolerances import assert_close, sqrt_scale

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _shapes(backend, big, small):
    return small if backend == "triton" else big


def _noncontig(x):
    """Same values, non-contiguous layout."""
    y = torch.empty(x.shape + (2,), dtype=x.dtype).select(-1, 0)
    y.copy_(x)
    assert not y.is_contiguous() or x.numel() <= 1
    return y


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def _mag(t):
    """Tolerance scale for values of magnitude > 1 (a rounding of the output is relative to its size)."""
    t = t.detach().double()
    t = t[torch.isfinite(t)]
    return max(1.0, t.abs().max().item() / 4) if t.numel() else 1.0


def _act_factor(y, slope):
    """d act / d pre-activation as chosen by the actual output y (y > 0 <=> pre > 0 for these activations)."""
    return torch.where(y.detach() > 0, 1.0, slope).double()


def _check_linear_grads(m, ref, x, x64, dtype):
    """Gradients of a gankern linear module (input, weight, bias) vs its float64 nn.Linear twin."""
    K, out_features = m.in_features, m.out_features
    N = x.numel() // K
    assert_close(x.grad, x64.grad, dtype, scale=sqrt_scale(out_features) * _mag(x64.grad), name="grad_input")
    assert_close(m.weight.grad, ref.weight.grad, dtype, scale=sqrt_scale(N) * _mag(ref.weight.grad),
                 name="grad_weight")
    if m.bias is not None:
        assert_close(m.bias.grad, ref.bias.grad, dtype, scale=sqrt_scale(N) * _mag(ref.bias.grad), name="grad_bias")


# ---------------------------------------------------------------- LinearLeakyReLU
LIN_BIG = [((1, 7), 5), ((127, 33), 17), ((3, 5, 64), 1000), ((64, 1000), 127)]
LIN_SMALL = [((1, 7), 5), ((5, 3, 9), 6)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(4))
def test_linear_leaky_relu_matches_torch(backend, dtype, case):
    shapes = _shapes(backend, LIN_BIG, LIN_SMALL)
    if case >= len(shapes):
        pytest.skip("fewer shapes for this backend")
    in_shape, out_features = shapes[case]
    K = in_shape[-1]
    bias = case != 1
    slope = [0.2, 0.01, 0.0, 1.7][case]
    m = gnn.LinearLeakyReLU(K, out_features, bias=bias, negative_slope=slope, dtype=dtype, backend=backend)
    ref = nn.Linear(K, out_features, bias=bias, dtype=torch.float64)
    ref.load_state_dict(m.state_dict())  # float64 copy of the same (rounded) values
    x = torch.randn(in_shape, dtype=dtype)
    if case == 3:
        x = _noncontig(x)
    if case == 0:
        x[0, 0] = float("nan")
    x = x.requires_grad_(True)
    x64 = _leaf(x.double())
    y = m(x)
    z64 = ref(x64)
    y64 = F.leaky_relu(z64, slope)
    assert y.dtype == dtype
    s = sqrt_scale(K)
    assert_close(y, y64, dtype, scale=s)
    g = torch.randn_like(y)
    y.backward(g)
    # Expected gradients in fp64, through the activation branch the kernel's own output took
    # (pre-activations within rounding of 0 may legitimately land on the other side).
    (z64 * _act_factor(y, slope)).backward(g.double())
    _check_linear_grads(m, ref, x, x64, dtype)


def _same_init_as_nn_linear(cls, seed):
    """cls(7, 5) and nn.Linear(7, 5) from the same seed: same init, parameters and state_dict keys."""
    torch.manual_seed(seed)
    t = nn.Linear(7, 5)
    torch.manual_seed(seed)
    m = cls(7, 5)
    assert torch.equal(t.weight, m.weight) and torch.equal(t.bias, m.bias)
    assert list(m.state_dict()) == list(t.state_dict()) == ["weight", "bias"]
    assert [n for n, _ in m.named_parameters()] == ["weight", "bias"]
    return t, m


def test_linear_leaky_relu_module_api():
    t, m = _same_init_as_nn_linear(gnn.LinearLeakyReLU, 3)
    assert repr(m) == "LinearLeakyReLU(in_features=7, out_features=5, bias=True, negative_slope=0.2)"
    assert "backend='cpp'" in repr(gnn.LinearLeakyReLU(2, 3, backend="cpp"))
    assert gnn.LinearLeakyReLU(2, 3, bias=False).bias is None
    m.reset_parameters()
    assert not torch.equal(t.weight, m.weight)
    # dtype / device conversion
    m64 = copy.deepcopy(m).double()
    assert m64.weight.dtype == torch.float64 and m.weight.dtype == torch.float32
    assert m.to(torch.bfloat16).weight.dtype == torch.bfloat16
    meta = gnn.LinearLeakyReLU(3, 4, device="meta")
    assert meta.weight.device.type == "meta"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_shape,out_features,bias", [((7, 5), 3, True), ((2, 64, 300), 600, False),
                                                        ((128, 1024), 784, True)])
def test_linear_matches_nn_linear(backend, dtype, in_shape, out_features, bias):
    """gankern.nn.Linear == nn.Linear (fp64) for output and every gradient (in fp32 on the cpp backend the
    middle shape takes MKL with concurrent backward GEMMs, the last one oneDNN)."""
    if backend == "triton" and math.prod(in_shape) * out_features > 1 << 20:
        pytest.skip("too large for the Triton interpreter")
    K = in_shape[-1]
    m = gnn.Linear(K, out_features, bias=bias, dtype=dtype, backend=backend)
    ref = nn.Linear(K, out_features, bias=bias, dtype=torch.float64)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(in_shape, dtype=dtype, requires_grad=True)
    x64 = _leaf(x.double())
    y, y64 = m(x), ref(x64)
    assert y.dtype == dtype
    assert_close(y, y64, dtype, scale=sqrt_scale(K))
    g = torch.randn_like(y)
    y.backward(g)
    y64.backward(g.double())
    _check_linear_grads(m, ref, x, x64, dtype)


def test_linear_module_api():
    t, m = _same_init_as_nn_linear(gnn.Linear, 5)
    assert m.negative_slope == 1.0
    assert repr(m) == "Linear(in_features=7, out_features=5, bias=True)"
    assert gnn.Linear(2, 3, bias=False).bias is None
    t.load_state_dict(gnn.Linear(7, 5).state_dict(), strict=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_leaky_relu_bad_input(backend):
    m = gnn.LinearLeakyReLU(7, 5, backend=backend)
    t = nn.Linear(7, 5)
    x = torch.randn(3, 6)
    with pytest.raises(RuntimeError):
        t(x)
    with pytest.raises(RuntimeError):
        m(x)


def test_modules_pass_backend(monkeypatch):
    seen = []

    def spy(name, real):
        def f(*args, backend=None, **kw):
            seen.append((name, backend))
            return real(*args, backend=backend, **kw)
        return f

    monkeypatch.setattr(gnn, "_linear_leaky_relu", spy("lin", gnn._linear_leaky_relu))
    monkeypatch.setattr(gnn, "_batch_norm_relu", spy("bn", gnn._batch_norm_relu))
    monkeypatch.setattr(gnn, "_bce_with_logits", spy("bce", gnn._bce_with_logits))
    gnn.LinearLeakyReLU(3, 4, backend="reference")(torch.randn(2, 3))
    gnn.BatchNormReLU1d(3, backend="reference")(torch.randn(4, 3))
    gnn.BCEWithLogitsLoss(backend="reference")(torch.randn(4), 1.0)
    gnn.LinearLeakyReLU(3, 4)(torch.randn(2, 3))
    assert seen == [("lin", "reference"), ("bn", "reference"), ("bce", "reference"), ("lin", None)]


# ---------------------------------------------------------------- BatchNormReLU
BN_CONFIGS = [  # (cls, torch cls, shape, momentum, affine, track)
    (gnn.BatchNormReLU1d, nn.BatchNorm1d, (7, 5), 0.1, True, True),
    (gnn.BatchNormReLU1d, nn.BatchNorm1d, (6, 4, 9), None, True, True),
    (gnn.BatchNormReLU1d, nn.BatchNorm1d, (127, 33), 0.3, False, True),
    (gnn.BatchNormReLU2d, nn.BatchNorm2d, (4, 3, 5, 7), 0.1, True, True),
    (gnn.BatchNormReLU2d, nn.BatchNorm2d, (2, 6, 8, 8), None, True, False),
    (gnn.BatchNormReLU2d, nn.BatchNorm2d, (16, 1000, 1, 2), 0.1, True, True),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", range(len(BN_CONFIGS)))
def test_batch_norm_relu_matches_torch(backend, dtype, cfg):
    cls, tcls, shape, momentum, affine, track = BN_CONFIGS[cfg]
    if backend == "triton" and cfg in (2, 5):
        pytest.skip("big shape: Triton interpreter is slow")
    C = shape[1]
    m = cls(C, momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype, backend=backend)
    ref = tcls(C, momentum=momentum, affine=affine, track_running_stats=track, dtype=torch.float64)
    if affine:
        with torch.no_grad():
            m.weight.copy_(torch.rand(C) + 0.5)
            m.bias.copy_(torch.randn(C))
    ref.load_state_dict(m.state_dict())
    n_red = torch.Size(shape).numel() // C
    s = sqrt_scale(n_red)
    for step in range(3):
        training = step < 2
        m.train(training)
        ref.train(training)
        x = torch.randn(shape, dtype=dtype) * 2 + 0.5
        if step == 1:
            x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else _noncontig(x)
        x = x.requires_grad_(True)
        x64 = _leaf(x.double())
        y = m(x)
        z64 = ref(x64)
        y64 = F.relu(z64)
        assert y.dtype == dtype
        assert_close(y, y64, dtype, scale=s, name=f"output step {step}")
        g = torch.randn_like(y)
        y.backward(g)
        (z64 * _act_factor(y, 0.0)).backward(g.double())  # relu branch taken by the kernel's output
        assert_close(x.grad, x64.grad, dtype, scale=s, name=f"grad_input step {step}")
        if affine:
            assert_close(m.weight.grad, ref.weight.grad, dtype, scale=s * 4, name="grad_weight")
            assert_close(m.bias.grad, ref.bias.grad, dtype, scale=s * 4, name="grad_bias")
            m.weight.grad = m.bias.grad = ref.weight.grad = ref.bias.grad = None
        if track:
            assert_close(m.running_mean, ref.running_mean, dtype, scale=s, name="running_mean")
            assert_close(m.running_var, ref.running_var, dtype, scale=s, name="running_var")
            assert torch.equal(m.num_batches_tracked, ref.num_batches_tracked)
        else:
            assert m.running_mean is None and m.num_batches_tracked is None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("slope", [0.0, 0.2])
def test_batch_norm_act_reduced_input_float32_module(backend, dtype, slope):
    """autocast's case: fp16/bf16 activations into a float32 BatchNorm module.  The op takes them as they are
    (no float32 copy of the input, no cast back): output and input gradient in the input's dtype, parameter
    gradients and running stats float32, as torch's nn.BatchNorm2d gives; all against float64 torch."""
    C, shape = 6, (8, 6, 5, 3)
    m = gnn.BatchNormReLU2d(C, backend=backend) if slope == 0.0 else \
        gnn.BatchNormLeakyReLU2d(C, negative_slope=slope, backend=backend)
    ref = nn.BatchNorm2d(C, dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(torch.rand(C) + 0.5)
        m.bias.copy_(torch.randn(C))
    ref.load_state_dict(m.state_dict())
    s = sqrt_scale(torch.Size(shape).numel() // C)
    for training in (True, False):
        m.train(training), ref.train(training)
        x = (torch.randn(shape) * 2 + 0.5).to(dtype).requires_grad_(True)
        x64 = _leaf(x.double())
        y, z64 = m(x), ref(x64)
        tb = nn.BatchNorm2d(C)(x.detach())   # torch's own mixed-precision BatchNorm: the dtype to give
        assert y.dtype == tb.dtype == dtype and "ToCopy" not in y.grad_fn.name(), y.grad_fn.name()
        assert_close(y, F.leaky_relu(z64, slope), dtype, scale=s, name=f"output (training={training})")
        g = torch.randn_like(y)
        y.backward(g)
        (z64 * _act_factor(y, slope)).backward(g.double())
        assert x.grad.dtype == dtype and m.weight.grad.dtype == m.bias.grad.dtype == torch.float32
        assert_close(x.grad, x64.grad, dtype, scale=s, name="grad_input")
        assert_close(m.weight.grad, ref.weight.grad, dtype, scale=s * 4, name="grad_weight")
        assert_close(m.bias.grad, ref.bias.grad, dtype, scale=s * 4, name="grad_bias")
        m.weight.grad = m.bias.grad = ref.weight.grad = ref.bias.grad = None
        assert m.running_mean.dtype == m.running_var.dtype == torch.float32
        assert_close(m.running_mean, ref.running_mean, dtype, scale=s, name="running_mean")
        assert_close(m.running_var, ref.running_var, dtype, scale=s, name="running_var")


def test_batch_norm_relu_module_api():
    for cls, tcls in ((gnn.BatchNormReLU1d, nn.BatchNorm1d), (gnn.BatchNormReLU2d, nn.BatchNorm2d)):
        kws = [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False)]
        if "bias" in inspect.signature(tcls.__init__).parameters:  # torch >= 2.12 (2.11 has no bias=)
            kws.append(dict(eps=1e-3, bias=False))
        for kw in kws:
            m, t = cls(5, **kw), tcls(5, **kw)
            assert repr(m) == repr(t).replace(tcls.__name__, cls.__name__)
            assert list(m.state_dict()) == list(t.state_dict())
            assert [n for n, _ in m.named_parameters()] == [n for n, _ in t.named_parameters()]
            assert [n for n, _ in m.named_buffers()] == [n for n, _ in t.named_buffers()]
            for k, v in t.state_dict().items():
                assert torch.equal(m.state_dict()[k], v), k
            # round trips with strict=True, incl. the state_dict version metadata
            sd = m.state_dict()
            assert sd._metadata[""]["version"] == t.state_dict()._metadata[""]["version"]
            t.load_state_dict(sd, strict=True)
            m.load_state_dict(t.state_dict(), strict=True)
        assert "backend='cpp'" in repr(cls(3, backend="cpp"))
    # an old (version 1) checkpoint without num_batches_tracked loads, as into torch's module
    t = nn.BatchNorm1d(4)
    sd = t.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    gnn.BatchNormReLU1d(4).load_state_dict(sd, strict=True)
    # not a _BatchNorm (convert_sync_batchnorm and friends must not treat it as plain BN)
    assert not isinstance(gnn.BatchNormReLU2d(3), nn.modules.batchnorm._BatchNorm)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batch_norm_relu_bad_input(backend):
    m2 = gnn.BatchNormReLU2d(3, backend=backend)
    for shape in ((6,), (2, 3, 4), (2, 3, 4, 4, 1)):
        with pytest.raises(ValueError, match="expected 4D input"):
            m2(torch.randn(shape))
    m1 = gnn.BatchNormReLU1d(3, backend=backend)
    for shape in ((6,), (2, 3, 4, 4)):
        with pytest.raises(ValueError, match="expected 2D or 3D input"):
            m1(torch.randn(shape))
    # a single value per channel when training: torch's ValueError
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m1(torch.randn(1, 3))
    with pytest.raises(RuntimeError):
        nn.BatchNorm1d(3)(torch.randn(4, 5))
    with pytest.raises(RuntimeError):
        m1(torch.randn(4, 5))
    m1.eval()
    assert m1(torch.randn(1, 3)).shape == (1, 3)  # fine in eval mode, as in torch


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_modules_fp64(backend):
    lin = gnn.LinearLeakyReLU(4, 3, dtype=torch.float64, backend=backend)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, w, b: gankern.linear_leaky_relu(x, w, b, 0.2, backend=backend),
                             (x, lin.weight, lin.bias))
    if backend == "triton":  # the Triton BatchNorm kernels are fp32/fp16/bf16 only: fp64 is a clear error
        with pytest.raises(RuntimeError, match="float64"):
            gnn.BatchNormReLU2d(3, dtype=torch.float64, backend=backend)(torch.randn(4, 3, 2, 2, dtype=torch.float64))
        return
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return gankern.batch_norm_relu(x, None, None, w, b, True, 0.1, 1e-5, backend=backend)
    torch.autograd.gradcheck(f, (x, w, b))
    # and through the module itself (train mode)
    torch.autograd.gradcheck(lambda x: gnn.BatchNormReLU2d(3, dtype=torch.float64, backend=backend)(x), (x,))


# ---------------------------------------------------------------- BCEWithLogitsLoss
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_loss_matches_torch(backend, dtype, reduction):
    shape = (7, 5) if backend == "triton" else (127, 33)
    C = shape[1]
    for variant in ("plain", "weighted", "float_target"):
        weight = torch.rand(C, dtype=dtype) if variant == "weighted" else None
        pos_weight = torch.rand(C, dtype=dtype) * 3 if variant == "weighted" else None
        m = gnn.BCEWithLogitsLoss(weight=weight, reduction=reduction, pos_weight=pos_weight, backend=backend)
        t = nn.BCEWithLogitsLoss(weight=None if weight is None else weight.double(), reduction=reduction,
                                 pos_weight=None if pos_weight is None else pos_weight.double())
        x = (torch.randn(shape, dtype=dtype) * 4)
        if variant == "plain":
            x[0, 0], x[0, 1] = float("inf"), -float("inf")
            x = _noncontig(x)
        x = x.requires_grad_(True)
        x64 = _leaf(x.double())
        if variant == "float_target":
            target, target64 = 1.0, torch.ones(shape, dtype=torch.float64)
        else:
            target = torch.rand(shape, dtype=dtype)
            target64 = target.double()
        y = m(x, target)
        y64 = t(x64, target64)
        s = sqrt_scale(x.numel()) if reduction == "sum" else 1.0
        if variant == "weighted" and dtype != torch.float32:
            s *= 2.5  # weight * pos_weight * loss: each product rounded to 16 bits by torch's (reference) path
        # elementwise error of a 16-bit loss follows |input| (x - x*t cancels): scale by both magnitudes
        assert_close(y, y64, dtype, scale=s * max(_mag(y64), _mag(x64)), name=f"loss {variant}")
        g = torch.randn_like(y)
        y.backward(g)
        y64.backward(g.double())
        assert_close(x.grad, x64.grad, dtype, scale=_mag(x64.grad) * (s if variant == "weighted" else 1),
                     name=f"grad_input {variant}")


def test_bce_loss_module_api():
    w, pw = torch.rand(3), torch.rand(3)
    m, t = gnn.BCEWithLogitsLoss(w, pos_weight=pw), nn.BCEWithLogitsLoss(w, pos_weight=pw)
    assert list(m.state_dict()) == list(t.state_dict()) == ["weight", "pos_weight"]
    m.load_state_dict(t.state_dict(), strict=True)
    t.load_state_dict(m.state_dict(), strict=True)
    assert repr(gnn.BCEWithLogitsLoss()) == "BCEWithLogitsLoss()"
    assert gnn.BCEWithLogitsLoss(reduction="sum").reduction == "sum"
    assert gnn.BCEWithLogitsLoss(size_average=False).reduction == "sum"  # torch's legacy arguments
    assert gnn.BCEWithLogitsLoss().to(torch.float64).weight is None


# ---------------------------------------------------------------- composition
def _models(backend):
    torch.manual_seed(0)
    fused = nn.Sequential(gnn.LinearLeakyReLU(6, 8, backend=backend), nn.Linear(8, 5),
                          gnn.BatchNormReLU1d(5, backend=backend))
    plain = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 5), nn.BatchNorm1d(5))
    plain.load_state_dict(fused.state_dict(), strict=True)
    return fused, plain


def test_autocast_bf16_cpu():
    fused, plain = _models("cpp" if HAS_EXT else "reference")
    x = torch.randn(9, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = fused[0](x)
        assert h.dtype == torch.bfloat16  # like nn.Linear under autocast
        h2 = fused[1](h)
        y = fused[2](h2)
        th = F.leaky_relu(plain[0](x), 0.2)
        ty = F.relu(plain[2](plain[1](th)))
        loss = gnn.BCEWithLogitsLoss()(y, 1.0)
    assert y.dtype == ty.dtype == torch.bfloat16
    assert loss.dtype == torch.float32  # like F.binary_cross_entropy_with_logits under autocast
    assert fused[2].running_mean.dtype == torch.float32
    assert_close(h, th.double(), torch.bfloat16)
    assert_close(y, ty.double(), torch.bfloat16, scale=2)
    assert_close(fused[2].running_mean, plain[2].running_mean.double(), torch.bfloat16)
    assert_close(fused[2].running_var, plain[2].running_var.double(), torch.bfloat16)
    loss.backward()
    assert fused[0].weight.grad.dtype == torch.float32


def test_deepcopy_save_load_weights_only():
    fused, plain = _models(None)
    c = copy.deepcopy(fused)
    assert c[0].weight is not fused[0].weight and torch.equal(c[0].weight, fused[0].weight)
    assert c[0].backend is None and isinstance(c[2], gnn.BatchNormReLU1d)
    buf = io.BytesIO()
    torch.save(fused.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    plain.load_state_dict(sd, strict=True)
    buf = io.BytesIO()
    torch.save(plain.state_dict(), buf)
    buf.seek(0)
    c.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    x = torch.randn(4, 6)
    fused.eval(), c.eval()
    torch.testing.assert_close(fused(x), c(x))


def test_compile_fullgraph_modules():
    fused, plain = _models(None)
    loss = gnn.BCEWithLogitsLoss()

    def step(x):
        return loss(fused(x), 0.0)
    x = torch.randn(8, 6)
    expected = step(x)
    expected.backward()
    grads = [p.grad.clone() for p in fused.parameters()]
    fused.zero_grad()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    got.backward()
    torch.testing.assert_close(got, expected)
    for p, g in zip(fused.parameters(), grads):
        torch.testing.assert_close(p.grad, g)
