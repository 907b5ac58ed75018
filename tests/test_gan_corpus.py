"""A corpus of real-world GAN architectures (written in our own words, with the layers and
hyper-parameters such models use), each converted with ``gankern.fuse`` and checked against the
unconverted model (a deepcopy made before): outputs in train and eval mode, every gradient, running
statistics, 20 optimizer steps of losses, a gradient penalty (create_graph=True),
torch.compile(fullgraph=True), state_dicts both ways, and the fraction of pairs fused.

Everything runs in float64 so the comparison is tight (the kernels compute in float64 too); sizes are
cut down where the architecture allows (DCGAN keeps 64x64 images, at batch 2, with few channels).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gankern
import gankern.nn as gnn
from tolerances import assert_close

HAS_BN_LEAKY = hasattr(gnn, "BatchNormLeakyReLU2d")
DT = torch.float64


# ------------------------------------------------------------------ 1. DCGAN 64x64 (as in pytorch/examples)
class DCGANGenerator(nn.Module):
    def __init__(self, nz=16, ngf=8, nc=3):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())

    def forward(self, z):
        return self.main(z)


class DCGANDiscriminator(nn.Module):
    def __init__(self, ndf=8, nc=3):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid())

    def forward(self, x):
        return self.main(x).view(-1, 1)


# ------------------------------------------------------------------ 2. MLP GAN, BatchNorm1d(out, 0.8) (GAN-collection style)
def _mlp_block(i, o, normalize=True):
    layers = [nn.Linear(i, o)]
    if normalize:
        layers.append(nn.BatchNorm1d(o, 0.8))   # eps = 0.8, passed positionally, as those models do
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return layers


class MLPGenerator(nn.Module):
    def __init__(self, latent=8, img_shape=(1, 6, 6)):
        super().__init__()
        self.img_shape = img_shape
        n = img_shape[0] * img_shape[1] * img_shape[2]
        self.model = nn.Sequential(*_mlp_block(latent, 16, normalize=False), *_mlp_block(16, 32), *_mlp_block(32, 64),
                                   *_mlp_block(64, 96), nn.Linear(96, n), nn.Tanh())

    def forward(self, z):
        return self.model(z).view(z.size(0), *self.img_shape)


class MLPDiscriminator(nn.Module):
    def __init__(self, img_shape=(1, 6, 6)):
        super().__init__()
        n = img_shape[0] * img_shape[1] * img_shape[2]
        self.model = nn.Sequential(nn.Linear(n, 64), nn.LeakyReLU(0.2, inplace=True), nn.Linear(64, 32),
                                   nn.LeakyReLU(0.2, inplace=True), nn.Linear(32, 1), nn.Sigmoid())

    def forward(self, img):
        return self.model(img.view(img.size(0), -1))


# ------------------------------------------------------------------ 3. WGAN-GP with a BatchNorm critic (course style)
class CourseGenerator(nn.Module):
    def __init__(self, z_dim=8, im_chan=1, hidden=8):
        super().__init__()
        self.z_dim = z_dim
        self.gen = nn.Sequential(self._block(z_dim, hidden * 4), self._block(hidden * 4, hidden * 2, 4, 1),
                                 self._block(hidden * 2, hidden), self._block(hidden, im_chan, 4, final=True))

    @staticmethod
    def _block(i, o, k=3, s=2, final=False):
        if final:
            return nn.Sequential(nn.ConvTranspose2d(i, o, k, s), nn.Tanh())
        return nn.Sequential(nn.ConvTranspose2d(i, o, k, s), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

    def forward(self, noise):
        return self.gen(noise.view(len(noise), self.z_dim, 1, 1))


class CourseCritic(nn.Module):
    def __init__(self, im_chan=1, hidden=8):
        super().__init__()
        self.crit = nn.Sequential(self._block(im_chan, hidden), self._block(hidden, hidden * 2),
                                  self._block(hidden * 2, 1, final=True))

    @staticmethod
    def _block(i, o, k=4, s=2, final=False):
        if final:
            return nn.Sequential(nn.Conv2d(i, o, k, s))
        return nn.Sequential(nn.Conv2d(i, o, k, s), nn.BatchNorm2d(o), nn.LeakyReLU(0.2, inplace=True))

    def forward(self, image):
        return self.crit(image).view(len(image), -1)


# ------------------------------------------------------------------ 4. Upsample + Conv generator (GAN-collection DCGAN style)
class UpsampleGenerator(nn.Module):
    def __init__(self, latent=8, channels=1, img=16):
        super().__init__()
        self.init_size = img // 4
        self.l1 = nn.Sequential(nn.Linear(latent, 16 * self.init_size ** 2))
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(16), nn.Upsample(scale_factor=2),
            nn.Conv2d(16, 16, 3, stride=1, padding=1), nn.BatchNorm2d(16, 0.8), nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(16, 8, 3, stride=1, padding=1), nn.BatchNorm2d(8, 0.8), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(8, channels, 3, stride=1, padding=1), nn.Tanh())

    def forward(self, z):
        out = self.l1(z)
        out = out.view(out.shape[0], 16, self.init_size, self.init_size)
        return self.conv_blocks(out)


class DropoutDiscriminator(nn.Module):
    def __init__(self, channels=1, img=16):
        super().__init__()

        def block(i, o, bn=True):
            layers = [nn.Conv2d(i, o, 3, 2, 1), nn.LeakyReLU(0.2, inplace=True), nn.Dropout2d(0.25)]
            if bn:
                layers.append(nn.BatchNorm2d(o, 0.8))
            return layers
        self.model = nn.Sequential(*block(channels, 8, bn=False), *block(8, 16), *block(16, 16))
        self.adv_layer = nn.Sequential(nn.Linear(16 * (img // 8) ** 2, 1), nn.Sigmoid())

    def forward(self, img):
        out = self.model(img)
        return self.adv_layer(out.view(out.shape[0], -1))


# ------------------------------------------------------------------ 5. tutorial MNIST GAN, functional activations
class TutorialGenerator(nn.Module):
    def __init__(self, latent=8, out=36):
        super().__init__()
        self.fc1 = nn.Linear(latent, 16)
        self.fc2 = nn.Linear(16, 32)
        self.fc3 = nn.Linear(32, 48)
        self.fc4 = nn.Linear(48, out)

    def forward(self, x):
        x = F.leaky_relu(self.fc1(x), 0.2)
        x = torch.relu(self.fc2(x))
        x = self.fc3(x).relu()
        return torch.tanh(self.fc4(x))


class TutorialDiscriminator(nn.Module):
    def __init__(self, inp=36):
        super().__init__()
        self.fc1 = nn.Linear(inp, 32)
        self.fc2 = nn.Linear(32, 16)
        self.fc3 = nn.Linear(16, 1)

    def forward(self, x):
        x = x.view(x.size(0), -1)
        x = F.leaky_relu(self.fc1(x), negative_slope=0.2)
        x = F.dropout(x, 0.3)                     # always on, as those tutorials write it
        x = nn.functional.leaky_relu(self.fc2(x), 0.2, inplace=True)
        return torch.sigmoid(self.fc3(x))


# name: (G, D, noise shape (without batch), batch, pairs (G, D), pairs that need BatchNormLeakyReLU, trace)
CORPUS = {
    "dcgan64": (DCGANGenerator, DCGANDiscriminator, (16, 1, 1), 2, (4, 4), 3, False),
    "mlp_gan_bn_eps0.8": (MLPGenerator, MLPDiscriminator, (8,), 6, (4, 2), 3, False),
    "wgan_gp_bn_critic": (CourseGenerator, CourseCritic, (8,), 4, (3, 2), 2, False),
    "upsample_conv": (UpsampleGenerator, DropoutDiscriminator, (8,), 4, (2, 3), 2, False),
    "tutorial_functional": (TutorialGenerator, TutorialDiscriminator, (8,), 6, (3, 2), 0, True),
}


def _models(name):
    G, D, zshape, batch, _, _, trace = CORPUS[name]
    g, d = G().to(DT), D().to(DT)
    fg, fd = copy.deepcopy(g), copy.deepcopy(d)
    gankern.fuse(fg, trace=trace)
    gankern.fuse(fd, trace=trace)
    return (g, d), (fg, fd), zshape, batch


def _seeded(fn, seed, *args):
    torch.manual_seed(seed)   # Dropout: the same masks in both models (same RNG calls, same order)
    return fn(*args)


def _loss(g, d, z, real, seed):
    fake = _seeded(g, seed, z)
    p_fake, p_real = _seeded(d, seed + 1, fake), _seeded(d, seed + 2, real)
    # -log p_real - log(1 - p_fake) on a logit scale: valid for sigmoid outputs and for critics' scores
    d_loss = F.softplus(-p_real).mean() + F.softplus(p_fake).mean()
    return d_loss, fake


def _real_like(g, zshape, batch, seed):
    """A "real" batch of the generator's image shape (found on a copy: g's running stats stay as they are)."""
    with torch.no_grad():
        shape = copy.deepcopy(g).eval()(torch.randn(batch, *zshape, dtype=DT)).shape
    torch.manual_seed(seed)
    return torch.rand(shape, dtype=DT) * 2 - 1


@pytest.mark.parametrize("name", list(CORPUS))
def test_fraction_of_pairs_fused(name):
    _, _, _, _, (pg, pd), needs_bn, trace = CORPUS[name]
    _, (fg, fd), _, _ = _models(name)
    reps = [fg.gankern_fuse_report, fd.gankern_fuse_report]
    assert sum(len(r.fused) + sum(s.pair for s in r.skipped) for r in reps) == pg + pd
    fused = sum(len(r.fused) for r in reps)
    if HAS_BN_LEAKY:
        assert fused / (pg + pd) >= 0.9, [str(r) for r in reps]
    else:
        assert fused == pg + pd - needs_bn, [str(r) for r in reps]
        for r in reps:   # every pair left is one that BatchNormLeakyReLU covers, and the report says so
            assert all("BatchNormLeakyReLU" in s.reason for s in r.skipped if s.pair), str(r)


@pytest.mark.parametrize("name", list(CORPUS))
def test_outputs_gradients_running_stats(name):
    (g, d), (fg, fd), zshape, batch = _models(name)
    for training in (True, False):
        for m in (g, d, fg, fd):
            m.train(training)
        z = torch.randn(batch, *zshape, dtype=DT)
        real = _real_like(g, zshape, batch, 7)
        loss, fake = _loss(g, d, z, real, 11)
        floss, ffake = _loss(fg, fd, z, real, 11)
        assert_close(ffake, fake, DT, name=f"fake (training={training})")
        assert_close(floss, loss, DT, name="loss")
        grads = torch.autograd.grad(loss, list(g.parameters()) + list(d.parameters()))
        fgrads = torch.autograd.grad(floss, list(fg.parameters()) + list(fd.parameters()))
        names = [f"G.{k}" for k, _ in g.named_parameters()] + [f"D.{k}" for k, _ in d.named_parameters()]
        for k, a, b in zip(names, fgrads, grads):
            assert_close(a, b, DT, name=f"grad {k} (training={training})")
        for m, fm in ((g, fg), (d, fd)):
            for (k, a), (k2, b) in zip(fm.state_dict().items(), m.state_dict().items()):
                assert k == k2
                assert_close(a, b, DT if a.is_floating_point() else torch.float64, name=k)


@pytest.mark.parametrize("name", list(CORPUS))
def test_twenty_optimizer_steps(name):
    (g, d), (fg, fd), zshape, batch = _models(name)
    # SGD: biases in front of a BatchNorm have a true gradient of 0 (rounding noise), which Adam's
    # normalised step would turn into +-lr updates that differ between any two implementations
    opts = [torch.optim.SGD(list(a.parameters()) + list(b.parameters()), lr=0.05, momentum=0.5) for a, b in
            ((g, d), (fg, fd))]
    losses = [[], []]
    for step in range(20):
        z = torch.randn(batch, *zshape, dtype=DT)
        real = _real_like(g, zshape, batch, 100 + step)
        for i, (a, b) in enumerate(((g, d), (fg, fd))):
            opts[i].zero_grad()
            loss, _ = _loss(a, b, z, real, 1000 + step)
            loss.backward()
            opts[i].step()
            losses[i].append(loss.detach())
    assert_close(torch.stack(losses[1]), torch.stack(losses[0]), DT, scale=100, name="20 losses")
    for m, fm in ((g, fg), (d, fd)):
        for (k, a), (_, b) in zip(fm.state_dict().items(), m.state_dict().items()):
            assert_close(a, b, DT if a.is_floating_point() else torch.float64, scale=100, name=k)


def _penalty(d, real, fake, seed):
    torch.manual_seed(seed)
    eps = torch.rand(len(real), *([1] * (real.dim() - 1)), dtype=DT)
    x = (eps * real + (1 - eps) * fake).requires_grad_()
    out = _seeded(d, seed, x)
    (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return ((gx.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


@pytest.mark.parametrize("name", list(CORPUS))
def test_gradient_penalty(name):
    (g, d), (fg, fd), zshape, batch = _models(name)
    fused_bn = [m for m in fd.modules() if isinstance(m, gnn._BatchNormReLU) or "BatchNorm" in type(m).__name__
                and type(m).__module__.startswith("gankern")]
    for m in fused_bn:   # the compiled BatchNorm ops have no double backward: the reference one does
        m.backend = "reference"
    real = _real_like(g, zshape, batch, 3)
    with torch.no_grad():
        fake = _seeded(g, 5, torch.randn(batch, *zshape, dtype=DT))
    pen, fpen = _penalty(d, real, fake, 9), _penalty(fd, real, fake, 9)
    assert_close(fpen, pen, DT, name="penalty")
    grads = torch.autograd.grad(pen, list(d.parameters()), allow_unused=True)
    fgrads = torch.autograd.grad(fpen, list(fd.parameters()), allow_unused=True)
    for (k, _), a, b in zip(d.named_parameters(), fgrads, grads):
        assert (a is None) == (b is None), f"{k}: fused {a is None}, torch {b is None}"
        if a is not None:
            assert_close(a, b, DT, name=f"penalty grad {k}")


def test_gradient_penalty_through_compiled_batchnorm_says_why():
    (g, d), (fg, fd), zshape, batch = _models("wgan_gp_bn_critic")
    real = _real_like(g, zshape, batch, 3)
    has_fused_bn = any("BatchNorm" in type(m).__name__ and type(m).__module__.startswith("gankern")
                       for m in fd.modules())
    if not has_fused_bn:
        pytest.skip("needs BatchNormLeakyReLU (branch bn)")
    with pytest.raises(RuntimeError, match="double backward"):
        _penalty(fd, real, real.flip(0), 9).backward()


@pytest.mark.parametrize("name", list(CORPUS))
def test_compile_fullgraph(name):
    (g, d), (fg, fd), zshape, batch = _models(name)
    z = torch.randn(batch, *zshape, dtype=DT)
    real = _real_like(g, zshape, batch, 7)
    for m in (g, d, fg, fd):
        m.eval()

    def step(a, b):
        return F.softplus(-b(a(z))).mean() + b(real).mean()

    torch.manual_seed(0)
    expected = step(g, d)
    torch._dynamo.reset()
    torch.manual_seed(0)
    with torch._inductor.config.patch(fallback_random=True):   # the tutorial's always-on F.dropout: eager RNG
        got = torch.compile(step, fullgraph=True)(fg, fd)
    assert_close(got, expected, DT, name="compiled loss")
    got.backward()
    expected.backward()
    for (k, p), (_, fp) in zip(g.named_parameters(), fg.named_parameters()):
        assert_close(fp.grad, p.grad, DT, name=f"compiled grad {k}")


@pytest.mark.parametrize("name", list(CORPUS))
def test_state_dicts_both_ways_and_unfuse(name):
    (g, d), (fg, fd), zshape, batch = _models(name)
    G, D = CORPUS[name][:2]
    for m, fm, cls in ((g, fg, G), (d, fd, D)):
        assert type(fm) is cls and list(fm.state_dict()) == list(m.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        fm.load_state_dict(m.state_dict(), strict=True)        # plain -> fused
        fresh = cls().to(DT)
        fresh.load_state_dict(fm.state_dict(), strict=True)    # fused -> plain
        for (k, a), (_, b) in zip(fresh.state_dict().items(), m.state_dict().items()):
            assert torch.equal(a, b), k
        gankern.unfuse(fm)
        assert "forward" not in fm.__dict__ and repr(fm) == repr(m)
    z = torch.randn(batch, *zshape, dtype=DT)
    for m in (g, d, fg, fd):
        m.eval()
    assert_close(_seeded(fd, 1, fg(z)), _seeded(d, 1, g(z)), DT, name="unfused output")
