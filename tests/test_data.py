"""gankern.gan.data: the bundled digits, local MNIST-style files (IDX raw/.gz, .npz) and their errors, the sampler."""
import gzip
import struct

import numpy as np
import pytest
import torch

from gankern.gan.data import DataError, InfiniteSampler, load_dataset, read_idx_images, read_idx_labels, read_npz


def idx_images(arr, magic=2051):
    arr = np.asarray(arr, dtype=np.uint8)
    return struct.pack(">iiii", magic, *arr.shape) + arr.tobytes()


def idx_labels(arr, magic=2049):
    arr = np.asarray(arr, dtype=np.uint8)
    return struct.pack(">ii", magic, arr.shape[0]) + arr.tobytes()


def write_mnist(d, n=7, h=28, w=28, gz=False, rng=None):
    rng = rng or np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(n, h, w), dtype=np.uint8)
    labs = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    op = gzip.open if gz else open
    sfx = ".gz" if gz else ""
    with op(d / f"train-images-idx3-ubyte{sfx}", "wb") as f:
        f.write(idx_images(imgs))
    with op(d / f"train-labels-idx1-ubyte{sfx}", "wb") as f:
        f.write(idx_labels(labs))
    return imgs, labs


def test_digits():
    d = load_dataset("digits")
    assert d.x.shape == (1797, 64) and d.x.dtype == torch.float32 and d.image_shape == (8, 8)
    assert float(d.x.min()) == 0.0 and float(d.x.max()) == 1.0  # digits max 16 -> 1
    assert sorted(d.y.unique().tolist()) == list(range(10))


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    imgs, labs = write_mnist(tmp_path, n=7, gz=gz)
    d = load_dataset("mnist", str(tmp_path))
    assert d.x.shape == (7, 784) and d.image_shape == (28, 28)
    np.testing.assert_allclose(d.x.numpy(), imgs.reshape(7, -1) / 255.0, rtol=0, atol=1e-7)
    assert d.y.tolist() == labs.tolist()


def test_torchvision_layout_and_fashion(tmp_path):
    sub = tmp_path / "FashionMNIST" / "raw"
    sub.mkdir(parents=True)
    write_mnist(sub, n=3, gz=True)
    assert load_dataset("fashion-mnist", str(tmp_path)).x.shape == (3, 784)


def test_npz(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "mnist.npz", x_train=x, y_train=np.arange(5))
    d = load_dataset("mnist", str(tmp_path))
    np.testing.assert_allclose(d.x.numpy(), x.reshape(5, -1) / 255.0, atol=1e-7)
    # float pixels in [0, 1] kept as is, flat (N, H*W) accepted
    np.savez(tmp_path / "f.npz", x_train=np.full((2, 16), 0.5, np.float32), y_train=np.zeros(2, np.int64))
    x2, _ = read_npz(str(tmp_path / "f.npz"))
    assert x2.shape == (2, 4, 4) and float(x2.max()) == 0.5


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("mnist", None)
    with pytest.raises(DataError, match="not a directory"):
        load_dataset("mnist", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_images(np.zeros((2, 4, 4))))
    with pytest.raises(DataError, match="partner train-labels"):
        load_dataset("mnist", str(tmp_path))
    with pytest.raises(DataError, match="dataset must be one of"):
        load_dataset("cifar")


def test_wrong_magic(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(idx_images(np.zeros((2, 4, 4)), magic=2049))
    with pytest.raises(DataError, match=r"wrong IDX magic number 2049.*expected 2051"):
        read_idx_images(str(p))
    q = tmp_path / "train-labels-idx1-ubyte"
    q.write_bytes(idx_labels(np.zeros(2), magic=2051))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: wrong IDX magic number 2051.*expected 2049"):
        read_idx_labels(str(q))


def test_truncated_and_trailing(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte"
    full = idx_images(np.zeros((3, 4, 4)))
    p.write_bytes(full[:-5])
    with pytest.raises(DataError, match="48 bytes of data but the file holds 43 .truncated"):
        read_idx_images(str(p))
    p.write_bytes(full + b"xx")
    with pytest.raises(DataError, match="trailing bytes"):
        read_idx_images(str(p))
    p.write_bytes(full[:6])
    with pytest.raises(DataError, match="shorter than the 16-byte IDX header"):
        read_idx_images(str(p))
    g = tmp_path / "x.gz"
    g.write_bytes(gzip.compress(full)[:-10])  # truncated gzip stream
    with pytest.raises(DataError, match="x.gz: cannot read"):
        read_idx_images(str(g))


def test_corrupt_deflate_stream(tmp_path):
    """A .gz whose header is fine but whose deflate data is corrupt raises zlib.error inside gzip: a DataError."""
    imgs = np.random.default_rng(1).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    raw = gzip.compress(idx_images(imgs))
    for start in (10, 40, len(raw) // 2):
        bad = raw[:start] + bytes(b ^ 0xFF for b in raw[start:start + 32]) + raw[start + 32:]
        g = tmp_path / "train-images-idx3-ubyte.gz"
        g.write_bytes(bad)
        with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: (corrupt compressed data \(zlib.error|"
                                            r"cannot read the file)"):
            read_idx_images(str(g))


def test_count_mismatch_and_bad_labels(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_images(np.zeros((3, 4, 4))))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_labels(np.zeros(2)))
    with pytest.raises(DataError, match="3 images but .* 2 labels"):
        load_dataset("mnist", str(tmp_path))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_labels([0, 1, 12]))
    with pytest.raises(DataError, match="labels must be in 0..9"):
        load_dataset("mnist", str(tmp_path))


def test_bad_npz(tmp_path):
    p = tmp_path / "mnist.npz"
    np.savez(p, x=np.zeros((2, 4, 4)), y=np.zeros(2))
    with pytest.raises(DataError, match="expected arrays 'x_train' and 'y_train'"):
        load_dataset("mnist", str(tmp_path))
    np.savez(p, x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.zeros(3, np.int64))
    with pytest.raises(DataError, match=r"y_train has shape \(3,\); expected \(2,\)"):
        read_npz(str(p))
    np.savez(p, x_train=np.zeros((2, 15), np.uint8), y_train=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="square images"):
        read_npz(str(p))
    np.savez(p, x_train=np.full((2, 4, 4), -1.0), y_train=np.zeros(2, np.int64))
    with pytest.raises(DataError, match=r"expected \[0, 1\] or \[0, 255\]"):
        read_npz(str(p))
    np.savez(p, x_train=np.zeros((2, 4, 4)), y_train=np.zeros(2, np.float32))
    with pytest.raises(DataError, match="expected integer class labels"):
        read_npz(str(p))
    p.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="mnist.npz: cannot read it as an .npz"):
        read_npz(str(p))


def test_sampler_epochs_and_state():
    s = InfiniteSampler(10, 3, seed=5)
    first = [s.next() for _ in range(3)]           # one epoch: 3 batches, 1 sample dropped
    e0 = torch.cat(first)
    assert e0.unique().numel() == 9
    assert s.epoch == 0
    b = s.next()
    assert s.epoch == 1 and b.numel() == 3
    state = s.state_dict()
    rest = [s.next() for _ in range(5)]
    s2 = InfiniteSampler(10, 3, seed=0)
    s2.load_state_dict(state)
    assert all(torch.equal(a, c) for a, c in zip(rest, [s2.next() for _ in range(5)]))
    # the same seed replays the same batches; a new epoch uses a new permutation
    s3 = InfiniteSampler(10, 3, seed=5)
    assert torch.equal(e0, torch.cat([s3.next() for _ in range(3)]))
    assert not torch.equal(torch.cat([b] + rest[:2]), e0)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        InfiniteSampler(2, 3)
    with pytest.raises(ValueError, match="sampler state is for n=10"):
        InfiniteSampler(11, 3).load_state_dict(state)


def test_sampler_draws_no_global_rng():
    torch.manual_seed(0)
    a = torch.rand(1)
    torch.manual_seed(0)
    s = InfiniteSampler(100, 7, seed=1)
    for _ in range(30):
        s.next()
    assert torch.equal(torch.rand(1), a)
