"""Argument checks shared by the public GM operations (boundary validation, spec 16 'bad input')."""

from __future__ import annotations

import torch
from torch import Tensor

from gmflow.gm._shapes import broadcast_shapes
from gmflow.gm.mixture import AnyGaussianMixture, GaussianMixture, IsoGaussian, gm_dtype


def promote(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Cast tensors to the GM maths dtype (float64 if any is float64, else float32)."""
    dtype = gm_dtype(*(t.dtype for t in tensors))
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in tensors)


def promote_gm(gm: GaussianMixture, *others: Tensor) -> tuple[GaussianMixture, tuple[Tensor, ...]]:
    """Promote a mixture and extra tensors to one GM maths dtype."""
    m, lw, ls, *rest = promote(gm.means, gm.logweights, gm.logstds, *others)
    return GaussianMixture(m, lw, ls), tuple(rest)


def check_finite(name: str, t: Tensor) -> None:
    """Raise if a (cheap to check) CPU tensor holds NaN or Inf; skipped on accelerators."""
    if t.device.type == "cpu" and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: expected finite values, got NaN or Inf (shape {tuple(t.shape)})")


def check_gm_event(name: str, gm: GaussianMixture, shape: tuple[int, ...], what: str) -> None:
    """Check that ``shape`` (..., C, H, W) matches the mixture's event shape and batch dims."""
    c, h, w = gm.means.shape[-3:]
    if len(shape) < 3 or shape[-3] != c or shape[-2:] not in ((h, w), (1, 1)):
        raise ValueError(
            f"{name}: expected {what} of shape (..., C={c}, H={h}, W={w}) to match the mixture "
            f"means {tuple(gm.means.shape)}, got {shape}"
        )
    check_batch(name, gm, tuple(shape[:-3]))


def check_batch(name: str, gm: AnyGaussianMixture, batch: tuple[int, ...]) -> None:
    """Check that the leading batch dims of an argument broadcast with the mixture's."""
    try:
        broadcast_shapes(tuple(batch), tuple(gm.batch_shape))
    except RuntimeError:
        raise ValueError(
            f"{name}: batch dims {tuple(batch)} do not broadcast with the mixture batch dims "
            f"{tuple(gm.batch_shape)}"
        ) from None


def check_iso_for_gm(name: str, gm: GaussianMixture, g: IsoGaussian, per_sample_var: bool) -> None:
    """Check an iso Gaussian against a mixture (C, H, W and batch dims; var per sample if asked)."""
    check_gm_event(f"{name}.mean", gm, tuple(g.mean.shape), "a mean")
    check_batch(f"{name}.var", gm, tuple(g.var.shape[:-3]))
    h, w = gm.means.shape[-2:]
    if per_sample_var and tuple(g.var.shape[-2:]) != (1, 1) and (h, w) != (1, 1):
        raise ValueError(
            f"{name}.var: expected a per-sample variance of shape (..., 1, 1, 1) so that the "
            "product "
            f"keeps one std per sample, got {tuple(g.var.shape)}; average it over H, W first "
            "(e.g. var.mean(dim=(-2, -1), keepdim=True))"
        )
