"""Products of Gaussian mixtures and Gaussians (spec 3.5, 7.4-7.8).

Every product is the normalised pointwise product of densities; weights are recomputed from the
marginal likelihood of each component and renormalised with a log-softmax over K. Normalisers are
floored at ``eps`` as in the reference (spec 17.3).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gmflow.gm import backend as _backend
from gmflow.gm._checks import (
    check_batch,
    check_finite,
    check_gm_event,
    check_iso_for_gm,
    promote,
    promote_gm,
)
from gmflow.gm._shapes import broadcast_shapes
from gmflow.gm.mixture import (
    FullGaussianMixture,
    Gaussian,
    GaussianMixture,
    IsoGaussian,
    as_scalar_tensor,
    gm_dtype,
)

__all__ = [
    "gm_mul_iso_gaussian",
    "iso_gaussian_mul_iso_gaussian",
    "gaussian_mul_gaussian",
    "gm_mul_gaussian",
    "gm_mul_gm",
    "gm_condition",
    "gm_condition_mean",
]


def gm_mul_iso_gaussian(
    gm: GaussianMixture,
    g: IsoGaussian,
    gm_power: float = 1.0,
    g_power: float = 1.0,
    eps: float = 1e-6,
) -> GaussianMixture:
    """Multiply a mixture by an isotropic Gaussian, GM^{p_gm}·N(m, v)^{p_g} (spec 7.4).

    Treated as GM × N(m, v/ρ) with ρ = p_g/p_gm; a negative ρ divides by the Gaussian.
    With Z_k = max(v + ρ s_k², eps):
        μ'_k = (v μ_k + ρ s_k² m)/Z_k,   s'_k² = s_k² v/Z_k,
        log A'_k = log_softmax_k(log A_k − ½ ρ ‖μ_k − m‖²/Z_k − (C/2) log Z_k).
    The last term is constant over k (so it cancels) unless the stds are per component.

    Args:
        gm: means (..., K, C, H, W), logstds per sample or per component.
        g: mean (..., C, H, W); var (..., 1, 1, 1) (or per pixel when H = W = 1).
        gm_power: p_gm, non-zero.
        g_power: p_g.
        eps: floor of the normaliser Z.

    Returns:
        The product mixture, same K and layout as ``gm``.
    """
    if gm_power == 0:
        raise ValueError("gm_mul_iso_gaussian: gm_power must be non-zero")
    check_iso_for_gm("gm_mul_iso_gaussian: g", gm, g, per_sample_var=True)
    gm, (mean, var) = promote_gm(gm, g.mean, g.var)
    rho = g_power / gm_power
    m = mean.unsqueeze(-4)  # (..., 1, C, H, W)
    v = var.unsqueeze(-4)  # (..., 1, 1, h, w)
    s2 = torch.exp(2 * gm.logstds)  # (..., 1|K, 1, 1, 1)
    z = (v + rho * s2).clamp_min(eps)
    means = (v * gm.means + rho * s2 * m) / z
    c = gm.num_channels
    sqdist = (gm.means - m).square().sum(dim=-3, keepdim=True)  # (..., K, 1, H, W)
    logweights = torch.log_softmax(
        gm.logweights - 0.5 * rho * sqdist / z - 0.5 * c * torch.log(z), dim=-4
    )
    logstds = gm.logstds + 0.5 * torch.log(v) - 0.5 * torch.log(z)
    return GaussianMixture(means, logweights, logstds)


def iso_gaussian_mul_iso_gaussian(
    g1: IsoGaussian, g2: IsoGaussian, p1: float = 1.0, p2: float = 1.0, eps: float = 1e-6
) -> IsoGaussian:
    """Return N(m1, v1)^{p1}·N(m2, v2)^{p2}, normalised (spec 7.5).

    Precisions add: Z = max(p1 v2 + p2 v1, eps), v = v1 v2/Z, m = (p1 v2 m1 + p2 v1 m2)/Z.
    """
    try:
        if g1.mean.shape[-3] != g2.mean.shape[-3]:
            raise RuntimeError  # a C = 1 operand must not broadcast over the other's channels
        broadcast_shapes(g1.mean.shape, g2.mean.shape)
    except RuntimeError:
        raise ValueError(
            f"iso_gaussian_mul_iso_gaussian: g1.mean {tuple(g1.mean.shape)} and g2.mean "
            f"{tuple(g2.mean.shape)} do not broadcast (channel counts C must be equal)"
        ) from None
    m1, v1, m2, v2 = promote(g1.mean, g1.var, g2.mean, g2.var)
    z = (p1 * v2 + p2 * v1).clamp_min(eps)
    return IsoGaussian((p1 * v2 * m1 + p2 * v1 * m2) / z, v1 * v2 / z)


def gaussian_mul_gaussian(g1: Gaussian, g2: Gaussian, p1: float = 1.0, p2: float = 1.0) -> Gaussian:
    """Return N(m1, Σ1)^{p1}·N(m2, Σ2)^{p2}, normalised (spec 7.6).

    Λ_i = p_i Σ_i⁻¹,  Σ = (Λ1 + Λ2)⁻¹,  m = Σ(Λ1 m1 + Λ2 m2).
    """
    if g1.mean.shape[-1] != g2.mean.shape[-1]:
        raise ValueError(
            f"gaussian_mul_gaussian: channel counts differ, g1.mean {tuple(g1.mean.shape)} vs "
            f"g2.mean {tuple(g2.mean.shape)}"
        )
    m1, c1, m2, c2 = promote(g1.mean, g1.cov, g2.mean, g2.cov)
    lam1 = p1 * torch.linalg.inv(c1)
    lam2 = p2 * torch.linalg.inv(c2)
    cov = torch.linalg.inv(lam1 + lam2)
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    mean = (cov @ (lam1 @ m1.unsqueeze(-1) + lam2 @ m2.unsqueeze(-1))).squeeze(-1)
    return Gaussian(mean, cov)


def gm_mul_gaussian(
    gm: GaussianMixture, g: Gaussian, gm_power: float = 1.0, g_power: float = 1.0
) -> FullGaussianMixture:
    """Multiply an isotropic mixture by a full-covariance Gaussian (spec 7.7).

    With ρ = p_g/p_gm and Σ̃ = Σ_g/ρ (the Gaussian actually multiplied):
        Σ'_k = (I/s_k² + Σ̃⁻¹)⁻¹,   μ'_k = Σ'_k(μ_k/s_k² + Σ̃⁻¹ m_g),
        log A'_k = log_softmax_k(log A_k + log N(μ_k; m_g, s_k² I + Σ̃)).

    Args:
        gm: means (..., K, C, H, W).
        g: mean (..., H, W, C), cov (..., H, W, C, C).
        gm_power: p_gm, non-zero.
        g_power: p_g.

    Returns:
        FullGaussianMixture with means (..., K, H, W, C), covs (..., 1|K, H, W, C, C),
        logweights (..., K, H, W).
    """
    if gm_power == 0:
        raise ValueError("gm_mul_gaussian: gm_power must be non-zero")
    check_gm_event("gm_mul_gaussian: g.mean", gm, tuple(g.mean.movedim(-1, -3).shape), "a mean")
    gm, (g_mean, g_cov) = promote_gm(gm, g.mean, g.cov)
    rho = g_power / gm_power
    c = gm.num_channels
    eye = torch.eye(c, dtype=g_cov.dtype, device=g_cov.device)
    prec_g = rho * torch.linalg.inv(g_cov).unsqueeze(-5)  # (..., 1, H, W, C, C)
    s2 = torch.exp(2 * gm.logstds).unsqueeze(-1)  # (..., 1|K, 1, 1, 1, 1)
    cov = torch.linalg.inv(eye / s2 + prec_g)  # (..., 1|K, H, W, C, C)
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    mu = gm.means.movedim(-3, -1)  # (..., K, H, W, C)
    m_g = g_mean.unsqueeze(-4)  # (..., 1, H, W, C)
    rhs = mu / s2.squeeze(-1) + (prec_g @ m_g.unsqueeze(-1)).squeeze(-1)
    means = (cov @ rhs.unsqueeze(-1)).squeeze(-1)  # (..., K, H, W, C)
    # marginal likelihood N(μ_k; m_g, s_k² I + Σ_g/ρ)
    marg = s2 * eye + g_cov.unsqueeze(-5) / rho  # (..., 1|K, H, W, C, C)
    d = (mu - m_g).unsqueeze(-1)  # (..., K, H, W, C, 1)
    maha = (d.transpose(-1, -2) @ torch.linalg.solve(marg, d)).squeeze(-1).squeeze(-1)
    logdet = torch.linalg.slogdet(marg).logabsdet
    logweights = torch.log_softmax(
        gm.logweights.squeeze(-3) - 0.5 * maha - 0.5 * logdet, dim=-3
    )  # (..., K, H, W)
    return FullGaussianMixture(means, cov, logweights)


def gm_mul_gm(gm1: GaussianMixture, gm2: GaussianMixture) -> GaussianMixture:
    """Multiply two isotropic mixtures; the result has K1·K2 components (spec 7.8).

    Pair (i, j), flattened as i·K2 + j:
        μ_ij = (s2² μ_i + s1² μ_j)/(s1² + s2²),  s_ij² = s1² s2²/(s1² + s2²),
        log A_ij = log_softmax(log A_i + log A_j + log N(μ_i; μ_j, (s1² + s2²) I)).
    """
    if gm1.means.shape[-3:] != gm2.means.shape[-3:]:
        raise ValueError(
            f"gm_mul_gm: event shapes (C, H, W) differ: gm1.means {tuple(gm1.means.shape)} vs "
            f"gm2.means {tuple(gm2.means.shape)}"
        )
    check_batch("gm_mul_gm: gm2", gm1, tuple(gm2.batch_shape))
    m1, lw1, ls1, m2, lw2, ls2 = promote(
        gm1.means, gm1.logweights, gm1.logstds, gm2.means, gm2.logweights, gm2.logstds
    )
    k1, k2 = m1.shape[-4], m2.shape[-4]
    c = m1.shape[-3]
    mi, mj = m1.unsqueeze(-4), m2.unsqueeze(-5)  # (..., K1, 1|K2, C, H, W)
    li, lj = ls1.unsqueeze(-4), ls2.unsqueeze(-5)
    var_sum_log = torch.logaddexp(2 * li, 2 * lj)  # log(s1² + s2²)
    logstds = li + lj - 0.5 * var_sum_log
    w_i, w_j = torch.exp(2 * (lj - 0.5 * var_sum_log)), torch.exp(2 * (li - 0.5 * var_sum_log))
    means = w_i * mi + w_j * mj  # (..., K1, K2, C, H, W)
    sqdist = (mi - mj).square().sum(dim=-3, keepdim=True)
    logw = (
        lw1.unsqueeze(-4)
        + lw2.unsqueeze(-5)
        - 0.5 * sqdist * torch.exp(-var_sum_log)
        - 0.5 * c * var_sum_log
    )
    batch = broadcast_shapes(means.shape[:-5], logw.shape[:-5])
    means = means.expand(*batch, k1, k2, *means.shape[-3:]).flatten(-5, -4)
    logw = logw.expand(*batch, k1, k2, *logw.shape[-3:]).flatten(-5, -4)
    if logstds.shape[-5] == 1 and logstds.shape[-4] == 1:
        logstds = logstds.squeeze(-4)  # shared std stays shared
    else:
        logstds = logstds.expand(*logstds.shape[:-5], k1, k2, 1, 1, 1).flatten(-5, -4)
    return GaussianMixture(means, torch.log_softmax(logw, dim=-4), logstds)


def _broadcast_condition_args(
    name: str, gm: GaussianMixture, precision: Tensor | float, linear: Tensor
) -> tuple[GaussianMixture, Tensor, Tensor]:
    check_gm_event(f"{name}: linear", gm, tuple(linear.shape), "a linear term")
    if not isinstance(precision, Tensor):
        # a Python number takes the maths dtype directly: torch.as_tensor alone would round it to
        # the default float32 before promotion and cost fp64 inputs their precision
        dtype = gm_dtype(gm.means.dtype, gm.logweights.dtype, gm.logstds.dtype, linear.dtype)
        precision = as_scalar_tensor(precision, dtype=dtype, device=linear.device)
    if precision.dim() > 0 and (precision.dim() < 3 or precision.shape[-3:] != (1, 1, 1)):
        raise ValueError(
            f"{name}: precision must be a scalar or of shape (..., 1, 1, 1) (one per sample), "
            f"got {tuple(precision.shape)}"
        )
    if precision.dim() > 0:
        check_batch(f"{name}: precision", gm, tuple(precision.shape[:-3]))
    if not precision.is_floating_point():
        precision = precision.to(linear.dtype if linear.is_floating_point() else torch.float32)
    gm, (precision, linear) = promote_gm(gm, precision, linear)
    check_finite(f"{name}: gm.logstds", gm.logstds)
    return gm, precision, linear


def _condition_torch(
    gm: GaussianMixture, precision: Tensor, linear: Tensor, eps: float
) -> GaussianMixture:
    zeta = precision.unsqueeze(-4) if precision.dim() else precision  # (..., 1, 1, 1, 1)
    nu = linear.unsqueeze(-4)  # (..., 1, C, H, W)
    s2 = torch.exp(2 * gm.logstds)  # (..., 1|K, 1, 1, 1)
    den = (s2 * zeta + 1).clamp_min(eps)
    means = (gm.means + s2 * nu) / den
    quad = (2 * gm.means * nu + s2 * nu.square() - zeta * gm.means.square()).sum(
        dim=-3, keepdim=True
    )  # (..., K, 1, H, W)
    c = gm.num_channels
    logweights = torch.log_softmax(gm.logweights + 0.5 * quad / den - 0.5 * c * torch.log(den), -4)
    return GaussianMixture(means, logweights, gm.logstds - 0.5 * torch.log(den))


def gm_condition(
    gm: GaussianMixture, precision: Tensor | float, linear: Tensor, eps: float = 1e-6
) -> GaussianMixture:
    """Multiply a mixture by exp(−½ ζ‖x‖² + ν·x) and renormalise (spec 3.5).

    This is the posterior re-conditioning behind GM-ODE sub-steps.
    With den_k = max(s_k² ζ + 1, eps):
        μ'_k = (μ_k + s_k² ν)/den_k,   s'_k² = s_k²/den_k,
        log A'_k = log_softmax_k(log A_k + (2 μ_k·ν + s_k²‖ν‖² − ζ‖μ_k‖²)/(2 den_k)
                                 − (C/2) log den_k).
    (The terms s²‖ν‖² and log den are constant over k for a shared std; they are kept so
    per-component stds are exact.)

    Args:
        gm: means (..., K, C, H, W).
        precision: ζ, a scalar or (..., 1, 1, 1) per sample.
        linear: ν, (..., C, H, W).
        eps: floor of den.

    Returns:
        The conditioned mixture.
    """
    gm, precision, linear = _broadcast_condition_args("gm_condition", gm, precision, linear)
    return _condition_torch(gm, precision, linear, eps)


def gm_condition_mean(
    gm: GaussianMixture, precision: Tensor | float, linear: Tensor, eps: float = 1e-6
) -> Tensor:
    """Return the mean of :func:`gm_condition` without building the conditioned mixture.

    The fused form behind GM-ODE sub-steps: one pass over K per pixel. Uses the numba kernel when
    the backend selection allows (CUDA tensors without grad, or as forced by GMFLOW_GM_BACKEND).

    Returns:
        (..., C, H, W).
    """
    gm, precision, linear = _broadcast_condition_args("gm_condition_mean", gm, precision, linear)
    kernel = _backend.kernel_for(
        "gm_condition_mean", gm.means, gm.logweights, gm.logstds, precision, linear
    )
    if kernel is not None:
        return kernel(gm.means, gm.logweights, gm.logstds, precision, linear, eps)
    cond = _condition_torch(gm, precision, linear, eps)
    return (cond.logweights.exp() * cond.means).sum(dim=-4)
