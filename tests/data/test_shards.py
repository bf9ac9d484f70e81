"""Shard format, atomic writer and the ShardLoader: split, shuffle, posterior sampling, resume."""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gmflow.data.manifest import Manifest, ShardInfo, read_manifest
from gmflow.data.shard_io import file_sha256, read_shard
from gmflow.data.shards import ShardLoader, ShardSample, ShardWriter, shard_name
from gmflow.errors import DataError

SCALE = 0.5  # scaling factor of the synthetic datasets (exact in fp16 and fp32)


def write_dataset(
    root: Path, arrays_of, num_shards: int, per_shard: int, mode="latent"
) -> Manifest:
    """Shards of samples whose label is their global index; ``arrays_of(i)`` gives the arrays."""
    (root / "shards").mkdir(parents=True)
    infos = []
    for s in range(num_shards):
        writer = ShardWriter(root / shard_name(s))
        for j in range(per_shard):
            i = s * per_shard + j
            writer.write(ShardSample(f"{i:09d}", i, f"c/{i}.png", arrays_of(i)))
        sha, size = writer.commit()
        infos.append(ShardInfo(shard_name(s), per_shard, size, sha))
    shape = (
        (3, *arrays_of(0)["pixels"].shape[:2])
        if mode == "pixel"
        else arrays_of(0)["mean"].shape[1:]
    )
    manifest = Manifest(
        mode=mode,
        num_samples=num_shards * per_shard,
        shards=tuple(infos),
        classes={i: f"c{i}" for i in range(num_shards * per_shard)},
        resolution=8,
        sample_shape=tuple(shape),
        stored_dtype="uint8" if mode == "pixel" else "float16",
        encoder=None if mode == "pixel" else "synthetic",
        scaling_factor=1.0 if mode == "pixel" else SCALE,
        channel_mean=(0.0,) * shape[0],
        channel_std=(1.0,) * shape[0],
    )
    (root / "manifest.json").write_text(manifest.to_json())
    return manifest


def indexed_latents(i: int) -> dict[str, np.ndarray]:
    """μ = i (image) and −i (flip), σ = 0: a read reveals the sample and the flip exactly."""
    mean = np.stack([np.full((2, 2, 2), i), np.full((2, 2, 2), -i)]).astype(np.float16)
    return {"mean": mean, "std": np.zeros_like(mean)}


@pytest.fixture
def dataset(tmp_path) -> Path:
    write_dataset(tmp_path / "ds", indexed_latents, num_shards=8, per_shard=3)
    return tmp_path / "ds"


def take(loader: ShardLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_writer_round_trip_is_exact_and_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    samples = [
        ShardSample(f"{i:09d}", 7 * i, f"dir/ä{i}.JPEG", {"mean": rng.normal(size=(2, 4, 3, 3))})
        for i in range(3)
    ]
    shas = []
    for name in ("a.tar", "b.tar"):
        writer = ShardWriter(tmp_path / name)
        for s in samples:
            writer.write(s)
        assert not (tmp_path / name).exists() and (tmp_path / f"{name}.tmp").exists()
        sha, size = writer.commit()
        assert not (tmp_path / f"{name}.tmp").exists()
        assert sha == file_sha256(tmp_path / name) and size == (tmp_path / name).stat().st_size
        shas.append(sha)
    assert shas[0] == shas[1]  # same samples, same bytes (mtime 0): reruns are comparable
    back = read_shard(tmp_path / "a.tar", names=("mean",))
    for got, ref in zip(back, samples, strict=True):
        assert (got.key, got.label, got.source) == (ref.key, ref.label, ref.source)
        np.testing.assert_array_equal(got.arrays["mean"], ref.arrays["mean"])


def test_fast_tar_reader_agrees_with_webdataset(dataset):
    import webdataset as wds

    path = str(dataset / shard_name(2))
    ours = read_shard(path)
    theirs = list(wds.tarfile_samples([{"url": path}]))
    assert (
        [s.key for s in ours]
        == [t["__key__"] for t in theirs]
        == ["000000006", "000000007", "000000008"]
    )
    for s, t in zip(ours, theirs, strict=True):
        assert s.label == int(t["cls"]) and s.source == t["path.txt"].decode()
        for name in ("mean", "std"):
            np.testing.assert_array_equal(s.arrays[name], np.load(io.BytesIO(t[f"{name}.npy"])))


def test_aborted_writer_leaves_nothing_and_keys_with_dots_are_refused(tmp_path):
    writer = ShardWriter(tmp_path / "x.tar")
    with pytest.raises(ValueError, match="keys"):
        writer.write(ShardSample("a.b", 0, "p", {"mean": np.zeros(1)}))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_pickled_arrays_in_a_shard_are_never_loaded(tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "p.tar"), encoder=False) as tar:
        tar.write({"__key__": "000", "cls": b"0", "path.txt": b"x", "mean.npy": buf.getvalue()})
    with pytest.raises(DataError, match="malformed"):
        read_shard(tmp_path / "p.tar", names=("mean",))


def test_one_epoch_over_ranks_and_workers_reads_every_sample_once(dataset):
    # 8 shards of 3, 2 ranks x 2 workers = 4 global workers: 2 shards = 2 batches of 3 each
    labels = []
    for rank in range(2):
        loader = ShardLoader(dataset, batch_size=3, num_workers=2, rank=rank, world_size=2, seed=3)
        assert loader.batches_per_epoch == 4
        labels += [y for _, y in take(loader, 4)]
    assert sorted(torch.cat(labels).tolist()) == list(range(24))


def test_shuffle_is_seeded_and_not_the_file_order(dataset):
    def first_epoch(seed):
        batches = take(ShardLoader(dataset, batch_size=4, num_workers=0, seed=seed), 6)
        return torch.cat([y for _, y in batches]).tolist()

    a, b, c = first_epoch(0), first_epoch(0), first_epoch(1)
    assert a == b and sorted(a) == list(range(24))
    assert a != c and a != list(range(24))


def test_latents_are_scaled_posterior_means_of_the_image_or_its_flip(dataset):
    x, y = next(iter(ShardLoader(dataset, batch_size=24, num_workers=0)))
    sign = torch.where(x[:, 0, 0, 0] >= 0, 1.0, -1.0)
    expected = SCALE * sign[:, None, None, None] * y.double()[:, None, None, None]
    torch.testing.assert_close(x.double(), expected.expand_as(x), rtol=0, atol=0)
    assert x.dtype == torch.float32 and y.dtype == torch.int64


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_the_identical_stream(dataset, num_workers):
    kw = dict(batch_size=5, num_workers=num_workers, seed=7, shuffle_buffer=6)
    reference = take(ShardLoader(dataset, **kw), 12)  # crosses epochs (24 samples = 4.8 batches)
    first = ShardLoader(dataset, **kw)
    take(first, 5)
    state = first.state_dict()
    assert state["batches_consumed"] == 5 and state["samples_consumed"] == 25
    assert state["epoch"] == 1
    resumed = ShardLoader(dataset, **kw)
    resumed.load_state_dict(state)
    for (x, y), (x_ref, y_ref) in zip(take(resumed, 7), reference[5:], strict=True):
        torch.testing.assert_close(x, x_ref, rtol=0, atol=0)
        assert y.tolist() == y_ref.tolist()


def test_resume_with_another_layout_is_refused_unless_not_strict(dataset):
    loader = ShardLoader(dataset, batch_size=4, num_workers=0)
    take(loader, 9)  # 36 samples: epoch 1
    other = ShardLoader(dataset, batch_size=8, num_workers=0)
    with pytest.raises(DataError, match="batch_size: saved 4, now 8"):
        other.load_state_dict(loader.state_dict())
    other.load_state_dict(loader.state_dict(), strict=False)
    assert other.state_dict()["epoch"] == 1 and other.state_dict()["batches_consumed"] == 0
    assert sorted(torch.cat([y for _, y in take(other, 3)]).tolist()) == list(range(24))


def test_posterior_samples_and_flips_have_the_right_moments(tmp_path):
    # image: N(2, 0.5²), flip: N(−2, 0.25²); x = SCALE · z. Tolerances: 5 standard errors.
    def arrays(i):
        mean = np.stack([np.full((1, 4, 4), 2.0), np.full((1, 4, 4), -2.0)]).astype(np.float16)
        std = np.stack([np.full((1, 4, 4), 0.5), np.full((1, 4, 4), 0.25)]).astype(np.float16)
        return {"mean": mean, "std": std}

    write_dataset(tmp_path / "ds", arrays, num_shards=2, per_shard=8)
    x = torch.cat(
        [b for b, _ in take(ShardLoader(tmp_path / "ds", batch_size=16, num_workers=0), 50)]
    )
    z = x.double() / SCALE  # (800, 1, 4, 4)
    flipped = z.mean(dim=(1, 2, 3)) < 0
    n = len(z)
    assert abs(flipped.double().mean().item() - 0.5) < 5 * math.sqrt(0.25 / n)
    for is_flip, mu, sigma in ((False, 2.0, 0.5), (True, -2.0, 0.25)):
        values = z[flipped == is_flip].flatten()
        m = len(values)
        assert abs(values.mean().item() - mu) < 5 * sigma / math.sqrt(m)
        assert abs(values.std().item() - sigma) < 5 * sigma / math.sqrt(2 * m)


def test_pixel_mode_gives_images_in_minus_one_one_or_their_mirror(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 4, 6, 3), dtype=np.uint8)
    write_dataset(tmp_path / "ds", lambda i: {"pixels": pixels[i]}, 3, 4, mode="pixel")
    loader = ShardLoader(tmp_path / "ds", batch_size=12, num_workers=0, expected_shape=(3, 4, 6))
    x, y = next(iter(loader))
    ref = torch.from_numpy(pixels[y.numpy()]).permute(0, 3, 1, 2).double() / 127.5 - 1
    same = (x.double() - ref).abs().amax(dim=(1, 2, 3)) < 1e-6
    mirrored = (x.double() - ref.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-6
    assert bool((same | mirrored).all()) and 0 < int(mirrored.sum()) < 12
    assert x.min() >= -1 and x.max() <= 1


def test_missing_manifest_and_missing_shard_are_explained(dataset, tmp_path):
    with pytest.raises(DataError, match="gmflow cache-data"):
        ShardLoader(tmp_path / "nowhere", batch_size=2)
    (dataset / shard_name(3)).unlink()
    with pytest.raises(DataError, match="1 of 8 shards .* missing"):
        ShardLoader(dataset, batch_size=2)


def test_latent_shape_must_match_the_model(dataset):
    with pytest.raises(DataError, match=r"shape \(2, 2, 2\).*expects \(4, 32, 32\)"):
        ShardLoader(dataset, batch_size=2, expected_shape=(4, 32, 32))


def test_manifest_that_does_not_match_the_shards_is_detected(dataset):
    path = dataset / shard_name(0)
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF  # inside the first sample's payload: same size, other bytes
    path.write_bytes(bytes(data))
    ShardLoader(dataset, batch_size=2)  # sizes still agree
    with pytest.raises(DataError, match="SHA-256"):
        ShardLoader(dataset, batch_size=2, verify="sha256")
    path.write_bytes(bytes(data[:-512]))
    with pytest.raises(DataError, match="bytes but the manifest lists"):
        ShardLoader(dataset, batch_size=2)


def _rewrite_manifest(root: Path, **changes) -> None:
    m = read_manifest(root)
    (root / "manifest.json").write_text(dataclasses.replace(m, **changes).to_json())


def test_sample_count_other_than_the_manifest_fails_when_read(dataset):
    m = read_manifest(dataset)
    shards = tuple(dataclasses.replace(s, num_samples=4) for s in m.shards)
    _rewrite_manifest(dataset, shards=shards, num_samples=32)
    with pytest.raises(DataError, match="holds 3 samples but the manifest lists 4"):
        take(ShardLoader(dataset, batch_size=2, num_workers=0), 1)


def test_corrupt_tar_fails_with_the_shard_name(dataset):
    path = dataset / shard_name(0)
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))
    m = read_manifest(dataset)
    _rewrite_manifest(
        dataset, shards=(dataclasses.replace(m.shards[0], sha256="x"),) + m.shards[1:]
    )
    loader = ShardLoader(dataset, batch_size=24, num_workers=0)  # sizes agree: found on read
    with pytest.raises(DataError, match="train-000000.tar is not a readable tar"):
        take(loader, 1)


def test_random_flip_off_returns_the_stored_orientation(tmp_path):
    """With random_flip=False every read is the stored (unflipped) image, in pixel mode."""
    import numpy as np
    from PIL import Image

    from gmflow.data.cache import CacheConfig, cache_latents
    from gmflow.data.shards import ShardLoader

    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    img = np.zeros((8, 8, 3), np.uint8)
    img[:, :4] = 255  # left half white: flips are visible
    Image.fromarray(img).save(src / "x.png")
    cache_latents(
        CacheConfig(
            source=tmp_path / "src",
            out_dir=tmp_path / "out",
            vae="none",
            resolution=8,
            num_workers=0,
        )
    )
    loader = ShardLoader(tmp_path / "out", batch_size=4, num_workers=0, random_flip=False)
    x, _ = next(iter(loader))
    assert torch.all(x[:, :, :, :4] == 1.0) and torch.all(x[:, :, :, 4:] == -1.0)
    flipped = ShardLoader(tmp_path / "out", batch_size=64, num_workers=0)
    x, _ = next(iter(flipped))
    left_white = (x[:, 0, 0, 0] == 1.0).float().mean()
    assert 0.2 < float(left_white) < 0.8  # both orientations occur
