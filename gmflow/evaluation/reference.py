"""The reference set of a sweep: its Inception features and statistics, cached with a fingerprint.

``REF`` may be:

* the ADM reference batch ``.npz`` (e.g. ``VIRTUAL_imagenet256_labeled.npz``): images ``arr_0``
  uint8 (N, H, W, 3) are run through our extractor; a file with only ``mu``/``sigma`` gives
  FID alone (its statistics come from ADM's TensorFlow Inception, so precision, recall and KID,
  which need features, are skipped). When both are present the images are used, so that both sets
  go through the same network;
* a folder of images (png, jpg, jpeg, webp, bmp; searched recursively, sorted by path);
* a gmflow shard folder (``manifest.json``): pixel mode reads the uint8 crops, latent mode decodes
  the posterior mean of each unflipped image with the manifest's VAE, ``D(μ)`` (a reconstruction,
  the closest image to the data the model was trained on).

Features are cached as ``<cache_dir>/reference-<fingerprint[:16]>.npz`` where the fingerprint is
sha256(sha256 of the source, extractor id): the file's bytes, or each image file's path and bytes,
or the manifest (which lists every shard's sha256).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from gmflow.errors import DataError
from gmflow.evaluation.fid import FeatureExtractor, FIDStats, extract_features, fid_statistics

__all__ = [
    "Reference",
    "ReferenceKind",
    "reference_kind",
    "load_reference",
    "iter_reference_images",
]

logger = logging.getLogger(__name__)

ReferenceKind = Literal["npz-images", "npz-stats", "folder", "shards-pixel", "shards-latent"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
NPZ_STATS_EXTRACTOR = "adm-npz-stats (TensorFlow Inception-v3 pool_3, from the .npz)"


@dataclass(frozen=True)
class Reference:
    """Features and statistics of the reference set."""

    stats: FIDStats
    pool: NDArray[np.float32] | None  # (N, D); None for a statistics-only .npz
    num_images: int | None  # None for a statistics-only .npz
    source: str  # REF as given
    kind: ReferenceKind
    fingerprint: str  # sha256 hex of (source digest, extractor id)
    extractor_id: str  # the extractor that made the features (or NPZ_STATS_EXTRACTOR)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def reference_kind(ref: str | Path) -> ReferenceKind:
    """Recognise ``REF`` without reading it (cheap; call it before sampling).

    Raises:
        DataError: it does not exist or is none of the supported kinds.
    """
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                keys = set(f.files)
        except (OSError, ValueError) as err:
            raise DataError(f"reference {path} is not a readable .npz ({err})") from err
        if "arr_0" in keys:
            return "npz-images"
        if {"mu", "sigma"} <= keys:
            return "npz-stats"
        raise DataError(
            f"reference {path} holds {sorted(keys)}; expected images 'arr_0' (N, H, W, 3) uint8 "
            "or Inception statistics 'mu' and 'sigma' (an ADM reference batch)"
        )
    if path.is_dir():
        if (path / "manifest.json").is_file():
            from gmflow.data.manifest import read_manifest

            return "shards-latent" if read_manifest(path).mode == "latent" else "shards-pixel"
        if _image_files(path):
            return "folder"
        raise DataError(
            f"reference folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no "
            "gmflow manifest.json"
        )
    raise DataError(
        f"reference {str(ref)!r} does not exist or is not supported; pass the ADM reference batch "
        "(.npz with arr_0, or mu and sigma), a folder of images, or a `gmflow cache-data` folder"
    )


def _sha256_file(path: Path, h: Any = None) -> Any:
    h = h if h is not None else hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h


def _source_digest(path: Path, kind: ReferenceKind) -> str:
    if kind.startswith("npz"):
        return str(_sha256_file(path).hexdigest())
    if kind == "folder":
        h = hashlib.sha256()
        for p in _image_files(path):
            h.update(str(p.relative_to(path)).encode() + b"\0")
            _sha256_file(p, h)
        return h.hexdigest()
    return hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()


def _to_uint8_nhwc(images01: Any) -> NDArray[np.uint8]:
    from gmflow.evaluation.samples import images_to_uint8

    return images_to_uint8(images01)


def iter_reference_images(
    ref: str | Path,
    kind: ReferenceKind,
    *,
    vae: Any = None,
    device: str = "cpu",
    chunk: int = 256,
) -> Iterator[NDArray[np.uint8]]:
    """The reference images as uint8 (B, H, W, 3) batches, in a fixed order.

    Args:
        ref: the reference path.
        kind: from :func:`reference_kind` (not ``npz-stats``).
        vae: for ``shards-latent``: a :class:`gmflow.models.vae.VAE`; None loads the manifest's.
        device: where the VAE decodes.
        chunk: images per yielded batch.
    """
    path = Path(ref).expanduser()
    if kind == "npz-images":
        with np.load(path, allow_pickle=False) as f:
            images = f["arr_0"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(
                f"{path}: arr_0 is {images.dtype} {images.shape}; expected uint8 (N, H, W, 3)"
            )
        for i in range(0, len(images), chunk):
            yield images[i : i + chunk]
    elif kind == "folder":
        from PIL import Image

        files = _image_files(path)
        for i in range(0, len(files), chunk):
            batch = []
            for p in files[i : i + chunk]:
                with Image.open(p) as im:
                    batch.append(np.asarray(im.convert("RGB")))
            sizes = {b.shape for b in batch}
            if len(sizes) == 1:
                yield np.stack(batch)
            else:  # mixed sizes: one image per batch (extract_features regroups same sizes)
                yield from (b[None] for b in batch)
    elif kind in ("shards-pixel", "shards-latent"):
        yield from _shard_images(path, kind, vae, device, chunk)
    else:
        raise ValueError(f"no images in a reference of kind {kind!r}")


def _shard_images(
    root: Path, kind: ReferenceKind, vae: Any, device: str, chunk: int
) -> Iterator[NDArray[np.uint8]]:
    import torch

    from gmflow.data.manifest import read_manifest
    from gmflow.data.shard_io import LATENT_ARRAYS, PIXEL_ARRAYS, read_shard

    manifest = read_manifest(root)
    latent = kind == "shards-latent"
    if latent and vae is None:
        from gmflow.models.vae import load_vae

        if not manifest.encoder:
            raise DataError(f"{root}/manifest.json is in latent mode but names no encoder (VAE)")
        vae = load_vae(manifest.encoder, device=device)
    for shard in manifest.shards:
        samples = read_shard(root / shard.name, LATENT_ARRAYS if latent else PIXEL_ARRAYS)
        for i in range(0, len(samples), chunk):
            part = samples[i : i + chunk]
            if not latent:
                yield np.stack([s.arrays["pixels"] for s in part])
                continue
            z = torch.from_numpy(np.stack([s.arrays["mean"][0] for s in part]).astype(np.float32))
            yield _to_uint8_nhwc(vae.decode(vae.scaling_factor * z.to(device)))


def _cache_path(cache_dir: Path, fingerprint: str) -> Path:
    return cache_dir / f"reference-{fingerprint[:16]}.npz"


def _save_cache(path: Path, pool: NDArray[np.float32], stats: FIDStats, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, pool=pool, mu=stats.mu, sigma=stats.sigma, meta=np.array(json.dumps(meta)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_reference(
    ref: str | Path,
    extractor: FeatureExtractor,
    cache_dir: str | Path,
    *,
    batch_size: int = 100,
    vae: Any = None,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> Reference:
    """Features and statistics of ``ref``, from the cache when its fingerprint matches.

    Args:
        ref: see the module docstring.
        extractor: the feature extractor (its ``extractor_id`` enters the fingerprint).
        cache_dir: where ``reference-<fingerprint>.npz`` lives.
        batch_size: images per extractor call.
        vae: latent shards only: the decoder (None loads the manifest's).
        device: where a VAE decodes.
        progress: called with the number of images whose features are done.

    Raises:
        DataError: unsupported, missing or malformed reference.
    """
    path = Path(ref).expanduser()
    kind = reference_kind(path)
    digest = _source_digest(path, kind)
    if kind == "npz-stats":
        with np.load(path, allow_pickle=False) as f:
            stats = FIDStats(mu=f["mu"].astype(np.float64), sigma=f["sigma"].astype(np.float64))
        fingerprint = hashlib.sha256(f"{digest}\n{NPZ_STATS_EXTRACTOR}".encode()).hexdigest()
        return Reference(stats, None, None, str(ref), kind, fingerprint, NPZ_STATS_EXTRACTOR)
    fingerprint = hashlib.sha256(f"{digest}\n{extractor.extractor_id}".encode()).hexdigest()
    cache = _cache_path(Path(cache_dir), fingerprint)
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            if meta.get("fingerprint") == fingerprint:
                stats = FIDStats(mu=f["mu"], sigma=f["sigma"])
                pool = f["pool"]
                logger.info("reference features from the cache %s", cache)
                return Reference(
                    stats, pool, len(pool), str(ref), kind, fingerprint, extractor.extractor_id
                )
    done = 0

    def counted() -> Iterator[NDArray[np.uint8]]:
        nonlocal done
        for batch in iter_reference_images(path, kind, vae=vae, device=device):
            yield batch
            done += len(batch)
            if progress is not None:
                progress(done)

    features = extract_features(counted(), extractor, batch_size)
    stats = fid_statistics(features.pool)
    meta = {
        "fingerprint": fingerprint,
        "source": str(ref),
        "kind": kind,
        "source_sha256": digest,
        "extractor_id": extractor.extractor_id,
        "num_images": len(features.pool),
    }
    _save_cache(cache, features.pool, stats, meta)
    return Reference(
        stats,
        features.pool,
        len(features.pool),
        str(ref),
        kind,
        fingerprint,
        extractor.extractor_id,
    )
