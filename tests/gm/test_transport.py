"""Knothe-Rosenblatt transport between a GM and N(0, I) (spec 7.9; oracle 16.21 a-e)."""

from __future__ import annotations

import math

import pytest
import torch
from gm_cases import random_gm
from scipy import stats

from gmflow.gm import (
    GaussianMixture,
    gaussian_to_gm_samples,
    gm_to_gaussian,
    gm_to_gaussian_samples,
    gm_to_sample,
)
from gmflow.gm.transport import _kr_basis

F64 = torch.float64


def rotated(gm, x, axis_aligned):
    """x̃ = Vᵀ x with the transport's basis, for x (B, n, C, H, W)."""
    v = _kr_basis(gm, axis_aligned)
    spec = "bca,bnchw->bnahw" if axis_aligned else "bhwca,bnchw->bnahw"
    return torch.einsum(spec, v, x)


@pytest.mark.parametrize("axis_aligned", [True, False])
@pytest.mark.parametrize("per_component", [False, True])
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("c", [1, 2, 4])
@pytest.mark.parametrize("hw", [1, 4])
def test_forward_inverts_inverse_fp64(k, c, hw, per_component, axis_aligned):
    """Oracle 21a in fp64: forward(inverse(z)) = z to Newton tolerance."""
    gm = random_gm(2, k, c, hw, per_component=per_component, seed=10 * k + c)
    z = torch.randn(2, 3, c, hw, hw, generator=torch.Generator().manual_seed(1), dtype=F64)
    x = gaussian_to_gm_samples(gm, z, axis_aligned=axis_aligned)
    z_back = gm_to_gaussian_samples(gm, x, axis_aligned=axis_aligned)
    torch.testing.assert_close(z_back, z, rtol=0, atol=1e-7)


@pytest.mark.parametrize("axis_aligned", [True, False])
@pytest.mark.parametrize(("k", "c"), [(3, 2), (8, 4)])
def test_forward_inverts_inverse_fp32(k, c, axis_aligned):
    """Oracle 21a in fp32: max error < 1e-4 for |z| <= 3 (beyond, fp32 erf(z/√2) loses z)."""
    gm = random_gm(2, k, c, 4, torch.float32, seed=k)
    z = torch.randn(2, 4, c, 4, 4, generator=torch.Generator().manual_seed(2)).clamp(-3, 3)
    x = gaussian_to_gm_samples(gm, z, axis_aligned=axis_aligned)
    assert x.dtype == torch.float32
    z_back = gm_to_gaussian_samples(gm, x, axis_aligned=axis_aligned)
    assert (z_back - z).abs().max() < 1e-4


def _mc_moments(x):
    """Mean, covariance and their standard errors over axis 0 of x (n, C)."""
    n = x.shape[0]
    mean = x.mean(0)
    d = x - mean
    prods = d[:, :, None] * d[:, None, :]  # (n, C, C)
    return mean, prods.mean(0), d.std(0) / math.sqrt(n), prods.std(0) / math.sqrt(n)


@pytest.mark.parametrize("axis_aligned", [True, False])
def test_inverse_of_normal_samples_has_the_gm_moments(axis_aligned):
    """Oracle 21b: the inverse map of N(0, I) samples reproduces the GM mean and covariance."""
    gm = random_gm(1, 3, 2, 1, seed=3)
    n = 40_000
    z = torch.randn(1, n, 2, 1, 1, generator=torch.Generator().manual_seed(4), dtype=F64)
    x = gaussian_to_gm_samples(gm, z, axis_aligned=axis_aligned)[0, :, :, 0, 0]  # (n, C)
    mean, cov, se_mean, se_cov = _mc_moments(x)
    ref = gm_to_gaussian(gm)
    # 5 standard errors: a fixed seed, so this is deterministic; a real bias would be far larger
    assert ((mean - ref.mean[0, 0, 0]).abs() < 5 * se_mean).all()
    assert ((cov - ref.cov[0, 0, 0]).abs() < 5 * se_cov).all()


def test_forward_of_gm_samples_is_standard_normal():
    """Oracle 21c: forward KR of gm_to_sample draws has mean 0, covariance I, normal marginals."""
    gm = random_gm(1, 4, 2, 1, per_component=True, seed=5)
    n = 40_000
    x = gm_to_sample(gm, n, generator=torch.Generator().manual_seed(6))  # (1, n, C, 1, 1)
    z = gm_to_gaussian_samples(gm, x)[0, :, :, 0, 0]
    mean, cov, se_mean, se_cov = _mc_moments(z)
    assert (mean.abs() < 5 * se_mean).all()
    assert ((cov - torch.eye(2, dtype=F64)).abs() < 5 * se_cov).all()
    for a in range(2):
        assert stats.kstest(z[:, a].numpy(), "norm").pvalue > 1e-3


@pytest.mark.parametrize("axis_aligned", [True, False])
def test_inverse_is_increasing_in_each_axis(axis_aligned):
    """Oracle 21d: x̃_a is increasing in z_a (the other coordinates held fixed)."""
    gm = random_gm(1, 8, 4, 4, seed=7)
    base = torch.randn(1, 1, 4, 4, 4, generator=torch.Generator().manual_seed(8), dtype=F64)
    grid = torch.linspace(-3, 3, 25, dtype=F64)
    for a in range(4):
        z = base.repeat(1, 25, 1, 1, 1)
        z[:, :, a] = grid.view(1, 25, 1, 1)
        if not axis_aligned:  # z lives in the original coordinates: move along V's column a
            v = _kr_basis(gm, axis_aligned)  # (1, H, W, C, C)
            z = torch.einsum("bhwac,bnchw->bnahw", v, z)
        x_rot = rotated(gm, gaussian_to_gm_samples(gm, z, axis_aligned=axis_aligned), axis_aligned)
        assert (x_rot[:, 1:, a] - x_rot[:, :-1, a] > 0).all()


@pytest.mark.parametrize("n_axes", [0, 1, 2])
def test_partial_inverse_has_the_gm_moments(n_axes):
    """Oracle 21e: n_axes < C samples the remaining axes from the conditional GM."""
    gm = random_gm(1, 3, 3, 1, per_component=True, seed=9)
    n = 40_000
    z = torch.randn(1, n, 3, 1, 1, generator=torch.Generator().manual_seed(10), dtype=F64)
    g = torch.Generator().manual_seed(11)
    x = gaussian_to_gm_samples(gm, z, n_axes=n_axes, generator=g)[0, :, :, 0, 0]
    mean, cov, se_mean, se_cov = _mc_moments(x)
    ref = gm_to_gaussian(gm)
    assert ((mean - ref.mean[0, 0, 0]).abs() < 5 * se_mean).all()
    assert ((cov - ref.cov[0, 0, 0]).abs() < 5 * se_cov).all()


def test_partial_forward_keeps_the_leading_axes_and_fills_noise():
    """Oracle 21e (forward): the first n_axes coordinates are the full map's; the rest N(0, 1)."""
    gm = random_gm(1, 3, 4, 1, seed=12)
    x = gm_to_sample(gm, 20_000, generator=torch.Generator().manual_seed(13))
    full = gm_to_gaussian_samples(gm, x)
    part = gm_to_gaussian_samples(gm, x, n_axes=2, generator=torch.Generator().manual_seed(14))
    torch.testing.assert_close(part[:, :, :2], full[:, :, :2])
    fill = part[0, :, 2:, 0, 0]
    mean, cov, se_mean, se_cov = _mc_moments(fill)
    assert (mean.abs() < 5 * se_mean).all()
    assert ((cov - torch.eye(2, dtype=F64)).abs() < 5 * se_cov).all()


@pytest.mark.parametrize("axis_aligned", [True, False])
def test_single_component_is_an_affine_map(axis_aligned):
    """K = 1: the forward map is z = Vᵀ(x − μ)/s (rotated back if not axis-aligned): norms agree."""
    gm = random_gm(2, 1, 4, 4, seed=15)
    noise = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(16), dtype=F64)
    x = gm.means + gm.logstds.exp() * noise.clamp(-3, 3)  # (2, 3, C, H, W)
    z = gm_to_gaussian_samples(gm, x, axis_aligned=axis_aligned)
    torch.testing.assert_close(z.norm(dim=2), noise.clamp(-3, 3).norm(dim=2))


def test_basis_orders_axes_by_descending_variance():
    """The first KR axis is the direction of largest (pixel-averaged) variance."""
    means = torch.tensor([[0.0, 3.0], [0.0, -3.0]], dtype=F64).view(1, 2, 2, 1, 1)
    gm = GaussianMixture(means, torch.full((1, 2, 1, 1, 1), -math.log(2), dtype=F64),
                         torch.full((1, 1, 1, 1, 1), math.log(0.5), dtype=F64))  # fmt: skip
    v = _kr_basis(gm, axis_aligned=True)[0]
    torch.testing.assert_close(v[:, 0].abs(), torch.tensor([0.0, 1.0], dtype=F64))
    # the forward map's first output then depends on x_1 only
    x = torch.tensor([[0.3, 1.0], [-0.7, 1.0]], dtype=F64).view(1, 2, 2, 1, 1)
    z = gm_to_gaussian_samples(gm, x)
    torch.testing.assert_close(z[0, 0, 0], z[0, 1, 0])
    assert (z[0, 0, 1] - z[0, 1, 1]).abs() > 0.5


def test_axis_aligned_basis_is_shared_by_all_pixels():
    """Axis-aligned KR uses one basis per sample: a pixel's map depends on the other pixels' GMs."""
    gm = random_gm(1, 3, 2, 4, seed=17)
    x = torch.randn(1, 2, 2, 4, 4, generator=torch.Generator().manual_seed(18), dtype=F64)
    cov = gm_to_gaussian(gm).cov.mean(dim=(1, 2))  # (1, C, C)
    eigvals = torch.linalg.eigvalsh(cov)
    v = _kr_basis(gm, axis_aligned=True)
    torch.testing.assert_close(v.transpose(-1, -2) @ cov @ v, torch.diag_embed(eigvals.flip(-1)))
    altered = GaussianMixture(gm.means.clone(), gm.logweights, gm.logstds)
    altered.means[:, :, 0, 0, 0] *= 10.0  # widen pixel (0, 0) along channel 0 only
    z1 = gm_to_gaussian_samples(gm, x)[..., 3, 3]
    z2 = gm_to_gaussian_samples(altered, x)[..., 3, 3]
    assert (z1 - z2).abs().max() > 1e-3
    z1 = gm_to_gaussian_samples(gm, x, axis_aligned=False)[..., 3, 3]
    z2 = gm_to_gaussian_samples(altered, x, axis_aligned=False)[..., 3, 3]
    torch.testing.assert_close(z1, z2)


def test_backends_agree(monkeypatch):
    gm = random_gm(2, 8, 4, 4, per_component=True, seed=19)
    z = torch.randn(2, 2, 4, 4, 4, generator=torch.Generator().manual_seed(20), dtype=F64)
    out = {}
    for backend in ("torch", "numba"):
        monkeypatch.setenv("GMFLOW_GM_BACKEND", backend)
        out[backend] = gaussian_to_gm_samples(gm, z)
    torch.testing.assert_close(out["numba"], out["torch"], rtol=0, atol=1e-9)


def test_inverse_is_differentiable_in_the_mixture():
    """C = 1 (V = 1, no basis gradient to miss): gradcheck of the inverse map."""
    gm = random_gm(1, 3, 1, 1, per_component=True, seed=21)
    z = torch.tensor([-1.2, 0.3, 2.0], dtype=F64).view(1, 3, 1, 1, 1)

    def inverse(means, logweights, logstds):
        return gaussian_to_gm_samples(GaussianMixture(means, logweights.log_softmax(1), logstds), z)

    inputs = [t.clone().requires_grad_(True) for t in (gm.means, gm.logweights, gm.logstds)]
    assert torch.autograd.gradcheck(inverse, inputs, atol=1e-6, rtol=1e-5)


def test_low_precision_input_is_solved_in_fp32_and_cast_back():
    gm = random_gm(1, 3, 2, 4, seed=22)
    z = torch.randn(1, 2, 2, 4, 4, generator=torch.Generator().manual_seed(23)).clamp(-3, 3)
    x = gaussian_to_gm_samples(gm.to(torch.bfloat16), z.to(torch.bfloat16))
    assert x.dtype == torch.bfloat16
    ref = gaussian_to_gm_samples(
        gm.to(torch.bfloat16).to(torch.float32), z.to(torch.bfloat16).float()
    )
    torch.testing.assert_close(x, ref.to(torch.bfloat16))


@pytest.mark.parametrize(
    ("shape", "n_axes", "match"),
    [
        ((2, 1, 3, 4, 4), None, "C=2"),
        ((2, 4, 4), None, "sample axis"),
        ((2, 1, 2, 4, 4), 3, "n_axes"),
    ],
)
def test_bad_arguments_raise(shape, n_axes, match):
    gm = random_gm(2, 3, 2, 4)
    for fn in (gaussian_to_gm_samples, gm_to_gaussian_samples):
        with pytest.raises(ValueError, match=match):
            fn(gm, torch.zeros(shape, dtype=F64), n_axes=n_axes)
