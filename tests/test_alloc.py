"""CPU outputs of the C++ kernels come from gankern's block cache (csrc/include/gankern/common.h):
blocks >= 2 MiB are huge-page aligned, freed blocks are reused, the cache is bounded and can be emptied."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import gankern
from tolerances import FORK_CHILD_FP32, assert_close

pytestmark = pytest.mark.needs_ext
HUGE = 2 << 20  # 2 MiB


def test_large_output_is_huge_page_aligned_and_fully_written():
    x = torch.randn(1 << 21, 1)  # 8 MiB
    loss = gankern.bce_with_logits(x, 0.9, reduction="none", backend="cpp")  # poisoned (NaN) before the kernel
    assert loss.untyped_storage().data_ptr() % HUGE == 0
    assert_close(loss, F.binary_cross_entropy_with_logits(x.double(), torch.full_like(x, 0.9, dtype=torch.float64),
                                                          reduction="none"))
    loss.resize_(10)  # an ordinary resizable tensor
    assert loss.shape == (10,)


def test_large_channels_last_output_keeps_its_layout():
    x = torch.randn(16, 64, 32, 40).contiguous(memory_format=torch.channels_last)  # 5 MiB
    y = gankern.batch_norm_relu(x, None, None, None, None, True, backend="cpp")
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert y.untyped_storage().data_ptr() % HUGE == 0
    assert_close(y, F.relu(F.batch_norm(x.double(), None, None, None, None, True)))


@pytest.mark.parametrize("shape", [(1024, 100), (1024, 1024)])  # 400 KiB (64 KiB granules), 4 MiB (2 MiB granules)
def test_freed_blocks_are_reused_and_rewritten(shape):
    gankern.empty_cache()
    x = torch.randn(shape)
    y = gankern.batch_norm_relu(x, None, None, training=True, backend="cpp")
    ptr = y.data_ptr()
    del y
    info = gankern.cache_info()
    assert info["cached_bytes"] > 0
    x2 = torch.randn(shape) * 3 + 1
    y2 = gankern.batch_norm_relu(x2, None, None, training=True, backend="cpp")  # same block, new values
    assert y2.data_ptr() == ptr and gankern.cache_info()["hits"] == info["hits"] + 1
    assert_close(y2, F.relu(F.batch_norm(x2.double(), None, None, None, None, True)))
    del y2
    gankern.empty_cache()
    assert gankern.cache_info()["cached_bytes"] == 0


def test_small_outputs_use_torchs_allocator():
    before = gankern.cache_info()
    y = gankern.batch_norm_relu(torch.randn(64, 128), None, None, training=True, backend="cpp")  # 32 KiB
    del y
    after = gankern.cache_info()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True,
                          timeout=120)


def test_cache_capacity_from_the_environment():
    code = ("import torch, gankern\n"
            "x = torch.randn(1024, 1024)\n"
            "for _ in range(3):\n"
            "    y = gankern.batch_norm_relu(x, None, None, training=True, backend='cpp'); del y\n"
            "i = gankern.cache_info(); print(i['capacity_bytes'], i['hits'], i['cached_bytes'])\n")
    off = _run(code, GANKERN_CPU_CACHE_MB="0")
    assert off.returncode == 0, off.stderr
    assert off.stdout.split() == ["0", "0", "0"]  # nothing kept, nothing reused
    on = _run(code, GANKERN_CPU_CACHE_MB="64")
    assert on.returncode == 0, on.stderr
    cap, hits, cached = map(int, on.stdout.split())
    assert cap == 64 << 20 and hits == 2 and cached == 4 << 20
    bad = _run(code, GANKERN_CPU_CACHE_MB="lots")
    assert bad.returncode != 0 and "GANKERN_CPU_CACHE_MB must be a whole number of MiB >= 0, got 'lots'" in bad.stderr


def test_forked_child_can_allocate():
    # a DataLoader-style fork after the cache was used: the child allocates and frees cached blocks
    gankern.empty_cache()
    x = torch.randn(1024, 1024)
    y = gankern.batch_norm_relu(x, None, None, training=True, backend="cpp")
    del y
    pid = os.fork()
    if pid == 0:  # child: exit code 0 only if the op ran and was right
        try:
            torch.set_num_threads(1)  # as DataLoader workers do: libgomp's pool does not survive a fork
            y = gankern.batch_norm_relu(x, None, None, training=True, backend="cpp")
            ok = torch.allclose(y.double(), F.relu(F.batch_norm(x.double(), None, None, None, None, True)),
                                **FORK_CHILD_FP32)
            del y
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    import time
    deadline = time.monotonic() + 60
    while True:  # never hang the suite: a child stuck on a lock is killed and the test fails
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child did not finish within 60 s (a lock held across fork?)")
        time.sleep(0.05)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_full_cache_drops_its_oldest_blocks():
    code = ("import torch, gankern\n"
            "def out(rows):\n"  # a 4 MiB then a 6 MiB output, freed at once
            "    return gankern.batch_norm_relu(torch.randn(rows, 1024), None, None, training=True, backend='cpp')\n"
            "y = out(1024); p4 = y.data_ptr(); del y\n"
            "y = out(1536); p6 = y.data_ptr(); del y\n"   # cap 8 MiB: 4 + 6 > 8, the older 4 MiB block goes
            "i = gankern.cache_info(); print(i['cached_bytes'] >> 20)\n"
            "y = out(1536); print(int(y.data_ptr() == p6)); del y\n"
            "y = out(1024); print(int(gankern.cache_info()['misses'])); del y\n")
    r = _run(code, GANKERN_CPU_CACHE_MB="8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["6", "1", "3"]  # 6 MiB kept; reused; the 4 MiB one was dropped (a third miss)
