"""gankern.gan.trainer / step: short runs of both models, exact resume, atomic checkpoints, checkpoint errors."""
import copy
import json
import os

import pytest
import torch

from tolerances import assert_same as _assert_same

from gankern.gan.checkpoint import (CheckpointError, list_checkpoints, load_checkpoint, models_from_checkpoint,
                                    save_atomic)
from gankern.gan.config import TrainConfig, lr_factor
from gankern.gan.models import make_models, recalibrate_batch_norm
from gankern.gan.step import BN_RECAL_SEED, TrainStep, make_optimizers, make_train_step
from gankern.gan.trainer import train


def cfg(out, **kw):
    base = dict(steps=20, batch_size=16, out=str(out), sample_every=10, ckpt_every=10, log_every=5,
                final_eval=False, quiet=True, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("model", ["mlp", "dcgan"])
def test_short_run(tmp_path, model):
    s = train(cfg(tmp_path / model, model=model, ema=0.99))
    run = tmp_path / model
    rows = [json.loads(l) for l in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    for r in rows:
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("loss_d", "loss_g", "d_x", "d_g_z"))
        assert 0 < r["d_x"] < 1 and 0 < r["d_g_z"] < 1
    ck = load_checkpoint(s["checkpoint"])
    assert ck["step"] == 20 and ck["config"]["model"] == model and ck["G_ema"] is not None
    assert os.path.basename(s["checkpoint"]) == "ckpt_00000020.pt"
    assert (run / "config.json").exists() and (run / "loss.png").exists()
    assert (run / "samples" / "step_0000010.png").exists() and (run / "samples" / "step_0000020.png").exists()
    assert json.load(open(run / "final_metrics.json"))["steps"] == 20


def _state(path):
    ck = load_checkpoint(path)
    return ck


def test_exact_resume(tmp_path):
    # the lr decay spans the split: a schedule that is a function of the step resumes exactly
    kw = dict(steps=60, ema=0.9, real_label=0.9, lr_decay=[20, 70], sample_every=0, ckpt_every=0, log_every=10)
    train(cfg(tmp_path / "full", **kw))
    train(cfg(tmp_path / "split", **dict(kw, steps=30)))
    train(cfg(tmp_path / "split", **dict(kw, steps=60, resume=True)))
    a = _state(tmp_path / "full" / "ckpt_00000060.pt")
    b = _state(tmp_path / "split" / "ckpt_00000060.pt")
    for k in ("G", "D", "G_ema", "opt_G", "opt_D", "rng", "step", "ema_updates"):
        _assert_same(a[k], b[k], k)
    la = [(r["step"], r["loss_d"], r["loss_g"], r["d_x"]) for r in map(json.loads, open(tmp_path / "full" / "metrics.jsonl"))]
    lb = [(r["step"], r["loss_d"], r["loss_g"], r["d_x"]) for r in map(json.loads, open(tmp_path / "split" / "metrics.jsonl"))]
    assert la == lb and len(la) == 6


def test_lr_decay_schedule(tmp_path):
    assert [lr_factor(s, [4, 8]) for s in (1, 4, 5, 6, 8, 9)] == [1.0, 1.0, 0.75, 0.5, 0.0, 0.0]
    assert lr_factor(123, None) == 1.0
    with pytest.raises(ValueError, match="lr_decay must be two steps START < END"):
        train(cfg(tmp_path, lr_decay=[8, 4]))
    s = train(cfg(tmp_path / "d", steps=6, lr_decay=[2, 4], lr=1e-3, lr_d=2e-3))
    ck = load_checkpoint(s["checkpoint"])
    assert ck["opt_G"]["param_groups"][0]["lr"] == 0.0 and ck["opt_D"]["param_groups"][0]["lr"] == 0.0
    s = train(cfg(tmp_path / "e", steps=3, lr_decay=[2, 4], lr=1e-3, lr_d=2e-3))  # step 3: half way
    ck = load_checkpoint(s["checkpoint"])
    assert ck["opt_G"]["param_groups"][0]["lr"] == 5e-4 and ck["opt_D"]["param_groups"][0]["lr"] == 1e-3


def test_resume_guards(tmp_path):
    train(cfg(tmp_path, steps=10))
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg(tmp_path, steps=10))
    with pytest.raises(ValueError, match=r"lr \(saved 0.0002, given 0.001\)"):
        train(cfg(tmp_path, steps=20, lr=1e-3, resume=True), explicit={"lr"})
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(cfg(tmp_path / "empty", steps=10, resume=True))


def test_keep_last_k(tmp_path):
    train(cfg(tmp_path, steps=25, ckpt_every=5, keep=2, sample_every=0))
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [20, 25]


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    s = train(cfg(tmp_path, steps=10, ckpt_every=0, sample_every=0))
    before = load_checkpoint(s["checkpoint"])

    def boom(src, dst):
        raise OSError("simulated crash before the rename")
    monkeypatch.setattr(os, "replace", boom)
    # overwrite the same file: the rename fails, the old file must be intact and no temp file left behind
    with pytest.raises(OSError, match="simulated crash"):
        save_atomic({"format": "junk"}, s["checkpoint"])
    with pytest.raises(OSError, match="simulated crash"):
        train(cfg(tmp_path, steps=20, ckpt_every=0, sample_every=0, resume=True))
    monkeypatch.undo()
    after = load_checkpoint(s["checkpoint"])
    _assert_same(before["G"], after["G"], "G")
    assert after["step"] == 10
    assert [f for f in os.listdir(tmp_path) if ".tmp-" in f] == []
    assert [st for st, _ in list_checkpoints(str(tmp_path))] == [10]
    # and the run can still be resumed from it
    assert train(cfg(tmp_path, steps=20, ckpt_every=0, sample_every=0, resume=True))["steps"] == 20


def test_bad_checkpoints(tmp_path):
    s = train(cfg(tmp_path / "run", steps=5, ckpt_every=0, sample_every=0))
    raw = open(s["checkpoint"], "rb").read()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="trunc.pt: cannot be read"):
        load_checkpoint(str(trunc))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}}, foreign)
    with pytest.raises(CheckpointError, match="not a gankern GAN checkpoint"):
        load_checkpoint(str(foreign))
    module = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), module)  # a pickled object: refused by weights_only=True
    with pytest.raises(CheckpointError, match="module.pt: cannot be read"):
        load_checkpoint(str(module))
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="text.pt"):
        load_checkpoint(str(text))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_train_step_freezes_d_and_reuses_fake(monkeypatch):
    G, D = make_models("mlp", (8, 8), 8)
    opt_g, opt_d = make_optimizers(G, D, TrainConfig(), torch.device("cpu"))
    calls = {"G": 0}
    orig = G.forward

    def counting(z):
        calls["G"] += 1
        return orig(z)
    G.forward = counting
    seen = []
    for p in D.parameters():
        p.register_hook(lambda g: seen.append(1) or g)
    step = make_train_step(G, D, opt_g, opt_d, z_dim=8, batch_size=4, device=torch.device("cpu"))
    ld, lg, dr, df = step(torch.rand(4, 64))
    assert calls["G"] == 1                          # the fake batch is reused for the G step
    assert len(seen) == len(list(D.parameters()))  # D weight grads only in the D step
    assert all(not p.requires_grad for p in D.parameters())
    assert torch.isfinite(ld) and torch.isfinite(lg) and dr.shape == df.shape == (4, 1)
    assert opt_g.param_groups[0]["fused"] and opt_d.param_groups[0]["betas"] == (0.5, 0.999)


def test_train_step_state_dict_round_trip():
    """TrainStep saves and restores its models, optimizers and EMA generator: a step restored into fresh models
    continues bit for bit."""
    dev = torch.device("cpu")

    def make(seed):
        torch.manual_seed(seed)
        G, D = make_models("mlp", (8, 8), 8)
        opt_g, opt_d = make_optimizers(G, D, TrainConfig(), dev)
        ema = copy.deepcopy(G).requires_grad_(False)
        return TrainStep(G, D, opt_g, opt_d, z_dim=8, batch_size=4, device=dev, real_label=0.9, ema=(ema, 0.9))
    real = torch.rand(4, 64, generator=torch.Generator().manual_seed(1))
    a = make(0)
    for _ in range(3):
        a(real)
    b = make(1)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.ema_updates() == a.ema_updates() == 3
    rng = torch.get_rng_state()
    got_a = a(real)
    torch.set_rng_state(rng)
    got_b = b(real)
    _assert_same(list(got_a), list(got_b), "losses")
    _assert_same(a.state_dict(), b.state_dict(), "state")
    assert b.sample_model() is b.ema_model
    with pytest.raises(ValueError, match="EMA generator"):
        b.load_state_dict(dict(a.state_dict(), G_ema=None))


def test_time_steps_fused_and_plain():
    from gankern.gan.data import load_dataset
    from gankern.gan.speed import time_steps
    data = load_dataset("digits")
    c = TrainConfig(batch_size=8)
    for fused in (True, False):
        t = time_steps(c, data, torch.device("cpu"), fused=fused, steps=2, warmup=1, rounds=1)
        assert 0 < t < 10


@pytest.mark.parametrize("model", ["mlp", "dcgan"])
def test_recalibrate_batch_norm_gives_the_generators_own_statistics(model):
    torch.manual_seed(0)
    G, _ = make_models(model, (28, 28), 16, fused=True)
    norms = [m for m in G.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)]
    assert norms
    for m in norms:  # stale statistics, as the EMA generator has after its weights moved
        m.running_mean.fill_(5.0)
        m.running_var.fill_(7.0)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a: inputs.setdefault(mod, []).append(a[0].double()))
             for m in norms]
    params = [p.detach().clone() for p in G.parameters()]
    G.eval()
    rng = torch.get_rng_state()
    recalibrate_batch_norm(G, 16, "cpu", seed=3, n=96, batch=32)
    assert torch.equal(torch.get_rng_state(), rng)  # private noise generator
    assert not G.training and all(m.momentum == 0.1 for m in norms)
    assert all(torch.equal(p, q) for p, q in zip(params, G.parameters()))
    for h in hooks:
        h.remove()
    dims = lambda x: [0] + list(range(2, x.dim()))
    for m in norms:
        xs = inputs[m]
        assert len(xs) == 3
        # cumulative average (momentum None) of the three batches' mean and unbiased variance
        mean = torch.stack([x.mean(dims(x)) for x in xs]).mean(0)
        var = torch.stack([x.var(dims(x), unbiased=True) for x in xs]).mean(0)
        torch.testing.assert_close(m.running_mean.double(), mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m.running_var.double(), var, rtol=1e-4, atol=1e-5)
        assert int(m.num_batches_tracked) == 3
    before = [m.running_mean.clone() for m in norms]
    recalibrate_batch_norm(G, 16, "cpu", seed=3, n=96, batch=32)  # same weights, same noise: same bits
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, norms))


def test_ema_checkpoint_holds_recalibrated_statistics(tmp_path):
    s = train(cfg(tmp_path / "r", steps=12, ema=0.9, sample_every=0, ckpt_every=0))
    ck = load_checkpoint(s["checkpoint"])
    assert ck["G_ema_bn"] == "recalibrated"
    G, _, _, c = models_from_checkpoint(ck)
    want = {k: v.clone() for k, v in G.state_dict().items()}
    recalibrate_batch_norm(G, c["z_dim"], "cpu", BN_RECAL_SEED)
    for k, v in G.state_dict().items():
        assert torch.equal(v, want[k]), k
    # a checkpoint written before recalibration existed is recalibrated on load
    ck2 = dict(ck)
    del ck2["G_ema_bn"]
    ck2["G_ema"] = {k: (v.fill_(3.0) if k.endswith("running_mean") else v) for k, v in
                    ((k, v.clone()) for k, v in ck["G_ema"].items())}
    G2, _, _, _ = models_from_checkpoint(ck2)
    for k, v in G2.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_run_stopped_before_its_first_checkpoint_starts_over(tmp_path, capsys):
    """A run killed before (or during) its first save left config.json + metrics.jsonl and no checkpoint: both a
    fresh start and --resume start it over (the same losses as a clean run), and say so."""
    ref = train(cfg(tmp_path / "ref", steps=10, sample_every=0, ckpt_every=0))
    want = [(r["step"], r["loss_d"], r["loss_g"]) for r in map(json.loads, open(tmp_path / "ref" / "metrics.jsonl"))]
    for resume in (False, True):
        out = tmp_path / f"stopped-{resume}"
        out.mkdir()
        (out / "config.json").write_text(json.dumps(dict(cfg(out, steps=10).to_dict(), image_shape=[8, 8])))
        (out / "metrics.jsonl").write_text('{"step": 5, "loss_d": 9.0}\n{"step": 10, "loss_d"')  # cut by the kill
        (out / ".ckpt_00000010.pt.tmp-999999999").write_bytes(b"\0" * 100)  # the killed save's temp file
        capsys.readouterr()
        s = train(cfg(out, steps=10, sample_every=0, ckpt_every=0, resume=resume))
        assert "stopped before its first checkpoint" in capsys.readouterr().out
        got = [(r["step"], r["loss_d"], r["loss_g"]) for r in map(json.loads, open(out / "metrics.jsonl"))]
        assert got == want and s["steps"] == 10
        assert not [n for n in os.listdir(out) if ".tmp-" in n]
        _assert_same(load_checkpoint(s["checkpoint"])["G"], load_checkpoint(ref["checkpoint"])["G"], "G")
