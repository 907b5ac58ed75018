"""gankern CLI: --help of every command, train -> sample (png/npy) -> eval on a tiny run, errors, info."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gankern.cli import main

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
    from gankern.train import free_run_dir
    base = str(tmp_path / "demo")
    assert free_run_dir(base) == base
    os.makedirs(base)
    open(os.path.join(base, "metrics.jsonl"), "w").close()
    assert free_run_dir(base) == base + "-2"


def test_errors(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 10)
    assert main(["sample", "--checkpoint", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert "bad.pt" in capsys.readouterr().err
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "train-images-idx3-ubyte" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--real-label must be in"):
        main(["train", "--real-label", "1.5", "--out", str(tmp_path / "r2")])
    with pytest.raises(SystemExit):
        main(["train", "--model", "gpt"])


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "reference" in out and "cpp" in out
