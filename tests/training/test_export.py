"""Train a tiny pixel-space GM-DiT on shards, export it, and sample the exported pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from gmflow.config import from_dict
from gmflow.run_config import RunConfig
from gmflow.training import train
from gmflow.training.build import load_run
from gmflow_cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory, pixel_shards):
    root = tmp_path_factory.mktemp("export")
    cfg = from_dict(
        {
            "model": {
                "arch": "gmdit",
                "preset": "custom",
                "hidden_size": 32,
                "depth": 2,
                "num_heads": 2,
                "patch_size": 2,
                "num_gaussians": 3,
                "in_channels": 3,
                "sample_size": 8,
                "num_classes": 3,
                "logstd_inner_dim": 16,
                "use_spectrum_net": True,
            },
            "data": {
                "kind": "shards",
                "path": str(pixel_shards),
                "num_workers": 0,
                "shuffle_buffer": 16,
                "random_flip": False,
            },
            "optim": {"lr": 1e-3, "warmup_steps": 2, "grad_clip_from_step": 0},
            "ema": {"kind": "karras"},
            "validation": {"every": 3, "num_steps": 2, "num_substeps": 2, "num_images": 4},
            "train": {
                "max_steps": 3,
                "global_batch_size": 8,
                "batch_size_per_device": 8,
                "device": "cpu",
                "precision": "fp32",
                "checkpoint_every": 3,
                "checkpoint_milestones": [],
                "log_every": 1,
                "use_tensorboard": False,
            },
        },
        RunConfig,
    )
    train(cfg, root / "run")
    return root


def test_export_then_load_reproduces_the_run_weights(pixel_run, tmp_path):
    from gmflow.pipelines import GMDiTPipeline

    result = runner.invoke(app, ["export", str(pixel_run / "run"), str(tmp_path / "pipe")])
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["vae"] == [None, None] and index["id2label"] == {
        "0": "class0",
        "1": "class1",
        "2": "class2",
    }
    pipe = GMDiTPipeline.from_pretrained(tmp_path / "pipe")
    _, denoiser, spectrum_net = load_run(pixel_run / "run")
    x = torch.randn(2, 3, 8, 8)
    sigma, labels = torch.tensor([0.3, 0.9]), torch.tensor([0, 3])
    a, b = denoiser(x, sigma, labels), pipe.transformer(x, sigma, labels)
    torch.testing.assert_close(a.means, b.means, rtol=0, atol=0)
    torch.testing.assert_close(a.logstds, b.logstds, rtol=0, atol=0)
    for p, q in zip(
        spectrum_net.state_dict().values(), pipe.spectrum_net.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q)
    assert (pixel_run / "run" / "samples" / "step-00000003.png").is_file()  # validation grid


def test_sample_from_the_exported_pipeline(pixel_run, tmp_path):
    assert (
        runner.invoke(app, ["export", str(pixel_run / "run"), str(tmp_path / "pipe")]).exit_code
        == 0
    )
    result = runner.invoke(
        app,
        [
            "sample",
            "--pretrained",
            str(tmp_path / "pipe"),
            "--solver",
            "gm-sde2",
            "--class-ids",
            "0",
            "2",
            "--num-per-class",
            "2",
            "--steps",
            "2",
            "--guidance",
            "0.3",
            "--out-dir",
            str(tmp_path / "samples"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "samples").glob("sample-*.png"))) == 4


def test_export_of_a_missing_run_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert result.exit_code != 0


def test_export_picks_a_checkpoint_by_step(pixel_run, tmp_path):
    args = ["export", str(pixel_run / "run"), str(tmp_path / "pipe"), "--step", "3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*args[:3], "--step", "2"])
    assert result.exit_code != 0  # main() turns the CheckpointError into `error: ...`, exit 1
    message = str(result.exception)
    assert "no complete checkpoint at step 2" in message and "[3]" in message
