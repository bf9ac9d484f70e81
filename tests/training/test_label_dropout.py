"""Label dropout for classifier-free / probabilistic guidance training (spec 4.5; oracle 43)."""

from __future__ import annotations

import math

import torch

from gmflow.training.data import drop_labels

NULL = 1000


def test_the_null_fraction_is_the_dropout_probability():
    torch.manual_seed(0)
    labels = torch.randint(0, NULL, (200_000,))
    out = drop_labels(labels, 0.1, NULL)
    dropped = out == NULL
    frac, n = float(dropped.float().mean()), labels.numel()
    assert abs(frac - 0.1) <= 4 * math.sqrt(0.1 * 0.9 / n)  # binomial band
    # kept labels are untouched, and a dropped one is exactly the null class
    assert torch.equal(out[~dropped], labels[~dropped])
    assert out.dtype == labels.dtype and out.shape == labels.shape


def test_drops_are_independent_of_the_class():
    torch.manual_seed(1)
    labels = torch.arange(4).repeat(50_000)  # four classes, 50k each
    out = drop_labels(labels, 0.25, NULL)
    for c in range(4):
        frac = float((out[labels == c] == NULL).float().mean())
        assert abs(frac - 0.25) <= 4 * math.sqrt(0.25 * 0.75 / 50_000)


def test_zero_probability_returns_the_labels_and_draws_nothing():
    labels = torch.tensor([3, 1, 4, 1, 5])
    state = torch.get_rng_state()
    assert drop_labels(labels, 0.0, NULL) is labels
    assert torch.equal(torch.get_rng_state(), state)  # the RNG stream (resume) is not advanced


def test_probability_one_drops_every_label():
    labels = torch.tensor([3, 1, 4, 1, 5])
    assert torch.equal(drop_labels(labels, 1.0, NULL), torch.full_like(labels, NULL))
