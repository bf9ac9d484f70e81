"""Exceptions raised by gmflow; the CLI maps every GMFlowError to ``error: <message>``, exit 1."""

from __future__ import annotations

__all__ = ["GMFlowError", "ConfigError", "DataError", "CheckpointError", "DivergenceError"]


class GMFlowError(Exception):
    """Base class of the errors gmflow raises for bad input or state (never for its own bugs)."""


class ConfigError(GMFlowError):
    """A recipe, override or option is invalid: names the key, what was expected and found."""


class DataError(GMFlowError):
    """Input data (images, shards, manifests, references) is missing, corrupt or inconsistent."""


class CheckpointError(GMFlowError):
    """A checkpoint or pretrained folder cannot be found, read or matched to the model."""


class DivergenceError(GMFlowError):
    """Training diverged (non-finite loss or gradients); carries the step where it happened."""

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message if step is None else f"step {step}: {message}")
        self.step = step
