"""Optimiser and learning-rate warm-up (spec 4.6)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from gmflow.errors import ConfigError
from gmflow.run_config import OptimConfig

__all__ = ["param_groups", "build_optimizer", "lr_at"]

logger = logging.getLogger(__name__)


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float
) -> list[dict]:
    """Split parameters into a decayed group and a no-decay group (names with "bias")."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if "bias" in name else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA, foreach on CPU), or bitsandbytes' AdamW8bit when asked."""
    groups = param_groups(model.named_parameters(), cfg.weight_decay)
    if cfg.kind == "adamw8bit":
        if device.type != "cuda":
            raise ConfigError(
                "optim.kind='adamw8bit' needs a CUDA device; use optim.kind='adamw' on CPU"
            )
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]
        except ImportError as err:
            raise ConfigError(
                "optim.kind='adamw8bit' needs bitsandbytes: pip install bitsandbytes "
                "(or set optim.kind='adamw')"
            ) from err
        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=cfg.betas)
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None, foreach=None if fused else True
    )


def lr_at(cfg: OptimConfig, step: int) -> float:
    """Learning rate of iteration ``step`` (0-based): linear warm-up from ratio r, then constant.

    lr_i = lr·(1 − (1 − i/W)(1 − r)) for i < W (spec 4.6; lr(0) = r·lr).
    """
    if step >= cfg.warmup_steps:
        return cfg.lr
    return cfg.lr * (1.0 - (1.0 - step / cfg.warmup_steps) * (1.0 - cfg.warmup_start_ratio))
