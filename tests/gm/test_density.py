"""Log-densities, sampling and Monte-Carlo divergences.

Spec 16, oracles 10, 11, 18, 22, 23 and numeric vector 46.

Closed forms are checked in fp64 against ``torch.distributions`` and quadrature on a grid.

Monte-Carlo checks use fixed seeds and a band of 5 standard errors: every test compares tens to
hundreds of independent estimates, and at 5 SE a correct implementation fails one of ~200
comparisons with probability ~1e-4, while a wrong formula (a missing s², a wrong weight) moves
the estimate by many SE at these sample sizes. The SE is computed from the same samples or in
closed form, never tuned to the observed error.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from gmflow.gm import (
    GaussianMixture,
    IsoGaussian,
    gm_entropy,
    gm_kl_div,
    gm_logprob,
    gm_temperature,
    gm_to_sample,
    iso_gaussian_logprob,
)

SHAPES = list(itertools.product([1, 3, 8], [1, 2, 4], [1, 4]))  # (K, C, H = W)
TOL = {"rtol": 1e-10, "atol": 1e-10}
F64 = torch.float64
N_SE = 5.0


# the torch reference over the whole grid; the automatic backend (numba-cpu here) on its corners
LOGPROB_CASES = [("torch", *shape, p) for shape in SHAPES for p in (False, True)] + [
    ("auto", K, C, HW, p) for K in (1, 8) for C in (1, 4) for HW in (1, 4) for p in (False, True)
]


@pytest.mark.parametrize(("backend", "K", "C", "HW", "per_component_std"), LOGPROB_CASES)
def test_gm_logprob_matches_mixture_same_family(
    monkeypatch, random_gm, ref_gm_logprob, backend, K, C, HW, per_component_std
):
    monkeypatch.setenv("GMFLOW_GM_BACKEND", backend)
    gm = random_gm(K, C, HW, HW, per_component_std=per_component_std)
    x = gm.means[:, :1] + 2 * torch.randn(2, 5, C, HW, HW, dtype=torch.float64)
    out = gm_logprob(gm, x)
    assert out.shape == (2, 5, HW, HW)
    assert_close(out, ref_gm_logprob(gm, x), **TOL)


@pytest.mark.parametrize(("C", "HW"), [(1, 1), (3, 4)])
def test_gm_logprob_of_one_component_is_iso_gaussian_logprob(random_gm, C, HW):
    gm = random_gm(1, C, HW, HW)
    x = torch.randn(2, 7, C, HW, HW, dtype=torch.float64)
    g = IsoGaussian(gm.means[:, 0], torch.exp(2 * gm.logstds[:, 0]))
    assert_close(gm_logprob(gm, x), iso_gaussian_logprob(g, x), **TOL)


@pytest.mark.parametrize("per_pixel_var", [False, True])
def test_iso_gaussian_logprob_matches_torch_normal(per_pixel_var):
    mean = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    var = torch.rand(2, 1, 4, 4, dtype=torch.float64) + 0.1
    var = var if per_pixel_var else var[..., :1, :1]
    x = torch.randn(2, 6, 3, 4, 4, dtype=torch.float64)
    normal = torch.distributions.Normal(mean.unsqueeze(1), var.sqrt().unsqueeze(1))
    assert_close(iso_gaussian_logprob(IsoGaussian(mean, var), x), normal.log_prob(x).sum(-3), **TOL)


def _grid(gm: GaussianMixture, step: float) -> np.ndarray:
    lo = float(gm.means.min() - 10 * gm.logstds.exp().max())
    hi = float(gm.means.max() + 10 * gm.logstds.exp().max())
    return np.arange(lo, hi + step, step)


@pytest.mark.parametrize("per_component_std", [False, True])
@pytest.mark.parametrize("K", [1, 3, 8])
def test_gm_logprob_integrates_to_one_in_1d(gm_backend, random_gm, K, per_component_std):
    # The trapezoid rule on a Gaussian with step h <= s/2 has error ~exp(-2π²(s/h)²) < 1e-30.
    gm = random_gm(K, 1, 1, 1, per_component_std=per_component_std)
    grid = _grid(gm, float(gm.logstds.exp().min()) / 2)
    x = torch.from_numpy(grid).reshape(1, -1, 1, 1, 1)
    pdf = gm_logprob(gm, x).exp().squeeze(-1).squeeze(-1).numpy()  # (2, n)
    assert_close(
        torch.from_numpy(np.trapezoid(pdf, grid, axis=-1)),
        torch.ones(2, dtype=torch.float64),
        rtol=0,
        atol=1e-9,
    )


@pytest.mark.parametrize("per_component_std", [False, True])
@pytest.mark.parametrize("K", [1, 3, 8])
def test_gm_logprob_integrates_to_one_in_2d(random_gm, K, per_component_std):
    gm = random_gm(
        K, 2, 1, 1, batch=(1,), per_component_std=per_component_std, std_range=(0.1, 2.0)
    )
    grid = _grid(gm, float(gm.logstds.exp().min()) / 2)
    g = torch.from_numpy(grid)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    x = torch.stack([xx.flatten(), yy.flatten()], -1).reshape(1, -1, 2, 1, 1)
    pdf = gm_logprob(gm, x).exp().reshape(len(grid), len(grid)).numpy()
    total = np.trapezoid(np.trapezoid(pdf, grid, axis=-1), grid)
    assert abs(total - 1.0) < 1e-9


def test_numeric_vector_46_logprob(gm_backend):
    f64 = torch.float64
    means = torch.tensor([[1.0, -0.5], [-0.3, 0.8]], dtype=f64).reshape(1, 2, 2, 1, 1)
    logweights = torch.tensor([0.3, 0.7], dtype=f64).log().reshape(1, 2, 1, 1, 1)
    gm = GaussianMixture(means, logweights, torch.full((1, 1, 1, 1, 1), math.log(0.5), dtype=f64))
    x = torch.tensor([0.2, 0.1], dtype=f64).reshape(1, 1, 2, 1, 1)
    assert abs(float(gm_logprob(gm, x)) - (-2.0612858)) < 5e-8


# ---- gm_to_sample (oracles 10, 11, 22) ----


def _mixture_moments(gm: GaussianMixture) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (..., C, H, W) and covariance (..., H, W, C, C) from E[x xᵀ] = Σ A (μ μᵀ + s² I)."""
    mu = gm.means.movedim(-3, -1)
    a = gm.logweights.exp().squeeze(-3)[..., None]
    s2 = torch.exp(2 * gm.logstds).squeeze(-3)[..., None, None]
    mean = (a * mu).sum(-4)
    eye = torch.eye(gm.num_channels, dtype=gm.dtype)
    second = (a[..., None] * (mu[..., :, None] * mu[..., None, :] + s2 * eye)).sum(-5)
    return mean.movedim(-1, -3), second - mean[..., :, None] * mean[..., None, :]


@pytest.mark.parametrize(
    ("K", "C", "per_component_std"), [(1, 1, False), (3, 2, True), (8, 4, False)]
)
def test_gm_to_sample_moments_match_the_mixture(random_gm, generator, K, C, per_component_std):
    gm = random_gm(K, C, 4, 4, per_component_std=per_component_std)
    n = 4000
    x = gm_to_sample(gm, n, generator=generator)  # (2, n, C, 4, 4)
    assert x.shape == (2, n, C, 4, 4)
    mean, cov = _mixture_moments(gm)
    var = cov.diagonal(dim1=-2, dim2=-1).movedim(-1, -3)  # (2, C, 4, 4)
    # sample mean: SE = sqrt(Var[x_c] / n)
    assert (x.mean(1) - mean).abs().le(N_SE * (var / n).sqrt()).all()
    # sample covariance: SE of each entry from the spread of the centred products
    d = (x - mean.unsqueeze(1)).movedim(-3, -1)  # (2, n, 4, 4, C)
    prods = d[..., :, None] * d[..., None, :]
    se = prods.std(1) / math.sqrt(n)
    assert (prods.mean(1) - cov).abs().le(N_SE * se).all()


def _component_frequencies(gm: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """Fraction of draws x (..., n, C, H, W) nearest to each component mean: (..., K, H, W)."""
    dist = (x.unsqueeze(-4) - gm.means.unsqueeze(-5)).square().sum(-3)  # (..., n, K, H, W)
    idx = dist.argmin(-3)  # (..., n, H, W)
    k = gm.num_gaussians
    return torch.nn.functional.one_hot(idx, k).movedim(-1, -3).to(x.dtype).mean(-4)


@pytest.mark.parametrize("power", [1.0, 0.5, 2.0])
def test_gm_to_sample_component_frequencies_are_proportional_to_powered_weights(
    random_gm, generator, power
):
    # tiny s so that each draw is identified by its nearest component mean; weights no smaller
    # than ~1% so that n·p >= 10 and the normal approximation behind the SE band holds
    gm = random_gm(8, 2, 4, 4, std_range=(1e-6, 2e-6))
    gm = GaussianMixture(gm.means, torch.log_softmax(gm.logweights / 4, dim=-4), gm.logstds)
    n = 2000
    freq = _component_frequencies(gm, gm_to_sample(gm, n, power=power, generator=generator))
    a_p = gm.logweights.exp().squeeze(-3) ** power
    p = a_p / a_p.sum(-3, keepdim=True)  # (2, K, 4, 4)
    se = (p * (1 - p) / n).sqrt()  # binomial SE
    assert (freq - p).abs().le(N_SE * se + 1e-12).all()


def test_gm_to_sample_never_draws_a_zero_weight_component(monkeypatch):
    # gm_temperature with τ -> 0 gives exact zero weights; u = 0 must not select them
    means = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64).reshape(1, 4, 1, 1, 1)
    logweights = torch.tensor([2.0, 0.0, 5.0, 1.0], dtype=torch.float64).reshape(1, 4, 1, 1, 1)
    gm = gm_temperature(GaussianMixture(means, logweights, torch.zeros(1, 1, 1, 1, 1)), 1e-6)
    assert float(gm.logweights.exp()[0, 0]) == 0.0
    monkeypatch.setattr(
        torch, "rand", lambda *shape, **kw: torch.zeros(*shape, dtype=kw.get("dtype"))
    )
    monkeypatch.setattr(
        torch, "randn", lambda *shape, **kw: torch.zeros(*shape, dtype=kw.get("dtype"))
    )
    assert_close(gm_to_sample(gm, 3).flatten(), torch.full((3,), 2.0, dtype=torch.float64))


@pytest.mark.parametrize("power", [0.5, 2.0])
def test_gm_to_sample_cov_sharpen_narrows_each_component(random_gm, generator, power):
    """Well-separated components: with cov_sharpen the draws of component k have std s_k/√p."""
    means = torch.tensor([-30.0, 0.0, 30.0], dtype=F64).reshape(1, 3, 1, 1, 1).expand(1, 3, 2, 1, 1)
    logweights = torch.log(torch.tensor([0.2, 0.5, 0.3], dtype=F64)).reshape(1, 3, 1, 1, 1)
    logstds = torch.log(torch.tensor([0.5, 1.0, 2.0], dtype=F64)).reshape(1, 3, 1, 1, 1)
    gm = GaussianMixture(means, logweights, logstds)
    n = 40000
    for sharpen, scale in ((False, 1.0), (True, 1 / math.sqrt(power))):
        x = gm_to_sample(gm, n, power=power, generator=generator, cov_sharpen=sharpen)[0]
        comp = ((x[:, 0] + 45) // 30).long().flatten()  # 0, 1, 2: the nearest mean
        for k, s in enumerate((0.5, 1.0, 2.0)):
            d = (x[comp == k] - 30.0 * (k - 1)).flatten()  # both channels, one pixel
            var = float(d.square().mean())
            want = (s * scale) ** 2
            assert abs(var - want) <= N_SE * want * math.sqrt(2 / d.numel())
    with pytest.raises(ValueError, match="cov_sharpen needs power > 0"):
        gm_to_sample(gm, 2, power=0.0, cov_sharpen=True)


# ---- gm_kl_div, gm_entropy (oracle 23) ----


@pytest.mark.parametrize("per_component_std", [False, True])
def test_gm_kl_div_of_a_mixture_with_itself_is_exactly_zero(
    random_gm, generator, per_component_std
):
    gm = random_gm(3, 2, 4, 4, per_component_std=per_component_std)
    kl = gm_kl_div(gm, gm, n=16, generator=generator)
    assert kl.shape == (2, 1, 4, 4)
    assert torch.equal(kl, torch.zeros_like(kl))


def _kl_and_se(
    p: GaussianMixture, q: GaussianMixture, n: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """gm_kl_div and the SE of its mean, from the same draws (same seed, so the same samples)."""
    kl = gm_kl_div(p, q, n=n, generator=torch.Generator().manual_seed(seed))
    x = gm_to_sample(p, n, generator=torch.Generator().manual_seed(seed))
    log_ratio = gm_logprob(p, x) - gm_logprob(q, x)  # (..., n, H, W)
    assert_close(kl, log_ratio.mean(-3, keepdim=True), **TOL)
    return kl, log_ratio.std(-3, keepdim=True) / math.sqrt(n)


@pytest.mark.parametrize("C", [1, 2, 4])
def test_gm_kl_div_of_single_gaussians_matches_the_closed_form(random_gm, C):
    p, q = random_gm(1, C, 4, 4, std_range=(0.5, 2.0)), random_gm(1, C, 4, 4, std_range=(0.5, 2.0))
    kl, se = _kl_and_se(p, q, n=2000, seed=3)
    s1, s2 = p.logstds.exp().squeeze(-4), q.logstds.exp().squeeze(-4)  # (2, 1, 1, 1)
    sq = (p.means - q.means).square().sum(-3)  # (2, 1, 4, 4)
    closed = C * torch.log(s2 / s1) + (C * s1**2 + sq) / (2 * s2**2) - C / 2
    assert (kl - closed).abs().le(N_SE * se).all()


@pytest.mark.parametrize("C", [1, 2, 4])
def test_gm_kl_div_with_kr_samples_matches_the_closed_form(random_gm, C):
    """use_kr: p's draws come from the inverse KR map of N(0, I) noise; same expectation."""
    p, q = random_gm(1, C, 4, 4, std_range=(0.5, 2.0)), random_gm(1, C, 4, 4, std_range=(0.5, 2.0))
    n = 2000
    kl = gm_kl_div(p, q, n=n, generator=torch.Generator().manual_seed(5), use_kr=True)
    s1, s2 = p.logstds.exp().squeeze(-4), q.logstds.exp().squeeze(-4)
    sq = (p.means - q.means).square().sum(-3)
    closed = C * torch.log(s2 / s1) + (C * s1**2 + sq) / (2 * s2**2) - C / 2
    # for K = 1 the KR draw is x = μ + s z, so the per-draw log ratio has the closed-form spread
    # of a quadratic in z; bound the error with its Monte-Carlo SE from the same draws
    z = torch.randn(2, n, C, 4, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    x = p.means + s1.unsqueeze(1) * z
    se = (gm_logprob(p, x) - gm_logprob(q, x)).std(-3, keepdim=True) / math.sqrt(n)
    assert (kl - closed).abs().le(N_SE * se).all()
    assert torch.equal(gm_kl_div(p, p, n=8, use_kr=True), torch.zeros_like(kl))


def test_gm_kl_div_with_kr_samples_has_the_reparameterised_gradient(random_gm):
    """d KL / d μ_p for K = 1 is (μ_p − μ_q)/s_q² (per pixel, summed here), within MC error."""
    p, q = random_gm(1, 2, 2, 2, std_range=(0.5, 1.0)), random_gm(1, 2, 2, 2, std_range=(0.5, 1.0))
    means = p.means.clone().requires_grad_(True)
    n = 4000
    kl = gm_kl_div(GaussianMixture(means, p.logweights, p.logstds), q, n=n,
                   generator=torch.Generator().manual_seed(6), use_kr=True)  # fmt: skip
    kl.sum().backward()
    s1, s2 = p.logstds.exp(), q.logstds.exp()  # (2, 1, 1, 1, 1)
    want = (p.means - q.means) / s2**2
    # the estimate is (μ_p + s_p z̄ − μ_q)/s_q², z̄ the mean of n standard normals
    assert (means.grad - want).abs().le(N_SE * s1 / s2**2 / math.sqrt(n)).all()


def test_gm_kl_div_is_nonnegative_in_expectation(random_gm):
    p, q = random_gm(3, 2, 4, 4), random_gm(3, 2, 4, 4)
    kl, se = _kl_and_se(p, q, n=1000, seed=4)
    assert (kl + N_SE * se).ge(0).all()
    assert float(kl.mean()) > 0


@pytest.mark.parametrize("C", [1, 2, 4])
def test_gm_entropy_of_one_gaussian_is_the_closed_form(random_gm, generator, C):
    gm = random_gm(1, C, 4, 4)
    n = 20000
    h = gm_entropy(gm, n=n, generator=generator)
    s2 = torch.exp(2 * gm.logstds).squeeze(-4)
    closed = 0.5 * C * torch.log(2 * math.pi * math.e * s2)
    # −log p(x) = ½‖z‖² + const with ‖z‖² ~ χ²_C, so Var = C/2 and SE = sqrt(C/(2n))
    se = math.sqrt(C / (2 * n))
    assert (h - closed).abs().le(N_SE * se).all()
    # the 32 pixels are independent estimates: their average pins a bias down to ~5e-3
    assert abs(float((h - closed).mean())) <= N_SE * se / math.sqrt(h.numel())


# ---- autograd ----


def _tiny_params(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1, 2, 2, 2, 1), (1, 2, 1, 2, 1), (1, 2, 1, 1, 1)]
    return [
        torch.randn(*s, dtype=torch.float64, generator=gen).mul(0.5).requires_grad_()
        for s in shapes
    ]


def test_gm_logprob_is_differentiable():
    x = torch.randn(1, 3, 2, 2, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda m, lw, ls, x: gm_logprob(GaussianMixture(m, lw, ls), x), [*_tiny_params(1), x]
    )


def test_gm_kl_div_is_differentiable_through_the_reparametrised_samples():
    p_params, q_params = _tiny_params(2), _tiny_params(3)

    def kl(*params):
        p, q = GaussianMixture(*params[:3]), GaussianMixture(*params[3:])
        return gm_kl_div(p, q, n=4, generator=torch.Generator().manual_seed(0))

    assert torch.autograd.gradcheck(kl, [*p_params, *q_params], fast_mode=True)


def test_gm_kl_div_with_kr_samples_differentiates_the_weights():
    """K = 2, one pixel, C = 1: the KR estimate's gradient in p's log-weights matches finite
    differences of the quadrature KL; gm_to_sample's draws cannot (the component choice is not
    differentiable, its gradient is only the zero-mean score term)."""
    q = GaussianMixture(torch.tensor([-0.5, 1.5], dtype=F64).view(1, 2, 1, 1, 1),
                        torch.log(torch.tensor([0.6, 0.4], dtype=F64)).view(1, 2, 1, 1, 1),
                        torch.full((1, 1, 1, 1, 1), math.log(0.8), dtype=F64))  # fmt: skip
    means = torch.tensor([-1.0, 1.0], dtype=F64).view(1, 2, 1, 1, 1)
    logstds = torch.full((1, 1, 1, 1, 1), math.log(0.6), dtype=F64)
    grid = torch.linspace(-10, 10, 40001, dtype=F64).view(1, -1, 1, 1, 1)

    def quadrature_kl(logit: float) -> float:
        lw = torch.tensor([logit, 0.0], dtype=F64).view(1, 2, 1, 1, 1).log_softmax(1)
        p = GaussianMixture(means, lw, logstds)
        lp, lq = gm_logprob(p, grid), gm_logprob(q, grid)
        return float((lp.exp() * (lp - lq)).sum() * (grid[0, 1] - grid[0, 0]))

    logit = 0.3
    h = 1e-4
    want = (quadrature_kl(logit + h) - quadrature_kl(logit - h)) / (2 * h)
    grads = []
    for use_kr in (True, False):
        raw = torch.tensor([logit, 0.0], dtype=F64, requires_grad=True)
        p = GaussianMixture(means, raw.view(1, 2, 1, 1, 1).log_softmax(1), logstds)
        kl = gm_kl_div(p, q, n=20000, generator=torch.Generator().manual_seed(7), use_kr=use_kr)
        kl.sum().backward()
        grads.append(float(raw.grad[0]))
    # SEs of the two gradient estimates at n = 20000 (20 seeds): 0.0063 (KR), 0.0037 (draws)
    assert want > 0.05
    assert abs(grads[0] - want) < 4 * 0.0063  # KR: the true gradient
    assert abs(grads[1]) < 4 * 0.0037  # component draws: only the zero-mean score term
