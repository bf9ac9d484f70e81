"""Consumers of full-covariance mixtures (the "full GM" cases of spec 7.10-7.13).

A :class:`~gmflow.gm.mixture.FullGaussianMixture` is channel-last: means (..., K, H, W, C), covs
(..., 1|K, H, W, C, C), log-weights (..., K, H, W). Points given to or returned by these functions
use the image layout of the isotropic ones, (..., n, C, H, W), so the public GM functions accept
either kind of mixture and their callers never transpose.

Each function here is the full-covariance branch of the public function of the same name without
the ``full_`` prefix, which dispatches on the record type. With covariances s_k² I they equal the
isotropic functions (:func:`gm_to_full`), draws included: the same generator gives the same
samples.

The Cholesky factor of each covariance is recomputed per call (records cache nothing, see
:mod:`gmflow.gm.mixture`); for the small C of images this costs little next to the rest.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gmflow.gm._checks import check_batch, promote
from gmflow.gm.mixture import FullGaussianMixture, Gaussian, GaussianMixture, IsoGaussian
from gmflow.gm.random import Generators, categorical, randn

__all__ = [
    "gm_to_full",
    "full_gm_to_mean",
    "full_gm_to_gaussian",
    "full_gm_to_iso_gaussian",
    "full_gm_logprob",
    "full_gm_to_sample",
    "full_gm_temperature",
]

_LOG_2PI = math.log(2 * math.pi)


def gm_to_full(gm: GaussianMixture) -> FullGaussianMixture:
    """The same mixture as a :class:`FullGaussianMixture`, covariances s_k² I (channel-last).

    Args:
        gm: means (..., K, C, H, W), logstds (..., 1|K, 1, 1, 1).

    Returns:
        means (..., K, H, W, C), covs (..., 1|K, 1, 1, C, C) (broadcast over H, W), logweights
        (..., K, H, W).
    """
    c = gm.num_channels
    var = torch.exp(2 * gm.logstds)[..., None]  # (..., 1|K, 1, 1, 1, 1)
    eye = torch.eye(c, dtype=var.dtype, device=var.device)
    covs = var * eye  # (..., 1|K, 1, 1, C, C): the ones of C and H become H and W
    return FullGaussianMixture(gm.means.movedim(-3, -1), covs, gm.logweights.squeeze(-3))


def _promote(gm: FullGaussianMixture, *others: Tensor) -> tuple[FullGaussianMixture, tuple]:
    """Cast the mixture and extra tensors to the GM maths dtype (fp32, or fp64 if any is fp64)."""
    means, covs, logweights, *rest = promote(gm.means, gm.covs, gm.logweights, *others)
    if means is not gm.means or covs is not gm.covs or logweights is not gm.logweights:
        gm = FullGaussianMixture(means, covs, logweights)
    return gm, tuple(rest)


def _scale_tril(name: str, covs: Tensor) -> Tensor:
    """Lower Cholesky factors of ``covs``; a clear error for a CPU covariance that is not PD."""
    tril, info = torch.linalg.cholesky_ex(covs)
    if covs.device.type == "cpu" and bool((info != 0).any()):  # no host read on accelerators
        bad = int((info != 0).sum())
        raise ValueError(
            f"{name}: FullGaussianMixture.covs must be symmetric positive definite, but {bad} of "
            f"the {covs[..., 0, 0].numel()} covariances of shape {tuple(covs.shape)} have no "
            "Cholesky factor; add a small multiple of the identity (jitter) or check how they "
            "were built"
        )
    return tril


def _check_points(name: str, gm: FullGaussianMixture, x: Tensor) -> None:
    h, w, c = gm.means.shape[-3:]
    if x.dim() < 4 or tuple(x.shape[-3:]) != (c, h, w):
        raise ValueError(
            f"{name}: x must be (..., n, C={c}, H={h}, W={w}), with a sample axis n before C, to "
            f"match the full mixture means {tuple(gm.means.shape)} (channel-last), got "
            f"{tuple(x.shape)}; add a sample axis with x.unsqueeze(-4)"
        )
    check_batch(name + ": x", gm, tuple(x.shape[:-4]))


def _weights(gm: FullGaussianMixture, power: float = 1.0) -> Tensor:
    """softmax_k(p · log A_k), (..., K, H, W)."""
    logw = gm.logweights if power == 1.0 else torch.log_softmax(power * gm.logweights, dim=-3)
    return logw.exp()


def full_gm_to_mean(gm: FullGaussianMixture, power: float = 1.0) -> Tensor:
    """Σ_k softmax_k(p·log A_k) μ_k per pixel, in the image layout (..., C, H, W)."""
    gm, _ = _promote(gm)
    mean = (_weights(gm, power).unsqueeze(-1) * gm.means).sum(dim=-4)  # (..., H, W, C)
    return mean.movedim(-1, -3)


def full_gm_to_gaussian(gm: FullGaussianMixture, cov_scale: float = 1.0) -> Gaussian:
    """Moment-matched full Gaussian: cov = (Σ_k A_k (Σ_k + d_k d_kᵀ)) · cov_scale, d_k = μ_k − m."""
    gm, _ = _promote(gm)
    weights = _weights(gm)  # (..., K, H, W)
    mean = (weights.unsqueeze(-1) * gm.means).sum(dim=-4)  # (..., H, W, C)
    diffs = gm.means - mean.unsqueeze(-4)  # (..., K, H, W, C)
    spread = torch.einsum("...khw,...khwc,...khwd->...hwcd", weights, diffs, diffs)
    within = (weights[..., None, None] * gm.covs).sum(dim=-5)  # (..., H, W, C, C)
    return Gaussian(mean, (spread + within) * cov_scale)


def full_gm_to_iso_gaussian(gm: FullGaussianMixture) -> IsoGaussian:
    """Moment-matched isotropic Gaussian: var = trace(cov)/C of :func:`full_gm_to_gaussian`.

    That is v = Σ_k A_k trace(Σ_k)/C + (1/C) Σ_k A_k ‖μ_k − m‖² (spec 7.10 for full GMs).
    """
    g = full_gm_to_gaussian(gm)
    var = torch.diagonal(g.cov, dim1=-2, dim2=-1).mean(dim=-1)  # (..., H, W)
    return IsoGaussian(g.mean.movedim(-1, -3), var.unsqueeze(-3))


def full_gm_logprob(gm: FullGaussianMixture, x: Tensor) -> Tensor:
    """Mixture log-density per pixel for x (..., n, C, H, W), returned as (..., n, H, W).

    log p(x) = logsumexp_k [log A_k − ½ ‖L_k⁻¹(x − μ_k)‖² − Σ_i log (L_k)_ii − (C/2) log 2π],
    Σ_k = L_k L_kᵀ (Cholesky).
    """
    _check_points("gm_logprob", gm, x)
    gm, (x,) = _promote(gm, x)
    c = gm.num_channels
    tril = _scale_tril("gm_logprob", gm.covs)  # (..., 1|K, H, W, C, C)
    diffs = x.movedim(-3, -1).unsqueeze(-4) - gm.means.unsqueeze(-5)  # (..., n, K, H, W, C)
    white = torch.linalg.solve_triangular(tril.unsqueeze(-6), diffs.unsqueeze(-1), upper=False)
    half_logdet = torch.diagonal(tril, dim1=-2, dim2=-1).log().sum(dim=-1)  # (..., 1|K, H, W)
    comp = -0.5 * white.squeeze(-1).square().sum(dim=-1) - half_logdet.unsqueeze(-4)
    comp = comp - 0.5 * c * _LOG_2PI  # (..., n, K, H, W)
    return torch.logsumexp(gm.logweights.unsqueeze(-4) + comp, dim=-3)


def full_gm_to_sample(
    gm: FullGaussianMixture,
    n: int = 1,
    power: float = 1.0,
    generator: Generators = None,
    cov_sharpen: bool = False,
) -> Tensor:
    """n draws per pixel: k ~ softmax(p·log A), then μ_k + L_k z (z ~ N(0, I); L_k/√p if sharpened).

    Draws the same random numbers, in the same order, as the isotropic ``gm_to_sample``.

    Returns:
        (..., n, C, H, W).
    """
    gm, _ = _promote(gm)
    batch = gm.batch_shape
    k, h, w, c = gm.means.shape[-4:]
    logw = gm.logweights if power == 1.0 else torch.log_softmax(power * gm.logweights, dim=-3)
    idx = categorical(logw.expand(*batch, k, h, w), n, generator)  # (..., n, H, W)
    means = gm.means.expand(*batch, k, h, w, c)
    chosen = torch.gather(means, -4, idx.unsqueeze(-1).expand(*batch, n, h, w, c))
    noise = randn((*batch, n, c, h, w), generator, device=chosen.device, dtype=chosen.dtype)
    tril = _scale_tril("gm_to_sample", gm.covs)
    tril = tril.expand(*batch, *tril.shape[-5:])  # (..., 1|K, H, W, C, C)
    if tril.shape[-5] != 1:
        # covariances are (H, W) broadcastable: expand before choosing one per (sample, pixel)
        tril = tril.expand(*batch, k, h, w, c, c)
        tril = torch.gather(tril, -5, idx[..., None, None].expand(*batch, n, h, w, c, c))
    scaled = (tril @ noise.movedim(-3, -1).unsqueeze(-1)).squeeze(-1)  # (..., n, H, W, C)
    if cov_sharpen and power != 1.0:
        scaled = scaled * (1.0 / math.sqrt(power))
    return (chosen + scaled).movedim(-1, -3)


def full_gm_temperature(gm: FullGaussianMixture, tau: float) -> FullGaussianMixture:
    """log A ← log_softmax(log A / τ), Σ_k ← τ Σ_k (τ already checked and floored)."""
    gm, _ = _promote(gm)
    return FullGaussianMixture(
        gm.means, gm.covs * tau, torch.log_softmax(gm.logweights / tau, dim=-3)
    )
