"""Shared benchmark set-up: 2 CPU threads, and one convention for every bench file.

Each benchmark calls ``record(benchmark, op=..., impl=..., shape=..., dtype=..., passes=...)``
before timing.  ``impl`` is one of:
  "gankern:<backend>"  the library (e.g. gankern:cpp)
  "eager"              the plain-PyTorch composition, eager
  "compile"            the same composition under torch.compile
  "floor"              a lower bound (e.g. the bare GEMMs, a clone())
All implementations of one (op, shape, dtype, passes) share a pytest-benchmark group, so
they are timed side by side in one run; bench/report.py turns the JSON into ratios.
"""
import os
import platform

import pytest
import torch

torch.set_num_threads(int(os.environ.get("GANKERN_BENCH_THREADS", "2")))


def record(benchmark, *, op, impl, shape, dtype, passes):
    benchmark.group = f"{op} | {passes} | {shape} | {dtype}"
    benchmark.extra_info.update(op=op, impl=impl, shape=str(shape), dtype=str(dtype).replace("torch.", ""),
                                passes=passes, threads=torch.get_num_threads(),
                                machine=f"{platform.processor() or platform.machine()} {os.cpu_count()} cores")


def compiled(fn, **kw):
    """torch.compile'd fn (default mode) with dynamic=False, so each shape gets its best graph."""
    return torch.compile(fn, dynamic=False, **kw)


@pytest.fixture
def recorder():
    return record
