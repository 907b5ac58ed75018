"""gankern CLI: --help of every command, train -> sample (png/npy) -> eval on a tiny run, errors, info."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from gankern.gan.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("cmd", [[], ["train"], ["sample"], ["eval"], ["bench"], ["info"]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(cmd + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: gankern" in out
    if cmd == ["train"]:
        for flag in ("--model", "--dataset", "--data-dir", "--steps", "--batch-size", "--lr", "--z-dim", "--seed",
                     "--device", "--backend", "--out", "--resume", "--real-label", "--ema", "--keep",
                     "--sample-every", "--demo", "--quiet", "--compare-torch"):
            assert flag in out, flag


def test_train_options_are_the_trainconfig_fields():
    """gankern train has one option per TrainConfig field (its help from the field); not given = None, so
    TrainConfig's defaults (or a resumed run's settings) apply."""
    import dataclasses
    from gankern.gan.cli import build_parser
    from gankern.gan.config import TrainConfig
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    args = build_parser().parse_args(["train"])
    assert all(getattr(args, n) is None for n in names)
    a = build_parser().parse_args(["train", "--no-eval", "--no-lr-decay", "--ema", "--no-sync-bn", "--steps", "2e3",
                                   "--lr-d", "1e-3"])
    assert (a.final_eval, a.lr_decay, a.ema, a.sync_bn, a.steps, a.lr_d) == (False, [], 0.999, False, 2000, 1e-3)
    assert all(f.metadata["help"] for f in dataclasses.fields(TrainConfig))


def test_old_module_paths_still_work():
    """The application moved to gankern.gan; the old module paths are the same modules (or re-export them)."""
    import importlib
    for name in ("models", "data", "metrics", "checkpoint", "cli"):
        assert importlib.import_module(f"gankern.{name}") is importlib.import_module(f"gankern.gan.{name}"), name
    from gankern.train import (DEMO, CheckpointError, ConfigError, TrainConfig, WeightCasts, compare_speed,  # noqa
                               free_run_dir, generate, load_checkpoint, make_optimizers, make_train_step,
                               models_from_checkpoint, recalibrate_batch_norm, resolve_device, save_grid, time_steps,
                               train, validate_config)
    import gankern.gan.trainer
    assert train is gankern.gan.trainer.train
    from gankern.distributed import DistContext, convert_sync_batchnorm, rank_seed, setup  # noqa: F401
    import gankern.gan.distributed
    assert DistContext is gankern.gan.distributed.DistContext


def test_the_kernel_library_does_not_import_the_application():
    code = ("import sys, gankern, gankern.nn, gankern.fuse, gankern.distributed; "
            "sys.exit(sorted(m for m in sys.modules if m.startswith('gankern.gan')) or 0)")
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_python_dash_m():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "gankern", "--help"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0 and "train" in r.stdout and "info" in r.stdout


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    rc = main(["train", "--steps", "12", "--batch-size", "16", "--out", str(out), "--quiet",
               "--sample-every", "0", "--device", "cpu", "--ema", "0.9"])
    assert rc == 0
    return out


def test_sample_png_and_npy(tiny_run, tmp_path, capsys):
    ck = str(tiny_run / "ckpt_00000012.pt")
    assert main(["sample", "--checkpoint", ck, "--n", "10", "--out", str(tmp_path / "g.png")]) == 0
    from PIL import Image
    assert Image.open(tmp_path / "g.png").size[0] > 8
    assert main(["sample", "--checkpoint", ck, "--n", "10", "--out", str(tmp_path / "s.npy")]) == 0
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (10, 64) and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
    assert main(["sample", "--checkpoint", ck, "--n", "10", "--out", str(tmp_path / "t.npy"), "--no-ema"]) == 0
    assert not np.array_equal(np.load(tmp_path / "t.npy"), x)  # EMA and raw generator differ
    assert "shape (10, 64)" in capsys.readouterr().out


def test_eval(tiny_run, capsys):
    assert main(["eval", "--checkpoint", str(tiny_run / "ckpt_00000012.pt"), "--json"]) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert m["step"] == 12 and m["fd"] > 0 and m["fd_floor"] > 0 and 0 <= m["classes_covered"] <= 10
    assert len(m["class_hist"]) == 10 and abs(sum(m["class_hist"]) - 1) < 1e-3
    # the trainer's final metric (same generator, noise seed and classifier) is reproduced exactly
    final = json.load(open(tiny_run / "final_metrics.json"))["quality"]
    assert final["fd"] == m["fd"] and final["class_hist"] == m["class_hist"]


def test_demo_picks_a_free_folder(tmp_path):
    from gankern.gan.config import free_run_dir
    base = str(tmp_path / "demo")
    assert free_run_dir(base) == base
    os.makedirs(base)
    open(os.path.join(base, "metrics.jsonl"), "w").close()
    assert free_run_dir(base) == base + "-2"


def _error_line(capsys, argv, code=2):
    """Run the CLI in-process; assert it failed with ``code`` and exactly one stderr line 'gankern: error: ...'."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors
        rc = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == code, err
    assert len(lines) == 1 and lines[0].startswith("gankern: error: "), err
    assert "Traceback" not in err
    return lines[0]


TRAIN = ["train", "--steps", "2", "--batch-size", "8", "--quiet", "--no-eval", "--sample-every", "0", "--device", "cpu"]


def test_errors(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 10)
    assert "bad.pt" in _error_line(capsys, ["sample", "--checkpoint", str(bad), "--out", str(tmp_path / "x.png")])
    assert "train-images-idx3-ubyte" in _error_line(capsys, ["train", "--dataset", "mnist", "--data-dir", str(tmp_path),
                                                             "--out", str(tmp_path / "r")])
    assert "argument --real-label: expected a finite number in (0.0, 1.0]; got 1.5" in \
        _error_line(capsys, ["train", "--real-label", "1.5", "--out", str(tmp_path / "r2")])
    line = _error_line(capsys, ["train", "--model", "gpt"])
    assert "argument --model: invalid choice: 'gpt'" in line and "gankern train --help" in line
    assert not (tmp_path / "r2").exists()  # settings are checked before the run folder is made


def _write_idx(d, n=32, h=28, w=28):
    import struct
    d.mkdir(parents=True, exist_ok=True)
    (d / "train-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 2051, n, h, w) + bytes(range(256)) * (n * h * w // 256)
                                                + bytes(n * h * w % 256))
    (d / "train-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, n) + bytes(i % 10 for i in range(n)))
    return d


def test_error_corrupt_gzip(tmp_path, capsys):
    import gzip
    raw = gzip.compress(b"\x00\x00\x08\x03" + b"\x00\x00\x00\x02" * 3 + bytes(range(256)) * 20)
    raw = raw[:12] + bytes(b ^ 0xFF for b in raw[12:40]) + raw[40:]  # a corrupt deflate stream (zlib.error)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(raw)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(raw)
    line = _error_line(capsys, TRAIN + ["--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")])
    assert "train-images-idx3-ubyte.gz: corrupt compressed data (zlib.error" in line


@pytest.mark.parametrize("flag, value, expect", [
    ("--lr", "inf", "argument --lr: expected a finite number > 0.0; got inf"),
    ("--lr", "nan", "argument --lr: expected a finite number > 0.0; got nan"),
    ("--lr", "-1e-4", "argument --lr: expected a finite number > 0.0; got -0.0001"),
    ("--lr", "0", "argument --lr: expected a finite number > 0.0; got 0.0"),
    ("--lr-d", "inf", "argument --lr-d: expected a finite number > 0.0; got inf"),
    ("--beta1", "1", "argument --beta1: expected a finite number in [0.0, 1.0); got 1.0"),
    ("--beta2", "-0.1", "argument --beta2: expected a finite number in [0.0, 1.0); got -0.1"),
    ("--ema", "1.5", "argument --ema: expected a finite number in [0.0, 1.0); got 1.5"),
    ("--real-label", "nan", "argument --real-label: expected a finite number in (0.0, 1.0]; got nan"),
    ("--steps", "0", "argument --steps: expected an integer >= 1; got 0"),
    ("--batch-size", "-3", "argument --batch-size: expected an integer >= 1; got -3"),
    ("--batch-size", "100000", "argument --batch-size: expected at most the dataset size (digits: 1797 images)"),
    ("--ckpt-every", "-1", "argument --ckpt-every: expected an integer >= 0; got -1"),
    ("--seed", "-1", "argument --seed: expected an integer in 0..1099511627775; got -1"),
    ("--seed", str(2 ** 70), "argument --seed: expected an integer in 0..1099511627775"),
    ("--z-dim", "2e8", "argument --z-dim: expected an integer in 1..1048576; got 200000000"),
    ("--z-dim", "1.5", "train: argument --z-dim: expected an integer; got '1.5'"),
    ("--threads", "-1", "train: argument --threads: expected a number of threads >= 1; got '-1'"),
    ("--threads", "0", "train: argument --threads: expected a number of threads >= 1; got '0'"),
    ("--device", "bogus", "argument --device: expected auto, cpu, cuda or cuda:N; got 'bogus'"),
    ("--device", "meta", "argument --device: expected auto, cpu, cuda or cuda:N; got 'meta'"),
])
def test_error_bad_settings(tmp_path, capsys, flag, value, expect):
    argv = [a for a in TRAIN if a not in ("--device", "cpu")] if flag == "--device" else list(TRAIN)
    line = _error_line(capsys, argv + [f"{flag}={value}", "--out", str(tmp_path / "r")])
    assert expect in line, line
    assert not (tmp_path / "r" / "config.json").exists()  # nothing written (the dataset size needs the folder lock)


def test_error_lr_decay(tmp_path, capsys):
    line = _error_line(capsys, TRAIN + ["--lr-decay", "8", "4", "--out", str(tmp_path / "r")])
    assert "argument --lr-decay: lr_decay must be two steps START < END" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU-only case")
def test_error_cuda_device_and_backend_that_cannot_run(tmp_path, capsys, monkeypatch):
    assert "argument --device: 'cuda' was requested but torch.cuda.is_available() is False" in \
        _error_line(capsys, [a for a in TRAIN if a not in ("--device", "cpu")] + ["--device", "cuda", "--out", str(tmp_path)])
    assert "argument --backend: 'cuda' cannot run on device 'cpu' here" in \
        _error_line(capsys, TRAIN + ["--backend", "cuda", "--out", str(tmp_path / "r")])
    from gankern import _backends
    monkeypatch.setattr(_backends, "_triton_interpret", lambda: False)  # triton on CPU without the interpreter
    line = _error_line(capsys, TRAIN + ["--backend", "triton", "--out", str(tmp_path / "r")])
    assert "argument --backend: 'triton' cannot run on device 'cpu' here" in line
    assert not (tmp_path / "r").exists()


def test_error_out_under_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    line = _error_line(capsys, TRAIN + ["--out", str(f / "sub")])
    assert line == f"gankern: error: --out '{f}/sub': cannot create it as a folder: '{f}' is a file, not a folder"


def test_error_unwritable_folder(tmp_path, capsys, monkeypatch):
    # tests run as root (permissions do not apply): the folder refuses new files as a read-only one would
    from gankern.gan import checkpoint as C
    real = os.open

    def readonly(path, flags, *a, **k):
        if str(path).startswith(str(tmp_path / "ro")) and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, flags, *a, **k)
    monkeypatch.setattr(C.os, "open", readonly)
    line = _error_line(capsys, TRAIN + ["--out", str(tmp_path / "ro")])
    assert line == f"gankern: error: --out '{tmp_path / 'ro'}': cannot write in the run folder (Permission denied)"


def test_error_full_disk_during_save(tmp_path, capsys, monkeypatch):
    from gankern.gan import checkpoint as C
    real = open

    class Full:
        def __init__(self, f):
            self._f = f

        def write(self, b):
            raise OSError(28, "No space left on device")

        def __getattr__(self, k):
            return getattr(self._f, k)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return self._f.__exit__(*a)
    monkeypatch.setattr(C, "open", lambda p, mode="r", *a, **k: Full(real(p, mode, *a, **k)) if "ckpt_" in str(p)
                        else real(p, mode, *a, **k), raising=False)
    out = tmp_path / "r"
    line = _error_line(capsys, TRAIN + ["--out", str(out)])
    assert f"cannot write {out}/ckpt_00000002.pt: the disk is full (no space left on device)" in line
    assert not [n for n in os.listdir(out) if n.startswith("ckpt_") or ".tmp-" in n]  # no partial checkpoint


def test_error_checkpoint_for_another_image_size(tmp_path, capsys):
    from gankern.gan.checkpoint import load_checkpoint, save_checkpoint
    d28, d32 = _write_idx(tmp_path / "m28"), _write_idx(tmp_path / "m32", h=32, w=32)
    out = tmp_path / "r"
    assert main(TRAIN + ["--dataset", "mnist", "--data-dir", str(d28), "--out", str(out)]) == 0
    capsys.readouterr()
    line = _error_line(capsys, TRAIN + ["--out", str(out), "--resume", "--steps", "4", "--data-dir", str(d32)])
    assert "was trained on 28x28 images but the data (dataset mnist, --data-dir" in line and "32x32" in line
    ck = load_checkpoint(str(out / "ckpt_00000002.pt"))
    ck["image_shape"] = [8, 8]
    save_checkpoint(ck, str(tmp_path / "edited.pt"))  # valid checksum, weights for 28x28
    line = _error_line(capsys, ["sample", "--checkpoint", str(tmp_path / "edited.pt"), "--out", str(tmp_path / "s.png")])
    assert "the generator weights do not fit a 'mlp' model for 8x8 images with z_dim 64 (size mismatch for out." in line
    line = _error_line(capsys, ["eval", "--checkpoint", str(out / "ckpt_00000002.pt"), "--data-dir", str(d32)])
    assert "the checkpoint makes 28x28 images but dataset mnist has 32x32" in line


def test_error_config_missing_model(tiny_run, tmp_path, capsys):
    from gankern.gan.checkpoint import load_checkpoint, save_checkpoint
    ck = load_checkpoint(str(tiny_run / "ckpt_00000012.pt"))
    del ck["config"]["model"]
    save_checkpoint(ck, str(tmp_path / "nomodel.pt"))
    for cmd in (["sample", "--out", str(tmp_path / "s.png")], ["eval"]):
        line = _error_line(capsys, cmd + ["--checkpoint", str(tmp_path / "nomodel.pt")])
        assert "nomodel.pt: invalid gankern checkpoint: its config lacks 'model'" in line


def test_error_too_much_memory(tiny_run, tmp_path, capsys, monkeypatch):
    from gankern.gan import config as T
    ck = str(tiny_run / "ckpt_00000012.pt")
    assert "argument --n: an image grid holds at most 65536 samples; got 100000000" in \
        _error_line(capsys, ["sample", "--checkpoint", ck, "--n", "1e8", "--out", str(tmp_path / "g.png")])
    monkeypatch.setattr(T, "available_memory", lambda device: 2 ** 30)  # the same on any machine: 1 GiB free
    line = _error_line(capsys, ["sample", "--checkpoint", ck, "--n", "1e8", "--out", str(tmp_path / "s.npy")])
    assert "argument --n: 100000000 samples: needs about 71.5 GiB of memory but only 1.0 GiB is available" in line
    line = _error_line(capsys, TRAIN + ["--z-dim", "1048576", "--out", str(tmp_path / "r")])
    assert "the mlp GAN for 8x8 images with --z-dim 1048576 and --batch-size 8: needs about" in line
    assert not (tmp_path / "s.npy").exists()


def test_error_out_of_memory_from_the_allocator(tiny_run, tmp_path, capsys, monkeypatch):
    from gankern.gan import models as T

    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 25600000000 bytes.\nError code 12")
    monkeypatch.setattr(T, "generate", oom)
    line = _error_line(capsys, ["sample", "--checkpoint", str(tiny_run / "ckpt_00000012.pt"), "--out",
                                str(tmp_path / "s.npy")])
    assert line.startswith("gankern: error: out of memory (RuntimeError: [enforce fail") and "lower --n" in line


def test_error_sample_out(tiny_run, tmp_path, capsys):
    ck = str(tiny_run / "ckpt_00000012.pt")
    f = tmp_path / "file"
    f.write_text("x")
    assert _error_line(capsys, ["sample", "--checkpoint", ck, "--out", str(f / "x.png")]) == \
        f"gankern: error: argument --out '{f}/x.png': cannot create its folder: '{f}' is a file, not a folder"
    assert _error_line(capsys, ["sample", "--checkpoint", ck, "--out", str(f / "a" / "x.npy")]) == \
        f"gankern: error: argument --out '{f}/a/x.npy': cannot create its folder: '{f}' is a file, not a folder"
    assert "argument --out: expected a path ending in .png (image grid) or .npy" in \
        _error_line(capsys, ["sample", "--checkpoint", ck, "--out", str(tmp_path / "samples")])
    assert "is a folder" in _error_line(capsys, ["sample", "--checkpoint", ck, "--out", str(tmp_path)])
    assert "argument --n: expected an integer >= 1; got 0" in \
        _error_line(capsys, ["sample", "--checkpoint", ck, "--n", "0", "--out", str(tmp_path / "a.png")])
    assert "does not exist" in _error_line(capsys, ["sample", "--checkpoint", str(tmp_path / "nope.pt")])


def test_error_run_folder_states(tmp_path, capsys):
    out = tmp_path / "r"
    assert "no checkpoint (ckpt_XXXXXXXX.pt) found" in _error_line(capsys, TRAIN + ["--out", str(out), "--resume"])
    assert main(TRAIN + ["--out", str(out)]) == 0
    capsys.readouterr()
    line = _error_line(capsys, TRAIN + ["--out", str(out)])
    assert "already holds a run" in line and "pass --resume" in line


def test_internal_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    from gankern.gan import trainer as T

    def bug(*a, **k):
        raise TypeError("unexpected thing")
    monkeypatch.setattr(T, "train", bug)
    line = _error_line(capsys, TRAIN + ["--out", str(tmp_path / "r")], code=1)
    assert line == ("gankern: error: internal error: TypeError: unexpected thing (run with --debug for the traceback "
                    "and please report it)")
    for argv, env in ((["--debug"] + TRAIN, {}), (TRAIN + ["--debug"], {}), (TRAIN, {"GANKERN_DEBUG": "1"})):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert main(argv + ["--out", str(tmp_path / "r")]) == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "\nTypeError: unexpected thing\n" in err
        assert err.strip().splitlines()[-1].startswith("gankern: error: internal error: TypeError")


def test_debug_in_a_subprocess(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = [sys.executable, "-m", "gankern", *TRAIN, "--lr", "inf", "--out", str(tmp_path / "r")]
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "gankern: error: argument --lr: expected a finite number > 0.0; got inf"]
    r = subprocess.run(argv + ["--debug"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" in r.stderr and "ConfigError" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "gankern: error: argument --lr: expected a finite number > 0.0; got inf"


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "reference" in out and "cpp" in out
