"""Driver process for tests/test_checkpoint.py::test_kill_during_saves_then_resume_bit_exact.

usage: python _ckpt_kill_child.py WORKDIR REPORT.json SEED

Imports torch once (1 thread, no parallel work in this process), then runs every training run in a forked child:

1. ``WORKDIR/ref``: an uninterrupted run (the reference), whose first save's I/O events are recorded;
2. ``WORKDIR/run``: a chain of runs, each started with ``--resume`` semantics (the first fresh) and SIGKILLed by
   itself at one I/O event of its first checkpoint save: opening the temp file, a ``write`` of torch.save's stream
   (before the bytes go out: the first, second, middle and last), the file's ``fsync``, ``os.replace``, the folder's
   ``fsync`` after it, and the ``os.remove`` that prunes the older checkpoint (``keep=1``);
3. more runs of the chain that save every step, killed by this process with SIGKILL at a random moment (seeded)
   of their 1st, 2nd or 3rd save;
4. a last run that completes.

The report lists, for every child, what killed it and what the folder held afterwards; the test compares the
final checkpoint and metrics of ``run`` with ``ref`` bit for bit.
"""
import json
import os
import random
import signal
import sys
import time

import torch

torch.set_num_threads(1)

import gankern.gan.checkpoint as C  # noqa: E402
from gankern.gan.config import TrainConfig  # noqa: E402
from gankern.gan.trainer import train  # noqa: E402

work, report_path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
STEPS = 12
events, in_save, kill_at, record, notify = [], [False], [None], [None], [None]


def tick(what):
    if not in_save[0]:
        return
    events.append(what)
    if kill_at[0] is not None:
        name, nth = kill_at[0]
        if what == name and events.count(name) == nth:
            os.kill(os.getpid(), signal.SIGKILL)


class _Proxy:
    def __init__(self, f):
        self._f = f

    def write(self, b):
        tick("write")
        return self._f.write(b)

    def __getattr__(self, k):
        return getattr(self._f, k)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return self._f.__exit__(*a)


_open = open


def _popen(*a, **k):
    f = _open(*a, **k)
    if not in_save[0]:
        return f
    tick("open")
    return _Proxy(f)


C.open = _popen
for _name in ("fsync", "replace", "remove"):
    def _wrap(*a, _orig=getattr(os, _name), _n=_name, **k):
        tick(_n)
        return _orig(*a, **k)
    setattr(os, _name, _wrap)
_save = C.RunFolder.save_checkpoint


def _counted_save(*a, **k):
    in_save[0] = True
    if notify[0] is not None:
        os.write(notify[0], b"s")  # a save starts
    t = time.perf_counter()
    try:
        return _save(*a, **k)
    finally:
        in_save[0] = False
        if record[0]:
            with _open(record[0], "w") as f:
                json.dump({"events": events, "seconds": time.perf_counter() - t}, f)
            record[0] = None


C.RunFolder.save_checkpoint = _counted_save


def cfg(out, resume, ckpt_every=2):
    return TrainConfig(steps=STEPS, batch_size=16, out=out, resume=resume, sample_every=0, ckpt_every=ckpt_every,
                       keep=1, log_every=1, final_eval=False, quiet=True, device="cpu", ema=0.9, lr_decay=[3, 12])


def child(out, resume, kill=None, ckpt_every=2, record_to=None, notify_fd=None):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            kill_at[0], record[0], notify[0] = kill, record_to, notify_fd
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            train(cfg(out, resume, ckpt_every))
        except BaseException as e:  # noqa: BLE001 - report and exit non-zero
            with _open(os.path.join(work, f"error-{os.getpid()}.txt"), "w") as f:
                f.write(f"{type(e).__name__}: {e}")
            code = 1
        os._exit(code)
    return pid


def wait(pid):
    _, status = os.waitpid(pid, 0)
    return {"pid": pid, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}


def folder(out):
    names = sorted(os.listdir(out)) if os.path.isdir(out) else []
    return {"checkpoints": [n for n in names if n.startswith("ckpt_")], "temps": [n for n in names if ".tmp-" in n]}


rep = {"children": []}
t = time.perf_counter()
r = wait(child(os.path.join(work, "ref"), False, record_to=os.path.join(work, "events.json")))
rep["ref"] = dict(r, seconds=time.perf_counter() - t)
first_save = json.load(open(os.path.join(work, "events.json")))
ev = first_save["events"]
n_writes = ev.count("write")
rep["events_per_save"] = len(ev)
run = os.path.join(work, "run")
# kill points; the first five hit the run's very first save (no checkpoint yet), the others a later one
plan = [("open", 1), ("write", 1), ("write", 2), ("write", n_writes // 2), ("fsync", 2), ("write", n_writes),
        ("fsync", 1), ("replace", 1), ("remove", 1)]
for i, kill in enumerate(plan):
    before = folder(run)
    r = wait(child(run, resume=i > 0, kill=kill))
    rep["children"].append(dict(r, kill=list(kill), before=before, after=folder(run)))
rng = random.Random(seed)
for _ in range(3):
    before = folder(run)
    r_fd, w_fd = os.pipe()
    pid = child(run, resume=True, ckpt_every=1, notify_fd=w_fd)
    os.close(w_fd)
    for _ in range(rng.randrange(1, 4)):  # the 1st, 2nd or 3rd save of this run ...
        os.read(r_fd, 1)
    os.close(r_fd)
    delay = rng.uniform(0.0, 1.2) * first_save["seconds"]  # ... at a random moment in it (or just after)
    time.sleep(delay)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    r = wait(pid)
    rep["children"].append(dict(r, kill=["random", round(delay, 3)], before=before, after=folder(run)))
before = folder(run)
r = wait(child(run, resume=True))
rep["children"].append(dict(r, kill=None, before=before, after=folder(run)))
rep["errors"] = {n: open(os.path.join(work, n)).read() for n in os.listdir(work) if n.startswith("error-")}
with _open(report_path, "w") as f:
    json.dump(rep, f, indent=1)
