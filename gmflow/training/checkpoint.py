"""Atomic, resumable checkpoints: safetensors weights + a weights_only training state.

Layout of ``<run_dir>/checkpoints/step-00001000/``:
    model.safetensors   trainable weights (our parameter names)
    ema.safetensors     fp32 EMA weights (if any)
    state.pt            optimizer, step, data position, config (plain data; weights_only)
    rng-rank{r}.pt      RNG states of rank r (torch CPU/CUDA, numpy, python)

A checkpoint is written into a hidden temporary folder, every file is fsynced, and the folder is
renamed into place: a crash mid-save leaves the previous checkpoint intact and no partial folder
is ever picked up by :func:`latest_checkpoint`.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gmflow.errors import CheckpointError

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
    "rng_state",
    "set_rng_state",
]

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """All RNG states of this process as weights_only-loadable data."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    import ast

    torch.set_rng_state(state["torch"])
    np.random.set_state(
        ("MT19937", np.asarray(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0)
    )
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, sorted by step."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "state.pt").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor] | None,
    train_state: dict[str, Any],
    rank: int = 0,
    world_size: int = 1,
    barrier: Any = None,
) -> Path:
    """Write checkpoint ``step`` atomically; every rank calls it (rank 0 writes the weights).

    Args:
        run_dir: the run folder.
        step: number of completed optimisation steps.
        model_state: tensors to store in model.safetensors (rank 0's copy is written).
        ema_state: tensors for ema.safetensors, or None.
        train_state: plain data + tensors (optimizer state, schedule, data position, config).
        rank: this process's rank; each rank writes its own RNG file.
        world_size: number of ranks.
        barrier: a callable synchronising ranks (required when world_size > 1).

    Returns:
        The final checkpoint folder.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    sync = barrier if barrier is not None else (lambda: None)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    sync()
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    _fsync_file(tmp / f"rng-rank{rank}.pt")
    if rank == 0:
        contiguous = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
        save_file(contiguous, tmp / "model.safetensors")
        _fsync_file(tmp / "model.safetensors")
        if ema_state is not None:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in ema_state.items()},
                tmp / "ema.safetensors",
            )
            _fsync_file(tmp / "ema.safetensors")
        torch.save({**train_state, "step": step, "world_size": world_size}, tmp / "state.pt")
        _fsync_file(tmp / "state.pt")
    sync()
    if rank == 0:
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    sync()
    return final


def load_checkpoint(
    path: str | os.PathLike[str], rank: int = 0, map_location: str = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint folder with ``weights_only=True``.

    Returns:
        {"model": ..., "ema": ... or None, "state": ..., "rng": ... or None}.

    Raises:
        CheckpointError: the folder or a required file is missing or unreadable.
    """
    path = Path(path)
    if not (path / "state.pt").is_file() or not (path / "model.safetensors").is_file():
        raise CheckpointError(
            f"checkpoint '{path}' is incomplete: expected model.safetensors and state.pt in it"
        )
    try:
        out: dict[str, Any] = {
            "model": load_file(path / "model.safetensors", device=map_location),
            "ema": (
                load_file(path / "ema.safetensors", device=map_location)
                if (path / "ema.safetensors").is_file()
                else None
            ),
            "state": torch.load(path / "state.pt", map_location=map_location, weights_only=True),
        }
        rng_file = path / f"rng-rank{rank}.pt"
        out["rng"] = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
    except (OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"checkpoint '{path}' could not be read: {err}") from err
    return out


def prune_checkpoints(
    run_dir: str | os.PathLike[str], keep_last: int, milestones: set[int] | None = None
) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, keeping milestone steps forever."""
    milestones = milestones or set()
    ckpts = list_checkpoints(run_dir)
    removable = [(s, p) for s, p in ckpts if s not in milestones]
    for _, p in removable[: max(0, len(removable) - keep_last)]:
        shutil.rmtree(p, ignore_errors=True)
