"""``gmflow export``: a training run as a GMDiTPipeline folder.

A thin layer over :func:`gmflow.training.export.export_pipeline`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gmflow_cli.options import StepOpt


def export(
    run_dir: Annotated[
        Path, typer.Argument(help="Training run folder (config.yaml, checkpoints/).")
    ],
    out_dir: Annotated[Path, typer.Argument(help="Pipeline folder to write.")],
    *,
    vae: Annotated[
        str,
        typer.Option(
            "--vae",
            help="'auto' (the VAE of a latent dataset), 'none', or a hub id / VAE folder.",
        ),
    ] = "auto",
    use_ema: Annotated[
        bool, typer.Option("--ema/--raw-weights", help="Export the EMA weights (default).")
    ] = True,
    variant: Annotated[
        str | None, typer.Option("--variant", help="Also save a 'bf16' or 'fp16' weights variant.")
    ] = None,
    step: StepOpt = None,
) -> None:
    """Export a run's EMA weights (latest checkpoint, or --step) as a pipeline for sampling.

    Examples:

        gmflow export runs/digits pipelines/digits --vae none

        gmflow export runs/xl2 pipelines/xl2 --variant bf16
    """
    from gmflow.training.export import export_pipeline

    path = export_pipeline(run_dir, out_dir, vae=vae, use_ema=use_ema, variant=variant, step=step)
    typer.echo(f"wrote the pipeline to {path}")
