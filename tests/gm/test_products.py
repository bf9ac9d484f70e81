"""Products of GMs and Gaussians (spec 16, oracles 12-17, 26 and numeric vector 47), in fp64.

The main oracle is the pointwise product: a normalised product of densities has
log GM'(x) − log GM(x) − log N(x) constant in x, checked with reference densities from
``torch.distributions`` (which share no code with ``gmflow.gm``).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from gm_cases import random_spd
from torch.testing import assert_close

from gmflow.gm import (
    FullGaussianMixture,
    Gaussian,
    GaussianMixture,
    IsoGaussian,
    gaussian_mul_gaussian,
    gm_condition,
    gm_condition_mean,
    gm_mul_gaussian,
    gm_mul_gm,
    gm_mul_iso_gaussian,
    gm_to_mean,
    iso_gaussian_mul_iso_gaussian,
)

f64 = torch.float64
SHAPES = list(itertools.product([1, 3, 8], [1, 2, 4], [1, 4]))  # (K, C, H = W)
TOL = {"rtol": 1e-10, "atol": 1e-10}


def random_iso(C: int, HW: int, batch: int = 2) -> IsoGaussian:
    """N(m, v I) with m ~ N(0, 1) per pixel and one v in [0.1, 2] per sample."""
    return IsoGaussian(
        torch.randn(batch, C, HW, HW, dtype=f64), 0.1 + 1.9 * torch.rand(batch, 1, 1, 1, dtype=f64)
    )


def points(gm: GaussianMixture, n: int = 8) -> torch.Tensor:
    """n random points per pixel around the mixture, (..., n, C, H, W)."""
    return gm_to_mean(gm).unsqueeze(-4) + torch.randn(
        *gm.batch_shape, n, *gm.means.shape[-3:], dtype=f64
    )


def iso_logprob(g: IsoGaussian, x: torch.Tensor) -> torch.Tensor:
    """Reference log N(x; m, v I) per pixel via torch.distributions: (..., n, H, W)."""
    normal = torch.distributions.Normal(g.mean.unsqueeze(-4), g.var.sqrt().unsqueeze(-4))
    return normal.log_prob(x).sum(-3)


def full_logprob(mean: torch.Tensor, cov: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reference log N(x; mean (..., H, W, C), cov (..., H, W, C, C)) per pixel: (..., n, H, W)."""
    mvn = torch.distributions.MultivariateNormal(mean, cov)
    return mvn.log_prob(x.movedim(-3, -1).movedim(-4, 0)).movedim(0, -3)


def full_gm_logprob(fgm: FullGaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """Reference log-density of a full-covariance GM for x (..., n, C, H, W) -> (..., n, H, W)."""
    means = fgm.means.movedim(-4, -2)  # (..., H, W, K, C)
    covs = fgm.covs.movedim(-5, -3).expand(*means.shape, means.shape[-1])
    mix = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=fgm.logweights.movedim(-3, -1)),
        torch.distributions.MultivariateNormal(means, covs),
    )
    return mix.log_prob(x.movedim(-3, -1).movedim(-4, 0)).movedim(0, -3)


def assert_constant_in_x(diff: torch.Tensor) -> None:
    """Oracle 12's criterion: the log-density difference (..., n, H, W) is constant over n."""
    assert float(diff.std(dim=-3).max()) < 1e-8, diff.std(dim=-3).max()


# ---- gm_mul_iso_gaussian (oracles 12, 13, 15) ----


@pytest.mark.parametrize("per_component_std", [False, True])
@pytest.mark.parametrize(("K", "C", "HW"), SHAPES)
def test_gm_mul_iso_gaussian_is_the_normalised_pointwise_product(
    random_gm, ref_gm_logprob, K, C, HW, per_component_std
):
    gm, g = random_gm(K, C, HW, HW, per_component_std=per_component_std), random_iso(C, HW)
    out = gm_mul_iso_gaussian(gm, g)
    assert out.logstds.shape == gm.logstds.shape  # a shared std stays one per sample
    x = points(gm)
    assert_constant_in_x(ref_gm_logprob(out, x) - ref_gm_logprob(gm, x) - iso_logprob(g, x))


@pytest.mark.parametrize(("C", "HW"), [(1, 1), (4, 4)])
def test_gm_mul_iso_gaussian_of_one_gaussian_adds_precisions(random_gm, C, HW):
    gm, g = random_gm(1, C, HW, HW), random_iso(C, HW)
    out = gm_mul_iso_gaussian(gm, g)
    s2, v = torch.exp(2 * gm.logstds[:, 0]), g.var  # (2, 1, 1, 1)
    prec = 1 / s2 + 1 / v
    assert_close(torch.exp(2 * out.logstds[:, 0]), 1 / prec, **TOL)
    assert_close(out.means[:, 0], (gm.means[:, 0] / s2 + g.mean / v) / prec, **TOL)
    assert_close(out.logweights, torch.zeros_like(out.logweights), **TOL)


@pytest.mark.parametrize("per_component_std", [False, True])
@pytest.mark.parametrize(("K", "C", "HW"), SHAPES)
def test_dividing_by_a_gaussian_undoes_multiplying_by_it(random_gm, K, C, HW, per_component_std):
    gm, g = random_gm(K, C, HW, HW, per_component_std=per_component_std), random_iso(C, HW)
    back = gm_mul_iso_gaussian(gm_mul_iso_gaussian(gm, g, 1, 1), g, 1, -1)
    assert_close(back.means, gm.means, **TOL)
    assert_close(back.logstds, gm.logstds, **TOL)
    assert_close(back.logweights, gm.logweights, **TOL)


@pytest.mark.parametrize(("gm_power", "g_power"), [(1.0, 0.5), (2.0, 1.0), (0.5, -0.2)])
def test_gm_mul_iso_gaussian_with_powers_multiplies_by_n_of_var_over_rho(
    random_gm, gm_power, g_power
):
    gm, g = random_gm(3, 2, 4, 4), random_iso(2, 4)
    rho = g_power / gm_power
    out = gm_mul_iso_gaussian(gm, g, gm_power, g_power)
    # the product with N(m, v/ρ); for ρ < 0, the quotient by N(m, −v/ρ)
    ref = gm_mul_iso_gaussian(
        gm, IsoGaussian(g.mean, g.var / abs(rho)), 1.0, math.copysign(1.0, rho)
    )
    for a, b in zip(
        (out.means, out.logweights, out.logstds),
        (ref.means, ref.logweights, ref.logstds),
        strict=True,
    ):
        assert_close(a, b, **TOL)


# ---- iso and full Gaussian products (oracles 16, 17) ----


@pytest.mark.parametrize(("p1", "p2"), [(1.0, 1.0), (0.5, 2.0), (1.0, -0.4)])
def test_iso_gaussian_mul_iso_gaussian_adds_powered_precisions(p1, p2):
    g1, g2 = random_iso(3, 4), random_iso(3, 4)
    g2 = IsoGaussian(g2.mean, g2.var + 2.0)  # keeps p1/v1 + p2/v2 > 0
    out = iso_gaussian_mul_iso_gaussian(g1, g2, p1, p2)
    prec = p1 / g1.var + p2 / g2.var
    assert_close(out.var, 1 / prec, **TOL)
    assert_close(out.mean, (p1 * g1.mean / g1.var + p2 * g2.mean / g2.var) / prec, **TOL)


def test_iso_gaussian_quotient_of_guidance_pair_has_the_spec_closed_form():
    # oracle 16: N(μ_c + b, v(1 − w²)) / N(μ_c, v) = N(μ_c + b/w², v(1 − w²)/w²)
    mu_c, b = torch.randn(2, 4, 4, 4, dtype=f64), torch.randn(2, 4, 4, 4, dtype=f64)
    v, w = 0.1 + torch.rand(2, 1, 1, 1, dtype=f64), 0.6
    out = iso_gaussian_mul_iso_gaussian(
        IsoGaussian(mu_c + b, v * (1 - w**2)), IsoGaussian(mu_c, v), 1, -1
    )
    assert_close(out.var, v * (1 - w**2) / w**2, **TOL)
    assert_close(out.mean, mu_c + b / w**2, **TOL)


@pytest.mark.parametrize(("p1", "p2"), [(1.0, 1.0), (0.7, 1.5)])
def test_gaussian_mul_gaussian_is_the_powered_pointwise_product(p1, p2):
    m1, m2 = torch.randn(2, 4, 4, 3, dtype=f64), torch.randn(2, 4, 4, 3, dtype=f64)
    c1, c2 = random_spd(2, 4, 4, C=3), random_spd(2, 4, 4, C=3)
    out = gaussian_mul_gaussian(Gaussian(m1, c1), Gaussian(m2, c2), p1, p2)
    x = torch.randn(2, 8, 3, 4, 4, dtype=f64)
    diff = (
        full_logprob(out.mean, out.cov, x)
        - p1 * full_logprob(m1, c1, x)
        - p2 * full_logprob(m2, c2, x)
    )
    assert_constant_in_x(diff)


def test_gaussian_mul_gaussian_with_scaled_identities_equals_the_iso_product():
    g1, g2 = random_iso(2, 4), random_iso(2, 4)
    eye = torch.eye(2, dtype=f64)

    def full(g: IsoGaussian) -> Gaussian:
        return Gaussian(
            g.mean.movedim(-3, -1), g.var.squeeze(-3)[..., None, None].expand(2, 4, 4, 2, 2) * eye
        )

    out = gaussian_mul_gaussian(full(g1), full(g2), 0.8, 1.3)
    iso = iso_gaussian_mul_iso_gaussian(g1, g2, 0.8, 1.3)
    assert_close(out.mean, iso.mean.movedim(-3, -1), **TOL)
    assert_close(out.cov, (iso.var.squeeze(-3)[..., None, None] * eye).expand_as(out.cov), **TOL)


# ---- gm_mul_gaussian (oracle 15) ----


@pytest.mark.parametrize("per_component_std", [False, True])
@pytest.mark.parametrize(("K", "C", "HW"), SHAPES)
def test_gm_mul_gaussian_with_isotropic_cov_equals_gm_mul_iso_gaussian(
    random_gm, K, C, HW, per_component_std
):
    gm, g = random_gm(K, C, HW, HW, per_component_std=per_component_std), random_iso(C, HW)
    eye = torch.eye(C, dtype=f64)
    cov = g.var[..., None].expand(2, HW, HW, 1, 1) * eye
    out = gm_mul_gaussian(gm, Gaussian(g.mean.movedim(-3, -1), cov), 2.0, 1.4)
    ref = gm_mul_iso_gaussian(gm, g, 2.0, 1.4)
    assert_close(out.means, ref.means.movedim(-3, -1), **TOL)
    assert_close(out.logweights, ref.logweights.squeeze(-3), **TOL)
    s2 = torch.exp(2 * ref.logstds).squeeze(-3)[..., None, None]  # (2, 1|K, 1, 1, 1, 1)
    assert_close(out.covs, (s2 * eye).expand_as(out.covs), **TOL)


@pytest.mark.parametrize("per_component_std", [False, True])
@pytest.mark.parametrize(("K", "C", "HW"), [(1, 2, 1), (3, 4, 4), (8, 2, 4)])
def test_gm_mul_gaussian_is_the_pointwise_product_with_n_of_cov_over_rho(
    random_gm, K, C, HW, per_component_std
):
    gm = random_gm(K, C, HW, HW, per_component_std=per_component_std)
    mean, cov = torch.randn(2, HW, HW, C, dtype=f64), random_spd(2, HW, HW, C=C)
    gm_power, g_power = 1.5, 0.6
    out = gm_mul_gaussian(gm, Gaussian(mean, cov), gm_power, g_power)
    x = points(gm)
    target = full_logprob(mean, cov * gm_power / g_power, x)
    assert_constant_in_x(full_gm_logprob(out, x) - full_gm_logprob_of_iso(gm, x) - target)


def full_gm_logprob_of_iso(gm: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    c = gm.num_channels
    s2 = torch.exp(2 * gm.logstds).squeeze(-3)[..., None, None]
    covs = s2 * torch.eye(c, dtype=f64).expand(*gm.means.shape[-2:], c, c)
    return full_gm_logprob(
        FullGaussianMixture(gm.means.movedim(-3, -1), covs, gm.logweights.squeeze(-3)), x
    )


# ---- gm_mul_gm (oracle 14) ----


@pytest.mark.parametrize("per_component_std", [False, True])
@pytest.mark.parametrize(("K", "C", "HW"), SHAPES)
def test_gm_mul_gm_is_the_normalised_pointwise_product(
    random_gm, ref_gm_logprob, K, C, HW, per_component_std
):
    gm1 = random_gm(K, C, HW, HW, per_component_std=per_component_std)
    gm2 = random_gm(3, C, HW, HW)
    out = gm_mul_gm(gm1, gm2)
    assert out.num_gaussians == 3 * K
    assert out.logstds.shape[-4] == (3 * K if per_component_std and K > 1 else 1)
    x = points(gm1)
    assert_constant_in_x(ref_gm_logprob(out, x) - ref_gm_logprob(gm1, x) - ref_gm_logprob(gm2, x))


def test_gm_mul_gm_is_commutative_up_to_the_component_order(random_gm):
    gm1, gm2 = random_gm(3, 2, 4, 4, per_component_std=True), random_gm(2, 2, 4, 4)
    a, b = gm_mul_gm(gm1, gm2), gm_mul_gm(gm2, gm1)
    perm = [j * 3 + i for i in range(3) for j in range(2)]  # pair (i, j) sits at i·K2 + j in a
    assert_close(a.means, b.means[:, perm], **TOL)
    assert_close(a.logweights, b.logweights[:, perm], **TOL)
    assert_close(a.logstds, b.logstds[:, perm], **TOL)


# ---- gm_condition (spec 3.5; oracle 26, vector 47) ----


def posterior_conversion(alpha_src, sigma_src, x_src, alpha_t, sigma_t, x_t):
    """ζ = (α_t/σ_t)² − (α_src/σ_src)², ν = α_t x_t/σ_t² − α_src x_src/σ_src² (spec 3.5)."""
    zeta = (alpha_t / sigma_t) ** 2 - (alpha_src / sigma_src) ** 2
    return zeta, alpha_t * x_t / sigma_t**2 - alpha_src * x_src / sigma_src**2


def random_conversion(C: int, HW: int):
    sigma_src = 0.5 + 0.4 * torch.rand(2, 1, 1, 1, dtype=f64)
    sigma_t = sigma_src * (0.2 + 0.7 * torch.rand(2, 1, 1, 1, dtype=f64))
    x_src, x_t = torch.randn(2, C, HW, HW, dtype=f64), torch.randn(2, C, HW, HW, dtype=f64)
    return (1 - sigma_src, sigma_src, x_src, 1 - sigma_t, sigma_t, x_t)


@pytest.mark.parametrize(("K", "C", "HW"), SHAPES)
def test_gm_condition_equals_the_gaussian_ratio_form(random_gm, K, C, HW):
    gm = random_gm(K, C, HW, HW)
    a_src, s_src, x_src, a_t, s_t, x_t = random_conversion(C, HW)
    zeta, nu = posterior_conversion(a_src, s_src, x_src, a_t, s_t, x_t)
    denom = a_t**2 * s_src**2 - a_src**2 * s_t**2
    g = ((a_t * s_src**2 * x_t - a_src * s_t**2 * x_src) / denom).unsqueeze(1)  # ratio mean
    gamma = (s_t**2 * s_src**2 / denom).unsqueeze(1)  # ratio variance (1, 1, 1, 1, 1) per sample
    s2 = torch.exp(2 * gm.logstds)
    means = (gamma * gm.means + s2 * g) / (gamma + s2)
    logw = torch.log_softmax(
        gm.logweights - (gm.means - g).square().sum(-3, keepdim=True) / (2 * (gamma + s2)), -4
    )
    out = gm_condition(gm, zeta, nu)
    assert_close(out.means, means, **TOL)
    assert_close(out.logweights, logw, **TOL)
    assert_close(torch.exp(2 * out.logstds), s2 * gamma / (gamma + s2), **TOL)


@pytest.mark.parametrize("per_component_std", [False, True])
@pytest.mark.parametrize(("K", "C", "HW"), SHAPES)
def test_gm_condition_is_the_normalised_pointwise_product(
    random_gm, ref_gm_logprob, K, C, HW, per_component_std
):
    gm = random_gm(K, C, HW, HW, per_component_std=per_component_std)
    zeta, nu = posterior_conversion(*random_conversion(C, HW))
    out = gm_condition(gm, zeta, nu)
    x = points(gm)
    log_factor = -0.5 * zeta * x.square().sum(-3) + (nu.unsqueeze(1) * x).sum(-3)
    assert_constant_in_x(ref_gm_logprob(out, x) - ref_gm_logprob(gm, x) - log_factor)


@pytest.mark.parametrize("per_component_std", [False, True])
@pytest.mark.parametrize(("K", "C", "HW"), list(itertools.product([1, 3, 8], [1, 4], [1, 4])))
def test_gm_condition_mean_is_the_mean_of_gm_condition(
    gm_backend, random_gm, K, C, HW, per_component_std
):
    gm = random_gm(K, C, HW, HW, per_component_std=per_component_std)
    zeta, nu = posterior_conversion(*random_conversion(C, HW))
    assert_close(gm_condition_mean(gm, zeta, nu), gm_to_mean(gm_condition(gm, zeta, nu)), **TOL)


def test_gm_condition_with_a_python_float_precision_keeps_fp64_accuracy(gm_backend, random_gm):
    gm, nu = random_gm(3, 2, 4, 4), torch.randn(2, 2, 4, 4, dtype=f64)
    zeta = 0.38194444444444
    ref = gm_condition(gm, torch.tensor(zeta, dtype=f64), nu)
    out = gm_condition(gm, zeta, nu)
    assert_close(out.means, ref.means, rtol=1e-14, atol=1e-14)
    assert_close(gm_condition_mean(gm, zeta, nu), gm_to_mean(ref), rtol=1e-14, atol=1e-14)


def test_gm_condition_with_zero_precision_and_linear_term_is_the_identity(random_gm):
    gm = random_gm(8, 4, 4, 4, per_component_std=True)
    out = gm_condition(gm, 0.0, torch.zeros(2, 4, 4, 4, dtype=f64))
    for a, b in zip(
        (out.means, out.logweights, out.logstds), (gm.means, gm.logweights, gm.logstds), strict=True
    ):
        assert_close(a, b, **TOL)


def test_numeric_vector_47_posterior_conversion(gm_backend):
    means = torch.tensor([[1.0, -0.5], [-0.3, 0.8]], dtype=f64).reshape(1, 2, 2, 1, 1)
    logweights = torch.tensor([0.3, 0.7], dtype=f64).log().reshape(1, 2, 1, 1, 1)
    gm = GaussianMixture(means, logweights, torch.full((1, 1, 1, 1, 1), math.log(0.5), dtype=f64))
    x_src = torch.tensor([0.5, -1.0], dtype=f64).reshape(1, 2, 1, 1)
    x_t = torch.tensor([0.3, -0.4], dtype=f64).reshape(1, 2, 1, 1)
    zeta, nu = posterior_conversion(0.2, 0.8, x_src, 0.4, 0.6, x_t)
    tol = {"rtol": 0, "atol": 1e-8}
    assert_close(torch.tensor(zeta, dtype=f64), torch.tensor(0.38194444, dtype=f64), **tol)
    assert_close(nu.flatten(), torch.tensor([0.17708333, -0.13194444], dtype=f64), **tol)
    out = gm_condition(gm, zeta, nu)
    expected_means = torch.tensor([[0.95324881, -0.48652932], [-0.23343899, 0.70015848]], dtype=f64)
    assert_close(out.means.reshape(2, 2), expected_means, **tol)
    assert_close(torch.exp(2 * out.logstds).flatten(), torch.tensor([0.22820919], dtype=f64), **tol)
    assert_close(
        out.logweights.exp().flatten(), torch.tensor([0.36095349, 0.63904651], dtype=f64), **tol
    )
    mean = torch.tensor([0.19490011, 0.27181938], dtype=f64)
    assert_close(gm_condition_mean(gm, zeta, nu).flatten(), mean, **tol)


# ---- autograd ----


def _tiny(seed: int, K: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1, K, 2, 2, 1), (1, K, 1, 2, 1), (1, K, 1, 1, 1)]
    return [torch.randn(*s, dtype=f64, generator=gen).mul(0.5).requires_grad_() for s in shapes]


def test_products_are_differentiable():
    gm_p, gm2_p = _tiny(1), _tiny(2)
    mean = torch.randn(1, 2, 2, 1, dtype=f64, requires_grad=True)
    var = (0.5 + torch.rand(1, 1, 1, 1, dtype=f64)).requires_grad_()
    zeta = torch.full((1, 1, 1, 1), 0.7, dtype=f64, requires_grad=True)
    cov = random_spd(1, 2, 1, C=2).requires_grad_()

    def mul_iso(m, lw, ls, mean, var):
        out = gm_mul_iso_gaussian(GaussianMixture(m, lw, ls), IsoGaussian(mean, var))
        return out.means, out.logweights, out.logstds

    def mul_full(m, lw, ls, mean, cov):
        out = gm_mul_gaussian(GaussianMixture(m, lw, ls), Gaussian(mean.movedim(-3, -1), cov))
        return out.means, out.covs, out.logweights

    def mul_gm(*p):
        out = gm_mul_gm(GaussianMixture(*p[:3]), GaussianMixture(*p[3:]))
        return out.means, out.logweights, out.logstds

    def cond_mean(m, lw, ls, zeta, nu):
        return gm_condition_mean(GaussianMixture(m, lw, ls), zeta, nu)

    assert torch.autograd.gradcheck(mul_iso, [*gm_p, mean, var], fast_mode=True)
    assert torch.autograd.gradcheck(mul_full, [*gm_p, mean, cov], fast_mode=True)
    assert torch.autograd.gradcheck(mul_gm, [*gm_p, *gm2_p], fast_mode=True)
    assert torch.autograd.gradcheck(cond_mean, [*gm_p, zeta, mean], fast_mode=True)
