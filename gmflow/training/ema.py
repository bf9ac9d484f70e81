"""Exponential moving average of model weights, kept in fp32 (spec 4.6, 4.7).

Two momentum schedules, both functions of the iteration index i (0-based, the update after step i):

* ``rampup`` (StyleGAN3 / spec 4.6): β(i) = 0.5^{B / min(ema_kimg·1000, rampup·(i+1)·B)}, with B the
  global batch size. ImageNet GM-DiT: ema_kimg = 30000, rampup = 0.05, B = 4096.
* ``karras`` (spec 4.7): β(i) = (1 − 1/(i+1))^{γ+1}; the toy uses γ = 7.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = ["EMASchedule", "ema_beta", "EMA"]


@dataclass(frozen=True, kw_only=True)
class EMASchedule:
    """How the EMA momentum evolves with the iteration index."""

    kind: Literal["rampup", "karras", "constant"] = "rampup"
    ema_kimg: float = 30000.0  # rampup: half-life cap in thousands of images
    rampup: float = 0.05  # rampup: half-life as a fraction of images seen so far
    batch_size: int = 4096  # rampup: global batch size (images per iteration)
    gamma: float = 7.0  # karras: β(i) = (1 − 1/(i+1))^{γ+1}
    beta: float = 0.9999  # constant: fixed momentum

    def __post_init__(self) -> None:
        if self.kind == "rampup" and (
            self.ema_kimg <= 0 or self.rampup <= 0 or self.batch_size < 1
        ):
            raise ValueError("rampup EMA needs ema_kimg > 0, rampup > 0 and batch_size >= 1")
        if self.kind == "constant" and not 0 <= self.beta < 1:
            raise ValueError(f"constant EMA needs 0 <= beta < 1, got {self.beta}")


def ema_beta(schedule: EMASchedule, step: int) -> float:
    """Momentum β for the update after iteration ``step`` (0-based)."""
    match schedule.kind:
        case "rampup":
            ema_nimg = min(
                schedule.ema_kimg * 1000.0, schedule.rampup * (step + 1) * schedule.batch_size
            )
            return 0.5 ** (schedule.batch_size / max(ema_nimg, 1e-8))
        case "karras":
            return (1.0 - 1.0 / (step + 1)) ** (schedule.gamma + 1)
        case "constant":
            return schedule.beta
    raise ValueError(f"unknown EMA schedule kind {schedule.kind!r}")


class EMA:
    """fp32 shadow copy of a module's floating-point parameters; persistent buffers are copied.

    ``update(model, step)`` lerps ema ← β ema + (1 − β) θ with β = ema_beta(schedule, step).
    ``state_dict()`` holds the shadow tensors under the model's own parameter names, so it loads
    into a fresh model of the same class with ``load_into``.
    """

    def __init__(self, model: nn.Module, schedule: EMASchedule) -> None:
        self.schedule = schedule
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().to(torch.float32, copy=True)
            for name, p in model.named_parameters()
            if p.is_floating_point()
        }
        persistent = model.state_dict(keep_vars=True).keys()  # non-persistent buffers are derived
        self.buffers: dict[str, torch.Tensor] = {
            name: b.detach().clone()
            for name, b in model.named_buffers(remove_duplicate=True)
            if name in persistent
        }
        self.last_beta = math.nan

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float:
        """Update the shadow weights after iteration ``step``; returns β."""
        beta = ema_beta(self.schedule, step)
        names, shadows, params = [], [], []
        for name, p in model.named_parameters():
            if name in self.shadow:
                names.append(name)
                shadows.append(self.shadow[name])
                params.append(p.detach().to(torch.float32))
        if shadows:
            torch._foreach_lerp_(shadows, params, 1.0 - beta)
        for name, b in model.named_buffers(remove_duplicate=True):
            if name in self.buffers:
                self.buffers[name].copy_(b)
        self.last_beta = beta
        return beta

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Shadow parameters and buffers under the model's names (for safetensors)."""
        return {**self.shadow, **self.buffers}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [k for k in self.shadow if k not in state]
        if missing:
            raise KeyError(f"EMA state is missing {len(missing)} tensors, e.g. {missing[:3]}")
        for k in self.shadow:
            self.shadow[k].copy_(state[k])
        for k in self.buffers:
            if k in state:
                self.buffers[k].copy_(state[k])

    @torch.no_grad()
    def load_into(self, model: nn.Module) -> None:
        """Copy the EMA weights into ``model`` (cast to the model's dtypes)."""
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name])
        for name, b in model.named_buffers(remove_duplicate=True):
            if name in self.buffers:
                b.copy_(self.buffers[name])
