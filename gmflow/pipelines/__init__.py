"""Diffusers integration: ``GMDiTPipeline``, its schedulers and ``ModelMixin`` models (spec 10).

Thin adapters at the edge of the library (style guide): the sampling itself is
:func:`gmflow.flow.sample`, the networks are :mod:`gmflow.models`. The names below are loaded on
first access, so ``gmflow.pipelines.labels`` (class names, used by ``gmflow sample --run``) works
without diffusers installed; the Diffusers classes import it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GMDiTPipeline": "gmflow.pipelines.pipeline",
    "GMDiTTransformer2DModel": "gmflow.pipelines.models",
    "SpectrumMLPModel": "gmflow.pipelines.models",
    "FlowEulerODEScheduler": "gmflow.pipelines.schedulers",
    "FlowSDEScheduler": "gmflow.pipelines.schedulers",
    "LabelIndex": "gmflow.pipelines.labels",
    "imagenet_id2label": "gmflow.pipelines.labels",
    "OFFICIAL_HUB_ID": "gmflow.pipelines.loading",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gmflow.pipelines' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
