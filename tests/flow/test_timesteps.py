"""Noise-level samplers, transition pairs, inference grids (spec 4.1, 4.2, 8.1; oracle 30, v50)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch.testing import assert_close

from gmflow.errors import ConfigError
from gmflow.flow import sample_timesteps, shift_sigma, sigma_grid, transition_pair

F64 = torch.float64


def test_sigma_grid_numeric_vectors():
    assert_close(
        sigma_grid(8), torch.tensor([1, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0], dtype=F64)
    )
    expected = [1, 0.95454545, 0.9, 0.83333333, 0.75, 0.64285714, 0.5, 0.3, 0]
    assert_close(sigma_grid(8, 3.0), torch.tensor(expected, dtype=F64), rtol=0, atol=5e-9)


@pytest.mark.parametrize("shift", [0.3, 1.0, 3.0])
@pytest.mark.parametrize("num_steps", [1, 7, 128])
def test_sigma_grid_is_strictly_decreasing_from_one_to_zero(num_steps, shift):
    grid = sigma_grid(num_steps, shift)
    assert grid.shape == (num_steps + 1,)
    assert grid[0].item() == 1.0 and grid[-1].item() == 0.0
    assert bool((grid[1:] < grid[:-1]).all())


def test_shift_is_monotone_and_fixes_the_endpoints():
    sigma = torch.linspace(0, 1, 1001, dtype=F64)
    for s in (0.2, 1.0, 3.0, 10.0):
        warped = shift_sigma(sigma, s)
        assert warped[0].item() == 0.0 and warped[-1].item() == 1.0
        assert bool((warped[1:] > warped[:-1]).all())
    assert torch.equal(shift_sigma(sigma, 1.0), sigma)
    # shift s then 1/s is the identity (the warp is a Möbius map with inverse s -> 1/s)
    assert_close(shift_sigma(shift_sigma(sigma, 3.0), 1 / 3.0), sigma)


def test_uniform_timesteps_are_uniform_and_reproducible(generator):
    sigma = sample_timesteps(20_000, generator=generator, dtype=F64)
    assert sigma.shape == (20_000,) and bool((sigma >= 1e-7).all() and (sigma <= 1).all())
    assert stats.kstest(sigma.numpy(), "uniform").pvalue > 1e-3
    again = sample_timesteps(20_000, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert torch.equal(sigma, again)


def test_logit_normal_timesteps_have_normal_logits(generator):
    sigma = sample_timesteps(
        20_000, kind="logit_normal", mean=0.3, std=0.8, generator=generator, dtype=F64
    )
    logits = torch.logit(sigma).numpy()
    assert stats.kstest(logits, lambda v: stats.norm.cdf(v, 0.3, 0.8)).pvalue > 1e-3


def test_shifted_timesteps_follow_the_warped_law(generator):
    s = 3.0
    sigma = sample_timesteps(20_000, shift=s, generator=generator, dtype=F64).numpy()
    # P(σ <= y) = P(r <= shift⁻¹(y)) with shift⁻¹(y) = y / (s − (s − 1) y)
    cdf = lambda y: y / (s - (s - 1) * y)  # noqa: E731
    assert stats.kstest(sigma, cdf).pvalue > 1e-3


def test_timesteps_are_clamped_to_eps(generator):
    sigma = sample_timesteps(1000, kind="logit_normal", mean=-30.0, generator=generator, eps=1e-3)
    assert bool((sigma == 1e-3).all())


@pytest.mark.parametrize(
    "kwargs",
    [{"kind": "cosine"}, {"shift": 0.0}, {"kind": "logit_normal", "std": 0.0}, {"eps": 1.0}],
)
def test_bad_timestep_options_raise(kwargs):
    with pytest.raises(ConfigError):
        sample_timesteps(4, **kwargs)


def test_transition_pair_levels_follow_the_trans_ratio(generator):
    x0 = torch.randn(6, 2, 1, 1, generator=generator, dtype=F64)
    sigma_high = torch.tensor([1e-7, 1e-6, 0.1, 0.5, 0.9, 1.0], dtype=F64)
    _, _, sigma_low = transition_pair(x0, sigma_high, 0.9, generator)
    expected = torch.minimum((1 - 0.9) * sigma_high, sigma_high - 1e-7).clamp_min(0)
    assert_close(sigma_low, expected, rtol=0, atol=0)
    assert sigma_low[0].item() == 0.0


def test_transition_pair_with_ratio_one_is_the_data_itself(generator):
    x0 = torch.randn(5, 3, 2, 2, generator=generator, dtype=F64)
    sigma_high = torch.rand(5, generator=generator, dtype=F64)
    x_low, _, sigma_low = transition_pair(x0, sigma_high, 1.0, generator)
    assert bool((sigma_low == 0).all())
    assert torch.equal(x_low, x0)


def test_transition_pair_has_the_joint_law_of_the_path(generator):
    """x_low − α_l x0 ~ N(0, σ_l²), x_high − α_h x0 ~ N(0, σ_h²), covariance (α_h/α_l) σ_l² (MC)."""
    n, s_h, ratio = 400_000, 0.8, 0.5
    x0 = torch.randn(n, 1, 1, 1, generator=generator, dtype=F64)
    x_low, x_high, s_l = transition_pair(x0, torch.full((n,), s_h, dtype=F64), ratio, generator)
    s_l = s_l[0].item()
    r_low, r_high = (x_low - (1 - s_l) * x0).flatten(), (x_high - (1 - s_h) * x0).flatten()
    tol = 5 * math.sqrt(2 / n)  # 5 relative standard errors of a Gaussian variance
    assert abs(r_low.var().item() / s_l**2 - 1) < tol
    assert abs(r_high.var().item() / s_h**2 - 1) < tol
    cov = (r_low * r_high).mean().item()
    want = (1 - s_h) / (1 - s_l) * s_l**2
    assert abs(cov - want) < 5 * s_l * s_h / math.sqrt(n)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_transition_pair_rejects_bad_ratios(ratio):
    with pytest.raises(ConfigError, match="trans_ratio"):
        transition_pair(torch.zeros(2, 1, 1, 1), torch.ones(2), ratio)
