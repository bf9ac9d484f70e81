"""Training batches for a recipe: the checkerboard sampler or the shard reader, resumable.

Every source has ``next_batch() -> (x0, labels)``, ``state_dict()`` and ``load_state_dict()``;
the trainer stores the state of every rank in its checkpoints, so a resumed run continues the same
stream instead of restarting the epoch. Label dropout to the null class (spec 4.5) happens here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import Tensor

from gmflow.run_config import RunConfig
from gmflow.training.distributed import DistInfo

__all__ = ["TrainBatches", "CheckerboardBatches", "ShardBatches", "build_batches", "drop_labels"]


class TrainBatches(Protocol):
    def next_batch(self) -> tuple[Tensor, Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def drop_labels(labels: Tensor, prob: float, null_class: int) -> Tensor:
    """Replace each label by ``null_class`` with probability ``prob`` (global RNG)."""
    if prob <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device) < prob
    return torch.where(drop, torch.full_like(labels, null_class), labels)


class CheckerboardBatches:
    """Fresh exact checkerboard points (B, 2, 1, 1) from a per-rank seeded generator; labels 0."""

    def __init__(self, batch_size: int, seed: int, rank: int) -> None:
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        from gmflow.data.checkerboard import sample_checkerboard

        x0 = sample_checkerboard(self.batch_size, generator=self.generator)
        return x0[:, :, None, None], torch.zeros(self.batch_size, dtype=torch.long)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class ShardBatches:
    """Batches from ``gmflow cache-data`` shards (:class:`gmflow.data.shards.ShardLoader`)."""

    def __init__(self, cfg: RunConfig, dist: DistInfo) -> None:
        from gmflow.data.shards import ShardLoader

        m = cfg.model
        self.loader = ShardLoader(
            cfg.data.path,
            batch_size=cfg.train.batch_size_per_device,
            seed=cfg.train.seed,
            num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            rank=dist.rank,
            world_size=dist.world_size,
            expected_shape=(m.in_channels, m.sample_size, m.sample_size),
            random_flip=cfg.data.random_flip,
            pin_memory=dist.device.type == "cuda",
        )
        self.label_dropout = cfg.data.label_dropout
        self.null_class = m.num_classes
        self._it: Iterator[tuple[Tensor, Tensor]] | None = None

    def next_batch(self) -> tuple[Tensor, Tensor]:
        if self._it is None:
            self._it = iter(self.loader)
        x0, labels = next(self._it)
        return x0, drop_labels(labels, self.label_dropout, self.null_class)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.loader.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._it = None


def build_batches(cfg: RunConfig, dist: DistInfo) -> TrainBatches:
    """The batch source of a recipe; shard problems raise DataError here, before step 0."""
    match cfg.data.kind:
        case "checkerboard":
            return CheckerboardBatches(cfg.train.batch_size_per_device, cfg.train.seed, dist.rank)
        case "shards":
            return ShardBatches(cfg, dist)
    raise ValueError(f"data.kind={cfg.data.kind!r}; expected 'checkerboard' or 'shards'")
