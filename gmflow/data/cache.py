"""``gmflow cache-data``: image folder -> ADM crop -> VAE posterior -> checksummed shards.

The pipeline of spec 13, changed where the official one loses information or robustness:

* it stores the posterior N(μ, σ²) of each image **and of its horizontal flip** (float16),
  instead of one posterior sample of one randomly flipped copy, so the reader draws a fresh flip
  and a fresh sample every epoch (:mod:`gmflow.data.shards`); ``vae="none"`` stores the uint8
  crops instead;
* shard ``i`` always holds inputs ``[i·S, (i+1)·S)`` of the sorted input list (S = shard size), so
  a rerun plans exactly the same shards. A shard is written to a temporary name and renamed when
  complete, next to a record ``DIR/shard_info/train-<i>.json`` (its SHA-256, counts, skipped
  inputs, channel sums and a digest of what it was made from). A rerun keeps every shard whose
  record matches the plan and whose file matches its checksum, and rewrites the others, so after
  any crash the final set holds every readable input exactly once;
* unreadable images are skipped, and listed with the reason in the records and the manifest;
* under ``torchrun`` rank r writes shards r, r + R, r + 2R, ...; after a barrier (gloo) rank 0
  merges the records into ``DIR/manifest.json``, which therefore exists only when every shard is
  complete.

The encoder is injectable (anything with ``name``, ``scaling_factor`` and ``encode``), so tests and
notebooks can pass a tiny one; by default ``cfg.vae`` is loaded with
:func:`gmflow.models.vae.load_vae` before any image is read.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from gmflow.data.crop import adm_center_crop, load_rgb_image
from gmflow.data.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    SkippedInput,
    read_manifest,
    write_json_atomic,
)
from gmflow.data.shard_io import ShardSample, ShardWriter, shard_name
from gmflow.data.shard_plan import (
    ShardPlan,
    complete_record,
    plan_shards,
    record_path,
    remove_stale_files,
)
from gmflow.data.sources import ImageInput, list_image_inputs
from gmflow.errors import ConfigError, DataError

__all__ = ["CacheConfig", "CacheProgress", "CacheResult", "LatentEncoder", "cache_latents"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """What ``gmflow cache-data`` does (one field per command-line option)."""

    source: Path  # image folder: SRC/<class>/<image>, or the root of the --labels paths
    out_dir: Path  # dataset folder: shards/, shard_info/, manifest.json
    vae: str = "stabilityai/sd-vae-ft-ema"  # hub id, local folder, or "none" to store pixels
    resolution: int = 256  # side of the ADM centre crop, pixels
    labels_file: Path | None = None  # Caffe "relative/path label" list; None: sorted folders
    shard_size: int = 1000  # inputs per shard
    batch_size: int = 32  # images per encoder call
    dtype: Literal["fp32", "bf16"] = "fp32"  # encoder compute dtype (stored posteriors are fp16)
    device: str | None = None  # None: cuda:LOCAL_RANK when available, else cpu
    limit: int | None = None  # only the first N inputs of the sorted list
    num_workers: int = 4  # threads decoding and cropping images


@dataclass(frozen=True)
class CacheProgress:
    """Progress of this rank, passed to the ``progress`` callback after every batch."""

    done: int  # inputs processed by this rank in this run (written or skipped)
    total: int  # inputs this rank has to process in this run (reused shards excluded)
    images_per_s: float
    eta_s: float  # seconds left at the current rate (inf before the first batch)
    rank: int
    world_size: int


@dataclass(frozen=True)
class CacheResult:
    """Summary of a finished run (the same on every rank)."""

    out_dir: Path
    manifest_path: Path
    num_samples: int  # samples in the dataset
    num_skipped: int  # unreadable inputs
    num_shards: int
    shards_written: int  # by this rank in this run
    shards_reused: int  # complete shards of an earlier run kept by this rank
    skipped: tuple[SkippedInput, ...]
    elapsed_s: float


class LatentEncoder(Protocol):
    """What :func:`cache_latents` needs from an encoder (:class:`gmflow.models.vae.VAE` is one)."""

    name: str  # recorded in the manifest
    scaling_factor: float  # x_0 = scaling_factor · z

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, R, R) in [-1, 1] -> posterior (mean, std), each (B, C, h, w)."""
        ...


def cache_latents(
    cfg: CacheConfig,
    *,
    encoder: LatentEncoder | None = None,
    progress: Callable[[CacheProgress], None] | None = None,
) -> CacheResult:
    """Encode an image folder into shards and a manifest under ``cfg.out_dir`` (resumable).

    Args:
        cfg: What to cache; see :class:`CacheConfig`.
        encoder: Used instead of loading ``cfg.vae`` (ignored when ``cfg.vae == "none"``).
        progress: Called after every batch with this rank's :class:`CacheProgress`.

    Returns:
        The summary; the dataset is described by ``result.manifest_path``.

    Raises:
        ConfigError: Invalid sizes or dtype.
        CheckpointError: The VAE cannot be loaded (checked before any image is read).
        DataError: The source holds no image, or no input could be read.
    """
    _check_config(cfg)
    t_start = time.perf_counter()
    rank, world_size, local_rank, own_group = _init_distributed()
    try:
        if cfg.vae.lower() != "none" and encoder is None:
            from gmflow.models.vae import load_vae  # the one edge from data to models

            device = cfg.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
            if device == "cuda" and world_size > 1:
                device = f"cuda:{local_rank}"
            dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
            encoder = load_vae(cfg.vae, device=device, dtype=dtype)
        if cfg.vae.lower() == "none":
            encoder = None
        source = list_image_inputs(cfg.source, cfg.labels_file)
        inputs = source.inputs[: cfg.limit] if cfg.limit is not None else source.inputs
        settings = {
            "format": MANIFEST_FORMAT,
            "encoder": None if encoder is None else encoder.name,
            "dtype": "uint8" if encoder is None else cfg.dtype,
            "resolution": cfg.resolution,
        }
        plans = plan_shards(inputs, cfg.shard_size, settings)
        out = Path(cfg.out_dir)
        (out / "shards").mkdir(parents=True, exist_ok=True)
        (out / "shard_info").mkdir(parents=True, exist_ok=True)
        if rank == 0:
            (out / MANIFEST_NAME).unlink(missing_ok=True)  # exists again only when complete
        mine = [p for p in plans if p.index % world_size == rank]
        reused = {p.index for p in mine if complete_record(out, p) is not None}
        todo = [p for p in mine if p.index not in reused]
        logger.info("rank %d: %d shards to write, %d reused", rank, len(todo), len(reused))
        ticker = _Ticker(sum(len(p.inputs) for p in todo), rank, world_size, progress)
        with ThreadPoolExecutor(max(1, cfg.num_workers)) as pool:
            for plan in todo:
                _write_shard(cfg, source.root, out, plan, encoder, pool, ticker)
        _barrier(world_size)
        if rank == 0:
            _write_manifest(cfg, out, plans, source.class_names, encoder)
        _barrier(world_size)
        manifest = read_manifest(out)
    finally:
        if own_group:
            torch.distributed.destroy_process_group()
    return CacheResult(
        out_dir=out,
        manifest_path=out / MANIFEST_NAME,
        num_samples=manifest.num_samples,
        num_skipped=len(manifest.skipped),
        num_shards=len(manifest.shards),
        shards_written=len(todo),
        shards_reused=len(reused),
        skipped=manifest.skipped,
        elapsed_s=time.perf_counter() - t_start,
    )


def _check_config(cfg: CacheConfig) -> None:
    for name in ("resolution", "shard_size", "batch_size"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name}={getattr(cfg, name)}; expected a positive integer")
    if cfg.limit is not None and cfg.limit <= 0:
        raise ConfigError(f"limit={cfg.limit}; expected a positive number of inputs or None")
    if cfg.dtype not in ("fp32", "bf16"):
        raise ConfigError(f"dtype={cfg.dtype!r}; expected 'fp32' or 'bf16'")


def _init_distributed() -> tuple[int, int, int, bool]:
    """(rank, world size, local rank, whether we started the process group) from torchrun's env."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size <= 1:
        return 0, 1, local_rank, False
    dist = torch.distributed
    own = not dist.is_initialized()
    if own:  # gloo only synchronises here; the long timeout lets slow ranks finish encoding
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=2))
    return dist.get_rank(), dist.get_world_size(), local_rank, own


def _barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()


class _Ticker:
    """Turns batch completions into CacheProgress callbacks (images/s and ETA)."""

    def __init__(self, total: int, rank: int, world_size: int, callback: Any) -> None:
        self.total, self.rank, self.world_size, self.callback = total, rank, world_size, callback
        self.done, self.t0 = 0, time.perf_counter()

    def __call__(self, n: int) -> None:
        self.done += n
        rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        if self.callback is not None:
            self.callback(
                CacheProgress(self.done, self.total, rate, eta, self.rank, self.world_size)
            )


def _load_crop(path: Path, resolution: int) -> NDArray[np.uint8] | str:
    """The ADM crop (R, R, 3) of an image, or the reason it cannot be read."""
    try:
        return adm_center_crop(load_rgb_image(path), resolution)
    except DataError as err:
        cause = err.__cause__
        return f"{type(cause).__name__}: {cause}" if cause is not None else str(err)


def _write_shard(
    cfg: CacheConfig,
    root: Path,
    out: Path,
    plan: ShardPlan,
    encoder: LatentEncoder | None,
    pool: ThreadPoolExecutor,
    tick: _Ticker,
) -> None:
    """Crop, encode and write one shard, then its record; decoding runs one batch ahead."""
    batches = [
        plan.inputs[i : i + cfg.batch_size] for i in range(0, len(plan.inputs), cfg.batch_size)
    ]

    def submit(batch: Sequence[tuple[str, ImageInput]]) -> list[Future]:
        return [pool.submit(_load_crop, root / inp.path, cfg.resolution) for _, inp in batch]

    stats = {"count": 0, "sum": 0.0, "sum_sq": 0.0}
    skipped: list[dict[str, str]] = []
    shape: list[int] | None = None
    writer = ShardWriter(out / shard_name(plan.index))
    try:
        ahead = submit(batches[0])
        for b, batch in enumerate(batches):
            futures, ahead = ahead, submit(batches[b + 1]) if b + 1 < len(batches) else []
            good = []
            for (key, inp), future in zip(batch, futures, strict=True):
                crop = future.result()
                if isinstance(crop, str):
                    skipped.append({"path": inp.path, "reason": crop})
                else:
                    good.append((key, inp, crop))
            if good:
                arrays, x = _encode([c for _, _, c in good], encoder)
                _accumulate(stats, x)
                shape = list(arrays["mean"].shape[-3:]) if encoder else [3, *good[0][2].shape[:2]]
                for j, (key, inp, _) in enumerate(good):
                    sample_arrays = {name: a[j] for name, a in arrays.items()}
                    writer.write(ShardSample(key, inp.label, inp.path, sample_arrays))
            tick(len(batch))
        num_samples = writer.num_samples
        sha256, num_bytes = writer.commit()
    except BaseException:
        writer.abort()
        raise
    record = {
        "digest": plan.digest,
        "name": shard_name(plan.index),
        "num_samples": num_samples,
        "num_bytes": num_bytes,
        "sha256": sha256,
        "sample_shape": shape,
        "skipped": skipped,
        "stats": stats,
    }
    write_json_atomic(record_path(out, plan.index), json.dumps(record, indent=1))


def _encode(
    crops: list[NDArray[np.uint8]], encoder: LatentEncoder | None
) -> tuple[dict[str, NDArray], NDArray[np.float64]]:
    """Stored arrays of a batch, and the reader's output variable x for the statistics.

    Latent mode: {"mean", "std"} float16 (B, 2, C, h, w) for the image and its flip, and x as
    (B, 2, C, h, w, 2) holding (s·μ, s·σ). Pixel mode: {"pixels"} uint8 (B, R, R, 3).
    """
    pixels = np.stack(crops)  # (B, R, R, 3) uint8
    if encoder is None:
        return {"pixels": pixels}, pixels
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, R, R)
    mean, std = encoder.encode(images)
    mean_flip, std_flip = encoder.encode(images.flip(-1))
    mean16 = torch.stack([mean, mean_flip], dim=1).to(torch.float16).cpu().numpy()
    std16 = torch.stack([std, std_flip], dim=1).to(torch.float16).cpu().numpy()
    s = float(encoder.scaling_factor)
    moments = np.stack([mean16.astype(np.float64) * s, std16.astype(np.float64) * s], axis=-1)
    return {"mean": mean16, "std": std16}, moments


def _accumulate(stats: dict[str, Any], x: NDArray) -> None:
    """Add per-channel Σx and Σx² of a batch (exact posterior moments in latent mode)."""
    if x.dtype == np.uint8:  # pixels (B, R, R, 3) -> x = p / 127.5 - 1
        v = x.astype(np.float64) / 127.5 - 1.0
        n, total, total_sq = v[..., 0].size, v.sum(axis=(0, 1, 2)), (v * v).sum(axis=(0, 1, 2))
    else:  # (B, 2, C, h, w, 2): E[x] = s·μ, E[x²] = s²(μ² + σ²)
        m, sd = x[..., 0], x[..., 1]
        n = m[:, :, 0].size
        total, total_sq = m.sum(axis=(0, 1, 3, 4)), (m * m + sd * sd).sum(axis=(0, 1, 3, 4))
    stats["count"] += int(n)
    stats["sum"] = (np.asarray(stats["sum"]) + total).tolist()
    stats["sum_sq"] = (np.asarray(stats["sum_sq"]) + total_sq).tolist()


def _write_manifest(
    cfg: CacheConfig,
    out: Path,
    plans: list[ShardPlan],
    class_names: dict[int, str],
    encoder: LatentEncoder | None,
) -> None:
    """Rank 0, after the barrier: merge the shard records, drop stale files, write the manifest."""
    # every shard was hashed when written or when reused: sizes suffice here
    records = [complete_record(out, p, check_sha256=False) for p in plans]
    broken = [shard_name(p.index) for p, r in zip(plans, records, strict=True) if r is None]
    if broken:
        raise DataError(
            f"{len(broken)} shards are incomplete after every rank finished (e.g. {broken[0]}); "
            "another process may be writing to the same folder. Re-run gmflow cache-data"
        )
    remove_stale_files(out, len(plans))
    count = sum(r["stats"]["count"] for r in records)
    if count == 0:
        raise DataError(f"no input of {cfg.source} could be read; see {out}/shard_info/*.json")
    total = np.sum([r["stats"]["sum"] for r in records if r["stats"]["count"]], axis=0)
    total_sq = np.sum([r["stats"]["sum_sq"] for r in records if r["stats"]["count"]], axis=0)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    shape = next(r["sample_shape"] for r in records if r["sample_shape"] is not None)
    manifest = Manifest(
        mode="pixel" if encoder is None else "latent",
        num_samples=sum(r["num_samples"] for r in records),
        shards=tuple(
            ShardInfo(r["name"], r["num_samples"], r["num_bytes"], r["sha256"]) for r in records
        ),
        classes=dict(class_names),
        resolution=cfg.resolution,
        sample_shape=tuple(shape),
        stored_dtype="uint8" if encoder is None else "float16",
        encoder=None if encoder is None else encoder.name,
        scaling_factor=1.0 if encoder is None else float(encoder.scaling_factor),
        channel_mean=tuple(float(v) for v in mean),
        channel_std=tuple(float(v) for v in std),
        skipped=tuple(SkippedInput(**s) for r in records for s in r["skipped"]),
        source=str(cfg.source),
        extra={"encoder_dtype": cfg.dtype, "shard_size": cfg.shard_size, "limit": cfg.limit},
    )
    write_json_atomic(out / MANIFEST_NAME, manifest.to_json())
