"""gankern.fuse / unfuse on plain-torch models: same outputs and gradients (float64 reference),
state_dict compatibility, shared Parameters, the report, and composition (compile, autocast, copy)."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gankern
import gankern.nn as gnn
from gankern.fuse import FusedAway
from conftest import CPU_BACKENDS, GPU_BACKENDS, device_backends
from tolerances import COMPILED_FP32, COMPILED_GRAD_FP32, CUDA_TF32_WIDEN, STEP_FP32, assert_close, sqrt_scale

HAS_BN_LEAKY = hasattr(gnn, "BatchNormLeakyReLU2d")
needs_bn_leaky = pytest.mark.skipif(not HAS_BN_LEAKY, reason="needs BatchNormLeakyReLU (branch bn)")


# ------------------------------------------------------------ the classic MLP GAN, plain torch
def get_generator_block(input_dim, output_dim):
    return nn.Sequential(nn.Linear(input_dim, output_dim), nn.BatchNorm1d(output_dim), nn.ReLU(inplace=True))


def get_discriminator_block(input_dim, output_dim):
    return nn.Sequential(nn.Linear(input_dim, output_dim), nn.LeakyReLU(0.2, inplace=True))


class Generator(nn.Module):
    def __init__(self, z_dim=64, im_dim=784, hidden_dim=128):
        super().__init__()
        self.gen = nn.Sequential(
            get_generator_block(z_dim, hidden_dim),
            get_generator_block(hidden_dim, hidden_dim * 2),
            get_generator_block(hidden_dim * 2, hidden_dim * 4),
            get_generator_block(hidden_dim * 4, hidden_dim * 8),
            nn.Linear(hidden_dim * 8, im_dim),
            nn.Sigmoid(),
        )

    def forward(self, noise):
        return self.gen(noise)


class Discriminator(nn.Module):
    def __init__(self, im_dim=784, hidden_dim=128):
        super().__init__()
        self.disc = nn.Sequential(
            get_discriminator_block(im_dim, hidden_dim * 4),
            get_discriminator_block(hidden_dim * 4, hidden_dim * 2),
            get_discriminator_block(hidden_dim * 2, hidden_dim),
            nn.Linear(hidden_dim, 1),
        )

    def forward(self, image):
        return self.disc(image)


def _sizes(backend, device="cpu"):
    # the classic sizes; tiny ones for the Triton interpreter (Triton on CPU tensors)
    if backend == "triton" and device == "cpu":
        return dict(z_dim=4, im_dim=12, hidden_dim=2)
    return dict(z_dim=64, im_dim=784, hidden_dim=128)


def _gan(backend, dtype=torch.float32, device="cpu"):
    s = _sizes(backend, device)
    gen = Generator(s["z_dim"], s["im_dim"], s["hidden_dim"]).to(device, dtype)
    disc = Discriminator(s["im_dim"], s["hidden_dim"]).to(device, dtype)
    return gen, disc, s


def _gan_loss(gen, disc, z, real):
    fake = gen(z)
    like = dict(dtype=fake.dtype, device=fake.device)
    return (F.binary_cross_entropy_with_logits(disc(fake), torch.ones(len(z), 1, **like)) +
            F.binary_cross_entropy_with_logits(disc(real), torch.zeros(len(z), 1, **like))), fake


def _grads(*models):
    return {f"{i}.{n}": p.grad for i, m in enumerate(models) for n, p in m.named_parameters()}


def _need(backend):
    info = gankern.backends()[backend if backend != "auto" else "reference"]
    if not info["available"]:
        pytest.skip(info["reason"])


@pytest.mark.parametrize("device,backend", device_backends(cuda=GPU_BACKENDS + ["auto"]))
def test_mlp_gan_fuse_matches_unfused(device, backend):
    _need(backend)
    gen, disc, s = _gan(backend, device=device)
    gen64, disc64 = copy.deepcopy(gen).double(), copy.deepcopy(disc).double()
    params_before = [p for p in list(gen.parameters()) + list(disc.parameters())]
    sd_before = {k: v.clone() for k, v in gen.state_dict().items()}
    assert gankern.fuse(gen, backend=backend) is gen
    assert gankern.fuse(disc, backend=backend) is disc

    # the report: 4 BatchNorm+ReLU and 3 Linear+LeakyReLU, and why the rest was left
    assert gen.gankern_fuse_report.counts() == {"BatchNorm1d+ReLU": 4}
    assert disc.gankern_fuse_report.counts() == {"Linear+LeakyReLU": 3}
    assert [f.path for f in gen.gankern_fuse_report.fused] == [f"gen.{i}.1" for i in range(4)]
    assert [f.path for f in disc.gankern_fuse_report.fused] == [f"disc.{i}.0" for i in range(3)]
    left = {x.path: x.reason for x in disc.gankern_fuse_report.skipped}
    assert "disc.3" in left and "no activation" in left["disc.3"]
    assert "gen.4" in {x.path for x in gen.gankern_fuse_report.skipped}
    assert "4 fused" in str(gen.gankern_fuse_report)
    assert sum(isinstance(m, gnn.BatchNormReLU1d) for m in gen.modules()) == 4
    assert sum(isinstance(m, gnn.LinearLeakyReLU) for m in disc.modules()) == 3
    assert all(m.backend == backend for m in disc.modules() if isinstance(m, gnn.LinearLeakyReLU))
    assert gen.gen[0][1].weight.device.type == device
    # same Parameter objects, same state_dict keys and values
    assert [p for p in list(gen.parameters()) + list(disc.parameters())] == params_before
    assert list(gen.state_dict()) == list(sd_before)
    for k, v in gen.state_dict().items():
        assert torch.equal(v, sd_before[k])

    # train mode (batch statistics, running stats updated), then eval mode (running stats)
    n = 7
    scale = sqrt_scale(1024) * (CUDA_TF32_WIDEN if device == "cuda" else 1)  # TF32 may be on for CUDA GEMMs
    for training in (True, False):
        for m in (gen, disc, gen64, disc64):
            m.train(training)
        z = torch.randn(n, s["z_dim"], device=device)
        real = torch.rand(n, s["im_dim"], device=device)
        loss, fake = _gan_loss(gen, disc, z, real)
        loss64, fake64 = _gan_loss(gen64, disc64, z.double(), real.double())
        assert_close(fake, fake64, torch.float32, scale=scale, name=f"fake (training={training})")
        assert_close(loss, loss64, torch.float32, scale=scale, name="loss")
        for m in (gen, disc, gen64, disc64):
            m.zero_grad()
        loss.backward()
        loss64.backward()
        g, g64 = _grads(gen, disc), _grads(gen64, disc64)
        assert g.keys() == g64.keys()
        for k in g:
            assert g[k] is not None, k
            assert_close(g[k], g64[k], torch.float32, scale=scale * 4, name=f"grad {k}")
        for (k, v), (k64, v64) in zip(gen.state_dict().items(), gen64.state_dict().items()):
            assert k == k64
            assert_close(v, v64, v.dtype if v.is_floating_point() else torch.float64, scale=scale, name=k)
    # autocast fp16 / bf16: reduced-precision activations, float32 BatchNorm statistics
    gen.train()
    z = torch.randn(n, s["z_dim"], device=device)
    for dt in (torch.float16, torch.bfloat16):
        with torch.autocast(device, dtype=dt):
            f = gen(z)
            assert f.dtype == dt and disc(f).dtype == dt
        assert gen.gen[0][1].running_mean.dtype == torch.float32
        assert torch.isfinite(gen.gen[0][1].running_var).all()


def test_mlp_gan_state_dict_round_trips_and_optimizer():
    gen, disc, s = _gan("cpp")
    plain_gen, plain_disc = copy.deepcopy(gen), copy.deepcopy(disc)
    # SGD, not Adam: the Linear biases in front of BatchNorm have a true gradient of 0, and Adam's
    # normalised step would turn rounding noise into +-lr updates that differ between the two models.
    opt = torch.optim.SGD(list(gen.parameters()) + list(disc.parameters()), lr=1e-2, momentum=0.9)  # made BEFORE fuse
    opt_plain = torch.optim.SGD(list(plain_gen.parameters()) + list(plain_disc.parameters()), lr=1e-2, momentum=0.9)
    gankern.fuse(gen)
    gankern.fuse(disc)
    # fused -> plain and plain -> fused, strict, through torch.save / torch.load(weights_only=True)
    for src, dst in ((gen, Generator()), (plain_gen, copy.deepcopy(gen)), (disc, Discriminator())):
        buf = io.BytesIO()
        torch.save(src.state_dict(), buf)
        buf.seek(0)
        dst.load_state_dict(torch.load(buf, weights_only=True), strict=True)
        for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
            assert torch.equal(a, b), k
    # the optimizer made before fuse still trains the fused model, exactly like the plain one
    z, real = torch.randn(16, s["z_dim"]), torch.rand(16, s["im_dim"])
    before = gen.gen[0][0].weight.detach().clone()
    for models, o in (((gen, disc), opt), ((plain_gen, plain_disc), opt_plain)):
        o.zero_grad()
        _gan_loss(*models, z, real)[0].backward()
        o.step()
    assert not torch.equal(gen.gen[0][0].weight, before)
    for (k, a), (_, b) in zip(gen.state_dict().items(), plain_gen.state_dict().items()):
        torch.testing.assert_close(a, b, **STEP_FP32, msg=k)
    for (k, a), (_, b) in zip(disc.state_dict().items(), plain_disc.state_dict().items()):
        torch.testing.assert_close(a, b, **STEP_FP32, msg=k)


# ------------------------------------------------------------ DCGAN-style conv models
def _dcgan(nz=8, ngf=4, ndf=4, nc=3):
    gen = nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
        nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())
    disc = nn.Sequential(
        nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 2, 1, 4, 1, 0, bias=False), nn.Sigmoid())
    return gen, disc


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dcgan(backend):
    gen, disc = _dcgan()
    gen64, disc64 = copy.deepcopy(gen).double(), copy.deepcopy(disc).double()
    gankern.fuse(gen, backend=backend)
    gankern.fuse(disc, backend=backend)
    assert gen.gankern_fuse_report.counts() == {"BatchNorm2d+ReLU": 3}
    assert [type(gen[i]) for i in (1, 2)] == [gnn.BatchNormReLU2d, FusedAway]
    expected = {"Conv2d+LeakyReLU": 1}
    if HAS_BN_LEAKY:
        expected["BatchNorm2d+LeakyReLU"] = 1
    assert disc.gankern_fuse_report.counts() == expected
    assert type(disc[0]) is gnn.Conv2dLeakyReLU and disc[0].bias is None and disc[0].negative_slope == 0.2
    left = {x.path: x for x in disc.gankern_fuse_report.skipped}
    if not HAS_BN_LEAKY:
        assert "BatchNorm2d -> LeakyReLU" == left["3"].what and "BatchNormLeakyReLU2d" in left["3"].reason
        assert left["3"].pair
    for training in (True, False):
        gen.train(training), gen64.train(training)
        z = torch.randn(3, 8, 1, 1)
        z64 = z.double()
        out, out64 = disc(gen(z)), disc64(gen64(z64))
        assert_close(out, out64, torch.float32, scale=4, name="output")
        out.sum().backward()
        out64.sum().backward()
        for (k, p), (_, p64) in zip(list(gen.named_parameters()) + list(disc.named_parameters()),
                                    list(gen64.named_parameters()) + list(disc64.named_parameters())):
            assert_close(p.grad, p64.grad, torch.float32, scale=8, name=f"grad {k}")
        for m in (gen, gen64, disc, disc64):
            m.zero_grad()


# ------------------------------------------------------------ non-Sequential models: torch.fx
class FxNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.act1 = nn.LeakyReLU(0.1)
        self.bn = nn.BatchNorm1d(10)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(10, 4)
        self.fc3 = nn.Linear(4, 3)
        self.shared = nn.LeakyReLU(0.3)

    def forward(self, x):
        h = self.relu(self.bn(self.act1(self.fc1(x))))     # fusible twice
        h = F.leaky_relu(self.fc2(h), 0.2)                  # functional activation: left
        return self.shared(self.fc3(h)) + self.shared(h[:, :3])   # activation used elsewhere: left


class Untraceable(FxNet):
    def forward(self, x):
        h = self.act1(self.fc1(x))
        if h.sum() > 0:   # data-dependent control flow
            h = h * 2
        return self.relu(self.bn(h))


class ModeDependent(FxNet):
    def forward(self, x):
        h = self.fc1(x)
        if self.training:
            h = self.act1(h)
        return h


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fx_model(backend):
    m = FxNet()
    m64 = copy.deepcopy(m).double()
    keys = list(m.state_dict())
    gankern.fuse(m, backend=backend)
    rep = m.gankern_fuse_report
    assert {(f.path, f.kind, f.activation, f.via) for f in rep.fused} == {
        ("fc1", "Linear+LeakyReLU", "act1", "torch.fx"), ("bn", "BatchNorm1d+ReLU", "relu", "torch.fx")}
    left = {x.path: x.reason for x in rep.skipped}
    assert "trace=True" in left["fc2"] and "F.leaky_relu" in left["fc2"]
    assert "also applied to other values" in left["fc3"]
    assert isinstance(m.fc1, gnn.LinearLeakyReLU) and m.fc1.negative_slope == 0.1
    assert isinstance(m.fc3, nn.Linear) and isinstance(m.shared, nn.LeakyReLU)
    assert list(m.state_dict()) == keys
    for training in (True, False):
        m.train(training), m64.train(training)
        x = torch.randn(5, 6)
        y, y64 = m(x), m64(x.double())
        assert_close(y, y64, torch.float32, name="output")
        y.sum().backward()
        y64.sum().backward()
        for (k, p), (_, p64) in zip(m.named_parameters(), m64.named_parameters()):
            assert_close(p.grad, p64.grad, torch.float32, scale=2, name=f"grad {k}")


def test_fx_untraceable_and_mode_dependent_left_untouched():
    m = Untraceable()
    before = dict(m.named_modules())
    x = torch.randn(5, 6)
    gankern.fuse(m)
    assert dict(m.named_modules()) == before  # same objects, nothing replaced
    assert m.gankern_fuse_report.fused == []
    reasons = {x.path: x.reason for x in m.gankern_fuse_report.skipped}
    assert "torch.fx cannot trace" in reasons["fc1"] and "torch.fx cannot trace" in reasons["bn"]
    m.eval()
    m(x)
    md = ModeDependent()
    gankern.fuse(md)
    assert md.gankern_fuse_report.fused == [] and isinstance(md.fc1, nn.Linear)
    assert "followed by output (in eval mode)" in {x.path: x.reason for x in md.gankern_fuse_report.skipped}["fc1"]


def test_hooks_shared_and_bad_arguments():
    sn = nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 4)), nn.LeakyReLU(0.2))
    gankern.fuse(sn)
    assert sn.gankern_fuse_report.fused == [] and "hooks" in sn.gankern_fuse_report.skipped[0].reason
    lin = nn.Linear(3, 3)
    shared = nn.Sequential(nn.Sequential(lin, nn.LeakyReLU()), nn.Sequential(lin, nn.LeakyReLU()))
    gankern.fuse(shared)
    assert shared.gankern_fuse_report.fused == []
    with pytest.raises(TypeError, match="torch.nn.Module"):
        gankern.fuse(3)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        gankern.fuse(lambda x: x)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        gankern.unfuse("model")
    with pytest.raises(ValueError, match="backend"):
        gankern.fuse(nn.Linear(2, 2), backend="gpu")
    # fusing twice changes nothing more
    gen, _, _ = _gan("cpp")
    gankern.fuse(gen)
    gankern.fuse(gen)
    assert gen.gankern_fuse_report.fused == []


def test_unfuse_restores_torch_modules():
    gen, disc, s = _gan("cpp")
    m = FxNet()
    ref = [copy.deepcopy(x) for x in (gen, disc, m)]
    for model, r in zip((gen, disc, m), ref):
        params = list(model.parameters())
        gankern.fuse(model)
        gankern.unfuse(model)
        assert list(model.parameters()) == params  # same Parameter objects throughout
        assert [type(a) for a in model.modules()] == [type(b) for b in r.modules()]
        assert repr(model) == repr(r)
        assert len(model.gankern_unfuse_report.restored) == len(model.gankern_unfuse_report.restored)
        model.eval(), r.eval()
        x = torch.randn(3, s["z_dim"] if model is gen else (s["im_dim"] if model is disc else 6))
        torch.testing.assert_close(model(x), r(x))
    built = nn.Sequential(gnn.LinearLeakyReLU(2, 2))
    gankern.unfuse(built)
    assert isinstance(built[0], gnn.LinearLeakyReLU) and built.gankern_unfuse_report.left


# ------------------------------------------------------------ composition
def test_compile_fullgraph_fused_gan_fwd_bwd():
    gen, disc, s = _gan("cpp")
    gankern.fuse(gen)
    gankern.fuse(disc)
    loss_fn = gnn.BCEWithLogitsLoss()

    def g_loss(z):
        return loss_fn(disc(gen(z)), 1.0)
    z = torch.randn(8, s["z_dim"])
    expected = g_loss(z)
    expected.backward()
    grads = {k: p.grad.clone() for k, p in gen.named_parameters()}
    gen.zero_grad(), disc.zero_grad()
    torch._dynamo.reset()
    got = torch.compile(g_loss, fullgraph=True)(z)   # raises on any graph break
    got.backward()
    # train mode: the compiled call updated the running stats a second time, like eager would
    assert int(gen.gen[0][1].num_batches_tracked) == 2
    torch.testing.assert_close(got, expected, **COMPILED_FP32)
    for k, p in gen.named_parameters():
        torch.testing.assert_close(p.grad, grads[k], **COMPILED_GRAD_FP32, msg=k)


def test_autocast_bf16_fused_gan():
    gen, disc, s = _gan("cpp")
    plain_gen, plain_disc = copy.deepcopy(gen), copy.deepcopy(disc)
    gankern.fuse(gen)
    gankern.fuse(disc)
    z, real = torch.randn(16, s["z_dim"]), torch.rand(16, s["im_dim"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fake, out = gen(z), None
        out = disc(fake)
        pfake = plain_gen(z)
        pout = plain_disc(pfake)
    assert fake.dtype == pfake.dtype and out.dtype == pout.dtype == torch.bfloat16
    assert all(b.dtype == torch.float32 for n, b in gen.named_buffers() if "running" in n)
    assert_close(fake, pfake.double(), torch.bfloat16, scale=2, name="fake")
    assert_close(out, pout.double(), torch.bfloat16, scale=4, name="disc output")
    for (k, a), (_, b) in zip(gen.state_dict().items(), plain_gen.state_dict().items()):
        if a.is_floating_point():
            assert_close(a, b.double(), torch.bfloat16, scale=2, name=k)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in gen.parameters())


def test_deepcopy_and_dtype_of_fused_model():
    gen, disc, s = _gan("cpp")
    gankern.fuse(disc)
    c = copy.deepcopy(disc)
    assert c.gankern_fuse_report.counts() == {"Linear+LeakyReLU": 3}
    assert c.disc[0][0].weight is not disc.disc[0][0].weight
    assert isinstance(c.disc[0][1], FusedAway) and c.disc[0][1]._original is not disc.disc[0][1]._original
    x = torch.randn(4, s["im_dim"])
    torch.testing.assert_close(c(x), disc(x))
    d64 = c.double()
    assert d64.disc[0][0].weight.dtype == torch.float64
    assert_close(d64(x.double()), disc(x).double(), torch.float32, scale=4)


# ------------------------------------------------------------ the newer rules: Linear+ReLU, conv + bias + activation
def _conv_net():
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),                 # conv with bias
        nn.Conv2d(5, 6, 4, 2, 1, bias=False), nn.ReLU(),                            # without bias, ReLU
        nn.ConvTranspose2d(6, 4, 4, 2, 1), nn.ReLU(True),
        nn.Conv2d(4, 4, 3, padding=1, groups=2, dilation=1), nn.LeakyReLU(0.01),
        nn.Flatten(), nn.Linear(4 * 16 * 16, 7), nn.ReLU(), nn.Linear(7, 1))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_conv_and_linear_relu_rules_match_torch(backend):
    plain = _conv_net().double()
    m = copy.deepcopy(plain)
    params, keys = list(m.parameters()), list(m.state_dict())
    gankern.fuse(m, backend=backend)
    assert m.gankern_fuse_report.counts() == {"Conv2d+LeakyReLU": 2, "Conv2d+ReLU": 1, "ConvTranspose2d+ReLU": 1,
                                              "Linear+ReLU": 1}
    assert [type(m[i]) for i in (0, 2, 4, 6, 9)] == [gnn.Conv2dLeakyReLU, gnn.Conv2dLeakyReLU,
                                                     gnn.ConvTranspose2dLeakyReLU, gnn.Conv2dLeakyReLU,
                                                     gnn.LinearLeakyReLU]
    assert m[9].negative_slope == 0.0 and m[2].negative_slope == 0.0 and m[6].negative_slope == 0.01
    assert list(m.parameters()) == params and list(m.state_dict()) == keys
    assert m.gankern_fuse_report.fraction() == 1.0
    for training in (True, False):
        m.train(training), plain.train(training)
        x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
        for fmt in (torch.contiguous_format, torch.channels_last):
            xx = x.contiguous(memory_format=fmt)
            y, yp = m(xx), plain(xx)
            assert_close(y, yp, torch.float64, name="output")
            gs = torch.autograd.grad(y.square().sum(), params)
            gps = torch.autograd.grad(yp.square().sum(), list(plain.parameters()))
            for (k, _), g, gp in zip(m.named_parameters(), gs, gps):
                assert_close(g, gp, torch.float64, name=f"grad {k}")
    # state dicts both ways, strict
    m.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(m.state_dict(), strict=True)
    gankern.unfuse(m)
    assert [type(a) for a in m.modules()] == [type(b) for b in plain.modules()]
    assert repr(m) == repr(plain) and list(m.parameters()) == params


def test_conv_fused_module_is_a_drop_in():
    torch.manual_seed(3)
    ref = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    torch.manual_seed(3)
    f = gnn.Conv2dLeakyReLU(3, 8, 3, stride=2, padding=1, negative_slope=0.1)
    assert list(f.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(v, f.state_dict()[k]), k
    x = torch.randn(2, 3, 9, 9)
    assert_close(f(x), F.leaky_relu(F.conv2d(x.double(), ref.weight.double(), ref.bias.double(), 2, 1), 0.1),
                 scale=4)
    t = gnn.ConvTranspose2dLeakyReLU(4, 2, 4, 2, 1, bias=False, negative_slope=0.0)
    x = torch.randn(1, 4, 5, 5)
    assert t(x, output_size=[11, 11]).shape == (1, 2, 11, 11)
    assert "negative_slope=0.0" in repr(t)
    with pytest.raises(ValueError, match="padding_mode"):
        gnn.Conv2dLeakyReLU(3, 3, 3, padding=1, padding_mode="reflect")
    left = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"), nn.LeakyReLU(0.2))
    gankern.fuse(left)
    assert left.gankern_fuse_report.fused == [] and "padding_mode" in left.gankern_fuse_report.skipped[0].reason


def test_conv_fused_autocast_bf16():
    plain = _conv_net()
    m = gankern.fuse(copy.deepcopy(plain))
    x = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, yp = m(x), plain(x)
    assert y.dtype == yp.dtype == torch.bfloat16
    assert_close(y, yp.double(), torch.bfloat16, scale=4, name="autocast output")


def test_no_rule_reports_what_would_cover_it():
    m = nn.Sequential(nn.Conv1d(2, 2, 3), nn.LeakyReLU(0.2), nn.Linear(2, 2), nn.ELU(), nn.Linear(2, 2))
    gankern.fuse(m)
    left = {s.path: s for s in m.gankern_fuse_report.skipped}
    assert "no fused Conv1d+LeakyReLU" in left["0"].reason and left["0"].pair
    assert "followed by ELU" in left["2"].reason and not left["2"].pair
    assert "no activation follows it" in left["4"].reason
    assert m.gankern_fuse_report.fraction() == 0.0
    assert "trace=True" in str(m.gankern_fuse_report)


@needs_bn_leaky
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batchnorm_leaky_relu_rule(backend):
    dt = torch.float32 if backend == "triton" else torch.float64  # Triton BatchNorm has no float64 kernels
    plain = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, 0.8), nn.LeakyReLU(0.2, inplace=True),
                          nn.Unflatten(1, (2, 2, 2)), nn.BatchNorm2d(2), nn.LeakyReLU(0.1)).to(dt)
    m = copy.deepcopy(plain)
    gankern.fuse(m, backend=backend)
    assert m.gankern_fuse_report.counts() == {"BatchNorm1d+LeakyReLU": 1, "BatchNorm2d+LeakyReLU": 1}
    assert m[1].eps == 0.8 and m[1].negative_slope == 0.2 and m[4].negative_slope == 0.1
    for training in (True, False):
        m.train(training), plain.train(training)
        x = torch.randn(5, 6, dtype=dt)
        assert_close(m(x), plain(x).double(), dt)
        for (k, a), (_, b) in zip(m.state_dict().items(), plain.state_dict().items()):
            assert_close(a, b.double(), dt, name=k)
    gankern.unfuse(m)
    assert repr(m) == repr(plain)


# ------------------------------------------------------------ trace=True: functional activations in forward
class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.deconv = nn.ConvTranspose2d(4, 4, 4, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 8 * 8, 16)
        self.fc2 = nn.Linear(16, 12)
        self.fc3 = nn.Linear(12, 8)
        self.fc4 = nn.Linear(8, 1)

    def forward(self, x):
        h = F.leaky_relu(self.conv(x), 0.2)
        h = torch.relu(self.deconv(h))
        h = F.relu(self.bn(h), inplace=True)
        h = F.max_pool2d(h, 2).flatten(1)
        h = nn.functional.leaky_relu(self.fc1(h), negative_slope=0.1, inplace=True)
        h = self.fc2(h).relu()
        h = F.leaky_relu(self.fc3(h))            # default slope 0.01
        return self.fc4(h)


def test_trace_flag_off_reports_it():
    m = FunctionalNet()
    before = dict(m.named_modules())
    gankern.fuse(m)
    assert m.gankern_fuse_report.fused == [] and dict(m.named_modules()) == before
    left = {s.path: s for s in m.gankern_fuse_report.skipped}
    for name, fn in (("conv", "F.leaky_relu"), ("deconv", "torch.relu"), ("bn", "F.relu"), ("fc2", ".relu()")):
        assert fn in left[name].what and "trace=True" in left[name].reason and left[name].pair, name
    assert "forward" not in m.__dict__


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])  # triton BatchNorm: no fp64
def test_trace_rewrites_forward(backend):
    plain = FunctionalNet().double()
    m = copy.deepcopy(plain)
    params, keys = list(m.parameters()), list(m.state_dict())
    gankern.fuse(m, backend=backend, trace=True)
    rep = m.gankern_fuse_report
    assert type(m) is FunctionalNet
    expected = {"Conv2d+LeakyReLU": 1, "ConvTranspose2d+ReLU": 1, "Linear+LeakyReLU": 2, "Linear+ReLU": 1,
                "BatchNorm2d+ReLU": 1}
    assert rep.counts() == expected and rep.fraction() == 1.0
    assert all(f.via == "torch.fx rewrite" and "FunctionalNet.forward" in f.activation for f in rep.fused)
    assert m.fc1.negative_slope == 0.1 and m.fc3.negative_slope == 0.01 and m.conv.negative_slope == 0.2
    assert list(m.parameters()) == params and list(m.state_dict()) == keys
    for training in (True, False):
        m.train(training), plain.train(training)
        x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
        y, yp = m(x), plain(x)
        assert_close(y, yp, torch.float64, name="output")
        gs = torch.autograd.grad(y.sum(), params)
        gps = torch.autograd.grad(yp.sum(), list(plain.parameters()))
        for (k, _), g, gp in zip(m.named_parameters(), gs, gps):
            assert_close(g, gp, torch.float64, name=f"grad {k}")
    c = copy.deepcopy(m)   # the rewritten forward follows the copy
    assert c.forward.__self__ is c and c.fc1 is not m.fc1
    assert_close(c(x), m(x), torch.float64)
    gankern.unfuse(m)
    assert "forward" not in m.__dict__ and repr(m) == repr(plain) and list(m.parameters()) == params
    assert_close(m(x), plain(x), torch.float64)


def test_trace_compile_fullgraph():
    m = gankern.fuse(FunctionalNet(), trace=True)
    x = torch.randn(2, 3, 8, 8)
    expected = m(x)
    torch._dynamo.reset()
    got = torch.compile(m, fullgraph=True)(x)
    torch.testing.assert_close(got, expected, **COMPILED_FP32)


class ModeBranching(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)

    def forward(self, x):
        h = F.leaky_relu(self.fc(x), 0.2)
        if self.training:
            h = h * 2
        return F.relu(self.fc2(h), inplace=False) + 0


def test_trace_needs_one_graph_for_both_modes():
    m = ModeBranching()
    gankern.fuse(m, trace=True)
    assert m.gankern_fuse_report.fused == [] and "forward" not in m.__dict__
    reasons = {s.path: s.reason for s in m.gankern_fuse_report.skipped}
    assert "train and eval mode" in reasons["fc"]


# ------------------------------------------------------------ lazy modules (nn.LazyLinear, ...)
class LazyFx(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act, self.out = nn.LazyLinear(6), nn.LeakyReLU(0.2), nn.LazyLinear(2)

    def forward(self, x):
        return F.relu(self.out(self.act(self.fc(x))))


def _lazy_models():
    seq = nn.Sequential(nn.LazyLinear(8), nn.LeakyReLU(0.2), nn.LazyBatchNorm1d(), nn.ReLU(), nn.Linear(8, 4))
    conv = nn.Sequential(nn.LazyConv2d(4, 3, padding=1), nn.ReLU(), nn.LazyConvTranspose2d(2, 4, 2, 1))
    return [(seq, torch.randn(5, 3)), (conv, torch.randn(2, 3, 6, 6)), (LazyFx(), torch.randn(4, 3))]


def test_lazy_modules_reported_until_initialised_then_fused():
    expect = [({"0": ("LazyLinear -> LeakyReLU", "LinearLeakyReLU"), "2": ("LazyBatchNorm1d -> ReLU", "BatchNormReLU1d")},
               {"Linear+LeakyReLU": 1, "BatchNorm1d+ReLU": 1}),
              ({"0": ("LazyConv2d -> ReLU", "Conv2dLeakyReLU")}, {"Conv2d+ReLU": 1}),
              ({"fc": ("LazyLinear -> LeakyReLU", "LinearLeakyReLU"), "out": ("LazyLinear -> F.relu", "LinearLeakyReLU")},
               {"Linear+LeakyReLU": 1, "Linear+ReLU": 1})]
    for (model, x), (left, counts) in zip(_lazy_models(), expect):
        lazy_types = [type(m) for m in model.modules()]
        gankern.fuse(model, trace=True)
        rep = model.gankern_fuse_report
        assert rep.fused == [] and rep.fraction() == 0.0, str(rep)
        assert [type(m) for m in model.modules()] == lazy_types   # nothing was touched
        skipped = {s.path: s for s in rep.skipped}
        for path, (what, fused) in left.items():
            s = skipped[path]
            assert s.what == what and s.pair, str(rep)
            assert "not initialised yet" in s.reason and "run the model once" in s.reason, s.reason
            assert f"gankern.nn.{fused}" in s.reason and s.what.split()[0] in s.reason, s.reason
        model.eval()
        model(x)   # initialises the lazy modules: they become nn.Linear / nn.BatchNorm1d / nn.Conv2d ...
        plain = copy.deepcopy(model)
        gankern.fuse(model, trace=True)
        assert model.gankern_fuse_report.counts() == counts, str(model.gankern_fuse_report)
        assert_close(model(x), plain(x).double(), torch.float32, name=type(model).__name__)
