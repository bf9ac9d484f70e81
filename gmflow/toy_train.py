"""The toy's small trainer: model, transition loss, one optimiser step, the training loop.

Kept apart from :mod:`gmflow.toy` so that a general trainer can reuse or replace these pieces:
:func:`toy_loss` is the transition loss of one batch (spec 4.1-4.3), :func:`train_step` one AdamW
step at a given learning rate, :func:`train_toy_model` the loop with the linear warm-up and the
karras EMA of spec 4.7 (the model holds the EMA weights when it returns).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gmflow.errors import DivergenceError

if TYPE_CHECKING:
    from gmflow.models.mlp2d import GMMLP2D
    from gmflow.toy_recipe import ToyModelConfig, ToyTrainConfig

__all__ = [
    "cpu_has_fast_bf16",
    "trunk_dtype",
    "ToyProgress",
    "ProgressFn",
    "TrainLog",
    "build_toy_model",
    "toy_loss",
    "train_step",
    "warmup_lr",
    "train_toy_model",
]


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16; Linux flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def trunk_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The ``GMMLP2D.trunk_dtype`` of a ``precision`` setting ('fp32', 'bf16' or 'auto').

    'auto' is bf16 on CUDA and on CPUs with bf16 matrix hardware (where it trains ~2.5× faster
    at the same quality, see benchmarks/results/toy.md), fp32 elsewhere (bf16 is emulated there).
    """
    match precision:
        case "fp32":
            return None
        case "bf16":
            return torch.bfloat16
        case "auto":
            if device.type == "cuda":
                fast = torch.cuda.is_bf16_supported()
            else:
                fast = device.type == "cpu" and cpu_has_fast_bf16()
            return torch.bfloat16 if fast else None
    raise ValueError(f"precision must be 'fp32', 'bf16' or 'auto', got {precision!r}")


@dataclass(frozen=True)
class ToyProgress:
    """One progress report of ``task`` ('train gmflow', 'train baseline', 'evaluate')."""

    task: str
    completed: int
    total: int
    loss: float | None = None  # training loss of the last step
    detail: str = ""  # e.g. the grid cell just finished


ProgressFn = Callable[[ToyProgress], None]


@dataclass(frozen=True)
class TrainLog:
    """What one training run produced: the loss of every step and the time it took."""

    losses: list[float]
    seconds_per_iter: float

    @property
    def final_loss(self) -> float:
        """Mean loss of the last 10% of the steps (the last step alone is noisy)."""
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail)


def build_toy_model(
    cfg: ToyModelConfig, *, num_gaussians: int, constant_logstd: float | None = None
) -> GMMLP2D:
    """The toy network (:class:`gmflow.models.mlp2d.GMMLP2D`) with the reference init."""
    from gmflow.models.mlp2d import GMMLP2D

    return GMMLP2D(
        num_gaussians=num_gaussians,
        hidden_dim=cfg.hidden_dim,
        num_layers=cfg.num_layers,
        constant_logstd=constant_logstd,
    )


def toy_loss(
    net: torch.nn.Module,
    x0: Tensor,
    *,
    trans_ratio: float,
    loss_scale: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Transition loss of one batch (spec 4.1-4.3): σ_high ~ U(0, 1], pair (x_low, x_high), GM NLL.

    Args:
        net: maps (x_t (B, 2, 1, 1), timestep = 1000·σ (B,)) to a GM over u.
        x0: (B, 2, 1, 1) data.
        trans_ratio: λ; σ_low = σ_high (1 − λ).
        loss_scale: multiplier of the [LL]-normalised loss.
        generator: RNG of σ and the two noises.

    Returns:
        The scalar loss (batch mean).
    """
    from gmflow.flow import sample_timesteps, transition_pair
    from gmflow.losses import transition_loss

    sigma_high = sample_timesteps(
        x0.shape[0], generator=generator, device=x0.device, dtype=x0.dtype
    )
    x_low, x_high, sigma_low = transition_pair(x0, sigma_high, trans_ratio, generator)
    gm_u = net(x_high, 1000 * sigma_high)
    return transition_loss(gm_u, x_low, x_high, sigma_low, sigma_high, scale=loss_scale)


def train_step(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x0: Tensor,
    lr: float,
    *,
    trans_ratio: float,
    loss_scale: float,
    generator: torch.Generator | None = None,
) -> float:
    """One optimiser step on one batch at learning rate ``lr``; returns the loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = toy_loss(net, x0, trans_ratio=trans_ratio, loss_scale=loss_scale, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def warmup_lr(cfg: ToyTrainConfig, step: int) -> float:
    """lr_i = lr·(1 − (1 − i/W)(1 − r)) for i < W, then lr (spec 4.6 warm-up)."""
    if step >= cfg.warmup_steps:
        return cfg.lr
    return cfg.lr * (1 - (1 - step / cfg.warmup_steps) * (1 - cfg.warmup_start_ratio))


def train_toy_model(
    net: torch.nn.Module,
    cfg: ToyTrainConfig,
    *,
    trans_ratio: float,
    device: torch.device,
    task: str = "train",
    progress: ProgressFn | None = None,
) -> TrainLog:
    """Train ``net`` in place on fresh checkerboard batches; at the end it holds the EMA weights.

    Raises:
        DivergenceError: the loss became non-finite.
    """
    from gmflow.data.checkerboard import sample_checkerboard
    from gmflow.training.ema import EMA, EMASchedule

    net.to(device).train()
    net.trunk_dtype = trunk_dtype(cfg.precision, device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=True
    )
    ema = EMA(net, EMASchedule(kind="karras", gamma=cfg.ema_gamma)) if cfg.ema == "karras" else None
    losses: list[float] = []
    report_every = max(1, cfg.iters // 200)
    start = time.perf_counter()
    for step in range(cfg.iters):
        x0 = sample_checkerboard(cfg.batch_size, generator=generator).reshape(-1, 2, 1, 1)
        loss = train_step(
            net,
            optimizer,
            x0,
            warmup_lr(cfg, step),
            trans_ratio=trans_ratio,
            loss_scale=cfg.loss_scale,
            generator=generator,
        )
        if not math.isfinite(loss):
            raise DivergenceError(f"{task}: the loss is {loss}; lower optim.lr", step=step)
        losses.append(loss)
        if ema is not None:
            ema.update(net, step)
        if progress is not None and ((step + 1) % report_every == 0 or step + 1 == cfg.iters):
            progress(ToyProgress(task, step + 1, cfg.iters, loss=loss))
    seconds = (time.perf_counter() - start) / cfg.iters
    if ema is not None:
        ema.load_into(net)
    net.eval()
    return TrainLog(losses=losses, seconds_per_iter=seconds)
