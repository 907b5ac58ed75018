"""gankern.gan.checkpoint: payload checksums, field validation, atomic saves under faults (full disk, SIGKILL at every
I/O event of a save), temp-file clean-up and the run-folder lock (two processes)."""
import errno
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from tolerances import assert_same as _assert_same

from gankern.gan import checkpoint as C
from gankern.gan.checkpoint import (CheckpointError, CheckpointWarning, RunFolder, RunFolderError, RunLockedError,
                                load_checkpoint, payload_checksum, save_atomic, save_checkpoint)
from gankern.gan.config import TrainConfig
from gankern.gan.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def cfg(out, **kw):
    base = dict(steps=4, batch_size=16, out=str(out), sample_every=0, ckpt_every=0, log_every=2,
                final_eval=False, quiet=True, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return train(cfg(out, ema=0.9))["checkpoint"]


def _resave(obj, path, stamp=True):
    """Write an edited checkpoint: re-stamped (a valid checksum over the edited payload) or as torch.save'd."""
    if stamp:
        save_checkpoint(obj, str(path))
    else:
        torch.save(obj, str(path))
    return str(path)


# ------------------------------------------------------------------------------------------------- checksum

def test_checksum_is_stored_and_verified(ckpt_path):
    raw = torch.load(ckpt_path, weights_only=True)
    assert raw["format_version"] == C.CKPT_VERSION == 2
    assert raw[C.CHECKSUM_KEY] == payload_checksum(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a verified checkpoint loads without a warning
        load_checkpoint(ckpt_path)


def test_checksum_covers_bytes_dtype_shape_and_values():
    base = {"a": torch.arange(6, dtype=torch.float32), "b": {"x": 1, "y": [1.5, None, "s"]}, "c": (True, 2)}
    h = payload_checksum(base)
    assert payload_checksum(dict(reversed(list(base.items())))) == h  # key order does not matter
    assert payload_checksum({**base, C.CHECKSUM_KEY: "zz"}) == h      # the checksum entry itself is excluded
    variants = [
        {**base, "a": base["a"].clone().index_fill_(0, torch.tensor([3]), 3.0000002)},  # one value, one ulp
        {**base, "a": base["a"].view(2, 3)},                                            # same bytes, other shape
        {**base, "a": base["a"].view(torch.int32)},                                     # same bytes, other dtype
        {**base, "b": {"x": 2, "y": [1.5, None, "s"]}},
        {**base, "b": {"x": 1, "y": (1.5, None, "s")}},                                  # list vs tuple
        {**base, "c": (1, 2)},                                                          # bool vs int
        {**base, "d": None},
    ]
    assert len({payload_checksum(v) for v in variants} | {h}) == len(variants) + 1
    # non-contiguous and device-independent: the logical contents are hashed
    t = torch.arange(12.0).view(3, 4)
    assert payload_checksum({"t": t.t()}) == payload_checksum({"t": t.t().contiguous()})
    assert payload_checksum({"t": torch.zeros(0, 3)}) != payload_checksum({"t": torch.zeros(3, 0)})
    with pytest.raises(CheckpointError, match="type object"):
        payload_checksum({"bad": object()})


def _flip_tensor_bytes(raw: bytes, t: torch.Tensor, n=4096) -> bytes:
    b = t.contiguous().view(torch.uint8).numpy().tobytes()
    i = raw.find(b)
    assert i >= 0, "tensor bytes not found in the file"
    n = min(n, len(b))
    return raw[:i] + bytes(x ^ 0x5A for x in raw[i:i + n]) + raw[i + n:]


def test_flipped_tensor_bytes_are_detected(ckpt_path, tmp_path):
    ck = torch.load(ckpt_path, weights_only=True)
    raw = open(ckpt_path, "rb").read()
    for key in ("G", "D", "G_ema"):
        name, t = max(ck[key].items(), key=lambda kv: kv[1].numel())  # the largest tensor: 4 KiB inside it
        bad = tmp_path / f"flip_{key}.pt"
        bad.write_bytes(_flip_tensor_bytes(raw, t))
        with pytest.raises(CheckpointError, match=r"flip_.*checksum mismatch.*corrupt"):
            load_checkpoint(str(bad))
    # and through the CLI: one line, exit 2, nothing written
    from gankern.gan.cli import main
    assert main(["sample", "--checkpoint", str(tmp_path / "flip_G.pt"), "--out", str(tmp_path / "s.png")]) == 2
    assert not (tmp_path / "s.png").exists()


def test_edited_payload_with_the_old_checksum_is_refused(ckpt_path, tmp_path):
    ck = torch.load(ckpt_path, weights_only=True)
    for edit in (lambda c: c["D"]["out.bias"].add_(1e-3), lambda c: c.update(step=c["step"] + 1),
                 lambda c: c["config"].update(lr=1.0)):
        c = torch.load(ckpt_path, weights_only=True)
        edit(c)
        with pytest.raises(CheckpointError, match="checksum mismatch"):
            load_checkpoint(_resave(c, tmp_path / "edit.pt", stamp=False))
    del ck[C.CHECKSUM_KEY]
    with pytest.raises(CheckpointError, match="must carry its payload checksum"):
        load_checkpoint(_resave(ck, tmp_path / "nosum.pt", stamp=False))


def test_old_checkpoint_without_checksum_loads_with_a_warning(ckpt_path, tmp_path):
    ck = torch.load(ckpt_path, weights_only=True)
    del ck[C.CHECKSUM_KEY]
    ck["format_version"] = 1
    p = _resave(ck, tmp_path / "v1.pt", stamp=False)
    with pytest.warns(CheckpointWarning, match="carries no checksum"):
        got = load_checkpoint(p)
    assert got["step"] == ck["step"]
    # and the CLI samples from it, printing the warning as one line
    r = subprocess.run([sys.executable, "-m", "gankern", "sample", "--checkpoint", p, "--n", "4", "--out",
                        str(tmp_path / "v1.png"), "--device", "cpu"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines() == [f"gankern: warning: {p}: checkpoint format version 1 carries no checksum "
                                             "(written by an older gankern); loading it unverified"]


# ------------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(step=-5), r"'step' must be an integer >= 0; got -5"),
    (lambda c: c.update(step=2.5), r"'step' must be an integer >= 0; got 2.5"),
    (lambda c: c.update(step=True), r"'step' must be an integer >= 0; got True"),
    (lambda c: c["config"].pop("model"), r"its config lacks 'model'"),
    (lambda c: c["config"].pop("z_dim"), r"its config lacks 'z_dim'"),
    (lambda c: c["config"].update(model="gpt"), r"config\['model'\] must be one of mlp, dcgan"),
    (lambda c: c["config"].update(z_dim=0), r"config\['z_dim'\] must be >= 1"),
    (lambda c: c["config"].update(z_dim="64"), r"config\['z_dim'\] must be int"),
    (lambda c: c.update(config=[1]), r"'config' must be a dict"),
    (lambda c: c.pop("D"), r"missing the entry 'D'"),
    (lambda c: c.pop("image_shape"), r"missing the entry 'image_shape'"),
    (lambda c: c.update(image_shape=[8, 0]), r"'image_shape' must be \[height, width\]"),
    (lambda c: c.update(image_shape=[8]), r"'image_shape' must be \[height, width\]"),
    (lambda c: c.update(G={"w": 1}), r"'G' must be a state_dict"),
    (lambda c: c.update(opt_G={"state": {}}), r"'opt_G' must be an optimizer state_dict"),
    (lambda c: c["rng"].update(torch=torch.zeros(3)), r"'rng' must hold the torch RNG state"),
    (lambda c: c["rng"]["sampler"].update(pos=-1), r"rng\['sampler'\] must hold the sampler state"),
    (lambda c: c.update(ema_updates=-1), r"'ema_updates' must be an integer >= 0"),
    (lambda c: c.update(format_version="2"), r"'format_version' must be an integer"),
    (lambda c: c.update(format_version=99), r"format version 99 is newer"),
])
def test_invalid_fields_are_refused(ckpt_path, tmp_path, edit, match):
    c = torch.load(ckpt_path, weights_only=True)
    edit(c)
    p = tmp_path / "bad.pt"
    torch.save(dict(c, **{C.CHECKSUM_KEY: payload_checksum(c)}), str(p))  # a valid checksum over the edit
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(str(p))


def test_weights_for_another_image_size(ckpt_path, tmp_path):
    from gankern.gan.checkpoint import models_from_checkpoint
    c = load_checkpoint(ckpt_path)
    c["image_shape"] = [28, 28]
    with pytest.raises(CheckpointError, match=r"do not fit a 'mlp' model for 28x28 images.*size mismatch for "
                                              r"out\.(weight|bias).*another image size"):
        models_from_checkpoint(c)


# ------------------------------------------------------------------------------------------------- faults in a save

class _FullDisk:
    """A file whose writes fail with ENOSPC after ``budget`` bytes (what a full disk does)."""

    def __init__(self, f, budget):
        self._f, self.budget = f, budget

    def write(self, b):
        if len(b) > self.budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= len(b)
        return self._f.write(b)

    def __getattr__(self, k):
        return getattr(self._f, k)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return self._f.__exit__(*a)


@pytest.mark.parametrize("budget", [0, 1000, 10 ** 6])
def test_full_disk_during_save(tmp_path, monkeypatch, budget):
    target = tmp_path / "ckpt_00000001.pt"
    obj = {"w": torch.randn(1000, 1000)}  # 4 MB
    monkeypatch.setattr(C, "open", lambda *a, **k: _FullDisk(open(*a, **k), budget), raising=False)
    with pytest.raises(RunFolderError, match=r"cannot write .*ckpt_00000001.pt: the disk is full"):
        save_atomic(obj, str(target))
    assert os.listdir(tmp_path) == []  # no partial checkpoint, no temp file
    # an existing checkpoint of that name survives
    monkeypatch.undo()
    save_checkpoint({"w": torch.ones(3)}, str(target))
    monkeypatch.setattr(C, "open", lambda *a, **k: _FullDisk(open(*a, **k), budget), raising=False)
    with pytest.raises(RunFolderError, match="disk is full"):
        save_checkpoint(obj, str(target))
    assert os.listdir(tmp_path) == [target.name]
    assert torch.equal(torch.load(str(target), weights_only=True)["w"], torch.ones(3))


def test_fsync_failure_removes_the_temp_file(tmp_path, monkeypatch):
    def bad_fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(C.os, "fsync", bad_fsync)
    with pytest.raises(RunFolderError, match="cannot write"):
        save_atomic({"w": torch.ones(2)}, str(tmp_path / "x.pt"))
    assert os.listdir(tmp_path) == []


def test_temp_files_of_dead_writers_are_removed(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        names = {f".ckpt_00000010.pt.tmp-{dead.pid}": False, f".metrics.jsonl.tmp-{dead.pid}": False,
                 f".ckpt_00000020.pt.tmp-{os.getpid()}": False,   # ours, from before this start: stale
                 f".ckpt_00000030.pt.tmp-{live.pid}": True,       # a live writer's: kept
                 "ckpt_00000005.pt": True, "notes.tmp-1": True, ".lock": True}
        for n in names:
            (tmp_path / n).write_bytes(b"x")
        run = RunFolder(tmp_path)
        removed = run.clean_temp_files()
        assert sorted(os.path.basename(p) for p in removed) == sorted(n for n, keep in names.items() if not keep)
        assert sorted(os.listdir(tmp_path)) == sorted(n for n, keep in names.items() if keep)
    finally:
        live.kill()
        live.wait()


def test_train_start_cleans_temp_files(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "r"
    train(cfg(out))
    (out / f".ckpt_00000008.pt.tmp-{dead.pid}").write_bytes(b"\0" * 1000)
    train(cfg(out, steps=6, resume=True))
    assert not [n for n in os.listdir(out) if ".tmp-" in n]


def test_kill_during_saves_then_resume_bit_exact(tmp_path):
    """SIGKILL at every I/O event of a save (and at random moments), resume after each; the final state equals an
    uninterrupted run's bit for bit (CPU, 1 thread in every run)."""
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "_ckpt_kill_child.py"), str(tmp_path), str(report),
                        "0"], capture_output=True, text=True, env=ENV, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.load(open(report))
    assert rep["ref"]["exit"] == 0 and not rep["errors"], rep
    children = rep["children"]
    kills = [c for c in children if c["kill"] and c["kill"][0] != "random"]
    assert len(kills) == 9 and all(c["signal"] == 9 for c in kills), kills  # each died at its kill point
    assert kills[0]["after"]["checkpoints"] == [] and kills[0]["after"]["temps"]  # killed in the first save
    assert kills[1]["before"]["checkpoints"] == []  # ... and the next --resume started the run over
    assert any(c["before"]["checkpoints"] for c in kills)  # later kills hit a save with a checkpoint present
    for c in children:
        # temp files of the killed runs are gone once the next run started; only the dying run's own may remain
        assert all(t.endswith(f".tmp-{c['pid']}") for t in c["after"]["temps"]), c
        assert len(c["after"]["checkpoints"]) <= 2
    assert children[-1]["exit"] == 0 and children[-1]["after"] == {"checkpoints": ["ckpt_00000012.pt"], "temps": []}
    a = load_checkpoint(str(tmp_path / "ref" / "ckpt_00000012.pt"))
    b = load_checkpoint(str(tmp_path / "run" / "ckpt_00000012.pt"))
    for k in ("G", "D", "G_ema", "opt_G", "opt_D", "rng", "step", "ema_updates"):
        _assert_same(a[k], b[k], k)

    def losses(d):
        return [(x["step"], x["loss_d"], x["loss_g"], x["d_x"], x["d_g_z"]) for x in map(json.loads, open(d / "metrics.jsonl"))]
    assert losses(tmp_path / "run") == losses(tmp_path / "ref") and len(losses(tmp_path / "ref")) == 12


# ------------------------------------------------------------------------------------------------- the lock

_HOLDER = textwrap.dedent("""
    import sys
    from gankern.gan.checkpoint import RunFolder
    run = RunFolder(sys.argv[1]).lock()
    print("locked", flush=True)
    sys.stdin.read()   # hold the lock until the parent closes stdin
""")


def test_second_trainer_on_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    train(cfg(out))
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"run folder '{out}' is in use by another gankern trainer "
                                                 rf"\(pid {holder.pid}\)"):
            train(cfg(out, steps=8, resume=True))
        with pytest.raises(RunLockedError, match="in use"):
            train(cfg(out))
        # a second process through the CLI: one line, exit 2, metrics.jsonl untouched
        before = open(out / "metrics.jsonl").read()
        for extra in (["--resume"], []):
            r = subprocess.run([sys.executable, "-m", "gankern", "train", "--out", str(out), "--steps", "8", "--quiet",
                                "--no-eval", "--device", "cpu", *extra], capture_output=True, text=True, env=ENV)
            assert r.returncode == 2
            assert r.stderr.strip().splitlines() == [
                f"gankern: error: run folder '{out}' is in use by another gankern trainer (pid {holder.pid}): wait for "
                "it to finish or stop it, or choose another --out"]
        assert open(out / "metrics.jsonl").read() == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert train(cfg(out, steps=6, resume=True))["steps"] == 6  # released when the holder exits


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunLockedError):
        RunFolder(tmp_path).lock()
    holder.kill()
    holder.wait()
    with RunFolder(tmp_path) as run:
        assert run._lock_fd is not None
    holder.stdin.close()


def test_run_folder_errors(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RunFolderError, match=rf"--out '{f}/sub': cannot create it as a folder: '{f}' is a file"):
        RunFolder(f / "sub").lock()
    with pytest.raises(RunFolderError, match=rf"--out '{f}': cannot create it as a folder: it is a file"):
        RunFolder(f).lock()
    real_open = os.open

    def denied(path, *a, **k):
        if str(path).endswith(C.LOCK_NAME):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *a, **k)
    monkeypatch.setattr(C.os, "open", denied)
    with pytest.raises(RunFolderError, match=r"cannot write in the run folder \(Permission denied\)"):
        RunFolder(tmp_path / "ro").lock()
