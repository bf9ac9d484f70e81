"""The second-order GM correction (spec 8.3; oracle 33)."""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from gmflow.flow import (
    SecondOrderState,
    guide,
    posterior_mean,
    second_order_correction,
)
from gmflow.gm import GaussianMixture, IsoGaussian, gm_to_iso_gaussian

F64 = torch.float64

DATA_MEANS = torch.tensor([[-1.5, 0.5], [0.2, -1.0], [1.8, 1.2]], dtype=F64).reshape(3, 2, 1, 1)
DATA_LOGWEIGHTS = torch.tensor([0.2, 0.5, 0.3], dtype=F64).log().reshape(3, 1, 1, 1)
DATA_VAR = 0.09


def exact_x0_posterior(x_t: torch.Tensor, sigma: float) -> GaussianMixture:
    """Bayes posterior of the data GM above at (x_t, σ); see tests/flow/test_path.py."""
    a = 1 - sigma
    var = 1 / (1 / DATA_VAR + a**2 / sigma**2)
    x = x_t.unsqueeze(1)
    means = var * (DATA_MEANS / DATA_VAR + a * x / sigma**2)
    evidence = (
        -0.5 * (x - a * DATA_MEANS).square().sum(2, keepdim=True) / (a**2 * DATA_VAR + sigma**2)
    )
    logweights = torch.log_softmax(DATA_LOGWEIGHTS + evidence, dim=1)
    logstds = torch.full((x_t.shape[0], 1, 1, 1, 1), 0.5 * math.log(var), dtype=F64)
    return GaussianMixture(means, logweights, logstds)


def _step(gm, x, sigma, h, prev, **kwargs):
    return second_order_correction(gm, gm_to_iso_gaussian(gm), x, sigma, h, prev, **kwargs)


def test_first_step_returns_its_inputs_and_caches_them(random_gm, generator):
    gm = random_gm(3, 2, 2, 2)
    g = gm_to_iso_gaussian(gm)
    x = torch.randn(2, 2, 2, 2, generator=generator, dtype=F64)
    out, g_out, state = second_order_correction(gm, g, x, 0.75, 0.25, None)
    assert out is gm and g_out is g
    assert state == SecondOrderState(gm, x, 0.75, 0.25)


def test_exact_gm_has_no_correction(generator):
    """Oracle 33: GM_prev re-conditioned to the current state has the current mean ⇒ Δ = 0."""
    x_prev = torch.randn(4, 2, 1, 1, generator=generator, dtype=F64)
    x = 0.7 * x_prev + 0.2 * torch.randn(4, 2, 1, 1, generator=generator, dtype=F64)
    _, _, state = _step(exact_x0_posterior(x_prev, 0.8), x_prev, 0.8, 0.3, None)
    gm = exact_x0_posterior(x, 0.5)
    out, _, _ = _step(gm, x, 0.5, 0.25, state)
    assert_close(out.means, gm.means, rtol=0, atol=1e-12)
    assert_close(out.logstds, gm.logstds, rtol=0, atol=1e-12)
    assert_close(out.logweights, gm.logweights, rtol=0, atol=1e-12)


def test_full_damping_returns_the_input_exactly(random_gm, generator):
    """γ = 0 whenever v̄ c_a ≥ h_prev² (unguided) ⇒ zero bias ⇒ the product is skipped."""
    gm_prev, gm = random_gm(3, 2, 2, 2), random_gm(3, 2, 2, 2)
    x = torch.randn(2, 2, 2, 2, generator=generator, dtype=F64)
    v_min = gm_to_iso_gaussian(gm).var.mean(dim=(-2, -1)).min().item()
    h_prev = math.sqrt(0.005 * v_min) * 0.999
    prev = SecondOrderState(gm_prev, x + 1, 0.9, h_prev)
    g = gm_to_iso_gaussian(gm)
    out, g_out, _ = second_order_correction(gm, g, x, 0.6, 0.1, prev)
    assert out is gm and g_out is g


def test_guided_full_damping_reproduces_the_guided_gm(random_gm, generator):
    """With Δ = 0 the fused product (guidance bias on GM_c) equals the guidance result itself."""
    gm_c, gm_u, gm_prev = random_gm(3, 2, 2, 2), random_gm(3, 2, 2, 2), random_gm(3, 2, 2, 2)
    x = torch.randn(2, 2, 2, 2, generator=generator, dtype=F64)
    w = 0.3
    guided = guide(gm_c, gm_u, w)
    v_min = guided.base.var.min().item()
    h_prev = math.sqrt(v_min * (w**2 + 0.005)) * 0.999  # v̄ (w² c_b² + c_a) ≥ h_prev², c_b = 1
    prev = SecondOrderState(gm_prev, x + 1, 0.9, h_prev)
    out, target, _ = second_order_correction(
        guided.gm, guided.target, x, 0.6, 0.1, prev, guidance=guided
    )
    assert_close(out.means, guided.gm.means, rtol=0, atol=1e-12)
    assert_close(out.logstds, guided.gm.logstds, rtol=0, atol=1e-12)
    assert_close(out.logweights, guided.gm.logweights, rtol=0, atol=1e-12)
    assert_close(target.mean, guided.target.mean)
    assert_close(target.var, guided.target.var)


def test_single_gaussian_output_is_the_target_with_the_extrapolated_mean(generator):
    """K = 1: output = N(m + Δ, v (1 − P/v)) with Δ = ½ (h/h_prev) γ (m_cur − m_prev→cur)."""
    b, c, hw = 2, 3, 2
    var = 0.04
    mean = torch.randn(b, 1, c, hw, hw, generator=generator, dtype=F64)
    gm = GaussianMixture(
        mean,
        torch.zeros(b, 1, 1, hw, hw, dtype=F64),
        torch.full((b, 1, 1, 1, 1), 0.5 * math.log(var), dtype=F64),
    )
    gm_prev = GaussianMixture(mean + 0.05, gm.logweights, gm.logstds + 0.1)
    x_prev = torch.randn(b, c, hw, hw, generator=generator, dtype=F64)
    x = torch.randn(b, c, hw, hw, generator=generator, dtype=F64)
    sigma_prev, sigma, h_prev, h = 0.9, 0.6, 0.3, 0.2
    prev = SecondOrderState(gm_prev, x_prev, sigma_prev, h_prev)
    out, target, _ = _step(gm, x, sigma, h, prev)
    m_prev = posterior_mean(gm_prev, x_prev, sigma_prev, x, sigma)
    gamma = math.sqrt(1 - var * 0.005 / h_prev**2)
    delta = 0.5 * (h / h_prev) * gamma * (mean.squeeze(1) - m_prev)
    power = delta.square().mean(dim=(-3, -2, -1), keepdim=True)
    assert bool((power < var).all())  # the clip is inactive in this case
    assert_close(out.means.squeeze(1), mean.squeeze(1) + delta)
    assert_close(torch.exp(2 * out.logstds).reshape(b, 1, 1, 1), var * (1 - power / var))
    assert_close(target.mean, mean.squeeze(1) + delta)
    assert_close(target.var, var * (1 - power / var))


def test_bias_power_never_exceeds_the_variance(random_gm, generator):
    gm = random_gm(3, 2, 2, 2, std_range=(0.05, 0.1))
    gm_prev = GaussianMixture(gm.means + 5.0, gm.logweights, gm.logstds)
    x = torch.randn(2, 2, 2, 2, generator=generator, dtype=F64)
    prev = SecondOrderState(gm_prev, x, 0.5, 0.5)
    base_var = gm_to_iso_gaussian(gm).var.mean(dim=(-2, -1), keepdim=True)
    out, target, _ = _step(gm, x, 0.5, 0.5, prev)
    bias = target.mean - gm_to_iso_gaussian(gm).mean
    power = bias.square().mean(dim=(-3, -2, -1), keepdim=True)
    assert bool((power <= base_var * (1 + 1e-12)).all())
    assert_close(power, base_var)  # clipped to exactly v̄
    assert_close(target.var, base_var * 1e-6)  # and the variance collapses to the floor
    assert bool(torch.isfinite(out.means).all() and torch.isfinite(out.logweights).all())


def test_state_carries_the_pre_correction_gm(random_gm, generator):
    gm_prev, gm = random_gm(3, 2, 1, 1), random_gm(3, 2, 1, 1)
    x = torch.randn(2, 2, 1, 1, generator=generator, dtype=F64)
    prev = SecondOrderState(gm_prev, x, 0.9, 0.3)
    out, _, state = _step(gm, x, 0.6, 0.2, prev)
    assert state.gm_x0 is gm and out is not gm
    assert (state.sigma, state.h) == (0.6, 0.2) and state.x_t is x
    assert isinstance(_step(gm, x, 0.6, 0.2, prev)[1], IsoGaussian)


def _mean_error(generator, steps: int, guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """|mean(GM out) − (m_cur + Δ)| per pixel for a K = 3 case with an unclipped bias."""
    x_prev = torch.randn(2, 2, 2, 2, generator=generator, dtype=F64)
    x = 0.8 * x_prev + 0.3 * torch.randn(2, 2, 2, 2, generator=generator, dtype=F64)
    pixels = lambda t: t.permute(0, 2, 3, 1).reshape(8, 2, 1, 1)  # noqa: E731
    gm_prev = exact_x0_posterior(pixels(x_prev), 0.7)
    gm = exact_x0_posterior(pixels(x), 0.45)

    def as_image(g: GaussianMixture) -> GaussianMixture:  # 8 pixels -> 2 samples of 2x2
        return GaussianMixture(
            g.means.reshape(2, 2, 2, 3, 2).permute(0, 3, 4, 1, 2),
            g.logweights.reshape(2, 2, 2, 3, 1).permute(0, 3, 4, 1, 2),
            g.logstds[::4].clone(),
        )

    gm_prev, gm = as_image(gm_prev), as_image(gm)
    gm_prev = GaussianMixture(gm_prev.means + 0.15, gm_prev.logweights, gm_prev.logstds)
    prev = SecondOrderState(gm_prev, x_prev, 0.7, 0.25)
    kwargs = {"correction_steps": steps}
    if guided:
        uncond = GaussianMixture(gm.means - 0.2, gm.logweights, gm.logstds)
        terms = guide(gm, uncond, 0.3)
        out, _, _ = second_order_correction(
            terms.gm, terms.target, x, 0.45, 0.2, prev, guidance=terms, **kwargs
        )
        m_cur = gm_to_iso_gaussian(terms.gm).mean
    else:
        out, _, _ = _step(gm, x, 0.45, 0.2, prev, **kwargs)
        m_cur = gm_to_iso_gaussian(gm).mean
    m_prev = posterior_mean(gm_prev, x_prev, 0.7, x, 0.45)
    v = (terms.base if guided else IsoGaussian(m_cur, gm_to_iso_gaussian(gm).var)).var
    v = v.mean(dim=(-2, -1), keepdim=True)
    w = 0.3 if guided else 0.0
    gamma = (1 - v * (w**2 + 0.005) / 0.25**2).clamp_min(0).sqrt()
    want = m_cur + 0.5 * (0.2 / 0.25) * gamma * (m_cur - m_prev)
    return (gm_to_iso_gaussian(out).mean - want).norm(dim=-3), gamma


def test_correction_steps_move_the_mixture_mean_to_the_extrapolation():
    """Spec 8.3 step 9: for K > 1 the product moves the mean by only about b; the iterations
    remove most of the rest. It is the reference's fixed-point heuristic, not a contraction: the
    per-sample variance ratio τ couples the pixels, and here one unguided pixel of eight drifts
    away, so the unguided check is on the median pixel."""
    for guided, reduce in ((True, torch.max), (False, torch.median)):
        before, gamma = _mean_error(torch.Generator().manual_seed(0), 0, guided)
        after, _ = _mean_error(torch.Generator().manual_seed(0), 10, guided)
        assert bool((gamma > 0.5).all())  # a real extrapolation, not damped away
        assert float(reduce(before)) > 0.01
        assert float(reduce(after)) < 0.1 * float(reduce(before))


def test_correction_steps_leave_a_single_gaussian_alone(generator):
    """K = 1: the product already has the target mean, so the iterations change nothing."""
    mean = torch.randn(2, 1, 3, 2, 2, generator=generator, dtype=F64)
    gm = GaussianMixture(mean, torch.zeros(2, 1, 1, 2, 2, dtype=F64),
                         torch.full((2, 1, 1, 1, 1), math.log(0.2), dtype=F64))  # fmt: skip
    gm_prev = GaussianMixture(mean + 0.05, gm.logweights, gm.logstds)
    x = torch.randn(2, 3, 2, 2, generator=generator, dtype=F64)
    prev = SecondOrderState(gm_prev, x, 0.9, 0.3)
    plain, _, _ = _step(gm, x, 0.6, 0.2, prev)
    refined, _, _ = _step(gm, x, 0.6, 0.2, prev, correction_steps=5)
    assert_close(refined.means, plain.means, rtol=0, atol=1e-12)
    assert_close(refined.logstds, plain.logstds, rtol=0, atol=1e-12)
