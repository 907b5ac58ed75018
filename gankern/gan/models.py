"""GAN models built from gankern.nn, and their plain-PyTorch twins.

Every model takes flat inputs and gives flat outputs: the generator maps ``z`` (N, z_dim) to images
(N, H*W) in [0, 1]; the discriminator maps images (N, H*W) (or (N, 1, H, W)) to logits (N, 1).

``fused=True`` builds the blocks from the fused layers (``gankern.nn.LinearLeakyReLU``,
``BatchNormReLU1d/2d``, and ``gankern.nn.Linear`` for the MLP generator's Linear layers); ``fused=False`` builds the same structure from torch.nn (Linear, BatchNorm,
ReLU, LeakyReLU).  Parameter-free activations live in their own attributes, so the state_dict keys of
the two variants are identical: a checkpoint of one loads into the other.

* MLP GAN: G = 4 x [Linear(no bias) -> BatchNorm+ReLU] (128, 256, 512, 1024) -> Linear -> Sigmoid;
  D = 3 x Linear+LeakyReLU(0.2) (512, 256, 128) -> Linear -> 1 logit.
* DCGAN for square single-channel images whose side is 4..7 times a power of two (8x8 digits, 28x28,
  32x32): G = ConvTranspose2d -> BatchNorm+ReLU blocks doubling the side, -> ConvTranspose2d -> Sigmoid;
  D = Conv2d(stride 2) -> LeakyReLU(0.2) blocks -> Conv2d -> 1 logit.
"""
from __future__ import annotations

import torch
import torch.nn as nn

MODELS = ("mlp", "dcgan")
SLOPE = 0.2


def _gnn():
    from .. import nn as gnn  # the fused layers
    return gnn


# ---------------------------------------------------------------------------------------------- MLP

class _GBlock(nn.Module):
    """Linear (no bias: BatchNorm removes it) -> BatchNorm1d + ReLU."""

    def __init__(self, fin, fout, fused, backend):
        super().__init__()
        self.linear = _gnn().Linear(fin, fout, bias=False, backend=backend) if fused else nn.Linear(fin, fout, bias=False)
        self.bn = _gnn().BatchNormReLU1d(fout, backend=backend) if fused else nn.BatchNorm1d(fout)
        self.act = nn.Identity() if fused else nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.linear(x)))


class _DBlock(nn.Module):
    """Linear -> LeakyReLU(0.2)."""

    def __init__(self, fin, fout, fused, backend):
        super().__init__()
        self.linear = (_gnn().LinearLeakyReLU(fin, fout, negative_slope=SLOPE, backend=backend) if fused
                       else nn.Linear(fin, fout))
        self.act = nn.Identity() if fused else nn.LeakyReLU(SLOPE)

    def forward(self, x):
        return self.act(self.linear(x))


class MLPGenerator(nn.Module):
    def __init__(self, z_dim=64, pixels=784, hidden=(128, 256, 512, 1024), *, fused=True, backend=None):
        super().__init__()
        self.z_dim, self.pixels = z_dim, pixels
        dims = (z_dim,) + tuple(hidden)
        self.blocks = nn.ModuleList(_GBlock(a, b, fused, backend) for a, b in zip(dims[:-1], dims[1:]))
        self.out = _gnn().Linear(dims[-1], pixels, backend=backend) if fused else nn.Linear(dims[-1], pixels)

    def forward(self, z):
        x = z
        for b in self.blocks:
            x = b(x)
        return torch.sigmoid(self.out(x))


class MLPDiscriminator(nn.Module):
    def __init__(self, pixels=784, hidden=(512, 256, 128), *, fused=True, backend=None):
        super().__init__()
        self.pixels = pixels
        dims = (pixels,) + tuple(hidden)
        self.blocks = nn.ModuleList(_DBlock(a, b, fused, backend) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], 1)

    def forward(self, x):
        x = x.reshape(x.shape[0], self.pixels)
        for b in self.blocks:
            x = b(x)
        return self.out(x)


# -------------------------------------------------------------------------------------------- DCGAN

def _dcgan_plan(side):
    """side = start * 2**k with start in 4..7 and k >= 1 -> (start, k)."""
    for k in range(1, 8):
        start, rem = divmod(side, 2 ** k)
        if rem == 0 and 4 <= start <= 7:
            return start, k
    raise ValueError(f"dcgan needs square images whose side is 4..7 times a power of two (8, 16, 28, 32, 64...); "
                     f"got side {side} (use --model mlp)")


class _ConvGBlock(nn.Module):
    def __init__(self, cin, cout, k, s, p, fused, backend):
        super().__init__()
        self.conv = nn.ConvTranspose2d(cin, cout, k, s, p, bias=False)
        self.bn = _gnn().BatchNormReLU2d(cout, backend=backend) if fused else nn.BatchNorm2d(cout)
        self.act = nn.Identity() if fused else nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class _ConvDBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 4, 2, 1)
        self.act = nn.LeakyReLU(SLOPE)

    def forward(self, x):
        return self.act(self.conv(x))


def _dcgan_init(m):
    for mod in m.modules():
        if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(mod.weight, 0.0, 0.02)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.modules.batchnorm._NormBase) and mod.weight is not None:
            nn.init.normal_(mod.weight, 1.0, 0.02)
            nn.init.zeros_(mod.bias)


class DCGANGenerator(nn.Module):
    def __init__(self, z_dim=64, image_shape=(28, 28), width=64, *, fused=True, backend=None):
        super().__init__()
        h, w = image_shape
        if h != w:
            raise ValueError(f"dcgan needs square images; got {h}x{w}")
        start, k = _dcgan_plan(h)
        self.z_dim, self.image_shape, self.pixels = z_dim, (h, w), h * w
        ch = [width * 2 ** i for i in reversed(range(k))]  # e.g. k=2: [128, 64]
        blocks = [_ConvGBlock(z_dim, ch[0], start, 1, 0, fused, backend)]
        blocks += [_ConvGBlock(a, b, 4, 2, 1, fused, backend) for a, b in zip(ch[:-1], ch[1:])]
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.ConvTranspose2d(ch[-1], 1, 4, 2, 1)
        _dcgan_init(self)

    def forward(self, z):
        x = z.reshape(z.shape[0], self.z_dim, 1, 1)
        for b in self.blocks:
            x = b(x)
        return torch.sigmoid(self.out(x)).reshape(z.shape[0], self.pixels)


class DCGANDiscriminator(nn.Module):
    def __init__(self, image_shape=(28, 28), width=64, *, fused=True, backend=None):
        super().__init__()
        h, w = image_shape
        if h != w:
            raise ValueError(f"dcgan needs square images; got {h}x{w}")
        start, k = _dcgan_plan(h)
        self.image_shape = (h, w)
        ch = [1] + [width * 2 ** i for i in range(k)]  # k=2: [1, 64, 128]
        self.blocks = nn.ModuleList(_ConvDBlock(a, b) for a, b in zip(ch[:-1], ch[1:]))
        self.out = nn.Conv2d(ch[-1], 1, start, 1, 0)
        _dcgan_init(self)

    def forward(self, x):
        x = x.reshape(x.shape[0], 1, *self.image_shape)
        for b in self.blocks:
            x = b(x)
        return self.out(x).reshape(x.shape[0], 1)


# ------------------------------------------------------------------------------------------ helpers

def make_models(model: str, image_shape, z_dim: int = 64, *, fused: bool = True, backend=None):
    """(generator, discriminator) for ``model`` in MODELS and images of ``image_shape`` (H, W)."""
    h, w = image_shape
    if model == "mlp":
        return (MLPGenerator(z_dim, h * w, fused=fused, backend=backend),
                MLPDiscriminator(h * w, fused=fused, backend=backend))
    if model == "dcgan":
        return (DCGANGenerator(z_dim, (h, w), fused=fused, backend=backend),
                DCGANDiscriminator((h, w), fused=fused, backend=backend))
    raise ValueError(f"model must be one of {', '.join(MODELS)}; got {model!r}")


def set_backend(module: nn.Module, backend) -> nn.Module:
    """Set the ``backend`` attribute of every gankern layer inside ``module``."""
    for m in module.modules():
        if type(m).__module__.startswith("gankern.nn") and hasattr(m, "backend"):
            m.backend = backend
    return module


# ---------------------------------------------------------------------------------------------- running a generator

@torch.no_grad()
def recalibrate_batch_norm(G, z_dim, device, seed, n=4096, batch=256):
    """Recompute the running statistics of every BatchNorm in ``G`` for G's own weights.

    For the EMA generator: its weights average many steps, so the running statistics of the
    training generator (a ~10-step average for momentum 0.1, measured with other weights) do not
    match them, and eval-mode samples suffer (demo, 4 seeds: Fréchet distance 3.4-7.9x the floor
    with copied statistics, 2.6-3.6x recalibrated).  ``n`` samples of noise from a private
    generator (no global RNG use; same weights -> same statistics) through G in training mode
    with a cumulative average (momentum None), as torch's BatchNorm defines it.
    """
    norms = [m for m in G.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats]
    if not norms:
        return G
    was, momenta = G.training, [m.momentum for m in norms]
    g = torch.Generator().manual_seed(seed)
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        G.train()
        for c in torch.randn(n, z_dim, generator=g).split(batch):
            G(c.to(device))
    finally:
        for m, mom in zip(norms, momenta):
            m.momentum = mom
        G.train(was)
    return G


@torch.no_grad()
def generate(G, n, z_dim, device, seed, batch=1024):
    """n samples from G in eval mode with noise from a private generator (no global RNG use)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, z_dim, generator=g)
    was = G.training
    G.eval()
    try:
        return torch.cat([G(c.to(device)).float().cpu() for c in z.split(batch)])
    finally:
        G.train(was)
