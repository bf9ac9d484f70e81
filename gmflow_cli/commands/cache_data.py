"""``gmflow cache-data``: images -> VAE latents -> WebDataset shards (gmflow.data.cache)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer


class EncoderDtype(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


def cache_data(
    source: Path = typer.Argument(
        ..., help="Image folder, one subfolder per class (e.g. ImageNet's train/)."
    ),
    out: Path = typer.Option(..., "--out", help="Dataset folder to write (shards + manifest)."),
    vae: str = typer.Option(
        "stabilityai/sd-vae-ft-ema",
        "--vae",
        help="Hub id or local folder of a diffusers AutoencoderKL, or 'none' to store pixels.",
    ),
    resolution: int = typer.Option(256, "--resolution", min=1, help="Side of the ADM crop."),
    labels: Path | None = typer.Option(
        None, "--labels", help="Caffe 'relative/path label' list; default: sorted folder names."
    ),
    shard_size: int = typer.Option(1000, "--shard-size", min=1, help="Images per shard."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per encoder call."),
    dtype: EncoderDtype = typer.Option(EncoderDtype.fp32, "--dtype", help="Encoder precision."),
    device: str | None = typer.Option(
        None, "--device", help="e.g. cpu, cuda, cuda:1; default: this rank's GPU, else cpu."
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Only the first N images."),
    workers: int = typer.Option(4, "--workers", min=1, help="Image decoding threads."),
) -> None:
    """Encode an image folder into checksummed, resumable WebDataset shards of VAE posteriors.

    Rerun the same command after a crash: complete shards are kept and the rest rewritten.
    Several GPUs: launch through torchrun (each rank writes its own shards).

    Examples:

      gmflow cache-data data/imagenet/train --out data/in256_sdvae --labels train.txt

      torchrun --nproc_per_node=8 -m gmflow_cli cache-data data/imagenet/train --out data/in256

      gmflow cache-data photos/ --out data/photos64 --vae none --resolution 64 --limit 1000
    """

    from gmflow.data.cache import CacheConfig, CacheProgress, cache_latents
    from gmflow_cli.progress import is_main_process, progress_bar

    cfg = CacheConfig(
        source=source,
        out_dir=out,
        vae=vae,
        resolution=resolution,
        labels_file=labels,
        shard_size=shard_size,
        batch_size=batch_size,
        dtype=dtype.value,
        device=device,
        limit=limit,
        num_workers=workers,
    )
    is_main = is_main_process()
    bar = progress_bar(remaining=False)  # the job's own ETA counts shards reused on resume
    task = bar.add_task("caching", total=None, info="")

    def on_progress(p: CacheProgress) -> None:
        eta = "?" if p.eta_s == float("inf") else f"{int(p.eta_s) // 60}:{int(p.eta_s) % 60:02d}"
        info = f"{p.images_per_s:.1f} img/s  ETA {eta}"
        bar.update(task, completed=p.done, total=p.total, info=info)

    with bar:
        result = cache_latents(cfg, progress=on_progress)
    if not is_main:
        return
    typer.echo(
        f"{result.num_samples} samples in {result.num_shards} shards at {result.out_dir} "
        f"({result.shards_written} written, {result.shards_reused} reused) in "
        f"{result.elapsed_s:.1f} s"
    )
    if result.num_skipped:
        typer.echo(f"skipped {result.num_skipped} unreadable inputs:")
        for item in result.skipped[:10]:
            typer.echo(f"  {item.path}: {item.reason}")
        if result.num_skipped > 10:
            typer.echo(f"  ... all {result.num_skipped} are listed in {result.manifest_path}")
