"""Multi-process tests on the CPU (gloo): synchronized fused BatchNorm and the trainer under torchrun.

Every multi-process test starts 2 processes itself (``subprocess`` on a free port: this file is also the
worker script, ``python tests/test_distributed.py <mode> <rank> <world> <port>``) and fails, killing
them, when they do not finish within a timeout, so a hang fails instead of blocking the suite.
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import zlib

import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from tolerances import assert_close, sqrt_scale  # noqa: E402

ROOT = os.path.dirname(HERE)


# =================================================================================================
# process helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra):
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
              "TORCHELASTIC_RUN_ID", "GANKERN_BACKEND"):
        env.pop(k, None)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def finish(procs, timeout, what):
    """Wait for all ``procs``; on timeout kill them and fail.  -> [(rc, stdout, stderr)]."""
    deadline = time.monotonic() + timeout
    outs = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outs.append((p.returncode, o, e))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            details = []
            for q in procs:
                o, e = q.communicate()
                details.append(f"--- pid {q.pid}\n{o[-2000:]}\n{e[-3000:]}")
            pytest.fail(f"{what}: did not finish within {timeout}s (hang?)\n" + "\n".join(details))
    return outs


def spawn_workers(mode, world=2, timeout=180, args=()):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), mode, str(r), str(world), str(port),
                               *map(str, args)], env=child_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT) for r in range(world)]
    outs = finish(procs, timeout, f"{world} '{mode}' workers")
    for r, (rc, o, e) in enumerate(outs):
        assert rc == 0, f"rank {r} exited with {rc}\n{o[-3000:]}\n{e[-5000:]}"
    return outs


def init_worker(rank, world, port):
    import datetime
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


# =================================================================================================
# synchronized BatchNorm on 2 ranks == BatchNorm on the concatenated batch

# name -> (per-rank batch sizes, channels, spatial dims, channels_last, options)
BN_CASES = {
    "1d_even": ((6, 6), 5, (), False, {}),
    "1d_uneven": ((3, 9), 7, (), False, {}),
    "1d_one_row": ((1, 8), 4, (), False, {}),          # torch would refuse 1 row on one device alone
    "1d_empty_rank1": ((9, 0), 6, (), False, {}),
    "1d_empty_rank0": ((0, 5), 3, (), False, {}),
    "1d_ncl": ((2, 5), 4, (7,), False, {}),
    "1d_momentum_none": ((4, 7), 5, (), False, {"momentum": None}),
    "1d_no_affine": ((5, 3), 4, (), False, {"affine": False}),
    "1d_leaky": ((4, 6), 5, (), False, {"slope": 0.2}),
    "2d": ((3, 2), 4, (5, 3), False, {}),
    "2d_channels_last": ((3, 2), 4, (5, 3), True, {}),
    "2d_uneven_channels_last": ((1, 4), 6, (3, 4), True, {}),
    "2d_empty_rank1": ((3, 0), 4, (2, 3), False, {}),
    "2d_empty_channels_last": ((0, 3), 5, (4, 2), True, {}),
    "2d_big_mean": ((16, 16), 3, (4, 4), False, {"offset": 1000.0}),
}


def _case_tensors(name):
    sizes, C, spatial, cl, opt = BN_CASES[name]
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    N = sum(sizes)
    shape = (N, C) + spatial
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 + 0.5 + opt.get("offset", 0.0)
    go = torch.randn(shape, generator=g, dtype=torch.float64)
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(C, generator=g, dtype=torch.float64) * 0.3
    rm = torch.randn(C, generator=g, dtype=torch.float64) * 0.1
    rv = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    f = lambda t: t.float().double()  # noqa: E731 - the exact values the float32 run sees
    return sizes, cl, opt, f(x), f(go), f(w), f(b), f(rm), f(rv)


def _expected64(x, go, w, b, rm, rv, opt):
    """float64 torch: act(batch_norm(x)) on the whole batch, its gradients and running statistics."""
    affine = opt.get("affine", True)
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True) if affine else None
    b = b.clone().requires_grad_(True) if affine else None
    rm, rv = rm.clone(), rv.clone()
    mom = opt.get("momentum", 0.1)
    y = F.batch_norm(x, rm, rv, w, b, True, 1.0 if mom is None else mom, 1e-5)  # first batch: CMA factor 1
    y = F.leaky_relu(y, opt["slope"]) if opt.get("slope") else F.relu(y)
    y.backward(go)
    return y.detach(), x.grad, (w.grad if affine else None), (b.grad if affine else None), rm, rv


def _make_module(C, opt, w, b, rm, rv, sync=True):
    import gankern.nn as gnn
    kw = dict(momentum=opt.get("momentum", 0.1), affine=opt.get("affine", True))
    m = gnn.BatchNormReLU1d(C, **kw)
    with torch.no_grad():
        if m.affine:
            m.weight.copy_(w.float())
            m.bias.copy_(b.float())
        m.running_mean.copy_(rm.float())
        m.running_var.copy_(rv.float())
    if opt.get("slope"):
        m.negative_slope = opt["slope"]
    return gnn.convert_sync_batchnorm(m) if sync else m


def bn_worker(rank, world, port):
    import torch.distributed as dist
    import gankern  # noqa: F401
    from gankern import _backends
    _backends.set_poison(True) if hasattr(_backends, "set_poison") else None
    init_worker(rank, world, port)
    results = {}
    for name in BN_CASES:
        try:
            sizes, cl, opt, x, go, w, b, rm, rv = _case_tensors(name)
            C = x.shape[1]
            lo = sum(sizes[:rank])
            xl = x[lo:lo + sizes[rank]].float()
            gol = go[lo:lo + sizes[rank]].float()
            if cl:
                xl = xl.contiguous(memory_format=torch.channels_last)
                gol = gol.contiguous(memory_format=torch.channels_last)
            xl.requires_grad_(True)
            m = _make_module(C, opt, w, b, rm, rv)
            assert type(m).__name__ == "SyncBatchNormReLU"
            y = m(xl)
            y.backward(gol)
            mine = {"y": y.detach(), "gx": xl.grad if xl.grad is not None else torch.zeros_like(xl),
                    "gw": m.weight.grad if m.affine else None, "gb": m.bias.grad if m.affine else None,
                    "rm": m.running_mean.clone(), "rv": m.running_var.clone(), "cl": cl and xl.numel() > 0 and
                    y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()}
            allm = [None] * world
            dist.all_gather_object(allm, mine)
            if rank == 0:
                ey, egx, egw, egb, erm, erv = _expected64(x, go, w, b, rm, rv, opt)
                red = x.numel() // C
                sc = sqrt_scale(red)
                # a mean of |m| >> std: the float32 mean alone is off by |m| 2^-24 (as in any float32 BatchNorm)
                osc = max(1.0, opt.get("offset", 0.0) * 2.0 ** -23 / 1e-5)
                assert_close(torch.cat([a["y"] for a in allm]), ey, torch.float32, scale=osc, name="output")
                assert_close(torch.cat([a["gx"] for a in allm]), egx, torch.float32, scale=sc * osc, name="grad_input")
                if opt.get("affine", True):
                    assert_close(sum(a["gw"].double() for a in allm), egw, torch.float32, scale=sc, name="grad_weight")
                    assert_close(sum(a["gb"].double() for a in allm), egb, torch.float32, scale=sc, name="grad_bias")
                assert_close(allm[0]["rm"], erm, torch.float32, name="running_mean")
                assert_close(allm[0]["rv"], erv, torch.float32, name="running_var")
                # the running statistics are the same bits on every rank (no buffer broadcast needed)
                assert all(torch.equal(a["rm"], allm[0]["rm"]) and torch.equal(a["rv"], allm[0]["rv"]) for a in allm)
                if cl:
                    for r, a in enumerate(allm):
                        assert a["y"].numel() == 0 or a["cl"], f"rank {r}: output is not channels-last"
                # and the fused single-process BatchNorm+ReLU on the concatenated batch
                from gankern.distributed import local_batch_norm_act
                xf = x.float().requires_grad_(True)
                wf, bf = (w.float(), b.float()) if opt.get("affine", True) else (None, None)
                rmf, rvf = rm.float(), rv.float()
                mom = opt.get("momentum", 0.1)
                yf = local_batch_norm_act(xf, rmf, rvf, wf, bf, True, 1.0 if mom is None else mom, 1e-5,
                                          opt.get("slope", 0.0))
                yf.backward(go.float())
                assert_close(torch.cat([a["y"] for a in allm]), yf.detach().double(), torch.float32, scale=osc,
                             name="output vs fused")
                assert_close(torch.cat([a["gx"] for a in allm]), xf.grad.double(), torch.float32, scale=sc * osc,
                             name="grad_input vs fused")
                assert_close(allm[0]["rv"], rvf.double(), torch.float32, name="running_var vs fused")
            results[name] = None
        except Exception as e:  # noqa: BLE001 - reported per case
            results[name] = f"{type(e).__name__}: {e}"[:3000]

    # a group with one value per channel in total: every rank raises torch's ValueError, none hangs
    m = _make_module(3, {}, torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3))
    try:
        m(torch.randn(1 if rank == 0 else 0, 3))
        results["one_value_raises"] = "no error"
    except ValueError as e:
        results["one_value_raises"] = None if "more than 1 value per channel" in str(e) else str(e)

    # eval mode with 2 ranks: the local fused path, bit for bit
    x = torch.randn(5, 4, 3, 3)
    m = _make_module(4, {}, torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64),
                     torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5).eval()
    import gankern as gk
    exp = gk.batch_norm_relu(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.1, 1e-5)
    results["eval_local"] = None if torch.equal(m(x), exp) else "eval output differs from batch_norm_relu"
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def bn_results():
    outs = spawn_workers("bn", timeout=240)
    line = [ln for ln in outs[0][1].splitlines() if ln.startswith("RESULTS ")]
    assert line, outs[0][1][-3000:] + outs[0][2][-3000:]
    return json.loads(line[-1][len("RESULTS "):])


@pytest.mark.parametrize("case", list(BN_CASES) + ["one_value_raises", "eval_local"])
def test_sync_batch_norm_two_ranks(bn_results, case):
    assert bn_results[case] is None, f"{case}: {bn_results[case]}"


# =================================================================================================
# DDP buffers: why the trainer does not broadcast them before each forward

def buffers_worker(rank, world, port):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from gankern.gan.config import TrainConfig
    from gankern.gan.distributed import DistContext
    from gankern.gan.models import make_models
    from gankern.gan.step import make_optimizers, make_train_step
    init_worker(rank, world, port)
    res = {}
    dev = torch.device("cpu")
    torch.manual_seed(0)
    G, D = make_models("mlp", (8, 8), 16, fused=True)
    opt_g, opt_d = make_optimizers(G, D, TrainConfig(), dev)
    Gt, Dt = DistContext(dev, rank, world, rank, enabled=True).wrap(G, D)
    res["wrapped"] = isinstance(Gt, DDP) and isinstance(Dt, DDP) and \
        type(G.blocks[0].bn).__name__ == "SyncBatchNormReLU"
    res["no_forward_broadcast"] = not getattr(Gt, "forward_sync_buffers", getattr(Gt, "broadcast_buffers", True))
    torch.manual_seed(100 + rank)  # each rank its own noise and data: the buffers must still agree
    step = make_train_step(Gt, Dt, opt_g, opt_d, z_dim=16, batch_size=8, device=dev)
    for _ in range(4):
        step(torch.rand(8, 64))
    bufs = [torch.cat([b.double().flatten() for b in G.buffers()]),
            torch.cat([p.detach().double().flatten() for p in G.parameters()])]
    got = [None] * world
    dist.all_gather_object(got, bufs)
    res["buffers_equal"] = all(torch.equal(g[0], got[0][0]) for g in got)
    res["params_equal"] = all(torch.equal(g[1], got[0][1]) for g in got)
    # The pitfall: a module with BatchNorm called twice before its backward, buffers broadcast before each
    # forward (DDP's default) -> torch's in-place error on CUDA; without the broadcast it trains.
    errs = {}
    for bcast, train in ((True, True), (False, True), (True, False), (False, False)):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 1)).train(train)
        kw = {"forward_sync_buffers": bcast} if "forward_sync_buffers" in DDP.__init__.__code__.co_varnames \
            else {"broadcast_buffers": bcast}
        dm = DDP(m, **kw)
        try:
            (dm(torch.randn(8, 4)).mean() + dm(torch.randn(8, 4)).mean()).backward()
            errs[bcast, train] = None
        except RuntimeError as e:
            errs[bcast, train] = str(e)
    # (With broadcast the error needs a BatchNorm kernel that saves the running statistics for its backward:
    # cuDNN's, pytorch/pytorch#175024; torch's CPU kernel does not, so here it trains either way.)
    res["no_broadcast_trains"] = errs[False, True] is None and errs[False, False] is None
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        print("RESULTS " + json.dumps(res))


def test_ddp_buffers_stay_equal_without_broadcast():
    outs = spawn_workers("buffers", timeout=180)
    line = [ln for ln in outs[0][1].splitlines() if ln.startswith("RESULTS ")]
    res = json.loads(line[-1][len("RESULTS "):])
    assert res == {"wrapped": True, "no_forward_broadcast": True, "buffers_equal": True, "params_equal": True,
                   "no_broadcast_trains": True}, res


# =================================================================================================
# single process: conversion, state_dict, the unsynchronized paths

def test_sync_bn_without_process_group_is_the_fused_layer():
    import gankern.nn as gnn
    torch.manual_seed(0)
    for cls, shape in ((gnn.BatchNormReLU1d, (9, 5)), (gnn.BatchNormReLU2d, (4, 5, 3, 3))):
        a = cls(5)
        b = gnn.convert_sync_batchnorm(cls(5))
        b.load_state_dict(a.state_dict())
        x = torch.randn(shape)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = a(xa), b(xb)
        ya.sum().backward()
        yb.sum().backward()
        assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad) and torch.equal(a.weight.grad, b.weight.grad)
        assert torch.equal(a.running_var, b.running_var)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            b(torch.randn((1, 5) + (1,) * (len(shape) - 2)))
    with pytest.raises(ValueError, match="at least 2D"):
        gnn.SyncBatchNormReLU(3)(torch.randn(3))


def test_convert_sync_batchnorm_round_trip_and_torch_state_dict():
    import gankern.nn as gnn
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), gnn.BatchNormReLU1d(6, momentum=None, backend="reference"),
                                torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.BatchNorm1d(3)),
                                gnn.BatchNormReLU2d(3, affine=False))
    model[1].running_mean.add_(0.5)
    model[1].num_batches_tracked.add_(3)
    model.eval()
    before = dict(model.state_dict())
    params = [id(p) for p in model.parameters()]
    bufs = [id(b) for b in model.buffers()]
    conv = gnn.convert_sync_batchnorm(model)
    assert conv is model
    assert type(model[1]) is gnn.SyncBatchNormReLU and type(model[3]) is gnn.SyncBatchNormReLU
    assert type(model[2][1]) is torch.nn.SyncBatchNorm  # torch's own conversion for torch BatchNorm
    assert model[1].momentum is None and model[1].backend == "reference" and not model[3].affine
    assert not model[1].training
    assert [id(p) for p in model.parameters()] == params and [id(b) for b in model.buffers()] == bufs
    after = model.state_dict()
    assert list(after) == list(before) and all(after[k] is before[k] or torch.equal(after[k], before[k]) for k in before)
    # the state_dict of SyncBatchNormReLU is torch.nn.SyncBatchNorm's (keys, shapes, version): both ways, strict
    t = torch.nn.SyncBatchNorm(6, momentum=None)
    t.load_state_dict(model[1].state_dict(), strict=True)
    assert torch.equal(t.running_mean, model[1].running_mean) and int(t.num_batches_tracked) == 3
    assert model[1].state_dict()._metadata[""]["version"] == t.state_dict()._metadata[""]["version"]
    s = gnn.SyncBatchNormReLU(6)
    s.load_state_dict(t.state_dict(), strict=True)
    # and the converted model loads into a fresh unconverted one (round trip)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 6), gnn.BatchNormReLU1d(6, momentum=None),
                                torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.BatchNorm1d(3)),
                                gnn.BatchNormReLU2d(3, affine=False))
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(fresh[1].running_mean, model[1].running_mean)
    # converting twice changes nothing; a lone BatchNorm returns a new module
    assert type(gnn.convert_sync_batchnorm(model)[1]) is gnn.SyncBatchNormReLU
    lone = gnn.BatchNormReLU1d(4)
    out = gnn.convert_sync_batchnorm(lone)
    assert out is not lone and out.weight is lone.weight
    # a BatchNorm + LeakyReLU layer keeps its slope, Parameters and state_dict
    leaky = gnn.BatchNormLeakyReLU2d(4, 0.8, negative_slope=0.1)
    conv = gnn.convert_sync_batchnorm(leaky)
    assert type(conv) is gnn.SyncBatchNormLeakyReLU and conv.negative_slope == 0.1 and conv.eps == 0.8
    assert conv.weight is leaky.weight and conv.running_var is leaky.running_var
    x = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(conv.eval()(x), leaky.eval()(x), rtol=0, atol=0)
    assert list(conv.state_dict()) == list(leaky.state_dict())


# =================================================================================================
# the trainer on 2 ranks (the environment torchrun sets, or torchrun itself)

SEED, BATCH, STEPS = 3, 32, 60
TRAIN_ARGS = ["--device", "cpu", "--batch-size", str(BATCH), "--seed", str(SEED), "--log-every", "1",
              "--ckpt-every", "20", "--keep", "10", "--sample-every", "0", "--no-eval", "--quiet",
              # the plain recipe the single-process reference below runs (no label smoothing, EMA or lr decay)
              "--real-label", "1.0", "--ema", "0", "--no-lr-decay"]


def start_ranks(out, steps, *extra, world=2):
    """``python -m gankern train`` on ``world`` ranks with torchrun's environment variables, no agent."""
    port = free_port()
    return [subprocess.Popen([sys.executable, "-m", "gankern", "train", *TRAIN_ARGS, "--steps", str(steps),
                              "--out", str(out), *extra],
                             env=child_env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=world, LOCAL_WORLD_SIZE=world,
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
            for r in range(world)]


def metric_rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """A 2-rank run under torchrun itself (--standalone: its own rendezvous on a free port)."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "gankern", "train", *TRAIN_ARGS, "--steps", str(STEPS), "--out", str(out)],
                         env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    (rc, o, e), = finish([p], 240, "torchrun --nproc_per_node=2 -m gankern train")
    assert rc == 0, o[-3000:] + e[-5000:]
    return out


def test_ddp_training_equals_one_process_on_the_same_global_batches(ddp_run):
    """D has no BatchNorm, G the synchronized one: 2 ranks x 16 rows == 1 process x 32 rows, step by step."""
    from gankern.gan.checkpoint import CheckpointError, load_checkpoint  # noqa
    from gankern.gan.config import TrainConfig
    from gankern.gan.data import InfiniteSampler, load_dataset
    from gankern.gan.distributed import rank_seed
    from gankern.gan.models import make_models
    from gankern.gan.step import make_optimizers, make_train_step
    dev = torch.device("cpu")
    data = load_dataset("digits")
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        G, D = make_models("mlp", data.image_shape, 64, fused=True)
        assert not any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in D.modules())
        gens = [torch.Generator(), torch.Generator().manual_seed(rank_seed(SEED, 1))]
        gens[0].set_state(torch.get_rng_state())  # rank 0 continues the global stream after the model init
    cfg = TrainConfig(batch_size=BATCH, seed=SEED)
    opt_g, opt_d = make_optimizers(G, D, cfg, dev)
    b = BATCH // 2
    step = make_train_step(G, D, opt_g, opt_d, z_dim=64, batch_size=BATCH, device=dev,
                           noise=lambda: torch.cat([torch.randn(b, 64, generator=g) for g in gens]))
    sampler = InfiniteSampler(len(data), BATCH, seed=SEED)
    ref = []
    for _ in range(STEPS):
        ld, lg, dr, df = (t.detach() for t in step(data.x[sampler.next()]))
        ref.append([float(ld), float(lg), float(torch.sigmoid(dr).mean()), float(torch.sigmoid(df).mean())])
    rows = metric_rows(ddp_run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    got = torch.tensor([[r["loss_d"], r["loss_g"], r["d_x"], r["d_g_z"]] for r in rows], dtype=torch.float64)
    assert_close(got, torch.tensor(ref, dtype=torch.float64), torch.float32, scale=10, name="losses per step")
    ck = load_checkpoint(os.path.join(ddp_run, f"ckpt_{STEPS:08d}.pt"))
    for name, mod in (("G", G), ("D", D)):
        sd = mod.state_dict()
        assert list(ck[name]) == list(sd)  # no "module." prefix: the checkpoint loads into a plain model
        for k, v in sd.items():
            if v.is_floating_point():
                assert_close(ck[name][k], v.double(), torch.float32, scale=10, name=f"{name}.{k} after {STEPS} steps")
            else:
                assert torch.equal(ck[name][k], v), f"{name}.{k}"
    assert len(ck["rng"]["ranks"]) == 2 and json.load(open(os.path.join(ddp_run, "config.json")))["world_size"] == 2


def test_ddp_checkpoint_samples_and_evaluates_in_one_process(ddp_run, tmp_path):
    ck = os.path.join(ddp_run, f"ckpt_{STEPS:08d}.pt")
    r = subprocess.run([sys.executable, "-m", "gankern", "sample", "--checkpoint", ck, "--n", "8", "--device", "cpu",
                        "--out", str(tmp_path / "s.npy")], env=child_env(), capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    import numpy as np
    assert np.load(tmp_path / "s.npy").shape == (8, 64)
    # rank 0 alone wrote the run folder: one metrics line per step, no files from rank 1
    assert sorted(os.listdir(ddp_run)) == sorted([".lock", "config.json", "metrics.jsonl", "final_metrics.json", "loss.png",
                                                  "samples"] + [f"ckpt_{s:08d}.pt" for s in (20, 40, 60)])


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """2 ranks with a target far away; rank 1 is killed (SIGKILL) once a checkpoint exists."""
    out = tmp_path_factory.mktemp("killed") / "run"
    procs = start_ranks(out, 100000)
    deadline = time.monotonic() + 180
    while not os.path.exists(os.path.join(out, "ckpt_00000020.pt")):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            outs = [p.communicate() for p in procs]
            pytest.fail("the run did not reach its first checkpoint:\n" + "\n".join(o[1][-3000:] for o in outs))
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGKILL)
    t = time.monotonic()
    (rc0, o0, e0), (rc1, _, _) = finish(procs, 90, "rank 0 after rank 1 was killed")
    return out, rc0, e0, time.monotonic() - t


def test_a_dead_rank_makes_the_others_exit_with_a_clear_error(killed_run):
    out, rc0, err0, waited = killed_run
    assert rc0 != 0
    assert "gankern: error: rank 0 of 2: a collective with the other ranks failed" in err0, err0[-3000:]
    assert waited < 60


def test_killed_run_resumes_exactly(killed_run, ddp_run):
    out = killed_run[0]
    latest = max(int(f[5:13]) for f in os.listdir(out) if f.startswith("ckpt_"))
    assert latest < STEPS, f"the killed run had already reached step {latest}"
    outs = finish(start_ranks(out, STEPS, "--resume"), 180, "the resumed 2-rank run")
    for r, (rc, o, e) in enumerate(outs):
        assert rc == 0, f"rank {r}: {e[-3000:]}"
    keys = ("step", "loss_d", "loss_g", "d_x", "d_g_z")
    assert [[r[k] for k in keys] for r in metric_rows(out)] == [[r[k] for k in keys] for r in metric_rows(ddp_run)]
    from gankern.gan.checkpoint import load_checkpoint
    a = load_checkpoint(os.path.join(out, f"ckpt_{STEPS:08d}.pt"))
    b = load_checkpoint(os.path.join(ddp_run, f"ckpt_{STEPS:08d}.pt"))
    for name in ("G", "D"):
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), f"{name}.{k} differs after the resume"
    for ra, rb in zip(a["rng"]["ranks"], b["rng"]["ranks"]):
        assert torch.equal(ra["torch"], rb["torch"])


def test_batch_not_divisible_by_world_size_is_a_clear_error(tmp_path):
    outs = finish(start_ranks(tmp_path / "run", 5, "--batch-size", "33"), 120, "2 ranks with --batch-size 33")
    for rc, o, e in outs:
        assert rc == 2 and "must be divisible by the number of ranks" in e, e[-2000:]


def test_cli_flags_and_single_process_context(capsys):
    from gankern.gan.cli import main
    from gankern.gan.distributed import DistContext, launched_by_torchrun, rank_seed, setup
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--sync-bn" in out and "--no-sync-bn" in out and "torchrun" in out
    assert not launched_by_torchrun()  # the test process has no torchrun environment
    ctx = setup(torch.device("cpu"))
    assert isinstance(ctx, DistContext) and not ctx.enabled and ctx.is_main and ctx.world == 1
    idx = torch.arange(6)
    assert ctx.local_rows(idx) is idx and ctx.local_batch_size(6) == 6
    assert ctx.share(lambda: 41) == 41
    assert rank_seed(5, 0) == 5 and rank_seed(5, 1) != rank_seed(5, 2) != 5 and 0 <= rank_seed(5, 1) < 2 ** 63


# =================================================================================================
# worker dispatch

if __name__ == "__main__":
    mode, rank, world, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    {"bn": bn_worker, "buffers": buffers_worker}[mode](rank, world, port)
