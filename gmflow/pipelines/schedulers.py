"""Diffusers schedulers over the stateless solver steps of :mod:`gmflow.flow.steps` (spec 8.1).

Here "scheduler" has its Diffusers meaning: an object that holds a time grid and advances x by
one step per ``step`` call. Both classes hold the grid of :func:`gmflow.flow.sigma_grid`,
    σ_j = shift(1 − j/M) for j = 0..M−1, then σ_M = 0,   timesteps t_j = T·σ_j (T = 1000),
and each ``step(x̂0, t_j, x)`` consumes the next index j and returns x at σ_{j+1}:

* :class:`FlowEulerODEScheduler`: x' = (σ'/σ) x + (1 − σ'/σ) x̂0 (:func:`flow_euler_step`);
* :class:`FlowSDEScheduler`: x' = α' x̂0 + σ' (m ε̂ + sqrt(1 − m²) z), m = (σ'α/(σα'))^{h²}
  (:func:`flow_sde_step`; h = 1 is the DDPM posterior sample, h = 0 the Euler step).

The model output they take is the x0 prediction (the official ``prediction_type='x0'``).
``FlowSDEScheduler.from_config(pipe.scheduler.config)`` swaps one for the other, as users of the
official pipeline do (``shift`` is kept, ``h`` defaults to 1). :class:`GMDiTPipeline` reads the
scheduler's class and ``shift`` to choose its GM solver; these ``step`` methods are for loops
written against the Diffusers API.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from gmflow.errors import ConfigError
from gmflow.flow.steps import flow_euler_step, flow_sde_step
from gmflow.flow.timesteps import sigma_grid

__all__ = ["FlowGridScheduler", "FlowEulerODEScheduler", "FlowSDEScheduler"]


class FlowGridScheduler(SchedulerMixin, ConfigMixin):
    """The σ grid and step counter shared by the two schedulers (not used on its own)."""

    order = 1

    @classmethod
    def _get_compatibles(cls) -> list[type]:
        """Both flow schedulers accept each other's config (Diffusers looks only in diffusers)."""
        return [FlowEulerODEScheduler, FlowSDEScheduler]

    def _init_grid(self) -> None:
        self.num_inference_steps: int | None = None
        self.sigma_grid: list[float] = []
        self.sigmas: Tensor | None = None
        self.timesteps: Tensor | None = None
        self._step_index = 0

    @property
    def step_index(self) -> int:
        """Index j of the next ``step`` call."""
        return self._step_index

    def set_timesteps(
        self, num_inference_steps: int, device: str | torch.device | None = None
    ) -> None:
        """Build the grid of M = ``num_inference_steps`` steps and rewind to j = 0.

        Sets ``sigmas`` (M + 1,) and ``timesteps`` = T·σ_j (M,), float32 on ``device``.
        """
        grid = sigma_grid(num_inference_steps, float(self.config.shift))  # fp64, ConfigError
        self.num_inference_steps = num_inference_steps
        self.sigma_grid = grid.tolist()
        self.sigmas = grid.to(device=device, dtype=torch.float32)
        self.timesteps = (grid[:-1] * self.config.num_train_timesteps).to(device, torch.float32)
        self._step_index = 0

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """The identity (flow models see x_t unscaled); kept for Diffusers loops."""
        return sample

    def _levels(self, timestep: float | Tensor) -> tuple[float, float]:
        """(σ_j, σ_{j+1}) of the next step, after checking ``timestep`` is t_j."""
        if self.timesteps is None:
            raise ConfigError(f"{type(self).__name__}: call set_timesteps(N) before step()")
        j = self._step_index
        if j >= len(self.timesteps):
            raise ConfigError(
                f"{type(self).__name__}: all {len(self.timesteps)} steps are done; call "
                "set_timesteps again to start a new trajectory"
            )
        expected = float(self.timesteps[j])
        given = float(timestep)
        if abs(given - expected) > 1e-3 * max(1.0, abs(expected)):
            raise ConfigError(
                f"{type(self).__name__}: step {j} expects timestep {expected:.4f} (timesteps are "
                f"consumed in order), got {given:.4f}"
            )
        return self.sigma_grid[j], self.sigma_grid[j + 1]

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)

    def step(
        self,
        model_output: Tensor,
        timestep: float | Tensor,
        sample: Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[Tensor]:
        """x at σ_{j+1} from x = ``sample`` at σ_j and x̂0 = ``model_output`` (same shape).

        ``generator`` drives the noise of stochastic schedulers (a list: one per sample).
        """
        sigma, sigma_next = self._levels(timestep)
        prev = self._advance(sample, model_output.to(sample.dtype), sigma, sigma_next, generator)
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _advance(
        self,
        x: Tensor,
        x0_hat: Tensor,
        sigma: float,
        sigma_next: float,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> Tensor:
        raise NotImplementedError  # each scheduler's update rule


class FlowEulerODEScheduler(FlowGridScheduler):
    """Euler (DDIM) steps of the flow ODE driven by an x0 prediction (spec 8.1).

    Args:
        num_train_timesteps: T, the timestep scale t = T·σ the network was trained with.
        shift: s of the grid warp σ ← s·σ/(1 + (s − 1)·σ) (1 = uniform).
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0) -> None:
        self._init_grid()

    def _advance(self, x, x0_hat, sigma, sigma_next, generator):  # type: ignore[no-untyped-def]
        return flow_euler_step(x, x0_hat, sigma, sigma_next)


class FlowSDEScheduler(FlowGridScheduler):
    """Steps of the canonical flow SDE with diffusion coefficient h (spec 8.1).

    Args:
        num_train_timesteps: T, the timestep scale t = T·σ.
        shift: s of the grid warp (1 = uniform).
        h: diffusion coefficient ≥ 0; 1 (GM-SDE) samples the DDPM posterior.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, h: float = 1.0) -> None:
        if not h >= 0:
            raise ConfigError(f"FlowSDEScheduler: h must be >= 0 (1 = DDPM posterior), got {h}")
        self._init_grid()

    def _advance(self, x, x0_hat, sigma, sigma_next, generator):  # type: ignore[no-untyped-def]
        """z ~ N(0, I) from ``generator`` (a list: one per sample); no noise at σ' = 0."""
        if sigma_next == 0:
            return x0_hat
        noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return flow_sde_step(x, x0_hat, sigma, sigma_next, noise, float(self.config.h))
