"""Consumers of full-covariance mixtures (spec 7.10-7.13 for full GMs), in fp64.

Three kinds of oracle:
* identities: a full mixture with covariances s_k² I (``gm_to_full``) gives what the isotropic
  functions give, draws included (same generator, same samples);
* independent references: per-pixel loops over ``scipy.stats.multivariate_normal`` and NumPy
  moments, which share no code with ``gmflow.gm``;
* closed forms and Monte Carlo: entropy and KL of single Gaussians, sample moments and
  component frequencies of well-separated mixtures, within a few standard errors.
"""

from __future__ import annotations

import itertools
import math

import gm_cases
import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from torch.testing import assert_close

from gmflow.gm import (
    FullGaussianMixture,
    Gaussian,
    gm_entropy,
    gm_kl_div,
    gm_logprob,
    gm_mul_gaussian,
    gm_temperature,
    gm_to_full,
    gm_to_gaussian,
    gm_to_iso_gaussian,
    gm_to_mean,
    gm_to_sample,
)

f64 = torch.float64
SHAPES = list(itertools.product([1, 3, 8], [1, 2, 4], [1, 4]))  # (K, C, H = W)
TOL = {"rtol": 1e-12, "atol": 1e-12}


def random_spd(*batch: int, C: int, generator: torch.Generator) -> torch.Tensor:
    """SPD covariances of unit scale: A Aᵀ / C + 0.2 I."""
    return gm_cases.random_spd(*batch, C=C, generator=generator, scale=1 / C, jitter=0.2)


def random_full_gm(
    K: int, C: int, HW: int, per_component: bool, generator: torch.Generator, batch: int = 2
) -> FullGaussianMixture:
    kc = K if per_component else 1
    return FullGaussianMixture(
        torch.randn(batch, K, HW, HW, C, generator=generator, dtype=f64),
        random_spd(batch, kc, HW, HW, C=C, generator=generator),
        (2 * torch.randn(batch, K, HW, HW, generator=generator, dtype=f64)).log_softmax(1),
    )


def pixel_params(gm: FullGaussianMixture, b: int, i: int, j: int):  # type: ignore[no-untyped-def]
    """NumPy weights (K,), means (K, C), covs (K, C, C) of one pixel."""
    k = gm.num_gaussians
    covs = gm.covs.expand(*gm.covs.shape[:-5], k, *gm.covs.shape[-4:])
    return (
        gm.logweights[b, :, i, j].exp().numpy(),
        gm.means[b, :, i, j].numpy(),
        covs[b, :, min(i, covs.shape[-4] - 1), min(j, covs.shape[-3] - 1)].numpy(),
    )


def pixels(gm: FullGaussianMixture):  # type: ignore[no-untyped-def]
    b, _, h, w, _ = gm.means.shape
    return itertools.product(range(b), range(h), range(w))


# ---- identities with the isotropic functions ----


@pytest.mark.parametrize("per_component_std", [False, True])
@pytest.mark.parametrize(("K", "C", "HW"), SHAPES)
def test_full_with_isotropic_covariances_equals_the_isotropic_functions(
    random_gm, K, C, HW, per_component_std
):
    gm = random_gm(K, C, HW, HW, per_component_std=per_component_std)
    full = gm_to_full(gm)
    x = torch.randn(2, 5, C, HW, HW, dtype=f64)
    assert_close(gm_logprob(full, x), gm_logprob(gm, x), **TOL)
    assert_close(gm_to_mean(full), gm_to_mean(gm), **TOL)
    assert_close(gm_to_mean(full, 2.5), gm_to_mean(gm, 2.5), **TOL)
    iso_f, iso = gm_to_iso_gaussian(full), gm_to_iso_gaussian(gm)
    assert_close(iso_f.mean, iso.mean, **TOL)
    assert_close(iso_f.var, iso.var, **TOL)
    g_f, g = gm_to_gaussian(full, 1.7), gm_to_gaussian(gm, 1.7)
    assert_close(g_f.mean, g.mean, **TOL)
    assert_close(g_f.cov, g.cov, **TOL)
    for power, sharpen in [(1.0, False), (2.0, True), (0.5, False)]:
        draws = [
            gm_to_sample(m, 7, power, torch.Generator().manual_seed(3), sharpen) for m in (full, gm)
        ]
        assert_close(draws[0], draws[1], **TOL)
    tempered = gm_temperature(full, 0.4)
    reference = gm_to_full(gm_temperature(gm, 0.4))
    assert_close(tempered.means, reference.means, **TOL)
    assert_close(tempered.logweights, reference.logweights, **TOL)
    assert_close(tempered.covs, reference.covs.expand_as(tempered.covs), **TOL)


def test_per_row_generators_give_the_same_draws_for_full_and_isotropic(random_gm):
    gm = random_gm(3, 2, 4, 4, batch=(3,))
    gens = [[torch.Generator().manual_seed(10 + i) for i in range(3)] for _ in range(2)]
    assert_close(gm_to_sample(gm_to_full(gm), 4, generator=gens[0]),
                 gm_to_sample(gm, 4, generator=gens[1]), **TOL)  # fmt: skip


# ---- independent references (scipy, NumPy loops) ----


@pytest.mark.parametrize("per_component", [False, True])
@pytest.mark.parametrize(("K", "C", "HW"), [(1, 1, 1), (3, 2, 4), (8, 4, 1), (3, 4, 4)])
def test_logprob_matches_scipy(generator, K, C, HW, per_component):
    gm = random_full_gm(K, C, HW, per_component, generator)
    x = torch.randn(2, 6, C, HW, HW, generator=generator, dtype=f64)
    out = gm_logprob(gm, x)
    assert out.shape == (2, 6, HW, HW)
    for b, i, j in pixels(gm):
        w, mu, cov = pixel_params(gm, b, i, j)
        pts = x[b, :, :, i, j].numpy()
        dens = sum(w[k] * multivariate_normal(mu[k], cov[k]).pdf(pts) for k in range(K))
        np.testing.assert_allclose(out[b, :, i, j].numpy(), np.log(dens), rtol=1e-10)


def test_logprob_with_covariances_shared_over_pixels_matches_scipy(generator):
    """covs (B, K, 1, 1, C, C) broadcast over H, W, as gm_to_full and products produce them."""
    gm = random_full_gm(3, 2, 1, True, generator)
    gm = FullGaussianMixture(
        torch.randn(2, 3, 4, 4, 2, generator=generator, dtype=f64),
        gm.covs,
        torch.randn(2, 3, 4, 4, generator=generator, dtype=f64).log_softmax(1),
    )
    x = torch.randn(2, 3, 2, 4, 4, generator=generator, dtype=f64)
    out = gm_logprob(gm, x)
    for b, i, j in pixels(gm):
        w, mu, cov = pixel_params(gm, b, i, j)
        dens = sum(w[k] * multivariate_normal(mu[k], cov[k]).pdf(x[b, :, :, i, j].numpy())
                   for k in range(3))  # fmt: skip
        np.testing.assert_allclose(out[b, :, i, j].numpy(), np.log(dens), rtol=1e-10)


@pytest.mark.parametrize("per_component", [False, True])
@pytest.mark.parametrize(("K", "C", "HW"), [(1, 2, 1), (3, 2, 4), (8, 4, 1)])
def test_moments_match_numpy(generator, K, C, HW, per_component):
    gm = random_full_gm(K, C, HW, per_component, generator)
    mean, iso, g = gm_to_mean(gm), gm_to_iso_gaussian(gm), gm_to_gaussian(gm, 0.8)
    sharp = gm_to_mean(gm, 3.0)
    assert mean.shape == (2, C, HW, HW) and iso.var.shape == (2, 1, HW, HW)
    for b, i, j in pixels(gm):
        w, mu, cov = pixel_params(gm, b, i, j)
        m = w @ mu
        d = mu - m
        full = np.einsum("k,kcd->cd", w, cov) + np.einsum("k,kc,kd->cd", w, d, d)
        np.testing.assert_allclose(mean[b, :, i, j].numpy(), m, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(g.mean[b, i, j].numpy(), m, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(g.cov[b, i, j].numpy(), 0.8 * full, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(iso.var[b, 0, i, j].item(), np.trace(full) / C, rtol=1e-12)
        w3 = w**3 / (w**3).sum()
        np.testing.assert_allclose(sharp[b, :, i, j].numpy(), w3 @ mu, rtol=1e-12, atol=1e-12)


# ---- Monte Carlo and closed forms ----


def separated_gm(generator: torch.Generator, per_component: bool) -> FullGaussianMixture:
    """K = 3, C = 2 components 40 apart (each sample's component is its nearest mean)."""
    means = torch.tensor([[0.0, 0.0], [40.0, 0.0], [0.0, 40.0]], dtype=f64)
    covs = random_spd(3 if per_component else 1, C=2, generator=generator)
    logweights = torch.tensor([0.2, 0.5, 0.3], dtype=f64).log()
    return FullGaussianMixture(
        means[None, :, None, None], covs[None, :, None, None], logweights[None, :, None, None]
    )


@pytest.mark.parametrize("per_component", [False, True])
@pytest.mark.parametrize(("power", "sharpen"), [(1.0, False), (2.0, False), (2.0, True)])
def test_samples_pick_components_by_weight_and_follow_their_covariance(
    generator, per_component, power, sharpen
):
    gm = separated_gm(generator, per_component)
    n = 20000
    x = gm_to_sample(gm, n, power, torch.Generator().manual_seed(1), sharpen)  # (1, n, 2, 1, 1)
    pts = x[0, :, :, 0, 0]
    means = gm.means[0, :, 0, 0]
    comp = torch.cdist(pts, means).argmin(dim=1)
    w = torch.tensor([0.2, 0.5, 0.3], dtype=f64) ** power
    w = w / w.sum()
    scale = 1.0 / power if sharpen else 1.0
    covs = gm.covs[0, :, 0, 0].expand(3, 2, 2)
    for k in range(3):
        sel = pts[comp == k]
        freq = sel.shape[0] / n
        assert abs(freq - w[k]) < 4 * math.sqrt(w[k] * (1 - w[k]) / n), (k, freq, w[k])
        d = sel - means[k]
        emp = d.T @ d / sel.shape[0]
        target = scale * covs[k]
        # SE of a Gaussian sample covariance entry: sqrt((Σ_ii Σ_jj + Σ_ij²)/m)
        se = ((target.diagonal()[:, None] * target.diagonal()[None]
               + target.square()) / sel.shape[0]).sqrt()  # fmt: skip
        assert (emp - target).abs().le(5 * se).all(), (k, emp, target)
        assert d.mean(0).abs().le(5 * (target.diagonal() / sel.shape[0]).sqrt()).all()


def test_entropy_and_kl_of_single_gaussians_match_the_closed_forms(generator):
    c = 3
    cov_p = random_spd(1, 1, 1, 1, C=c, generator=generator)
    cov_q = random_spd(1, 1, 1, 1, C=c, generator=generator)
    mu_p = torch.randn(1, 1, 1, 1, c, generator=generator, dtype=f64)
    mu_q = mu_p + 0.5 * torch.randn(1, 1, 1, 1, c, generator=generator, dtype=f64)
    zero = torch.zeros(1, 1, 1, 1, dtype=f64)
    p = FullGaussianMixture(mu_p, cov_p, zero)
    q = FullGaussianMixture(mu_q, cov_q, zero)
    n = 40000
    sp, sq = cov_p[0, 0, 0, 0], cov_q[0, 0, 0, 0]
    entropy = 0.5 * torch.logdet(2 * math.pi * math.e * sp)
    diff = (mu_q - mu_p)[0, 0, 0, 0]
    kl = 0.5 * (torch.trace(torch.linalg.solve(sq, sp)) + diff @ torch.linalg.solve(sq, diff)
                - c + torch.logdet(sq) - torch.logdet(sp))  # fmt: skip
    # per-sample terms: −log p has variance C/2; log p − log q has a variance we estimate
    x = gm_to_sample(p, n, generator=torch.Generator().manual_seed(2))
    terms = gm_logprob(p, x) - gm_logprob(q, x)
    se_kl = float(terms.std()) / math.sqrt(n)
    h = gm_entropy(p, n, torch.Generator().manual_seed(2))
    k = gm_kl_div(p, q, n, torch.Generator().manual_seed(2))
    assert abs(float(h) - float(entropy)) < 5 * math.sqrt(c / 2 / n)
    assert abs(float(k) - float(kl)) < 5 * se_kl
    assert float(gm_kl_div(p, p, 64, torch.Generator().manual_seed(0)).abs()) < 1e-12


def test_kl_between_an_isotropic_and_a_full_mixture(random_gm):
    gm = random_gm(3, 2, 4, 4)
    full = gm_to_full(gm)
    for a, b in [(gm, full), (full, gm)]:
        kl = gm_kl_div(a, b, 16, torch.Generator().manual_seed(0))
        assert kl.shape == (2, 1, 4, 4) and float(kl.abs().max()) < 1e-12


def test_the_product_with_a_gaussian_is_the_normalised_pointwise_product(random_gm, generator):
    """gm_mul_gaussian (spec 7.7) read back through the library's full-GM density."""
    gm = random_gm(3, 2, 4, 4, per_component_std=True)
    mean = torch.randn(2, 4, 4, 2, generator=generator, dtype=f64)
    cov = random_spd(2, 4, 4, C=2, generator=generator)
    prod = gm_mul_gaussian(gm, Gaussian(mean, cov))
    x = gm_to_mean(gm).unsqueeze(1) + torch.randn(2, 9, 2, 4, 4, generator=generator, dtype=f64)
    g_logprob = torch.distributions.MultivariateNormal(mean, cov).log_prob(
        x.movedim(2, -1).movedim(1, 0)
    ).movedim(0, 1)  # fmt: skip
    diff = gm_logprob(prod, x) - gm_logprob(gm, x) - g_logprob
    assert float(diff.std(dim=1).max()) < 1e-9


def test_logprob_is_differentiable_in_means_and_covariances(generator):
    gm = random_full_gm(2, 2, 1, True, generator, batch=1)
    a = torch.randn(1, 2, 1, 1, 2, 2, generator=generator, dtype=f64)
    x = torch.randn(1, 3, 2, 1, 1, generator=generator, dtype=f64)

    def f(means, a, logweights):  # type: ignore[no-untyped-def]
        covs = a @ a.transpose(-1, -2) + 0.5 * torch.eye(2, dtype=f64)
        return gm_logprob(FullGaussianMixture(means, covs, logweights.log_softmax(1)), x)

    inputs = (gm.means.clone().requires_grad_(), a.requires_grad_(),
              gm.logweights.clone().requires_grad_())  # fmt: skip
    assert torch.autograd.gradcheck(f, inputs)


def test_fp32_mixtures_stay_fp32(generator):
    gm = random_full_gm(3, 2, 4, False, generator).to(torch.float32)
    x = torch.randn(2, 5, 2, 4, 4)
    assert gm_logprob(gm, x).dtype == torch.float32
    assert gm_to_sample(gm, 2).dtype == torch.float32
    assert gm_to_mean(gm).dtype == torch.float32
    assert gm_logprob(gm, x.double()).dtype == f64  # any fp64 input makes the maths fp64


# ---- bad input ----


def test_bad_input_gets_a_clear_error(generator):
    gm = random_full_gm(3, 2, 4, True, generator)
    not_pd = FullGaussianMixture(gm.means, gm.covs - 10 * torch.eye(2, dtype=f64), gm.logweights)
    with pytest.raises(ValueError, match=r"gm_logprob: FullGaussianMixture\.covs must be "
                       r"symmetric positive definite, but 96 of the 96 .*jitter"):  # fmt: skip
        gm_logprob(not_pd, torch.zeros(2, 1, 2, 4, 4, dtype=f64))
    with pytest.raises(ValueError, match=r"gm_to_sample: FullGaussianMixture\.covs"):
        gm_to_sample(not_pd)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., n, C=2, H=4, W=4\).*channel-last"):
        gm_logprob(gm, torch.zeros(2, 1, 3, 4, 4, dtype=f64))
    with pytest.raises(ValueError, match=r"gm_logprob: x: batch dims \(3,\) do not broadcast"):
        gm_logprob(gm, torch.zeros(3, 1, 2, 4, 4, dtype=f64))
    with pytest.raises(ValueError, match=r"use_kr=True needs an isotropic p"):
        gm_kl_div(gm, gm, use_kr=True)
    other = random_full_gm(3, 4, 4, True, generator)
    with pytest.raises(ValueError, match=r"gm_kl_div: q\.means .* has the event shape \(C, H, "
                       r"W\) = \(4, 4, 4\), p\.means .* has \(2, 4, 4\)"):  # fmt: skip
        gm_kl_div(gm, other)
    with pytest.raises(
        ValueError, match=r"means and covs batch dims have shapes \(2,\) and \(3,\)"
    ):
        FullGaussianMixture(gm.means, gm.covs[:1].expand(3, 3, 4, 4, 2, 2), gm.logweights)


def test_record_helpers(generator):
    gm = random_full_gm(3, 2, 4, False, generator)
    assert (gm.num_gaussians, gm.num_channels, tuple(gm.batch_shape)) == (3, 2, (2,))
    assert gm.to(torch.float32).dtype == torch.float32 and gm.device.type == "cpu"
    means = gm.means.clone().requires_grad_()
    assert not FullGaussianMixture(means, gm.covs, gm.logweights).detach().means.requires_grad
