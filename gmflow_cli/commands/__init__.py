"""One module per command; each body validates options and calls exactly one library function."""

from __future__ import annotations

import typer


def registered(app: typer.Typer) -> None:
    """Register every command on the root app, in the order ``gmflow --help`` lists them."""
