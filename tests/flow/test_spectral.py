"""Spectral pieces (spec 4.4, 7.13, 9.3; oracles 8, 35, 37, 38): the DHT, spectral sampling, its
log-density and the spectral loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from gmflow.flow.spectral import dht, gm_spectral_logprobs, idht, spectral_loss, spectral_sample
from gmflow.gm import (
    GaussianMixture,
    gm_logprob,
    gm_to_gaussian,
    gm_to_gaussian_samples,
    gm_to_mean,
)
from gmflow.gm.inverse_cdf import gm1d_pdf_cdf

N_MC = 20_000  # Monte-Carlo draws; bands are 5 standard errors
# Component stds for the sampling tests. Much smaller s with well-separated means needs more than
# the 16 Newton steps of the KR inverse (steps are clipped at 1.5 s), which these tests do not test.
STD_RANGE = (0.3, 1.0)


def _hartley_matrix(h: int, w: int) -> torch.Tensor:
    """The (HW, HW) DHT matrix from its definition: cas-like kernel (cos θ − sin θ)/√(HW)."""
    ih, iw = torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64)
    kh, kw, nh, nw = torch.meshgrid(ih, iw, ih, iw, indexing="ij")
    theta = 2 * math.pi * (kh * nh / h + kw * nw / w)
    return ((torch.cos(theta) - torch.sin(theta)) / math.sqrt(h * w)).reshape(h * w, h * w)


@pytest.mark.parametrize("size", [(4, 6), (3, 5), (1, 7), (8, 8)])
def test_dht_matches_the_hartley_sum(size):
    z = torch.randn(2, 3, *size, dtype=torch.float64)
    expected = (z.flatten(-2) @ _hartley_matrix(*size).T).reshape(z.shape)
    torch.testing.assert_close(dht(z), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [(4, 6), (3, 5), (32, 32)])
def test_dht_is_orthonormal_and_involutive(size):
    z = torch.randn(2, 4, *size, dtype=torch.float64)
    torch.testing.assert_close(
        dht(z).square().sum((-2, -1)), z.square().sum((-2, -1)), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(dht(dht(z)), z, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [(4, 6), (32, 32), (3, 5), (6, 7), (5, 4)])
def test_half_spectrum_inverse_equals_dht_for_even_and_odd_sizes(size):
    s = torch.randn(2, 4, *size, dtype=torch.float64)
    torch.testing.assert_close(idht(s), dht(s), rtol=0, atol=1e-12)
    torch.testing.assert_close(idht(dht(s)), s, rtol=0, atol=1e-12)


# ---- spectral loss (oracle 8) ----


def _single_gaussian_case(gen: torch.Generator):  # type: ignore[no-untyped-def]
    """K = 1, C = 1: the KR map is z = (u − μ)/s in closed form, an independent reference.

    Returns the loss inputs and ŝ = DHT(z) for a KR noise z ~ N(0, I) drawn first (so that no
    |z| reaches the erfinv clamp): u* = μ + s z, x_high = x0 + σ u*.
    """
    b, h, w = 3, 4, 6
    f64 = dict(generator=gen, dtype=torch.float64)
    mu = torch.randn(b, 1, 1, h, w, **f64)
    logstds = 0.3 * torch.randn(b, 1, 1, 1, 1, **f64)
    gm_u = GaussianMixture(mu, torch.zeros(b, 1, 1, h, w, dtype=torch.float64), logstds)
    z = torch.randn(b, 1, h, w, **f64)
    x0 = torch.randn(b, 1, h, w, **f64)
    sigma = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    x_high = x0 + sigma.view(-1, 1, 1, 1) * (mu[:, 0] + logstds[:, 0].exp() * z)
    return gm_u, x0, x_high, sigma, dht(z)


def test_spectral_loss_is_zero_for_a_white_spectrum(generator):
    gm_u, x0, x_high, sigma, _ = _single_gaussian_case(generator)
    loss = spectral_loss(gm_u, x0, x_high, sigma, torch.zeros_like(x0))
    assert loss.item() == 0.0


def test_spectral_loss_is_the_weighted_nll_difference(generator):
    gm_u, x0, x_high, sigma, s_hat = _single_gaussian_case(generator)
    lam = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    nll_lam = -torch.distributions.Normal(0.0, (0.5 * lam).exp()).log_prob(s_hat)
    nll_white = -torch.distributions.Normal(0.0, 1.0).log_prob(s_hat)
    for weight in (4.0, 1.0):
        loss = spectral_loss(gm_u, x0, x_high, sigma, lam, weight=weight)
        torch.testing.assert_close(
            loss, weight * (nll_lam - nll_white).mean(), rtol=1e-12, atol=1e-12
        )


def test_spectral_loss_is_minimised_at_the_log_power(generator):
    gm_u, x0, x_high, sigma, s_hat = _single_gaussian_case(generator)
    lam_star = torch.log(s_hat.square()).requires_grad_(True)
    loss = spectral_loss(gm_u, x0, x_high, sigma, lam_star)
    (grad,) = torch.autograd.grad(loss, lam_star)
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-12)
    for _ in range(3):
        other = lam_star.detach() + 0.1 * torch.randn(
            x0.shape, generator=generator, dtype=torch.float64
        )
        assert spectral_loss(gm_u, x0, x_high, sigma, other) > loss


def test_spectral_loss_trains_only_the_spectrum(random_gm, generator):
    gm = random_gm(3, 2, 4, 4, batch=(2,))
    means = gm.means.clone().requires_grad_(True)
    gm_u = GaussianMixture(means, gm.logweights, gm.logstds)
    x0 = torch.randn(2, 2, 4, 4, generator=generator, dtype=torch.float64)
    x_high = torch.randn(2, 2, 4, 4, generator=generator, dtype=torch.float64)
    lam = torch.randn(2, 2, 4, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    spectral_loss(gm_u, x0, x_high, 0.5, lam).backward()
    assert means.grad is None and lam.grad.abs().sum() > 0


# ---- spectral sampling (oracle 37) ----


def _expand(gm: GaussianMixture, n: int) -> GaussianMixture:
    return GaussianMixture(
        gm.means.expand(n, *gm.means.shape[1:]),
        gm.logweights.expand(n, *gm.logweights.shape[1:]),
        gm.logstds.expand(n, *gm.logstds.shape[1:]),
    )


def _normalised(raw: torch.Tensor) -> torch.Tensor:
    h, w = raw.shape[-2:]
    return raw.flatten(-2).log_softmax(-1).reshape(raw.shape) + math.log(h * w)


def _check_pixel_moments(gm: GaussianMixture, x: torch.Tensor) -> None:
    """Per-pixel MC mean and covariance of x (N, C, H, W) against the mixture's (5 std errors)."""
    n = x.shape[0]
    mean = gm_to_mean(gm)[0]  # (C, H, W)
    cov = gm_to_gaussian(gm).cov[0]  # (H, W, C, C)
    d = x - mean
    std = cov.diagonal(dim1=-2, dim2=-1).sqrt().permute(2, 0, 1)  # (C, H, W)
    assert (d.mean(0).abs() <= 5 * std / math.sqrt(n)).all()
    emp_cov = torch.einsum("nchw,ndhw->hwcd", d, d) / n
    fourth = torch.einsum("nchw,ndhw->nhwcd", d, d).var(0)  # variance of d_c d_d
    assert ((emp_cov - cov).abs() <= 5 * (fourth / n).sqrt()).all()


def test_white_spectrum_gives_independent_pixels_with_the_gm_marginals(random_gm, generator):
    gm = random_gm(3, 2, 4, 4, batch=(1,), std_range=STD_RANGE)
    x = spectral_sample(
        _expand(gm, N_MC), torch.zeros(N_MC, 2, 4, 4, dtype=torch.float64), generator
    )
    _check_pixel_moments(gm, x)
    # pixels are independent: cross-pixel correlations vanish within 5 standard errors
    d = (x - x.mean(0)) / x.std(0)
    corr = torch.einsum("nhw,nij->hwij", d[:, 0], d[:, 0]) / N_MC
    off_diagonal = corr.reshape(16, 16)[~torch.eye(16, dtype=torch.bool)]
    assert off_diagonal.abs().max() <= 5 / math.sqrt(N_MC)


def test_symmetric_spectrum_keeps_every_pixel_marginal(random_gm, generator):
    # odd sizes: on a 4x4 grid even an asymmetric λ would keep unit pixel variances
    gm = random_gm(3, 1, 3, 5, batch=(1,), std_range=STD_RANGE)
    raw = 1.5 * torch.randn(1, 3, 5, generator=generator, dtype=torch.float64)
    raw = 0.5 * (raw + torch.roll(torch.flip(raw, (-2, -1)), (1, 1), (-2, -1)))  # λ[k] = λ[−k]
    lam = _normalised(raw).expand(N_MC, 1, 3, 5)
    x = spectral_sample(_expand(gm, N_MC), lam, generator)
    _check_pixel_moments(gm, x)
    # KS test of one pixel's draws against the mixture CDF (p-value threshold 1e-3)
    gm_pixel = GaussianMixture(gm.means[..., 1:2, 2:3], gm.logweights[..., 1:2, 2:3], gm.logstds)
    _, cdf = gm1d_pdf_cdf(gm_pixel, x[:, 0, 1:2, 2:3].reshape(1, N_MC, 1, 1))
    assert stats.kstest(((cdf.flatten() + 1) / 2).numpy(), "uniform").pvalue > 1e-3


def test_spectrum_sets_the_spatial_covariance_of_the_kr_noise(random_gm, generator):
    # z = KR(x) recovers the drawn noise; its covariance across pixels is H diag(e^λ) H
    gm = random_gm(2, 1, 3, 4, batch=(1,), std_range=STD_RANGE)
    lam = _normalised(torch.randn(1, 3, 4, generator=generator, dtype=torch.float64))
    x = spectral_sample(_expand(gm, N_MC), lam.expand(N_MC, 1, 3, 4), generator)
    z = gm_to_gaussian_samples(_expand(gm, N_MC), x.unsqueeze(1)).reshape(N_MC, 12)
    hartley = _hartley_matrix(3, 4)
    expected = hartley @ torch.diag(lam.flatten().exp()) @ hartley.T
    emp = z.T @ z / N_MC
    assert expected.diagonal().std() > 0.05 and (expected - torch.eye(12)).abs().max() > 0.2
    assert (emp - expected).abs().max() <= 5 * math.sqrt(2 * expected.diagonal().max() ** 2 / N_MC)


def test_spectral_sample_checks_the_spectrum_shape(random_gm):
    gm = random_gm(2, 4, 4, 4, batch=(2,))
    with pytest.raises(ValueError, match="log_spectrum"):
        spectral_sample(gm, torch.zeros(2, 4, 4, 5))


# ---- the log-density of spectral sampling (oracle 38) ----

F64 = torch.float64


def test_spectral_logprob_without_a_spectrum_is_the_summed_gm_logprob(random_gm, generator):
    gm = random_gm(3, 2, 4, 4, batch=(2,))
    x = torch.randn(2, 5, 2, 4, 4, generator=generator, dtype=F64)
    summed = gm_logprob(gm, x).sum(dim=(-2, -1))  # (2, 5)
    torch.testing.assert_close(gm_spectral_logprobs(gm, x), summed, rtol=0, atol=0)
    white = gm_spectral_logprobs(gm, x, torch.zeros(2, 2, 4, 4, dtype=F64))
    torch.testing.assert_close(white, summed, rtol=0, atol=1e-12)


def test_spectral_logprob_is_the_change_of_variables_of_spectral_sampling(random_gm, generator):
    """Independent reference: log N(ŝ(x); 0, e^λ) + log|det ∂ŝ/∂x| with the Jacobian of
    x ↦ DHT(KR(x)) from autograd, at draws of spectral sampling (channel-dependent λ)."""
    c, h, w = 2, 2, 3
    gm = random_gm(3, c, h, w, batch=(2,), std_range=STD_RANGE)
    lam = 0.5 * torch.randn(2, c, h, w, generator=generator, dtype=F64)  # any λ, not normalised
    x = spectral_sample(gm, lam, generator).unsqueeze(1)  # (2, 1, C, H, W)
    got = gm_spectral_logprobs(gm, x, lam)
    assert got.shape == (2, 1)
    for b in range(2):
        gm_b = GaussianMixture(gm.means[b : b + 1], gm.logweights[b : b + 1], gm.logstds[b : b + 1])

        def s_hat(flat, gm_b=gm_b):  # type: ignore[no-untyped-def]
            return dht(gm_to_gaussian_samples(gm_b, flat.reshape(1, 1, c, h, w))).flatten()

        jac = torch.autograd.functional.jacobian(s_hat, x[b].flatten())
        s, var = s_hat(x[b].flatten()), lam[b].flatten().exp()
        log_normal = (-0.5 * s.square() / var - 0.5 * torch.log(2 * math.pi * var)).sum()
        want = log_normal + torch.linalg.slogdet(jac).logabsdet
        torch.testing.assert_close(got[b, 0], want, rtol=0, atol=1e-8)


def test_spectral_density_integrates_to_one_and_matches_the_samples(random_gm, generator):
    """A 1x2 one-channel image (a 2-D density): quadrature of exp(log p) over a grid is 1, and a
    KS test of spectral samples' first pixel against the grid's marginal CDF passes."""
    gm = random_gm(3, 1, 1, 2, batch=(1,), std_range=STD_RANGE)
    lam = torch.tensor([0.8, -0.6], dtype=F64).view(1, 1, 1, 2)  # correlates the two pixels
    mean = gm_to_mean(gm)[0, 0, 0]
    std = gm_to_gaussian(gm).cov[0, 0, :, 0, 0].sqrt()
    axes = [torch.linspace(float(m - 8 * s), float(m + 8 * s), 701, dtype=F64)
            for m, s in zip(mean, std, strict=True)]  # fmt: skip
    g0, g1 = torch.meshgrid(*axes, indexing="ij")
    x = torch.stack([g0, g1], dim=-1).reshape(1, -1, 1, 1, 2)
    density = gm_spectral_logprobs(gm, x, lam).exp().reshape(701, 701)
    d0, d1 = (a[1] - a[0] for a in axes)
    assert abs(float(density.sum() * d0 * d1) - 1) < 1e-4
    marginal = density.sum(dim=1) * d1  # of pixel 0
    cdf = torch.cumsum(marginal, 0) * d0
    draws = spectral_sample(_expand(gm, N_MC), lam.expand(N_MC, 1, 1, 2), generator)[:, 0, 0, 0]
    grid_cdf = lambda t: np.interp(t, axes[0].numpy() + float(d0) / 2, cdf.numpy())  # noqa: E731
    assert stats.kstest(draws.numpy(), grid_cdf).pvalue > 1e-3
    # and the pixels are correlated (λ is not flat), so this is not the per-pixel density
    white = gm_spectral_logprobs(gm, x).exp().reshape(701, 701)
    assert (density - white).abs().max() > 0.05 * density.max()


def test_spectral_logprob_checks_its_spectrum(random_gm, generator):
    gm = random_gm(2, 2, 3, 3, batch=(1,))
    x = torch.randn(1, 2, 2, 3, 3, generator=generator, dtype=F64)
    lam = torch.randn(1, 2, 3, 3, generator=generator, dtype=F64)
    torch.testing.assert_close(
        gm_spectral_logprobs(gm, x, power_spectrum=lam), gm_spectral_logprobs(gm, x, lam)
    )
    with pytest.raises(ValueError, match="pass the log power spectrum once"):
        gm_spectral_logprobs(gm, x, lam, power_spectrum=lam)
    with pytest.raises(ValueError, match=r"\(\.\.\., C, H, W\)"):
        gm_spectral_logprobs(gm, x, lam[..., :2])
