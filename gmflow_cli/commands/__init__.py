"""One module per command; each body validates options and calls exactly one library function.

Command modules import only typer at module level (heavy imports live inside the bodies), so
registering them all keeps ``gmflow --help`` instant.
"""

from __future__ import annotations

import typer

from gmflow_cli.commands.cache_data import cache_data
from gmflow_cli.commands.evaluate import EvaluateCommand, evaluate
from gmflow_cli.commands.export import export
from gmflow_cli.commands.sample import SAMPLE_CONTEXT, sample
from gmflow_cli.commands.toy import toy
from gmflow_cli.commands.train import train


def registered(app: typer.Typer) -> None:
    """Register every command on the root app, in the order ``gmflow --help`` lists them."""
    app.command("toy")(toy)
    app.command("cache-data")(cache_data)
    app.command("train")(train)
    app.command("export")(export)
    app.command("sample", context_settings=SAMPLE_CONTEXT)(sample)
    app.command("evaluate", cls=EvaluateCommand)(evaluate)
