"""``gmflow train``: load a recipe, resolve overrides, call :func:`gmflow.training.train`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gmflow_cli.options import DryRunOpt, OverrideOpt, RecipeArg


def train(
    recipe: RecipeArg,
    *,
    overrides: OverrideOpt = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out-dir", help="Run folder (default: runs/<recipe name>). Reruns resume."),
    ] = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Train a GMFlow model from a YAML recipe; resumes automatically from the run folder.

    Examples:

        gmflow train recipes/toy_checkerboard_k64.yaml --set train.max_steps=2000

        torchrun --nproc_per_node=8 -m gmflow_cli train recipes/imagenet256_gmdit_xl2_k8.yaml \\
            --set data.path=/data/in256 --out-dir runs/xl2
    """
    import yaml

    from gmflow.config import load_recipe, to_dict
    from gmflow.run_config import RunConfig

    cfg = load_recipe(recipe, RunConfig, overrides or [])
    run_dir = out_dir if out_dir is not None else Path("runs") / recipe.stem
    if dry_run:
        typer.echo(f"# resolved config for run folder {run_dir}")
        typer.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
        return

    from gmflow.training import train as run_training
    from gmflow_cli.progress import is_main_process, progress_bar

    is_main = is_main_process()
    with progress_bar() as bar:
        task = bar.add_task("train", total=cfg.train.max_steps, info="")

        def progress(step: int, total: int, metrics: dict[str, float]) -> None:
            bar.update(
                task,
                completed=step,
                info=f"loss {metrics['loss']:.4f}  |g| {metrics['grad_norm']:.3g}",
            )

        result = run_training(cfg, run_dir, progress=progress)
    if is_main:
        typer.echo(
            f"done: step {result.final_step}, loss {result.final_loss:.4f}, "
            f"checkpoint {result.last_checkpoint}"
        )
