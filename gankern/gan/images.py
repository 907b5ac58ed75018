"""Images of a run: sample grids (PNG) and the loss plot."""
from __future__ import annotations

import math
import os

from .checkpoint import read_metrics

__all__ = ["save_grid", "plot_losses"]


def save_grid(images, image_shape, path, nrow=None, scale=None):
    """(n, H*W) images in [0, 1] -> one PNG grid (Pillow)."""
    from PIL import Image
    import numpy as np
    x = images.detach().float().cpu().clamp(0, 1).reshape(-1, *image_shape).numpy()
    n, h, w = x.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    pad = 1
    grid = np.ones((ncol * (h + pad) + pad, nrow * (w + pad) + pad), dtype=np.float32) * 0.5
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = x[i]
    img = Image.fromarray((grid * 255).round().astype(np.uint8), mode="L")
    scale = scale or max(1, 256 // max(grid.shape))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path


def plot_losses(metrics_jsonl, path):
    rows = read_metrics(metrics_jsonl)
    rows = [r for r in rows if "loss_d" in r]
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [r["step"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    a1.plot(steps, [r["loss_d"] for r in rows], label="D loss")
    a1.plot(steps, [r["loss_g"] for r in rows], label="G loss")
    a1.set_xlabel("step")
    a1.legend()
    a1.set_title("losses")
    a2.plot(steps, [r["d_x"] for r in rows], label="D(x)")
    a2.plot(steps, [r["d_g_z"] for r in rows], label="D(G(z))")
    a2.set_xlabel("step")
    a2.set_ylim(0, 1)
    a2.legend()
    a2.set_title("discriminator outputs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
