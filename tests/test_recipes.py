"""Every training recipe loads into RunConfig; the paper settings are those of spec 11.1."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gmflow.config import load_recipe
from gmflow.run_config import RunConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TRAIN_RECIPES = [
    "imagenet256_gmdit_b2_k8.yaml",
    "imagenet256_gmdit_xl2_k8.yaml",
    "digits_gmdit_tiny.yaml",
    "toy_checkerboard_k64.yaml",
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
    e = cfg.online_eval  # spec 11.1: GM-ODE 2, w = 0.04, 16 x 8 steps, 50k samples, 125 per GPU
    assert e.every == 0 and e.reference is None  # off until a reference set is given
    assert (e.solver, e.num_steps, e.num_substeps, e.guidance_scale) == ("gm-ode2", 16, 8, 0.04)
    assert (e.num_samples, e.batch_size) == (50_000, 125)
    on = load_recipe(
        RECIPES / name, RunConfig, ["online_eval.every=20000", "online_eval.reference=ref.npz"]
    )
    assert on.online_eval.every == 20_000 and on.online_eval.reference == "ref.npz"


def test_digits_recipe_keeps_digits_unflipped():
    cfg = load_recipe(RECIPES / "digits_gmdit_tiny.yaml", RunConfig)
    assert (
        cfg.data.random_flip is False and cfg.model.in_channels == 3 and cfg.model.num_classes == 10
    )


def test_toy_recipe_holds_the_spec_4_7_settings_at_the_toy_budget():
    # one file for `gmflow train` and `gmflow toy` (tests/test_toy.py checks the toy side)
    cfg = load_recipe(RECIPES / "toy_checkerboard_k64.yaml", RunConfig)
    assert (cfg.model.arch, cfg.model.num_gaussians, cfg.data.kind) == ("mlp2d", 64, "checkerboard")
    assert (cfg.loss.trans_ratio, cfg.loss.timesteps, cfg.ema.kind, cfg.ema.gamma) == (
        0.9,
        "uniform",
        "karras",
        7.0,
    )
    assert (cfg.optim.weight_decay, cfg.train.global_batch_size, cfg.world_size()) == (0.0, 4096, 1)
    # the `gmflow toy` budget; the comments give the paper's settings as --set items
    assert (cfg.model.hidden_dim, cfg.optim.lr, cfg.optim.betas) == (128, 1e-3, (0.9, 0.99))
    assert (cfg.optim.warmup_steps, cfg.train.max_steps, cfg.train.precision) == (200, 1500, "auto")
    assert cfg.toy is not None and cfg.toy.eval.nfes == (1, 2, 4, 8, 16, 32)


def test_toy_recipe_comment_gives_the_paper_settings():
    from gmflow.config import apply_overrides

    text = (RECIPES / "toy_checkerboard_k64.yaml").read_text()
    items = [
        "model.hidden_dim=512",
        "optim.lr=2e-4",
        "optim.betas=[0.9, 0.999]",
        "optim.warmup_steps=1000",
        "train.max_steps=200000",
    ]
    assert all(item in text for item in items)
    cfg = apply_overrides(load_recipe(RECIPES / "toy_checkerboard_k64.yaml", RunConfig), items)
    assert (cfg.model.hidden_dim, cfg.optim.lr, cfg.optim.betas) == (512, 2e-4, (0.9, 0.999))
    assert (cfg.optim.warmup_steps, cfg.train.max_steps) == (1000, 200_000)


def test_gmflow_train_dry_run_of_the_toy_recipe():
    from typer.testing import CliRunner

    from gmflow.config import from_dict
    from gmflow_cli.main import app

    recipe = RECIPES / "toy_checkerboard_k64.yaml"
    result = CliRunner().invoke(
        app, ["train", str(recipe), "--dry-run", "--set", "train.max_steps=20"]
    )
    assert result.exit_code == 0, result.output
    assert "runs/toy_checkerboard_k64" in result.output
    cfg = from_dict(yaml.safe_load(result.output), RunConfig)
    assert cfg == load_recipe(recipe, RunConfig, ["train.max_steps=20"])


def test_precision_auto_is_fp32_for_the_trainer_on_cpu():
    import contextlib

    import torch

    from gmflow.training.loop import _autocast

    cfg = load_recipe(RECIPES / "toy_checkerboard_k64.yaml", RunConfig)
    assert cfg.train.precision == "auto"
    assert isinstance(_autocast(cfg, torch.device("cpu")), contextlib.nullcontext)


def test_gmflow_train_runs_the_toy_recipe(tmp_path):
    # the trainer reads the toy recipe (and ignores its toy: section)
    from gmflow.training import train

    cfg = load_recipe(
        RECIPES / "toy_checkerboard_k64.yaml",
        RunConfig,
        [
            "model.hidden_dim=16",
            "train.max_steps=2",
            "train.batch_size_per_device=64",
            "train.global_batch_size=64",
            "train.use_tensorboard=false",
        ],
    )
    result = train(cfg, tmp_path / "run")
    assert result.final_step == 2 and result.last_checkpoint is not None
    assert load_recipe(tmp_path / "run" / "config.yaml", RunConfig) == cfg
