"""Moments of a GM (spec 16, oracles 10, 11, 24 and numeric vector 46), in fp64.

References are independent of ``gmflow.gm``: ``torch.distributions.MixtureSameFamily`` (mean and
per-channel variance) and the second-moment form E[x xᵀ] − m mᵀ of the covariance, whereas the
library uses the centred form Σ A d dᵀ + s² I.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from gmflow.gm import (
    GaussianMixture,
    gm_temperature,
    gm_to_gaussian,
    gm_to_iso_gaussian,
    gm_to_mean,
)

SHAPES = list(itertools.product([1, 3, 8], [1, 2, 4], [1, 4]))  # (K, C, H = W)
TOL = {"rtol": 1e-10, "atol": 1e-10}


def second_moment_covariance(gm: GaussianMixture) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (..., H, W, C) and covariance (..., H, W, C, C) as Σ A (μ μᵀ + s² I) − m mᵀ."""
    mu = gm.means.movedim(-3, -1)  # (..., K, H, W, C)
    a = gm.logweights.exp().squeeze(-3)[..., None]  # (..., K, H, W, 1)
    s2 = gm.logstds.exp().square().squeeze(-3)[..., None]  # (..., 1|K, 1, 1, 1)
    eye = torch.eye(gm.num_channels, dtype=gm.dtype)
    mean = (a * mu).sum(-4)
    second = (a[..., None] * (mu[..., :, None] * mu[..., None, :] + s2[..., None] * eye)).sum(-5)
    return mean, second - mean[..., :, None] * mean[..., None, :]


@pytest.mark.parametrize("per_component_std", [False, True])
@pytest.mark.parametrize(("K", "C", "HW"), SHAPES)
def test_gm_to_mean_matches_mixture_same_family(
    random_gm, to_torch_mixture, K, C, HW, per_component_std
):
    gm = random_gm(K, C, HW, HW, per_component_std=per_component_std)
    expected = to_torch_mixture(gm).mean.movedim(-1, -3)  # (..., C, H, W)
    assert_close(gm_to_mean(gm), expected, **TOL)


@pytest.mark.parametrize("power", [0.5, 3.0])
@pytest.mark.parametrize(("K", "C", "HW"), [(3, 2, 4), (8, 4, 1)])
def test_gm_to_mean_with_power_weights_components_by_powered_weights(random_gm, K, C, HW, power):
    gm = random_gm(K, C, HW, HW)
    a_p = gm.logweights.exp() ** power  # A^p, normalised below (spec 3.3)
    expected = (a_p / a_p.sum(-4, keepdim=True) * gm.means).sum(-4)
    assert_close(gm_to_mean(gm, power=power), expected, **TOL)


def test_gm_to_mean_with_large_power_is_the_heaviest_component_mean(random_gm):
    gm = random_gm(8, 3, 4, 4)
    top = gm.logweights.argmax(dim=-4, keepdim=True).expand(-1, -1, 3, -1, -1)
    expected = torch.gather(gm.means, -4, top).squeeze(-4)
    assert_close(gm_to_mean(gm, power=1e6), expected, **TOL)


@pytest.mark.parametrize("per_component_std", [False, True])
@pytest.mark.parametrize(("K", "C", "HW"), SHAPES)
def test_gm_to_iso_gaussian_is_the_channel_averaged_mixture_variance(
    random_gm, to_torch_mixture, K, C, HW, per_component_std
):
    # oracle 10: mean Σ A μ, var s² + (1/C) Σ A ||μ − m||² = mean over c of Var[x_c]
    gm = random_gm(K, C, HW, HW, per_component_std=per_component_std)
    dist = to_torch_mixture(gm)
    g = gm_to_iso_gaussian(gm)
    assert g.var.shape == (2, 1, HW, HW)
    assert_close(g.mean, dist.mean.movedim(-1, -3), **TOL)
    assert_close(g.var, dist.variance.mean(-1).unsqueeze(-3), **TOL)


@pytest.mark.parametrize("per_component_std", [False, True])
@pytest.mark.parametrize(("K", "C", "HW"), SHAPES)
def test_gm_to_gaussian_matches_second_moment_covariance(
    random_gm, to_torch_mixture, K, C, HW, per_component_std
):
    # oracle 11: cov = Σ A d dᵀ + s² I (= E[x xᵀ] − m mᵀ); diag = per-channel variance;
    # trace(cov)/C = the iso variance of oracle 10
    gm = random_gm(K, C, HW, HW, per_component_std=per_component_std)
    mean, cov = second_moment_covariance(gm)
    g = gm_to_gaussian(gm)
    assert_close(g.mean, mean, **TOL)
    assert_close(g.cov, cov, **TOL)
    assert_close(g.cov.diagonal(dim1=-2, dim2=-1), to_torch_mixture(gm).variance, **TOL)
    trace = g.cov.diagonal(dim1=-2, dim2=-1).mean(-1)
    assert_close(trace.unsqueeze(-3), gm_to_iso_gaussian(gm).var, **TOL)
    assert_close(gm_to_gaussian(gm, cov_scale=0.3).cov, 0.3 * cov, **TOL)


def test_numeric_vector_46_moments():
    # spec 16, vector 46: K = 2, C = 2, one pixel, weights [0.3, 0.7], s = 0.5
    f64 = torch.float64
    means = torch.tensor([[1.0, -0.5], [-0.3, 0.8]], dtype=f64).reshape(1, 2, 2, 1, 1)
    logweights = torch.tensor([0.3, 0.7], dtype=f64).log().reshape(1, 2, 1, 1, 1)
    gm = GaussianMixture(means, logweights, torch.full((1, 1, 1, 1, 1), math.log(0.5), dtype=f64))
    assert_close(gm_to_mean(gm).flatten(), torch.tensor([0.09, 0.41], dtype=f64), **TOL)
    assert_close(gm_to_iso_gaussian(gm).var.flatten(), torch.tensor([0.6049], dtype=f64), **TOL)
    cov = torch.tensor([[0.6049, -0.3549], [-0.3549, 0.6049]], dtype=f64)
    assert_close(gm_to_gaussian(gm).cov.reshape(2, 2), cov, **TOL)


# ---- gm_temperature (oracle 24) ----


@pytest.mark.parametrize("per_component_std", [False, True])
def test_gm_temperature_one_is_the_identity(random_gm, per_component_std):
    gm = random_gm(8, 2, 4, 4, per_component_std=per_component_std)
    out = gm_temperature(gm, 1.0)
    assert_close(out.means, gm.means, rtol=0, atol=0)
    assert_close(out.logweights, gm.logweights, **TOL)
    assert_close(out.logstds, gm.logstds, **TOL)


@pytest.mark.parametrize("tau", [0.25, 4.0])
def test_gm_temperature_raises_weights_to_one_over_tau_and_scales_std_by_sqrt_tau(random_gm, tau):
    gm = random_gm(8, 2, 4, 4)
    out = gm_temperature(gm, tau)
    a = gm.logweights.exp() ** (1 / tau)
    assert_close(out.logweights.exp(), a / a.sum(-4, keepdim=True), **TOL)
    assert_close(out.logstds.exp(), gm.logstds.exp() * math.sqrt(tau), **TOL)
    assert_close(out.means, gm.means, rtol=0, atol=0)


@pytest.mark.parametrize("tau", [0.3, 2.5])
def test_gm_temperature_of_one_gaussian_is_its_density_to_the_power_one_over_tau(
    random_gm, ref_gm_logprob, tau
):
    # N(μ, s²)^{1/τ} ∝ N(μ, τ s²): the log-density ratio is constant in x
    gm = random_gm(1, 3, 4, 4)
    x = torch.randn(2, 16, 3, 4, 4, dtype=torch.float64)
    diff = ref_gm_logprob(gm_temperature(gm, tau), x) - ref_gm_logprob(gm, x) / tau
    assert float(diff.std(dim=-3).max()) < 1e-10


def test_gm_temperature_towards_zero_makes_the_weights_one_hot(random_gm):
    gm = random_gm(8, 2, 4, 4)
    out = gm_temperature(gm, 1e-9)  # floored at eps = 1e-6
    one_hot = torch.zeros_like(gm.logweights).scatter_(
        -4, gm.logweights.argmax(-4, keepdim=True), 1
    )
    assert_close(out.logweights.exp(), one_hot, rtol=0, atol=1e-12)
    assert_close(out.logstds, gm.logstds + 0.5 * math.log(1e-6), **TOL)


# ---- autograd ----


@pytest.mark.parametrize(
    "op",
    [
        lambda gm: gm_to_mean(gm, power=2.0),
        lambda gm: gm_to_iso_gaussian(gm).var,
        lambda gm: gm_to_gaussian(gm).cov,
        lambda gm: gm_temperature(gm, 0.7).logweights,
    ],
    ids=["gm_to_mean", "gm_to_iso_gaussian", "gm_to_gaussian", "gm_temperature"],
)
def test_moment_ops_are_differentiable(op):
    gen = torch.Generator().manual_seed(1)
    params = [
        torch.randn(1, 2, 2, 2, 1, dtype=torch.float64, generator=gen).requires_grad_(),
        torch.randn(1, 2, 1, 2, 1, dtype=torch.float64, generator=gen).requires_grad_(),
        torch.randn(1, 2, 1, 1, 1, dtype=torch.float64, generator=gen).mul(0.3).requires_grad_(),
    ]
    assert torch.autograd.gradcheck(lambda *p: op(GaussianMixture(*p)), params)
