"""One progress-bar look for every command.

Each bar goes to stderr (stdout keeps the results a script may parse) and shows, left to right:
the stage in bold, the bar, done/total, a free ``info`` text (loss, throughput, the current grid
point), elapsed time and, where the command does not compute its own, rich's time remaining.
Only the main process of a ``torchrun`` job draws one.
"""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = ["progress_bar", "is_main_process"]


class _InfoColumn(ProgressColumn):
    """The task's ``info`` field, empty where a task has none."""

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get("info", "")))


def is_main_process() -> bool:
    """True outside torchrun and on its rank 0 (``RANK`` unset or 0)."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def progress_bar(*, remaining: bool = True, disable: bool | None = None) -> Progress:
    """A rich ``Progress`` with the shared columns, on stderr.

    Args:
        remaining: add rich's time-remaining column (off where ``info`` carries a better ETA,
            e.g. a resumed job whose first update jumps ahead).
        disable: hide the bar; default: hidden on every process but the main one.
    """
    columns: list[ProgressColumn] = [
        TextColumn("[bold]{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        _InfoColumn(),
        TimeElapsedColumn(),
    ]
    if remaining:
        columns.append(TimeRemainingColumn())
    hide = not is_main_process() if disable is None else disable
    return Progress(*columns, console=Console(stderr=True), disable=hide)
