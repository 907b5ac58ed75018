"""Generic hypothesis helpers for the fuzz suites (shapes, dtypes, layouts, settings, crash isolation)."""
import os
import subprocess
import sys

import torch
from hypothesis import HealthCheck, settings, strategies as st

DIMS = [0, 1, 2, 3, 5, 7, 13]          # 0, 1 and primes
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "sliced", "expanded", "transposed", "offset"]


def fuzz_settings(default=25):
    """Fixed seed (derandomize), bounded examples; GANKERN_FUZZ_EXAMPLES=N for more."""
    n = int(os.environ.get("GANKERN_FUZZ_EXAMPLES", default))
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


dims = st.sampled_from(DIMS)
dtypes = st.sampled_from(DTYPES)
layouts = st.sampled_from(LAYOUTS)


def make_tensor(shape, dtype, layout, gen, scale=1.0):
    """Random values of `shape` in the given layout (same values whatever the strides)."""
    shape = tuple(shape)
    if layout == "expanded" and len(shape) and any(s > 1 for s in shape):
        d = max(range(len(shape)), key=lambda i: shape[i])
        small = list(shape); small[d] = 1
        return (torch.randn(small, generator=gen) * scale).to(dtype).expand(shape)
    if layout == "sliced" and len(shape):
        big = list(shape); big[-1] = 2 * big[-1]
        return (torch.randn(big, generator=gen) * scale).to(dtype)[..., ::2]
    if layout == "transposed" and len(shape) >= 2:
        return (torch.randn(shape[::-1], generator=gen) * scale).to(dtype).permute(*reversed(range(len(shape))))
    if layout == "offset":
        n = 1
        for s in shape:
            n *= s
        return (torch.randn(n + 3, generator=gen) * scale).to(dtype)[3:].view(shape)
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def run_child_pytest(test_file, expr, timeout=900):
    """Run `pytest test_file -k expr` in a child process (GANKERN_FUZZ_CHILD=1): a crash (signal) of the
    child is a failed test here, not a dead test run.  Returns (returncode, output)."""
    env = dict(os.environ, GANKERN_FUZZ_CHILD="1", TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist",
                        test_file, "-k", expr], env=env, capture_output=True, text=True, timeout=timeout,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(test_file))))
    return p.returncode, p.stdout[-6000:] + p.stderr[-3000:]
