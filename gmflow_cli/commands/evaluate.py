"""``gmflow evaluate``: FID, IS, precision and recall over a guidance sweep (gmflow.evaluation).

Registered with ``cls=EvaluateCommand``: Typer options take one value per flag, so the command
rewrites ``--steps 8 32`` into ``--steps 8 --steps 32`` (likewise ``--solvers`` and
``--guidance-sweep``) before parsing; repeating the flag works too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from gmflow_cli.options import DryRunOpt, GuidanceIntervalOpt, OverrideOpt, StepOpt

MULTI_VALUE_OPTIONS = ("--guidance-sweep", "--solvers", "--steps")


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def expand_multi_value(args: list[str]) -> list[str]:
    """``--steps 8 32 --seed 0`` -> ``--steps 8 --steps 32 --seed 0`` for MULTI_VALUE_OPTIONS.

    Values run until the next token that starts with ``-`` and is not a number, or ``--``.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            return out + args[i:]
        out.append(token)
        i += 1
        if token in MULTI_VALUE_OPTIONS:
            values = []
            while i < len(args) and (not args[i].startswith("-") or _is_number(args[i])):
                values.append(args[i])
                i += 1
            for k, v in enumerate(values):
                out += [v] if k == 0 else [token, v]
    return out


class EvaluateCommand(TyperCommand):
    """A Typer command whose multi-value options accept space-separated lists."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, expand_multi_value(list(args)))


def _guidance_scales(values: list[str]) -> tuple[float, ...]:
    from gmflow.evaluation.config import PAPER_GUIDANCE_SCALES

    if values == ["paper"]:
        return PAPER_GUIDANCE_SCALES
    try:
        return tuple(float(v) for v in values)
    except ValueError:
        raise typer.BadParameter(
            f"expected 'paper' or numbers in [0, 1), got {' '.join(values)}",
            param_hint="--guidance-sweep",
        ) from None


def evaluate(
    *,
    pretrained: Annotated[
        str | None,
        typer.Option("--pretrained", help="Pipeline folder or hub id.", show_default=False),
    ] = None,
    run: Annotated[
        Path | None,
        typer.Option("--run", help="Training run folder (EMA weights).", show_default=False),
    ] = None,
    step: StepOpt = None,
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe",
            help="YAML recipe (e.g. recipes/eval_imagenet256_fid50k.yaml); flags override it.",
            show_default=False,
        ),
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option(
            "--reference",
            help="ADM reference batch .npz, a folder of images, or a gmflow shard folder.",
            show_default=False,
        ),
    ] = None,
    guidance_sweep: Annotated[
        list[str] | None,
        typer.Option(
            "--guidance-sweep",
            help="'paper' (the 20 scales of the paper) or scales w, e.g. 0.04 0.45.",
            show_default=False,
        ),
    ] = None,
    guidance_mode: Annotated[
        str | None,
        typer.Option(
            "--guidance-mode",
            help="probabilistic (default; scales w in [0, 1)) or cfg (vanilla CFG, scales >= 1).",
            show_default=False,
        ),
    ] = None,
    guidance_interval: GuidanceIntervalOpt = None,
    solvers: Annotated[
        list[str] | None,
        typer.Option("--solvers", help="e.g. gm-ode2 gm-sde2 (default).", show_default=False),
    ] = None,
    steps: Annotated[
        list[int] | None,
        typer.Option("--steps", help="Network steps N, e.g. 8 32 (default).", show_default=False),
    ] = None,
    num_samples: Annotated[
        int | None,
        typer.Option(
            "--num-samples", help="Samples per point (default 50000).", show_default=False
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size", help="Images per network call (default 125).", show_default=False
        ),
    ] = None,
    inception_weights: Annotated[
        Path | None,
        typer.Option(
            "--inception-weights",
            help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: its cache).",
            show_default=False,
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out-dir", help="Results folder (default ./eval).", show_default=False),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed", help="0 = spec 11.2 seeds (label i, noise i+1000).", show_default=False
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option("--device", help="auto (default), cpu, cuda or cuda:N.", show_default=False),
    ] = None,
    overrides: OverrideOpt = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Sample every solver x steps x guidance point and score it against a reference set.

    Resumable: rerun the same command. Distributed: launch it with torchrun.

    Offline: pass --inception-weights or put the file in torch-fidelity's cache.

    Examples:

      gmflow evaluate --pretrained Lakonik/gmflow_imagenet_k8_ema --reference VIRTUAL_imagenet256_labeled.npz --guidance-sweep paper

      gmflow evaluate --run runs/in256_b2 --reference ref.npz --solvers gm-ode2 --steps 8 --guidance-sweep 0.04 0.45 --num-samples 10000

      torchrun --nproc_per_node=8 -m gmflow_cli evaluate --recipe recipes/eval_imagenet256_fid50k.yaml --reference ref.npz
    """  # noqa: E501
    import dataclasses

    from gmflow.config import apply_overrides, load_recipe, to_dict
    from gmflow.evaluation.config import EvalConfig

    given: dict[str, Any] = {
        "pretrained": pretrained,
        "run": run,
        "step": step,
        "reference": reference,
        "guidance_scales": _guidance_scales(guidance_sweep) if guidance_sweep else None,
        "guidance_mode": guidance_mode,
        "guidance_interval": tuple(guidance_interval) if guidance_interval else None,
        "solvers": tuple(solvers) if solvers else None,
        "steps": tuple(steps) if steps else None,
        "num_samples": num_samples,
        "batch_size": batch_size,
        "inception_weights": inception_weights,
        "out_dir": out_dir,
        "seed": seed,
        "device": device,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if recipe is not None:  # precedence: recipe < flags < --set
        cfg = load_recipe(recipe, EvalConfig)
        if "run" in given or "pretrained" in given:  # a model flag replaces the recipe's model
            given = {"pretrained": None, "run": None, "step": None, **given}
        cfg = dataclasses.replace(cfg, **given)
    else:
        cfg = EvalConfig(**given)
    cfg = apply_overrides(cfg, overrides or ())
    if dry_run:
        import yaml

        typer.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False), nl=False)
        return
    _run(cfg)


def _run(cfg: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from gmflow.evaluation import evaluate as run_evaluation
    from gmflow_cli.progress import is_main_process, progress_bar

    main_rank = is_main_process()
    bar = progress_bar(remaining=False)
    task = bar.add_task("preparing", total=None)

    def progress(stage: str, done: int, total: int) -> None:
        bar.update(task, description=stage, completed=done, total=total or None)

    with bar:
        result = run_evaluation(cfg, progress=progress)
    if not main_rank:
        return
    table = Table(title=f"guidance sweep: {cfg.num_samples} samples per point")
    for col in (
        "solver",
        "steps",
        "best FID",
        "w",
        "IS",
        "prec.",
        "rec.",
        "best prec.",
        "w",
        "FID",
    ):
        table.add_column(col, justify="left" if col == "solver" else "right")

    def f(v: float | None, digits: int) -> str:
        return "—" if v is None else f"{v:.{digits}f}"

    for s in result.summary:
        table.add_row(
            s.solver,
            f"{s.num_steps}" + (f"x{s.num_substeps}" if s.num_substeps > 1 else ""),
            f(s.best_fid, 2),
            f"{s.best_fid_guidance:g}",
            f(s.is_at_best_fid, 1),
            f(s.precision_at_best_fid, 3),
            f(s.recall_at_best_fid, 3),
            f(s.best_precision, 3),
            "—" if s.best_precision_guidance is None else f"{s.best_precision_guidance:g}",
            f(s.fid_at_best_precision, 2),
        )
    Console().print(table)
    t = result.timings
    typer.echo(
        f"results: {result.paths['results']} (summary: {result.paths['summary_md'].name}); "
        f"time {t.get('total', 0):.1f} s = sampling {t['sampling']:.1f} + decoding "
        f"{t['decoding']:.1f} + reference {t['reference']:.1f} + features {t['features']:.1f} "
        f"+ metrics {t['metrics']:.1f} (+ I/O); shards written {result.shards_written}, "
        f"reused {result.shards_skipped}"
    )
