"""The trainer: the loss falls, bad input fails before step 0, resume is exact (after a kill)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gmflow.config import dump_recipe, from_dict
from gmflow.errors import ConfigError, DataError, DivergenceError
from gmflow.run_config import RunConfig
from gmflow.training import train
from gmflow.training.checkpoint import latest_checkpoint, list_checkpoints
from gmflow.training.loop import tf32_mode

TINY = {
    "model": {
        "arch": "mlp2d",
        "num_gaussians": 4,
        "in_channels": 2,
        "sample_size": 1,
        "use_spectrum_net": False,
        "hidden_dim": 32,
        "num_layers": 2,
    },
    "data": {"kind": "checkerboard"},
    "loss": {"timesteps": "uniform", "trans_ratio": 0.9, "loss_scale": 2.0},
    "optim": {"lr": 2e-3, "warmup_steps": 5, "weight_decay": 0.0, "grad_clip_from_step": 0},
    "ema": {"kind": "karras"},
    "validation": {"every": 0},
    "train": {
        "max_steps": 12,
        "global_batch_size": 256,
        "batch_size_per_device": 256,
        "device": "cpu",
        "precision": "fp32",
        "checkpoint_every": 4,
        "checkpoint_milestones": [],
        "keep_last": 100,
        "log_every": 2,
        "use_tensorboard": False,
    },
}


def tiny(**train_overrides) -> RunConfig:
    cfg = from_dict(TINY, RunConfig)
    return replace(cfg, train=replace(cfg.train, **train_overrides))


def _weights(run_dir: Path, step: int | None = None) -> tuple[dict, dict]:
    ckpts = dict(list_checkpoints(run_dir))
    path = ckpts[step] if step is not None else latest_checkpoint(run_dir)
    return load_file(path / "model.safetensors"), load_file(path / "ema.safetensors")


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_loss_falls_and_logs_are_written(tmp_path):
    cfg = tiny(max_steps=60, log_every=10, checkpoint_every=60)
    result = train(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    for key in ("loss_trans", "lr", "grad_norm", "ema_beta", "samples_per_s", "gm_std", "loss_q0"):
        assert key in rows[-1]
    assert result.final_step == 60 and (tmp_path / "config.yaml").is_file()


def test_resume_in_process_is_bit_identical(tmp_path):
    train(tiny(), tmp_path / "straight")
    train(tiny(), tmp_path / "split", stop_after=6)  # checkpoints at 4 and 6
    assert [s for s, _ in list_checkpoints(tmp_path / "split")] == [4, 6]
    train(tiny(), tmp_path / "split")
    for step in (8, 12):
        for a, b in zip(
            _weights(tmp_path / "straight", step), _weights(tmp_path / "split", step), strict=True
        ):
            _assert_identical(a, b)
    rows = [
        json.loads(x)["step"] for x in (tmp_path / "split/metrics.jsonl").read_text().splitlines()
    ]
    assert rows == [2, 4, 6, 8, 10, 12]  # no duplicated or lost rows


def _cli(run_dir: Path, recipe: Path, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "gmflow_cli", "train", str(recipe), "--out-dir", str(run_dir)]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [
        torchrun,
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "gmflow_cli",
        "train",
        str(recipe),
        "--out-dir",
        str(run_dir),
    ]


def _kill_after_first_checkpoint(cmd: list[str], run_dir: Path, env: dict) -> None:
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.time() + 120
    while not list_checkpoints(run_dir):
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"run ended before its first checkpoint: {proc.stderr.read()!r}")
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert list_checkpoints(run_dir)[-1][0] < 200, "the run finished before it could be killed"


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_then_restart_is_bit_identical(tmp_path, nproc):
    per_device = 256 // nproc
    cfg = tiny(max_steps=200, checkpoint_every=5, log_every=50, batch_size_per_device=per_device)
    recipe = tmp_path / "recipe.yaml"
    dump_recipe(cfg, recipe)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        _cli(tmp_path / "straight", recipe, nproc), env=env, check=True, capture_output=True
    )
    _kill_after_first_checkpoint(_cli(tmp_path / "killed", recipe, nproc), tmp_path / "killed", env)
    subprocess.run(
        _cli(tmp_path / "killed", recipe, nproc), env=env, check=True, capture_output=True
    )
    for a, b in zip(_weights(tmp_path / "straight"), _weights(tmp_path / "killed"), strict=True):
        _assert_identical(a, b)


def test_world_size_mismatch_is_caught_before_step_0(tmp_path):
    cfg = tiny(global_batch_size=512)  # needs 2 processes
    with pytest.raises(
        ConfigError, match=r"needs 2 processes, but this run has 1.*grad_accum_steps=2"
    ):
        train(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_gpu_only_options_on_cpu(tmp_path):
    with pytest.raises(ConfigError, match="CUDA is not available"):
        train(tiny(device="cuda"), tmp_path)
    with pytest.raises(ConfigError, match="compile=true is a GPU option"):
        train(tiny(compile=True), tmp_path)
    with pytest.raises(ConfigError, match="tf32=true is a GPU option"):
        train(tiny(tf32=True), tmp_path)


def test_tf32_mode_sets_the_cuda_flags_inside_and_restores_them():
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # noqa: E731
    before = flags()
    with tf32_mode(True, torch.device("cuda", 0)):
        assert flags() == (True, True)
    assert flags() == before
    with tf32_mode(True, torch.device("cpu")), tf32_mode(False, torch.device("cuda")):
        assert flags() == before  # CPU, or off: nothing changes


def test_missing_shards_fail_before_step_0(tmp_path):
    data = {
        **TINY,
        "model": {
            "arch": "gmdit",
            "preset": "custom",
            "hidden_size": 32,
            "depth": 1,
            "num_heads": 2,
            "in_channels": 1,
            "sample_size": 8,
            "num_classes": 10,
            "use_spectrum_net": False,
        },
        "data": {"kind": "shards", "path": str(tmp_path / "nope"), "num_workers": 0},
    }
    cfg = from_dict(data, RunConfig)
    with pytest.raises(DataError):
        train(cfg, tmp_path / "run")


def test_consecutive_non_finite_gradients_raise(tmp_path, monkeypatch):
    from gmflow.training import build

    original = build.GMFlowObjective.forward

    def nan_forward(self, x0, labels):
        out = original(self, x0, labels)
        return {**out, "loss": out["loss"] * float("nan")}

    monkeypatch.setattr(build.GMFlowObjective, "forward", nan_forward)
    cfg = tiny()
    cfg = replace(cfg, optim=replace(cfg.optim, max_consecutive_skips=3))
    with pytest.raises(
        DivergenceError, match="step 2: 3 consecutive steps had non-finite gradients"
    ):
        train(cfg, tmp_path)


def test_a_batch_that_does_not_divide_is_a_recipe_error():
    bad = {**TINY, "train": {**TINY["train"], "global_batch_size": 300}}
    with pytest.raises(ConfigError, match="global_batch_size=300 is not a multiple of"):
        from_dict(bad, RunConfig, source="recipe.yaml")


def test_data_whose_shape_the_model_does_not_take_fails_before_step_0(tmp_path):
    import numpy as np
    from PIL import Image

    from gmflow.data.cache import CacheConfig, cache_latents

    (tmp_path / "img" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img" / "a" / "x.png")
    cache_latents(
        CacheConfig(source=tmp_path / "img", out_dir=tmp_path / "data", vae="none", resolution=8)
    )
    data = {
        **TINY,
        "model": {
            "arch": "gmdit",
            "preset": "custom",
            "hidden_size": 32,
            "depth": 1,
            "num_heads": 2,
            "in_channels": 4,
            "sample_size": 8,
            "num_classes": 1,
            "use_spectrum_net": False,
        },
        "data": {"kind": "shards", "path": str(tmp_path / "data"), "num_workers": 0},
    }
    with pytest.raises(DataError, match=r"shape \(3, 8, 8\).*the model expects \(4, 8, 8\)"):
        train(from_dict(data, RunConfig), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
