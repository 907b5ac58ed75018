"""Ahead-of-time compile of every Triton kernel for real GPUs, without a GPU.

Each ``gankern/triton/<op>.py`` exposes ``aot_specs()``: a list of ``AotSpec`` — one per
kernel x dtype x autotune config — and this module compiles each for sm_80 and sm_90 with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``, then reads:
  * shared memory used vs the arch's per-block limit,
  * registers and spills, from ``ptxas -v`` on the PTX (Triton's bundled ptxas),
  * whether the PTX uses ``wgmma`` (expected for fp16/bf16 GEMMs on sm_90).

Run as ``python -m gankern.triton._aot [--json]`` (the test suite does this in a
subprocess, because ``TRITON_INTERPRET=1`` — set for the numerics tests — replaces
``triton.jit`` with the interpreter, which cannot be compiled).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile

# Shared memory a block may use (opt-in maximum), bytes.
SMEM_LIMIT = {80: 166912, 90: 232448}
ARCHS = (80, 90)


@dataclasses.dataclass
class AotSpec:
    name: str                      # e.g. "bce_fwd[fp16,BLOCK=1024]"
    fn: object                     # the @triton.jit function (unwrap autotuners: .fn)
    signature: dict                # arg name -> "*fp32" / "i32" / "fp32" / "constexpr"
    constexprs: dict               # constexpr name -> value
    num_warps: int = 4
    num_stages: int = 3
    expect_wgmma: bool = False     # fp16/bf16 tl.dot kernels: True (checked on sm_90 only)


def configs_of(kernel):
    """The autotune configs of an @triton.autotune kernel (or [None] for a plain jit fn)."""
    return list(getattr(kernel, "configs", [None]))


def jit_fn(kernel):
    """The underlying JITFunction of an autotuned / heuristics-wrapped kernel."""
    while hasattr(kernel, "fn") and not hasattr(kernel, "src"):
        kernel = kernel.fn
    return kernel


def all_specs():
    import gankern.triton as pkg
    specs = []
    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name.startswith("_"):
            continue
        m = importlib.import_module(f"gankern.triton.{mod.name}")
        if hasattr(m, "aot_specs"):
            specs.extend(m.aot_specs())
    return specs


def _ptxas(cc=80):
    try:  # the ptxas Triton itself uses for this arch (sm_90+: "ptxas-blackwell", a newer ptxas)
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(cc).path
    except Exception:
        pass
    import triton
    cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return cand if os.path.exists(cand) else "ptxas"


def ptxas_report(ptx: str, arch: str, cc: int = 80) -> dict:
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        with open(p, "w") as f:
            f.write(ptx)
        r = subprocess.run([_ptxas(cc), f"-arch={arch}", "-v", p, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    log = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch}:\n{log}")
    regs = max((int(x) for x in re.findall(r"Used (\d+) registers", log)), default=0)
    spill_st = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
    spill_ld = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log))
    return {"registers": regs, "spill_stores": spill_st, "spill_loads": spill_ld}


def compile_spec(spec: AotSpec, cc: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=jit_fn(spec.fn), signature=spec.signature, constexprs=spec.constexprs)
    k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                       options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    ptx = k.asm["ptx"]
    m = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    arch = m.group(1).rstrip(",") if m else f"sm_{cc}"
    rep = ptxas_report(ptx, arch, cc)
    return {"name": spec.name, "cc": cc, "arch": arch, "shared": int(k.metadata.shared),
            "smem_limit": SMEM_LIMIT[cc], "num_warps": spec.num_warps, "num_stages": spec.num_stages,
            "wgmma": "wgmma" in ptx, "expect_wgmma": spec.expect_wgmma and cc >= 90, **rep}


def problems(r: dict) -> list:
    out = []
    if r["shared"] > r["smem_limit"]:
        out.append(f"shared memory {r['shared']} B > sm_{r['cc']} limit {r['smem_limit']} B")
    if r["spill_stores"] or r["spill_loads"]:
        out.append(f"register spills: {r['spill_stores']} B stores, {r['spill_loads']} B loads")
    if r["expect_wgmma"] and not r["wgmma"]:
        out.append("expected wgmma in the sm_90 PTX (fp16/bf16 GEMM), found none")
    return out


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON list of results")
    ap.add_argument("--arch", type=int, action="append", help="80 and/or 90 (default both)")
    ap.add_argument("-k", default="", help="only specs whose name contains this")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")
    results = []
    for spec in all_specs():
        if a.k not in spec.name:
            continue
        for cc in a.arch or ARCHS:
            try:
                r = compile_spec(spec, cc)
                r["problems"] = problems(r)
            except Exception as e:  # report, do not stop: the test lists every failure
                r = {"name": spec.name, "cc": cc, "problems": [f"compile failed: {type(e).__name__}: {e}"[:2000]]}
            results.append(r)
            if not a.json:
                flag = "OK " if not r["problems"] else "BAD"
                print(f"{flag} sm_{cc} {spec.name}: " + (
                    f"regs={r['registers']} spills={r['spill_stores']}/{r['spill_loads']} "
                    f"smem={r['shared']} wgmma={r['wgmma']}" if "shared" in r else "")
                    + ("  " + "; ".join(r["problems"]) if r["problems"] else ""), flush=True)
    if a.json:
        print(json.dumps(results))
    return 1 if any(r["problems"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
