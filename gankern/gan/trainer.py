"""The GAN trainer: a step-based loop with checkpoints, exact resume, samples, plots and metrics.

Three objects with one job each:
  * ``TrainStep`` (``gankern.gan.step``): one D + G update; models, optimizers, scaler/precision, EMA,
    and their ``state_dict`` / ``load_state_dict``;
  * ``RunFolder`` (``gankern.gan.checkpoint``): the run folder's lock, checkpoints, metrics.jsonl and JSON files;
  * ``Trainer`` (here): the loop around them: settings of a resumed run, data, progress output (tqdm on a
    terminal), samples, evaluation, checkpoints, the final summary.
``train(cfg)`` validates the settings (``TrainConfig.validate``), joins the torchrun job if there is one, locks
the run folder and runs a ``Trainer``.

Run folder (``--out``): config.json, metrics.jsonl, samples/step_XXXXXXX.png (fixed noise),
loss.png, final_metrics.json, ckpt_XXXXXXXX.pt (the last ``keep``), .lock (held while a trainer runs).
"""
from __future__ import annotations

import contextlib
import copy
import glob
import json
import math
import os
import sys
import time

import torch

from .. import __version__
from . import distributed
from .checkpoint import CheckpointError, RunFolder, checkpoint_payload, load_checkpoint, load_state
from .config import (LOCKED, ConfigError, TrainConfig, check_memory, lr_factor, resolve_device,
                     resolve_lr_decay, training_memory)
from .data import InfiniteSampler, load_dataset
from .images import plot_losses, save_grid
from .models import generate, make_models
from .step import StateError, TrainStep, make_optimizers

__all__ = ["train", "Trainer", "EVAL_NOISE_SEED", "SAMPLE_NOISE_OFFSET"]

EVAL_NOISE_SEED = 0      # noise of the quality metric (as `gankern eval`'s default --seed 0)
SAMPLE_NOISE_OFFSET = 7  # the sample grids' fixed noise: seed cfg.seed + 7


def train(cfg: TrainConfig, explicit: set | None = None) -> dict:
    """Run (or resume) a training run; returns a summary dict (also written to the run folder).

    ``explicit``: the settings given on the command line (a ``--resume`` refuses to change the run's own).
    Under torchrun (``torchrun --nproc_per_node=N -m gankern train ...``) each process runs one rank of a
    DistributedDataParallel job (``gankern.gan.distributed``): ``batch_size`` is the global batch, rank 0
    alone writes the run folder.
    The settings are validated first (``TrainConfig.validate``); the run folder is locked for the whole run
    (``RunLockedError`` if another trainer holds it; under torchrun rank 0 holds the lock) and temp files of
    killed saves are removed.
    """
    cfg.validate()
    dctx = distributed.setup(resolve_device(cfg.device))
    with dctx.guard():
        cfg.out = dctx.share(lambda: cfg.out)  # rank 0's folder (e.g. --demo's free_run_dir)
        run = RunFolder(cfg.out)
        with contextlib.ExitStack() as held:
            def take_lock():  # on rank 0; a refusal is raised on every rank
                held.enter_context(run.lock())
                run.clean_temp_files()
            dctx.share(take_lock)
            return Trainer(cfg, set(explicit or ()), dctx, run).run()


class _Log:
    def __init__(self, quiet):
        self.quiet = quiet

    def __call__(self, *a):
        if not self.quiet:
            print(*a, flush=True)


class _Progress:
    """The loop's output: a metrics.jsonl row every ``log_every`` steps (means over the ranks), a tqdm bar on a
    terminal, else a line every ~10% of the run; ``eval`` rows in between."""

    def __init__(self, cfg, dctx, run, start, log):
        self.dctx, self.log, self.total = dctx, log, cfg.steps
        self.bar = None
        if not cfg.quiet and dctx.is_main and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, initial=start, unit="step", dynamic_ncols=True, smoothing=0.05)
        self.print_every = max(cfg.log_every, (self.total - start) // 10 or 1)
        try:
            self.file = run.open_metrics() if dctx.is_main else open(os.devnull, "a")
        except BaseException:
            self.close_bar()
            raise
        self.t0 = time.perf_counter()
        self.t_last, self.s_last = self.t0, start

    def losses(self, step, loss_d, loss_g, d_real, d_fake):
        now = time.perf_counter()
        sps = (step - self.s_last) / max(now - self.t_last, 1e-9)
        self.t_last, self.s_last = now, step
        with torch.no_grad():  # means over all ranks (one all-reduce under torchrun)
            v = self.dctx.mean(torch.stack([loss_d.float(), loss_g.float(), torch.sigmoid(d_real.float()).mean(),
                                            torch.sigmoid(d_fake.float()).mean()])).tolist()
        row = {"step": step, "loss_d": v[0], "loss_g": v[1], "d_x": v[2], "d_g_z": v[3],
               "steps_per_s": round(sps, 2), "time": round(now - self.t0, 3)}
        if not all(math.isfinite(row[k]) for k in ("loss_d", "loss_g")):
            raise FloatingPointError(f"non-finite loss at step {step}: {row}")
        self._write(row)
        if self.bar is not None:
            self.bar.set_postfix(loss_d=f"{row['loss_d']:.3f}", loss_g=f"{row['loss_g']:.3f}", refresh=False)
        elif step % self.print_every == 0 or step == self.total:
            self.log(f"step {step}/{self.total}  loss_d {row['loss_d']:.3f}  loss_g {row['loss_g']:.3f}  "
                     f"D(x) {row['d_x']:.2f}  D(G(z)) {row['d_g_z']:.2f}  {sps:.1f} steps/s")

    def eval(self, step, m):
        self._write({"step": step, "eval": m})
        self.log(f"step {step}: FD {m['fd']:.3f} (floor {m['fd_floor']:.3f}, {m['fd_ratio']:.2f}x), "
                 f"{m['classes_covered']}/10 classes")

    def _write(self, row):
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def advance(self):
        if self.bar is not None:
            self.bar.update(1)

    def close_bar(self):
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close_bar()
        self.file.close()
        return False


class Trainer:
    """One training run on one rank: ``run()`` adopts a resumed run's settings, loads the data, builds the
    ``TrainStep``, restores it from the checkpoint (or checks the folder is free), trains, and reports."""

    def __init__(self, cfg: TrainConfig, explicit: set, dctx, run: RunFolder):
        self.cfg, self.explicit, self.dctx, self.run_dir = cfg, explicit, dctx, run
        self.log = _Log(cfg.quiet or not dctx.is_main)
        self.device = dctx.device
        self.data = self.step = self.sampler = self.x = None
        self._quality = None

    def run(self) -> dict:
        cfg = self.cfg  # validated by train() (TrainConfig.validate)
        cfg.lr_decay = resolve_lr_decay(cfg.lr_decay, cfg.steps)  # "auto" -> the second half of this run's steps
        if self.dctx.is_main:
            os.makedirs(cfg.out, exist_ok=True)
        path, ckpt, restart = self._adopt_resumed_run() if cfg.resume else (None, None, False)
        self._load_data(ckpt, path)
        self._build()
        start = self._restore(ckpt, path) if ckpt is not None else self._start_fresh(restart)
        self._write_config()
        elapsed = self._loop(start)
        return self._finish(start, elapsed)

    # ---------------------------------------------------------------- set-up
    def _read_resume(self):
        """(path, checkpoint, saved settings) of the run in the folder (on rank 0)."""
        run = self.run_dir
        p = run.latest_checkpoint()
        if p is None and not run.has_run():
            raise CheckpointError(f"--resume: no checkpoint (ckpt_XXXXXXXX.pt) found in {self.cfg.out!r} and no run "
                                  "to continue there; to start a new run, leave out --resume")
        if p is None:
            return p, None, run.read_config() or {}
        ck = load_checkpoint(p, map_location="cpu" if self.dctx.enabled else self.device)
        return p, ck, ck["config"]

    def _adopt_resumed_run(self):
        """--resume: the run's saved settings replace the defaults (a clash with an explicit one is an error).
        Returns (path, checkpoint or None, restart)."""
        cfg, out = self.cfg, self.cfg.out
        # rank 0 reads the checkpoint and sends it to every rank (no shared file system needed)
        path, ckpt, saved = self.dctx.share(self._read_resume)
        if ckpt is None and self.dctx.is_main:
            print(f"--resume: {out!r} holds a run that stopped before its first checkpoint; nothing to continue "
                  "from, so it starts over at step 0" + (" with its saved settings" if saved else ""), flush=True)
        clash = [k for k in LOCKED if k in self.explicit and k in saved and saved.get(k) != getattr(cfg, k)]
        if clash:
            raise ValueError("--resume continues the run with its saved settings; these differ from the checkpoint: "
                             + ", ".join(f"{k} (saved {saved.get(k)!r}, given {getattr(cfg, k)!r})" for k in clash))
        for k in LOCKED + ("data_dir",):
            if k in saved and not (k == "data_dir" and k in self.explicit):
                setattr(cfg, k, saved[k])
        try:
            cfg.validate()
        except ValueError as e:
            raise CheckpointError(f"{path or self.run_dir.config_path}: the saved settings are invalid: {e}") from None
        if ckpt is not None:
            self.log(f"resuming from {path} at step {int(ckpt['step'])} (target: {cfg.steps} steps)")
        cfg.lr_decay = resolve_lr_decay(cfg.lr_decay, cfg.steps)  # a saved config may say "auto"
        return path, ckpt, ckpt is None

    def _load_data(self, ckpt, path):
        cfg = self.cfg
        data = self.data = load_dataset(cfg.dataset, cfg.data_dir)
        if ckpt is not None and tuple(ckpt["image_shape"]) != tuple(data.image_shape):
            s0, s1 = ckpt["image_shape"], data.image_shape
            raise CheckpointError(f"--resume: {path} was trained on {s0[0]}x{s0[1]} images but the data (dataset "
                                  f"{cfg.dataset}{', --data-dir ' + repr(cfg.data_dir) if cfg.data_dir else ''}) "
                                  f"holds {s1[0]}x{s1[1]} images; resume with the data the run was trained on")
        if len(data) < cfg.batch_size:
            raise ConfigError(f"argument --batch-size: expected at most the dataset size ({cfg.dataset}: {len(data)} "
                              f"images); got {cfg.batch_size}")
        h, w = data.image_shape
        check_memory(f"the {cfg.model} GAN for {h}x{w} images with --z-dim {cfg.z_dim} and --batch-size "
                     f"{cfg.batch_size}", training_memory(cfg, data.image_shape), self.device)

    def _build(self):
        """Models (seeded from --seed), optimizers, EMA copy (rank 0), DDP wrap, sampler and the step."""
        cfg, dctx, device = self.cfg, self.dctx, self.device
        torch.manual_seed(cfg.seed)
        if device.type == "cuda":
            torch.cuda.manual_seed_all(cfg.seed)
        G, D = make_models(cfg.model, self.data.image_shape, cfg.z_dim, fused=True, backend=cfg.backend)
        G, D = G.to(device), D.to(device)
        dctx.seed_rank(cfg.seed)
        opt_g, opt_d = make_optimizers(G, D, cfg, device)
        # a copy of G before any BatchNorm is synchronized: rank 0 alone samples from it
        ema_model = copy.deepcopy(G).requires_grad_(False) if cfg.ema and dctx.is_main else None
        G_train, D_train = dctx.wrap(G, D, cfg.sync_bn)  # DDP under torchrun; G, D themselves otherwise
        self.x = self.data.x.to(device)
        self.sampler = InfiniteSampler(len(self.data), cfg.batch_size, seed=cfg.seed, device=device)
        scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
        self.step = TrainStep(G_train, D_train, opt_g, opt_d, z_dim=cfg.z_dim,
                              batch_size=dctx.local_batch_size(cfg.batch_size), device=device,
                              real_label=cfg.real_label, fused=True, backend=cfg.backend,
                              ema=(ema_model, cfg.ema) if ema_model is not None else None,
                              precision=cfg.precision, scaler=scaler)

    def _restore(self, ckpt, path) -> int:
        """The step, sampler and RNG state from the checkpoint; returns its step."""
        shape = self.data.image_shape
        try:
            self.step.load_state_dict(ckpt, fit=lambda m, sd, what: load_state(m, sd, what, ckpt, shape, path))
        except StateError as e:
            raise CheckpointError(f"{path}: {e}") from None
        self.sampler.load_state_dict(ckpt["rng"]["sampler"])
        start = int(ckpt["step"])
        if not self.dctx.restore_rng(ckpt["rng"], self.cfg.seed, start):
            self.log(f"the checkpoint was written by a run of another world size: noise streams restart from seeds "
                     f"derived from --seed and step {start} (the run continues, not bit for bit)")
        if self.dctx.is_main:
            self.run_dir.truncate_metrics(start)
        return start

    def _start_fresh(self, restart) -> int:
        run, out = self.run_dir, self.cfg.out

        def check_free():
            if run.list_checkpoints():
                raise FileExistsError(f"run folder {out!r} already holds a run (metrics.jsonl / checkpoints): pass "
                                      "--resume to continue it, or choose another --out")
            if run.has_run():
                if not restart:
                    print(f"{out!r} holds a run that stopped before its first checkpoint (nothing to resume): "
                          "starting over", flush=True)
                run.truncate_metrics(-1)
        self.dctx.share(check_free)
        return 0

    def _write_config(self):
        if self.dctx.is_main:
            self.run_dir.write_json("config.json", dict(
                self.cfg.to_dict(), image_shape=list(self.data.image_shape), device_used=str(self.device),
                gankern_version=__version__, torch_version=str(torch.__version__), world_size=self.dctx.world))

    # ---------------------------------------------------------------- the loop
    def _loop(self, start) -> float:
        """Train steps start+1 .. cfg.steps; returns the seconds it took."""
        cfg, dctx = self.cfg, self.dctx
        if start >= cfg.steps:
            self.log(f"checkpoint is at step {start} >= --steps {cfg.steps}: nothing to train")
        with _Progress(cfg, dctx, self.run_dir, start, self.log) as progress:
            for step in range(start + 1, cfg.steps + 1):
                real = self.x[dctx.local_rows(self.sampler.next())]
                if cfg.lr_decay:
                    self.step.set_lr_factor(cfg.lr, cfg.lr_d or cfg.lr, lr_factor(step, cfg.lr_decay))
                losses = self.step(real)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    progress.losses(step, *losses)
                progress.advance()
                self._periodic(step, progress)
        return time.perf_counter() - progress.t0

    def _periodic(self, step, progress):
        cfg, main, last = self.cfg, self.dctx.is_main, step == self.cfg.steps
        if cfg.sample_every and step % cfg.sample_every == 0 and main:
            self.save_samples(step)
        if cfg.eval_every and step % cfg.eval_every == 0 and not last and main:
            progress.eval(step, self.evaluate())
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and not last:
            self.save_checkpoint(step)

    # ---------------------------------------------------------------- outputs
    def save_checkpoint(self, step):
        """Every rank's RNG is gathered (a collective: all ranks call this); rank 0 writes the checkpoint."""
        rng_ranks = self.dctx.rng_states()
        if not self.dctx.is_main:
            return None
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
               "sampler": self.sampler.state_dict(), **({"ranks": rng_ranks} if self.dctx.enabled else {})}
        obj = checkpoint_payload(step, self.cfg.to_dict(), self.data.image_shape, self.step.state_dict(), rng)
        return self.run_dir.save_checkpoint(obj, step, keep=self.cfg.keep)

    def save_samples(self, step):
        imgs = generate(self.step.sample_model(), 64, self.cfg.z_dim, self.device,
                        self.cfg.seed + SAMPLE_NOISE_OFFSET)
        return save_grid(imgs, self.data.image_shape, self.run_dir.file("samples", f"step_{step:07d}.png"))

    def evaluate(self):
        """The quality metric of the sampling generator; noise seed 0, as `gankern eval` (default --seed 0):
        both print the same numbers for a checkpoint."""
        if self._quality is None:
            from .metrics import QualityMetric
            self._quality = QualityMetric(self.data, seed=0, device=self.device)
        q = self._quality
        return q.evaluate(generate(self.step.sample_model(), q.n_generate, self.cfg.z_dim, self.device,
                                   EVAL_NOISE_SEED))

    def _finish(self, start, elapsed) -> dict:
        """The last checkpoint on every rank; on rank 0 samples, plot, quality metric and final_metrics.json."""
        cfg, dctx = self.cfg, self.dctx
        end, trained = max(cfg.steps, start), max(cfg.steps - start, 0)
        last_ckpt = self.save_checkpoint(end)
        if not dctx.is_main:  # rank 0 alone writes samples, plots and metrics
            return {"steps": end, "trained_steps": trained, "rank": dctx.rank, "world_size": dctx.world}
        summary = {"steps": end, "trained_steps": trained, "seconds": round(elapsed, 2),
                   "steps_per_s": round(trained / elapsed, 2) if trained and elapsed > 0 else None,
                   "device": str(self.device), "backend": cfg.backend or "auto", "checkpoint": last_ckpt,
                   "world_size": dctx.world}
        files = self._final_files(end, trained, last_ckpt)
        if cfg.final_eval:
            self._final_quality(summary)
        if cfg.compare_torch:
            from .speed import compare_speed
            summary["compare_torch"] = compare_speed(cfg, self.data, self.device, log=print)
        files["final_metrics"] = self.run_dir.file("final_metrics.json")
        summary["files"] = files
        self.run_dir.write_json("final_metrics.json", summary)
        sps = f", {summary['steps_per_s']} steps/s" if summary["steps_per_s"] else ""
        print(f"trained {trained} steps in {elapsed:.1f}s{sps} on {self.device} (backend {cfg.backend or 'auto'})",
              flush=True)
        for k, v in files.items():
            if v:
                print(f"  {k:14s} {v}", flush=True)
        return summary

    def _final_files(self, end, trained, last_ckpt) -> dict:
        files = {"checkpoint": last_ckpt, "metrics": self.run_dir.metrics_path}
        grids = sorted(glob.glob(self.run_dir.file("samples", "*.png")))
        files["samples"] = self.save_samples(end) if trained or not grids else grids[-1]
        try:
            files["loss_plot"] = plot_losses(self.run_dir.metrics_path, self.run_dir.file("loss.png"))
        except ImportError:
            files["loss_plot"] = None
        return files

    def _final_quality(self, summary):
        from .metrics import format_report
        m = summary["quality"] = self.evaluate()
        print(format_report(m), flush=True)
        summary["quality_goal_met"] = m["fd_ratio"] <= 4.0 and m["classes_covered"] >= 9
