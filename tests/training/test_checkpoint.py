"""Atomic checkpoints: round trip with weights_only, RNG restore, crash safety, pruning."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from gmflow.errors import CheckpointError
from gmflow.training import checkpoint as ckpt


def _save(tmp_path, step, value=1.0):
    return ckpt.save_checkpoint(
        tmp_path,
        step,
        model_state={"w": torch.full((2, 3), value)},
        ema_state={"w": torch.full((2, 3), value / 2)},
        train_state={"optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}}, "data": {"epoch": 2}},
    )


def test_round_trip_and_rng_restore(tmp_path):
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)
    path = _save(tmp_path, 10)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    loaded = ckpt.load_checkpoint(path)
    assert loaded["state"]["step"] == 10 and loaded["state"]["data"] == {"epoch": 2}
    torch.testing.assert_close(loaded["model"]["w"], torch.ones(2, 3))
    torch.testing.assert_close(loaded["ema"]["w"], torch.full((2, 3), 0.5))
    ckpt.set_rng_state(loaded["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(again[0], expected[0])
    np.testing.assert_array_equal(again[1], expected[1])
    assert again[2] == expected[2]


def test_crash_mid_save_keeps_previous(tmp_path, monkeypatch):
    _save(tmp_path, 1, value=1.0)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError):
        _save(tmp_path, 2, value=2.0)
    monkeypatch.undo()
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step-00000001"
    torch.testing.assert_close(ckpt.load_checkpoint(latest)["model"]["w"], torch.ones(2, 3))
    # a later save of the same step cleans the stale temp folder and succeeds
    _save(tmp_path, 2, value=2.0)
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000002"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_prune_keeps_last_and_milestones(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path, step)
    ckpt.prune_checkpoints(tmp_path, keep_last=2, milestones={2})
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 4, 5]


def test_incomplete_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "step-x").mkdir()
    with pytest.raises(
        CheckpointError, match="incomplete: expected model.safetensors and state.pt"
    ):
        ckpt.load_checkpoint(tmp_path / "step-x")
