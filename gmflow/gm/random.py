"""Random draws from one generator, or from one generator per sample (row).

Per-row generators make a sample's randomness depend on its own seed only, so results do not
change with the batch size or the number of processes: ``torch.Generator().manual_seed(seed + i)``
for row i. A single generator (or None, the global RNG) draws the whole tensor at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor

__all__ = ["Generators", "randn", "rand", "categorical", "row_generators"]

Generators = Union[torch.Generator, Sequence[torch.Generator], None]  # noqa: UP007


def _per_row(name: str, shape: tuple[int, ...], generators: Sequence[torch.Generator]) -> list:
    gens = list(generators)
    if not shape or len(gens) != shape[0]:
        raise ValueError(
            f"{name}: got {len(gens)} generators for a draw of shape {tuple(shape)}; pass one "
            "generator per row (the leading batch dim) or a single torch.Generator"
        )
    return gens


def _draw(fn, name: str, shape: Sequence[int], generator: Generators, device, dtype) -> Tensor:  # type: ignore[no-untyped-def]
    shape = tuple(shape)
    if generator is None or isinstance(generator, torch.Generator):
        return fn(shape, generator=generator, device=device, dtype=dtype)
    gens = _per_row(name, shape, generator)
    rows = [fn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in gens]
    return torch.stack(rows).to(device)


def randn(
    shape: Sequence[int],
    generator: Generators,
    *,
    device: torch.device | str | None,
    dtype: torch.dtype,
) -> Tensor:
    """Standard normal draws of ``shape``; row i from ``generator[i]`` when a sequence is given."""
    return _draw(torch.randn, "randn", shape, generator, device, dtype)


def rand(
    shape: Sequence[int],
    generator: Generators,
    *,
    device: torch.device | str | None,
    dtype: torch.dtype,
) -> Tensor:
    """Uniform [0, 1) draws of ``shape``; row i from ``generator[i]`` when a sequence is given."""
    return _draw(torch.rand, "rand", shape, generator, device, dtype)


def categorical(logweights: Tensor, n: int, generator: Generators) -> Tensor:
    """n draws of a component index per pixel from normalised log-weights (..., K, H, W).

    One uniform per draw, (..., H, W, n), through the inverse CDF of the weights. A zero-weight
    component (an empty bin, e.g. after a temperature τ -> 0) is never drawn, not even for u = 0.

    Returns:
        int64 indices (..., n, H, W).
    """
    k, h, w = logweights.shape[-3:]
    cdf = logweights.movedim(-3, -1).softmax(-1).cumsum(-1).contiguous()  # (..., H, W, K)
    u = rand((*cdf.shape[:-1], n), generator, device=cdf.device, dtype=cdf.dtype)
    u = u * cdf[..., -1:]  # guard rounding of the last bin
    # right=True picks the k with cdf[k-1] <= u < cdf[k]
    idx = torch.searchsorted(cdf, u.contiguous(), right=True).clamp_max(k - 1)  # (..., H, W, n)
    return idx.movedim(-1, -3)


def row_generators(
    seeds: Sequence[int], device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One generator per row, seeded with ``seeds[i]``."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
