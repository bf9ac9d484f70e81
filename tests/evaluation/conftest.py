"""Evaluation test fixtures: a tiny random pipeline, random Inception weights, a stub extractor.

The Inception-v3 of torch-fidelity runs at 299 x 299 (about 0.6 s per image on the 2-core CI
machine), so most tests use :class:`StubExtractor` (an injected extractor, as ``evaluate``
allows) and the real network with random weights only runs in a few ``slow`` tests on few images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor


class StubExtractor:
    """A cheap, deterministic, image-dependent stand-in for Inception (8 x 8 pooled pixels).

    pool = tanh(P x) with x the image average-pooled to 8 x 8 in [0, 1] (192 values) and P a fixed
    Gaussian (16, 192) matrix; logits = L pool with L (10, 16).
    """

    extractor_id = "stub-extractor/1"

    def __init__(self, dim: int = 16) -> None:
        g = torch.Generator().manual_seed(1234)
        self.proj = torch.randn(192, dim, generator=g, dtype=torch.float64) / 4
        self.head = torch.randn(dim, 10, generator=g, dtype=torch.float64)
        self.calls = 0

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        self.calls += 1
        x = torch.nn.functional.adaptive_avg_pool2d(images.double() / 255, 8).flatten(1)
        pool = torch.tanh(x @ self.proj)
        return pool.float(), (pool @ self.head).float()


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


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torch-fidelity's Inception-v3 with Kaiming-random convolutions, saved once per session."""
    from gmflow.evaluation.fid import write_random_inception_weights

    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "random.pth")


@pytest.fixture(scope="session")
def reference_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 smooth random 8 x 8 RGB images as an ADM-style reference batch (arr_0)."""
    rng = np.random.default_rng(7)
    low = rng.uniform(0, 255, (24, 2, 2, 3))
    images = np.kron(low, np.ones((1, 4, 4, 1))) + rng.normal(0, 20, (24, 8, 8, 3))
    path = tmp_path_factory.mktemp("reference") / "ref.npz"
    np.savez(path, arr_0=images.clip(0, 255).astype(np.uint8))
    return path


@pytest.fixture
def stub() -> StubExtractor:
    return StubExtractor()
