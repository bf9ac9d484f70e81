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


@pytest.mark.parametrize(
    ("value", "dtype"),
    [(0.5, None), (3, None), (True, None), (0.25, torch.float64), (2, torch.float32)],
)
def test_as_scalar_tensor_matches_as_tensor(value, dtype) -> None:
    from gmflow.gm.mixture import as_scalar_tensor

    got, want = as_scalar_tensor(value, dtype=dtype), torch.as_tensor(value, dtype=dtype)
    assert got.dtype == want.dtype and got.shape == want.shape and bool(got == want)
    t = torch.arange(3.0)
    assert as_scalar_tensor(t) is t  # tensors pass through without a copy
    assert torch.equal(as_scalar_tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
