"""Test set-up shared by every test file.

* TRITON_INTERPRET=1 is set before anything imports triton, so the Triton backend runs
  on CPU tensors in Triton's interpreter (the AOT GPU compile check runs in a subprocess
  without it).
* Every kernel output is poisoned (NaN-filled) before the kernel writes it.
* ``@pytest.mark.gpu`` tests skip cleanly without a CUDA device.
* ``@pytest.mark.needs_ext`` (the one way to say "needs the compiled extension gankern._C") skips a test
  with the import error's reason when the extension is not built; ``HAS_EXT`` is the same answer as a bool.
* ``device`` (fixture) / ``DEVICES`` (parametrize list) / ``device_backends()`` (``"device,backend"`` pairs):
  one test for CPU and CUDA, the ``cuda`` variant marked ``gpu`` (so skipped without a CUDA device).
"""
import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")
# A private torch.compile cache per test session: inductor's shared on-disk cache (/tmp/torchinductor_$USER) can
# hold graphs compiled against an older schema of our ops (another checkout, an earlier build) and replay them.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="gankern-inductor-")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import gankern  # noqa: E402
from gankern import _backends  # noqa: E402

# The backends that can run on CPU tensors on this machine (triton = interpreter).
CPU_BACKENDS = [b for b in ("cpp", "triton", "reference") if gankern.backends()[b]["available"]]
# The backends a CUDA-device variant runs ("auto" picks among them); each test skips the unavailable ones.
GPU_BACKENDS = ["cuda", "triton"]

# Is the compiled extension gankern._C built (and importable)?  Tests say so with @pytest.mark.needs_ext.
HAS_EXT = _backends.load_extension() is not None

# One test for both devices: parametrize over DEVICES (or take the ``device`` fixture); cuda is gpu-marked.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def device_backends(cpu=None, cuda=None):
    """``@pytest.mark.parametrize("device,backend", device_backends())``: each CPU backend on "cpu" (default
    CPU_BACKENDS) and each CUDA one on "cuda" (default GPU_BACKENDS; marked gpu), ids "cpu-cpp", "cuda-triton"."""
    cpu = CPU_BACKENDS if cpu is None else cpu
    cuda = GPU_BACKENDS if cuda is None else cuda
    return ([pytest.param("cpu", b, id=f"cpu-{b}") for b in cpu]
            + [pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.gpu) for b in cuda])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_ext: needs the compiled extension gankern._C (skipped when not built)")


def pytest_collection_modifyitems(config, items):
    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA device (none here)")
    if not HAS_EXT:
        skips["needs_ext"] = pytest.mark.skip(reason=f"needs gankern._C: {gankern.backends()['cpp']['reason']}")
    for item in items:
        for name, skip in skips.items():
            if name in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _poison_outputs():
    _backends.set_poison(True)
    yield
    _backends.set_poison(False)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs per test: different per test, reproducible per test id across processes.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
