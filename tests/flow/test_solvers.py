"""Solver steps and the ``sample`` loop (spec 8; oracles 27-29, 33, 34; numeric vector 51).

The strongest checks use data that is itself a GM with a shared isotropic variance: its exact
denoising distribution is a GM, so the "network" below is exact, GM-SDE must reproduce the data
for any number of steps and GM-ODE must follow the exact probability-flow ODE.
"""

from __future__ import annotations

import math

import pytest
import torch
from exact_data import (
    F64,
    NULL,
    ExactDenoiser,
    data_1d,
    data_2d,
    data_classes,
    noise,
    pf_ode_reference,
)
from scipy import stats
from torch.testing import assert_close

from gmflow.errors import ConfigError
from gmflow.flow import (
    default_num_substeps,
    flow_euler_step,
    flow_sde_step,
    reverse_transition_coefs,
    sample,
    sigma_grid,
)
from gmflow.gm import GaussianMixture, IsoGaussian, gm_to_mean, gm_to_sample

# ---- single steps -------------------------------------------------------------------------


def test_solver_steps_numeric_vector():
    x, x0 = torch.full((1, 1, 1, 1), 0.4, dtype=F64), torch.full((1, 1, 1, 1), -0.2, dtype=F64)
    assert_close(flow_euler_step(x, x0, 0.75, 0.5).item(), 0.2, rtol=0, atol=1e-15)
    z = torch.full((1, 1, 1, 1), 0.3, dtype=F64)
    assert_close(flow_sde_step(x, x0, 0.75, 0.5, z).item(), 0.14142136, rtol=0, atol=5e-9)


def test_sde_step_is_the_ddpm_posterior_and_its_limits(generator):
    """Oracle 29: h = 1 ⇒ c1 x + c2 x̂0 + sqrt(c3) z; h = 0 ⇒ the Euler step; σ' = 0 ⇒ x̂0."""
    x, x0, z = (torch.randn(3, 2, 2, 2, generator=generator, dtype=F64) for _ in range(3))
    sigma, sigma_next = (
        torch.tensor([1.0, 0.6, 0.3], dtype=F64),
        torch.tensor([0.7, 0.2, 0.1], dtype=F64),
    )
    c1, c2, c3 = (c.reshape(-1, 1, 1, 1) for c in reverse_transition_coefs(sigma, sigma_next))
    assert_close(flow_sde_step(x, x0, sigma, sigma_next, z), c1 * x + c2 * x0 + c3.sqrt() * z)
    assert_close(
        flow_sde_step(x, x0, sigma, sigma_next, z, diffusion=0.0),
        flow_euler_step(x, x0, sigma, sigma_next),
    )
    assert torch.equal(flow_sde_step(x, x0, 0.5, 0.0, z), x0)
    assert torch.equal(flow_euler_step(x, x0, 0.5, 0.0), x0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("sigma", "sigma_next"), [(1.0, 0.7), (0.6, 0.2), (0.3, 1e-7), (2e-7, 0.0)]
)
def test_float_levels_match_tensor_levels(generator, dtype, sigma, sigma_next):
    """The samplers pass Python-float levels (a fused fast path); per-sample tensors take the
    general path; both are the same maths."""
    x, x0, z = (torch.randn(3, 2, 2, 2, generator=generator, dtype=dtype) for _ in range(3))
    s, s_next = torch.full((3,), sigma, dtype=F64), torch.full((3,), sigma_next, dtype=F64)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == F64 else {"rtol": 1e-5, "atol": 1e-5}
    fast = flow_euler_step(x, x0, sigma, sigma_next)
    assert fast.dtype == dtype
    assert_close(fast, flow_euler_step(x, x0, s, s_next).to(dtype), **tol)
    for h in (0.0, 0.5, 1.0):
        fast = flow_sde_step(x, x0, sigma, sigma_next, z, diffusion=h)
        assert fast.dtype == dtype
        assert_close(fast, flow_sde_step(x, x0, s, s_next, z, diffusion=h).to(dtype), **tol)


def test_default_num_substeps():
    steps = (1, 3, 4, 5, 6, 7, 8, 16, 32, 100)
    assert [default_num_substeps(n) for n in steps] == [128, 43, 8, 26, 8, 19, 16, 8, 4, 2]


# ---- exactness with GM data ------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [1, 3, 10])
def test_gm_sde_reproduces_1d_gm_data_for_any_number_of_steps(num_steps):
    """Oracle 28: every GM-SDE step samples the exact reverse transition ⇒ x(σ = 0) ~ data."""
    den, n = data_1d(), 20_000
    x = sample(
        den,
        noise(n, 1),
        solver="gm-sde",
        num_steps=num_steps,
        generator=torch.Generator().manual_seed(2),
    )
    x = x.flatten()
    w, m = den.logweights.exp().flatten(), den.means.flatten()
    mean = (w * m).sum()
    var = (w * (m**2 + den.v0)).sum() - mean**2
    assert abs(x.mean() - mean) < 5 * math.sqrt(var / n)  # 5 standard errors
    assert abs(x.var() - var) < 5 * (x - x.mean()).square().std() / math.sqrt(n)
    assert stats.kstest(x.numpy(), den.data_cdf_1d).pvalue > 1e-3


def test_gm_sde_reproduces_2d_gm_data():
    den, n = data_2d(), 20_000
    x = sample(
        den, noise(n, 2), solver="gm-sde", num_steps=4, generator=torch.Generator().manual_seed(3)
    )
    x = x.reshape(n, 2)
    w, m = den.logweights.exp().reshape(3, 1), den.means.reshape(3, 2)
    w_list, m_list = w.flatten().tolist(), m.tolist()
    mean = (w * m).sum(0)
    cov = (w * m).T @ m - torch.outer(mean, mean) + den.v0 * torch.eye(2, dtype=F64)
    centred = x - x.mean(0)
    prods = centred.unsqueeze(2) * centred.unsqueeze(1)  # (n, 2, 2)
    assert bool(((x.mean(0) - mean).abs() < 5 * cov.diagonal().sqrt() / math.sqrt(n)).all())
    assert bool(((prods.mean(0) - cov).abs() < 5 * prods.std(0) / math.sqrt(n)).all())
    for axis in range(2):  # each coordinate's marginal is a 1-D GM
        cdf = lambda v, a=axis: sum(  # noqa: E731
            wk * stats.norm.cdf(v, mk[a], math.sqrt(den.v0))
            for wk, mk in zip(w_list, m_list, strict=True)
        )
        assert stats.kstest(x[:, axis].numpy(), cdf).pvalue > 1e-3


@pytest.mark.parametrize(("s_from", "s_next"), [(1.0, 0.4), (0.7, 0.3), (0.35, 0.1)])
def test_one_gm_sde_step_gives_the_exact_intermediate_marginal(s_from, s_next):
    """From the exact marginal at σ (pure noise at σ = 1), one step lands on α' x0 + σ' ε: a GM
    with variance α'² v0 + σ'² (oracle 28)."""
    den, n = data_1d(), 20_000
    gen = torch.Generator().manual_seed(4)
    w, m = den.logweights.exp().flatten().tolist(), den.means.flatten().tolist()
    if s_from == 1.0:
        x_from = noise(n, 1)
    else:  # x_σ = α x0 + σ ε with x0 from the data GM
        comp = torch.multinomial(torch.tensor(w, dtype=F64), n, replacement=True, generator=gen)
        data = torch.tensor(m, dtype=F64)[comp] + math.sqrt(den.v0) * torch.randn(
            n, generator=gen, dtype=F64
        )
        eps = torch.randn(n, generator=gen, dtype=F64)
        x_from = ((1 - s_from) * data + s_from * eps).reshape(n, 1, 1, 1)
    sigma = torch.full((n,), s_from, dtype=F64)
    x0 = gm_to_sample(den.x0_posterior(x_from, sigma), 1, generator=gen).squeeze(1)
    x = flow_sde_step(
        x_from, x0, s_from, s_next, torch.randn(x_from.shape, generator=gen, dtype=F64)
    ).flatten()
    a = 1 - s_next
    sd = math.sqrt(a**2 * den.v0 + s_next**2)
    cdf = lambda v: sum(wk * stats.norm.cdf(v, a * mk, sd) for wk, mk in zip(w, m, strict=True))  # noqa: E731
    assert stats.kstest(x.numpy(), cdf).pvalue > 1e-3


def exact_euler(den: ExactDenoiser, x: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Euler on dx/dσ = (x − E[x0 | x])/σ with the exact posterior mean, uniform σ grid."""
    grid = sigma_grid(num_steps).tolist()
    for s, s_next in zip(grid[:-1], grid[1:], strict=True):
        x0 = gm_to_mean(den.x0_posterior(x, torch.full((x.shape[0],), s, dtype=F64)))
        x = x + (s_next - s) * (x - x0) / s
    return x


@pytest.mark.parametrize(("num_steps", "num_substeps"), [(1, 16), (4, 4), (3, 5)])
def test_gm_ode_equals_euler_on_the_exact_velocity(num_steps, num_substeps):
    """Oracle 25 in action: with the exact GM, the sub-step re-conditioning is exact."""
    den, x1 = data_2d(), noise(64, 2)
    got = sample(den, x1, solver="gm-ode", num_steps=num_steps, num_substeps=num_substeps)
    assert_close(got, exact_euler(den, x1, num_steps * num_substeps), rtol=0, atol=1e-10)
    assert len(den.calls) == num_steps


def test_gm_ode_converges_to_the_probability_flow_ode_like_one_over_s():
    """Oracle 27: N = 1 network step and S sub-steps; the error halves each time S doubles."""
    den, x1 = data_2d(), noise(128, 2)
    den.v0 = 0.25  # wider modes: the asymptotic 1/S regime starts at S ~ 8 (at v0 = 0.09, S ~ 64)
    reference = pf_ode_reference(den, x1)
    errors = []
    for s in (8, 16, 32, 64):
        x = sample(den, x1, solver="gm-ode", num_steps=1, num_substeps=s)
        errors.append((x - reference).square().mean().sqrt().item())
    ratios = [a / b for a, b in zip(errors[:-1], errors[1:], strict=True)]
    assert all(1.8 < r < 2.2 for r in ratios), (errors, ratios)


def test_order_two_is_inert_with_the_exact_gm():
    """Oracle 33 end to end: the exact GM makes Δ = 0, so order 2 equals order 1 (unguided)."""
    den, x1 = data_2d(), noise(256, 2)
    for solver, substeps in (("gm-ode", 4), ("gm-sde", None)):
        kwargs = {"solver": solver, "num_steps": 4, "num_substeps": substeps}
        one = sample(den, x1, generator=torch.Generator().manual_seed(5), **kwargs)
        two = sample(den, x1, order=2, generator=torch.Generator().manual_seed(5), **kwargs)
        assert_close(two, one, rtol=0, atol=1e-8)


# ---- equivalences with plain samplers --------------------------------------------------------


class LinearGMDenoiser:
    """A fixed, non-trivial u-GM as a function of (x_t, σ): K = 3, C = 2, 2x2 pixels."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(7)
        self.a = 0.5 * torch.randn(3, 2, 1, 1, generator=g, dtype=F64)
        self.b = torch.randn(3, 2, 2, 2, generator=g, dtype=F64)
        self.d = torch.randn(3, 1, 1, 1, generator=g, dtype=F64)
        self.calls = 0

    def __call__(self, x_t, sigma, labels):
        self.calls += 1
        s = sigma.reshape(-1, 1, 1, 1, 1).to(F64)
        x = x_t.to(F64).unsqueeze(1)
        means = self.a * x + s * self.b
        logweights = torch.log_softmax(self.d * x.sum(2, keepdim=True), dim=1)
        return GaussianMixture(means, logweights, torch.log(0.5 + s))


def manual_x0_loop(den, x, num_steps, step):
    grid = sigma_grid(num_steps).tolist()
    for s, s_next in zip(grid[:-1], grid[1:], strict=True):
        gm_u = den(x, torch.full((x.shape[0],), s, dtype=F64), None)
        x0 = x - s * (gm_u.logweights.exp() * gm_u.means).sum(1)  # E[x0|x] = x − σ Σ A μ^u
        x = step(x, x0, s, s_next)
    return x


def test_first_order_mean_mode_is_a_plain_ddim_sampler(generator):
    """Oracle 34: order 1, mean mode, S = 1, w = 0 equals DDIM/Euler on E[x0 | x_t]."""
    den = LinearGMDenoiser()
    x1 = torch.randn(4, 2, 2, 2, generator=generator, dtype=F64)

    def ddim(x, x0, s, s_next):
        return (s_next / s) * x + (1 - s_next / s) * x0

    want = manual_x0_loop(den, x1, 6, ddim)
    assert_close(
        sample(den, x1, solver="gm-ode", num_steps=6, num_substeps=1), want, rtol=0, atol=1e-12
    )
    assert_close(sample(den, x1, solver="euler", num_steps=6), want, rtol=0, atol=1e-12)


def test_ddpm_sde_h_interpolates_between_euler_and_more_noise():
    """FlowSDE's h (spec 8.1) in the ddpm baseline: h = 0 is Euler, h = 1 the default."""
    den, x1 = data_2d(), noise(32, 2)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    euler = sample(den, x1, solver="euler", num_steps=5)
    h0 = sample(den, x1, solver="ddpm", num_steps=5, sde_h=0.0, generator=gen())
    assert_close(h0, euler, rtol=0, atol=1e-12)
    default = sample(den, x1, solver="ddpm", num_steps=5, generator=gen())
    assert torch.equal(sample(den, x1, solver="ddpm", num_steps=5, sde_h=1, generator=gen()),
                       default)  # fmt: skip
    # h = 2 forgets more of x at each step than DDPM: a different result from the same draws
    one = sample(den, x1, solver="ddpm", num_steps=5, sde_h=2.0, generator=gen())
    assert not torch.allclose(one, default)
    for kwargs, match in [
        ({"solver": "ddpm", "sde_h": -0.5}, r"sde_h must be a finite number >= 0"),
        ({"solver": "gm-sde", "sde_h": 0.5}, r"GM-SDE is exact only with h = 1"),
    ]:
        with pytest.raises(ConfigError, match=match):
            sample(den, x1, num_steps=2, **kwargs)


def test_ddpm_baseline_is_the_posterior_sample_around_the_mean(generator):
    den = LinearGMDenoiser()
    x1 = torch.randn(4, 2, 2, 2, generator=generator, dtype=F64)
    gen = torch.Generator().manual_seed(9)

    def ddpm(x, x0, s, s_next):
        if s_next == 0:
            return x0
        c1, c2, c3 = reverse_transition_coefs(s, s_next)
        return c1 * x + c2 * x0 + c3.sqrt() * torch.randn(x.shape, generator=gen, dtype=F64)

    want = manual_x0_loop(den, x1, 5, ddpm)
    got = sample(den, x1, solver="ddpm", num_steps=5, generator=torch.Generator().manual_seed(9))
    assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("solver", "nfe"), [("euler", 5), ("heun", 9), ("ddpm", 5)])
def test_constant_velocity_is_integrated_exactly(solver, nfe, generator):
    """u ≡ c ⇒ x(0) = x(1) − c for Euler and Heun (and DDPM, whose noise vanishes only at σ = 0:
    checked for its NFE count only)."""
    c = torch.randn(1, 1, 2, 3, 3, generator=generator, dtype=F64)
    calls = []

    def constant(x_t, sigma, labels):
        calls.append(x_t.shape[0])
        means = c.expand(x_t.shape[0], 1, 2, 3, 3)
        return GaussianMixture(
            means,
            torch.zeros(x_t.shape[0], 1, 1, 3, 3, dtype=F64),
            torch.zeros(x_t.shape[0], 1, 1, 1, 1, dtype=F64),
        )

    x1 = torch.randn(2, 2, 3, 3, generator=generator, dtype=F64)
    x = sample(constant, x1, solver=solver, num_steps=5, generator=torch.Generator().manual_seed(0))
    assert len(calls) == nfe
    if solver != "ddpm":
        assert_close(x, x1 - c.squeeze(1), rtol=0, atol=1e-12)


# ---- guidance -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("solver", "order"), [("gm-sde", 1), ("gm-sde", 2), ("gm-ode", 1), ("gm-ode", 2)]
)
def test_guidance_pushes_samples_towards_their_class(solver, order):
    """Guided [cond; null] in one call per step; guided class-1 samples move further right."""
    den, n = data_classes(), 2000
    labels = torch.ones(n, dtype=torch.long)
    kwargs = {
        "solver": solver,
        "num_steps": 4,
        "order": order,
        "class_labels": labels,
        "null_class_id": NULL,
    }
    if solver == "gm-ode":
        kwargs["num_substeps"] = 4
    x1 = noise(n, 2, seed=11)
    plain = sample(den, x1, generator=torch.Generator().manual_seed(1), **kwargs)
    den.calls.clear()
    guided = sample(
        den,
        x1,
        guidance_scale=0.5,
        orthogonal_guidance=0.0,
        generator=torch.Generator().manual_seed(1),
        **kwargs,
    )
    assert [b for b, _ in den.calls] == [2 * n] * 4
    assert torch.equal(den.calls[0][1], torch.cat([labels, torch.full_like(labels, NULL)]))
    assert bool(torch.isfinite(guided).all())
    # the class direction is +x: 5 standard errors of the difference of the two sample means
    shift = guided[:, 0].mean() - plain[:, 0].mean()
    assert shift > 5 * math.sqrt((guided[:, 0].var() + plain[:, 0].var()) / n)


def test_guidance_interval_and_zero_scale_skip_the_null_batch():
    den, n = data_classes(), 8
    labels = torch.zeros(n, dtype=torch.long)
    x1 = noise(n, 2)
    sample(
        den,
        x1,
        solver="gm-ode",
        num_steps=4,
        num_substeps=2,
        guidance_scale=0.3,
        guidance_interval=(0.0, 0.5),
        class_labels=labels,
        null_class_id=NULL,
    )
    assert [b for b, _ in den.calls] == [n, n, 2 * n, 2 * n]  # σ = 1, .75 outside; .5, .25 inside
    den.calls.clear()
    sample(den, x1, solver="gm-sde", num_steps=3, class_labels=labels, null_class_id=NULL)
    assert [b for b, _ in den.calls] == [n] * 3


def test_vanilla_cfg_moves_the_mean_further_than_no_guidance():
    den, n = data_classes(), 2000
    labels = torch.ones(n, dtype=torch.long)
    x1 = noise(n, 2, seed=12)
    kwargs = {
        "solver": "euler",
        "num_steps": 8,
        "class_labels": labels,
        "null_class_id": NULL,
        "guidance": "cfg",
    }
    plain = sample(den, x1, guidance_scale=1.0, **kwargs)
    assert [b for b, _ in den.calls] == [n] * 8
    guided = sample(den, x1, guidance_scale=2.0, **kwargs)
    assert guided[:, 0].mean() > plain[:, 0].mean() + 0.1


# ---- dtype, determinism, hooks -----------------------------------------------------------


def test_sampling_is_deterministic_for_a_fixed_generator():
    den, x1 = data_2d(), noise(32, 2)
    runs = [
        sample(
            den,
            x1,
            solver="gm-sde",
            num_steps=3,
            order=2,
            generator=torch.Generator().manual_seed(s),
        )
        for s in (5, 5, 6)
    ]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("net_dtype", [torch.float64, torch.bfloat16, torch.float32])
def test_state_is_fp32_whatever_the_network_dtype(net_dtype):
    den = data_2d()
    seen = []

    def net(x_t, sigma, labels):
        seen.append((x_t.dtype, sigma.dtype))
        return den(x_t, sigma, labels).to(net_dtype)

    x = sample(net, noise(16, 2).float(), solver="gm-ode", num_steps=2, num_substeps=2, order=2)
    assert x.dtype == torch.float32 and seen[0] == (torch.float32, torch.float32)
    x64 = sample(net, noise(16, 2), solver="gm-sde", num_steps=2)
    assert x64.dtype == torch.float64 and seen[-1] == (torch.float64, torch.float64)


def test_spectrum_net_hook_draws_x0_through_spectral_sample(monkeypatch):
    import gmflow.flow.spectral as spectral

    drawn = []

    def fake_spectral_sample(gm_x0, log_spectrum, generator):
        drawn.append((log_spectrum, generator))
        return gm_to_mean(gm_x0)

    monkeypatch.setattr(spectral, "spectral_sample", fake_spectral_sample)
    inputs = []

    def spectrum_net(g):
        inputs.append(g)
        return torch.zeros_like(g.mean)

    gen = torch.Generator().manual_seed(0)
    sample(
        data_2d(),
        noise(8, 2),
        solver="gm-sde",
        num_steps=3,
        spectrum_net=spectrum_net,
        generator=gen,
    )
    assert len(drawn) == 3 and all(g is gen for _, g in drawn)
    assert all(isinstance(g, IsoGaussian) and g.mean.shape == (8, 2, 1, 1) for g in inputs)


def test_progress_is_reported_per_network_step():
    seen = []
    sample(
        data_2d(),
        noise(4, 2),
        solver="gm-ode",
        num_steps=3,
        num_substeps=2,
        progress=lambda i, n: seen.append((i, n)),
    )
    assert seen == [(1, 3), (2, 3), (3, 3)]


# ---- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"solver": "dpm++"}, "gm-sde, gm-ode, euler, heun, ddpm"),
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": 2.0}, "num_steps"),
        ({"num_substeps": 4}, "only used by solver='gm-ode'"),
        ({"solver": "gm-ode", "num_substeps": 0}, "num_substeps"),
        ({"order": 3}, "order must be 1 or 2"),
        ({"solver": "euler", "order": 2}, "order=2"),
        ({"guidance_scale": 1.0}, r"\[0, 1\)"),
        ({"guidance_scale": -0.2}, r"\[0, 1\)"),
        ({"guidance": "cfg", "guidance_scale": 0.5}, "g >= 1"),
        ({"guidance": "pag"}, "'probabilistic' or 'cfg'"),
        ({"guidance_scale": 0.3, "null_class_id": NULL}, "class_labels"),
        (
            {"guidance_scale": 0.3, "class_labels": torch.zeros(4, dtype=torch.long)},
            "null_class_id",
        ),
        ({"guidance_interval": (0.6, 0.2)}, "guidance_interval"),
        ({"orthogonal_guidance": 1.5}, "orthogonal_guidance"),
        ({"shift": 0.0}, "shift"),
        ({"gm2_coefs": (-1.0, 1.0)}, "gm2_coefs"),
        ({"order": 2, "gm2_correction_steps": -1}, "gm2_correction_steps must be an integer"),
        ({"gm2_correction_steps": 2}, "use it with order=2"),
        ({"solver": "gm-ode", "spectrum_net": lambda g: g.mean}, "spectrum_net"),
        ({"class_labels": torch.zeros(3, dtype=torch.long)}, "class_labels"),
    ],
)
def test_bad_arguments_raise_before_the_first_network_call(kwargs, match):
    den = data_2d()
    args = {"solver": "gm-sde", "num_steps": 2} | kwargs
    with pytest.raises((ConfigError, ValueError), match=match):
        sample(den, noise(4, 2), **args)
    assert den.calls == []


def test_gm2_correction_steps_reach_the_order_two_correction(random_gm):
    """With an inexact denoiser (Δ ≠ 0) the iterations change the samples; with the exact data
    GM there is nothing to extrapolate (oracle 33) and they change nothing."""
    gm = random_gm(3, 2, 1, 1, batch=(1,))

    def fixed(x_t, sigma, labels):  # type: ignore[no-untyped-def]
        b = x_t.shape[0]
        shift = 0.3 * x_t.unsqueeze(1)  # depends on x, so consecutive steps disagree
        return GaussianMixture(gm.means + shift, gm.logweights.expand(b, -1, -1, -1, -1),
                               gm.logstds.expand(b, -1, -1, -1, -1))  # fmt: skip

    args = {"solver": "gm-ode", "num_steps": 3, "num_substeps": 2, "order": 2}
    for den, changes in ((fixed, True), (data_2d(), False)):
        x1 = noise(256, 2)
        base = sample(den, x1, **args)
        refined = sample(den, x1, gm2_correction_steps=3, **args)
        assert bool(torch.isfinite(refined).all())
        assert ((refined - base).abs().max() > 1e-6) == changes


def test_noise_must_be_an_image_batch():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        sample(data_2d(), torch.zeros(4, 2), solver="euler", num_steps=1)


def test_a_denoiser_that_returns_a_tensor_is_rejected():
    with pytest.raises(TypeError, match="GaussianMixture"):
        sample(lambda x, s, y: x, noise(4, 2), solver="euler", num_steps=1)


# ---- CUDA (skipped without a GPU) -------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(
    "kwargs",
    [
        {"solver": "euler"},
        {"solver": "heun"},
        {"solver": "gm-ode", "num_substeps": 4},
        {"solver": "gm-ode", "num_substeps": 4, "order": 2},
        {"solver": "gm-ode", "num_substeps": 4, "order": 2, "guidance_scale": 0.4},
        {"solver": "gm-ode", "num_substeps": 4, "guidance_scale": 2.0, "guidance": "cfg"},
    ],
)
def test_cuda_deterministic_solvers_match_the_cpu(kwargs):
    """fp32 state on CUDA (numba-cuda GM kernels) against the fp64 CPU run of the same solver."""
    den, n = data_classes(), 512
    labels = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(0))
    x1 = noise(n, 2)
    args = {"num_steps": 6, "class_labels": labels, "null_class_id": NULL} | kwargs
    want = sample(den, x1, **args)
    args["class_labels"] = labels.cuda()
    got = sample(den, x1.float().cuda(), **args)
    assert got.dtype == torch.float32 and got.device.type == "cuda"
    assert_close(got.cpu().double(), want, rtol=0, atol=2e-3)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("order", [1, 2])
def test_cuda_gm_sde_reproduces_the_data(order):
    den, n = data_2d(), 200_000
    gen = torch.Generator(device="cuda").manual_seed(0)
    x1 = torch.randn(n, 2, 1, 1, device="cuda", generator=gen)
    x = sample(den, x1, solver="gm-sde", num_steps=4, order=order, generator=gen)
    x = x.reshape(n, 2).double().cpu()
    w, m = den.logweights.exp().reshape(3, 1), den.means.reshape(3, 2)
    mean = (w * m).sum(0)
    cov = (w * m).T @ m - torch.outer(mean, mean) + den.v0 * torch.eye(2, dtype=F64)
    assert bool(((x.mean(0) - mean).abs() < 5 * cov.diagonal().sqrt() / math.sqrt(n)).all())
    centred = x - x.mean(0)
    prods = centred.unsqueeze(2) * centred.unsqueeze(1)
    assert bool(((prods.mean(0) - cov).abs() < 5 * prods.std(0) / math.sqrt(n)).all())


@pytest.mark.parametrize("solver", ["gm-sde", "ddpm", "gm-ode"])
@pytest.mark.parametrize("order", [1, 2])
def test_per_row_generators_make_samples_independent_of_the_batch(solver, order):
    """One generator per row: row i depends only on its own seed (a batch of 5 = 5 of 1)."""
    from gmflow.gm.random import row_generators

    torch.manual_seed(0)
    means = torch.randn(1, 3, 2, 2, 2, dtype=torch.float64)

    def denoiser(x_t, sigma, class_labels):
        b = x_t.shape[0]
        m = means.expand(b, -1, -1, -1, -1) + 0.1 * x_t.unsqueeze(1)
        return GaussianMixture(
            m,
            torch.full((b, 3, 1, 2, 2), -math.log(3.0), dtype=x_t.dtype),
            torch.full((b, 1, 1, 1, 1), -1.0, dtype=x_t.dtype),
        )

    if solver == "ddpm" and order == 2:
        pytest.skip("ddpm is first order")
    seeds = [11, 12, 13, 14, 15]
    noise = torch.randn(5, 2, 2, 2, dtype=torch.float64)
    kwargs = {"solver": solver, "num_steps": 3, "order": order}
    whole = sample(denoiser, noise, generator=row_generators(seeds), **kwargs)
    rows = [
        sample(denoiser, noise[i : i + 1], generator=row_generators(seeds[i : i + 1]), **kwargs)
        for i in range(5)
    ]
    torch.testing.assert_close(whole, torch.cat(rows), rtol=0, atol=1e-12)
    if solver != "gm-ode":  # gm-ode draws nothing
        with pytest.raises(ValueError, match="got 2 generators for a draw of shape"):
            sample(denoiser, noise, generator=row_generators(seeds[:2]), **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"solver": "gm-ode", "num_substeps": 3, "order": 2, "guidance_scale": 0.3},
        {"solver": "gm-sde", "order": 2},
        {"solver": "euler"},
        {"solver": "heun"},
        {"solver": "ddpm"},
    ],
)
def test_callback_reports_every_network_step(kwargs):
    """spec 17.1 save_intermediate: the callback sees the trajectory the sampler returns."""
    from gmflow.flow import SamplerStep

    den, x1 = data_classes(), noise(64, 2)
    labels = torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(1))
    args = {"num_steps": 4, "class_labels": labels, "null_class_id": NULL} | kwargs
    steps: list[SamplerStep] = []
    gen = torch.Generator().manual_seed(2)
    out = sample(den, x1, generator=gen, callback=steps.append, **args)
    again = sample(den, x1, generator=torch.Generator().manual_seed(2), **args)
    assert_close(out, again, rtol=0, atol=0)  # observing changes nothing
    assert [s.index for s in steps] == [1, 2, 3, 4] and steps[0].num_steps == 4
    grid = sigma_grid(4).tolist()
    assert [(s.sigma, s.sigma_next) for s in steps] == list(zip(grid[:-1], grid[1:], strict=True))
    assert torch.equal(steps[0].x_t, x1) and torch.equal(steps[-1].x, out)
    for a, b in zip(steps[:-1], steps[1:], strict=True):
        assert torch.equal(a.x, b.x_t)  # consecutive steps chain
    for s in steps:
        assert s.x0_hat.shape == x1.shape
        if kwargs["solver"] == "heun" and s.index < 4:  # its last step is an Euler step
            assert s.gm_x0 is None
        else:
            assert s.gm_x0.means.shape[0] == 64 and s.gm_x0.means.shape[-3:] == (2, 1, 1)
    if kwargs["solver"] in ("gm-ode", "euler"):  # the first estimate is the x0-GM's mean
        assert_close(steps[1].x0_hat, gm_to_mean(steps[1].gm_x0))
