"""LR warm-up (spec 16 item 42) and the no-decay-on-biases parameter groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gmflow.errors import ConfigError
from gmflow.run_config import OptimConfig
from gmflow.training.optim import build_optimizer, lr_at, param_groups


def test_warmup_values_from_the_spec():
    cfg = OptimConfig(lr=2e-4, warmup_steps=1000, warmup_start_ratio=0.001)
    assert lr_at(cfg, 0) == pytest.approx(2e-7, rel=1e-12)
    assert lr_at(cfg, 500) == pytest.approx(1.0e-4, rel=2e-3)
    assert lr_at(cfg, 1000) == 2e-4 and lr_at(cfg, 10**6) == 2e-4
    assert all(lr_at(cfg, i) < lr_at(cfg, i + 1) for i in range(999))


def test_no_weight_decay_on_biases():
    model = nn.Sequential(
        nn.Linear(3, 4), nn.LayerNorm(4, elementwise_affine=False), nn.Linear(4, 1)
    )
    decay, no_decay = param_groups(model.named_parameters(), 0.05)
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[2].bias)}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    opt = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)


def test_adamw8bit_on_cpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        build_optimizer(nn.Linear(2, 2), OptimConfig(kind="adamw8bit"), torch.device("cpu"))
