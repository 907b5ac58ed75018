"""gankern.gan.models: fused GANs vs their plain-PyTorch twins (same keys, same numbers), shapes, errors."""
import pytest
import torch

import gankern
from gankern.gan.models import (DCGANDiscriminator, DCGANGenerator, MLPDiscriminator, MLPGenerator, make_models,
                            set_backend)
from tolerances import assert_close


def _pair(model, shape, z_dim=16):
    torch.manual_seed(0)
    fused = make_models(model, shape, z_dim, fused=True)
    plain = make_models(model, shape, z_dim, fused=False)
    for f, p in zip(fused, plain):
        assert list(f.state_dict()) == list(p.state_dict())  # identical keys (and order)
        p.load_state_dict(f.state_dict())
    return fused, plain


@pytest.mark.parametrize("model,shape", [("mlp", (8, 8)), ("mlp", (28, 28)), ("dcgan", (8, 8)), ("dcgan", (28, 28)),
                                         ("dcgan", (32, 32))])
def test_fused_matches_plain_fwd_bwd(model, shape):
    (Gf, Df), (Gp, Dp) = _pair(model, shape)
    pixels = shape[0] * shape[1]
    z = torch.randn(7, 16)
    outs = []
    for G, D in ((Gf, Df), (Gp, Dp)):
        G.double(), D.double()
        x = G(z.double())
        assert x.shape == (7, pixels) and float(x.detach().min()) >= 0 and float(x.detach().max()) <= 1
        logit = D(x)
        assert logit.shape == (7, 1)
        logit.sum().backward()
        outs.append((x, logit, {k: p.grad for k, p in list(G.named_parameters()) + list(D.named_parameters())},
                     {k: b.clone() for k, b in G.named_buffers()}))
    (xf, lf, gf, bf), (xp, lp, gp, bp) = outs
    assert_close(xf, xp, torch.float64, name="G(z)")
    assert_close(lf, lp, torch.float64, name="D(G(z))")
    assert gf.keys() == gp.keys()
    for k in gf:
        assert_close(gf[k], gp[k], torch.float64, scale=10, name=f"grad {k}")
    for k in bf:
        assert_close(bf[k].double(), bp[k].double(), torch.float64, name=f"buffer {k}")


def test_mlp_structure():
    G, D = make_models("mlp", (28, 28), 64)
    assert [b.linear.out_features for b in G.blocks] == [128, 256, 512, 1024]
    assert all(isinstance(b.bn, gankern.nn.BatchNormReLU1d) for b in G.blocks)
    assert G.out.out_features == 784 and G.blocks[0].linear.in_features == 64
    assert [b.linear.out_features for b in D.blocks] == [512, 256, 128]
    assert all(isinstance(b.linear, gankern.nn.LinearLeakyReLU) and b.linear.negative_slope == 0.2 for b in D.blocks)
    assert D.out.out_features == 1
    G8, _ = make_models("mlp", (8, 8))
    assert G8.out.out_features == 64


def test_dcgan_uses_fused_bn_and_accepts_images():
    G, D = make_models("dcgan", (28, 28), 32)
    assert all(isinstance(b.bn, gankern.nn.BatchNormReLU2d) for b in G.blocks)
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(D(x), D(x.reshape(3, 784)))


def test_errors_and_set_backend():
    with pytest.raises(ValueError, match="model must be one of"):
        make_models("vae", (8, 8))
    with pytest.raises(ValueError, match="side 30"):
        make_models("dcgan", (30, 30))
    with pytest.raises(ValueError, match="square"):
        DCGANGenerator(16, (28, 32))
    G, D = make_models("mlp", (8, 8))
    set_backend(G, "reference")
    set_backend(D, "reference")
    assert all(b.bn.backend == "reference" for b in G.blocks) and all(b.linear.backend == "reference" for b in D.blocks)


def test_plain_classes_are_plain_torch():
    G, D = MLPGenerator(8, 64, fused=False), MLPDiscriminator(64, fused=False)
    mods = {type(m).__module__.split(".")[0] for m in list(G.modules()) + list(D.modules())}
    assert mods <= {"torch", "gankern"}
    assert not any(type(m).__module__.startswith("gankern.nn") for m in list(G.modules()) + list(D.modules()))
    assert not any(type(m).__module__.startswith("gankern.nn")
                   for m in DCGANDiscriminator((28, 28), fused=False).modules())
