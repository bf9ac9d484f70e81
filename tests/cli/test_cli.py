"""The CLI root: help, version, module entry, and the error mapping of library errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

import gmflow
from gmflow.errors import ConfigError
from gmflow_cli import main as cli_main

runner = CliRunner()


def test_help_and_version():
    result = runner.invoke(cli_main.app, ["--help"])
    assert result.exit_code == 0 and "Gaussian Mixture Flow Matching" in result.output
    result = runner.invoke(cli_main.app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"gmflow {gmflow.__version__}"


def test_python_dash_m_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "gmflow_cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == f"gmflow {gmflow.__version__}"


def test_import_gmflow_and_help_do_not_import_torch():
    code = "import sys, gmflow, gmflow.config, gmflow_cli.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture
def failing_app(monkeypatch):
    app = typer.Typer()

    @app.command()
    def boom() -> None:
        raise ConfigError("recipe.yaml: unknown key 'train.lrr'")

    @app.command()
    def other() -> None:
        pass

    monkeypatch.setattr(cli_main, "app", app)
    return app


def test_library_error_maps_to_exit_1_and_stderr(failing_app, capsys, monkeypatch):
    monkeypatch.delenv("GMFLOW_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exc:
        cli_main.main(["boom"])
    assert exc.value.code == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == "error: recipe.yaml: unknown key 'train.lrr'"
    assert "Traceback" not in captured.err


def test_debug_env_reraises(failing_app, monkeypatch):
    monkeypatch.setenv("GMFLOW_DEBUG", "1")
    with pytest.raises(ConfigError, match="unknown key"):
        cli_main.main(["boom"])


def test_usage_error_is_exit_2():
    env = dict(os.environ)
    out = subprocess.run(
        [sys.executable, "-m", "gmflow_cli", "--no-such-option"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 2
