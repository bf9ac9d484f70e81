"""``DIR/manifest.json``: what a cached dataset holds, written last by ``gmflow cache-data``.

A manifest exists only once every shard of the dataset is complete, so a reader that finds one can
trust the listed shards (their byte counts and SHA-256 let it check). It records:

* ``mode``: ``"latent"`` (VAE posteriors) or ``"pixel"`` (uint8 images, ``--vae none``);
* ``shards``: name (relative to DIR), sample count, byte count and SHA-256 of each tar;
* ``num_samples``, ``classes`` (id -> name), ``resolution`` (image side before encoding);
* ``sample_shape`` (C, H, W) and ``sample_dtype`` of what the reader returns (float32), and
  ``stored_dtype`` of the arrays in the tars (float16 posteriors or uint8 pixels);
* ``encoder`` (its id, e.g. ``stabilityai/sd-vae-ft-ema``, or a folder) and ``scaling_factor``;
* ``channel_mean`` / ``channel_std``: per-channel mean and standard deviation of the reader's
  output over the dataset (scaled posterior samples, both flips equally likely; or pixels in
  [-1, 1]). For latents x = s·z with z ~ N(μ, σ²): E[x] = s·E[μ], E[x²] = s²·E[μ² + σ²] exactly;
* ``skipped``: the inputs that could not be read, with the reason.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from gmflow.errors import DataError

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "Manifest",
    "ShardInfo",
    "SkippedInput",
    "read_manifest",
    "write_json_atomic",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "gmflow-shards/1"


@dataclass(frozen=True)
class SkippedInput:
    """An input image that could not be read, and why."""

    path: str  # relative to the source folder
    reason: str  # e.g. "UnidentifiedImageError: cannot identify image file ..."


@dataclass(frozen=True)
class ShardInfo:
    """One complete shard."""

    name: str  # path relative to the dataset folder, e.g. "shards/train-000000.tar"
    num_samples: int
    num_bytes: int
    sha256: str  # hex digest of the whole tar file


@dataclass(frozen=True)
class Manifest:
    """The contents of ``manifest.json`` (the module docstring gives the meaning of each field)."""

    mode: Literal["latent", "pixel"]
    num_samples: int
    shards: tuple[ShardInfo, ...]
    classes: dict[int, str]  # class id -> name
    resolution: int  # side of the cropped images, in pixels
    sample_shape: tuple[int, int, int]  # (C, H, W) of one reader sample
    stored_dtype: str  # "float16" (posterior mean/std) or "uint8" (pixels)
    encoder: str | None  # hub id or folder of the VAE; None in pixel mode
    scaling_factor: float  # x_0 = scaling_factor · z; 1.0 in pixel mode
    channel_mean: tuple[float, ...]  # (C,) of the reader's output
    channel_std: tuple[float, ...]  # (C,)
    skipped: tuple[SkippedInput, ...] = ()
    source: str = ""  # the image folder the data came from (informative)
    sample_dtype: str = "float32"  # dtype of the reader's output
    format: str = MANIFEST_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance

    @property
    def num_classes(self) -> int:
        """1 + the largest class id (ids need not be contiguous)."""
        return max(self.classes) + 1 if self.classes else 0

    def to_json(self) -> str:
        data = asdict(self)
        data["classes"] = [{"id": k, "name": v} for k, v in sorted(self.classes.items())]
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, *, origin: str = "manifest") -> Manifest:
        """Parse ``to_json`` output; DataError naming ``origin`` when it is malformed."""
        try:
            data = json.loads(text)
            if data.get("format") != MANIFEST_FORMAT:
                raise DataError(
                    f"{origin}: format {data.get('format')!r} is not {MANIFEST_FORMAT!r}; "
                    "re-create the dataset with this version of gmflow cache-data"
                )
            data["shards"] = tuple(ShardInfo(**s) for s in data["shards"])
            data["skipped"] = tuple(SkippedInput(**s) for s in data["skipped"])
            data["classes"] = {int(c["id"]): str(c["name"]) for c in data["classes"]}
            for key in ("sample_shape", "channel_mean", "channel_std"):
                data[key] = tuple(data[key])
            return cls(**data)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise DataError(
                f"{origin} is not a valid gmflow manifest ({type(err).__name__}: {err}); "
                "re-run gmflow cache-data to rewrite it"
            ) from err


def read_manifest(root: str | Path) -> Manifest:
    """Read ``root/manifest.json``.

    Raises:
        DataError: The file is missing (the dataset was never completed) or malformed.
    """
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"no {MANIFEST_NAME} in {root}: it is written when every shard is complete; create "
            f"or finish the dataset with `gmflow cache-data SRC --out {root}` (it resumes)"
        )
    return Manifest.from_json(path.read_text(), origin=str(path))


def write_json_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
