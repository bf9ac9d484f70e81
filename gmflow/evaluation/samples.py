"""Sample generation for a sweep point into uint8 shards: seeded per sample, resumable, torchrun.

Sample i (0 <= i < num_samples) of every sweep point starts from

* label ``y_i = randint(0, num_classes)`` of a CPU generator seeded with ``seed·10⁷ + i``,
* noise ``x_i = randn(C, H, W)`` of a CPU generator seeded with ``seed·10⁷ + i + 1000``,

which for ``seed = 0`` is spec 11.2 [LL] (label seed i, noise seed i + 1000). (The stride is not
2³²: torch's CPU generator keeps only the low 32 bits of a seed, so seed·2³² + i would repeat the
samples of seed 0; :class:`EvalConfig` checks that every seed stays below 2³².) Labels and noise
therefore do not depend on the batch size, the number of processes or the point (all guidance
scales share them: common random numbers make the sweep's curves smoother).

The set is cut into shards of ``shard_size`` consecutive indices, ``points/<id>/shard-000042.tar``
(``gmflow.data.shard_io`` format, pixel mode: ``<i>.pixels.npy`` uint8 (H, W, 3), ``<i>.cls``).
A shard is written under a temporary name and renamed when complete, so an existing shard is
always whole: a restarted sweep skips it. Under torchrun rank r writes shards r, r + W, r + 2W...

Every solver gives the same pixels for any batch size, process count or resume point (up to
floating-point reassociation in batched matmuls, rarely ±1 in a uint8 value): the stochastic ones
(gm-sde, ddpm) draw sample i's in-loop noise from its own generator, seeded from (seed, i)
(:mod:`gmflow.gm.random`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from gmflow.errors import DataError
from gmflow.evaluation.config import EVAL_SOLVERS, NOISE_SEED_OFFSET, SEED_STRIDE, SweepPoint
from gmflow.gm.random import row_generators
from gmflow.solver_names import guidance_kwargs

__all__ = [
    "NOISE_SEED_OFFSET",
    "SEED_STRIDE",
    "ShardSpec",
    "SamplingStats",
    "sample_inputs",
    "images_to_uint8",
    "shard_specs",
    "point_complete",
    "SampleBatch",
    "sample_batch",
    "generate_point",
    "read_point",
]

logger = logging.getLogger(__name__)


def sample_inputs(
    indices: range, seed: int, num_classes: int, shape: tuple[int, int, int]
) -> tuple[Tensor, Tensor]:
    """Labels (B,) int64 and noise (B, C, H, W) float32 of samples ``indices`` (CPU).

    Each sample has its own generators (module docstring), so any batching gives the same values.
    """
    labels, noise = [], []
    for i in indices:
        base = seed * SEED_STRIDE + i
        g = torch.Generator().manual_seed(base)
        labels.append(torch.randint(0, num_classes, (1,), generator=g))
        g = torch.Generator().manual_seed(base + NOISE_SEED_OFFSET)
        noise.append(torch.randn(shape, generator=g))
    return torch.cat(labels), torch.stack(noise)


def images_to_uint8(images: Tensor) -> NDArray[np.uint8]:
    """uint8 (B, H, W, 3) from images in [0, 1] (B, C, H, W), C = 1 or 3 (spec 11.3).

    y = 2x − 1 in [−1, 1], then ``floor(clamp(127.5 y + 128, 0, 255))``: rounding of 255x, half
    up — the conversion of the reference evaluation code.
    """
    y = images.float() * 2 - 1
    u = (y * 127.5 + 128).clamp(0, 255).floor().to(torch.uint8)
    if u.shape[1] == 1:
        u = u.expand(-1, 3, -1, -1)
    return u.permute(0, 2, 3, 1).contiguous().cpu().numpy()


@dataclass(frozen=True)
class ShardSpec:
    """Shard ``index`` holds samples [start, stop)."""

    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"shard-{self.index:06d}.tar"


def shard_specs(num_samples: int, shard_size: int) -> list[ShardSpec]:
    """The shards of a point: consecutive index ranges of ``shard_size`` (the last may be short)."""
    return [
        ShardSpec(k, start, min(start + shard_size, num_samples))
        for k, start in enumerate(range(0, num_samples, shard_size))
    ]


def point_complete(point_dir: Path, specs: list[ShardSpec]) -> bool:
    """Every shard of the point is on disk (shards only appear once complete)."""
    return all((point_dir / s.name).is_file() for s in specs)


@dataclass
class SamplingStats:
    """What one :func:`generate_point` call did."""

    shards_written: int = 0
    shards_skipped: int = 0
    images: int = 0
    sampling_s: float = 0.0  # network + solver
    decoding_s: float = 0.0  # VAE decode (or pixel mapping) and the uint8 conversion
    writing_s: float = 0.0


def _loop_seed(seed: int, index: int) -> int:
    """Seed of sample ``index``'s in-loop generator (stochastic solvers), independent of the
    label and noise seeds."""
    return int(np.random.SeedSequence([seed, index, 2]).generate_state(1, np.uint64)[0] >> 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class SampleBatch:
    """Samples ``index`` of a point as uint8 images, with their labels and timings."""

    labels: list[int]
    images: NDArray[np.uint8]  # (B, H, W, 3)
    sampling_s: float  # network + solver (synchronised)
    decoding_s: float  # VAE decode (or pixel mapping) and the uint8 conversion


def sample_batch(
    model: Any,
    point: SweepPoint,
    index: range,
    seed: int,
    orthogonal_guidance: float | None = None,
    guidance_interval: tuple[float, float] | None = None,
) -> SampleBatch:
    """Draw samples ``index`` of ``point`` (the module docstring's seeds) as uint8 images.

    The one sampling routine of ``gmflow evaluate`` and of in-training evaluation
    (:mod:`gmflow.training.online_eval`), so both give the same images for the same settings.

    Args:
        model: a :class:`gmflow.model_loading.LoadedModel` (denoiser, spectrum net, VAE, shapes).
        point: solver, steps, sub-steps, guidance scale and mode.
        index: the sample indices (any batching gives the same images).
        seed: the evaluation seed.
        orthogonal_guidance: o of the point's guidance mode (None = the mode's default: 1 for
            probabilistic guidance, 0 for CFG).
        guidance_interval: (σ_a, σ_b): guide only there; None = at every step.
    """
    from gmflow.flow import sample
    from gmflow.model_loading import decode_images

    solver, order = EVAL_SOLVERS[point.solver]
    device = next(model.denoiser.parameters()).device
    shape = (model.in_channels, model.sample_size, model.sample_size)
    labels, noise = sample_inputs(index, seed, model.num_classes, shape)
    generator = None
    if point.stochastic:
        generator = row_generators([_loop_seed(seed, i) for i in index], device)
    t0 = time.perf_counter()
    x0 = sample(
        model.denoiser,
        noise.to(device),
        solver=solver,
        num_steps=point.num_steps,
        num_substeps=point.num_substeps if solver == "gm-ode" else None,
        order=order,
        guidance_scale=point.guidance_scale,
        **guidance_kwargs(point.guidance_mode, orthogonal_guidance),
        guidance_interval=guidance_interval,
        null_class_id=model.num_classes,
        shift=model.shift,
        class_labels=labels.to(device),
        generator=generator,
        spectrum_net=model.spectrum_net if solver == "gm-sde" else None,
    )
    _sync(device)
    t1 = time.perf_counter()
    images = images_to_uint8(decode_images(x0, model.vae))
    return SampleBatch(labels.tolist(), images, t1 - t0, time.perf_counter() - t1)


def generate_point(
    model: Any,
    point: SweepPoint,
    point_dir: Path,
    *,
    num_samples: int,
    shard_size: int,
    batch_size: int,
    seed: int,
    orthogonal_guidance: float | None = None,
    guidance_interval: tuple[float, float] | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: Callable[[int], None] | None = None,
) -> SamplingStats:
    """Write this rank's missing shards of ``point`` under ``point_dir``.

    Args:
        model: a :class:`gmflow.model_loading.LoadedModel` (denoiser, spectrum net, VAE, shapes).
        point: solver, steps, sub-steps and guidance scale.
        point_dir: the point's folder (created).
        num_samples, shard_size, batch_size, seed: see :class:`EvalConfig`.
        orthogonal_guidance: o of the point's guidance mode (None = its default).
        guidance_interval: (σ_a, σ_b) of guidance; None = everywhere.
        rank, world_size: this process's share (shards rank, rank + world_size, ...).
        progress: called with the number of images finished after each batch (skipped shards
            included, so the count reaches this rank's total).

    Returns:
        Shards written and skipped, and the time spent sampling and decoding.
    """
    from gmflow.data.shard_io import ShardSample, ShardWriter

    point_dir.mkdir(parents=True, exist_ok=True)
    stats = SamplingStats()
    for spec in shard_specs(num_samples, shard_size)[rank::world_size]:
        path = point_dir / spec.name
        if path.is_file():
            stats.shards_skipped += 1
            if progress is not None:
                progress(spec.stop - spec.start)
            continue
        writer = ShardWriter(path)
        try:
            for first in range(spec.start, spec.stop, batch_size):
                index = range(first, min(first + batch_size, spec.stop))
                batch = sample_batch(
                    model, point, index, seed, orthogonal_guidance, guidance_interval
                )
                t2 = time.perf_counter()
                for i, label, image in zip(index, batch.labels, batch.images, strict=True):
                    key = f"{i:09d}"
                    writer.write(ShardSample(key, label, f"{point.id}/{key}", {"pixels": image}))
                stats.sampling_s += batch.sampling_s
                stats.decoding_s += batch.decoding_s
                stats.writing_s += time.perf_counter() - t2
                stats.images += len(index)
                if progress is not None:
                    progress(len(index))
            t3 = time.perf_counter()
            writer.commit()
            stats.writing_s += time.perf_counter() - t3
        except BaseException:
            writer.abort()
            raise
        stats.shards_written += 1
    return stats


def read_point(
    point_dir: Path, num_samples: int, shard_size: int
) -> Iterator[tuple[NDArray[np.uint8], NDArray[np.int64]]]:
    """(images uint8 (B, H, W, 3), labels (B,)) shard by shard, in sample order.

    Raises:
        DataError: a shard is missing, unreadable, or does not hold its samples in order.
    """
    from gmflow.data.shard_io import PIXEL_ARRAYS, read_shard

    for spec in shard_specs(num_samples, shard_size):
        path = point_dir / spec.name
        if not path.is_file():
            raise DataError(f"{path} is missing; re-run the same `gmflow evaluate` to write it")
        samples = read_shard(path, PIXEL_ARRAYS)
        keys = [s.key for s in samples]
        if keys != [f"{i:09d}" for i in range(spec.start, spec.stop)]:
            raise DataError(
                f"{path} holds samples {keys[:1]}..{keys[-1:]} ({len(keys)}), expected "
                f"{spec.start}..{spec.stop - 1}; it belongs to another sweep (different "
                "num_samples or shard_size): delete it or use another --out-dir"
            )
        yield (
            np.stack([s.arrays["pixels"] for s in samples]),
            np.array([s.label for s in samples], dtype=np.int64),
        )
