"""Diffusers schedulers: grids (oracles 30, 50), steps (29, 51), the swap, loop equivalence."""

from __future__ import annotations

import math

import pytest
import torch

from gmflow.errors import ConfigError
from gmflow.flow import sample
from gmflow.gm import GaussianMixture
from gmflow.pipelines import schedulers
from gmflow.pipelines.schedulers import FlowEulerODEScheduler, FlowSDEScheduler


def _fixed_noise(monkeypatch: pytest.MonkeyPatch, value: float) -> None:
    """Make FlowSDEScheduler draw z = value everywhere."""

    def randn_tensor(shape, generator=None, device=None, dtype=None):  # type: ignore[no-untyped-def]
        return torch.full(shape, value, device=device, dtype=dtype)

    monkeypatch.setattr(schedulers, "randn_tensor", randn_tensor)


@pytest.mark.parametrize("cls", [FlowEulerODEScheduler, FlowSDEScheduler])
@pytest.mark.parametrize(
    ("shift", "expected"),
    [
        (1.0, [1, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0]),
        (3.0, [1, 0.95454545, 0.9, 0.83333333, 0.75, 0.64285714, 0.5, 0.3, 0]),
    ],
)
def test_grid_matches_oracle_50(cls, shift, expected):
    scheduler = cls(shift=shift)
    scheduler.set_timesteps(8)
    torch.testing.assert_close(scheduler.sigmas, torch.tensor(expected), rtol=0, atol=1e-7)
    torch.testing.assert_close(scheduler.timesteps, 1000 * scheduler.sigmas[:-1])
    assert float(scheduler.timesteps[0]) == 1000.0 and scheduler.step_index == 0


def _one_step(scheduler, sigma_from: float, x: float, x0: float) -> float:  # type: ignore[no-untyped-def]
    """Step from σ = sigma_from to the next level of a 4-step uniform grid (0.75 -> 0.5)."""
    scheduler.set_timesteps(4)
    j = scheduler.sigma_grid.index(sigma_from)
    for _ in range(j):  # advance to index j with dummy steps
        scheduler.step(torch.zeros(1), scheduler.timesteps[scheduler.step_index], torch.zeros(1))
    t = scheduler.timesteps[j]
    return float(scheduler.step(torch.tensor([x0]), t, torch.tensor([x])).prev_sample)


def test_one_step_oracle_51(monkeypatch):
    assert _one_step(FlowEulerODEScheduler(), 0.75, 0.4, -0.2) == pytest.approx(0.2, abs=1e-7)
    _fixed_noise(monkeypatch, 0.3)
    assert _one_step(FlowSDEScheduler(), 0.75, 0.4, -0.2) == pytest.approx(0.14142136, abs=1e-7)


@pytest.mark.parametrize(("s", "s_to"), [(0.7, 0.3), (1.0, 0.5), (0.25, 0.125)])
def test_sde_h1_is_the_ddpm_posterior_sample_oracle_29(monkeypatch, s, s_to):
    """x' = c1 x + c2 x̂0 + sqrt(c3) z with the posterior of the forward transition σ' -> σ."""
    z = 0.37
    _fixed_noise(monkeypatch, z)
    a, a_to = 1 - s, 1 - s_to
    ratio = a / a_to  # forward: x_σ = ratio x_σ' + sqrt(σ² − ratio² σ'²) ε
    b2 = s**2 - ratio**2 * s_to**2
    c3 = 1 / (1 / s_to**2 + (ratio**2 / b2 if b2 > 0 else math.inf))
    c1 = c3 * ratio / b2 if b2 > 0 else 0.0
    c2 = c3 * a_to / s_to**2
    x, x0 = torch.tensor([0.8], dtype=torch.float64), torch.tensor([-0.3], dtype=torch.float64)
    scheduler = FlowSDEScheduler()
    scheduler.set_timesteps(1)
    scheduler.sigma_grid = [s, s_to]  # a one-step grid between the two levels
    scheduler.timesteps = torch.tensor([1000 * s])
    out = scheduler.step(x0, 1000 * s, x).prev_sample
    torch.testing.assert_close(out, c1 * x + c2 * x0 + math.sqrt(c3) * z, rtol=0, atol=1e-12)


def test_sde_h0_is_the_euler_step_and_last_step_returns_x0():
    x, x0 = (
        torch.randn(2, 3, 4, 4, dtype=torch.float64),
        torch.randn(2, 3, 4, 4, dtype=torch.float64),
    )
    ode, sde = FlowEulerODEScheduler(shift=2.0), FlowSDEScheduler(shift=2.0, h=0.0)
    ode.set_timesteps(3)
    sde.set_timesteps(3)
    for t in ode.timesteps:
        x_ode = ode.step(x0, t, x).prev_sample
        x_sde = sde.step(x0, t, x).prev_sample
        torch.testing.assert_close(x_sde, x_ode, rtol=0, atol=1e-12)
        x = x_ode
    assert torch.equal(x, x0)  # σ_M = 0: both return x̂0 exactly


def test_from_config_swaps_the_two_schedulers_keeping_shift(tmp_path):
    ode = FlowEulerODEScheduler(shift=3.0)
    sde = FlowSDEScheduler.from_config(ode.config)
    assert isinstance(sde, FlowSDEScheduler) and sde.config.shift == 3.0 and sde.config.h == 1.0
    back = FlowEulerODEScheduler.from_config(FlowSDEScheduler(shift=2.0, h=0.5).config)
    assert isinstance(back, FlowEulerODEScheduler) and back.config.shift == 2.0
    assert set(ode.compatibles) == {FlowEulerODEScheduler, FlowSDEScheduler}
    sde = FlowSDEScheduler(num_train_timesteps=1000, shift=2.5, h=0.7)
    sde.save_pretrained(tmp_path)
    loaded = FlowSDEScheduler.from_pretrained(tmp_path)
    assert (loaded.config.shift, loaded.config.h) == (2.5, 0.7)


class _LinearDenoiser:
    """A fixed GM denoiser: K = 2 components whose u-means are linear in x_t."""

    def __call__(self, x_t, sigma, class_labels):  # type: ignore[no-untyped-def]
        s = sigma.reshape(-1, 1, 1, 1, 1).to(x_t.dtype)
        means = torch.stack([0.9 * x_t + 0.1, 1.1 * x_t - 0.2 * s[:, 0]], dim=1)
        logweights = torch.log_softmax(torch.stack([x_t[:, :1], -x_t[:, :1]], dim=1), dim=1)
        return GaussianMixture(means, logweights, torch.full_like(s, -1.0))


def _loop(scheduler, denoiser, x, steps, generator=None):  # type: ignore[no-untyped-def]
    """A Diffusers-style loop over the scheduler with the GM mean as x0 prediction."""
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        sigma = scheduler.sigma_grid[scheduler.step_index]  # the fp64 level of t = 1000·σ
        gm = denoiser(x, torch.full((x.shape[0],), sigma, dtype=x.dtype), None)
        x0_hat = x - sigma * (gm.logweights.exp() * gm.means).sum(dim=1)
        x = scheduler.step(x0_hat, t, x, generator=generator).prev_sample
    return x


def test_scheduler_loops_equal_flow_sample_euler_and_ddpm():
    """The schedulers are thin adapters: their loops equal the stateless solvers step for step."""
    noise = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    den = _LinearDenoiser()
    ref = sample(den, noise, solver="euler", num_steps=5, shift=2.0)
    out = _loop(FlowEulerODEScheduler(shift=2.0), den, noise, 5)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    ref = sample(den, noise, solver="ddpm", num_steps=5, generator=torch.Generator().manual_seed(3))
    out = _loop(FlowSDEScheduler(), den, noise, 5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_step_misuse_raises():
    scheduler = FlowEulerODEScheduler()
    x = torch.zeros(1)
    with pytest.raises(ConfigError, match="set_timesteps"):
        scheduler.step(x, 1000.0, x)
    scheduler.set_timesteps(2)
    with pytest.raises(ConfigError, match="expects timestep 1000"):
        scheduler.step(x, 500.0, x)
    scheduler.step(x, 1000.0, x)
    scheduler.step(x, 500.0, x)
    with pytest.raises(ConfigError, match="all 2 steps are done"):
        scheduler.step(x, 0.0, x)
    with pytest.raises(ConfigError, match="h must be >= 0"):
        FlowSDEScheduler(h=-1.0)
    with pytest.raises(ConfigError, match="shift"):
        FlowEulerODEScheduler(shift=0.0).set_timesteps(4)
