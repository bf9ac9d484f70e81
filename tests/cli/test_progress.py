"""The shared progress bar of the commands (gmflow_cli.progress)."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import TimeRemainingColumn

from gmflow_cli.progress import is_main_process, progress_bar


def _render(bar) -> str:  # type: ignore[no-untyped-def]
    out = io.StringIO()
    Console(file=out, width=120).print(bar.make_tasks_table(bar.tasks))
    return out.getvalue()


def test_bar_goes_to_stderr_with_the_shared_columns():
    bar = progress_bar()
    assert bar.console.stderr
    assert any(isinstance(c, TimeRemainingColumn) for c in bar.columns)
    no_eta = progress_bar(remaining=False)
    assert not any(isinstance(c, TimeRemainingColumn) for c in no_eta.columns)
    a = bar.add_task("train", total=10, info="loss 0.1234")
    bar.add_task("evaluate", total=None)  # no info field: the column stays empty
    bar.update(a, completed=3)
    text = _render(bar)
    assert "train" in text and "3/10" in text and "loss 0.1234" in text and "evaluate" in text


def test_only_the_main_process_draws(monkeypatch):
    for rank, main in (("0", True), ("", True), ("1", False), ("7", False)):
        monkeypatch.setenv("RANK", rank)
        assert is_main_process() is main
        assert progress_bar().disable is not main
    monkeypatch.delenv("RANK")
    assert is_main_process() and not progress_bar().disable
    assert progress_bar(disable=True).disable
