"""The solver and guidance settings users type (`gmflow sample`, `gmflow evaluate`) in one place;
no torch."""

from __future__ import annotations

from typing import Any

from gmflow.errors import ConfigError

__all__ = [
    "SOLVER_VARIANTS",
    "STOCHASTIC_SOLVERS",
    "GUIDANCE_MODES",
    "DEFAULT_ORTHOGONAL",
    "orthogonal_for",
    "guidance_kwargs",
    "check_guidance_interval",
]

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


def orthogonal_for(mode: str, orthogonal: Any) -> Any:
    """The orthogonal strength in use: ``orthogonal``, or the mode's default when it is None."""
    return DEFAULT_ORTHOGONAL[mode] if orthogonal is None else orthogonal


def guidance_kwargs(mode: str, orthogonal: float | None) -> dict[str, Any]:
    """``gmflow.flow.sample``'s guidance arguments for a mode and strength o (None = default).

    The two modes read their own strength argument (``orthogonal_guidance`` for probabilistic
    guidance, ``cfg_orthogonal_guidance`` for CFG); the other keeps its neutral value.
    """
    o = float(orthogonal_for(mode, orthogonal))
    cfg = mode == "cfg"
    return {
        "guidance": mode,
        "orthogonal_guidance": 1.0 if cfg else o,
        "cfg_orthogonal_guidance": o if cfg else 0.0,
    }


def check_guidance_interval(name: str, interval: Any) -> None:
    """Refuse a guidance interval that is not two noise levels 0 <= σ_a <= σ_b <= 1 (or None)."""
    if interval is not None and (len(interval) != 2 or not 0 <= interval[0] <= interval[1] <= 1):
        raise ConfigError(
            f"{name} {list(interval)} must be two noise levels 0 <= sigma_a <= sigma_b <= 1 "
            "(guidance applies for sigma_a <= sigma <= sigma_b)"
        )
