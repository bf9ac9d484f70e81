"""The flow path and its transitions (spec 1, 3; oracles 1-4, 25, 26; vectors 45, 47-48)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from gmflow.flow import (
    add_noise,
    forward_transition,
    posterior_condition,
    posterior_mean,
    reverse_transition,
    reverse_transition_coefs,
    u_to_x0,
    velocity_target,
    velocity_to_x0,
    x0_to_u,
    x0_to_velocity,
)
from gmflow.gm import GaussianMixture, IsoGaussian, gm_mul_iso_gaussian, gm_to_iso_gaussian

F64 = torch.float64


def exact_x0_posterior(
    data_means: torch.Tensor, data_logweights: torch.Tensor, v0: float, x_t: torch.Tensor, sigma
) -> GaussianMixture:
    """p(x0 | x_t) by Bayes for data Σ_k A_k N(m_k, v0 I) and x_t | x0 ~ N(α x0, σ² I).

    data_means (K, C, H, W), data_logweights (K, 1, H, W), x_t (B, C, H, W), sigma float or (B,).
    Posterior: K-GM with variance (1/v0 + α²/σ²)⁻¹, means var·(m_k/v0 + α x_t/σ²), weights
    ∝ A_k N(x_t; α m_k, (α² v0 + σ²) I).
    """
    s = torch.as_tensor(sigma, dtype=F64).reshape(-1, 1, 1, 1, 1)
    a = 1 - s
    var = 1 / (1 / v0 + a**2 / s**2)  # (B|1, 1, 1, 1, 1)
    x = x_t.unsqueeze(1)  # (B, 1, C, H, W)
    means = var * (data_means / v0 + a * x / s**2)
    evidence = -0.5 * (x - a * data_means).square().sum(2, keepdim=True) / (a**2 * v0 + s**2)
    logweights = torch.log_softmax(data_logweights + evidence, dim=1)
    logstds = (0.5 * torch.log(var)).expand(x_t.shape[0], 1, 1, 1, 1)
    return GaussianMixture(means, logweights, logstds)


def test_path_identities_recover_data_and_noise(generator):
    x0 = torch.randn(4, 3, 2, 2, generator=generator, dtype=F64)
    noise = torch.randn(4, 3, 2, 2, generator=generator, dtype=F64)
    sigma = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=F64)
    x_t = add_noise(x0, noise, sigma)
    u = velocity_target(x0, noise)
    s = sigma.reshape(-1, 1, 1, 1)
    assert_close(x_t - s * u, x0, rtol=0, atol=1e-15)
    assert_close(x_t + (1 - s) * u, noise, rtol=0, atol=1e-15)
    assert_close(velocity_to_x0(u, x_t, sigma), x0, rtol=0, atol=1e-15)
    assert_close(x0_to_velocity(x0, x_t, sigma)[1:], u[1:])


def test_forward_transition_gives_the_marginal(generator):
    n = 400_000
    x0 = torch.randn(n, 1, 1, 1, generator=generator, dtype=F64)
    sigma_s, sigma_t = 0.35, 0.8
    x_s = add_noise(x0, torch.randn(x0.shape, generator=generator, dtype=F64), sigma_s)
    x_t = forward_transition(
        x_s, sigma_s, sigma_t, torch.randn(x0.shape, generator=generator, dtype=F64)
    )
    resid = x_t - (1 - sigma_t) * x0
    # residual ~ N(0, σ_t²): 5 standard errors of the mean (σ_t/√n) and the variance (σ_t²√(2/n))
    assert abs(resid.mean().item()) < 5 * sigma_t / math.sqrt(n)
    assert abs(resid.var().item() - sigma_t**2) < 5 * sigma_t**2 * math.sqrt(2 / n)
    # σ_s = 0: the transition is the marginal itself
    noise = torch.randn(x0.shape, generator=generator, dtype=F64)
    assert_close(forward_transition(x0, 0.0, sigma_t, noise), add_noise(x0, noise, sigma_t))


def test_reverse_transition_coefs_match_the_marginals(generator):
    sigma = torch.rand(200, generator=generator, dtype=F64) * 0.98 + 0.01
    sigma_to = sigma * torch.rand(200, generator=generator, dtype=F64)
    c1, c2, c3 = reverse_transition_coefs(sigma, sigma_to)
    assert_close(c1 * (1 - sigma) + c2, 1 - sigma_to)
    assert_close(c1**2 * sigma**2 + c3, sigma_to**2)
    assert bool((c3 >= 0).all())


@pytest.mark.parametrize("sigma", [0.0, 0.4, 1.0])
def test_reverse_transition_coefs_endpoints(sigma):
    assert [float(c) for c in reverse_transition_coefs(sigma, sigma)] == [1.0, 0.0, 0.0]
    assert [float(c) for c in reverse_transition_coefs(sigma, 0.0)] == (
        [1.0, 0.0, 0.0] if sigma == 0 else [0.0, 1.0, 0.0]
    )


@pytest.mark.parametrize(
    ("sigma", "sigma_to", "expected"),
    [
        (0.7, 0.3, (0.07871720, 0.67638484, 0.08696377)),
        (1.0, 0.5, (0.0, 0.5, 0.25)),
        (0.5, 0.0, (0.0, 1.0, 0.0)),
        (0.25, 0.125, (0.21428571, 0.71428571, 0.01275510)),
    ],
)
def test_reverse_transition_coefs_numeric_vectors(sigma, sigma_to, expected):
    got = torch.stack(reverse_transition_coefs(sigma, sigma_to))
    assert_close(got, torch.tensor(expected, dtype=F64), rtol=0, atol=5e-9)


def test_reverse_transition_coefs_are_recovered_by_regression(generator):
    """Regress x_low on (x_high, x0) for simulated pairs: slopes (c1, c2), residual variance c3."""
    n, sigma, sigma_to = 200_000, 0.8, 0.45
    x0 = 1.5 * torch.randn(n, generator=generator, dtype=F64)
    x_low = (1 - sigma_to) * x0 + sigma_to * torch.randn(n, generator=generator, dtype=F64)
    x_high = forward_transition(
        x_low.reshape(n, 1, 1, 1),
        sigma_to,
        sigma,
        torch.randn(n, 1, 1, 1, generator=generator, dtype=F64),
    ).flatten()
    design = torch.stack([x_high, x0], dim=1)
    coef = torch.linalg.lstsq(design, x_low.unsqueeze(1)).solution.flatten()
    resid = x_low - design @ coef
    c1, c2, c3 = reverse_transition_coefs(sigma, sigma_to)
    se = (
        resid.var() * torch.linalg.inv(design.T @ design).diagonal()
    ).sqrt()  # OLS standard errors
    assert bool(((coef - torch.stack([c1, c2])).abs() < 5 * se).all()), (coef, c1, c2, se)
    assert abs(resid.var().item() - c3.item()) < 5 * c3.item() * math.sqrt(2 / n)


def test_reverse_transition_coefs_reject_moving_towards_noise():
    with pytest.raises(ValueError, match="sigma_to must be <= sigma"):
        reverse_transition_coefs(0.3, 0.5)


def test_u_to_x0_maps_moments_and_round_trips(random_gm, generator):
    gm_u = random_gm(3, 2, 4, 4, batch=(3,))
    x_t = torch.randn(3, 2, 4, 4, generator=generator, dtype=F64)
    sigma = torch.tensor([0.2, 0.6, 1.0], dtype=F64)
    gm_x0 = u_to_x0(gm_u, x_t, sigma)
    s = sigma.reshape(-1, 1, 1, 1)
    iso_u, iso_x0 = gm_to_iso_gaussian(gm_u), gm_to_iso_gaussian(gm_x0)
    assert_close(iso_x0.mean, x_t - s * iso_u.mean)
    assert_close(iso_x0.var, s**2 * iso_u.var)
    assert_close(gm_x0.logstds.exp(), s.unsqueeze(1) * gm_u.logstds.exp())
    assert torch.equal(gm_x0.logweights, gm_u.logweights)
    back = x0_to_u(gm_x0, x_t, sigma)
    assert_close(back.means, gm_u.means)
    assert_close(back.logstds, gm_u.logstds)


def test_u_to_x0_log_density_changes_by_c_log_sigma(random_gm, generator, ref_gm_logprob):
    gm_u = random_gm(3, 4, 1, 1, batch=(2,))
    x_t = torch.randn(2, 4, 1, 1, generator=generator, dtype=F64)
    sigma = torch.tensor([0.3, 0.9], dtype=F64)
    u = torch.randn(2, 5, 4, 1, 1, generator=generator, dtype=F64)
    x0 = x_t.unsqueeze(1) - sigma.reshape(-1, 1, 1, 1, 1) * u
    lp_x0 = ref_gm_logprob(u_to_x0(gm_u, x_t, sigma), x0)
    lp_u = ref_gm_logprob(gm_u, u)
    assert_close(lp_x0, lp_u - 4 * torch.log(sigma).reshape(-1, 1, 1, 1))


def _vector_gm() -> GaussianMixture:
    """The GM of numeric vectors 46-48: K = 2, C = 2, one pixel, s = 0.5."""
    means = torch.tensor([[1.0, -0.5], [-0.3, 0.8]], dtype=F64).reshape(1, 2, 2, 1, 1)
    logweights = torch.tensor([0.3, 0.7], dtype=F64).log().reshape(1, 2, 1, 1, 1)
    return GaussianMixture(means, logweights, torch.full((1, 1, 1, 1, 1), math.log(0.5), dtype=F64))


def _pix(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=F64).reshape(1, len(v), 1, 1)


def test_u_to_x0_numeric_vector():
    gm_x0 = u_to_x0(_vector_gm(), _pix(0.3, -0.4), 0.6)
    expected = torch.tensor([[-0.3, -0.1], [0.48, -0.88]], dtype=F64)
    assert_close(gm_x0.means.reshape(2, 2), expected, rtol=0, atol=1e-12)
    assert_close(gm_x0.logstds.exp().item(), 0.3, rtol=0, atol=1e-12)
    assert torch.equal(gm_x0.logweights, _vector_gm().logweights)


def test_reverse_transition_is_the_ddpm_posterior_of_the_x0_gm(random_gm, generator):
    """Moments of x_to = c1 x + c2 x0 + sqrt(c3) z, x0 ~ x0-GM, equal the transition GM's (MC)."""
    gm_u = random_gm(3, 2, 1, 1, batch=(1,))
    x_t = torch.randn(1, 2, 1, 1, generator=generator, dtype=F64)
    sigma, sigma_to, n = 0.7, 0.3, 400_000
    gm_x0 = u_to_x0(gm_u, x_t, sigma)
    from gmflow.gm import gm_to_sample

    x0 = gm_to_sample(gm_x0, n, generator=generator)  # (1, n, 2, 1, 1)
    c1, c2, c3 = reverse_transition_coefs(sigma, sigma_to)
    z = torch.randn(x0.shape, generator=generator, dtype=F64)
    x_to = c1 * x_t.unsqueeze(1) + c2 * x0 + c3.sqrt() * z
    iso = gm_to_iso_gaussian(reverse_transition(gm_u, x_t, sigma, sigma_to))
    mean_mc, var_mc = x_to.mean(1), x_to.var(1).mean(1, keepdim=True)  # channel-averaged variance
    assert_close(mean_mc, iso.mean, rtol=0, atol=5 * math.sqrt(iso.var.item() / n))
    assert_close(var_mc, iso.var, rtol=5 * math.sqrt(2 / n) * 2, atol=0)


def test_reverse_transition_to_zero_is_the_x0_gm(random_gm, generator):
    gm_u = random_gm(4, 2, 2, 2, batch=(2,))
    x_t = torch.randn(2, 2, 2, 2, generator=generator, dtype=F64)
    sigma = torch.tensor([1e-7, 0.6], dtype=F64)
    trans = reverse_transition(gm_u, x_t, sigma, torch.zeros(2, dtype=F64))
    gm_x0 = u_to_x0(gm_u, x_t, sigma)
    assert_close(trans.means, gm_x0.means, rtol=0, atol=1e-15)
    assert_close(trans.logstds, gm_u.logstds + torch.log(sigma).reshape(-1, 1, 1, 1, 1))


@pytest.mark.parametrize(
    ("sigma", "sigma_to", "per_component_std"),
    [
        (0.7, 0.3, False),
        (1.0, 0.0, True),
        # one level per sample, σ = 1 and σ_to = 0 included
        ([1.0, 0.6, 0.3, 0.05], [0.5, 0.2, 0.0, 0.01], False),
        ([0.9, 0.45, 1e-3, 0.8], [0.1, 0.3, 5e-4, 0.0], True),
    ],
)
def test_reverse_transition_of_the_x0_gm_equals_the_u_form(
    random_gm, generator, sigma, sigma_to, per_component_std
):
    """prediction_type='x0' on u_to_x0(gm_u) gives the u-form's GM: means, stds and weights.

    (σ_to = σ is left out: both forms then return a zero-width std as log(tiny), off by log σ.)
    """
    batch = len(sigma) if isinstance(sigma, list) else 2
    gm_u = random_gm(3, 2, 2, 2, batch=(batch,), per_component_std=per_component_std)
    x_t = torch.randn(batch, 2, 2, 2, generator=generator, dtype=F64)
    if isinstance(sigma, list):
        sigma, sigma_to = torch.tensor(sigma, dtype=F64), torch.tensor(sigma_to, dtype=F64)
    want = reverse_transition(gm_u, x_t, sigma, sigma_to)
    got = reverse_transition(u_to_x0(gm_u, x_t, sigma), x_t, sigma, sigma_to, prediction_type="x0")
    assert_close(got.means, want.means, rtol=0, atol=1e-14)
    assert_close(got.logstds, want.logstds, rtol=0, atol=1e-13)
    assert torch.equal(got.logweights, want.logweights)
    assert want.means.shape == (batch, 3, 2, 2, 2)
    # and the default is prediction_type='u'
    default = reverse_transition(gm_u, x_t, sigma, sigma_to, prediction_type="u")
    assert torch.equal(default.means, want.means) and torch.equal(default.logstds, want.logstds)


def test_reverse_transition_of_an_x0_gm_to_zero_is_the_identity(random_gm, generator):
    gm_x0 = random_gm(4, 2, 2, 2, batch=(2,))
    x_t = torch.randn(2, 2, 2, 2, generator=generator, dtype=F64)
    sigma = torch.tensor([0.4, 1.0], dtype=F64)
    trans = reverse_transition(gm_x0, x_t, sigma, 0.0, prediction_type="x0")
    assert torch.equal(trans.means, gm_x0.means) and torch.equal(trans.logstds, gm_x0.logstds)


def _exact_transition(data_means, data_logweights, v0, x_t, sigma, sigma_to):
    """p(x_to | x_t) by Bayes for data Σ_k A_k N(m_k, v0 I), without the DDPM coefficients.

    Per component: prior x_to ~ N(α_to m_k, P), P = α_to² v0 + σ_to², and x_t | x_to ~ N(a x_to,
    b²) with a = α_t/α_to, b² = σ_t² − a² σ_to²; posterior variance V = (1/P + a²/b²)⁻¹, mean
    V (α_to m_k/P + a x_t/b²); weights ∝ A_k N(x_t; α_t m_k, α_t² v0 + σ_t²) (the x0 posterior's).
    Returns (means (B, K, C, H, W), variance (B, 1, 1, 1, 1), weights (B, K, 1, H, W)).
    """
    s = torch.as_tensor(sigma, dtype=F64).reshape(-1, 1, 1, 1, 1)
    s_to = torch.as_tensor(sigma_to, dtype=F64).reshape(-1, 1, 1, 1, 1)
    a_t, a_to = 1 - s, 1 - s_to
    prior_var = a_to**2 * v0 + s_to**2
    a = a_t / a_to
    b2 = s**2 - a**2 * s_to**2
    var = 1 / (1 / prior_var + a**2 / b2)
    x = x_t.unsqueeze(1)
    means = var * (a_to * data_means / prior_var + a * x / b2)
    evidence = -0.5 * (x - a_t * data_means).square().sum(2, keepdim=True) / (a_t**2 * v0 + s**2)
    weights = torch.softmax(data_logweights + evidence, dim=1)
    return means, var, weights


@pytest.mark.parametrize("num_components", [1, 3])
def test_reverse_transition_of_the_exact_x0_posterior_is_the_exact_transition(
    generator, num_components
):
    """Closed form: the x0 variant fed with the exact denoising GM gives p(x_to | x_t) exactly,
    std² = (c2 s^{x0})² + c3 included (one level per sample; σ_to = 0 is the x0 posterior)."""
    data_means, data_logweights = DATA_MEANS[:num_components], DATA_LOGWEIGHTS[:num_components]
    data_logweights = torch.log_softmax(data_logweights, dim=0)
    x_t = torch.randn(4, 2, 1, 1, generator=generator, dtype=F64)
    sigma = torch.tensor([1.0, 0.8, 0.5, 0.3], dtype=F64)
    sigma_to = torch.tensor([0.6, 0.0, 0.25, 0.01], dtype=F64)
    gm_x0 = exact_x0_posterior(data_means, data_logweights, DATA_VAR, x_t, sigma)
    got = reverse_transition(gm_x0, x_t, sigma, sigma_to, prediction_type="x0")
    means, var, weights = _exact_transition(
        data_means, data_logweights, DATA_VAR, x_t, sigma, sigma_to
    )
    assert_close(got.means, means, rtol=0, atol=1e-12)
    assert_close(torch.exp(2 * got.logstds), var, rtol=1e-12, atol=0)
    assert_close(got.logweights.exp(), weights, rtol=0, atol=1e-12)


def test_reverse_transition_of_an_x0_gaussian_matches_simulated_pairs(generator):
    """Monte Carlo, one component: simulate (x_to, x_t) from Gaussian data N(m0, v0) and regress
    x_to on x_t; the slope/intercept give the transition mean, the residual variance its std²."""
    n, m0, v0, sigma, sigma_to = 400_000, 0.7, 0.5, 0.8, 0.35
    x0 = m0 + math.sqrt(v0) * torch.randn(n, 1, 1, 1, generator=generator, dtype=F64)
    x_to = add_noise(x0, torch.randn(x0.shape, generator=generator, dtype=F64), sigma_to)
    x_t = forward_transition(
        x_to, sigma_to, sigma, torch.randn(x0.shape, generator=generator, dtype=F64)
    )
    design = torch.stack([x_t.flatten(), torch.ones(n, dtype=F64)], dim=1)
    coef = torch.linalg.lstsq(design, x_to.reshape(n, 1)).solution.flatten()
    resid_var = (x_to.flatten() - design @ coef).var().item()
    # the denoising Gaussian p(x0 | x_t) at two states, as a K = 1 x0-GM
    probe = torch.tensor([-1.0, 2.0], dtype=F64).reshape(2, 1, 1, 1)
    post_var = 1 / (1 / v0 + (1 - sigma) ** 2 / sigma**2)
    post_means = post_var * (m0 / v0 + (1 - sigma) * probe / sigma**2)
    gm_x0 = GaussianMixture(
        post_means.unsqueeze(1),
        torch.zeros(2, 1, 1, 1, 1, dtype=F64),
        torch.full((2, 1, 1, 1, 1), 0.5 * math.log(post_var), dtype=F64),
    )
    trans = reverse_transition(gm_x0, probe, sigma, sigma_to, prediction_type="x0")
    var = torch.exp(2 * trans.logstds).flatten()
    assert_close(var, torch.full_like(var, var[0].item()))  # the same std at every state
    assert abs(var[0].item() - resid_var) < 5 * resid_var * math.sqrt(2 / n)
    at = torch.stack([probe.flatten(), torch.ones(2, dtype=F64)], dim=1)
    se = (resid_var * (at @ torch.linalg.inv(design.T @ design) @ at.T).diagonal()).sqrt()
    assert bool(((trans.means.flatten() - at @ coef).abs() < 5 * se).all())


@pytest.mark.parametrize("prediction_type", ["eps", "v", "U", None])
def test_reverse_transition_rejects_an_unknown_prediction_type(random_gm, prediction_type):
    gm, x_t = random_gm(2, 1, 1, 1), torch.zeros(2, 1, 1, 1, dtype=F64)
    with pytest.raises(ValueError, match=r"prediction_type=.*expected 'u'.*or 'x0'"):
        reverse_transition(gm, x_t, 0.5, 0.2, prediction_type=prediction_type)


DATA_MEANS = torch.tensor([[-1.5, 0.5], [0.2, -1.0], [1.8, 1.2]], dtype=F64).reshape(3, 2, 1, 1)
DATA_LOGWEIGHTS = torch.tensor([0.2, 0.5, 0.3], dtype=F64).log().reshape(3, 1, 1, 1)
DATA_VAR = 0.09


@pytest.mark.parametrize(
    ("sigma_src", "sigma_t"), [(1.0, 0.6), (0.8, 0.3), (0.5, 0.02), (0.4, 0.4)]
)
def test_posterior_condition_of_the_exact_gm_is_exact(generator, sigma_src, sigma_t):
    """Oracle 25: re-conditioning the exact posterior of GM data gives the exact posterior."""
    x_src = torch.randn(5, 2, 1, 1, generator=generator, dtype=F64)
    x_t = torch.randn(5, 2, 1, 1, generator=generator, dtype=F64)
    gm_src = exact_x0_posterior(DATA_MEANS, DATA_LOGWEIGHTS, DATA_VAR, x_src, sigma_src)
    got = posterior_condition(gm_src, x_src, sigma_src, x_t, sigma_t)
    want = exact_x0_posterior(DATA_MEANS, DATA_LOGWEIGHTS, DATA_VAR, x_t, sigma_t)
    assert_close(got.means, want.means, rtol=0, atol=1e-12)
    assert_close(got.logstds, want.logstds, rtol=0, atol=1e-12)
    assert_close(got.logweights.exp(), want.logweights.exp(), rtol=0, atol=1e-12)
    want_mean = (want.logweights.exp() * want.means).sum(1)
    assert_close(
        posterior_mean(gm_src, x_src, sigma_src, x_t, sigma_t), want_mean, rtol=0, atol=1e-12
    )


def test_posterior_condition_is_the_identity_at_the_same_state(random_gm, generator):
    gm = random_gm(4, 3, 2, 2, batch=(2,))
    x = torch.randn(2, 3, 2, 2, generator=generator, dtype=F64)
    sigma = torch.tensor([0.3, 0.9], dtype=F64)
    got = posterior_condition(gm, x, sigma, x, sigma)
    assert torch.equal(got.means, gm.means) and torch.equal(got.logstds, gm.logstds)
    assert_close(got.logweights, gm.logweights, rtol=0, atol=1e-14)


def test_posterior_condition_equals_the_gaussian_ratio_form(random_gm, generator):
    """Oracle 26: ν/ζ form == GM × N(g, γ) with g, γ of the [orig] Gaussian-ratio form."""
    gm = random_gm(5, 2, 3, 3, batch=(2,))
    x_src = torch.randn(2, 2, 3, 3, generator=generator, dtype=F64)
    x_t = torch.randn(2, 2, 3, 3, generator=generator, dtype=F64)
    s_src, s_t = torch.tensor([0.9, 0.5], dtype=F64), torch.tensor([0.4, 0.1], dtype=F64)
    a_src, a_t = 1 - s_src, 1 - s_t
    b = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731
    den = b(a_t**2 * s_src**2 - a_src**2 * s_t**2)
    g_mean = (b(a_t * s_src**2) * x_t - b(a_src * s_t**2) * x_src) / den
    gamma = b(s_t**2 * s_src**2) / den
    want = gm_mul_iso_gaussian(gm, IsoGaussian(g_mean, gamma))
    got = posterior_condition(gm, x_src, s_src, x_t, s_t)
    assert_close(got.means, want.means)
    assert_close(got.logstds, want.logstds)
    assert_close(got.logweights, want.logweights)


def test_posterior_condition_numeric_vector():
    gm, x_src, x_t = _vector_gm(), _pix(0.5, -1.0), _pix(0.3, -0.4)
    got = posterior_condition(gm, x_src, 0.8, x_t, 0.6)
    tol = {"rtol": 0, "atol": 5e-9}
    expected_means = torch.tensor([[0.95324881, -0.48652932], [-0.23343899, 0.70015848]], dtype=F64)
    assert_close(got.means.reshape(2, 2), expected_means, **tol)
    assert_close(torch.exp(2 * got.logstds).item(), 0.22820919, **tol)
    assert_close(
        got.logweights.exp().flatten(), torch.tensor([0.36095349, 0.63904651], dtype=F64), **tol
    )
    mean = posterior_mean(gm, x_src, 0.8, x_t, 0.6).flatten()
    assert_close(mean, torch.tensor([0.19490011, 0.27181938], dtype=F64), **tol)
    # the intermediate ζ, ν of the vector, from both the float and the tensor path
    from gmflow.flow.path import _reconditioning_terms

    for s_src, s_t in ((0.8, 0.6), (torch.tensor(0.8, dtype=F64), torch.tensor(0.6, dtype=F64))):
        zeta, nu = _reconditioning_terms(x_src, s_src, x_t, s_t)
        assert_close(torch.as_tensor(zeta, dtype=F64).flatten()[0].item(), 0.38194444, **tol)
        assert_close(nu.flatten(), torch.tensor([0.17708333, -0.13194444], dtype=F64), **tol)


def test_per_sample_levels_equal_separate_scalar_calls(random_gm, generator):
    gm = random_gm(3, 2, 2, 2, batch=(3,))
    x_src = torch.randn(3, 2, 2, 2, generator=generator, dtype=F64)
    x_t = torch.randn(3, 2, 2, 2, generator=generator, dtype=F64)
    s_src, s_t = [1.0, 0.7, 0.3], [0.5, 0.2, 0.25]
    batched = posterior_mean(
        gm, x_src, torch.tensor(s_src, dtype=F64), x_t, torch.tensor(s_t, dtype=F64)
    )
    for i in range(3):
        one = posterior_mean(gm[i : i + 1], x_src[i : i + 1], s_src[i], x_t[i : i + 1], s_t[i])
        assert_close(batched[i : i + 1], one, rtol=0, atol=1e-14)
    trans = reverse_transition(
        gm, x_t, torch.tensor(s_src, dtype=F64), torch.tensor(s_t, dtype=F64)
    )
    one = reverse_transition(gm[1:2], x_t[1:2], s_src[1], s_t[1])
    assert_close(trans.means[1:2], one.means)
    assert_close(trans.logstds[1:2], one.logstds)


@pytest.mark.parametrize(("sigma_src", "sigma_t"), [(0.8, 0.6), (1.0, 0.3), (0.2, 1e-8)])
def test_reconditioning_float_levels_match_tensor_levels(sigma_src, sigma_t):
    """posterior_mean with Python-float levels (the sampler's fast path) = per-sample tensors."""
    from gmflow.flow.path import _reconditioning_terms

    g = torch.Generator().manual_seed(3)
    x_src, x_t = (torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64) for _ in range(2))
    s_src, s_t = (torch.full((2,), v, dtype=torch.float64) for v in (sigma_src, sigma_t))
    prec_f, lin_f = _reconditioning_terms(x_src, sigma_src, x_t, sigma_t)
    prec_t, lin_t = _reconditioning_terms(x_src, s_src, x_t, s_t)
    assert isinstance(prec_f, float)
    torch.testing.assert_close(torch.full_like(prec_t, prec_f), prec_t, rtol=1e-12, atol=0)
    torch.testing.assert_close(lin_f, lin_t, rtol=1e-12, atol=1e-9)
