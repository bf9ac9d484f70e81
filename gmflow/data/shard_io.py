"""Tar-level I/O of the latent shards: the sample schema, the atomic writer, reading and checking.

One sample per input image, under a stable key (the image's position in the sorted input list,
``"000001234"``); in a shard ``DIR/shards/train-000000.tar``:

* ``<key>.mean.npy``, ``<key>.std.npy``: float16 (2, C, h, w), the VAE posterior q(z | x) of the
  image (index 0) and of its horizontal flip (index 1); latent mode;
* ``<key>.pixels.npy``: uint8 (H, W, 3), the cropped image; pixel mode (``--vae none``);
* ``<key>.cls``: the class id as ASCII text; ``<key>.path.txt``: the source path (UTF-8).

Arrays are plain ``.npy`` read with ``allow_pickle=False``: nothing in a shard is ever unpickled.
The reader that turns shards into training batches is :mod:`gmflow.data.shards`.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import webdataset as wds
from numpy.typing import NDArray

from gmflow.data.manifest import Manifest
from gmflow.errors import DataError

__all__ = [
    "LATENT_ARRAYS",
    "PIXEL_ARRAYS",
    "ShardSample",
    "ShardWriter",
    "file_sha256",
    "read_shard",
    "shard_name",
    "verify_shards",
]

LATENT_ARRAYS = ("mean", "std")  # float16 (2, C, h, w) each: [image, flipped image]
PIXEL_ARRAYS = ("pixels",)  # uint8 (H, W, 3)


def shard_name(index: int) -> str:
    """Path of shard ``index`` relative to the dataset folder: ``shards/train-000042.tar``."""
    return f"shards/train-{index:06d}.tar"


@dataclass(frozen=True)
class ShardSample:
    """One sample of a shard (see the module docstring for the array layouts)."""

    key: str  # stable key, no dots or slashes
    label: int  # class id
    source: str  # path of the input image relative to the source folder
    arrays: dict[str, NDArray]  # {"mean", "std"} (latent mode) or {"pixels"} (pixel mode)


def _npy_bytes(arr: NDArray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


class _HashingFile:
    """A write-only file that hashes what passes through it (SHA-256 and byte count)."""

    def __init__(self, f: io.BufferedWriter) -> None:
        self.f, self.sha256, self.num_bytes = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.num_bytes += len(data)
        return self.f.write(data)


class ShardWriter:
    """Write one shard under a temporary name; :meth:`commit` renames it into place.

    A reader or a resumed run never sees a half-written shard: until ``commit`` the data lives in
    ``<path>.tmp``, which an interrupted run leaves behind and the next run overwrites. Tar
    headers carry mtime 0, so the same samples always give the same bytes (and SHA-256).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self._file = open(self.tmp_path, "wb")  # noqa: SIM115 (closed in commit/abort)
        self._hashing = _HashingFile(self._file)
        self._tar = wds.TarWriter(
            self._hashing, encoder=False, mtime=0
        )  # int: a float adds a PAX header per file
        self.num_samples = 0

    def write(self, sample: ShardSample) -> None:
        """Append one sample (its arrays are stored as ``.npy``)."""
        if "." in sample.key or "/" in sample.key:
            raise ValueError(f"shard keys may not contain '.' or '/': {sample.key!r}")
        record: dict[str, Any] = {
            "__key__": sample.key,
            "cls": str(int(sample.label)).encode("ascii"),
            "path.txt": sample.source.encode("utf-8"),
        }
        record.update({f"{name}.npy": _npy_bytes(a) for name, a in sample.arrays.items()})
        self._tar.write(record)
        self.num_samples += 1

    def commit(self) -> tuple[str, int]:
        """Finish the tar, flush it to disk and rename it to ``path``; returns (sha256, bytes)."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp_path, self.path)
        return self._hashing.sha256.hexdigest(), self._hashing.num_bytes

    def abort(self) -> None:
        """Drop the temporary file (the tar stream is detached first, so nothing writes later)."""
        self._tar.tarstream.fileobj = None  # a closed tarfile's finaliser would write its trailer
        self._tar.tarstream.closed = True
        self._file.close()
        self.tmp_path.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def verify_shards(root: Path, manifest: Manifest, level: Literal["none", "size", "sha256"]) -> None:
    """Check that every shard of the manifest exists and (``size``/``sha256``) matches it."""
    missing = [s.name for s in manifest.shards if not (root / s.name).is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(manifest.shards)} shards listed in {root}/manifest.json are "
            f"missing (e.g. {', '.join(missing[:3])}); re-run `gmflow cache-data` with the same "
            "arguments to rewrite them, or restore the files"
        )
    for s in manifest.shards:
        size = (root / s.name).stat().st_size
        if level != "none" and size != s.num_bytes:
            raise DataError(
                f"shard {root / s.name} has {size} bytes but the manifest lists {s.num_bytes}: "
                "the manifest does not match the shards (truncated or replaced file); re-run "
                "`gmflow cache-data` with the same arguments to repair the dataset"
            )
        if level == "sha256" and file_sha256(root / s.name) != s.sha256:
            raise DataError(
                f"shard {root / s.name} does not match the SHA-256 in the manifest (corrupt or "
                "replaced file); re-run `gmflow cache-data` with the same arguments to repair it"
            )


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}


def load_npy(data: bytes) -> NDArray:
    """``np.load(allow_pickle=False)`` of ``.npy`` bytes, parsing each distinct header only once.

    The samples of a dataset share a few headers; parsing them (``ast.literal_eval``) would cost
    more than copying the data. Object arrays are refused, as ``np.load`` does without pickle.
    """
    if data[:6] != b"\x93NUMPY" or data[6] not in (1, 2, 3):
        raise ValueError("not a .npy array (bad magic string or version)")
    offset = (
        10 + int.from_bytes(data[8:10], "little")
        if data[6] == 1
        else 12 + int.from_bytes(data[8:12], "little")
    )
    meta = _NPY_HEADERS.get(data[:offset])
    if meta is None:
        arr = np.load(io.BytesIO(data), allow_pickle=False)  # validates the header
        if len(_NPY_HEADERS) < 256:
            _NPY_HEADERS[data[:offset]] = (arr.dtype, arr.shape, arr.ndim > 1 and np.isfortran(arr))
        return arr
    dtype, shape, fortran = meta
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C")


def _decode(raw: dict[str, Any], names: tuple[str, ...], url: str) -> ShardSample:
    try:
        arrays = {n: load_npy(raw[f"{n}.npy"]) for n in names}
        return ShardSample(raw["__key__"], int(raw["cls"]), raw["path.txt"].decode(), arrays)
    except (KeyError, ValueError, EOFError) as err:
        raise DataError(
            f"sample {raw.get('__key__')!r} of shard {url} is malformed ({type(err).__name__}: "
            f"{err}); expected fields {[f'{n}.npy' for n in names]}, cls and path.txt"
        ) from err


class _NotPlainUstar(Exception):
    """The tar uses a feature the fast reader leaves to the generic one (PAX, GNU long names)."""


def _ustar_samples(path: str) -> list[dict[str, Any]]:
    """Samples of a plain USTAR tar (regular files, header checksums verified), grouped by key.

    Python's ``tarfile`` spends ~100 µs decoding each header in general; shards written by
    :class:`ShardWriter` only use the fixed USTAR fields, read here directly (about 10x faster,
    which is most of the reader's cost per sample). Other tars go to WebDataset's reader.
    """
    samples: list[dict[str, Any]] = []
    with open(path, "rb") as f:
        while True:
            header = f.read(512)
            if len(header) < 512:
                raise tarfile.ReadError("unexpected end of file (no end-of-archive marker)")
            if header == _ZERO_BLOCK:
                return samples
            stored = int(header[148:156].strip(b" \0") or b"0", 8)
            if stored != sum(header[:148]) + sum(header[156:]) + 8 * 32:
                raise tarfile.ReadError(f"bad header checksum after {len(samples)} samples")
            size, kind = int(header[124:136].strip(b" \0") or b"0", 8), header[156:157]
            data = f.read(size + (-size) % 512)[:size]
            if len(data) < size:
                raise tarfile.ReadError(f"truncated member after {len(samples)} samples")
            if kind in (b"x", b"g", b"L", b"K"):
                raise _NotPlainUstar
            if kind not in (b"0", b"\0"):
                continue
            name = header[:100].split(b"\0", 1)[0].decode()
            prefix = header[345:500].split(b"\0", 1)[0].decode()
            folder, _, base = (f"{prefix}/{name}" if prefix else name).rpartition("/")
            stem, _, ext = base.partition(".")  # WebDataset: the key ends at the first dot
            key = f"{folder}/{stem}" if folder else stem
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key, "__url__": path})
            if ext.lower() in samples[-1]:
                raise tarfile.ReadError(f"duplicate file {name} in sample {key}")
            samples[-1][ext.lower()] = data


_ZERO_BLOCK = bytes(512)


def read_shard(path: str | Path, names: tuple[str, ...] = LATENT_ARRAYS) -> list[ShardSample]:
    """All samples of one shard, in file order, with the arrays ``names``.

    Raises:
        DataError: The file is not a readable tar or a sample is malformed.
    """
    url = str(path)
    try:
        try:
            raws = _ustar_samples(url)
        except _NotPlainUstar:
            raws = list(wds.tarfile_samples([{"url": url}]))
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        raise DataError(
            f"shard {url} is not a readable tar ({type(err).__name__}: {err}); it is corrupt: "
            "delete it and re-run `gmflow cache-data` with the same arguments to rewrite it"
        ) from err
    return [_decode(raw, names, url) for raw in raws]
