"""The shard reader: infinite, shuffled, resumable training batches from cached shards.

:class:`ShardLoader` yields ``(x, y)`` batches forever: x (B, C, h, w) float32, y (B,) int64. In
latent mode every read draws a fresh flip f ~ Bernoulli(½) and a fresh posterior sample,
x = s·(μ_f + σ_f·ε) with ε ~ N(0, I) and s the manifest's scaling factor, so each epoch sees new
augmentations (the official cache froze one flip and one sample per image; spec 13.3). In pixel
mode x = pixels / 127.5 − 1, flipped with probability ½. The shard format and the writer are in
:mod:`gmflow.data.shard_io` (re-exported here).

The stream is a pure function of (seed, rank, world size, workers, batch size), which is what
makes it resumable:

* the infinite shard sequence is epoch 0's permutation of the shards, then epoch 1's, ...
  (``permutation_e = PCG64(seed, e)``); the G = world_size · num_workers global workers take
  positions g, g + G, g + 2G, ... of it, so ranks and workers read disjoint shards and even fewer
  shards than workers keep every worker busy. (This replaces WebDataset's ``ResampledShards``,
  which draws shards with replacement from an unseeded source and so cannot be resumed.)
* each worker reads its shards in blocks of about ``shuffle_buffer`` samples and emits each block
  in a seeded random order (a block shuffle: the same memory as a shuffle buffer, but its state
  is known from a sample count alone, so no data has to be replayed to resume);
* worker batch k takes the worker's samples [kB, (k+1)B) and draws its noise and flips from a
  generator seeded with (seed, g, k);
* the loader yields worker batches in a fixed round-robin order, batch n = batch n // W of
  worker n mod W, reordering what the DataLoader delivers if needed.

So ``state_dict()`` is just the number of batches consumed (plus the layout it depends on), and
``load_state_dict`` continues the identical stream. Under DDP every rank consumes the same number
of batches, so rank 0's state restores every rank.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import count, groupby, islice
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from torch import Tensor

from gmflow.data.manifest import read_manifest
from gmflow.data.shard_io import (
    LATENT_ARRAYS,
    PIXEL_ARRAYS,
    ShardSample,
    ShardWriter,
    read_shard,
    shard_name,
    verify_shards,
)
from gmflow.errors import DataError

__all__ = ["ShardLoader", "ShardSample", "ShardWriter", "shard_name"]

logger = logging.getLogger(__name__)


def _derived_seed(*entropy: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers (NumPy SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0] >> 1)


@functools.lru_cache(maxsize=64)
def _epoch_permutation(seed: int, num_shards: int, epoch: int) -> tuple[int, ...]:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0, epoch])))
    return tuple(int(i) for i in rng.permutation(num_shards))


@dataclass(frozen=True)
class _Layout:
    """Everything a worker needs to produce its stream (plain data, picklable)."""

    root: str
    shard_names: tuple[str, ...]
    shard_counts: tuple[int, ...]
    names: tuple[str, ...]  # arrays of a sample
    pixel_mode: bool
    scaling_factor: float
    seed: int
    rank: int
    world_size: int
    num_workers: int  # W >= 1; 1 when batches are made in the main process
    batch_size: int
    shards_per_block: int
    start_epoch: int  # the shard sequence starts at position start_epoch * num_shards
    random_flip: bool = True  # horizontal flip with probability ½ (off for digits, text, ...)

    def worker_shards(self, g: int) -> Iterator[tuple[int, int]]:
        """(epoch, shard) of global worker g's positions g, g + G, g + 2G, ... (infinite)."""
        num_shards, stride = len(self.shard_names), self.world_size * self.num_workers
        for j in count():
            pos = self.start_epoch * num_shards + g + j * stride
            epoch = pos // num_shards
            yield epoch, _epoch_permutation(self.seed, num_shards, epoch)[pos % num_shards]


def _blocks(layout: _Layout, g: int, skip: int) -> Iterator[dict[str, Any]]:
    """Pipeline source: blocks of shards of worker g, from the block holding sample ``skip``.

    A block is up to ``shards_per_block`` consecutive shards of the worker from one epoch (never
    two, so a small dataset still yields each sample once per epoch).
    """
    j = 0
    for _, group in groupby(layout.worker_shards(g), key=lambda item: item[0]):
        shards = (shard for _, shard in group)
        while block := list(islice(shards, layout.shards_per_block)):
            size = sum(layout.shard_counts[i] for i in block)
            if skip >= size:  # fast-forward on manifest counts alone: nothing is read
                skip -= size
            else:
                yield {"block": j, "shards": block, "skip": skip}
                skip = 0
            j += 1


def _shuffled_samples(layout: _Layout, g: int, blocks: Iterator[dict]) -> Iterator[ShardSample]:
    """Pipeline stage: read each block, check its counts, emit it in a seeded random order."""
    for block in blocks:
        samples: list[ShardSample] = []
        for i in block["shards"]:
            path = os.path.join(layout.root, layout.shard_names[i])
            got = read_shard(path, layout.names)
            if len(got) != layout.shard_counts[i]:
                raise DataError(
                    f"shard {path} holds {len(got)} samples but the manifest lists "
                    f"{layout.shard_counts[i]}: the manifest does not match the shards; re-run "
                    "`gmflow cache-data` with the same arguments to repair the dataset"
                )
            samples.extend(got)
        order = np.random.default_rng([layout.seed, 1, g, block["block"]]).permutation(len(samples))
        for idx in order[block["skip"] :]:
            yield samples[idx]


def _batches(
    layout: _Layout, w: int, g: int, k0: int, samples: Iterator[ShardSample]
) -> Iterator[tuple[int, int, Tensor, Tensor]]:
    """Pipeline stage: batch k of worker w, with flips and posterior noise seeded by (g, k)."""
    for k in count(k0):
        chunk = list(islice(samples, layout.batch_size))
        gen = torch.Generator().manual_seed(_derived_seed(layout.seed, 2, g, k))
        flip = torch.randint(0, 2, (len(chunk),), generator=gen)
        if not layout.random_flip:
            flip.zero_()
        labels = torch.tensor([s.label for s in chunk], dtype=torch.int64)
        if layout.pixel_mode:
            pixels = torch.from_numpy(np.stack([s.arrays["pixels"] for s in chunk]))
            x = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
            x = torch.where(flip.bool()[:, None, None, None], x.flip(-1), x)
        else:
            pairs = list(zip(chunk, flip.tolist(), strict=True))
            mean = np.stack([s.arrays["mean"][f] for s, f in pairs]).astype(np.float32)
            std = np.stack([s.arrays["std"][f] for s, f in pairs]).astype(np.float32)
            noise = torch.randn(mean.shape, generator=gen)  # ε, (B, C, h, w)
            x = torch.from_numpy(mean).addcmul_(torch.from_numpy(std), noise)
            x.mul_(layout.scaling_factor)  # x = s·(μ_f + σ_f·ε)
        yield w, k, x.contiguous(), labels


def _worker_pipeline(layout: _Layout, w: int, k0: int) -> wds.DataPipeline:
    """The WebDataset pipeline of worker w of this rank, starting at its batch k0."""
    g = layout.rank * layout.num_workers + w
    return wds.DataPipeline(
        lambda: _blocks(layout, g, skip=k0 * layout.batch_size),
        functools.partial(_shuffled_samples, layout, g),
        functools.partial(_batches, layout, w, g, k0),
    )


class _WorkerStream(torch.utils.data.IterableDataset):
    """What each DataLoader worker iterates: its own pipeline from its own start batch."""

    def __init__(self, layout: _Layout, batches_consumed: int) -> None:
        super().__init__()
        self.layout, self.batches_consumed = layout, batches_consumed

    def __iter__(self) -> Iterator[tuple[int, int, Tensor, Tensor]]:
        info = torch.utils.data.get_worker_info()
        w, W = (0, 1) if info is None else (info.id, info.num_workers)
        k0 = max(0, -(-(self.batches_consumed - w) // W))  # batches of w among the first n
        return iter(_worker_pipeline(self.layout, w, k0))


class ShardLoader:
    """Infinite, shuffled, resumable batches ``(x (B, C, h, w) float32, y (B,) int64)``.

    Args:
        root: Dataset folder written by ``gmflow cache-data`` (holds ``manifest.json``).
        batch_size: Samples per batch on this rank (B).
        seed: Seed of the shard order, the block shuffle, the flips and the posterior noise.
        num_workers: DataLoader worker processes (0 reads in the calling process).
        shuffle_buffer: About how many samples a worker holds and shuffles at once.
        rank: This process's rank; default ``RANK`` from the environment (torchrun), else 0.
        world_size: Number of ranks; default ``WORLD_SIZE``, else 1.
        expected_shape: (C, h, w) the model expects; checked against the manifest.
        verify: ``"size"`` (default) checks that every shard exists with the manifest's byte
            count; ``"sha256"`` also hashes every shard (slow on big datasets); ``"none"`` only
            checks that they exist.
        random_flip: Flip each sample horizontally with probability ½ (False for data whose
            meaning changes under a flip, such as digits).
        pin_memory: Pin batches in page-locked memory (faster copies to a GPU).

    Raises:
        DataError: No manifest, missing or mismatched shards, or a sample shape other than
            ``expected_shape``. While iterating: a corrupt tar, or a shard whose sample count
            differs from the manifest.

    Example::

        loader = ShardLoader("data/in256_sdvae", batch_size=32, expected_shape=(4, 32, 32))
        loader.load_state_dict(checkpoint["data"])      # optional: continue a run
        for step, (x_0, y) in zip(range(num_steps), loader):
            ...
        checkpoint["data"] = loader.state_dict()
    """

    def __init__(
        self,
        root: str | Path,
        *,
        batch_size: int,
        seed: int = 0,
        num_workers: int = 2,
        shuffle_buffer: int = 4096,
        rank: int | None = None,
        world_size: int | None = None,
        expected_shape: tuple[int, ...] | None = None,
        verify: Literal["none", "size", "sha256"] = "size",
        random_flip: bool = True,
        pin_memory: bool = False,
    ) -> None:
        if batch_size <= 0 or num_workers < 0 or shuffle_buffer <= 0:
            raise ValueError("batch_size and shuffle_buffer must be > 0 and num_workers >= 0")
        root = Path(root)
        self.manifest = read_manifest(root)
        m = self.manifest
        if expected_shape is not None and tuple(expected_shape) != tuple(m.sample_shape):
            raise DataError(
                f"{root} holds samples of shape {tuple(m.sample_shape)} ({m.mode} mode, encoder "
                f"{m.encoder}) but the model expects {tuple(expected_shape)}; use a dataset "
                "cached with the model's VAE and resolution, or change the model's input size"
            )
        if not m.shards or m.num_samples == 0:
            raise DataError(f"{root} holds no samples (every input was skipped?)")
        if sum(s.num_samples for s in m.shards) != m.num_samples:
            raise DataError(
                f"{root}/manifest.json lists {m.num_samples} samples but its shards add up to "
                f"{sum(s.num_samples for s in m.shards)}; re-run `gmflow cache-data` to rewrite it"
            )
        verify_shards(root, m, verify)
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        mean_count = m.num_samples / len(m.shards)
        self._layout = _Layout(
            root=str(root),
            shard_names=tuple(s.name for s in m.shards),
            shard_counts=tuple(s.num_samples for s in m.shards),
            names=PIXEL_ARRAYS if m.mode == "pixel" else LATENT_ARRAYS,
            pixel_mode=m.mode == "pixel",
            scaling_factor=m.scaling_factor,
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_workers=max(1, num_workers),
            batch_size=batch_size,
            shards_per_block=max(1, round(shuffle_buffer / max(mean_count, 1.0))),
            start_epoch=0,
            random_flip=random_flip,
        )
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.batches_consumed = 0

    @property
    def batches_per_epoch(self) -> int:
        """Batches per rank that make one pass over the dataset (rounded down, >= 1)."""
        return max(
            1, self.manifest.num_samples // (self._layout.batch_size * self._layout.world_size)
        )

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        layout, W = self._layout, self._layout.num_workers
        stream = _WorkerStream(layout, self.batches_consumed)
        if self.num_workers == 0:
            source: Any = iter(stream)
        else:
            source = torch.utils.data.DataLoader(
                stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory
            )
        pending: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        for w, k, x, y in source:
            pending[(int(w), int(k))] = (x, y)
            while (nxt := (self.batches_consumed % W, self.batches_consumed // W)) in pending:
                batch = pending.pop(nxt)
                self.batches_consumed += 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        """Position of the stream: batches consumed on this rank, and the layout it depends on."""
        lay = self._layout
        samples = self.batches_consumed * lay.batch_size
        return {
            "batches_consumed": self.batches_consumed,
            "samples_consumed": samples,
            "epoch": lay.start_epoch + samples * lay.world_size // self.manifest.num_samples,
            "start_epoch": lay.start_epoch,
            "seed": lay.seed,
            "batch_size": lay.batch_size,
            "num_workers": lay.num_workers,
            "world_size": lay.world_size,
            "num_samples": self.manifest.num_samples,
        }

    def load_state_dict(self, state: dict[str, int], *, strict: bool = True) -> None:
        """Continue from ``state`` (the next batch is the one that followed it).

        The stream continues exactly only with the same seed, batch size, workers, world size and
        dataset. With ``strict=False`` a different layout starts a new stream at the beginning of
        the saved epoch; with ``strict=True`` (default) it is an error.
        """
        lay = self._layout
        ours = {
            "seed": lay.seed,
            "batch_size": lay.batch_size,
            "num_workers": lay.num_workers,
            "world_size": lay.world_size,
            "num_samples": self.manifest.num_samples,
        }
        diff = {k: (state.get(k), v) for k, v in ours.items() if state.get(k) != v}
        if not diff:
            self._layout = replace(lay, start_epoch=int(state["start_epoch"]))
            self.batches_consumed = int(state["batches_consumed"])
        elif strict:
            details = ", ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in diff.items())
            raise DataError(
                f"cannot continue the data stream exactly: {details}. Use the saved settings, or "
                "load_state_dict(state, strict=False) to restart at the beginning of epoch "
                f"{state.get('epoch')}"
            )
        else:
            logger.warning("data layout changed (%s); restarting at epoch %s", diff, state["epoch"])
            self._layout = replace(lay, start_epoch=int(state["epoch"]))
            self.batches_consumed = 0
