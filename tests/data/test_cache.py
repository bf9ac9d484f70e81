"""``gmflow cache-data`` end to end on a generated image tree with a tiny random AutoencoderKL.

The tree has three classes, JPEG and PNG files, grey and RGBA images, odd sizes and one corrupt
file. The VAE is a randomly initialised diffusers ``AutoencoderKL`` (two levels: 16 x 16 images ->
4 x 8 x 8 latents) saved to a temporary folder, so nothing is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from gmflow.data.cache import CacheConfig, cache_latents
from gmflow.data.crop import adm_center_crop, load_rgb_image
from gmflow.data.manifest import read_manifest
from gmflow.data.shard_io import LATENT_ARRAYS, PIXEL_ARRAYS, file_sha256, read_shard
from gmflow.data.shards import ShardLoader
from gmflow.errors import CheckpointError, DataError
from gmflow_cli.main import app

RES = 16  # image side; latents are 4 x 8 x 8
REPO = Path(__file__).resolve().parents[2]


def make_image_tree(root: Path) -> list[str]:
    """3 classes x 5 images (JPEG/PNG, RGB/grey/RGBA, odd sizes) + one corrupt file."""
    rng = np.random.default_rng(0)
    readable = []
    for c, name in enumerate(["n01_cat", "n02_dog", "n03_eel"]):
        (root / name).mkdir(parents=True)
        for i in range(5):
            w, h = (int(v) for v in rng.integers(17, 70, size=2))
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            img = {1: img.convert("L"), 3: img.convert("RGBA")}.get(i, img)
            rel = f"{name}/img{c}{i}.{'png' if i % 2 else 'JPEG'}"
            img.save(root / rel)
            readable.append(rel)
    (root / "n02_dog" / "broken.JPEG").write_bytes(b"\xff\xd8 truncated")
    (root / "n02_dog" / "notes.txt").write_text("not an image, not an input")
    return sorted(readable)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The tiny VAE runs ~20x faster on one thread than on two busy cores; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """(image tree, readable relative paths, tiny VAE folder); HF_HUB_OFFLINE=1 meanwhile."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield _make_env(tmp_path_factory)


def _make_env(tmp_path_factory):
    from diffusers import AutoencoderKL

    base = tmp_path_factory.mktemp("cache")
    readable = make_image_tree(base / "src")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=RES,
    )
    vae.save_pretrained(base / "vae")
    return base / "src", readable, base / "vae"


@pytest.fixture(scope="module")
def cli_run(env, tmp_path_factory):
    """The whole command through the CLI: (output folder, CliRunner result)."""
    src, _, vae = env
    out = tmp_path_factory.mktemp("cli") / "ds"
    args = ["cache-data", str(src), "--out", str(out), "--vae", str(vae), "--resolution", str(RES)]
    result = CliRunner().invoke(app, [*args, "--shard-size", "4", "--batch-size", "3"])
    return out, result


def all_samples(root: Path, names=LATENT_ARRAYS):
    return [s for info in read_manifest(root).shards for s in read_shard(root / info.name, names)]


def test_cli_writes_shards_and_a_manifest_that_describes_them(env, cli_run):
    _, readable, vae = env
    out, result = cli_run
    assert result.exit_code == 0, result.output
    assert "15 samples in 4 shards" in result.output and "skipped 1 unreadable" in result.output
    m = read_manifest(out)
    assert (m.mode, m.num_samples, m.sample_shape, m.stored_dtype) == (
        "latent",
        15,
        (4, 8, 8),
        "float16",
    )
    assert m.classes == {0: "n01_cat", 1: "n02_dog", 2: "n03_eel"}
    assert (m.encoder, m.scaling_factor, m.resolution) == (str(vae), 0.18215, RES)
    assert [s.num_samples for s in m.shards] == [4, 3, 4, 4]  # shard 1 lost broken.JPEG
    assert [s.name for s in m.shards] == [f"shards/train-{i:06d}.tar" for i in range(4)]
    for s in m.shards:
        assert (
            file_sha256(out / s.name) == s.sha256 and (out / s.name).stat().st_size == s.num_bytes
        )
    assert [x.path for x in m.skipped] == ["n02_dog/broken.JPEG"]
    assert "UnidentifiedImageError" in m.skipped[0].reason
    samples = all_samples(out)
    assert sorted(s.source for s in samples) == readable
    assert all(s.label == int(s.source[2]) - 1 for s in samples)  # n01 -> 0, n02 -> 1, n03 -> 2
    assert [s.key for s in samples] == sorted(s.key for s in samples)  # stable, sorted keys


def test_stored_posteriors_are_the_vae_posteriors_of_the_crop_and_its_flip(env, cli_run):
    src, _, vae_dir = env
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    samples = all_samples(cli_run[0])
    crops = np.stack([adm_center_crop(load_rgb_image(src / s.source), RES) for s in samples])
    images = torch.from_numpy(crops).permute(0, 3, 1, 2).double() / 127.5 - 1
    with torch.no_grad():
        for flip in (0, 1):
            dist = vae.double().encode(images.flip(-1) if flip else images).latent_dist
            for name, ref in (("mean", dist.mean), ("std", dist.std)):
                got = torch.from_numpy(np.stack([s.arrays[name][flip] for s in samples]))
                # fp16 storage: relative rounding 2^-11
                torch.testing.assert_close(got.double(), ref, rtol=1e-3, atol=1e-4)


def test_manifest_channel_statistics_are_those_of_the_stored_posteriors(cli_run):
    m = read_manifest(cli_run[0])
    samples = all_samples(cli_run[0])
    mu = np.stack([s.arrays["mean"] for s in samples]).astype(np.float64) * m.scaling_factor
    sd = np.stack([s.arrays["std"] for s in samples]).astype(np.float64) * m.scaling_factor
    # x = s·z, z ~ N(μ, σ²), image or flip, uniform over samples and pixels
    mean = mu.mean(axis=(0, 1, 3, 4))
    var = (mu**2 + sd**2).mean(axis=(0, 1, 3, 4)) - mean**2
    np.testing.assert_allclose(m.channel_mean, mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(m.channel_std, np.sqrt(var), rtol=1e-9)


def test_reader_on_the_cached_dataset_checks_the_model_shape(cli_run):
    x, y = next(
        iter(ShardLoader(cli_run[0], batch_size=15, num_workers=0, expected_shape=(4, 8, 8)))
    )
    assert x.shape == (15, 4, 8, 8) and sorted(y.tolist()) == [0] * 5 + [1] * 5 + [2] * 5
    with pytest.raises(DataError, match="expects"):
        ShardLoader(cli_run[0], batch_size=2, expected_shape=(4, 32, 32))


def test_rerun_keeps_complete_shards_and_rewrites_damaged_ones(env, cli_run, tmp_path):
    src, _, vae = env
    out = tmp_path / "ds"
    cfg = CacheConfig(
        source=src, out_dir=out, vae=str(vae), resolution=RES, shard_size=4, batch_size=3
    )
    first = cache_latents(cfg)
    before = read_manifest(out)
    shard = out / before.shards[1].name
    data = bytearray(shard.read_bytes())
    data[1000] ^= 1  # same size, wrong checksum
    shard.write_bytes(bytes(data))
    (out / "shard_info" / "train-000003.json").unlink()  # as if killed before its record
    (out / "shards" / "train-000009.tar").write_bytes(b"stale shard of a bigger earlier run")
    again = cache_latents(cfg)
    assert (first.shards_written, again.shards_reused, again.shards_written) == (4, 2, 2)
    assert read_manifest(out) == before  # bit-identical shards: encoding is deterministic
    assert not (out / "shards" / "train-000009.tar").exists()


def test_pixel_mode_stores_the_crops(env, tmp_path):
    src, readable, _ = env
    cfg = CacheConfig(source=src, out_dir=tmp_path / "px", vae="none", resolution=RES, shard_size=8)
    result = cache_latents(cfg)
    m = read_manifest(tmp_path / "px")
    assert (m.mode, m.sample_shape, m.stored_dtype, m.encoder) == (
        "pixel",
        (3, RES, RES),
        "uint8",
        None,
    )
    assert result.num_samples == len(readable) and result.num_skipped == 1
    for s in all_samples(tmp_path / "px", PIXEL_ARRAYS):
        np.testing.assert_array_equal(
            s.arrays["pixels"], adm_center_crop(load_rgb_image(src / s.source), RES)
        )
    x, _ = next(iter(ShardLoader(tmp_path / "px", batch_size=4, num_workers=0)))
    assert x.shape == (4, 3, RES, RES) and x.min() >= -1 and x.max() <= 1


def test_label_list_sets_labels_and_reports_missing_files(env, tmp_path):
    src, readable, _ = env
    listed = readable[:4] + ["n09_gone/missing.JPEG"]
    labels = tmp_path / "train.txt"
    labels.write_text("".join(f"{p} {7 - i}\n" for i, p in enumerate(listed)))
    cfg = CacheConfig(
        source=src, out_dir=tmp_path / "ds", vae="none", resolution=RES, labels_file=labels
    )
    result = cache_latents(cfg)
    got = {s.source: s.label for s in all_samples(tmp_path / "ds", PIXEL_ARRAYS)}
    assert got == {p: 7 - i for i, p in enumerate(readable[:4])}
    assert [(s.path, s.reason.split(":")[0]) for s in result.skipped] == [
        ("n09_gone/missing.JPEG", "FileNotFoundError")
    ]
    assert result.num_samples == 4


def test_limit_takes_the_first_inputs_of_the_sorted_list(env, tmp_path):
    src, readable, _ = env
    cfg = CacheConfig(source=src, out_dir=tmp_path / "ds", vae="none", resolution=RES, limit=3)
    cache_latents(cfg)
    assert sorted(s.source for s in all_samples(tmp_path / "ds", PIXEL_ARRAYS)) == readable[:3]


def test_unavailable_vae_fails_before_any_work(env, tmp_path):
    src = env[0]
    for spec in ("gmflow-tests/no-such-vae", str(tmp_path / "no_folder")):
        cfg = CacheConfig(source=src, out_dir=tmp_path / "ds", vae=spec, resolution=RES)
        with pytest.raises(CheckpointError, match="--vae"):
            cache_latents(cfg)
        assert not (tmp_path / "ds").exists()
    args = ["cache-data", str(src), "--out", str(tmp_path / "ds"), "--vae", "gmflow-tests/none"]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, CheckpointError)  # main() maps it to "error: ..." exit 1
    assert "HF_HUB_OFFLINE" in str(result.exception)


def test_vae_wrapper_loads_folders_and_applies_the_latent_scale(env, tmp_path):
    import shutil

    from diffusers import AutoencoderKL

    from gmflow.models.vae import SD_VAE_SCALING_FACTOR, load_vae

    vae_dir = env[2]
    shutil.copytree(vae_dir, tmp_path / "pipeline" / "vae")  # a pipeline folder works too
    vae, from_pipeline = load_vae(vae_dir), load_vae(tmp_path / "pipeline")
    assert vae.scaling_factor == SD_VAE_SCALING_FACTOR == 0.18215
    ref = AutoencoderKL.from_pretrained(vae_dir).eval()
    images = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x_0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dist = ref.encode(images).latent_dist
        decoded = (ref.decode(x_0 / 0.18215).sample / 2 + 0.5).clamp(0, 1)
    for model in (vae, from_pipeline):
        mean, std = model.encode(images)
        torch.testing.assert_close(mean, dist.mean)
        torch.testing.assert_close(std, dist.std)
        torch.testing.assert_close(model.decode(x_0), decoded)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_vae(tmp_path / "empty")


def test_empty_source_is_a_data_error(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        cache_latents(CacheConfig(source=tmp_path / "src", out_dir=tmp_path / "ds", vae="none"))


_KILLABLE_WRITER = """
import os, sys, time
from pathlib import Path
from gmflow.data.cache import CacheConfig, cache_latents
src, out, vae, flag = (Path(a) for a in sys.argv[1:5])
def hold_after_first_shard(progress):  # called after every batch
    if (out / "shards" / "train-000000.tar").exists():
        flag.write_text("first shard renamed")
        time.sleep(120)  # the test kills us here, in the middle of shard 1
cfg = CacheConfig(source=src, out_dir=out, vae=str(vae), resolution=16, shard_size=4, batch_size=2)
cache_latents(cfg, progress=hold_after_first_shard)
"""


@pytest.mark.slow
def test_sigkill_then_rerun_holds_every_readable_image_exactly_once(env, tmp_path):
    src, readable, vae = env
    out, flag = tmp_path / "ds", tmp_path / "flag"
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE_WRITER, str(src), str(out), str(vae), str(flag)],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while not flag.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert flag.exists(), "the writer did not reach its second shard"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert (out / "shards" / "train-000001.tar.tmp").exists()  # half-written, never renamed
    assert (
        not (out / "shards" / "train-000001.tar").exists() and not (out / "manifest.json").exists()
    )
    cfg = CacheConfig(
        source=src, out_dir=out, vae=str(vae), resolution=RES, shard_size=4, batch_size=2
    )
    result = cache_latents(cfg)
    assert (result.shards_reused, result.shards_written) == (1, 3)
    sources = [s.source for s in all_samples(out)]
    assert sorted(sources) == readable and len(set(sources)) == len(sources)
    assert not list(out.glob("**/*.tmp"))


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(env, cli_run, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip(f"torchrun not found next to {sys.executable}")
    src, _, vae = env
    out = tmp_path / "ds"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "gmflow_cli", "cache-data"]
    cmd += [str(src), "--out", str(out), "--vae", str(vae), "--resolution", str(RES)]
    cmd += ["--shard-size", "4", "--batch-size", "3", "--device", "cpu"]
    env_vars = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env_vars, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("15 samples in 4 shards") == 1  # only rank 0 reports
    records = [json.loads(p.read_text()) for p in sorted((out / "shard_info").glob("*.json"))]
    assert len(records) == 4
    ours, single = read_manifest(out), read_manifest(cli_run[0])
    assert [(s.name, s.num_samples) for s in ours.shards] == [
        (s.name, s.num_samples) for s in single.shards
    ]
    assert ours.skipped == single.skipped and ours.classes == single.classes
    for a, b in zip(all_samples(out), all_samples(cli_run[0]), strict=True):
        assert (a.key, a.label, a.source) == (b.key, b.label, b.source)
        for name in LATENT_ARRAYS:  # other thread counts may round differently in fp16
            np.testing.assert_allclose(a.arrays[name], b.arrays[name], rtol=2e-3, atol=1e-3)
