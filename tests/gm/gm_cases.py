"""Seeded random mixtures shared by the kernel, transport and CUDA tests of ``gmflow.gm``.

Imported by its module name (pytest puts this folder on ``sys.path`` for the tests in it).
"""

from __future__ import annotations

import os

import pytest
import torch

from gmflow.gm import GaussianMixture

F64 = torch.float64

CUDASIM = [
    pytest.mark.cudasim,
    pytest.mark.skipif(
        os.environ.get("NUMBA_ENABLE_CUDASIM") != "1",
        reason="needs NUMBA_ENABLE_CUDASIM=1 set before numba is imported: run "
        "`NUMBA_ENABLE_CUDASIM=1 pytest -m cudasim` (make test does)",
    ),
]
"""``pytestmark`` of the numba.cuda kernel tests, which run under the CUDA simulator only."""


def random_gm(b, k, c, hw, dtype=F64, per_component=False, seed=0):  # type: ignore[no-untyped-def]
    """Random GM (B, K, C, hw, hw): means N(0, 1.5²), log-weights log_softmax(2·N(0, 1)),
    s ∈ [0.05, 2] (one per sample, or per component); drawn in fp64 from ``seed``, then cast."""
    g = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(b, k, c, hw, hw, generator=g, dtype=F64)
    logweights = (2 * torch.randn(b, k, 1, hw, hw, generator=g, dtype=F64)).log_softmax(1)
    ks = k if per_component else 1
    logstds = (0.05 + 1.95 * torch.rand(b, ks, 1, 1, 1, generator=g, dtype=F64)).log()
    return GaussianMixture(means, logweights, logstds).to(dtype)


def random_spd(  # type: ignore[no-untyped-def]
    *batch: int, C: int, generator=None, scale: float = 1.0, jitter: float = 0.3
) -> torch.Tensor:
    """Random SPD matrices (*batch, C, C) in fp64: scale · A Aᵀ + jitter · I, A ~ N(0, 1)."""
    a = torch.randn(*batch, C, C, generator=generator, dtype=F64)
    return scale * (a @ a.transpose(-1, -2)) + jitter * torch.eye(C, dtype=F64)
