"""Flow-matching baselines from Diffusers' multistep schedulers, driven by the GM mean.

The paper compares GMFlow with the same network trained by plain flow matching and sampled by
DPM-Solver++ 2M (SDE), UniPC and others (spec 14, Tables 2 and 4: "DPM++ 2M SDE on the GM
model"); the reference sampler looks any Diffusers scheduler up by name (spec 17.1). Here a
GMFlow network serves them through its x0-GM mean: at each step the scheduler gets the flow
velocity û = (x − x̂0)/σ, with x̂0 the (guided) GM mean, as a ``flow_prediction`` model output.

Named presets (``sample(solver=...)``, ``gmflow sample --solver``):

* ``dpmpp-2m``: DPM-Solver++ 2M (``DPMSolverMultistepScheduler``, dpmsolver++, order 2);
* ``dpmpp-2m-sde``: its SDE variant (sde-dpmsolver++), stochastic;
* ``unipc``: UniPC (``UniPCMultistepScheduler``, bh2, order 2).

Each uses the scheduler's own flow σ grid (``use_flow_sigmas``: σ_j = 0.999·(1 − j/N) warped by
``shift``, then σ_N = 0) and one network evaluation per step. Any other configured scheduler runs
through ``sample(solver="diffusers", scheduler=...)``, as long as it takes a velocity
(``prediction_type="flow_prediction"``, or a ``FlowMatch*`` scheduler) and its grid ends at
σ = 0. Diffusers' DEIS and SA-Solver do not: with flow σs they stop at σ_{N−1} > 0.

Stochastic schedulers draw their noise from ``generator``: one generator, or one per row (Diffusers
accepts a list with one generator per sample), so seeded results do not depend on the batch size.
Unlike the GM solvers these loops are not free of host-device syncs on a GPU (Diffusers looks its
step index up on the device once per run and keeps σ on the host); for baselines that is fine.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gmflow.errors import ConfigError
from gmflow.gm import GaussianMixture
from gmflow.gm.random import Generators

__all__ = [
    "SCHEDULER_SOLVERS",
    "STOCHASTIC_SCHEDULER_SOLVERS",
    "make_flow_scheduler",
    "check_flow_scheduler",
    "takes_velocity",
    "run_scheduler",
]

SCHEDULER_SOLVERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpmpp-2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero"},
    ),
    "dpmpp-2m-sde": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero"},
    ),
    "unipc": (
        "UniPCMultistepScheduler",
        {"solver_type": "bh2", "solver_order": 2, "predict_x0": True, "final_sigmas_type": "zero"},
    ),
}
"""Preset name -> (Diffusers scheduler class, its settings besides the flow ones)."""

STOCHASTIC_SCHEDULER_SOLVERS = ("dpmpp-2m-sde",)
"""Presets that draw noise inside the loop."""


def make_flow_scheduler(name: str, shift: float = 1.0, num_train_timesteps: int = 1000) -> Any:
    """A Diffusers scheduler for a preset, set up for flow matching (velocity output, flow σs).

    Args:
        name: a key of :data:`SCHEDULER_SOLVERS`.
        shift: σ-grid shift (Diffusers' ``flow_shift``; 1 = uniform).
        num_train_timesteps: the network's timestep scale (t = 1000·σ for GM-DiT).
    """
    if name not in SCHEDULER_SOLVERS:
        raise ConfigError(
            f"unknown scheduler solver {name!r}; expected one of {', '.join(SCHEDULER_SOLVERS)}"
        )
    import diffusers  # lazy: importing diffusers costs seconds

    class_name, settings = SCHEDULER_SOLVERS[name]
    return getattr(diffusers, class_name)(
        num_train_timesteps=num_train_timesteps,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=float(shift),
        **settings,
    )


def takes_velocity(scheduler: Any) -> bool:
    """Whether a Diffusers scheduler reads its model output as a flow velocity."""
    config = getattr(scheduler, "config", None)
    if type(scheduler).__name__.startswith("FlowMatch"):
        return True
    return getattr(config, "prediction_type", None) == "flow_prediction"


def check_flow_scheduler(scheduler: Any) -> None:
    """Refuse a scheduler that cannot run on GMFlow's velocity (before any network call)."""
    if not (callable(getattr(scheduler, "set_timesteps", None)) and callable(
        getattr(scheduler, "step", None)
    )):  # fmt: skip
        raise ConfigError(
            f"sample: scheduler must be a Diffusers scheduler (set_timesteps and step), got "
            f"{type(scheduler).__name__}"
        )
    if not takes_velocity(scheduler):
        kind = getattr(getattr(scheduler, "config", None), "prediction_type", None)
        raise ConfigError(
            f"sample: {type(scheduler).__name__} predicts {kind!r}; GMFlow gives it the flow "
            "velocity, so build it with prediction_type='flow_prediction' and "
            "use_flow_sigmas=True (e.g. DPMSolverMultistepScheduler(prediction_type="
            "'flow_prediction', use_flow_sigmas=True)), or use a FlowMatch* scheduler"
        )


def _sigmas(scheduler: Any, num_steps: int, device: torch.device) -> list[float]:
    scheduler.set_timesteps(num_steps, device=device)
    sigmas = [float(s) for s in scheduler.sigmas]
    if len(sigmas) != len(scheduler.timesteps) + 1 or sigmas[-1] != 0.0:
        raise ConfigError(
            f"sample: {type(scheduler).__name__} with {num_steps} steps ends at σ = "
            f"{sigmas[-1]:.4g}, not 0, so its result would still be noisy; set "
            "final_sigmas_type='zero' where the scheduler has it (DEIS and SA-Solver do not)"
        )
    if not 0 < sigmas[0] <= 1 or any(a <= b for a, b in zip(sigmas[:-1], sigmas[1:], strict=True)):
        raise ConfigError(
            f"sample: {type(scheduler).__name__}'s σ grid must decrease from at most 1 to 0 "
            f"(use_flow_sigmas=True), got {sigmas[:3]} ... {sigmas[-2:]}"
        )
    return sigmas


def run_scheduler(
    evaluate: Callable[[Tensor, float], tuple[GaussianMixture, Tensor]],
    x: Tensor,
    *,
    scheduler: Any,
    num_steps: int,
    generator: Generators,
    progress: Callable[[int, int], None] | None,
    report: Callable[[int, float, float, Tensor, GaussianMixture, Tensor, Tensor], None] | None,
) -> Tensor:
    """The sampling loop over a Diffusers scheduler's own σ grid.

    Args:
        evaluate: (x, σ) -> (guided x0-GM, its mean x̂0); one network evaluation.
        x: the state at σ = 1, fp32 or fp64 (the scheduler keeps its dtype).
        scheduler: a checked scheduler (:func:`check_flow_scheduler`); its step state is reset.
        num_steps: N network evaluations.
        generator: noise source of stochastic schedulers (one generator or one per row).
        progress: progress(step, N) after each step.
        report: report(i, σ, σ_next, x_t, gm, x̂0, x) after each step (``SamplerStep`` fields).
    """
    sigmas = _sigmas(scheduler, num_steps, x.device)  # also resets the multistep history
    extra: dict[str, Any] = {}
    if "generator" in inspect.signature(scheduler.step).parameters:
        gens = generator
        if gens is not None and not isinstance(gens, torch.Generator):
            gens = list(gens)  # Diffusers: one generator per row of the batch
        extra["generator"] = gens
    for i, t in enumerate(scheduler.timesteps):
        s, s_next = sigmas[i], sigmas[i + 1]
        gm, x0_hat = evaluate(x, s)
        velocity = (x - x0_hat) / s
        x_t = x
        x = scheduler.step(velocity, t, x, return_dict=False, **extra)[0].to(x_t.dtype)
        if report is not None:
            report(i + 1, s, s_next, x_t, gm, x0_hat, x)
        if progress is not None:
            progress(i + 1, len(sigmas) - 1)
    return x
