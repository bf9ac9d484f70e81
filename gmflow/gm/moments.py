"""Moments of a Gaussian mixture: mean, moment-matched Gaussians, temperature.

Spec 3.2, 3.3, 7.10-7.14.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gmflow.gm._checks import promote_gm
from gmflow.gm.full import (
    full_gm_temperature,
    full_gm_to_gaussian,
    full_gm_to_iso_gaussian,
    full_gm_to_mean,
)
from gmflow.gm.mixture import (
    AnyGaussianMixture,
    FullGaussianMixture,
    Gaussian,
    GaussianMixture,
    IsoGaussian,
)

__all__ = ["gm_to_mean", "gm_to_iso_gaussian", "gm_to_gaussian", "gm_temperature"]


def gm_to_mean(gm: AnyGaussianMixture, power: float = 1.0) -> Tensor:
    """Return the mixture mean Σ_k softmax_k(p·log A_k) μ_k (spec 3.3).

    Args:
        gm: the mixture, means (..., K, C, H, W), or a full mixture (channel-last).
        power: p; 1 gives the true mean, p > 1 sharpens the weights.

    Returns:
        (..., C, H, W) in fp32 or fp64 (the image layout for a full mixture too).
    """
    if isinstance(gm, FullGaussianMixture):
        return full_gm_to_mean(gm, power)
    gm, _ = promote_gm(gm)
    logw = gm.logweights if power == 1.0 else torch.log_softmax(power * gm.logweights, dim=-4)
    return (logw.exp() * gm.means).sum(dim=-4)


def gm_to_iso_gaussian(gm: AnyGaussianMixture) -> IsoGaussian:
    """Moment-match each pixel's mixture with an isotropic Gaussian (spec 3.2, 7.10).

    m_p = Σ_k A_k μ_k,  v_p = Σ_k A_k s_k² + (1/C) Σ_k A_k ‖μ_k − m_p‖²; a full mixture uses
    trace(Σ_k)/C for s_k².

    Returns:
        IsoGaussian with mean (..., C, H, W) and var (..., 1, H, W).
    """
    if isinstance(gm, FullGaussianMixture):
        return full_gm_to_iso_gaussian(gm)
    gm, _ = promote_gm(gm)
    weights = gm.logweights.exp()  # (..., K, 1, H, W)
    mean = (weights * gm.means).sum(dim=-4)  # (..., C, H, W)
    diffs = gm.means - mean.unsqueeze(-4)  # (..., K, C, H, W)
    spread = (weights * diffs.square().mean(dim=-3, keepdim=True)).sum(dim=-4)  # (..., 1, H, W)
    comp_var = (weights * torch.exp(2 * gm.logstds)).sum(dim=-4)  # (..., 1, H, W)
    return IsoGaussian(mean, comp_var + spread)


def gm_to_gaussian(gm: AnyGaussianMixture, cov_scale: float = 1.0) -> Gaussian:
    """Moment-match each pixel's mixture with a full-covariance Gaussian (spec 7.11).

    cov_p = (Σ_k A_k d_k d_kᵀ + Σ_k A_k s_k² I) · cov_scale,  d_k = μ_k − m_p; a full mixture uses
    Σ_k for s_k² I.

    Returns:
        Gaussian with mean (..., H, W, C) and cov (..., H, W, C, C) (channel-last).
    """
    if isinstance(gm, FullGaussianMixture):
        return full_gm_to_gaussian(gm, cov_scale)
    gm, _ = promote_gm(gm)
    weights = gm.logweights.exp()  # (..., K, 1, H, W)
    mean = (weights * gm.means).sum(dim=-4)  # (..., C, H, W)
    diffs = (gm.means - mean.unsqueeze(-4)).movedim(-3, -1)  # (..., K, H, W, C)
    w = weights.squeeze(-3).unsqueeze(-1)  # (..., K, H, W, 1)
    cov = torch.einsum("...khwc,...khwd->...hwcd", w * diffs, diffs)  # (..., H, W, C, C)
    comp_var = (weights * torch.exp(2 * gm.logstds)).sum(dim=-4)  # (..., 1, H, W)
    eye = torch.eye(gm.num_channels, dtype=cov.dtype, device=cov.device)
    cov = cov + comp_var.squeeze(-3)[..., None, None] * eye
    return Gaussian(mean.movedim(-3, -1), cov * cov_scale)


def gm_temperature(gm: AnyGaussianMixture, tau: float, eps: float = 1e-6) -> AnyGaussianMixture:
    """Temper the mixture: log A ← log_softmax(log A / τ), log s ← log s + ½ log τ (spec 7.14).

    τ = 1 is the identity; τ → 0 makes the weights one-hot. τ is floored at ``eps``. A full
    mixture scales its covariances by τ instead.
    """
    if not tau > 0:
        raise ValueError(f"gm_temperature: tau must be > 0, got {tau}")
    tau = max(float(tau), eps)
    if isinstance(gm, FullGaussianMixture):
        return full_gm_temperature(gm, tau)
    gm, _ = promote_gm(gm)
    logweights = torch.log_softmax(gm.logweights / tau, dim=-4)
    return GaussianMixture(gm.means, logweights, gm.logstds + 0.5 * math.log(tau))
