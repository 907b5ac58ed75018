"""gankern.gan.metrics: Fréchet distance against an independent formula, the quality metric's behaviour."""
import numpy as np
import pytest
import torch

from gankern.gan.data import load_dataset
from gankern.gan.metrics import QualityMetric, format_report, frechet_distance


def _fd_scipy(a, b):
    from scipy import linalg
    a, b = a.numpy().astype(np.float64), b.numpy().astype(np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("n,d", [(7, 3), (200, 16), (1000, 64)])
def test_frechet_matches_scipy(n, d):
    a = torch.randn(n, d) @ torch.randn(d, d)
    b = torch.randn(n, d) * 0.5 + torch.randn(d)
    assert frechet_distance(a, b) == pytest.approx(_fd_scipy(a, b), rel=1e-6, abs=1e-8)


def test_frechet_properties():
    a = torch.randn(500, 8, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shift = torch.randn(8, dtype=torch.float64)
    assert frechet_distance(a, a + shift) == pytest.approx(float((shift ** 2).sum()), rel=1e-9)
    with pytest.raises(ValueError, match="equal sample counts"):
        frechet_distance(a, a[:-1])
    with pytest.raises(ValueError, match="same width"):
        frechet_distance(a, a[:, :4])


@pytest.fixture(scope="module")
def quality():
    return QualityMetric(load_dataset("digits"), steps=300)


def test_quality_metric_separates(quality):
    d = load_dataset("digits")
    assert quality.accuracy > 0.9 and quality.n == 898 and quality.draws == 5 and quality.n_generate == 5 * 898
    assert quality.floor > 0 and quality.floor == sum(quality.floor_draws) / 5
    assert len(set(quality.floor_draws)) == 5  # independent halvings
    real = quality.evaluate(torch.cat([d.x[torch.randperm(len(d))[:quality.n]] for _ in range(quality.draws)]))
    noise = quality.evaluate(torch.rand(quality.n_generate, 64))
    assert real["fd_ratio"] < 3 and real["classes_covered"] == 10
    assert noise["fd_ratio"] > 20 * real["fd_ratio"]
    assert len(real["fd_draws"]) == 5 and real["fd"] == pytest.approx(sum(real["fd_draws"]) / 5, rel=1e-4)
    ones = quality.evaluate(d.x[d.y == 1][:1].repeat(quality.n_generate, 1))  # one class only
    assert ones["classes_covered"] == 1 and max(ones["class_hist"]) == 1.0
    assert "Fréchet distance" in format_report(real) and "mean of 5 draws" in format_report(real)
    with pytest.raises(ValueError, match=r"shape \(4490, 64\) \(5 draws of 898"):
        quality.evaluate(torch.rand(898, 64))


def test_quality_metric_deterministic_and_no_global_rng():
    torch.manual_seed(3)
    expect = torch.rand(1)
    torch.manual_seed(3)
    q1 = QualityMetric(load_dataset("digits"), steps=50)
    assert torch.equal(torch.rand(1), expect)
    q2 = QualityMetric(load_dataset("digits"), steps=50)
    assert q1.floor == q2.floor and q1.accuracy == q2.accuracy
