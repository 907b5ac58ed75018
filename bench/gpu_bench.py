"""GPU benchmarks for tools/gpu_check.sh: CUDA-event timings, every implementation timed side by side.

    python bench/gpu_bench.py [--json out.json] [--quick] [--no-compile] [--device cuda]

* each op forward+backward at GAN shapes and one large shape: gankern ``cuda`` and ``triton`` vs
  PyTorch eager vs ``torch.compile`` of the same eager code;
* the MLP GAN and DCGAN training steps: gankern's fused models (cuda and triton backends) vs the tuned
  plain-PyTorch loop, each also captured once in a CUDA graph and replayed.

Times are medians of CUDA-event intervals (after warm-up).  ``--device cpu`` runs the same code on the
CPU with wall-clock timing (a smoke test of this script; cuda/triton/graph columns are skipped).
Prints one table last and writes JSON (machine, versions, every row).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import gankern
from gankern.gan.models import make_models
from gankern.gan.config import TrainConfig
from gankern.gan.step import make_optimizers, make_train_step


def timer(fn, device, warmup=5, iters=25):
    """Median milliseconds per call of fn()."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def _fwd_bwd(forward, inputs, grad_out):
    """fn() running forward(*inputs) and its backward with a fixed output gradient."""
    def fn():
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.grad is not None:
                t.grad = None
        y = forward(*inputs)
        y.backward(grad_out if y.dim() else None)
    return fn


# ---------------------------------------------------------------------------------------------- ops

def op_cases(device, quick):
    """(op, shape, dtype, forward(backend) -> callable taking the inputs, inputs, eager forward).
    On the CPU (smoke test of this script) the large shapes are left out."""
    cases = []
    big = device.type == "cuda"
    f32, bf16 = torch.float32, torch.bfloat16

    def rnd(*shape, dtype=f32, grad=True, memory_format=None, scale=1.0):
        t = torch.randn(*shape, device=device, dtype=dtype) * scale
        if memory_format is not None:
            t = t.contiguous(memory_format=memory_format)
        return t.requires_grad_(grad)

    # BCE-with-logits, float target (the GAN loss): D outputs of a batch, and one large
    for n in [n for n in ([128, 1 << 24] if quick else [128, 1024, 1 << 24]) if big or n < 1 << 20]:
        x = rnd(n, 1)
        ones = torch.ones(n, 1, device=device)
        cases.append(("bce_with_logits", f"({n}, 1) target 1.0", f32,
                      lambda be: (lambda x: gankern.bce_with_logits(x, 1.0, backend=be)), [x],
                      lambda x, ones=ones: F.binary_cross_entropy_with_logits(x, ones)))
    # BatchNorm + ReLU, training: MLP generator, DCGAN generator (channels-last too), one large
    bn_shapes = [((128, 1024), None), ((64, 128, 16, 16), None), ((64, 128, 16, 16), torch.channels_last),
                 ((16384, 1024), None)]
    if quick:
        bn_shapes = [bn_shapes[0], bn_shapes[2], bn_shapes[3]]
    if not big:
        bn_shapes = bn_shapes[:-1]
    for shape, fmt in bn_shapes:
        C = shape[1]
        x = rnd(*shape, memory_format=fmt)
        w, b = rnd(C), rnd(C)
        rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
        tag = f"{tuple(shape)}{' channels-last' if fmt is not None else ''} train"
        cases.append(("batch_norm_relu", tag, f32,
                      lambda be, rm=rm, rv=rv: (lambda x, w, b: gankern.batch_norm_relu(
                          x, rm, rv, w, b, training=True, backend=be)), [x, w, b],
                      lambda x, w, b, rm=rm, rv=rv: F.relu(F.batch_norm(x, rm, rv, w, b, True))))
    # Linear + LeakyReLU: discriminator layers at batch 128, one large GEMM; fp32 (TF32 off) and bf16
    llr = [(128, 784, 512), (128, 1024, 784)] + ([(4096, 4096, 4096)] if big else [])
    for dtype in (f32, bf16):
        for M, K, N in (llr if not quick else [llr[0], llr[-1]]):
            x, w, b = rnd(M, K, dtype=dtype), rnd(N, K, dtype=dtype, scale=0.03), rnd(N, dtype=dtype)
            cases.append(("linear_leaky_relu", f"{M}x{K}->{N}", dtype,
                          lambda be: (lambda x, w, b: gankern.linear_leaky_relu(x, w, b, 0.2, backend=be)),
                          [x, w, b], lambda x, w, b: F.leaky_relu(F.linear(x, w, b), 0.2)))
    return cases


def bench_ops(device, quick, use_compile, log):
    rows = []
    avail = gankern.backends()
    impls = ["cuda", "triton"] if device.type == "cuda" else ["cpp"]
    for op, shape, dtype, make, inputs, eager in op_cases(device, quick):
        y = eager(*inputs)
        g = torch.randn_like(y) if y.dim() else None
        times = {}
        for be in impls:
            if not avail[be]["available"]:
                times[be] = None
                continue
            times[be] = timer(_fwd_bwd(make(be), inputs, g), device)
        times["eager"] = timer(_fwd_bwd(eager, inputs, g), device)
        if use_compile:
            compiled = torch.compile(eager)
            times["compile"] = timer(_fwd_bwd(compiled, inputs, g), device, warmup=3)
        row = dict(kind="op", op=op, shape=shape, dtype=str(dtype).replace("torch.", ""), ms=times)
        rows.append(row)
        log(_fmt(row))
    return rows


# ---------------------------------------------------------------------------------------- train steps

def _step_factory(model, image_shape, fused, backend, device, batch):
    torch.manual_seed(0)
    G, D = make_models(model, image_shape, 64, fused=fused, backend=backend)
    G, D = G.to(device), D.to(device)
    cfg = TrainConfig(batch_size=batch, z_dim=64, lr=2e-4, beta1=0.5, beta2=0.999)
    opt_g, opt_d = make_optimizers(G, D, cfg, device)
    if device.type == "cuda":   # graph-capturable Adam (step count on the device)
        for o in (opt_g, opt_d):
            for grp in o.param_groups:
                grp["capturable"] = True
    step = make_train_step(G, D, opt_g, opt_d, z_dim=64, batch_size=batch, device=device, fused=fused,
                           backend=backend)
    real = torch.rand(batch, image_shape[0] * image_shape[1], device=device)
    return step, real


def _graphed(step, real, device):
    """Capture one call of step(real) in a CUDA graph; return replay()."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):   # warm-up on a side stream (autotuning, optimizer state, allocator)
            step(real)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(real)
    return graph.replay


def bench_steps(device, quick, log):
    rows = []
    specs = [("mlp", (28, 28), 128), ("dcgan", (64, 64), 64)]
    impls = [("plain", False, None)]
    if device.type == "cuda":
        impls += [("gankern:cuda", True, "cuda"), ("gankern:triton", True, "triton")]
    else:
        impls += [("gankern:cpp", True, "cpp")]
    for model, shape, batch in specs:
        times = {}
        for name, fused, be in impls:
            if be is not None and not gankern.backends()[be]["available"]:
                times[name] = None
                continue
            step, real = _step_factory(model, shape, fused, be, device, batch)
            times[name] = timer(lambda: step(real), device, warmup=5, iters=10 if quick else 20)
            if device.type == "cuda":
                try:
                    step, real = _step_factory(model, shape, fused, be, device, batch)
                    replay = _graphed(step, real, device)
                    times[name + "+graph"] = timer(replay, device, warmup=3, iters=20)
                except Exception as e:  # reported, not hidden: a capture failure is a finding
                    times[name + "+graph"] = None
                    log(f"  CUDA graph capture failed for {model} {name}: {type(e).__name__}: {e}")
        row = dict(kind="step", op=f"train_step[{model}]", shape=f"B{batch} {shape[0]}x{shape[1]} z64",
                   dtype="float32", ms=times)
        rows.append(row)
        log(_fmt(row))
    return rows


# ------------------------------------------------------------------------------------------- report

def _fmt(row):
    ms = row["ms"]
    base = ms.get("eager") or ms.get("plain")
    parts = []
    for k, v in ms.items():
        if v is None:
            parts.append(f"{k}=n/a")
        else:
            ratio = f" ({base / v:.2f}x)" if base and k not in ("eager", "plain") else ""
            parts.append(f"{k}={v * 1e3:.1f}us{ratio}")
    return f"{row['op']:<24} {row['shape']:<32} {row['dtype']:<9} " + "  ".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and iterations")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    ap.add_argument("--no-steps", action="store_true", help="skip the training steps")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_bench: error: --device cuda but torch.cuda.is_available() is False")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    log = lambda s: print(s, flush=True)  # noqa: E731
    t0 = time.time()
    rows = bench_ops(device, a.quick, not a.no_compile, log)
    if not a.no_steps:
        rows += bench_steps(device, a.quick, log)
    meta = dict(date=time.strftime("%Y-%m-%d"), device=(torch.cuda.get_device_name() if device.type == "cuda"
                                                      else platform.processor() or platform.machine()),
                torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                seconds=round(time.time() - t0, 1), timing="median of CUDA-event intervals, ms" if
                device.type == "cuda" else "median wall clock, ms", tf32=False)
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    print("\n== gankern GPU benchmark: " + ", ".join(f"{k} {v}" for k, v in meta.items()))
    print("ratios are eager (ops) or plain (steps) time / this column's time: > 1 is faster")
    for r in rows:
        print(_fmt(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
