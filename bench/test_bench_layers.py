"""The classic MLP GAN (z 64 -> 128..1024 -> 784; 784 -> 512..128 -> 1) built in plain torch, as used by
gankern.fuse: one generator+discriminator forward+backward, fused model vs the same model eager and
under torch.compile."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gankern
from conftest import compiled, record


def _gen(z=64, im=784, h=128):
    def blk(i, o):
        return nn.Sequential(nn.Linear(i, o), nn.BatchNorm1d(o), nn.ReLU(inplace=True))
    return nn.Sequential(blk(z, h), blk(h, 2 * h), blk(2 * h, 4 * h), blk(4 * h, 8 * h), nn.Linear(8 * h, im), nn.Sigmoid())


def _disc(im=784, h=128):
    def blk(i, o):
        return nn.Sequential(nn.Linear(i, o), nn.LeakyReLU(0.2, inplace=True))
    return nn.Sequential(blk(im, 4 * h), blk(4 * h, 2 * h), blk(2 * h, h), nn.Linear(h, 1))


@pytest.mark.parametrize("batch", [128])
@pytest.mark.parametrize("impl", ["gankern:cpp", "eager", "compile"])
def test_mlp_gan_step(benchmark, impl, batch):
    torch.manual_seed(0)
    gen, disc = _gen(), _disc()
    if impl.startswith("gankern"):
        gankern.fuse(gen, backend="cpp")
        gankern.fuse(disc, backend="cpp")
    z = torch.randn(batch, 64)

    def step(z):
        fake = gen(z)
        out = disc(fake)
        return F.binary_cross_entropy_with_logits(out, torch.ones_like(out))

    fn = compiled(step) if impl == "compile" else step

    def run():
        loss = fn(z)
        loss.backward()
        return loss

    run()
    record(benchmark, op="mlp_gan_step", impl=impl, shape=f"batch={batch}", dtype=torch.float32, passes="fwd+bwd")
    benchmark(run)
