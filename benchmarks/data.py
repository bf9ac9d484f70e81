"""Data pipeline throughput: caching images with an SD-VAE-sized encoder, and reading latents.

1. ``cache``: images/s of :func:`gmflow.data.cache.cache_latents` (ADM crop, two encoder passes
   per image for the image and its flip, fp16 posteriors, shard + manifest) with a randomly
   initialised ``AutoencoderKL`` of the SD-VAE architecture at 256 x 256 on CPU; and, for
   reference, images/s of the bare encoder on one pass.
2. ``read``: samples/s of one epoch of 4 x 32 x 32 latents through 2 DataLoader workers:
   our shards (:class:`gmflow.data.shards.ShardLoader`, a fresh posterior sample and flip per read)
   against the official layout, one ``.pth`` file per sample ``{x: fp32 latent, y: int64}`` read
   with ``torch.load(weights_only=True)`` and a shuffling DataLoader. Both read the same samples
   from the page cache (just written), so this measures per-sample overhead, not the disk.

    python benchmarks/data.py                    # both, the defaults below
    python benchmarks/data.py --skip-cache --read-samples 8000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gmflow.data.cache import CacheConfig, cache_latents
from gmflow.data.manifest import Manifest, ShardInfo
from gmflow.data.shards import ShardLoader, ShardSample, ShardWriter, shard_name

SD_VAE_CONFIG = dict(  # the architecture of stabilityai/sd-vae-ft-ema (83.7M parameters)
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
)


def bench_cache(
    tmp: Path, num_images: int, batch_size: int, device: str, dtype: str, threads: int
) -> list[tuple[str, float]]:
    from diffusers import AutoencoderKL

    rng = np.random.default_rng(0)
    for i in range(num_images):  # ImageNet-like sizes: 500 x 375 JPEGs
        (tmp / "src" / "c0").mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp / "src" / "c0" / f"{i}.JPEG", quality=90)
    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(tmp / "vae")
    cfg = CacheConfig(
        source=tmp / "src",
        out_dir=tmp / "cached",
        vae=str(tmp / "vae"),
        resolution=256,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        num_workers=threads,
    )
    from gmflow.models.vae import load_vae

    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    vae = load_vae(tmp / "vae", device=device, dtype=torch_dtype)
    x = torch.rand(batch_size, 3, 256, 256) * 2 - 1
    vae.encode(x)  # warm-up (on a GPU: kernel selection)
    t0 = time.perf_counter()
    for _ in range(3):
        vae.encode(x)  # returns on the CPU: synchronised
    encoder_rate = 3 * batch_size / (time.perf_counter() - t0)
    result = cache_latents(cfg, encoder=vae)
    return [
        (f"encoder alone, 1 pass, {device} {dtype} (images/s)", encoder_rate),
        ("cache-data end to end, 2 passes (images/s)", result.num_samples / result.elapsed_s),
    ]


def write_both_layouts(tmp: Path, n: int, shard_size: int) -> None:
    """The same n latents as our shards (tmp/shards) and as one .pth per sample (tmp/pth)."""
    rng = np.random.default_rng(0)
    (tmp / "ours" / "shards").mkdir(parents=True)
    (tmp / "pth").mkdir()
    infos = []
    for s in range(0, n, shard_size):
        writer = ShardWriter(tmp / "ours" / shard_name(s // shard_size))
        for i in range(s, min(s + shard_size, n)):
            mean = rng.normal(size=(2, 4, 32, 32)).astype(np.float16)
            std = np.full_like(mean, 0.05)
            writer.write(ShardSample(f"{i:09d}", i % 1000, f"{i}.JPEG", {"mean": mean, "std": std}))
            x = torch.from_numpy(mean[0].astype(np.float32) * 0.18215)
            torch.save({"x": x, "y": torch.tensor(i % 1000)}, tmp / "pth" / f"{i}.pth")
        sha, size = writer.commit()
        infos.append(ShardInfo(shard_name(s // shard_size), writer.num_samples, size, sha))
    manifest = Manifest(
        mode="latent",
        num_samples=n,
        shards=tuple(infos),
        classes={i: str(i) for i in range(1000)},
        resolution=256,
        sample_shape=(4, 32, 32),
        stored_dtype="float16",
        encoder="random",
        scaling_factor=0.18215,
        channel_mean=(0.0,) * 4,
        channel_std=(1.0,) * 4,
    )
    (tmp / "ours" / "manifest.json").write_text(manifest.to_json())


class PthFiles(torch.utils.data.Dataset):
    """The official cache layout: one torch file per sample."""

    def __init__(self, root: Path) -> None:
        self.files = sorted(root.glob("*.pth"))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = torch.load(self.files[i], weights_only=True)
        return d["x"], d["y"]


def time_epoch(batches, num_batches: int) -> float:
    """Seconds for num_batches batches, after the first one (worker start-up) arrives."""
    it = iter(batches)
    next(it)
    t0 = time.perf_counter()
    for _ in range(num_batches - 1):
        next(it)
    return time.perf_counter() - t0


def bench_read(tmp: Path, n: int, batch_size: int, workers: int, repeats: int) -> list:
    write_both_layouts(tmp, n, shard_size=500)
    num_batches = n // batch_size
    ours = ShardLoader(
        tmp / "ours", batch_size=batch_size, num_workers=workers, shuffle_buffer=1000
    )
    pth = torch.utils.data.DataLoader(
        PthFiles(tmp / "pth"), batch_size=batch_size, shuffle=True, num_workers=workers
    )
    # interleaved repeats, best of each: the CPU is shared, so take the least disturbed epoch
    t_ours = t_pth = float("inf")
    for _ in range(repeats):
        t_pth = min(t_pth, time_epoch(pth, num_batches))
        t_ours = min(t_ours, time_epoch(ours, num_batches))
    samples = (num_batches - 1) * batch_size
    return [
        (f"one .pth per sample, {workers} workers (samples/s)", samples / t_pth),
        (f"gmflow shards, {workers} workers (samples/s)", samples / t_ours),
        ("shards / .pth (x)", t_pth / t_ours),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-images", type=int, default=8)
    parser.add_argument("--cache-batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="encoder device for the cache benchmark")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--decode-threads", type=int, default=4)
    parser.add_argument("--read-samples", type=int, default=4000)
    parser.add_argument("--read-batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="read epochs per layout (best)")
    parser.add_argument("--skip-cache", action="store_true")
    parser.add_argument("--skip-read", action="store_true")
    args = parser.parse_args()
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_cache:
            rows += bench_cache(
                Path(tmp) / "cache",
                args.cache_images,
                args.cache_batch_size,
                args.device,
                args.dtype,
                args.decode_threads,
            )
        if not args.skip_read:
            rows += bench_read(
                Path(tmp) / "read",
                args.read_samples,
                args.read_batch_size,
                args.workers,
                args.repeats,
            )
    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    print(f"| {'measure':<52} | {'value':>9} |\n|{'-' * 54}|{'-' * 11}|")
    for name, value in rows:
        print(f"| {name:<52} | {value:>9.2f} |")


if __name__ == "__main__":
    main()
