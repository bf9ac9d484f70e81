"""The solver names users type (`gmflow sample`, `gmflow evaluate`) in one place; no torch."""

from __future__ import annotations

__all__ = ["SOLVER_VARIANTS", "STOCHASTIC_SOLVERS", "GUIDANCE_MODES", "DEFAULT_ORTHOGONAL"]

SOLVER_VARIANTS: dict[str, tuple[str, int]] = {
    "gm-ode2": ("gm-ode", 2),
    "gm-sde2": ("gm-sde", 2),
    "gm-ode": ("gm-ode", 1),
    "gm-sde": ("gm-sde", 1),
    "euler": ("euler", 1),
    "heun": ("heun", 1),
    "ddpm": ("ddpm", 1),
    "dpmpp-2m": ("dpmpp-2m", 1),
    "dpmpp-2m-sde": ("dpmpp-2m-sde", 1),
    "unipc": ("unipc", 1),
}
"""User-facing solver name -> (:func:`gmflow.flow.sample` solver, order)."""

STOCHASTIC_SOLVERS = ("gm-sde", "ddpm", "dpmpp-2m-sde")
"""``gmflow.flow.sample`` solvers that draw noise inside the loop."""

GUIDANCE_MODES = ("probabilistic", "cfg")
"""``gmflow.flow.sample``'s guidance: GMFlow's probabilistic guidance (w in [0, 1)) or vanilla
classifier-free guidance (g >= 1)."""

DEFAULT_ORTHOGONAL = {"probabilistic": 1.0, "cfg": 0.0}
"""Orthogonal-projection strength o per guidance mode when none is given: the paper's 1 for
probabilistic guidance, 0 (plain CFG, the baseline) for vanilla CFG."""
