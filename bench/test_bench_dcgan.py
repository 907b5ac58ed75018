"""DCGAN 64x64 training step (batch 64, nz 100, ngf = ndf = 64, fp32, CPU, 2 threads): the plain
pytorch/examples-style model vs the same model after ``gankern.fuse``, side by side in one run.

The step: D on real and fake (BCE), backward, Adam; G through D, backward, Adam (the examples' loop).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gankern
from conftest import record

B, NZ, NGF, NDF = 64, 100, 64, 64
OP, PASSES, SHAPE, DTYPE = "gan_train_step[dcgan64]", "D+G step (fwd+bwd+adam)", f"B{B} 64x64 ngf{NGF}", torch.float32


def dcgan(nz=NZ, ngf=NGF, ndf=NDF, nc=3):
    g = nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
        nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())
    d = nn.Sequential(
        nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Flatten(0))
    return g, d


def make_step(g, d):
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    ones, zeros = torch.ones(B), torch.zeros(B)

    def step(real):
        d.zero_grad()
        fake = g(torch.randn(B, NZ, 1, 1))
        loss_d = F.binary_cross_entropy_with_logits(d(real), ones) + \
            F.binary_cross_entropy_with_logits(d(fake.detach()), zeros)
        loss_d.backward()
        opt_d.step()
        g.zero_grad()
        loss_g = F.binary_cross_entropy_with_logits(d(fake), ones)
        loss_g.backward()
        opt_g.step()
    return step


def models(fused):
    torch.manual_seed(0)
    g, d = dcgan()
    if fused:
        gankern.fuse(g, backend="cpp")
        gankern.fuse(d, backend="cpp")
    return g, d


@pytest.mark.parametrize("impl", ["gankern:cpp", "eager"])
def test_dcgan_train_step(benchmark, impl):
    if impl == "gankern:cpp" and not gankern.backends()["cpp"]["available"]:
        pytest.skip(gankern.backends()["cpp"]["reason"])
    step = make_step(*models(impl != "eager"))
    real = torch.rand(B, 3, 64, 64) * 2 - 1
    for _ in range(2):
        step(real)
    record(benchmark, op=OP, impl=impl, shape=SHAPE, dtype=DTYPE, passes=PASSES)
    benchmark.pedantic(step, args=(real,), rounds=5, iterations=1)
