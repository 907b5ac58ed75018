"""Checkpoint and run-folder I/O of the GAN trainer: checksummed atomic checkpoints, the run-folder lock,
temp-file clean-up, metrics.jsonl.

* A checkpoint is a dict of tensors and plain containers written by ``torch.save`` and read with
  ``torch.load(weights_only=True)``.  Format version 2 adds ``payload_sha256``: SHA-256 over the whole
  payload (every tensor's dtype, shape and bytes, and every plain value) walked in a fixed order
  (``payload_checksum``).  ``load_checkpoint`` recomputes it and raises ``CheckpointError`` on a
  mismatch, then validates the fields (types, ``step >= 0``, the config keys a model needs).  Version-1
  files (no checksum) still load, with a ``CheckpointWarning``.
* ``save_atomic`` writes ``.<name>.tmp-<pid>`` in the same folder, fsyncs it, renames it over the
  target and fsyncs the folder: a kill at any point leaves either the old file or the new one, never a
  partial checkpoint; on an error (e.g. a full disk) the temp file is removed.  Temp files of killed
  processes are removed by the next trainer that opens the folder (``RunFolder.clean_temp_files``).
* ``RunFolder`` is one run's folder (``--out``).  ``RunFolder.lock()`` takes an exclusive
  ``fcntl.flock`` on ``<out>/.lock`` for the whole run, so a second trainer (fresh or ``--resume``)
  on the same folder is refused with ``RunLockedError`` instead of interleaving its writes.
* ``checkpoint_payload`` assembles a run's checkpoint (the trainer's ``TrainStep.state_dict()`` plus settings
  and RNG state); ``models_from_checkpoint`` rebuilds the models from one (``gankern sample`` / ``eval``).
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import struct
import warnings

import torch

CKPT_FORMAT = "gankern-gan-checkpoint"
CKPT_VERSION = 2            # 2: payload_sha256; 1: no checksum (still loads, with a warning)
CHECKSUM_KEY = "payload_sha256"
LOCK_NAME = ".lock"
_CKPT_RE = re.compile(r"ckpt_(\d{8})\.pt$")
_TMP_RE = re.compile(r"^\..+\.tmp-(\d+)$")

# What a model needs from a checkpoint's config (models_from_checkpoint / resume).
REQUIRED_CONFIG = {"model": str, "dataset": str, "z_dim": int}
REQUIRED_ENTRIES = ("G", "D", "opt_G", "opt_D", "step", "config", "rng", "image_shape")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt (checksum mismatch), or not a valid gankern checkpoint."""


class CheckpointWarning(UserWarning):
    """A checkpoint loaded without verification (written before checkpoints carried a checksum)."""


class RunFolderError(OSError):
    """The run folder (or a file in it) cannot be created or written; the message says why and what survives."""


class RunLockedError(RunFolderError):
    """Another trainer holds the run folder's lock."""


# -------------------------------------------------------------------------------------------------
# checksum

def _tensor_bytes(t: torch.Tensor) -> bytes:
    if t.layout != torch.strided or t.is_quantized:
        raise CheckpointError(f"checkpoints hold dense tensors only; got a {t.layout} tensor")
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _feed(h, obj, path="$"):
    """Feed ``obj`` into the hash ``h`` with a type tag per node, in a fixed order (dicts by sorted key repr)."""
    if isinstance(obj, torch.Tensor):
        head = f"T{obj.dtype}|{tuple(obj.shape)}|".encode()
        h.update(head)
        b = _tensor_bytes(obj)
        h.update(struct.pack("<Q", len(b)))
        h.update(b)
    elif isinstance(obj, dict):
        items = sorted(obj.items(), key=lambda kv: (type(kv[0]).__name__, repr(kv[0])))
        h.update(f"D{len(items)}|".encode())
        for k, v in items:
            r = repr(k).encode()
            h.update(struct.pack("<Q", len(r)) + r)
            _feed(h, v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}|".encode())
        for i, v in enumerate(obj):
            _feed(h, v, f"{path}[{i}]")
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        r = f"{type(obj).__name__}:{obj!r}".encode()
        h.update(struct.pack("<Q", len(r)) + r)
    elif isinstance(obj, torch.dtype) or isinstance(obj, torch.device):
        r = f"{type(obj).__name__}:{obj}".encode()
        h.update(struct.pack("<Q", len(r)) + r)
    else:
        raise CheckpointError(f"checkpoint entry {path} has type {type(obj).__name__}; checkpoints hold only "
                              "tensors and plain containers")


def payload_checksum(obj: dict) -> str:
    """SHA-256 (hex) of a checkpoint dict without its checksum entry: every tensor's dtype, shape and bytes and
    every plain value, walked in a fixed order.  Independent of the device the tensors sit on."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in obj.items() if k != CHECKSUM_KEY})
    return h.hexdigest()


# -------------------------------------------------------------------------------------------------
# atomic writes

def _fsync_dir(d):
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path):
    d, name = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{name}.tmp-{os.getpid()}")


def _write_error(path, e: OSError) -> RunFolderError:
    if e.errno == errno.ENOSPC:
        why = "the disk is full (no space left on device)"
    elif e.errno == errno.EDQUOT:
        why = "the disk quota is exceeded"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = f"the folder is not writable ({e.strerror})"
    else:
        why = f"{type(e).__name__}: {e.strerror or e}"
    return RunFolderError(f"cannot write {path}: {why}; nothing was written there (an earlier file of that name, "
                          "if any, is intact)")


def _os_error(e):
    """The OSError behind ``e`` (itself, or one it was raised while handling: torch.save's zip writer replaces a
    failed write's OSError with a RuntimeError when it closes), or None."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _write_atomic(path, mode, write):
    """``write(f)`` into a temp file in the same folder, fsync, ``os.replace``, fsync the folder.

    A crash at any point leaves the old file (or none) or the complete new one; on an error the temp file is
    removed and a ``RunFolderError`` says why (full disk, not writable, ...).
    """
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        # torch's zip writer turns the write's OSError into a RuntimeError: follow the chain back to it
        ose = _os_error(e) if isinstance(e, Exception) else None
        if ose is not None:
            raise _write_error(path, ose) from e
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def save_atomic(obj, path):
    """``torch.save`` ``obj`` to ``path`` atomically (see ``_write_atomic``)."""
    _write_atomic(path, "wb", lambda f: torch.save(obj, f))


def write_text_atomic(path, text):
    """Write a small text file atomically, for config.json, final_metrics.json, metrics.jsonl."""
    _write_atomic(path, "w", lambda f: f.write(text))


def save_checkpoint(obj: dict, path):
    """Stamp ``obj`` with the format, version and payload checksum and write it atomically."""
    obj = dict(obj)
    obj["format"], obj["format_version"] = CKPT_FORMAT, CKPT_VERSION
    obj.pop(CHECKSUM_KEY, None)
    obj[CHECKSUM_KEY] = payload_checksum(obj)
    save_atomic(obj, path)
    return path


# -------------------------------------------------------------------------------------------------
# loading and validation

def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def validate_checkpoint(obj: dict, path="checkpoint") -> dict:
    """Check the entries a trainer / sampler uses; raise ``CheckpointError`` naming the entry and what was expected."""
    def bad(what):
        return CheckpointError(f"{path}: invalid gankern checkpoint: {what}")
    for k in REQUIRED_ENTRIES:
        if k not in obj:
            raise bad(f"it is missing the entry {k!r}")
    step = obj["step"]
    if not _is_int(step) or step < 0:
        raise bad(f"'step' must be an integer >= 0; got {step!r}")
    cfg = obj["config"]
    if not isinstance(cfg, dict):
        raise bad(f"'config' must be a dict of settings; got {type(cfg).__name__}")
    for k, typ in REQUIRED_CONFIG.items():
        if k not in cfg:
            raise bad(f"its config lacks {k!r} (a config needs {', '.join(REQUIRED_CONFIG)})")
        if not isinstance(cfg[k], typ) or isinstance(cfg[k], bool):
            raise bad(f"config[{k!r}] must be {typ.__name__}; got {cfg[k]!r}")
    from .models import MODELS
    if cfg["model"] not in MODELS:
        raise bad(f"config['model'] must be one of {', '.join(MODELS)}; got {cfg['model']!r}")
    if cfg["z_dim"] < 1:
        raise bad(f"config['z_dim'] must be >= 1; got {cfg['z_dim']}")
    shape = obj["image_shape"]
    if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and all(_is_int(s) and s >= 1 for s in shape)):
        raise bad(f"'image_shape' must be [height, width] with positive integers; got {shape!r}")
    for k in ("G", "D") + (("G_ema",) if obj.get("G_ema") is not None else ()):
        sd = obj[k]
        if not isinstance(sd, dict) or not all(isinstance(n, str) and isinstance(v, torch.Tensor) for n, v in sd.items()):
            raise bad(f"{k!r} must be a state_dict (a dict of parameter names to tensors)")
    for k in ("opt_G", "opt_D"):
        sd = obj[k]
        if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
            raise bad(f"{k!r} must be an optimizer state_dict (with 'state' and 'param_groups')")
    rng = obj["rng"]
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) or rng["torch"].dtype != torch.uint8:
        raise bad("'rng' must hold the torch RNG state (a uint8 tensor under 'torch')")
    smp = rng.get("sampler")
    if not isinstance(smp, dict) or not all(_is_int(smp.get(k)) and smp.get(k) >= 0
                                           for k in ("seed", "epoch", "pos", "n", "batch_size")):
        raise bad("rng['sampler'] must hold the sampler state (integers seed, epoch, pos, n, batch_size >= 0)")
    eu = obj.get("ema_updates", 0)
    if not _is_int(eu) or eu < 0:
        raise bad(f"'ema_updates' must be an integer >= 0; got {eu!r}")
    return obj


def load_checkpoint(path, map_location="cpu", *, verify=True) -> dict:
    """Load, verify (payload checksum) and validate a gankern checkpoint; ``CheckpointError`` for bad files."""
    from .. import __version__
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist" if not os.path.exists(path)
                              else f"checkpoint {path!r} is not a file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [""]
        msg = next((ln for ln in lines if "Unsupported global" in ln), lines[0])
        raise CheckpointError(f"{path}: cannot be read as a gankern checkpoint (truncated, corrupt, or not a torch file "
                              f"holding only tensors and plain containers): {type(e).__name__}: {msg[:300]}") from e
    if not isinstance(obj, dict) or obj.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path}: not a gankern GAN checkpoint (expected a dict with format={CKPT_FORMAT!r}; "
                              f"got {type(obj).__name__}{' with keys ' + str(sorted(map(str, obj))[:8]) if isinstance(obj, dict) else ''})")
    version = obj.get("format_version", 0)
    if not _is_int(version) or version < 1:
        raise CheckpointError(f"{path}: invalid gankern checkpoint: 'format_version' must be an integer >= 1; got {version!r}")
    if version > CKPT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version} is newer than this gankern "
                              f"({__version__}) understands ({CKPT_VERSION}); upgrade gankern")
    if verify:
        want = obj.get(CHECKSUM_KEY)
        if version >= 2 and not isinstance(want, str):
            raise CheckpointError(f"{path}: checkpoint format {version} must carry its payload checksum "
                                  f"({CHECKSUM_KEY!r}) but it is missing: the file was altered")
        if want is None:
            warnings.warn(f"{path}: checkpoint format version {version} carries no checksum (written by an older "
                          "gankern); loading it unverified", CheckpointWarning, stacklevel=2)
        else:
            got = payload_checksum(obj)
            if got != want:
                raise CheckpointError(f"{path}: checksum mismatch: the tensors or settings stored in the file are not "
                                      f"the ones that were saved (stored sha256 {want[:16]}..., computed {got[:16]}...); "
                                      "the file is corrupt: use an earlier checkpoint")
    return validate_checkpoint(obj, path)


# -------------------------------------------------------------------------------------------------
# the run folder

def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _path_problem(path):
    """Why ``path`` cannot be a folder (a file on the way, ...), or None."""
    p = os.path.abspath(path)
    parts = []
    while True:
        if os.path.lexists(p):
            if not os.path.isdir(p):
                return f"{p!r} is a file, not a folder" if p != os.path.abspath(path) else "it is a file, not a folder"
            return None
        parts.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent


def make_dirs(path, what):
    """``os.makedirs(path, exist_ok=True)`` with one clear ``RunFolderError`` instead of a bare OSError."""
    problem = _path_problem(path)
    if problem:
        raise RunFolderError(f"{what} {path!r}: cannot create it as a folder: {problem}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise RunFolderError(f"{what} {path!r}: cannot create the folder ({e.strerror or e})") from e


class RunFolder:
    """One run's folder (``--out``): lock, checkpoints, metrics.jsonl, temp-file clean-up."""

    def __init__(self, path):
        self.path = str(path)
        self._lock_fd = None

    # ---- paths
    def file(self, *names):
        return os.path.join(self.path, *names)

    @property
    def metrics_path(self):
        return self.file("metrics.jsonl")

    @property
    def config_path(self):
        return self.file("config.json")

    def checkpoint_path(self, step):
        return self.file(f"ckpt_{step:08d}.pt")

    # ---- lock
    def lock(self):
        """Create the folder and take an exclusive, non-blocking ``flock`` on ``<out>/.lock`` (held until
        ``unlock()`` or process exit, also a killed one).  ``RunLockedError`` if another process holds it."""
        make_dirs(self.path, "--out")
        lock_path = self.file(LOCK_NAME)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunFolderError(f"--out {self.path!r}: cannot write in the run folder ({e.strerror or e})") from e
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            warnings.warn("fcntl is unavailable: the run folder is not locked against a second trainer")
            self._lock_fd = fd
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                try:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                except OSError:
                    holder = ""
                os.close(fd)
                who = f" (pid {holder})" if holder.isdigit() else ""
                raise RunLockedError(f"run folder {self.path!r} is in use by another gankern trainer{who}: wait for it "
                                     "to finish or stop it, or choose another --out") from e
            # a filesystem without flock (some network mounts): run unlocked, but say so
            warnings.warn(f"cannot lock the run folder {self.path!r} ({e.strerror}); a second trainer on it would "
                          "not be detected")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as e:
            os.close(fd)
            raise RunFolderError(f"--out {self.path!r}: cannot write in the run folder ({e.strerror or e})") from e
        self._lock_fd = fd
        return self

    def unlock(self):
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)  # releases the flock

    def __enter__(self):
        if self._lock_fd is None:
            self.lock()
        return self

    def __exit__(self, *exc):
        self.unlock()
        return False

    # ---- temp files of killed saves
    def clean_temp_files(self):
        """Remove ``.<name>.tmp-<pid>`` files whose writer is dead (or whose pid is ours: we have written none
        yet). Returns the removed paths.  Call with the lock held."""
        removed = []
        try:
            names = os.listdir(self.path)
        except OSError:
            return removed
        for name in names:
            m = _TMP_RE.match(name)
            if not m:
                continue
            pid = int(m.group(1))
            if pid != os.getpid() and _pid_alive(pid):
                continue
            p = self.file(name)
            try:
                os.remove(p)
                removed.append(p)
            except OSError:
                pass
        return removed

    # ---- checkpoints
    def list_checkpoints(self):
        return list_checkpoints(self.path)

    def latest_checkpoint(self):
        ck = self.list_checkpoints()
        return ck[-1][1] if ck else None

    def save_checkpoint(self, obj, step, keep=None):
        path = save_checkpoint(obj, self.checkpoint_path(step))
        if keep is not None:
            for _, old in self.list_checkpoints()[:-max(1, keep)]:
                try:
                    os.remove(old)
                except OSError:
                    pass
        return path

    # ---- state
    def has_run(self):
        """True if the folder holds traces of a run (metrics.jsonl, config.json or checkpoints)."""
        return (os.path.exists(self.metrics_path) or os.path.exists(self.config_path)
                or bool(self.list_checkpoints()))

    # ---- metrics
    def open_metrics(self):
        try:
            return open(self.metrics_path, "a")
        except OSError as e:
            raise _write_error(self.metrics_path, e) from e

    def read_metrics(self):
        return read_metrics(self.metrics_path)

    def truncate_metrics(self, step):
        """Drop metric lines written after ``step`` (a resumed run rewrites them); atomic."""
        rows = [r for r in self.read_metrics() if isinstance(r, dict) and r.get("step", 0) <= step]
        write_text_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    def write_json(self, name, obj):
        write_text_atomic(self.file(name), json.dumps(obj, indent=2))

    def read_config(self):
        """config.json as a dict, or None if missing or unreadable."""
        try:
            with open(self.config_path) as f:
                c = json.load(f)
            return c if isinstance(c, dict) else None
        except (OSError, ValueError):
            return None


def list_checkpoints(out):
    """[(step, path)] sorted by step."""
    found = []
    for p in glob.glob(os.path.join(glob.escape(str(out)), "ckpt_*.pt")):
        m = _CKPT_RE.search(os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def checkpoint_path(out, step):
    return os.path.join(out, f"ckpt_{step:08d}.pt")


def read_metrics(path):
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass  # a line cut by a crash
    return rows


# -------------------------------------------------------------------------------------------------
# the payload of a training run, and models from it

def checkpoint_payload(step, config, image_shape, train_state, rng):
    """The checkpoint dict of a run at ``step``: format and versions, settings, ``train_state``
    (``TrainStep.state_dict()``: models, optimizers, scaler, EMA) and ``rng`` (global RNG, sampler, ranks)."""
    from .. import __version__
    return {"format": CKPT_FORMAT, "format_version": CKPT_VERSION, "gankern_version": __version__,
            "torch_version": str(torch.__version__), "step": step, "config": config,
            "image_shape": list(image_shape), **train_state, "rng": rng}


def models_from_checkpoint(ckpt, device="cpu", *, use_ema=True, backend=None):
    """(generator, discriminator, image_shape, config) from a loaded checkpoint; the EMA generator if present."""
    cfg = ckpt["config"]
    shape = tuple(ckpt["image_shape"])
    from .models import make_models, recalibrate_batch_norm
    from .step import BN_RECAL_SEED
    G, D = make_models(cfg["model"], shape, cfg["z_dim"], fused=True, backend=backend)
    ema = use_ema and ckpt.get("G_ema") is not None
    load_state(G, ckpt["G_ema"] if ema else ckpt["G"], "generator", ckpt, shape)
    load_state(D, ckpt["D"], "discriminator", ckpt, shape)
    G, D = G.to(device), D.to(device)
    if ema and ckpt.get("G_ema_bn") != "recalibrated":  # older checkpoints: statistics copied from G
        recalibrate_batch_norm(G, cfg["z_dim"], device, BN_RECAL_SEED)
    return G, D, shape, cfg


def load_state(module, state, what, ckpt, shape, path=None):
    """``module.load_state_dict(state)`` with one clear ``CheckpointError`` when the weights do not fit."""
    try:
        return module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if ln.startswith(("size mismatch", "Missing key", "Unexpected key"))),
                      lines[0] if lines else type(e).__name__)
        cfg = ckpt.get("config", {}) if isinstance(ckpt, dict) else {}
        where = f"{path}: " if path else "checkpoint: "
        raise CheckpointError(f"{where}the {what} weights do not fit a {cfg.get('model')!r} model for "
                              f"{shape[0]}x{shape[1]} images with z_dim {cfg.get('z_dim')} ({detail[:300].rstrip('.')}); was it "
                              "written for another image size, model or z_dim?") from None
