"""Which inputs go to which shard, and whether a shard on disk is a complete, current one.

``gmflow cache-data`` is resumable because the plan is a pure function of the sorted input list:
shard i holds inputs [i·S, (i+1)·S) under keys that are their positions in the list. Each
finished shard has a record ``DIR/shard_info/train-<i>.json`` holding a digest of what it was
made from (inputs, labels, encoder, dtype, resolution) and the SHA-256 of its tar. A shard is
kept by a rerun only if its record's digest equals the new plan's and the tar matches the record;
anything else is rewritten. So the final dataset holds each readable input exactly once, however
often the writer was interrupted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gmflow.data.shard_io import file_sha256, shard_name
from gmflow.data.sources import ImageInput

__all__ = ["ShardPlan", "complete_record", "plan_shards", "record_path", "remove_stale_files"]


@dataclass(frozen=True)
class ShardPlan:
    """What one shard must hold."""

    index: int
    inputs: tuple[tuple[str, ImageInput], ...]  # (key, input); key = position in the input list
    digest: str  # SHA-256 of everything the shard's bytes depend on


def plan_shards(
    inputs: Sequence[ImageInput], shard_size: int, settings: dict[str, Any]
) -> list[ShardPlan]:
    """Shard i <- inputs [i·S, (i+1)·S).

    Args:
        inputs: The sorted input list.
        shard_size: S, inputs per shard.
        settings: JSON-able settings that change the stored bytes (encoder, dtype, resolution).
    """
    plans = []
    for start in range(0, len(inputs), shard_size):
        chunk = tuple(
            (f"{start + j:09d}", inp) for j, inp in enumerate(inputs[start : start + shard_size])
        )
        text = json.dumps([settings, [(key, i.path, i.label) for key, i in chunk]])
        plans.append(
            ShardPlan(start // shard_size, chunk, hashlib.sha256(text.encode()).hexdigest())
        )
    return plans


def record_path(out: Path, index: int) -> Path:
    """``out/shard_info/train-<index>.json``."""
    return out / "shard_info" / f"train-{index:06d}.json"


def complete_record(out: Path, plan: ShardPlan, *, check_sha256: bool = True) -> dict | None:
    """The record of a finished shard that matches ``plan`` and its tar, else None.

    Args:
        out: Dataset folder.
        plan: The shard it must hold.
        check_sha256: Hash the tar (else compare its size only).
    """
    try:
        record = json.loads(record_path(out, plan.index).read_text())
    except (OSError, ValueError):
        return None
    tar = out / shard_name(plan.index)
    if (
        record.get("digest") != plan.digest
        or not tar.is_file()
        or tar.stat().st_size != record.get("num_bytes")
        or (check_sha256 and file_sha256(tar) != record.get("sha256"))
    ):
        return None
    return record


def remove_stale_files(out: Path, num_shards: int) -> None:
    """Delete our own files the current plan does not use: temporaries and shards >= num_shards."""
    for pattern in ("shards/train-*.tar*", "shard_info/train-*.json*"):
        for path in out.glob(pattern):
            index = path.name.split(".")[0].removeprefix("train-")
            if path.suffix == ".tmp" or not (index.isdigit() and int(index) < num_shards):
                path.unlink(missing_ok=True)
