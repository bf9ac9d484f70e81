"""Shared Annotated option types for the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

RecipeArg = Annotated[Path, typer.Argument(help="YAML recipe (see recipes/).", show_default=False)]
OverrideOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override a recipe value, e.g. --set optim.lr=1e-4 (repeatable; values are YAML).",
        show_default=False,
    ),
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Print the resolved config and exit without running.")
]
StepOpt = Annotated[
    int | None,
    typer.Option(
        "--step",
        help="The training step of the run's checkpoint to use (default: the latest).",
        show_default=False,
    ),
]
GuidanceIntervalOpt = Annotated[
    tuple[float, float] | None,
    typer.Option(
        "--guidance-interval",
        help="Guide only for SIGMA_A <= sigma <= SIGMA_B, e.g. --guidance-interval 0.1 0.9.",
        show_default=False,
    ),
]
