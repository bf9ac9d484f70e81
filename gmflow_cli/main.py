"""Root Typer app: registers the commands explicitly and maps library errors to exit codes.

``main()`` runs the app; a :class:`gmflow.errors.GMFlowError` prints ``error: <message>`` on
stderr and exits 1 (Typer keeps 2 for usage errors). ``GMFLOW_DEBUG=1`` re-raises instead, so
the full traceback shows. Other exceptions propagate untouched: they are bugs.
"""

from __future__ import annotations

import os
import sys

import typer

from gmflow import __version__
from gmflow.errors import GMFlowError

app = typer.Typer(
    name="gmflow",
    help="Gaussian Mixture Flow Matching: train, sample and evaluate GMFlow models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"gmflow {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """Gaussian Mixture Flow Matching (GMFlow, ICML 2025): train, sample and evaluate."""


# ---- commands, registered explicitly (one line each) ----
from gmflow_cli.commands import registered  # noqa: E402

registered(app)


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``gmflow``)."""
    try:
        app(args=argv, standalone_mode=True)
    except GMFlowError as err:
        if os.environ.get("GMFLOW_DEBUG", "") not in ("", "0"):
            raise
        typer.echo(f"error: {err}", err=True)
        sys.exit(1)
