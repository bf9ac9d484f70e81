"""Shape broadcasting without torch's symbolic-shape machinery.

``torch.broadcast_shapes`` runs through ``torch._refs`` with symbolic-shape guards: ~15-30 µs of
host time per call, and the GM ops call it on every shape check (80+ calls per guided GM-SDE step,
a visible share of a sampling step on a GPU). This is the same rule on plain ints, cached.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

__all__ = ["broadcast_shapes"]


@functools.lru_cache(maxsize=4096)
def _broadcast(shapes: tuple[tuple[int, ...], ...]) -> torch.Size:
    ndim = max((len(s) for s in shapes), default=0)
    out = [1] * ndim
    for shape in shapes:
        offset = ndim - len(shape)
        for i, size in enumerate(shape):
            if size < 0:
                raise RuntimeError(f"broadcast_shapes: negative dimension in {shape}")
            current = out[offset + i]
            if current == 1:
                out[offset + i] = size
            elif size != 1 and size != current:
                raise RuntimeError(
                    f"Shape mismatch: objects cannot be broadcast to a single shape: {shapes}"
                )
    return torch.Size(out)


def broadcast_shapes(*shapes: Sequence[int]) -> torch.Size:
    """``torch.broadcast_shapes`` for concrete shapes (raises ``RuntimeError`` the same way)."""
    return _broadcast(tuple(tuple(int(d) for d in s) for s in shapes))
