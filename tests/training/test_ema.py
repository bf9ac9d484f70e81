"""EMA schedules (spec 16 item 41) and the fp32 shadow update."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gmflow.training.ema import EMA, EMASchedule, ema_beta


def test_rampup_values_from_the_spec():
    sched = EMASchedule(kind="rampup", ema_kimg=30000, rampup=0.05, batch_size=4096)
    assert ema_beta(sched, 0) == pytest.approx(0.5**20, rel=1e-12)
    assert ema_beta(sched, 199) == pytest.approx(0.5**0.1, rel=1e-12)
    assert ema_beta(sched, 146484) == pytest.approx(0.5 ** (4096 / 3e7), rel=1e-12)
    assert ema_beta(sched, 10**6) == pytest.approx(0.9999054, abs=1e-7)


@pytest.mark.parametrize("step", [0, 1, 9, 100])
def test_karras_values(step):
    sched = EMASchedule(kind="karras", gamma=7)
    assert ema_beta(sched, step) == pytest.approx((1 - 1 / (step + 1)) ** 8, rel=1e-12)


def test_update_is_a_lerp_in_fp32_and_loads_back():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(torch.bfloat16)
    ema = EMA(model, EMASchedule(kind="constant", beta=0.75))
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    beta = ema.update(model, step=0)
    assert beta == 0.75
    for name, p in model.named_parameters():
        assert ema.shadow[name].dtype == torch.float32
        expected = 0.75 * before[name] + 0.25 * p.float()
        torch.testing.assert_close(ema.shadow[name], expected)
    fresh = nn.Linear(3, 2)
    ema.load_into(fresh)
    torch.testing.assert_close(fresh.weight, ema.shadow["weight"])


def test_karras_first_update_copies_the_weights():
    model = nn.Linear(2, 2)
    ema = EMA(model, EMASchedule(kind="karras"))
    with torch.no_grad():
        model.weight.fill_(3.0)
    assert ema.update(model, step=0) == 0.0
    assert torch.all(ema.shadow["weight"] == 3.0)
    assert math.isfinite(ema.last_beta)
