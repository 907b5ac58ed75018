"""What this CPU reports for reduced-precision arithmetic, and the GEMM path gankern's CPU kernels take.

``cpu_features()`` gathers torch's capability (``torch.backends.cpu.get_cpu_capability()``), the
cpuinfo flags torch reads (``torch._C._cpu._get_cpu_capability()``: avx512_bf16, amx_bf16,
avx512_fp16, amx_fp16, ...; falls back to ``/proc/cpuinfo``), and the path the compiled
Linear+LeakyReLU kernel chooses for float16/bfloat16 (``"native"``: oneDNN reduced-precision GEMMs with
fp32 accumulation; ``"fp32"``: widened operands).  The choice itself is made in C++
(csrc/cpu/linear_leaky_relu.cpp, ``half_gemm_native``) from the same cpuinfo flags;
``GANKERN_LLR_HALF_GEMM=native|fp32`` forces it.  ``gankern info`` prints this.
"""
from __future__ import annotations

import functools
import os

import torch

# cpuinfo flags (torch's names) that mean dot-product units for a dtype
UNITS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}
# /proc/cpuinfo spells some of them differently
_PROC_NAMES = {"avx512_bf16": "avx512_bf16", "amx_bf16": "amx_bf16", "avx512_fp16": "avx512_fp16",
               "amx_fp16": "amx_fp16", "amx_tile": "amx_tile"}


@functools.lru_cache(maxsize=None)
def _flags() -> dict:
    try:
        caps = dict(torch._C._cpu._get_cpu_capability())
        return {k: v for k, v in caps.items() if isinstance(v, bool)}
    except (AttributeError, RuntimeError):
        pass
    found = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    found = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {k: v in found for k, v in _PROC_NAMES.items()}


def has_units(dtype: torch.dtype) -> bool:
    """True when the CPU reports dot-product units for ``dtype`` (bfloat16 / float16)."""
    f = _flags()
    return any(f.get(k, False) for k in UNITS[dtype])


def llr_gemm_path(dtype: torch.dtype) -> str | None:
    """"native" or "fp32": the GEMM path of the compiled CPU Linear+LeakyReLU for ``dtype`` at GAN sizes
    (honours GANKERN_LLR_HALF_GEMM); None when the extension is not built."""
    try:
        return torch.ops.gankern._linear_leaky_relu_cpu_gemm(dtype)
    except (AttributeError, RuntimeError):
        return None


def cpu_features() -> dict:
    f = _flags()
    cap = torch.backends.cpu.get_cpu_capability()
    keys = ("avx512_f", "avx512_bf16", "amx_tile", "amx_bf16", "avx512_fp16", "amx_fp16")
    return {"capability": cap, "flags": {k: bool(f.get(k, False)) for k in keys},
            "mkldnn": torch.backends.mkldnn.is_available(),
            "bf16_units": has_units(torch.bfloat16), "fp16_units": has_units(torch.float16),
            "llr_gemm": {"bfloat16": llr_gemm_path(torch.bfloat16), "float16": llr_gemm_path(torch.float16)},
            "override": os.environ.get("GANKERN_LLR_HALF_GEMM") or None}


def describe() -> str:
    c = cpu_features()
    units = [k for k, v in c["flags"].items() if v and k != "avx512_f"]
    return (f"CPU capability {c['capability']}, reduced-precision units: {', '.join(units) or 'none'}; "
            f"Linear+LeakyReLU GEMMs: bfloat16 {c['llr_gemm']['bfloat16']}, float16 {c['llr_gemm']['float16']}"
            + (f" (GANKERN_LLR_HALF_GEMM={c['override']})" if c["override"] else ""))
