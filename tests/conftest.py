"""Test set-up shared by every test file.

* TRITON_INTERPRET=1 is set before anything imports triton, so the Triton backend runs
  on CPU tensors in Triton's interpreter (the AOT GPU compile check runs in a subprocess
  without it).
* Every kernel output is poisoned (NaN-filled) before the kernel writes it.
* ``@pytest.mark.gpu`` tests skip cleanly without a CUDA device.
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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
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
