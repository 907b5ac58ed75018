"""The compiled extension as built: which kernels it registered, and what it says about CUDA.

Runs everywhere.  Under a CUDA torch in CI (tools/cuda_torch_env.sh sets GANKERN_EXPECT_CUDA=1) the
extension must hold CUDA kernels, and every internal kernel op that has a CPU kernel must have a
CUDA kernel registered with the dispatcher too: a glue file left out of the build, or a
TORCH_LIBRARY_IMPL(gankern, CUDA, m) that forgets an op, fails here on a machine without a GPU.
"""
import os

import pytest
import torch

import gankern
from gankern import _backends

ext = _backends.load_extension()
needs_ext = pytest.mark.skipif(ext is None, reason="gankern._C is not built")
EXPECT_CUDA = os.environ.get("GANKERN_EXPECT_CUDA") == "1"


def _gankern_ops():
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("gankern::"))


def _has(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


def _kernel_ops():
    """The C++ internal kernel ops: those with a CPU kernel (the public ops and the Triton custom ops
    are CompositeExplicitAutograd / Python)."""
    return [op for op in _gankern_ops() if _has(op, "CPU")]


@needs_ext
def test_every_op_family_has_cpu_kernels():
    ops = _kernel_ops()
    for family in ("bce_with_logits", "batch_norm_relu", "linear_leaky_relu", "bias_leaky_relu"):
        assert f"gankern::_{family}_fwd" in ops and f"gankern::_{family}_bwd" in ops, ops


@needs_ext
def test_cuda_kernel_registered_for_every_internal_op():
    if not ext.with_cuda:
        assert not EXPECT_CUDA, f"GANKERN_EXPECT_CUDA=1 but gankern._C has no CUDA kernels: {ext.cuda_skip_reason}"
        pytest.skip(f"built without CUDA kernels: {ext.cuda_skip_reason}")
    missing = [op for op in _kernel_ops() if not _has(op, "CUDA")]
    assert not missing, f"internal ops without a CUDA kernel: {missing}"
    archs = ext.cuda_archs.split(",")
    assert archs and all(a for a in archs), ext.cuda_archs
    if EXPECT_CUDA and os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0") == "8.0;9.0":
        assert {a.split("-")[0] for a in archs} == {"80", "90"}, archs


@needs_ext
def test_backends_say_why_cuda_is_missing():
    info = gankern.backends()["cuda"]
    if ext.with_cuda:
        assert ext.cuda_skip_reason == ""
        if not torch.cuda.is_available():
            assert not info["available"] and "no CUDA device" in info["reason"]
    else:
        assert not info["available"]
        assert ext.cuda_skip_reason and ext.cuda_skip_reason in info["reason"]
        if torch.version.cuda is None:
            assert "CPU build" in info["reason"]


# ---- the CMake configure step alone (seconds): what it decides about CUDA for the torch of this venv ----

def _configure(tmp_path, env_extra=None, args=()):
    import shutil
    import subprocess
    import sys
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not installed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    env.pop("CUDACXX", None)
    env.update(env_extra or {})
    r = subprocess.run([cmake, "-S", root, "-B", str(tmp_path / "b"), f"-DPython_EXECUTABLE={sys.executable}", *args],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [line.strip("- ") for line in r.stdout.splitlines() if "gankern: " in line]


def _nvcc_dirs():
    import shutil
    found = shutil.which("nvcc")
    dirs = {os.path.dirname(os.path.realpath(found)), os.path.dirname(found)} if found else set()
    return dirs | {"/usr/local/cuda/bin"}


def test_configure_without_nvcc_says_why(tmp_path):
    """A CUDA torch with no nvcc anywhere -> CPU kernels and one line saying why (a CPU torch: 'CPU build')."""
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and not os.path.exists(os.path.join(p, "nvcc")))
    lines = _configure(tmp_path, {"PATH": path, "CUDA_HOME": "", "CUDA_PATH": ""},
                       ["-DGANKERN_NVCC_PATHS=/nonexistent"])
    skipped = [line for line in lines if "CUDA kernels not built" in line]
    assert len(skipped) == 1, lines
    if torch.version.cuda is None:
        assert "is a CPU build" in skipped[0]
    else:
        assert "nvcc was not found" in skipped[0]


@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")
def test_configure_honours_arch_list(tmp_path):
    if not any(os.path.exists(os.path.join(d, "nvcc")) for d in _nvcc_dirs()):
        pytest.skip("nvcc not installed")
    lines = _configure(tmp_path, {"TORCH_CUDA_ARCH_LIST": "8.0 9.0+PTX"})
    assert any("CUDA kernels for archs 80-real;90 " in line for line in lines), lines
