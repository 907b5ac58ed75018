"""MLP GAN training step: 2 processes x 1 thread (DDP, gloo, synchronized BatchNorm) vs 1 process x 2 threads.

    .venv/bin/python bench/ddp_step.py [--rounds 3] [--steps 20] [--chunks 5]

Not a pytest-benchmark suite: the 2-process configurations need their own processes.  The configurations
run interleaved in one invocation (round 1: A, B, C; round 2: A, B, C; ...), so machine load hits all
of them alike:

  A  "ddp 2x1"      2 ranks (1 thread each), global batch 128 = 2 x 64, the trainer's wiring
                    (gankern.gan.distributed.DistContext.wrap: DDP, G's BatchNorm synchronized)
  B  "local 2x1"    the same 2 processes at 1 thread, batch 64 each, no communication at all
                    (the compute floor of A: A - B is what communication and waiting cost)
  C  "single 1x2"   1 process, 2 threads, batch 128 (plain ``gankern train``)

Per configuration: median over chunks of ``steps`` steps of the time per step (rank 0's), after a
warm-up.  A also reports the time spent inside the synchronized BatchNorm all-reduces (blocking,
measured around each call), and afterwards, with nothing else running, the time of one all-reduce of
the gradient bytes of G and of D (what DDP reduces per step).
Output: a table, and JSON in bench/results/ddp_step.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
B, Z, PIX = 128, 64, 784


def worker(mode, rank, world, port, steps, chunks):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(2 if mode == "single" else 1)
    from gankern.gan.distributed import DistContext
    from gankern.gan.models import make_models
    from gankern.gan.config import TrainConfig
    from gankern.gan.step import make_optimizers, make_train_step
    if mode != "single":
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))  # a stuck rank: an error, not a hang
    bn_time = [0.0, 0]
    if mode == "ddp":
        orig = dist.all_reduce

        def timed(*a, **k):  # the synchronized BatchNorm calls dist.all_reduce (DDP's reducer does not)
            t = time.perf_counter()
            r = orig(*a, **k)
            bn_time[0] += time.perf_counter() - t
            bn_time[1] += 1
            return r
        dist.all_reduce = timed
    dev = torch.device("cpu")
    torch.manual_seed(0)
    G, D = make_models("mlp", (28, 28), Z, fused=True)
    cfg = TrainConfig(batch_size=B, z_dim=Z)
    opt_g, opt_d = make_optimizers(G, D, cfg, dev)
    b = B if mode == "single" else B // world
    if mode == "ddp":
        Gt, Dt = DistContext(dev, rank, world, rank, enabled=True).wrap(G, D)
    else:
        Gt, Dt = G, D
    step = make_train_step(Gt, Dt, opt_g, opt_d, z_dim=Z, batch_size=b, device=dev)
    g = torch.Generator().manual_seed(rank)
    batches = [torch.rand(b, PIX, generator=g) for _ in range(4)]
    for i in range(10):
        step(batches[i % 4])
    if mode != "single":
        dist.barrier()
    per, bn = [], []
    for c in range(chunks):
        bn_time[:] = [0.0, 0]
        t = time.perf_counter()
        for i in range(steps):
            step(batches[i % 4])
        per.append((time.perf_counter() - t) / steps)
        bn.append(bn_time[0] / steps)
    res = {"mode": mode, "ms_per_step": statistics.median(per) * 1e3, "chunks_ms": [round(p * 1e3, 3) for p in per]}
    if mode == "ddp":
        res["bn_allreduce_ms_per_step"] = statistics.median(bn) * 1e3
        res["bn_allreduces_per_step"] = bn_time[1] / steps
        dist.all_reduce = orig
        sizes = {"G": sum(p.numel() for p in G.parameters()), "D": sum(p.numel() for p in D.parameters())}
        res["grad_numel"] = sizes
        res["bn_channels"] = sum(m.num_features for m in G.modules() if hasattr(m, "num_features"))
        for name, n in sizes.items():
            buf = torch.zeros(n)
            ts = []
            for _ in range(15):
                dist.barrier()
                t = time.perf_counter()
                dist.all_reduce(buf)
                ts.append(time.perf_counter() - t)
            res[f"allreduce_{name}_grads_ms"] = statistics.median(ts[3:]) * 1e3
        small = torch.zeros(2 * 1024 + 1, dtype=torch.float64)  # the largest BatchNorm statistics all-reduce
        ts = []
        for _ in range(30):
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(small)
            ts.append(time.perf_counter() - t)
        res["allreduce_bn_stats_alone_ms"] = statistics.median(ts[5:]) * 1e3
    if mode != "single":
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        print("RESULT " + json.dumps(res), flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode, steps, chunks):
    world = 1 if mode == "single" else 2
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="2" if mode == "single" else "1")
    # only rank 0's output is read (RESULT): a second pipe read after rank 0 finishes could fill up and block
    # rank 1 while rank 0 waits for it in a collective
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", mode, str(r), str(world), str(port), str(steps),
                               str(chunks)], env=env, stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL,
                              text=True) for r in range(world)]
    outs = [p.communicate(timeout=600)[0] or "" for p in procs]
    line = [ln for ln in outs[0].splitlines() if ln.startswith("RESULT ")]
    if not line or any(p.returncode for p in procs):
        raise SystemExit(f"{mode} failed: {outs}")
    return json.loads(line[0][7:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--chunks", type=int, default=5)
    a = ap.parse_args()
    allr = []
    for r in range(a.rounds):
        for mode in ("ddp", "local", "single"):
            res = launch(mode, a.steps, a.chunks)
            res["round"] = r
            res["loadavg_1min_after"] = os.getloadavg()[0]
            allr.append(res)
            extra = ""
            if mode == "ddp":
                extra = (f"  (sync-BN all-reduces: {res['bn_allreduce_ms_per_step']:.3f} ms/step in "
                         f"{res['bn_allreduces_per_step']:.0f} calls; alone: all-reduce of G grads "
                         f"{res['allreduce_G_grads_ms']:.3f} ms, D grads {res['allreduce_D_grads_ms']:.3f} ms, "
                         f"one BN-statistics all-reduce {res['allreduce_bn_stats_alone_ms']:.3f} ms)")
            print(f"round {r}  {mode:7s} {res['ms_per_step']:8.3f} ms/step  chunks {res['chunks_ms']}  "
                  f"load {res['loadavg_1min_after']:.1f}{extra}",
                  flush=True)
    print("\nmedian over rounds (ms/step):")
    for mode in ("ddp", "local", "single"):
        print(f"  {mode:7s} {statistics.median(x['ms_per_step'] for x in allr if x['mode'] == mode):8.3f}")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "ddp_step.json"), "w") as f:
        json.dump({"batch": B, "z": Z, "pixels": PIX, "machine_cores": os.cpu_count(), "runs": allr}, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        m, rk, w, pt, st, ch = sys.argv[2:8]
        worker(m, int(rk), int(w), int(pt), int(st), int(ch))
    else:
        main()
