"""Probabilistic guidance and vanilla CFG on x0-GMs (spec 6; oracles 31, 32; numeric vector 49)."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from torch.testing import assert_close

from gmflow.errors import ConfigError
from gmflow.flow import (
    cfg_guidance,
    flow_euler_step,
    guidance_bias,
    guide,
    impose_gaussian,
    probabilistic_guidance,
    sample,
    sigma_grid,
    u_to_x0,
)
from gmflow.gm import (
    GaussianMixture,
    IsoGaussian,
    gm_logprob,
    gm_mul_iso_gaussian,
    gm_to_iso_gaussian,
    gm_to_mean,
    iso_gaussian_mul_iso_gaussian,
)

F64 = torch.float64


def _inner(a, b):
    return (a * b).mean(dim=(-3, -2, -1), keepdim=True)


def _single_gaussian(mean: torch.Tensor, var: float) -> GaussianMixture:
    """K = 1 GM with means (B, 1, C, H, W) and std sqrt(var)."""
    b, _, _, h, w = mean.shape
    logstds = torch.full((b, 1, 1, 1, 1), 0.5 * math.log(var), dtype=mean.dtype)
    return GaussianMixture(mean, torch.zeros(b, 1, 1, h, w, dtype=mean.dtype), logstds)


def test_probabilistic_guidance_numeric_vector():
    mu_c = torch.tensor([1, 2, -1, 0.5], dtype=F64).reshape(1, 1, 1, 2, 2)
    mu_u = torch.tensor([0.5, 2.5, -1, 0], dtype=F64).reshape(1, 1, 1, 2, 2)
    result = guide(_single_gaussian(mu_c, 0.2), _single_gaussian(mu_u, 0.2), 0.5, 1.0)
    tol = {"rtol": 0, "atol": 5e-9}
    bias = torch.tensor([0.28073263, -0.21834760, -0.02079501, 0.27033513], dtype=F64)
    assert_close(result.bias.flatten(), bias, **tol)
    assert_close(_inner(result.bias, result.bias).sqrt().item(), 0.22360680, **tol)
    assert_close(_inner(result.bias, mu_c.squeeze(1)).item(), 0.0, **tol)
    target = torch.tensor([1.28073263, 1.78165240, -1.02079501, 0.77033513], dtype=F64)
    assert_close(result.target.mean.flatten(), target, **tol)
    assert_close(result.target.var.item(), 0.15, **tol)
    assert_close(result.gm.means.flatten(), target, **tol)
    assert_close(torch.exp(2 * result.gm.logstds).item(), 0.15, **tol)


def test_single_gaussian_guidance_gives_the_target_exactly(generator):
    """Oracle 31: K = 1 ⇒ N(μ_c + b, (1 − w²) v); RMS(b) = w√v̄; b ⟂ μ_c; second moment kept."""
    mu_c = torch.randn(3, 1, 2, 4, 4, generator=generator, dtype=F64)
    mu_u = mu_c + 0.3 * torch.randn(3, 1, 2, 4, 4, generator=generator, dtype=F64)
    var, w = 0.7, 0.35
    result = guide(_single_gaussian(mu_c, var), _single_gaussian(mu_u, var), w)
    b = result.bias
    assert_close(result.gm.means.squeeze(1), mu_c.squeeze(1) + b)
    assert_close(
        torch.exp(2 * result.gm.logstds), torch.full_like(result.gm.logstds, (1 - w**2) * var)
    )
    assert_close(_inner(b, b).sqrt(), torch.full((3, 1, 1, 1), w * math.sqrt(var), dtype=F64))
    assert_close(_inner(b, mu_c.squeeze(1)), torch.zeros(3, 1, 1, 1, dtype=F64), rtol=0, atol=1e-15)
    assert_close(_inner(b, b) + result.target.var, torch.full((3, 1, 1, 1), var, dtype=F64))


def test_guidance_fades_continuously_to_the_conditional_gm(random_gm):
    """w → 0⁺ tends to GM_c with an error O(w) (exact product: no 1e-6 floor), w = 0 is GM_c."""
    gm_c, gm_u = random_gm(4, 2, 3, 3), random_gm(4, 2, 3, 3)
    assert probabilistic_guidance(gm_c, gm_u, 0.0) is gm_c
    errors = []
    for w in (1e-2, 1e-4, 1e-6):
        out = probabilistic_guidance(gm_c, gm_u, w)
        errors.append((out.means - gm_c.means).abs().max().item())
        assert_close(out.logstds, gm_c.logstds, rtol=0, atol=w**2 * 10)
    assert (
        errors[0] < 0.1
        and errors[1] < 1e-2 * errors[0] * 1.5
        and errors[2] < 1e-2 * errors[1] * 1.5
    )


def test_guided_gm_std_and_shape_for_many_components(random_gm):
    """Oracle 32: s'² = s² r/(s² + r), r = v(1 − w²)/w², and one log-std per sample."""
    gm_c, gm_u = random_gm(5, 3, 4, 4), random_gm(5, 3, 4, 4)
    w = 0.45
    out = probabilistic_guidance(gm_c, gm_u, w)
    v = gm_to_iso_gaussian(gm_c).var.mean(dim=(-2, -1), keepdim=True).unsqueeze(1)
    s2, r = torch.exp(2 * gm_c.logstds), v * (1 - w**2) / w**2
    assert out.logstds.shape == (2, 1, 1, 1, 1)
    assert_close(torch.exp(2 * out.logstds), s2 * r / (s2 + r))


def test_impose_gaussian_is_the_normalised_pointwise_product(random_gm, generator):
    """log GM'(x) − log GM(x) − log N(x; m + b, τv) + log N(x; m, v) does not depend on x."""
    gm = random_gm(4, 2, 2, 2)
    m = torch.randn(2, 2, 2, 2, generator=generator, dtype=F64)
    v = torch.tensor([0.8, 1.3], dtype=F64).reshape(2, 1, 1, 1)
    b = 0.5 * torch.randn(2, 2, 2, 2, generator=generator, dtype=F64)
    tau = torch.tensor([0.3, 0.9], dtype=F64).reshape(2, 1, 1, 1)
    out = impose_gaussian(gm, IsoGaussian(m, v), b, tau)
    x = 2 * torch.randn(2, 64, 2, 2, 2, generator=generator, dtype=F64)

    def log_normal(mean, var):  # per pixel, (B, n, H, W)
        sq = (x - mean.unsqueeze(1)).square().sum(2)
        return -0.5 * sq / var - math.log(2 * math.pi) * 0.5 * 2 - torch.log(var)  # C = 2

    ratio = gm_logprob(out, x) - gm_logprob(gm, x) - log_normal(m + b, tau * v) + log_normal(m, v)
    assert ratio.std(dim=1).max().item() < 1e-10


def test_impose_gaussian_matches_the_reference_two_step_product(random_gm, generator):
    """Where the reference's 1e-6 floor is inactive, the exact form equals ratio-then-product."""
    gm = random_gm(3, 2, 2, 2)
    m = torch.randn(2, 2, 2, 2, generator=generator, dtype=F64)
    v = torch.tensor([0.8, 1.3], dtype=F64).reshape(2, 1, 1, 1)
    b = 0.4 * torch.randn(2, 2, 2, 2, generator=generator, dtype=F64)
    tau = 0.75
    ratio = iso_gaussian_mul_iso_gaussian(IsoGaussian(m + b, tau * v), IsoGaussian(m, v), 1.0, -1.0)
    want = gm_mul_iso_gaussian(gm, ratio)
    got = impose_gaussian(gm, IsoGaussian(m, v), b, tau)
    assert_close(got.means, want.means)
    assert_close(got.logstds, want.logstds)
    assert_close(got.logweights, want.logweights)


def test_impose_gaussian_without_a_bias_is_exactly_the_identity_per_sample(random_gm, generator):
    gm = random_gm(4, 2, 2, 2)
    m = gm_to_mean(gm)
    v = torch.ones(2, 1, 1, 1, dtype=F64)
    b = torch.zeros(2, 2, 2, 2, dtype=F64)
    b[1] = 0.1
    out = impose_gaussian(gm, IsoGaussian(m, v), b, 1.0)
    assert torch.equal(out.means[0], gm.means[0]) and torch.equal(
        out.logweights[0], gm.logweights[0]
    )
    assert not torch.equal(out.means[1], gm.means[1])


def test_without_orthogonal_projection_the_bias_follows_the_cfg_direction(random_gm):
    gm_c, gm_u = random_gm(3, 2, 2, 2), random_gm(3, 2, 2, 2)
    result = guide(gm_c, gm_u, 0.3, orthogonal=0.0)
    direction = gm_to_mean(gm_c) - gm_to_mean(gm_u)
    factor = result.bias / direction
    assert_close(factor, factor[:, :1, :1, :1].expand_as(factor))
    assert bool((factor > 0).all())


def test_guidance_bias_scales_linearly_with_w(generator):
    mu_c = torch.randn(2, 3, 4, 4, generator=generator, dtype=F64)
    mu_u = torch.randn(2, 3, 4, 4, generator=generator, dtype=F64)
    v = torch.full((2, 1, 1, 1), 0.4, dtype=F64)
    assert_close(guidance_bias(mu_c, mu_u, v, 0.6), 3 * guidance_bias(mu_c, mu_u, v, 0.2))


@pytest.mark.parametrize("w", [-0.1, 1.0, 1.5])
def test_guidance_scale_outside_unit_interval_raises(random_gm, w):
    gm = random_gm(2, 1, 1, 1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        probabilistic_guidance(gm, gm, w)


def test_cfg_shifts_every_component_mean(random_gm):
    gm_c, gm_u = random_gm(3, 2, 2, 2), random_gm(3, 2, 2, 2)
    g = 2.5
    out = cfg_guidance(gm_c, gm_u, g)
    mu_c, mu_u = gm_to_mean(gm_c), gm_to_mean(gm_u)
    assert_close(gm_to_mean(out), mu_c + (g - 1) * (mu_c - mu_u))
    assert_close(
        out.means - gm_c.means, ((g - 1) * (mu_c - mu_u)).unsqueeze(1).expand_as(out.means)
    )
    assert torch.equal(out.logweights, gm_c.logweights) and torch.equal(out.logstds, gm_c.logstds)
    assert cfg_guidance(gm_c, gm_u, 1.0) is gm_c
    with pytest.raises(ValueError, match="g must be >= 1"):
        cfg_guidance(gm_c, gm_u, 0.5)


# ---- CFG with the opt-in orthogonal projection (spec 6, "Baseline CFG") ----------------------


def _plain_cfg(gm_c: GaussianMixture, gm_u: GaussianMixture, g: float) -> GaussianMixture:
    """cfg_guidance as it was before the orthogonal option (same ops, to compare bit for bit)."""
    bias = (g - 1) * (gm_to_mean(gm_c) - gm_to_mean(gm_u))
    return GaussianMixture(gm_c.means + bias.unsqueeze(-4), gm_c.logweights, gm_c.logstds)


def _projected_cfg_bias(gm_c: GaussianMixture, gm_u: GaussianMixture, g: float, o: float):
    """Reference: b = (g − 1)(μ_c − μ_u) minus o times its least-squares projection on μ_c,
    from flattened per-sample dot products."""
    mu_c = gm_to_mean(gm_c)
    b = (g - 1) * (mu_c - gm_to_mean(gm_u))
    flat_b, flat_m = b.flatten(1), mu_c.flatten(1)
    coef = (flat_b * flat_m).sum(1) / (flat_m * flat_m).sum(1)
    return b - o * coef.reshape(-1, 1, 1, 1) * mu_c


def test_fully_orthogonal_cfg_bias_is_orthogonal_to_the_conditional_mean(random_gm):
    gm_c, gm_u = random_gm(3, 3, 4, 4, batch=(4,)), random_gm(3, 3, 4, 4, batch=(4,))
    g = 3.0
    out = cfg_guidance(gm_c, gm_u, g, orthogonal=1.0)
    shift = out.means - gm_c.means  # (B, K, C, H, W): one bias for every component
    bias = shift[:, :1]
    assert_close(shift, bias.expand_as(shift), rtol=0, atol=1e-15)
    mu_c = gm_to_mean(gm_c)
    plain = (g - 1) * (mu_c - gm_to_mean(gm_u))
    assert bool((_inner(plain, mu_c).abs() > 1e-3).all())  # the projection has work to do
    zeros = torch.zeros(4, 1, 1, 1, dtype=F64)
    assert_close(_inner(bias.squeeze(1), mu_c), zeros, rtol=0, atol=1e-15)
    assert_close(bias.squeeze(1), _projected_cfg_bias(gm_c, gm_u, g, 1.0), rtol=0, atol=1e-14)
    assert_close(gm_to_mean(out), mu_c + bias.squeeze(1))
    assert torch.equal(out.logweights, gm_c.logweights) and torch.equal(out.logstds, gm_c.logstds)


def test_cfg_projection_strength_interpolates_and_zero_is_plain_cfg(random_gm):
    gm_c, gm_u = random_gm(3, 2, 3, 3, batch=(3,)), random_gm(3, 2, 3, 3, batch=(3,))
    g = 2.5
    plain = _plain_cfg(gm_c, gm_u, g)
    for out in (cfg_guidance(gm_c, gm_u, g), cfg_guidance(gm_c, gm_u, g, orthogonal=0.0)):
        assert torch.equal(out.means, plain.means)
        assert torch.equal(out.logweights, plain.logweights)
        assert torch.equal(out.logstds, plain.logstds)
    for o in (0.3, 0.75):
        bias = (cfg_guidance(gm_c, gm_u, g, orthogonal=o).means - gm_c.means)[:, 0]
        assert_close(bias, _projected_cfg_bias(gm_c, gm_u, g, o), rtol=0, atol=1e-14)
    assert cfg_guidance(gm_c, gm_u, 1.0, orthogonal=1.0) is gm_c


def test_cfg_orthogonal_numeric_vector():
    """Hand-computed: μ_c = [1, 2, −1, 0.5], μ_u = [0.5, 2.5, −1, 0], g = 3 ⇒ b = [1, −1, 0, 1],
    ⟨b, μ_c⟩ = −0.125, ⟨μ_c, μ_c⟩ = 1.5625 ⇒ b ← b + 0.08 o μ_c; the conditional GM has two
    equal-weight components μ_c ± δ, both shifted by b."""
    mu_c = torch.tensor([1, 2, -1, 0.5], dtype=F64).reshape(1, 1, 1, 2, 2)
    mu_u = torch.tensor([0.5, 2.5, -1, 0], dtype=F64).reshape(1, 1, 1, 2, 2)
    delta = torch.tensor([0.3, -0.2, 0.1, 0.4], dtype=F64).reshape(1, 1, 1, 2, 2)
    gm_c = GaussianMixture(
        torch.cat([mu_c + delta, mu_c - delta], dim=1),
        torch.full((1, 2, 1, 2, 2), math.log(0.5), dtype=F64),
        torch.full((1, 1, 1, 1, 1), math.log(0.3), dtype=F64),
    )
    gm_u = _single_gaussian(mu_u, 0.09)
    tol = {"rtol": 0, "atol": 1e-15}
    for o, bias in (
        (0.0, [1.0, -1.0, 0.0, 1.0]),
        (0.5, [1.04, -0.92, -0.04, 1.02]),
        (1.0, [1.08, -0.84, -0.08, 1.04]),
    ):
        out = cfg_guidance(gm_c, gm_u, 3.0, orthogonal=o)
        b = torch.tensor(bias, dtype=F64).reshape(1, 1, 1, 2, 2)
        assert_close(out.means, torch.cat([mu_c + delta + b, mu_c - delta + b], dim=1), **tol)
    assert_close(_inner(b, mu_c).item(), 0.0, **tol)  # o = 1: 1.08 − 1.68 + 0.08 + 0.52 = 0


def test_cfg_and_probabilistic_guidance_share_the_projection(random_gm):
    """Same o ⇒ same direction: the CFG bias is a positive per-sample multiple of guidance_bias."""
    gm_c, gm_u = random_gm(2, 3, 4, 4, batch=(3,)), random_gm(2, 3, 4, 4, batch=(3,))
    mu_c, mu_u = gm_to_mean(gm_c), gm_to_mean(gm_u)
    var = torch.full((3, 1, 1, 1), 0.5, dtype=F64)
    for o in (0.4, 1.0):
        cfg_bias = (cfg_guidance(gm_c, gm_u, 2.0, orthogonal=o).means - gm_c.means)[:, 0]
        factor = cfg_bias / guidance_bias(mu_c, mu_u, var, 0.3, orthogonal=o)
        assert_close(factor, factor[:, :1, :1, :1].expand_as(factor))
        assert bool((factor > 0).all())


@pytest.mark.parametrize(
    ("orthogonal", "error", "match"),
    [
        (-0.1, ValueError, r"orthogonal must lie in \[0, 1\]"),
        (1.5, ValueError, r"orthogonal must lie in \[0, 1\]"),
        (math.nan, ValueError, r"orthogonal must lie in \[0, 1\]"),
        (True, TypeError, "must be a number"),
        (torch.tensor(0.5), TypeError, "must be a number"),
    ],
)
def test_cfg_orthogonal_outside_unit_interval_raises(random_gm, orthogonal, error, match):
    gm = random_gm(2, 1, 1, 1)
    with pytest.raises(error, match=match):
        cfg_guidance(gm, gm, 2.0, orthogonal=orthogonal)


NULL = 3  # null class of the toy denoiser below (classes 0-2)


def _class_denoiser():
    """A deterministic class-conditional u-GM (K = 2, C = 3, 2 × 2) that depends on x_t and σ."""
    g = torch.Generator().manual_seed(5)
    offsets = torch.randn(2, 3, 2, 2, generator=g, dtype=F64)
    classes = torch.randn(4, 3, 1, 1, generator=g, dtype=F64)
    calls = []

    def denoiser(x_t, sigma, labels):
        calls.append(x_t.shape[0])
        s = sigma.reshape(-1, 1, 1, 1, 1)
        means = (0.5 + 0.3 * s) * x_t.unsqueeze(1) + offsets + classes[labels].unsqueeze(1)
        logits = 0.5 * torch.stack([x_t[:, 0], -x_t[:, 0]], dim=1).unsqueeze(2)
        logstds = torch.full((x_t.shape[0], 1, 1, 1, 1), math.log(0.3), dtype=F64)
        return GaussianMixture(means, torch.log_softmax(logits, dim=1), logstds)

    denoiser.calls = calls
    return denoiser


def _euler_guided_loop(den, x, labels, num_steps, guide_fn):
    """Euler on the guided x0-GM mean with one [cond; null] call per step, written out."""
    null = torch.full_like(labels, NULL)
    for s, s_next in pairwise(sigma_grid(num_steps).tolist()):
        x_in = torch.cat([x, x])
        sigmas = torch.full((x_in.shape[0],), s, dtype=x.dtype)
        gm_c, gm_u = u_to_x0(den(x_in, sigmas, torch.cat([labels, null])), x_in, s).chunk(2)
        x = flow_euler_step(x, gm_to_mean(guide_fn(gm_c, gm_u)), s, s_next)
    return x


def test_sample_cfg_default_is_plain_cfg_and_the_projection_is_opt_in():
    den = _class_denoiser()
    x1 = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    labels = torch.tensor([0, 1, 2, 1])
    g, n = 2.5, 4
    args = {
        "solver": "euler",
        "num_steps": n,
        "guidance": "cfg",
        "guidance_scale": g,
        "class_labels": labels,
        "null_class_id": NULL,
    }
    want = _euler_guided_loop(den, x1, labels, n, lambda c, u: _plain_cfg(c, u, g))
    # the default, an explicit 0, and probabilistic guidance's o (not used by CFG): plain CFG
    for extra in ({}, {"cfg_orthogonal_guidance": 0.0}, {"orthogonal_guidance": 0.3}):
        assert torch.equal(sample(den, x1, **args, **extra), want), extra
    projected = sample(den, x1, **args, cfg_orthogonal_guidance=1.0)
    ref = _euler_guided_loop(
        den,
        x1,
        labels,
        n,
        lambda c, u: GaussianMixture(
            c.means + _projected_cfg_bias(c, u, g, 1.0).unsqueeze(1), c.logweights, c.logstds
        ),
    )
    assert_close(projected, ref, rtol=0, atol=1e-12)
    assert (projected - want).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"guidance": "cfg", "cfg_orthogonal_guidance": 1.5}, r"cfg_orthogonal_guidance must li"),
        ({"guidance": "cfg", "cfg_orthogonal_guidance": -0.5}, r"\[0, 1\]"),
        ({"guidance": "cfg", "cfg_orthogonal_guidance": True}, "must be a number"),
        ({"guidance_scale": 0.3, "cfg_orthogonal_guidance": 0.5}, "only applies to guidance='cfg'"),
    ],
)
def test_sample_rejects_bad_cfg_orthogonal_guidance(kwargs, match):
    den = _class_denoiser()
    labels = torch.zeros(2, dtype=torch.long)
    args = {"solver": "euler", "num_steps": 2, "guidance_scale": 2.0, "class_labels": labels}
    args |= {"null_class_id": NULL} | kwargs
    with pytest.raises(ConfigError, match=match):
        sample(den, torch.zeros(2, 3, 2, 2, dtype=F64), **args)
    assert den.calls == []
