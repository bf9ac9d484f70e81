"""torchrun environment detection and small collective helpers (no port scanning, no re-exec)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "init_distributed",
    "barrier",
    "is_main",
    "on_main",
    "cleanup_distributed",
]

T = TypeVar("T")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun) and start the process group.

    nccl on CUDA, gloo on CPU. Without torchrun (no WORLD_SIZE) it is a single process.

    Args:
        device: "auto" (CUDA if available), "cpu" or "cuda".
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        from gmflow.errors import ConfigError

        raise ConfigError("device 'cuda' was asked for but CUDA is not available; use --device cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        logger.info("process group up: rank %d of %d on %s", rank, world_size, dev)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def barrier() -> None:
    """Synchronise all ranks (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_main() -> bool:
    """True on rank 0 (or without a process group)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def cleanup_distributed() -> None:
    """Destroy the process group if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def on_main(info: DistInfo, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 and share its (small, picklable) result; its error reaches every rank.

    Rank 0 re-raises its own exception; the other ranks raise the same GMFlowError subclass (or
    GMFlowError for any other exception) with the same message, instead of waiting forever in
    the next collective.
    """
    from gmflow import errors

    payload: list[Any] = [None]
    error: BaseException | None = None
    if info.is_main:
        try:
            payload = [("ok", fn())]
        except Exception as err:  # shared with the other ranks, then re-raised below
            error = err
            payload = [("error", type(err).__name__, f"rank 0: {err}")]
    if info.distributed:
        dist.broadcast_object_list(payload, src=0)
    if error is not None:
        raise error
    if payload[0][0] == "error":
        kind = getattr(errors, payload[0][1], None)
        if not (isinstance(kind, type) and issubclass(kind, errors.GMFlowError)):
            kind = errors.GMFlowError
        raise kind(payload[0][2])
    return payload[0][1]
