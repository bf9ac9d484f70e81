"""Probabilistic (orthogonal) guidance on x0-GMs (spec 6) and vanilla CFG as a baseline (with
the same orthogonal projection as an option, off by default).

Inner products ⟨a, b⟩ are means over (C, H, W) per sample, as in the spec.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from gmflow.gm import GaussianMixture, IsoGaussian, gm_to_iso_gaussian, gm_to_mean
from gmflow.gm.mixture import as_scalar_tensor, gm_dtype

__all__ = [
    "GuidanceResult",
    "impose_gaussian",
    "guidance_bias",
    "guide",
    "probabilistic_guidance",
    "cfg_guidance",
]

NORM_FLOOR = (
    1e-6  # floor of ⟨μ_c, μ_c⟩ and ⟨b, b⟩ in the two normalisations of spec 6 (as the reference)
)


def _inner(a: Tensor, b: Tensor) -> Tensor:
    """⟨a, b⟩ = mean over (C, H, W), keepdim: (..., 1, 1, 1)."""
    return (a * b).mean(dim=(-3, -2, -1), keepdim=True)


def _remove_along(bias: Tensor, mean_cond: Tensor, orthogonal: float) -> Tensor:
    """b − o ⟨b, μ_c⟩/max(⟨μ_c, μ_c⟩, 1e-6) μ_c: the orthogonal projection of spec 6, step 4,
    shared by probabilistic guidance and (opt-in) CFG. o = 1 gives ⟨b', μ_c⟩ = 0 per sample."""
    along = _inner(bias, mean_cond) / _inner(mean_cond, mean_cond).clamp_min(NORM_FLOOR)
    return bias - orthogonal * along * mean_cond


def impose_gaussian(
    gm: GaussianMixture, base: IsoGaussian, bias: Tensor, var_ratio: Tensor | float
) -> GaussianMixture:
    """Impose a shifted, narrowed Gaussian on a GM: GM × N(m + b, τ v) / N(m, v) (spec 6.7, 8.3.8).

    With ρ = 1 − τ, d_k = μ_k − m and D = τ v + ρ s², the normalised product is
        μ'_k = μ_k + s² (b − ρ d_k) / D,     s'² = s² τ v / D,
        log A'_k = log_softmax_k( log A_k − (ρ ‖d_k‖² − 2 d_k·b) / (2 D) ).
    This is algebraically the reference's two-step form (ratio Gaussian N(m + b/ρ, τ v/ρ) via
    powers (1, −1), then GM × Gaussian), rewritten so it stays exact as ρ → 0: the reference floors
    the ratio's normaliser ρ v at 1e-6, so its result is only approximately the identity for
    b = 0, ρ = 0 (w = 0 in guidance, zero bias in order 2), and it is biased whenever ρ v < 1e-6
    (small w late in sampling). Here b = 0 with τ = 1 returns the input exactly (per sample).

    Args:
        gm: means (..., K, C, H, W), one std per sample: logstds (..., 1, 1, 1, 1).
        base: N(m, v) with mean (..., C, H, W) and per-sample var (..., 1, 1, 1), usually the
            moment-matched Gaussian of ``gm`` with its variance averaged over H, W.
        bias: b, (..., C, H, W).
        var_ratio: τ ∈ (0, 1], scalar or (..., 1, 1, 1).

    Returns:
        The GM with the imposed moments, same layout as ``gm``.
    """
    if gm.logstds.shape[-4] != 1:
        raise ValueError(
            "impose_gaussian: needs one std per sample (logstds of shape (..., 1, 1, 1, 1)), got "
            f"{tuple(gm.logstds.shape)}; per-component stds are not produced by GMFlow models"
        )
    if base.var.shape[-2:] != (1, 1):
        raise ValueError(
            f"impose_gaussian: base.var must be per sample, (..., 1, 1, 1), got "
            f"{tuple(base.var.shape)}; average it over H, W first"
        )
    dtype = gm_dtype(gm.dtype, base.mean.dtype, bias.dtype)
    gm = gm.to(dtype)
    m, v, b = base.mean.to(dtype).unsqueeze(-4), base.var.to(dtype).unsqueeze(-4), bias.to(dtype)
    tau = as_scalar_tensor(var_ratio, dtype=dtype, device=m.device)
    if tau.dim() > 0:
        tau = tau.unsqueeze(-4)  # (..., 1, 1, 1, 1)
    rho = 1 - tau
    s2 = torch.exp(2 * gm.logstds)  # (..., 1, 1, 1, 1)
    den = tau * v + rho * s2
    d = gm.means - m  # (..., K, C, H, W)
    bk = b.unsqueeze(-4)  # (..., 1, C, H, W)
    means = gm.means + s2 * (bk - rho * d) / den
    logstds = gm.logstds + 0.5 * (torch.log(tau * v) - torch.log(den))
    quad = (rho * d.square() - 2 * d * bk).sum(dim=-3, keepdim=True)  # (..., K, 1, H, W)
    logweights = torch.log_softmax(gm.logweights - 0.5 * quad / den, dim=-4)
    if isinstance(var_ratio, float | int) and var_ratio != 1:
        # nothing to keep: every sample has its variance narrowed (guidance with w > 0)
        return GaussianMixture(means, logweights, logstds)
    # exact identity where nothing is imposed (b = 0 and τ = 1), per sample
    tau_one = (tau == 1) if tau.dim() == 0 else (tau == 1).flatten(-4).all(-1)
    keep = ((b == 0).flatten(-3).all(-1) & tau_one)[..., None, None, None, None]
    return GaussianMixture(
        torch.where(keep, gm.means, means),
        torch.where(keep, gm.logweights, logweights),
        torch.where(keep, gm.logstds, logstds),
    )


def guidance_bias(
    mean_cond: Tensor,
    mean_uncond: Tensor,
    var_cond: Tensor,
    guidance_scale: float,
    orthogonal: float = 1.0,
) -> Tensor:
    """The probabilistic-guidance shift b in x0-space (spec 6, steps 3-5).

    b = μ_c − μ_u,   b ← b − o ⟨b, μ_c⟩/max(⟨μ_c, μ_c⟩, 1e-6) μ_c,
    b ← b · w sqrt(v̄/max(⟨b, b⟩, 1e-6)),
    so that RMS(b) = w·sqrt(v̄) and, for o = 1, ⟨b, μ_c⟩ = 0. The two 1e-6 floors are the
    reference's guards for a (near-)zero mean or direction; they only matter when those powers
    are below 1e-6.

    Args:
        mean_cond: μ_c, (..., C, H, W).
        mean_uncond: μ_u, (..., C, H, W).
        var_cond: v̄, the per-sample conditional variance, (..., 1, 1, 1).
        guidance_scale: w ∈ [0, 1).
        orthogonal: o ∈ [0, 1], the fraction of the component along μ_c that is removed.

    Returns:
        b, (..., C, H, W).
    """
    bias = mean_cond - mean_uncond
    if orthogonal != 0:
        bias = _remove_along(bias, mean_cond, orthogonal)
    return bias * (guidance_scale * (var_cond / _inner(bias, bias).clamp_min(NORM_FLOOR)).sqrt())


@dataclass(frozen=True)
class GuidanceResult:
    """Everything the sampler needs from one guided evaluation (spec 6, step 8).

    Attributes:
        gm: the guided x0-GM, GM_c × N(μ_c + b, (1 − w²) v̄)/N(μ_c, v̄).
        target: N(μ_c + b, (1 − w²) v̄); mean (B, C, H, W), var (B, 1, 1, 1).
        base_gm: GM_c, the unguided conditional x0-GM.
        base: N(μ_c, v̄): the moment-matched Gaussian of GM_c, var averaged over H, W.
        bias: b, (B, C, H, W).
        guidance_scale: w.
    """

    gm: GaussianMixture
    target: IsoGaussian
    base_gm: GaussianMixture
    base: IsoGaussian
    bias: Tensor
    guidance_scale: float


def _check_scale(name: str, guidance_scale: float, orthogonal: float) -> None:
    if not 0 <= guidance_scale < 1:
        raise ValueError(
            f"{name}: guidance_scale must lie in [0, 1) (0 = no guidance; ~0.04 best FID, ~0.45 "
            f"best precision on ImageNet), got {guidance_scale}; for the CFG scale g >= 1 use "
            "cfg_guidance"
        )
    if not 0 <= orthogonal <= 1:
        raise ValueError(f"{name}: orthogonal must lie in [0, 1], got {orthogonal}")


def guide(
    gm_cond: GaussianMixture,
    gm_uncond: GaussianMixture,
    guidance_scale: float,
    orthogonal: float = 1.0,
) -> GuidanceResult:
    """Probabilistic guidance with all its intermediate terms (spec 6).

    (μ_c, v_c) = iso Gaussian of GM_c with v_c averaged over H, W; μ_u = mean of GM_u;
    b = :func:`guidance_bias`; the target N(μ_c + b, (1 − w²) v_c) is imposed on GM_c with
    :func:`impose_gaussian`. The second moment about μ_c is kept: ⟨b, b⟩ + (1 − w²) v̄ = v̄.
    w = 0 returns GM_c itself (no product).

    Args:
        gm_cond: conditional x0-GM, means (B, K, C, H, W), logstds (B, 1, 1, 1, 1).
        gm_uncond: unconditional x0-GM at the same (x_t, σ).
        guidance_scale: w ∈ [0, 1).
        orthogonal: o ∈ [0, 1] (1 = fully orthogonal to μ_c).

    Returns:
        A :class:`GuidanceResult`.
    """
    _check_scale("guide", guidance_scale, orthogonal)
    iso = gm_to_iso_gaussian(gm_cond)
    base = IsoGaussian(iso.mean, iso.var.mean(dim=(-2, -1), keepdim=True))
    if guidance_scale == 0:
        bias = torch.zeros_like(base.mean)
        return GuidanceResult(gm_cond, base, gm_cond, base, bias, 0.0)
    bias = guidance_bias(base.mean, gm_to_mean(gm_uncond), base.var, guidance_scale, orthogonal)
    tau = 1 - guidance_scale**2
    target = IsoGaussian(base.mean + bias, base.var * tau)
    return GuidanceResult(
        impose_gaussian(gm_cond, base, bias, tau), target, gm_cond, base, bias, guidance_scale
    )


def probabilistic_guidance(
    gm_cond: GaussianMixture,
    gm_uncond: GaussianMixture,
    guidance_scale: float,
    orthogonal: float = 1.0,
) -> GaussianMixture:
    """The guided x0-GM of probabilistic guidance (spec 6); see :func:`guide` for the terms.

    Args:
        gm_cond: conditional x0-GM, means (B, K, C, H, W), logstds (B, 1, 1, 1, 1).
        gm_uncond: unconditional x0-GM at the same (x_t, σ).
        guidance_scale: w ∈ [0, 1); 0 returns ``gm_cond``.
        orthogonal: o ∈ [0, 1].

    Returns:
        GM_c × N(μ_c + b, (1 − w²) v̄)/N(μ_c, v̄).
    """
    return guide(gm_cond, gm_uncond, guidance_scale, orthogonal).gm


def _check_cfg_orthogonal(orthogonal: object) -> None:
    if isinstance(orthogonal, bool) or not isinstance(orthogonal, numbers.Real):
        raise TypeError(
            "cfg_guidance: orthogonal must be a number in [0, 1] (0 = plain CFG), got "
            f"{type(orthogonal).__name__}; pass a Python float, e.g. float(o)"
        )
    if not 0 <= orthogonal <= 1:
        raise ValueError(
            f"cfg_guidance: orthogonal must lie in [0, 1], got {orthogonal}; it is the fraction of "
            "the CFG bias along μ_c that is removed (0 = plain CFG, the default; 1 = fully "
            "orthogonal, as probabilistic guidance)"
        )


def cfg_guidance(
    gm_cond: GaussianMixture,
    gm_uncond: GaussianMixture,
    guidance_scale: float,
    orthogonal: float = 0.0,
) -> GaussianMixture:
    """Vanilla classifier-free guidance on GMs, the baseline of spec 6 / Table 4.

    Every component mean is shifted by the same bias b (μ = mixture means):
        b = (g − 1)(μ_c − μ_u),   b ← b − o ⟨b, μ_c⟩/max(⟨μ_c, μ_c⟩, 1e-6) μ_c,
    the second step being probabilistic guidance's orthogonal projection (:func:`guidance_bias`,
    spec 6 step 4) without its normalisation, so the guided mean is μ_c + b; weights and std are
    kept. Unlike probabilistic guidance (o = 1 by default), the projection is off by default
    (o = 0), as in the reference baseline; o = 0 skips it, so the result is exactly plain CFG.
    g = 1 returns ``gm_cond`` whatever o.

    Args:
        gm_cond: conditional x0-GM, means (B, K, C, H, W).
        gm_uncond: unconditional x0-GM at the same (x_t, σ).
        guidance_scale: g ≥ 1.
        orthogonal: o ∈ [0, 1], the fraction of b's component along μ_c that is removed
            (0 = plain CFG; 1 = ⟨b, μ_c⟩ = 0 per sample).

    Returns:
        The shifted conditional GM.

    Raises:
        ValueError: g < 1 or o outside [0, 1]; TypeError: o not a real number.
    """
    if not guidance_scale >= 1:
        raise ValueError(
            f"cfg_guidance: the CFG scale g must be >= 1 (1 = no guidance), got {guidance_scale}"
        )
    _check_cfg_orthogonal(orthogonal)
    if guidance_scale == 1:
        return gm_cond
    mean_cond = gm_to_mean(gm_cond)
    bias = (guidance_scale - 1) * (mean_cond - gm_to_mean(gm_uncond))
    if orthogonal != 0:
        bias = _remove_along(bias, mean_cond, orthogonal)
    dtype = bias.dtype
    return GaussianMixture(
        gm_cond.means.to(dtype) + bias.unsqueeze(-4),
        gm_cond.logweights.to(dtype),
        gm_cond.logstds.to(dtype),
    )
