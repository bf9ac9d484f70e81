"""Backend selection for the hot GM operations (one place; see the kernels issue).

Placeholder until the numba kernels land: every operation uses the torch reference.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor


def kernel_for(op: str, *tensors: Tensor) -> Callable[..., Tensor] | None:
    """Return a kernel implementing ``op`` for these tensors, or None to use the torch reference."""
    return None
