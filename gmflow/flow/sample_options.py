"""Validation of :func:`gmflow.flow.solvers.sample`'s options, before the first network call."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from torch import Tensor

from gmflow.errors import ConfigError
from gmflow.flow.scheduler_solvers import SCHEDULER_SOLVERS
from gmflow.flow.steps import default_num_substeps
from gmflow.solver_names import DEFAULT_ORTHOGONAL, GUIDANCE_MODES

__all__ = [
    "SOLVERS",
    "GUIDANCE_MODES",
    "DEFAULT_ORTHOGONAL",
    "GuidanceSettings",
    "validate_options",
    "validate_guidance",
]

SOLVERS = ("gm-sde", "gm-ode", "euler", "heun", "ddpm", *SCHEDULER_SOLVERS, "diffusers")
"""``sample`` solvers: GM-SDE, GM-ODE, the mean-only baselines, the Diffusers presets of
:mod:`gmflow.flow.scheduler_solvers` and ``"diffusers"`` (a scheduler given by the caller)."""


@dataclass(frozen=True)
class GuidanceSettings:
    """Validated guidance settings of one ``sample`` call.

    ``orthogonal`` is the projection strength o in effect for ``mode``: ``orthogonal_guidance``
    for probabilistic guidance, ``cfg_orthogonal_guidance`` for CFG.
    """

    mode: str
    scale: float
    orthogonal: float
    interval: tuple[float, float] | None
    class_labels: Tensor | None
    null_class_id: int | None

    @property
    def enabled(self) -> bool:
        return self.scale > (0.0 if self.mode == "probabilistic" else 1.0)

    def active_at(self, sigma: float) -> bool:
        """Guidance applies at σ (inside the interval, inclusive, when one is given)."""
        if not self.enabled:
            return False
        return self.interval is None or self.interval[0] <= sigma <= self.interval[1]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_options(
    denoiser: object,
    noise: object,
    solver: str,
    num_steps: int,
    num_substeps: int | None,
    order: int,
    gm2_coefs: tuple[float, float],
    shift: float,
    spectrum_net: object,
    gm2_correction_steps: int = 0,
    scheduler: object = None,
    sde_h: float = 1.0,
) -> int:
    """Check the non-guidance arguments of :func:`sample`; return the number of sub-steps S."""
    if not callable(denoiser):
        raise ConfigError(f"sample: denoiser must be callable, got {type(denoiser).__name__}")
    if not isinstance(noise, Tensor) or noise.dim() != 4 or not noise.is_floating_point():
        got = f"shape {tuple(noise.shape)}, {noise.dtype}" if isinstance(noise, Tensor) else noise
        raise ValueError(f"sample: noise must be a float tensor of shape (B, C, H, W), got {got}")
    if solver not in SOLVERS:
        raise ConfigError(f"sample: solver={solver!r}; expected one of {', '.join(SOLVERS)}")
    if not _is_int(num_steps) or num_steps < 1:
        raise ConfigError(f"sample: num_steps must be an integer >= 1, got {num_steps!r}")
    if num_substeps is not None and solver != "gm-ode":
        raise ConfigError(
            f"sample: num_substeps={num_substeps!r} is only used by solver='gm-ode' (GM-SDE and "
            f"the baselines take one sub-step); leave it None for solver={solver!r}"
        )
    if num_substeps is not None and (not _is_int(num_substeps) or num_substeps < 1):
        raise ConfigError(f"sample: num_substeps must be an integer >= 1, got {num_substeps!r}")
    if order not in (1, 2) or isinstance(order, bool):
        raise ConfigError(f"sample: order must be 1 or 2, got {order!r}")
    if order == 2 and solver not in ("gm-sde", "gm-ode"):
        raise ConfigError(
            f"sample: order=2 is the GM second-order correction of 'gm-sde' and 'gm-ode'; "
            f"solver={solver!r} takes order=1 ('heun' is already a second-order baseline)"
        )
    if len(gm2_coefs) != 2 or not all(math.isfinite(c) and c >= 0 for c in gm2_coefs):
        raise ConfigError(f"sample: gm2_coefs must be two finite numbers >= 0, got {gm2_coefs!r}")
    if not _is_int(gm2_correction_steps) or gm2_correction_steps < 0:
        raise ConfigError(
            f"sample: gm2_correction_steps must be an integer >= 0, got {gm2_correction_steps!r}"
        )
    if gm2_correction_steps > 0 and order != 2:
        raise ConfigError(
            f"sample: gm2_correction_steps={gm2_correction_steps} refines the order-2 correction; "
            "use it with order=2"
        )
    if not (math.isfinite(shift) and shift > 0):
        raise ConfigError(f"sample: shift must be a finite number > 0 (1 = none), got {shift!r}")
    if not (isinstance(sde_h, numbers.Real) and math.isfinite(sde_h) and sde_h >= 0):
        raise ConfigError(f"sample: sde_h must be a finite number >= 0, got {sde_h!r}")
    if sde_h != 1 and solver != "ddpm":
        raise ConfigError(
            f"sample: sde_h={sde_h} is the FlowSDE diffusion coefficient of the 'ddpm' baseline; "
            f"solver={solver!r} does not take it (GM-SDE is exact only with h = 1)"
        )
    if (scheduler is not None) != (solver == "diffusers"):
        raise ConfigError(
            "sample: solver='diffusers' runs the Diffusers scheduler passed as scheduler=...; "
            f"got solver={solver!r} with scheduler={type(scheduler).__name__}"
        )
    if solver == "diffusers" and shift != 1.0:
        raise ConfigError(
            f"sample: shift={shift!r} does not reach a scheduler passed by the caller; set its "
            "own flow_shift when you build it"
        )
    if spectrum_net is not None and (solver != "gm-sde" or not callable(spectrum_net)):
        raise ConfigError(
            "sample: spectrum_net draws the GM-SDE x0 sample with spectral correlation; it needs "
            f"solver='gm-sde' and a callable, got solver={solver!r}"
        )
    if solver == "gm-ode":
        return num_substeps if num_substeps is not None else default_num_substeps(num_steps)
    return 1


def validate_guidance(
    mode: str,
    scale: float,
    orthogonal: float,
    interval: tuple[float, float] | None,
    class_labels: Tensor | None,
    null_class_id: int | None,
    batch: int,
    cfg_orthogonal: float = 0.0,
) -> GuidanceSettings:
    """Check the guidance arguments of :func:`sample` (``orthogonal`` = ``orthogonal_guidance``,
    ``cfg_orthogonal`` = ``cfg_orthogonal_guidance``)."""
    if mode not in GUIDANCE_MODES:
        raise ConfigError(f"sample: guidance={mode!r}; expected 'probabilistic' or 'cfg'")
    if not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ConfigError(f"sample: guidance_scale must be a finite number, got {scale!r}")
    if mode == "probabilistic" and not 0 <= scale < 1:
        raise ConfigError(
            f"sample: probabilistic guidance_scale w must lie in [0, 1) (0 = off; ~0.04 best FID, "
            f"~0.45 best precision), got {scale}; for vanilla CFG with g >= 1 pass guidance='cfg'"
        )
    if mode == "cfg" and not scale >= 1:
        raise ConfigError(
            f"sample: with guidance='cfg' guidance_scale is the CFG scale g >= 1 (1 = off), "
            f"got {scale}"
        )
    if not 0 <= orthogonal <= 1:
        raise ConfigError(f"sample: orthogonal_guidance must lie in [0, 1], got {orthogonal!r}")
    if isinstance(cfg_orthogonal, bool) or not isinstance(cfg_orthogonal, numbers.Real):
        raise ConfigError(
            "sample: cfg_orthogonal_guidance must be a number in [0, 1] (0 = plain CFG), got "
            f"{cfg_orthogonal!r}"
        )
    if not 0 <= cfg_orthogonal <= 1:
        raise ConfigError(
            f"sample: cfg_orthogonal_guidance must lie in [0, 1], got {cfg_orthogonal!r}; it is "
            "the fraction of the CFG bias along the conditional mean that is removed (0 = plain "
            "CFG, the default; 1 = fully orthogonal)"
        )
    if cfg_orthogonal != 0 and mode != "cfg":
        raise ConfigError(
            f"sample: cfg_orthogonal_guidance={cfg_orthogonal!r} only applies to guidance='cfg'; "
            f"with guidance={mode!r} set the projection strength with orthogonal_guidance "
            "(default 1.0) and leave cfg_orthogonal_guidance at 0"
        )
    if interval is not None and (len(interval) != 2 or not 0 <= interval[0] <= interval[1] <= 1):
        raise ConfigError(
            f"sample: guidance_interval must be (sigma_a, sigma_b) with 0 <= sigma_a <= sigma_b "
            f"<= 1, got {interval!r}"
        )
    if class_labels is not None and (
        not isinstance(class_labels, Tensor) or tuple(class_labels.shape) != (batch,)
    ):
        got = tuple(class_labels.shape) if isinstance(class_labels, Tensor) else class_labels
        raise ValueError(f"sample: class_labels must be a tensor of shape ({batch},), got {got}")
    strength = float(cfg_orthogonal) if mode == "cfg" else float(orthogonal)
    settings = GuidanceSettings(mode, float(scale), strength, interval, class_labels, null_class_id)
    if settings.enabled and (class_labels is None or null_class_id is None):
        raise ConfigError(
            f"sample: guidance_scale={scale} evaluates the conditional and the unconditional model "
            "in one call on [cond; null]; pass class_labels (B,) and null_class_id (e.g. 1000 for "
            "ImageNet GMDiT), or set guidance_scale to "
            f"{'0' if mode == 'probabilistic' else '1'}"
        )
    if null_class_id is not None and not _is_int(null_class_id):
        raise ConfigError(f"sample: null_class_id must be an integer, got {null_class_id!r}")
    return settings
