"""Command line: ``gankern train | sample | eval | bench | info`` (also ``python -m gankern ...``).

Every user error exits with status 2 and one line on stderr, ``gankern: error: ...`` naming the argument or file and
what was expected; an unexpected internal error exits with status 1, also in one line.  ``--debug`` (anywhere on the
command line) or ``GANKERN_DEBUG=1`` prints the traceback as well.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

PNG_MAX_N = 65536  # samples in one PNG grid; more: write an .npy


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``gankern: error: <command>: <message> (see --help)``."""

    def error(self, message):
        cmd = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        self.exit(2, f"gankern: error: {cmd}{_one_line(message)} (see '{self.prog} --help')\n")


def _one_line(msg) -> str:
    return " ".join(str(msg).split())


def _int(text):
    """An integer; also accepts integral scientific notation such as 2e8."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        f = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
    if f != f or f in (float("inf"), float("-inf")) or not f.is_integer():
        raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}")
    return int(f)


def _threads(text):
    n = _int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number of threads >= 1; got {text!r}")
    return n

_TRAIN_HELP = """Train a GAN (MLP or DCGAN) with gankern's fused layers.

Examples:
  gankern train --demo                         # MLP GAN on the bundled 8x8 digits, ~2 min on 2 CPU cores
  gankern train --demo --precision bf16        # the same in mixed precision (CPU with bf16 units, or CUDA)
  gankern train --dataset mnist --data-dir ~/data/mnist --steps 20000 --out runs/mnist
  gankern train --out runs/mnist --steps 40000 --resume   # continue that run to 40000 steps
  torchrun --nproc_per_node=2 -m gankern train --device cpu --steps 2000 --out runs/ddp   # 2 ranks (DDP)
"""


def _train_parser(sub):
    """``gankern train``: one option per TrainConfig field, its help and default from the field (the one place)."""
    from .config import TrainConfig
    p = sub.add_parser("train", help="train a GAN", description=_TRAIN_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        _add_setting(p, f)
    p.add_argument("--threads", type=_threads, default=None, help="torch CPU threads (default: torch's choice)")
    _debug_arg(p)
    return p


def _add_setting(p, f):
    """The option(s) of one TrainConfig field.  Their default is None ("not given"), so a --resume can tell what
    was given explicitly; TrainConfig fills in the rest."""
    m = f.metadata
    kw = dict(m["argparse"], default=None, dest=f.name, help=f"{m['help']}{_default_text(f)}")
    if kw.get("type") is int:
        kw["type"] = _int
    p.add_argument(*(m["flags"] or ("--" + f.name.replace("_", "-"),)), **kw)
    for flag, extra in m["also"]:
        p.add_argument(flag, dest=f.name, **extra)


def _default_text(f):
    """" (default: X[; --demo: Y])" from the field's default and DEMO, or the field's own text, or nothing."""
    from .config import DEMO
    shown = f.metadata["shown"]
    if shown is False:
        return ""
    if isinstance(shown, str):
        return f" (default: {shown})"
    show = shown if callable(shown) else (lambda v: " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v))
    txt = f"default: {show(f.default)}"
    if f.name in DEMO and DEMO[f.name] != f.default:
        txt += f"; --demo: {show(DEMO[f.name])}"
    return f" ({txt})"


def _debug_arg(p):
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="on an error, also print the Python traceback (or set GANKERN_DEBUG=1)")


def _cmd_train(args):
    from .config import TrainConfig, demo_config, free_run_dir
    from .trainer import train
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if f.name != "demo" and getattr(args, f.name) is not None}
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(demo_config() if args.demo else TrainConfig(), **given)
    if args.demo and "out" not in given and not cfg.resume:
        cfg.out = free_run_dir(cfg.out)  # re-running the demo never clashes with an earlier demo run
    cfg.validate()  # the same checks train() runs first; here before anything is loaded
    summary = train(cfg, explicit=set(given))
    if args.demo and "quality" in summary:
        m = summary["quality"]
        print(f"demo quality goal (FD <= 4x floor, >= 9/10 classes with >= 5%): "
              f"{'met' if summary['quality_goal_met'] else 'NOT met'} (FD {m['fd_ratio']:.2f}x floor, "
              f"{m['classes_covered']}/10 classes)")
    return 0


def _load_generator(args):
    from .checkpoint import load_checkpoint, models_from_checkpoint
    from .config import resolve_device
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, map_location=device)
    G, _, shape, cfg = models_from_checkpoint(ckpt, device, use_ema=not args.no_ema,
                                              backend=None if args.backend in (None, "auto") else args.backend)
    return G, shape, cfg, device, ckpt


def _check_sample_out(path, n):
    """--out: a writable place for an .npy or an image format Pillow writes; --n within what the format holds."""
    from .checkpoint import make_dirs
    from .config import ConfigError
    if os.path.isdir(path):
        raise ConfigError(f"argument --out: expected a file path ending in .png or .npy; {path!r} is a folder")
    ext = os.path.splitext(path)[1].lower()
    if ext != ".npy":
        from PIL import Image
        if ext not in Image.registered_extensions():
            raise ConfigError(f"argument --out: expected a path ending in .png (image grid) or .npy (raw samples); "
                              f"got {path!r}")
        if n > PNG_MAX_N:
            raise ConfigError(f"argument --n: an image grid holds at most {PNG_MAX_N} samples; got {n} (write an .npy "
                              "for more)")
    from .checkpoint import RunFolderError, _path_problem
    folder = os.path.dirname(os.path.abspath(path))
    problem = _path_problem(folder)
    if problem:
        if problem.startswith("it is"):
            problem = f"{folder!r} is a file, not a folder"
        raise RunFolderError(f"argument --out {path!r}: cannot create its folder: {problem}")
    make_dirs(folder, "argument --out: the folder")


def _cmd_sample(args):
    import numpy as np
    import torch
    from .config import ConfigError, check_memory
    from .images import save_grid
    from .models import generate
    if args.n < 1:
        raise ConfigError(f"argument --n: expected an integer >= 1; got {args.n}")
    _check_sample_out(args.out, args.n)
    G, shape, cfg, device, ckpt = _load_generator(args)
    # noise, outputs and their concatenation, float32
    check_memory(f"argument --n: {args.n} samples", 4 * args.n * (cfg["z_dim"] + 2 * shape[0] * shape[1]),
                 torch.device("cpu"))
    x = generate(G, args.n, cfg["z_dim"], device, args.seed)
    if args.out.lower().endswith(".npy"):
        np.save(args.out, x.numpy().astype(np.float32))
        print(f"wrote {args.n} samples, shape {tuple(x.shape)} (image {shape[0]}x{shape[1]}), float32 in [0, 1] "
              f"-> {args.out}")
    else:
        save_grid(x, shape, args.out)
        print(f"wrote a grid of {args.n} samples ({shape[0]}x{shape[1]}) from step {int(ckpt['step'])} -> {args.out}")
    return 0


def _cmd_eval(args):
    from .data import load_dataset
    from .metrics import QualityMetric, format_report
    from .checkpoint import CheckpointError
    from .models import generate
    G, shape, cfg, device, ckpt = _load_generator(args)
    data = load_dataset(cfg["dataset"], args.data_dir or cfg.get("data_dir"))
    if tuple(data.image_shape) != tuple(shape):
        raise CheckpointError(f"{args.checkpoint}: the checkpoint makes {shape[0]}x{shape[1]} images but dataset "
                              f"{cfg['dataset']} has {data.image_shape[0]}x{data.image_shape[1]}")
    q = QualityMetric(data, seed=0, device=device)
    m = q.evaluate(generate(G, q.n_generate, cfg["z_dim"], device, args.seed))
    m["step"] = int(ckpt["step"])
    if args.json:
        print(json.dumps(m))
    else:
        print(f"checkpoint {args.checkpoint} (step {m['step']}, {cfg['model']} on {cfg['dataset']})")
        print(format_report(m))
    return 0


def _bench_suite():
    """bench/run.py of a source checkout (the pytest-benchmark suites), or None in an installed gankern."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = os.path.join(root, "bench", "run.py")
    return script if os.path.isfile(script) else None


def _cmd_bench(args):
    script = _bench_suite()
    if script and not args.quick:
        import subprocess
        return subprocess.call([sys.executable, script, *args.pytest_args])  # a separate process: no import
    import torch
    from .config import TrainConfig, resolve_device
    from .data import load_dataset
    from .speed import compare_speed, synthetic_data
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    synthetic = args.dataset == "synthetic-784"
    cfg = TrainConfig(model=args.model, batch_size=args.batch_size, dataset="digits" if synthetic else args.dataset,
                      data_dir=args.data_dir, backend=args.backend, device=args.device or "auto").validate()
    data = synthetic_data() if synthetic else load_dataset(args.dataset, args.data_dir)
    print("quick training-step timing (bench/run.py not found or --quick given)")
    compare_speed(cfg, data, device)
    return 0


def _cmd_info(args):
    import platform
    import torch
    import gankern
    print(f"gankern {gankern.__version__}   torch {torch.__version__}   python {platform.python_version()}   "
          f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(f"CUDA: {'available: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}"
          f" (torch built with CUDA {torch.version.cuda})")
    for mod in ("triton", "numpy", "sklearn", "matplotlib", "PIL", "tqdm"):
        try:
            m = __import__(mod)
            print(f"  {mod:11s}{getattr(m, '__version__', '?')}")
        except ImportError:
            print(f"  {mod:11s}not installed")
    from ..cpu_features import describe
    print(describe())
    print("backends:")
    for name, b in gankern.backends().items():
        state = "available" if b["available"] else f"unavailable: {b['reason']}"
        print(f"  {name:10s} {state}  [devices: {', '.join(b['devices'])}]")
    return 0


def build_parser():
    from .config import BACKEND_CHOICES
    from .models import MODELS
    p = _Parser(prog="gankern", description="gankern: fused GAN kernels for PyTorch, and a GAN trainer",
                epilog="Errors print one line 'gankern: error: ...' and exit with status 2 (1: an internal error); "
                       "--debug or GANKERN_DEBUG=1 adds the traceback.")
    p.add_argument("--debug", action="store_true", default=False,
                   help="on an error, also print the Python traceback (or set GANKERN_DEBUG=1)")
    sub = p.add_subparsers(dest="cmd", metavar="{train,sample,eval,bench,info}")
    sub.required = True
    _train_parser(sub).set_defaults(func=_cmd_train)

    def ckpt_args(q):
        q.add_argument("--checkpoint", required=True, help="a ckpt_XXXXXXXX.pt written by gankern train")
        q.add_argument("--device", default=None, help="auto (default), cpu, cuda")
        q.add_argument("--backend", choices=BACKEND_CHOICES, default=None,
                       help="gankern backend for the fused layers (default: auto)")
        q.add_argument("--seed", type=_int, default=0, help="noise seed (default: 0)")
        q.add_argument("--no-ema", action="store_true", help="use the raw generator even if the checkpoint has an EMA")
        _debug_arg(q)

    s = sub.add_parser("sample", help="write samples from a checkpoint (PNG grid, or .npy raw)",
                       description="Write n generated samples: a PNG image grid, or with an .npy path the raw samples "
                                   "as float32 of shape (n, pixels) in [0, 1].")
    ckpt_args(s)
    s.add_argument("--n", type=_int, default=64, help=f"number of samples (default: 64; a PNG grid holds at most {PNG_MAX_N})")
    s.add_argument("--out", default="samples.png", help="output path: .png grid or .npy array (default: samples.png)")
    s.set_defaults(func=_cmd_sample)

    e = sub.add_parser("eval", help="quality metric of a checkpoint (Fréchet distance, class coverage)",
                       description="Fréchet distance in a small classifier's feature space (float64, equal sample "
                                   "counts) next to the real-vs-real floor, plus class coverage.")
    ckpt_args(e)
    e.add_argument("--data-dir", default=None, help="override the data folder saved in the checkpoint")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.set_defaults(func=_cmd_eval)

    b = sub.add_parser("bench", help="run the benchmark suite (bench/run.py) or a quick training-step timing",
                       description="Runs bench/run.py (pytest-benchmark suites, report in bench/results/) when the "
                                   "source tree is present; otherwise, or with --quick, times training steps of the "
                                   "fused vs plain-PyTorch models.")
    b.add_argument("--quick", action="store_true", help="only the quick training-step timing")
    b.add_argument("--model", choices=MODELS, default="mlp", help="architecture (default: mlp)")
    b.add_argument("--dataset", default="synthetic-784", help="synthetic-784 (default), digits, mnist, fashion-mnist")
    b.add_argument("--data-dir", default=None, help="data folder for mnist / fashion-mnist")
    b.add_argument("--batch-size", type=_int, default=128, help="batch size (default: 128)")
    b.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    b.add_argument("--backend", choices=BACKEND_CHOICES, default=None,
                   help="gankern backend for the fused layers (default: auto)")
    b.add_argument("--threads", type=_threads, default=None, help="torch CPU threads (default: torch's choice)")
    b.add_argument("pytest_args", nargs="*", help="extra arguments for bench/run.py (e.g. -k train)")
    _debug_arg(b)
    b.set_defaults(func=_cmd_bench)

    i = sub.add_parser("info", help="versions, available backends and why others are missing")
    _debug_arg(i)
    i.set_defaults(func=_cmd_info)
    return p


def _describe(e: BaseException) -> tuple[str, int]:
    """(one-line message, exit status) for an exception that reached the command line."""
    import zlib
    import torch
    from .._backends import BackendUnavailableError
    from .checkpoint import CheckpointError, RunFolderError
    from .data import DataError
    from .distributed import DistributedError
    if isinstance(e, DistributedError):  # another rank failed: exit 3, as the other ranks' launcher expects
        return _one_line(e), 3
    if isinstance(e, (DataError, CheckpointError, RunFolderError, BackendUnavailableError, FileExistsError)):
        return _one_line(e), 2
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
            isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e))):
        first = next((ln for ln in str(e).splitlines() if ln.strip()), "")
        return _one_line(f"out of memory ({type(e).__name__}: {first[:200]}); lower --n, --batch-size or --z-dim"), 2
    if isinstance(e, OSError):
        where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
        return _one_line(f"cannot access{where}: {e.strerror or e}"), 2
    if isinstance(e, zlib.error):
        return _one_line(f"corrupt compressed data ({e})"), 2
    if isinstance(e, (ValueError, FloatingPointError)):
        return _one_line(e), 2
    return _one_line(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback and please report "
                     "it)"), 1


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"gankern: warning: {_one_line(message)}", file=sys.stderr if file is None else file, flush=True)


def main(argv=None):
    import warnings
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False)) or os.environ.get("GANKERN_DEBUG", "").strip() not in ("", "0")
    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = _show_warning
        try:
            return args.func(args) or 0
        except KeyboardInterrupt:
            print("gankern: interrupted", file=sys.stderr)
            return 130
        except Exception as e:
            msg, code = _describe(e)
            if debug:
                import traceback
                traceback.print_exc()
            print(f"gankern: error: {msg}", file=sys.stderr, flush=True)
            return code


if __name__ == "__main__":
    sys.exit(main())
