"""Evaluation test fixtures: a tiny random pipeline (the stub extractor, random Inception weights
and the reference batch are in tests/conftest.py, shared with the online-evaluation tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def make_tiny_pipeline(folder: Path, seed: int = 0, num_classes: int = 10) -> Path:
    """A pixel-space GM-DiT pipeline (3 x 8 x 8 images, K = 2, one block) with random weights."""
    from gmflow.pipelines import (
        FlowEulerODEScheduler,
        GMDiTPipeline,
        GMDiTTransformer2DModel,
        SpectrumMLPModel,
    )

    torch.manual_seed(seed)
    transformer = GMDiTTransformer2DModel(
        num_gaussians=2, logstd_inner_dim=8, num_attention_heads=2, attention_head_dim=8,
        in_channels=3, num_layers=1, sample_size=8, num_embeds_ada_norm=num_classes,
    )  # fmt: skip
    spectrum = SpectrumMLPModel(base_size=(3, 8, 8), layers=(8,))
    for p in [*transformer.parameters(), *spectrum.parameters()]:
        p.data.normal_(0, 0.05)
    GMDiTPipeline(
        transformer=transformer, scheduler=FlowEulerODEScheduler(), spectrum_net=spectrum
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny_pipeline"))
