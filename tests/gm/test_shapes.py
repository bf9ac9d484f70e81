"""gmflow.gm._shapes.broadcast_shapes against torch.broadcast_shapes."""

import random

import pytest
import torch

from gmflow.gm._shapes import broadcast_shapes


def _random_shape(rng: random.Random) -> tuple[int, ...]:
    return tuple(rng.choice([0, 1, 1, 2, 3]) for _ in range(rng.randint(0, 4)))


def test_matches_torch_on_random_shapes() -> None:
    rng = random.Random(0)
    checked_errors = 0
    for _ in range(2000):
        shapes = [_random_shape(rng) for _ in range(rng.randint(1, 3))]
        try:
            want = torch.broadcast_shapes(*shapes)
        except RuntimeError:
            with pytest.raises(RuntimeError):
                broadcast_shapes(*shapes)
            checked_errors += 1
            continue
        got = broadcast_shapes(*shapes)
        assert got == want and isinstance(got, torch.Size)
    assert checked_errors > 100  # both branches exercised


def test_accepts_torch_sizes_and_no_shapes() -> None:
    assert broadcast_shapes(torch.Size([2, 1]), (3,)) == torch.Size([2, 3])
    assert broadcast_shapes() == torch.Size([])
