"""Validation grids during training: latent grids are decoded with the dataset's VAE."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gmflow.data.manifest import Manifest
from gmflow.errors import CheckpointError
from gmflow.run_config import DataConfig, ModelConfig, RunConfig, ValidationConfig
from gmflow.training.build import build_objective
from gmflow.training.validation import load_validation_vae, save_validation_grid

CPU = torch.device("cpu")


def _vae_folder(root: Path) -> Path:
    """A random 2-block AutoencoderKL (x2 down-sampling, 4 latent channels) saved to disk."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
    )  # fmt: skip
    vae.save_pretrained(root)
    return root


def _dataset(root: Path, mode: str, encoder: str | None) -> Path:
    root.mkdir(parents=True)
    manifest = Manifest(
        mode=mode, num_samples=0, shards=(), classes={0: "a", 1: "b"}, resolution=16,
        sample_shape=(4, 8, 8) if mode == "latent" else (3, 16, 16),
        stored_dtype="float16" if mode == "latent" else "uint8", encoder=encoder,
        scaling_factor=0.18215 if mode == "latent" else 1.0, channel_mean=(0.0,) * 4,
        channel_std=(1.0,) * 4,
    )  # fmt: skip
    (root / "manifest.json").write_text(manifest.to_json())
    return root


def _cfg(data: Path, vae: str = "auto", every: int = 10) -> RunConfig:
    return RunConfig(
        model=ModelConfig(
            preset="custom", hidden_size=16, depth=1, num_heads=2, num_gaussians=2,
            in_channels=4, sample_size=8, num_classes=2, logstd_inner_dim=8, spectrum_layers=(8,),
        ),
        data=DataConfig(kind="shards", path=str(data)),
        validation=ValidationConfig(every=every, num_images=4, num_steps=2, num_substeps=2,
                                    vae=vae),
    )  # fmt: skip


def test_auto_loads_the_vae_named_by_a_latent_dataset(tmp_path):
    folder = _vae_folder(tmp_path / "vae")
    vae = load_validation_vae(_cfg(_dataset(tmp_path / "d", "latent", str(folder))), CPU)
    assert vae is not None and vae.scaling_factor > 0
    pixel = _cfg(_dataset(tmp_path / "p", "pixel", None))
    assert load_validation_vae(pixel, CPU) is None
    assert load_validation_vae(_cfg(tmp_path / "d", vae="none"), CPU) is None
    assert load_validation_vae(_cfg(tmp_path / "d", every=0), CPU) is None  # no grids at all


def test_auto_warns_and_shows_latents_when_the_vae_cannot_load(tmp_path, caplog):
    cfg = _cfg(_dataset(tmp_path / "d", "latent", str(tmp_path / "gone")))
    with caplog.at_level(logging.WARNING, logger="gmflow.training.validation"):
        assert load_validation_vae(cfg, CPU) is None
    assert "latent channels" in caplog.text and "validation.vae" in caplog.text


def test_an_explicit_vae_that_cannot_load_fails_before_training(tmp_path):
    cfg = _cfg(_dataset(tmp_path / "d", "latent", None), vae=str(tmp_path / "gone"))
    with pytest.raises(CheckpointError, match="gone"):
        load_validation_vae(cfg, CPU)


class _Log:
    def __init__(self) -> None:
        self.images: list[np.ndarray] = []

    def add_image(self, tag, image, step):  # type: ignore[no-untyped-def]
        self.images.append(image)


def test_latent_grids_are_decoded_to_images(tmp_path):
    folder = _vae_folder(tmp_path / "vae")
    cfg = _cfg(_dataset(tmp_path / "d", "latent", str(folder)))
    objective = build_objective(cfg)
    vae = load_validation_vae(cfg, CPU)
    log = _Log()
    decoded = save_validation_grid(cfg, objective, None, tmp_path / "run", 10, CPU, log, vae)
    latent = save_validation_grid(
        replace(cfg, validation=replace(cfg.validation, vae="none")), objective, None,
        tmp_path / "run2", 10, CPU, log, None,
    )  # fmt: skip
    # 4 images in a 2x2 grid: 16x16 decoded (the VAE up-samples x2) vs 8x8 latent channels
    assert np.asarray(Image.open(decoded)).shape == (32, 32, 3)
    assert np.asarray(Image.open(latent)).shape == (16, 16, 3)
    assert [im.shape for im in log.images] == [(32, 32, 3), (16, 16, 3)]
