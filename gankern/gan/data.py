"""Training data for the GAN: images as a float32 tensor (N, pixels) in [0, 1] plus labels.

* ``digits``: scikit-learn's bundled 8x8 digits (no download; values 0..16 scaled by 1/16).
* ``mnist`` / ``fashion-mnist``: local files in ``data_dir`` only -- never downloads.
  Either the IDX pair ``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte`` (raw or ``.gz``;
  magic numbers 2051 / 2049 checked, sizes checked) or an ``.npz`` with ``x_train`` / ``y_train``.
  Looked up in ``data_dir``, ``data_dir/<name>`` and ``data_dir/<name>/raw`` (torchvision's layout:
  ``MNIST/raw``, ``FashionMNIST/raw``).

``InfiniteSampler`` yields shuffled batches forever (drop_last) and its state is a dict of ints,
so a checkpoint restores the exact batch sequence.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

DATASETS = ("digits", "mnist", "fashion-mnist")

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension


class DataError(ValueError):
    """A data file is missing or malformed (the message names the file and what was expected)."""


@dataclass
class ImageData:
    name: str
    x: torch.Tensor          # (N, H*W) float32 in [0, 1]
    y: torch.Tensor          # (N,) int64 class labels
    image_shape: tuple       # (H, W)

    @property
    def pixels(self) -> int:
        return self.image_shape[0] * self.image_shape[1]

    def __len__(self):
        return self.x.shape[0]


def load_dataset(name: str = "digits", data_dir: str | None = None) -> ImageData:
    """Load a dataset by name (see module docstring)."""
    if name == "digits":
        return _load_digits()
    if name in ("mnist", "fashion-mnist"):
        return _load_local(name, data_dir)
    raise DataError(f"dataset must be one of {', '.join(DATASETS)}; got {name!r}")


def _load_digits() -> ImageData:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - sklearn is a train dependency
        raise DataError("the 'digits' dataset needs scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    x = torch.from_numpy(np.asarray(d.data, dtype=np.float32) / 16.0)
    y = torch.from_numpy(np.asarray(d.target, dtype=np.int64))
    return ImageData("digits", x.contiguous(), y, (8, 8))


# ---------------------------------------------------------------------------------------------
# MNIST-style local files

_SUBDIRS = {"mnist": ("mnist", "MNIST", os.path.join("MNIST", "raw")),
            "fashion-mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST", os.path.join("FashionMNIST", "raw"))}
_NPZ_NAMES = {"mnist": ("mnist.npz",), "fashion-mnist": ("fashion-mnist.npz", "fashion_mnist.npz", "fashion.npz")}


def _candidate_dirs(name, data_dir):
    dirs = [data_dir] + [os.path.join(data_dir, s) for s in _SUBDIRS[name]]
    return [d for d in dirs if os.path.isdir(d)]


def _find(dirs, filenames):
    for d in dirs:
        for f in filenames:
            p = os.path.join(d, f)
            if os.path.isfile(p):
                return p
    return None


def _load_local(name, data_dir) -> ImageData:
    if not data_dir:
        raise DataError(f"dataset {name!r} is read from local files (nothing is downloaded): pass --data-dir, a folder "
                        "holding train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz], or an .npz with "
                        "x_train/y_train")
    if not os.path.isdir(data_dir):
        raise DataError(f"data_dir {data_dir!r} is not a directory")
    dirs = _candidate_dirs(name, data_dir)
    img = _find(dirs, ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz", "train-images.idx3-ubyte"))
    lab = _find(dirs, ("train-labels-idx1-ubyte", "train-labels-idx1-ubyte.gz", "train-labels.idx1-ubyte"))
    npz = _find(dirs, _NPZ_NAMES[name])
    if img is not None or lab is not None:
        if img is None or lab is None:
            have, missing = (img, "train-labels-idx1-ubyte[.gz]") if lab is None else (lab, "train-images-idx3-ubyte[.gz]")
            raise DataError(f"found {have} but not its partner {missing} (looked in: {', '.join(dirs)})")
        x = read_idx_images(img)
        y = read_idx_labels(lab)
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{img} holds {x.shape[0]} images but {lab} holds {y.shape[0]} labels; expected equal counts")
        src = img
    elif npz is not None:
        x, y = read_npz(npz)
        src = npz
    else:
        raise DataError(f"no {name} files found in {', '.join(dirs)}: expected train-images-idx3-ubyte[.gz] + "
                        f"train-labels-idx1-ubyte[.gz], or {' / '.join(_NPZ_NAMES[name])} with x_train/y_train "
                        "(nothing is downloaded)")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) > 9):
        raise DataError(f"{src}: labels must be in 0..9; got range {int(y.min())}..{int(y.max())}")
    h, w = x.shape[1], x.shape[2]
    return ImageData(name, x.reshape(x.shape[0], h * w).contiguous(), y, (h, w))


def _read_bytes(path) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        what = "corrupt compressed data" if isinstance(e, zlib.error) else "cannot read the file"
        raise DataError(f"{path}: {what} ({'zlib.error' if isinstance(e, zlib.error) else type(e).__name__}: {e}); expected a "
                        f"{'gzip-compressed ' if path.endswith('.gz') else ''}IDX file") from e


def _parse_idx(path, magic, ndim, what):
    buf = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DataError(f"{path}: file is {len(buf)} bytes, shorter than the {header}-byte IDX header of {what}")
    got_magic = struct.unpack(">i", buf[:4])[0]
    if got_magic != magic:
        raise DataError(f"{path}: wrong IDX magic number {got_magic} (0x{got_magic & 0xffffffff:08x}); expected {magic} "
                        f"(0x{magic:08x}) for {what}")
    dims = struct.unpack(">" + "i" * ndim, buf[4:header])
    if any(d < 0 for d in dims):
        raise DataError(f"{path}: negative dimension in the IDX header {dims}")
    n = int(np.prod(dims, dtype=np.int64))
    if len(buf) - header != n:
        raise DataError(f"{path}: header says {' x '.join(map(str, dims))} = {n} bytes of data but the file holds "
                        f"{len(buf) - header} ({'truncated' if len(buf) - header < n else 'trailing bytes'})")
    return np.frombuffer(buf, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_images(path) -> torch.Tensor:
    """IDX image file (magic 2051) -> float32 tensor (N, H, W) in [0, 1]."""
    a = _parse_idx(path, IDX_IMAGES_MAGIC, 3, "images (N x H x W unsigned bytes)")
    if a.shape[1] < 1 or a.shape[2] < 1:
        raise DataError(f"{path}: images of size {a.shape[1]}x{a.shape[2]}; expected positive sizes")
    return torch.from_numpy(a.astype(np.float32) / 255.0)


def read_idx_labels(path) -> torch.Tensor:
    """IDX label file (magic 2049) -> int64 tensor (N,)."""
    return torch.from_numpy(_parse_idx(path, IDX_LABELS_MAGIC, 1, "labels (N unsigned bytes)").astype(np.int64))


def read_npz(path):
    """.npz with x_train (N, H, W) or (N, H*W) square images, uint8 0..255 or float in [0,1] / [0,255], y_train (N,)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if not {"x_train", "y_train"} <= keys:
                raise DataError(f"{path}: expected arrays 'x_train' and 'y_train'; found {sorted(keys)}")
            x, y = z["x_train"], z["y_train"]
    except DataError:
        raise
    except Exception as e:  # zipfile.BadZipFile, ValueError (pickled object arrays), OSError, EOFError
        raise DataError(f"{path}: cannot read it as an .npz archive with x_train/y_train ({type(e).__name__}: {e})") from e
    if x.ndim == 2:
        side = int(round(np.sqrt(x.shape[1])))
        if side * side != x.shape[1]:
            raise DataError(f"{path}: x_train has shape {x.shape}; expected (N, H, W) or (N, H*W) with square images")
        x = x.reshape(x.shape[0], side, side)
    if x.ndim != 3 or x.shape[1] < 1 or x.shape[2] < 1:
        raise DataError(f"{path}: x_train has shape {x.shape}; expected (N, H, W) or (N, H*W)")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"{path}: y_train has shape {y.shape}; expected ({x.shape[0]},) to match x_train")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: y_train has dtype {y.dtype}; expected integer class labels")
    if x.dtype == np.uint8:
        xf = x.astype(np.float32) / 255.0
    elif np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer):
        xf = x.astype(np.float32)
        if not np.isfinite(xf).all():
            raise DataError(f"{path}: x_train holds NaN/Inf values")
        lo, hi = (float(xf.min()), float(xf.max())) if xf.size else (0.0, 0.0)
        if lo < 0 or hi > 255:
            raise DataError(f"{path}: x_train values span [{lo}, {hi}]; expected [0, 1] or [0, 255]")
        if hi > 1:
            xf = xf / 255.0
    else:
        raise DataError(f"{path}: x_train has dtype {x.dtype}; expected uint8 or float pixels")
    return torch.from_numpy(np.ascontiguousarray(xf)), torch.from_numpy(y.astype(np.int64))


# ---------------------------------------------------------------------------------------------
# Sampling

class InfiniteSampler:
    """Shuffled batches of indices forever, dropping the last incomplete batch of each epoch.

    Epoch ``e`` uses the permutation ``randperm(n, generator=seed + e)``, so the state is just
    ``{"seed", "epoch", "pos"}`` (ints): ``state_dict()`` / ``load_state_dict()`` restore the exact
    sequence.  It draws nothing from torch's global RNG.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, device="cpu"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if n < batch_size:
            raise ValueError(f"the dataset holds {n} samples, fewer than batch_size={batch_size} (drop_last would "
                             "yield no batch); lower --batch-size")
        self.n, self.batch_size, self.seed, self.device = n, batch_size, int(seed), torch.device(device)
        self.epoch, self.pos = 0, 0
        self._perm = None

    def _permutation(self):
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(self.n, generator=g).to(self.device)
        return self._perm

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.n:
            self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
        idx = self._permutation()[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def __iter__(self):
        while True:
            yield self.next()

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "pos": self.pos, "n": self.n, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if int(state["n"]) != self.n or int(state["batch_size"]) != self.batch_size:
            raise ValueError(f"sampler state is for n={state['n']}, batch_size={state['batch_size']}; this sampler has "
                             f"n={self.n}, batch_size={self.batch_size}")
        self.seed, self.epoch, self.pos, self._perm = int(state["seed"]), int(state["epoch"]), int(state["pos"]), None


def split_indices(n: int, frac: float, seed: int = 0):
    """A fixed random split of range(n) into (first, second) with ``frac`` of the items in the second."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    k = int(round(n * frac))
    return perm[k:], perm[:k]
