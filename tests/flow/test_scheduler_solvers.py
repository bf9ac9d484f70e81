"""Diffusers' multistep schedulers as flow-matching baselines on the GM mean (spec 14, 17.1).

On exact GM data (``exact_data``) the GM mean is the exact posterior mean, so a deterministic
scheduler must follow the exact probability-flow ODE (started where the scheduler's grid starts,
σ = 0.999) with its order of convergence, and a first-order one must equal a plain Euler (DDIM)
loop on its own σ grid; the SDE variant must reproduce the data distribution.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from exact_data import NULL, data_1d, data_2d, data_classes, noise, pf_ode_reference
from scipy import stats
from torch.testing import assert_close

from gmflow.errors import ConfigError
from gmflow.flow import flow_euler_step, sample
from gmflow.flow.scheduler_solvers import SCHEDULER_SOLVERS, make_flow_scheduler
from gmflow.gm import gm_to_mean
from gmflow.gm.random import row_generators


def flow_dpm(order: int = 2, **kwargs) -> DPMSolverMultistepScheduler:  # type: ignore[no-untyped-def]
    return DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, solver_order=order, **kwargs
    )


@pytest.mark.parametrize("solver", ["dpmpp-2m", "unipc"])
def test_deterministic_presets_converge_to_the_probability_flow_ode_at_second_order(solver):
    den, x1 = data_2d(), noise(128, 2)
    den.v0 = 0.25  # wide modes: the asymptotic regime starts at a few steps
    reference = pf_ode_reference(den, x1, sigma_start=0.999)  # the grids start at σ = 0.999
    errors = []
    for n in (5, 10, 20):
        x = sample(den, x1, solver=solver, num_steps=n)
        errors.append(float((x - reference).square().mean().sqrt()))
    assert errors[-1] < 1e-2, errors
    # second order: each doubling of N cuts the error by about 4 (Euler: 2)
    assert all(a / b > 3.0 for a, b in zip(errors[:-1], errors[1:], strict=True)), errors
    assert len(den.calls) == 35  # one network evaluation per step


@pytest.mark.parametrize(
    "scheduler",
    [flow_dpm(order=1), FlowMatchEulerDiscreteScheduler(shift=2.0)],
    ids=["dpmpp-1", "flowmatch-euler"],
)
def test_first_order_schedulers_are_the_euler_step_on_their_own_grid(scheduler):
    """DPM-Solver++ 1 in data prediction is DDIM, i.e. the flow Euler step (spec 8.1)."""
    den, x1 = data_2d(), noise(16, 2)
    steps = []
    got = sample(den, x1, solver="diffusers", scheduler=scheduler, num_steps=6,
                 callback=steps.append)  # fmt: skip
    sigmas = [s.sigma for s in steps] + [steps[-1].sigma_next]
    assert len(steps) == 6 and sigmas[-1] == 0 and sigmas == sorted(sigmas, reverse=True)
    x = x1
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x0 = gm_to_mean(den.x0_posterior(x, torch.full((16,), s, dtype=torch.float64)))
        x = flow_euler_step(x, x0, s, s_next)
    # the schedulers keep σ and (DPM-Solver) the state in fp32
    assert_close(got, x, rtol=0, atol=2e-5)


def test_sde_preset_reproduces_the_data_distribution():
    den = data_1d()
    x = sample(den, noise(4000, 1, seed=3), solver="dpmpp-2m-sde", num_steps=48,
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert stats.kstest(x.flatten().numpy(), den.data_cdf_1d).pvalue > 1e-3


def test_sde_preset_with_row_generators_does_not_depend_on_the_batch_size():
    den, x1 = data_2d(), noise(6, 2)

    def run(rows: slice) -> torch.Tensor:
        seeds = list(range(100, 106))[rows]
        return sample(den, x1[rows], solver="dpmpp-2m-sde", num_steps=5,
                      generator=row_generators(seeds))  # fmt: skip

    whole = run(slice(0, 6))
    assert_close(torch.cat([run(slice(0, 2)), run(slice(2, 6))]), whole, rtol=0, atol=1e-6)
    assert not torch.allclose(whole, run(slice(0, 6)).roll(1, 0))  # rows differ
    again = sample(den, x1, solver="dpmpp-2m-sde", num_steps=5, generator=row_generators(range(6)))
    assert not torch.allclose(again, whole)  # the noise depends on the seeds


def test_guidance_reaches_the_scheduler_through_the_gm_mean():
    """As for the GM solvers: guided class-1 samples move further right (the class direction)."""
    den, n = data_classes(), 2000
    labels = torch.ones(n, dtype=torch.long)
    x1 = noise(n, 2, seed=11)
    kwargs = {"solver": "unipc", "num_steps": 6, "class_labels": labels, "null_class_id": NULL}
    plain = sample(den, x1, **kwargs)
    den.calls.clear()
    guided = sample(den, x1, guidance_scale=0.5, orthogonal_guidance=0.0, **kwargs)
    assert [b for b, _ in den.calls] == [2 * n] * 6  # [cond; null] in one call per step
    shift = guided[:, 0].mean() - plain[:, 0].mean()
    assert shift > 5 * math.sqrt((guided[:, 0].var() + plain[:, 0].var()) / n)


def test_shift_reaches_the_preset_grid():
    steps = []
    sample(data_2d(), noise(2, 2), solver="dpmpp-2m", num_steps=4, shift=3.0, callback=steps.append)
    raw = 0.999 * 0.75  # the second point of the unshifted grid
    assert steps[1].sigma == pytest.approx(3 * raw / (1 + 2 * raw), rel=1e-6)
    assert make_flow_scheduler("dpmpp-2m", 3.0).config.flow_shift == 3.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"solver": "diffusers"}, r"solver='diffusers' runs the Diffusers scheduler passed"),
        ({"solver": "unipc", "scheduler": flow_dpm()}, r"got solver='unipc' with scheduler="),
        (
            {"solver": "diffusers", "scheduler": DPMSolverMultistepScheduler()},
            r"predicts 'epsilon'; .*prediction_type='flow_prediction'",
        ),
        (
            {
                "solver": "diffusers",
                "scheduler": DEISMultistepScheduler(
                    prediction_type="flow_prediction", use_flow_sigmas=True
                ),
            },
            r"ends at σ = 0\.\d+, not 0.*DEIS and SA-Solver do not",
        ),  # fmt: skip
        ({"solver": "diffusers", "scheduler": flow_dpm(), "shift": 2.0}, r"own flow_shift"),
        ({"solver": "dpmpp-2m", "order": 2}, r"order=2 is the GM second-order correction"),
        ({"solver": "unipc", "num_substeps": 2}, r"num_substeps=2 is only used by"),
        ({"solver": "diffusers", "scheduler": object()}, r"must be a Diffusers scheduler"),
    ],
)
def test_bad_scheduler_options_fail_before_the_first_network_call(kwargs, match):
    den = data_2d()
    with pytest.raises(ConfigError, match=match):
        sample(den, noise(2, 2), num_steps=3, **kwargs)
    assert den.calls == []


def test_the_presets_are_what_their_names_say():
    assert set(SCHEDULER_SOLVERS) == {"dpmpp-2m", "dpmpp-2m-sde", "unipc"}
    dpm, sde, uni = (make_flow_scheduler(n) for n in ("dpmpp-2m", "dpmpp-2m-sde", "unipc"))
    assert isinstance(dpm, DPMSolverMultistepScheduler) and isinstance(uni, UniPCMultistepScheduler)
    assert dpm.config.algorithm_type == "dpmsolver++"
    assert sde.config.algorithm_type == "sde-dpmsolver++"
    for s in (dpm, sde, uni):
        assert s.config.solver_order == 2 and s.config.prediction_type == "flow_prediction"
    with pytest.raises(ConfigError, match=r"unknown scheduler solver 'dpm'; expected one of"):
        make_flow_scheduler("dpm")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("solver", ["dpmpp-2m", "unipc", "dpmpp-2m-sde"])
def test_cuda_scheduler_solvers_match_cpu(solver):
    """The Diffusers baselines on a GPU: the same result as on the CPU (per-row generators)."""
    den, x1 = data_2d(), noise(8, 2).float()
    out = {}
    for device in ("cpu", "cuda"):
        gens = row_generators(range(8), device) if solver == "dpmpp-2m-sde" else None
        out[device] = sample(den, x1.to(device), solver=solver, num_steps=6, generator=gens)
    if solver == "dpmpp-2m-sde":  # CPU and CUDA generators draw different numbers
        assert out["cuda"].device.type == "cuda" and bool(torch.isfinite(out["cuda"]).all())
    else:
        assert_close(out["cuda"].cpu(), out["cpu"], rtol=1e-4, atol=1e-4)
