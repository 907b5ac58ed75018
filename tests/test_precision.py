"""Mixed precision: the CPU Linear+LeakyReLU on both reduced-precision GEMM paths (against float64), the
CPU-feature probe, and the trainer's --precision (casts once per step, fp32 master state, exact resume)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import gankern
from gankern import cpu_features as cf
from gankern import train as T
from gankern.models import make_models
from gankern.train import TrainConfig, WeightCasts, load_checkpoint, make_optimizers, make_train_step, train
from test_linear_leaky_relu import check
from tolerances import assert_close, sqrt_scale

HALF = (torch.bfloat16, torch.float16)


def _paths(dtype):
    """The GEMM paths that can run here for dtype: "fp32" always, "native" where the CPU has the units."""
    return ["fp32"] + (["native"] if cf.has_units(dtype) and torch.backends.mkldnn.is_available() else [])


PATH_CASES = [(dt, p) for dt in HALF for p in ("fp32", "native")]

# sizes above and below the native path's minimum (2**18 multiply-adds), odd and GAN-shaped
SHAPES = [
    ((128, 784), 512, 0.2, True, False),
    ((1000, 127), 7, 0.2, True, True),
    ((7, 1000), 127, 0.01, False, True),
    ((3, 5, 127), 1000, -0.3, True, False),
    ((256, 256), 128, 0.0, True, False),
    ((127, 300), 257, 1.0, True, True),
    ((64, 128), 1, 0.2, True, False),
    ((1, 784), 127, 0.2, True, False),
]


def _force(monkeypatch, dtype, path):
    if path not in _paths(dtype):
        pytest.skip(f"no native {dtype} GEMM on this CPU ({cf.describe()})")
    monkeypatch.setenv("GANKERN_LLR_HALF_GEMM", path)
    assert cf.llr_gemm_path(dtype) == path


@pytest.mark.needs_ext
@pytest.mark.parametrize("dtype,path", PATH_CASES, ids=[f"{str(d)[6:]}-{p}" for d, p in PATH_CASES])
@pytest.mark.parametrize("in_shape,N,slope,bias,noncontig", SHAPES, ids=[f"{s}->{n}" for s, n, *_ in SHAPES])
def test_half_paths_match_torch_fp64(monkeypatch, dtype, path, in_shape, N, slope, bias, noncontig):
    _force(monkeypatch, dtype, path)
    check("cpp", in_shape, N, dtype, slope, bias, noncontig)


@pytest.mark.needs_ext
@pytest.mark.parametrize("path", ["fp32", "native"])
@pytest.mark.parametrize("slope", [0.2, 0.0, 1.0])
def test_half_paths_nan_inf_follow_torch(monkeypatch, path, slope):
    dtype = torch.bfloat16
    _force(monkeypatch, dtype, path)
    M, K, N = 128, 256, 64  # above the native path's minimum size
    x = torch.randn(M, K).to(dtype)
    w = (torch.randn(N, K) / 16).to(dtype)
    b = torch.randn(N).to(dtype)
    x[0, 0], x[1, 3], x[2, 5] = float("nan"), float("inf"), -float("inf")
    w[:4, 0] = torch.tensor([1.0, -1.0, 0.0, 2.0])
    y = gankern.linear_leaky_relu(x, w, b, slope, backend="cpp")
    ref = F.leaky_relu(F.linear(x.double(), w.double(), b.double()), slope)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)), "NaN positions differ from torch"
    assert torch.equal(torch.isinf(y), torch.isinf(ref)) and torch.equal(y[torch.isinf(y)], ref[torch.isinf(ref)].to(dtype))


@pytest.mark.needs_ext
def test_path_override_and_probe(monkeypatch):
    monkeypatch.delenv("GANKERN_LLR_HALF_GEMM", raising=False)
    for dt in HALF:
        auto = cf.llr_gemm_path(dt)
        assert auto == ("native" if len(_paths(dt)) == 2 else "fp32"), cf.cpu_features()
        monkeypatch.setenv("GANKERN_LLR_HALF_GEMM", "fp32")
        assert cf.llr_gemm_path(dt) == "fp32"
        monkeypatch.delenv("GANKERN_LLR_HALF_GEMM")
    feats = cf.cpu_features()
    assert feats["capability"] == torch.backends.cpu.get_cpu_capability()
    assert feats["bf16_units"] == (feats["flags"]["avx512_bf16"] or feats["flags"]["amx_bf16"])
    assert "bfloat16" in cf.describe()


@pytest.mark.needs_ext
def test_path_override_bad_value_and_missing_units(monkeypatch):
    x, w = torch.randn(128, 512).bfloat16(), torch.randn(256, 512).bfloat16()
    monkeypatch.setenv("GANKERN_LLR_HALF_GEMM", "amx")
    with pytest.raises(RuntimeError, match="GANKERN_LLR_HALF_GEMM must be auto, native or fp32"):
        gankern.linear_leaky_relu(x, w, None, 0.2, backend="cpp")
    for dt in HALF:
        if len(_paths(dt)) == 1:  # no units: forcing native is a clear error, not a silent slow path
            monkeypatch.setenv("GANKERN_LLR_HALF_GEMM", "native")
            with pytest.raises(RuntimeError, match="GANKERN_LLR_HALF_GEMM=native: no native"):
                gankern.linear_leaky_relu(x.to(dt), w.to(dt), None, 0.2, backend="cpp")


# -------------------------------------------------------------------------------------------------
# the trainer

B, Z = 16, 16


def _step(precision="bf16", model="mlp", seed=0, **kw):
    torch.manual_seed(seed)
    G, D = make_models(model, (8, 8), Z, fused=True)
    opt_g, opt_d = make_optimizers(G, D, TrainConfig(), torch.device("cpu"))
    step = make_train_step(G, D, opt_g, opt_d, z_dim=Z, batch_size=B, device=torch.device("cpu"), real_label=0.9,
                           precision=precision, **kw)
    return G, D, opt_g, opt_d, step


def _real(n=3):
    g = torch.Generator().manual_seed(5)
    return [torch.rand(B, 64, generator=g) for _ in range(n)]


@pytest.mark.parametrize("model", ["mlp", "dcgan"])
def test_bf16_step_casts_each_weight_once_per_step(model):
    G, D, opt_g, opt_d, step = _step(model=model)
    n_w = len(WeightCasts(G, torch.bfloat16).entries) + len(WeightCasts(D, torch.bfloat16).entries)
    assert n_w > 0
    reals = _real(4)
    step(reals[0])
    first = step.weight_casts()
    assert first == n_w + len(WeightCasts(D, torch.bfloat16).entries)  # step 1: D cast again after its update
    for r in reals[1:]:
        before = step.weight_casts()
        step(r)
        assert step.weight_casts() - before == n_w  # D is run twice per step, each weight is cast once


@pytest.mark.parametrize("model", ["mlp", "dcgan"])
def test_bf16_cached_casts_equal_autocast(model):
    # the cached casts change no number: same losses and weights as torch.autocast casting per forward
    a = _step(model=model)
    b = _step(model=model, cache_casts=False)
    for r in _real(3):
        torch.manual_seed(1)
        la = a[4](r)
        torch.manual_seed(1)
        lb = b[4](r)
        for x, y in zip(la, lb):
            assert torch.equal(x, y)
    for m_a, m_b in ((a[0], b[0]), (a[1], b[1])):
        for (n, p), q in zip(m_a.state_dict().items(), m_b.state_dict().values()):
            assert torch.equal(p, q), n
    assert b[4].weight_casts() == 0


def test_bf16_master_weights_state_and_bn_stats_fp32():
    G, D, opt_g, opt_d, step = _step()
    ld, lg, dr, df = step(_real(1)[0])
    assert ld.dtype == lg.dtype == dr.dtype == torch.float32  # the loss in fp32
    for m in (G, D):
        for k, t in m.state_dict().items():
            assert t.dtype in (torch.float32, torch.int64), k
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in m.parameters())
    for opt in (opt_g, opt_d):
        for st in opt.state.values():
            assert all(v.dtype == torch.float32 for k, v in st.items() if k != "step")
    bn = [m for m in G.modules() if isinstance(m, gankern.nn.BatchNormReLU1d)]
    assert bn and all(m.running_mean.dtype == torch.float32 and m.num_batches_tracked == 1 for m in bn)
    # the bf16 step trains close to the fp32 step from the same start (one step)
    G32, D32, *_, step32 = _step("fp32")
    step32(_real(1)[0])
    for p, q in zip(G.parameters(), G32.parameters()):
        assert_close(p, q.double(), torch.bfloat16, name="G weight after one bf16 vs fp32 step")


def test_fp16_scaler_shared_by_both_optimizers():
    # CPU autocast fp16 only to test the scaler's use (the trainer allows fp16 on CUDA only): each loss is
    # scaled and each optimizer stepped through the one scaler, update() once per step
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1)
    G, D, opt_g, opt_d, step = _step("fp16", scaler=scaler)
    for i, r in enumerate(_real(3)):
        step(r)
        assert scaler.get_scale() == 2.0 ** (9 + i)  # grown once per step (finite grads), not once per optimizer
    assert all(p.dtype == torch.float32 for p in G.parameters())
    with pytest.raises(ValueError, match="gradient scaler"):
        _step("fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        _step("int8")


def _cfg(out, **kw):
    base = dict(steps=20, batch_size=16, out=str(out), sample_every=0, ckpt_every=0, log_every=5,
                final_eval=False, quiet=True, device="cpu", precision="bf16")
    base.update(kw)
    return TrainConfig(**base)


def test_fp16_on_cpu_clear_error(tmp_path):
    with pytest.raises(ValueError, match="fp16' runs on CUDA only"):
        train(_cfg(tmp_path / "r", precision="fp16"))
    from gankern.cli import main
    assert main(["train", "--precision", "fp16", "--device", "cpu", "--out", str(tmp_path / "c"), "--steps", "2"]) == 2


def test_bf16_run_resumes_exactly_and_saves_fp32(tmp_path):
    kw = dict(steps=40, ema=0.9, lr_decay=[10, 50], log_every=10)
    train(_cfg(tmp_path / "full", **kw))
    train(_cfg(tmp_path / "split", **dict(kw, steps=20)))
    train(_cfg(tmp_path / "split", **dict(kw, resume=True)))
    a = load_checkpoint(str(tmp_path / "full" / "ckpt_00000040.pt"))
    b = load_checkpoint(str(tmp_path / "split" / "ckpt_00000040.pt"))
    assert a["config"]["precision"] == "bf16"
    for k in ("G", "D", "G_ema"):
        for n, t in a[k].items():
            assert t.dtype in (torch.float32, torch.int64), (k, n)
            assert torch.equal(t, b[k][n]), (k, n)
    ra = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
    rb = [json.loads(l) for l in open(tmp_path / "split" / "metrics.jsonl")]
    assert [r["loss_d"] for r in ra] == [r["loss_d"] for r in rb]
    # samples in fp32 from the fp32 checkpoint
    G, *_ = T.models_from_checkpoint(a)
    x = T.generate(G, 8, a["config"]["z_dim"], torch.device("cpu"), 0)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    # precision is a setting of the run: a resume cannot change it
    with pytest.raises(ValueError, match="precision"):
        train(_cfg(tmp_path / "split", **dict(kw, steps=60, resume=True, precision="fp32")), explicit={"precision"})


# -------------------------------------------------------------------------------------------------
# defaults: one place (TrainConfig), the demo's recipe scaled to the step count

def test_defaults_are_the_demo_recipe():
    d = TrainConfig()
    assert (d.batch_size, d.real_label, d.ema, d.lr_decay, d.precision) == (128, 0.9, 0.999, "auto", "fp32")
    assert T.resolve_lr_decay("auto", d.steps) == [d.steps // 2, d.steps]
    assert T.resolve_lr_decay("auto", 9000) == T.DEMO["lr_decay"]
    assert T.resolve_lr_decay([], 10) is None and T.resolve_lr_decay(None, 10) is None
    with pytest.raises(ValueError, match="lr_decay"):
        T.resolve_lr_decay([5, 5], 10)
    for k in T.DEMO:  # --demo overrides only what differs
        assert k in ("steps", "lr_decay", "sample_every", "ckpt_every", "out", "model", "dataset")


def test_cli_help_shows_trainconfig_defaults(capsys):
    from gankern.cli import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    d = TrainConfig()
    for flag, k in (("--steps", "steps"), ("--batch-size", "batch_size"), ("--real-label", "real_label"),
                    ("--ema", "ema"), ("--precision", "precision"), ("--sample-every", "sample_every")):
        assert f"(default: {getattr(d, k)}" in out, flag
    assert "--demo: 9000" in out and "the second half of --steps" in out


def test_lr_decay_auto_and_off_in_a_run(tmp_path):
    s = train(_cfg(tmp_path / "a", precision="fp32", steps=10))
    cfg = json.load(open(tmp_path / "a" / "config.json"))
    assert cfg["lr_decay"] == [5, 10] and s["steps"] == 10
    train(_cfg(tmp_path / "b", precision="fp32", steps=10, lr_decay=[]))
    assert json.load(open(tmp_path / "b" / "config.json"))["lr_decay"] is None
