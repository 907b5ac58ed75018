"""On a CUDA device (skipped elsewhere; tools/gpu_check.sh runs these): every op x GPU backend x dtype
against PyTorch in float64 on the device, outputs poisoned first (conftest), forward and every
gradient; and a whole GAN training step with gankern ops captured in a CUDA graph and replayed
(which fails if any op synchronises with the host or allocates outside the graph's pool)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import gankern
from conftest import GPU_BACKENDS
from tolerances import assert_close, sqrt_scale

pytestmark = pytest.mark.gpu
LOW = [torch.float32, torch.float16, torch.bfloat16]


def _need(backend):
    info = gankern.backends()[backend]
    if not info["available"]:
        pytest.skip(f"backend {backend} unavailable: {info['reason']}")


def _grads(out, inputs, g):
    return torch.autograd.grad(out, [t for t in inputs if t is not None and t.requires_grad], g)


def _leaf(t, dtype):
    return t.detach().to(dtype).requires_grad_(True)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", LOW + [torch.float64])
@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (7, 13), (127, 1000)])
def test_linear_leaky_relu_vs_fp64(backend, dtype, shape):
    _need(backend)
    M, K = shape
    N = 33
    x64 = torch.randn(M, K, device="cuda", dtype=torch.float64)
    w64 = torch.randn(N, K, device="cuda", dtype=torch.float64) / max(K, 1) ** 0.5
    b64 = torch.randn(N, device="cuda", dtype=torch.float64)
    x, w, b = (_leaf(t, dtype) for t in (x64, w64, b64))
    y = gankern.linear_leaky_relu(x, w, b, 0.2, backend=backend)
    ref_in = [_leaf(t, torch.float64) for t in (x, w, b)]
    y64 = F.leaky_relu(F.linear(*ref_in), 0.2)
    scale = sqrt_scale(K)
    assert_close(y, y64, dtype, scale=scale)
    g = torch.randn_like(y64)
    for a, e, name in zip(_grads(y, [x, w, b], g.to(dtype)), _grads(y64, ref_in, g), ("dx", "dw", "db")):
        assert_close(a, e, dtype, scale=sqrt_scale(max(M, K, N)), name=name)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape,fmt", [((1000, 7), None), ((2, 127), None), ((16, 5, 3, 3), None),
                                       ((16, 5, 3, 3), torch.channels_last), ((3, 64, 8, 8), torch.channels_last)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("slope", [0.0, 0.2])
def test_batch_norm_relu_vs_fp64(backend, dtype, shape, fmt, training, slope):
    _need(backend)
    C = shape[1]
    x64 = torch.randn(*shape, device="cuda", dtype=torch.float64) * 3 + 1
    if fmt is not None:
        x64 = x64.contiguous(memory_format=fmt)
    w64 = torch.rand(C, device="cuda", dtype=torch.float64) + 0.5
    b64 = torch.randn(C, device="cuda", dtype=torch.float64)
    rm, rv = torch.randn(C, device="cuda"), torch.rand(C, device="cuda") + 0.5
    rm64, rv64 = rm.double(), rv.double()
    x = _leaf(x64, dtype)
    if fmt is not None:
        x = x.detach().contiguous(memory_format=fmt).requires_grad_(True)
    w, b = _leaf(w64, torch.float32), _leaf(b64, torch.float32)
    y = gankern.batch_norm_leaky_relu(x, rm, rv, w, b, training=training, momentum=0.1, eps=1e-5,
                                      negative_slope=slope, backend=backend)
    ref_in = [_leaf(t, torch.float64) for t in (x, w, b)]
    y64 = F.leaky_relu(F.batch_norm(ref_in[0], rm64, rv64, ref_in[1], ref_in[2], training, 0.1, 1e-5), slope)
    assert y.dtype == dtype
    if fmt is not None:
        assert y.is_contiguous(memory_format=fmt)
    assert_close(y, y64, dtype, scale=4)
    assert_close(rm, rm64, torch.float32, name="running_mean")
    assert_close(rv, rv64, torch.float32, scale=sqrt_scale(x.numel() // C), name="running_var")
    g = torch.randn_like(y64)
    for a, e, name in zip(_grads(y, [x, w, b], g.to(dtype)), _grads(y64, ref_in, g), ("dx", "dw", "db")):
        assert_close(a, e, dtype if name == "dx" else torch.float32,
                     scale=4 * sqrt_scale(x.numel() // C), name=name)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape,fmt", [((0, 3, 4, 4), None), ((1, 1, 1, 1), None), ((7, 13, 5, 3), None),
                                       ((4, 127, 8, 8), torch.channels_last), ((1000, 33), None)])
@pytest.mark.parametrize("slope", [0.0, 0.2])
def test_bias_leaky_relu_vs_fp64(backend, dtype, shape, fmt, slope):
    _need(backend)
    x64 = torch.randn(*shape, device="cuda", dtype=torch.float64)
    if fmt is not None:
        x64 = x64.contiguous(memory_format=fmt)
    b64 = torch.randn(shape[1], device="cuda", dtype=torch.float64)
    x = x64.to(dtype).requires_grad_(True)
    b = b64.to(dtype).requires_grad_(True)
    y = gankern.bias_leaky_relu(x, b, slope, backend=backend)
    if fmt is not None:
        assert y.is_contiguous(memory_format=fmt)
    ref_in = [_leaf(t, torch.float64) for t in (x, b)]
    view = (1, -1) + (1,) * (x.dim() - 2)
    y64 = F.leaky_relu(ref_in[0] + ref_in[1].view(view), slope)
    assert_close(y, y64, dtype)
    g = torch.randn_like(y64)
    for a, e, name in zip(_grads(y, [x, b], g.to(dtype)), _grads(y64, ref_in, g), ("dx", "db")):
        assert_close(a, e, dtype, scale=sqrt_scale(x.numel() // max(shape[1], 1)), name=name)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", LOW + [torch.float64])
@pytest.mark.parametrize("n", [0, 1, 7, 1000, 1 << 20])
@pytest.mark.parametrize("variant", ["float_target", "tensor_target", "weights"])
def test_bce_with_logits_vs_fp64(backend, dtype, n, variant):
    _need(backend)
    x64 = torch.randn(n, 3, device="cuda", dtype=torch.float64) * 4
    x = _leaf(x64, dtype)
    kw, kw64 = {}, {}
    if variant == "float_target":
        target, target64 = 0.9, torch.full_like(x64, 0.9)
    else:
        target64 = torch.rand(n, 3, device="cuda", dtype=torch.float64)
        target = target64.to(dtype)
        target64 = target.double()
    if variant == "weights":
        w = torch.rand(3, device="cuda", dtype=dtype)
        pw = torch.rand(3, device="cuda", dtype=dtype) + 0.5
        kw, kw64 = dict(weight=w, pos_weight=pw), dict(weight=w.double(), pos_weight=pw.double())
    for reduction in ("mean", "sum", "none"):
        y = gankern.bce_with_logits(x, target, reduction=reduction, backend=backend, **kw)
        x_ref = _leaf(x, torch.float64)
        y64 = F.binary_cross_entropy_with_logits(x_ref, target64, reduction=reduction, **kw64)
        assert_close(y, y64, dtype, scale=sqrt_scale(x.numel()) if reduction != "none" else 1.0)
        if n == 0 and reduction == "mean":
            continue  # nan loss, nothing to differentiate
        g = torch.randn_like(y64)
        (gx,) = torch.autograd.grad(y, x, g.to(y.dtype))
        (gx64,) = torch.autograd.grad(y64, x_ref, g)
        assert_close(gx, gx64, dtype, name="dx")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("model", ["mlp", "dcgan"])
def test_training_step_cuda_graph_replay_matches_eager(backend, model):
    """A full D+G step (forward, backward, Adam) with gankern ops, captured in a CUDA graph: replays give
    the same losses and parameters as running the same step eagerly (same inputs, same start)."""
    _need(backend)
    from gankern.models import make_models

    torch.manual_seed(0)
    shape = (28, 28) if model == "mlp" else (32, 32)
    G, D = make_models(model, shape, 16, fused=True, backend=backend)
    G, D = G.cuda(), D.cuda()
    B = 16
    z = torch.randn(B, 16, device="cuda")
    real = torch.rand(B, shape[0] * shape[1], device="cuda")

    def build(G, D):
        kw = dict(lr=1e-3, betas=(0.5, 0.999), fused=True, capturable=True)
        opt_g, opt_d = torch.optim.Adam(G.parameters(), **kw), torch.optim.Adam(D.parameters(), **kw)

        def step():
            fake = G(z)
            logits = D(torch.cat([real, fake.detach()]))
            loss_d = gankern.bce_with_logits(logits[:B], 0.9, backend=backend) + \
                gankern.bce_with_logits(logits[B:], 0.0, backend=backend)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            loss_g = gankern.bce_with_logits(D(fake), 1.0, backend=backend)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            return torch.stack([loss_d.detach(), loss_g.detach()])
        return step

    G2, D2 = copy.deepcopy(G), copy.deepcopy(D)
    eager_step, graph_step = build(G, D), build(G2, D2)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            eager_step()
            graph_step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_losses = graph_step()
    eager_step()   # the captured call ran no kernels: keep the eager copy in step with the replays
    graph.replay()
    for _ in range(4):
        eager_losses = eager_step()
        graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(static_losses).all()
    assert_close(static_losses, eager_losses.double(), torch.float32, scale=10, name="losses")
    for (n, p), p2 in zip(list(G.named_parameters()) + list(D.named_parameters()),
                          list(G2.parameters()) + list(D2.parameters())):
        assert_close(p2, p.double(), torch.float32, scale=10, name=n)
