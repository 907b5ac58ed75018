"""Training steps of the MLP GAN and the DCGAN (batch 128, z_dim 64, 28x28 = 784-pixel images, CPU, 2 threads),
in fp32 and in bf16 mixed precision, side by side in one run.

impl "gankern:cpp"  fused modules (gankern.nn, backend cpp) + the tuned loop of gankern.gan.step; bf16: the
                    trainer's --precision bf16 (autocast, each weight cast once per step)
impl "tutorial"     the tutorial's plain loop: unfused torch.nn layers, generator run twice per step
                    (a fresh z for the G step), D not frozen in the G step, separate D(real)/D(fake)
                    forwards, label tensors built every step, default Adam; bf16: forwards under torch.autocast
impl "eager"        a well-tuned plain-PyTorch loop: unfused layers, the same tuned loop as gankern
                    (fake batch reused, one D forward on cat(real, fake), D frozen in the G step, fused Adam);
                    bf16: the forwards under torch.autocast(bfloat16) (torch's own casts, per forward)
impl "floor"        the MLP step's GEMMs alone (torch.mm into preallocated outputs), fp32 and bf16
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import gankern
from gankern.gan.models import make_models
from gankern.gan.config import TrainConfig
from gankern.gan.step import make_optimizers, make_train_step

from conftest import record

B, Z, PIX = 128, 64, 784
G_DIMS = (Z, 128, 256, 512, 1024, PIX)
D_DIMS = (PIX, 512, 256, 128, 1)
PASSES, SHAPE = "D+G step (fwd+bwd+adam)", f"B{B} z{Z} {PIX}px"
CFG = TrainConfig(batch_size=B, z_dim=Z, lr=2e-4, beta1=0.5, beta2=0.999)
DEV = torch.device("cpu")
MODELS = ["mlp", "dcgan"]
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _op(model):
    return f"gan_train_step[{model}]"


def _batches():
    g = torch.Generator().manual_seed(0)
    return [torch.rand(B, PIX, generator=g) for _ in range(4)]


def _models(model, fused, backend=None):
    torch.manual_seed(0)
    return make_models(model, (28, 28), Z, fused=fused, backend=backend)


def _run(benchmark, step, batches):
    it = [0]

    def one():
        it[0] += 1
        step(batches[it[0] % len(batches)])
    for _ in range(3):  # warm-up (allocator, fused Adam state)
        one()
    benchmark(one)


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("model", MODELS)
def test_train_step_gankern(benchmark, model, precision):
    if not gankern.backends()["cpp"]["available"]:
        pytest.skip(f"backend cpp unavailable: {gankern.backends()['cpp']['reason']}")
    G, D = _models(model, True, backend="cpp")
    opt_g, opt_d = make_optimizers(G, D, CFG, DEV)
    step = make_train_step(G, D, opt_g, opt_d, z_dim=Z, batch_size=B, device=DEV, fused=True, backend="cpp",
                           precision=precision)
    record(benchmark, op=_op(model), impl="gankern:cpp", shape=SHAPE, dtype=PRECISIONS[precision], passes=PASSES)
    _run(benchmark, step, _batches())


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("model", MODELS)
def test_train_step_eager_tuned(benchmark, model, precision):
    G, D = _models(model, False)
    opt_g, opt_d = make_optimizers(G, D, CFG, DEV)
    step = make_train_step(G, D, opt_g, opt_d, z_dim=Z, batch_size=B, device=DEV, fused=False,
                           precision=precision, cache_casts=False)
    record(benchmark, op=_op(model), impl="eager", shape=SHAPE, dtype=PRECISIONS[precision], passes=PASSES)
    _run(benchmark, step, _batches())


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("model", MODELS)
def test_train_step_tutorial(benchmark, model, precision):
    G, D = _models(model, False)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    criterion = torch.nn.BCEWithLogitsLoss()
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def step(real):
        ones, zeros = torch.ones(B, 1), torch.zeros(B, 1)
        # D step
        opt_d.zero_grad()
        with amp():
            fake = G(torch.randn(B, Z))
            loss_d = criterion(D(real), ones) + criterion(D(fake.detach()), zeros)
        loss_d.backward()
        opt_d.step()
        # G step: a new generator forward, D's weight grads computed and thrown away
        opt_g.zero_grad()
        with amp():
            fake = G(torch.randn(B, Z))
            loss_g = criterion(D(fake), ones)
        loss_g.backward()
        opt_g.step()
        return loss_d, loss_g
    record(benchmark, op=_op(model), impl="tutorial", shape=SHAPE, dtype=PRECISIONS[precision], passes=PASSES)
    _run(benchmark, step, _batches())


def _tuned_step_gemms():
    """(M, K, N) of every GEMM in the tuned step: out[M, N] = a[M, K] @ b[K, N]."""
    g = list(zip(G_DIMS[:-1], G_DIMS[1:]))
    d = list(zip(D_DIMS[:-1], D_DIMS[1:]))
    mm = []
    mm += [(B, i, o) for i, o in g]                                  # G forward
    mm += [(2 * B, i, o) for i, o in d]                              # D forward on cat(real, fake)
    mm += [(o, 2 * B, i) for i, o in d]                              # D step: weight grads
    mm += [(2 * B, o, i) for k, (i, o) in enumerate(d) if k > 0]     # D step: input grads (not of the images)
    mm += [(B, i, o) for i, o in d]                                  # G step: D forward on the fake batch
    mm += [(B, o, i) for i, o in d]                                  # G step: input grads through frozen D
    mm += [(o, B, i) for i, o in g]                                  # G step: G weight grads
    mm += [(B, o, i) for k, (i, o) in enumerate(g) if k > 0]         # G step: G input grads
    return mm


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_train_step_floor(benchmark, precision):
    dt = PRECISIONS[precision]
    ops = [(torch.rand(m, k).to(dt), torch.rand(k, n).to(dt), torch.empty(m, n, dtype=dt))
           for m, k, n in _tuned_step_gemms()]

    def gemms(_):
        for a, b, c in ops:
            torch.mm(a, b, out=c)
    record(benchmark, op=_op("mlp"), impl="floor", shape=SHAPE, dtype=dt, passes=PASSES)
    _run(benchmark, gemms, [None])


def test_gemm_list_matches_step_flops():
    # sanity: the floor's GEMMs are 3 passes over G's weights and 2x(2B)+... over D's -- count FLOPs by hand
    fl = sum(2 * m * k * n for m, k, n in _tuned_step_gemms())
    wg = sum(i * o for i, o in zip(G_DIMS[:-1], G_DIMS[1:]))
    wd = sum(i * o for i, o in zip(D_DIMS[:-1], D_DIMS[1:]))
    first_d = D_DIMS[0] * D_DIMS[1]
    expect = 2 * (3 * B * wg - B * G_DIMS[0] * G_DIMS[1]) + 2 * (3 * 2 * B * wd - 2 * B * first_d) + 2 * (2 * B * wd)
    assert fl == expect
