"""The transition GM-NLL loss (spec 4.3; oracles 5-7)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from gmflow.flow import add_noise, reverse_transition_coefs, transition_pair
from gmflow.gm import GaussianMixture
from gmflow.losses import DEFAULT_LOSS_SCALE, transition_loss, transition_nll

F64 = torch.float64
LOG_2PI = math.log(2 * math.pi)


def _batch(generator, b=3, c=2, h=2, w=2, ratio=0.6):
    x0 = torch.randn(b, c, h, w, generator=generator, dtype=F64)
    sigma_high = torch.rand(b, generator=generator, dtype=F64) * 0.9 + 0.05
    x_low, x_high, sigma_low = transition_pair(x0, sigma_high, ratio, generator)
    return x0, x_low, x_high, sigma_low, sigma_high


def test_transition_nll_matches_an_independent_mixture_density(
    random_gm, generator, ref_gm_logprob
):
    """ℓ_p against torch.distributions with the transition GM built from (c1, c2, c3) by hand."""
    gm_u = random_gm(4, 2, 2, 2, batch=(3,))
    _, x_low, x_high, sigma_low, sigma_high = _batch(generator)
    c1, c2, c3 = (
        c.reshape(-1, 1, 1, 1, 1) for c in reverse_transition_coefs(sigma_high, sigma_low)
    )
    s = sigma_high.reshape(-1, 1, 1, 1, 1)
    means = c1 * x_high.unsqueeze(1) + c2 * (x_high.unsqueeze(1) - s * gm_u.means)
    std = ((s * c2 * gm_u.logstds.exp()) ** 2 + c3).sqrt()
    ref = -ref_gm_logprob(
        GaussianMixture(means, gm_u.logweights, std.log()), x_low.unsqueeze(1)
    ).squeeze(1)
    assert_close(transition_nll(gm_u, x_low, x_high, sigma_low, sigma_high), ref)


def test_ratio_one_is_the_u_space_nll_plus_c_log_sigma(random_gm, generator, ref_gm_logprob):
    """Oracle 6: σ_low = 0 ⇒ ℓ = −log q(u) + C log σ_high per pixel (exactly: no floors)."""
    gm_u = random_gm(5, 3, 2, 2, batch=(4,))
    x0, x_low, x_high, sigma_low, sigma_high = _batch(generator, b=4, c=3, ratio=1.0)
    sigma_high[0] = 1e-7  # the smallest training level
    x_high = add_noise(x0, torch.randn(x0.shape, generator=generator, dtype=F64), sigma_high)
    assert bool((sigma_low == 0).all()) and torch.equal(x_low, x0)
    u = (x_high - x0) / sigma_high.reshape(-1, 1, 1, 1)
    want = -ref_gm_logprob(gm_u, u.unsqueeze(1)).squeeze(1) + 3 * torch.log(sigma_high).reshape(
        -1, 1, 1
    )
    assert_close(transition_nll(gm_u, x_low, x_high, sigma_low, sigma_high), want)


def test_single_fixed_gaussian_is_l2_flow_matching(generator):
    """Oracle 5: K = 1, fixed s ⇒ ‖u − μ‖²/(2s²) + C log s + (C/2) log 2π (+ C log σ), and the
    μ-gradient of the loss is the gradient of the scaled L2 flow-matching loss."""
    b, c, s = 4, 2, 0.7
    x0, x_low, x_high, sigma_low, sigma_high = _batch(generator, b=b, c=c, ratio=1.0)
    mu = torch.randn(b, 1, c, 2, 2, generator=generator, dtype=F64, requires_grad=True)
    gm_u = GaussianMixture(
        mu,
        torch.zeros(b, 1, 1, 2, 2, dtype=F64),
        torch.full((b, 1, 1, 1, 1), math.log(s), dtype=F64),
    )
    u = (x_high - x0) / sigma_high.reshape(-1, 1, 1, 1)
    sq = (u - mu.squeeze(1)).square().sum(1)  # (B, H, W)
    per_pixel = sq / (2 * s**2) + c * math.log(s) + 0.5 * c * LOG_2PI
    log_sigma = c * torch.log(sigma_high).reshape(-1, 1, 1)
    assert_close(transition_nll(gm_u, x_low, x_high, sigma_low, sigma_high), per_pixel + log_sigma)
    scale = 2.0
    loss = transition_loss(gm_u, x_low, x_high, sigma_low, sigma_high, scale=scale)
    (grad,) = torch.autograd.grad(loss, mu)
    l2 = scale * (u - mu.squeeze(1)).square().sum(1).mean() / (2 * s**2 * c)
    (grad_l2,) = torch.autograd.grad(l2, mu)
    assert_close(grad, grad_l2)


def test_single_gaussian_optimal_std_is_the_residual_rms(generator):
    """Oracle 5: the loss is stationary in log s at s² = E‖u − μ‖²/C."""
    b, c = 64, 2
    x0, x_low, x_high, sigma_low, sigma_high = _batch(generator, b=b, c=c, h=1, w=1, ratio=1.0)
    mu = torch.randn(b, 1, c, 1, 1, generator=generator, dtype=F64)
    u = (x_high - x0) / sigma_high.reshape(-1, 1, 1, 1)
    s2 = (u - mu.squeeze(1)).square().sum(1).mean() / c
    logstd = torch.full((b, 1, 1, 1, 1), 0.5 * math.log(s2.item()), dtype=F64, requires_grad=True)
    gm_u = GaussianMixture(mu, torch.zeros(b, 1, 1, 1, 1, dtype=F64), logstd)
    (grad,) = torch.autograd.grad(
        transition_loss(gm_u, x_low, x_high, sigma_low, sigma_high), logstd
    )
    assert abs(grad.sum().item()) < 1e-12  # a shared std: the summed gradient vanishes


def test_partial_ratio_is_a_weighted_regression_of_the_transition_mean(generator):
    """Spec 4.3.7: λ < 1, K = 1 ⇒ ‖x_low − m‖² = (σ c2)² ‖μ − ũ‖²,

    with ũ = (x_high − (x_low − c1 x_high)/c2)/σ.
    """
    b, c, s = 3, 2, 0.4
    _, x_low, x_high, sigma_low, sigma_high = _batch(generator, b=b, c=c, ratio=0.5)
    mu = torch.randn(b, 1, c, 2, 2, generator=generator, dtype=F64, requires_grad=True)
    gm_u = GaussianMixture(
        mu,
        torch.zeros(b, 1, 1, 2, 2, dtype=F64),
        torch.full((b, 1, 1, 1, 1), math.log(s), dtype=F64),
    )
    c1, c2, c3 = (t.reshape(-1, 1, 1, 1) for t in reverse_transition_coefs(sigma_high, sigma_low))
    sig = sigma_high.reshape(-1, 1, 1, 1)
    target = (x_high - (x_low - c1 * x_high) / c2) / sig
    weight = (sig * c2) ** 2 / ((sig * c2 * s) ** 2 + c3)  # (σ c2)²/S²
    l2 = (0.5 * weight * (mu.squeeze(1) - target).square()).sum(1).mean() / c
    (want,) = torch.autograd.grad(l2, mu)
    (got,) = torch.autograd.grad(transition_loss(gm_u, x_low, x_high, sigma_low, sigma_high), mu)
    assert_close(got, want)


@pytest.mark.parametrize(("c", "scale_ll", "scale_orig"), [(4, 8.0, 2.0), (2, 2.0, 1.0)])
def test_ll_and_orig_normalisations_differ_by_a_constant(
    random_gm, generator, c, scale_ll, scale_orig
):
    """Oracle 7: [LL] scale·mean(ℓ/C) vs [orig] scale'·mean(ℓ') with ℓ' = ℓ − (C/2) log 2π:
    a constant apart, so every parameter gets the same gradient from both."""
    gm = random_gm(3, c, 2, 2, batch=(3,))
    params = [t.clone().requires_grad_(True) for t in (gm.means, gm.logweights, gm.logstds)]
    gm_u = GaussianMixture(*params)
    _, x_low, x_high, sigma_low, sigma_high = _batch(generator, c=c)
    nll = transition_nll(gm_u, x_low, x_high, sigma_low, sigma_high)
    orig = scale_orig * (nll - 0.5 * c * LOG_2PI).mean()
    ll = transition_loss(gm_u, x_low, x_high, sigma_low, sigma_high, scale=scale_ll)
    assert_close(ll - orig, torch.tensor(scale_ll * 0.5 * LOG_2PI, dtype=F64))
    grads_ll = torch.autograd.grad(ll, params, retain_graph=True)
    grads_orig = torch.autograd.grad(orig, params)
    for g_ll, g_orig in zip(grads_ll, grads_orig, strict=True):
        assert g_ll.abs().max() > 0
        assert_close(g_ll, g_orig)


def test_default_scale_is_nats_per_dimension(random_gm, generator):
    gm_u = random_gm(3, 2, 2, 2, batch=(3,))
    args = _batch(generator)[1:]
    assert DEFAULT_LOSS_SCALE == 1.0
    assert_close(transition_loss(gm_u, *args), transition_nll(gm_u, *args).mean() / 2)


def test_half_precision_network_output_gives_an_fp32_loss(random_gm, generator):
    gm_u = random_gm(3, 2, 2, 2, batch=(3,), dtype=torch.bfloat16)
    _, x_low, x_high, sigma_low, sigma_high = _batch(generator)
    loss = transition_loss(
        gm_u, x_low.float(), x_high.float(), sigma_low.float(), sigma_high.float()
    )
    assert loss.dtype == torch.float32 and bool(torch.isfinite(loss))


def test_mismatched_shapes_raise(random_gm):
    gm_u = random_gm(3, 2, 2, 2, batch=(3,))
    with pytest.raises(ValueError, match="same shape"):
        transition_nll(gm_u, torch.zeros(3, 2, 2, 2), torch.zeros(3, 2, 1, 1), 0.1, 0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_loss_and_gradients_match_the_cpu(random_gm, generator):
    gm_u = random_gm(8, 4, 8, 8, batch=(4,), dtype=torch.float32)
    _, x_low, x_high, sigma_low, sigma_high = (
        t.float() for t in _batch(generator, b=4, c=4, h=8, w=8)
    )
    results = []
    for device in ("cpu", "cuda"):
        means = gm_u.means.to(device).requires_grad_(True)
        gm = GaussianMixture(means, gm_u.logweights.to(device), gm_u.logstds.to(device))
        args = (x_low, x_high, sigma_low, sigma_high)
        loss = transition_loss(gm, *(t.to(device) for t in args), scale=8.0)
        (grad,) = torch.autograd.grad(loss, means)
        results.append((loss.detach().cpu(), grad.cpu()))
    assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)
