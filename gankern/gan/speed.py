"""Timing the training step: fused (gankern) vs plain-PyTorch models in the same tuned loop.

Used by ``gankern train --compare-torch`` and ``gankern bench --quick``; the benchmark suites themselves
(pytest-benchmark, ``bench/``) import from gankern, never the reverse.
"""
from __future__ import annotations

import time

import torch

from .data import ImageData, InfiniteSampler
from .models import make_models
from .step import make_optimizers, make_train_step

__all__ = ["time_steps", "compare_speed", "synthetic_data"]


def synthetic_data(n=2048, image_shape=(28, 28), seed=0) -> ImageData:
    """Uniform noise images (MNIST-sized by default): timing needs no real data."""
    g = torch.Generator().manual_seed(seed)
    return ImageData("synthetic", torch.rand(n, image_shape[0] * image_shape[1], generator=g),
                     torch.zeros(n, dtype=torch.long), tuple(image_shape))


def time_steps(cfg, data, device, *, fused, steps=30, warmup=5, rounds=3):
    """Seconds per training step (median of ``rounds``) of the tuned loop with fused or plain models."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        G, D = make_models(cfg.model, data.image_shape, cfg.z_dim, fused=fused, backend=cfg.backend)
        G, D = G.to(device), D.to(device)
        opt_g, opt_d = make_optimizers(G, D, cfg, device)
        scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
        step = make_train_step(G, D, opt_g, opt_d, z_dim=cfg.z_dim, batch_size=cfg.batch_size, device=device,
                               real_label=cfg.real_label, fused=fused, backend=cfg.backend,
                               precision=cfg.precision, scaler=scaler)
        x = data.x.to(device)
        sampler = InfiniteSampler(len(data), cfg.batch_size, seed=cfg.seed, device=device)
        batches = [x[sampler.next()] for _ in range(8)]

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize()
        for i in range(warmup):
            step(batches[i % 8])
        times = []
        for _ in range(rounds):
            sync()
            t = time.perf_counter()
            for i in range(steps):
                step(batches[i % 8])
            sync()
            times.append((time.perf_counter() - t) / steps)
    return sorted(times)[len(times) // 2]


def compare_speed(cfg, data, device, log=print, steps=30):
    fused = time_steps(cfg, data, device, fused=True, steps=steps)
    plain = time_steps(cfg, data, device, fused=False, steps=steps)
    fused = min(fused, time_steps(cfg, data, device, fused=True, steps=steps))
    plain = min(plain, time_steps(cfg, data, device, fused=False, steps=steps))
    res = {"gankern_ms_per_step": round(fused * 1e3, 3), "torch_ms_per_step": round(plain * 1e3, 3),
           "speedup": round(plain / fused, 3), "model": cfg.model, "batch_size": cfg.batch_size,
           "image_shape": list(data.image_shape), "device": str(device), "threads": torch.get_num_threads()}
    log(f"speed ({cfg.model}, batch {cfg.batch_size}, {data.image_shape[0]}x{data.image_shape[1]}, {device}, "
        f"{torch.get_num_threads()} threads): gankern {fused * 1e3:.2f} ms/step, plain PyTorch (same loop) "
        f"{plain * 1e3:.2f} ms/step -> {plain / fused:.2f}x")
    return res
