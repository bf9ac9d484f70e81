"""Every training recipe loads into RunConfig; the paper settings are those of spec 11.1."""

from __future__ import annotations

from pathlib import Path

import pytest

from gmflow.config import load_recipe
from gmflow.run_config import RunConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TRAIN_RECIPES = [
    "imagenet256_gmdit_b2_k8.yaml",
    "imagenet256_gmdit_xl2_k8.yaml",
    "digits_gmdit_tiny.yaml",
    "toy_checkerboard_k64_train.yaml",
]


@pytest.mark.parametrize("name", TRAIN_RECIPES)
def test_training_recipe_loads(name):
    cfg = load_recipe(RECIPES / name, RunConfig)
    assert (
        cfg.train.global_batch_size % (cfg.train.batch_size_per_device * cfg.train.grad_accum_steps)
        == 0
    )


@pytest.mark.parametrize("name", ["imagenet256_gmdit_b2_k8.yaml", "imagenet256_gmdit_xl2_k8.yaml"])
def test_imagenet_recipes_hold_the_paper_settings(name):
    cfg = load_recipe(RECIPES / name, RunConfig)
    assert cfg.world_size() == 8 and cfg.train.batch_size_per_device == 512
    assert cfg.train.global_batch_size == 4096 and cfg.train.max_steps == 200_000
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay) == (2e-4, (0.9, 0.95), 0.05)
    assert (cfg.optim.warmup_steps, cfg.optim.grad_clip, cfg.optim.grad_clip_from_step) == (
        1000,
        10.0,
        1000,
    )
    assert cfg.data.label_dropout == 0.1 and cfg.loss.timesteps == "logit_normal"
    assert cfg.loss.trans_ratio == 0.5 and cfg.model.use_spectrum_net
    assert (cfg.ema.kind, cfg.ema.ema_kimg, cfg.ema.rampup) == ("rampup", 30000, 0.05)
    assert cfg.train.precision == "bf16" and cfg.model.num_gaussians == 8


def test_digits_recipe_keeps_digits_unflipped():
    cfg = load_recipe(RECIPES / "digits_gmdit_tiny.yaml", RunConfig)
    assert (
        cfg.data.random_flip is False and cfg.model.in_channels == 3 and cfg.model.num_classes == 10
    )


def test_toy_training_recipe_holds_the_spec_4_7_settings():
    cfg = load_recipe(RECIPES / "toy_checkerboard_k64_train.yaml", RunConfig)
    assert (cfg.model.arch, cfg.model.num_gaussians, cfg.data.kind) == ("mlp2d", 64, "checkerboard")
    assert (cfg.loss.trans_ratio, cfg.loss.timesteps, cfg.ema.kind, cfg.ema.gamma) == (
        0.9,
        "uniform",
        "karras",
        7.0,
    )
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.train.global_batch_size) == (2e-4, 0.0, 4096)
