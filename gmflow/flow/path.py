"""The flow-matching path and its Gaussian transitions (spec 1, 3.1, 3.4, 3.5).

Every function follows the notation block of :mod:`gmflow.flow`: σ ∈ [0, 1], α = 1 − σ,
x_σ = α x0 + σ ε, u = ε − x0. Noise levels are Python floats, 0-dim tensors, or tensors of the
leading batch shape (usually (B,)) that broadcast one level per sample.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gmflow.gm import GaussianMixture, gm_condition, gm_condition_mean
from gmflow.gm.mixture import as_scalar_tensor, gm_dtype

__all__ = [
    "SIGMA_FLOOR",
    "add_noise",
    "velocity_target",
    "velocity_to_x0",
    "x0_to_velocity",
    "forward_transition_coefs",
    "forward_transition",
    "reverse_transition_coefs",
    "u_to_x0",
    "x0_to_u",
    "reverse_transition",
    "posterior_condition",
    "posterior_mean",
]

SIGMA_FLOOR = 1e-6  # floor of σ and α in divisions and logs (spec 1.3, 1.4, 17.3)

Sigma = Tensor | float


def _as_level(value: Sigma, ref: Tensor | None = None) -> Tensor:
    """Return a noise level as a floating tensor in the GM maths dtype of ``ref``.

    A Python float becomes a 0-dim tensor directly in the target dtype (fp64 when there is no
    reference), so that 0.7 is not first rounded through fp32.
    """
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            value = value.to(torch.float64)
        dtype = gm_dtype(value.dtype, *([ref.dtype] if ref is not None else []))
        return value.to(device=ref.device if ref is not None else value.device, dtype=dtype)
    dtype = gm_dtype(ref.dtype) if ref is not None else torch.float64
    return as_scalar_tensor(
        float(value), dtype=dtype, device=ref.device if ref is not None else None
    )


def _are_numbers(*levels: Sigma) -> bool:
    """All levels are Python numbers (the samplers' grids), so their maths can stay in Python."""
    return all(isinstance(v, float | int) and not isinstance(v, bool) for v in levels)


def _per_sample(level: Tensor, event_dims: int) -> Tensor:
    """Reshape a level of shape (...) to (..., 1 × event_dims) so it broadcasts per sample."""
    return level if level.dim() == 0 else level.reshape(*level.shape, *([1] * event_dims))


def _check_event(name: str, gm: GaussianMixture, x: Tensor, what: str) -> None:
    if x.dim() < 3 or tuple(x.shape[-3:]) != tuple(gm.means.shape[-3:]):
        raise ValueError(
            f"{name}: {what} must have shape (..., C, H, W) = (..., "
            f"{', '.join(map(str, gm.means.shape[-3:]))}) to match the mixture means "
            f"{tuple(gm.means.shape)}, got {tuple(x.shape)}"
        )


# ---- tensors --------------------------------------------------------------------------------


def add_noise(x0: Tensor, noise: Tensor, sigma: Sigma) -> Tensor:
    """Return x_σ = (1 − σ) x0 + σ ε (spec 1.1).

    Args:
        x0: (..., C, H, W) data.
        noise: ε, same shape.
        sigma: scalar or (...) per sample.

    Returns:
        x_σ, same shape as ``x0``.
    """
    s = _per_sample(_as_level(sigma, x0), 3)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """Return the flow-matching velocity u = ε − x0 (points from data to noise; dx/dσ = u)."""
    return noise - x0


def velocity_to_x0(u: Tensor, x_t: Tensor, sigma: Sigma) -> Tensor:
    """Return x0 = x_σ − σ u (spec 1.4), exact for every σ including 0."""
    s = _per_sample(_as_level(sigma, x_t), 3)
    return x_t - s * u


def x0_to_velocity(x0: Tensor, x_t: Tensor, sigma: Sigma) -> Tensor:
    """Return u = (x_σ − x0)/σ, σ floored at ``SIGMA_FLOOR`` (spec 1.4; the reference uses 1e-4)."""
    s = _per_sample(_as_level(sigma, x_t), 3)
    return (x_t - x0) / s.clamp_min(SIGMA_FLOOR)


def forward_transition_coefs(sigma_s: Sigma, sigma_t: Sigma) -> tuple[Tensor, Tensor]:
    """Coefficients of q(x_t | x_s) = N(a x_s, b² I) for σ_s ≤ σ_t (spec 1.2).

    a = α_t/α_s (α_s floored at 1e-6),  b = sqrt(max(0, σ_t² − a² σ_s²)).

    Returns:
        (a, b), broadcast over the shapes of the two levels.
    """
    s_s, s_t = _as_level(sigma_s), _as_level(sigma_t)
    s_s, s_t = torch.broadcast_tensors(*_common(s_s, s_t))
    scale = (1 - s_t) / (1 - s_s).clamp_min(SIGMA_FLOOR)
    std = (s_t.square() - (scale * s_s).square()).clamp_min(0).sqrt()
    return scale, std


def forward_transition(x_s: Tensor, sigma_s: Sigma, sigma_t: Sigma, noise: Tensor) -> Tensor:
    """Move x_s at level σ_s to the noisier level σ_t ≥ σ_s: x_t = a x_s + b ε' (spec 1.2).

    If x_s = α_s x0 + σ_s ε0 then x_t = α_t x0 + σ_t ε exactly in distribution; σ_s = 0 gives the
    marginal α_t x0 + σ_t ε'.

    Args:
        x_s: (..., C, H, W).
        sigma_s: scalar or (...) per sample.
        sigma_t: scalar or (...) per sample, ≥ σ_s.
        noise: ε' ~ N(0, I), same shape as ``x_s``.

    Returns:
        x_t, same shape as ``x_s``.
    """
    scale, std = forward_transition_coefs(_as_level(sigma_s, x_s), _as_level(sigma_t, x_s))
    return _per_sample(scale, 3) * x_s + _per_sample(std, 3) * noise


def _common(*levels: Tensor) -> tuple[Tensor, ...]:
    dtype = gm_dtype(*(t.dtype for t in levels))
    device = next((t.device for t in levels if t.dim() > 0), levels[0].device)
    return tuple(t.to(dtype=dtype, device=device) for t in levels)


def reverse_transition_coefs(sigma: Sigma, sigma_to: Sigma) -> tuple[Tensor, Tensor, Tensor]:
    """DDPM-posterior coefficients: q(x_to | x, x0) = N(c1 x + c2 x0, c3 I), σ_to ≤ σ (spec 1.3).

    With r = (σ_to/σ)(α/α_to) and β̃ = 1 − r²:
        c1 = (σ_to/σ)² (α/α_to),   c2 = β̃ α_to,   c3 = β̃ σ_to².
    They satisfy c1 α + c2 = α_to and c1² σ² + c3 = σ_to². σ and α_to are floored at 1e-6 in the
    divisions; σ_to = σ returns exactly (1, 0, 0) (including σ = 1, where the formula would give the
    equally valid (0, 0, 1)) and σ_to = 0 gives exactly (0, 1, 0).

    Args:
        sigma: the current level σ, scalar or (B,).
        sigma_to: the target level σ_to ≤ σ, scalar or (B,).

    Returns:
        (c1, c2, c3), broadcast over the shapes of the two levels.

    Raises:
        ValueError: if σ_to > σ or a level lies outside [0, 1] (checked for CPU tensors only).
    """
    s, s_to = _common(_as_level(sigma), _as_level(sigma_to))
    if s.device.type == "cpu":
        if bool((s_to > s).any()):
            raise ValueError(
                "reverse_transition_coefs: sigma_to must be <= sigma (the reverse transition moves "
                f"towards data); got sigma={s.tolist()} and sigma_to={s_to.tolist()}"
            )
        if bool(((s < 0) | (s > 1) | (s_to < 0)).any()):
            raise ValueError(
                "reverse_transition_coefs: noise levels must lie in [0, 1], got "
                f"sigma={s.tolist()} and sigma_to={s_to.tolist()}"
            )
    alpha, alpha_to = 1 - s, 1 - s_to
    ratio = s_to / s.clamp_min(SIGMA_FLOOR)
    r = ratio * alpha / alpha_to.clamp_min(SIGMA_FLOOR)
    beta = 1 - r.square()
    c1 = ratio.square() * alpha / alpha_to.clamp_min(SIGMA_FLOOR)
    c2 = beta * alpha_to
    c3 = beta * s_to.square()
    same = s_to == s
    one, zero = torch.ones_like(c1), torch.zeros_like(c1)
    c1, c2, c3 = (
        torch.where(same, one, c1),
        torch.where(same, zero, c2),
        torch.where(same, zero, c3),
    )
    return c1, c2, c3


# ---- Gaussian mixtures ------------------------------------------------------------------------


def u_to_x0(gm_u: GaussianMixture, x_t: Tensor, sigma: Sigma) -> GaussianMixture:
    """Map a GM over u at (x_σ, σ) to the GM over x0 = x_σ − σ u (spec 1.4, 3.1).

    μ_k^{x0} = x_σ − σ μ_k^{u},  log s^{x0} = log s^{u} + log max(σ, 1e-6),  weights unchanged.

    Args:
        gm_u: means (..., K, C, H, W), logstds (..., 1|K, 1, 1, 1).
        x_t: (..., C, H, W).
        sigma: scalar or (...) per sample.

    Returns:
        The x0-GM, in fp32 (fp64 if any input is fp64).
    """
    _check_event("u_to_x0", gm_u, x_t, "x_t")
    dtype = gm_dtype(gm_u.dtype, x_t.dtype)
    gm_u, x_t = gm_u.to(dtype), x_t.to(dtype)
    s = _per_sample(_as_level(sigma, x_t), 4)
    means = x_t.unsqueeze(-4) - s * gm_u.means
    return GaussianMixture(
        means, gm_u.logweights, gm_u.logstds + torch.log(s.clamp_min(SIGMA_FLOOR))
    )


def x0_to_u(gm_x0: GaussianMixture, x_t: Tensor, sigma: Sigma) -> GaussianMixture:
    """Map a GM over x0 at (x_σ, σ) to the GM over u = (x_σ − x0)/σ; the inverse of :func:`u_to_x0`.

    μ_k^{u} = (x_σ − μ_k^{x0})/σ,  log s^{u} = log s^{x0} − log σ  (σ floored at 1e-6).

    Returns:
        The u-GM, in fp32 (fp64 if any input is fp64).
    """
    _check_event("x0_to_u", gm_x0, x_t, "x_t")
    dtype = gm_dtype(gm_x0.dtype, x_t.dtype)
    gm_x0, x_t = gm_x0.to(dtype), x_t.to(dtype)
    s = _per_sample(_as_level(sigma, x_t), 4).clamp_min(SIGMA_FLOOR)
    means = (x_t.unsqueeze(-4) - gm_x0.means) / s
    return GaussianMixture(means, gm_x0.logweights, gm_x0.logstds - torch.log(s))


def reverse_transition(
    gm: GaussianMixture,
    x_t: Tensor,
    sigma: Sigma,
    sigma_to: Sigma,
    *,
    prediction_type: str = "u",
) -> GaussianMixture:
    """The GM over x_to given x_σ: each x0-component pushed through q(x_to | x_σ, x0) (spec 3.4).

    With (c1, c2, c3) from :func:`reverse_transition_coefs` and ``prediction_type``
        "u"  (a GM over u, the network output):  m_k = c1 x_σ + c2 (x_σ − σ μ_k^{u}),
             S² = (σ c2 s^{u})² + c3;
        "x0" (a GM over x0, e.g. :func:`u_to_x0`'s or a guided one):  m_k = c1 x_σ + c2 μ_k^{x0},
             S² = (c2 s^{x0})² + c3;
    weights unchanged. The two agree on ``u_to_x0(gm_u, x_σ, σ)`` (for σ ≥ 1e-6, u_to_x0's
    floor). The variance is computed as a log-sum-exp without the reference's 1e-6 floors on
    σ c2 (c2) and c3, so σ_to = 0 gives exactly the x0-GM (std σ s^{u}, or s^{x0}) and the
    transition loss at trans_ratio = 1 is exactly the u-space NLL plus C log σ (spec 4.3.6).

    Args:
        gm: the GM at (x_σ, σ): means (..., K, C, H, W), logstds (..., 1|K, 1, 1, 1); over u
            (the network's output) or over x0, as ``prediction_type`` says.
        x_t: x_σ, (..., C, H, W).
        sigma: σ, scalar or (...) per sample.
        sigma_to: σ_to ≤ σ, scalar or (...) per sample.
        prediction_type: ``"u"`` (default) or ``"x0"``: the variable ``gm`` is a mixture over.

    Returns:
        The transition GM over x_to, in fp32 (fp64 if any input is fp64).

    Raises:
        ValueError: an unknown ``prediction_type``, or ``x_t`` not matching the GM's (C, H, W).
    """
    if prediction_type not in ("u", "x0"):
        raise ValueError(
            f"reverse_transition: prediction_type={prediction_type!r}; expected 'u' (a GM over "
            "the velocity u = ε − x0, what GMFlow networks output) or 'x0' (a GM over x0, e.g. "
            "from u_to_x0 or guidance)"
        )
    _check_event("reverse_transition", gm, x_t, "x_t")
    dtype = gm_dtype(gm.dtype, x_t.dtype)
    gm, x_t = gm.to(dtype), x_t.to(dtype)
    s, s_to = _as_level(sigma, x_t), _as_level(sigma_to, x_t)
    c1, c2, c3 = (_per_sample(c, 4) for c in reverse_transition_coefs(s, s_to))
    x = x_t.unsqueeze(-4)
    if prediction_type == "u":
        s = _per_sample(s, 4)
        means = c1 * x + c2 * (x - s * gm.means)
        scale = s * c2  # x0-std = σ s^{u}
    else:
        means = c1 * x + c2 * gm.means
        scale = c2
    tiny = torch.finfo(dtype).tiny
    log_scale = torch.log(scale.clamp_min(tiny))
    log_c3 = torch.where(c3 > 0, torch.log(c3.clamp_min(tiny)), -math.inf)
    logstds = 0.5 * torch.logaddexp(2 * (gm.logstds + log_scale), log_c3)
    return GaussianMixture(means, gm.logweights, logstds)


def _reconditioning_terms(
    x_src: Tensor, sigma_src: Sigma, x_t: Tensor, sigma_t: Sigma
) -> tuple[Tensor | float, Tensor]:
    """ζ = (α_t/σ_t)² − (α_src/σ_src)² (per sample) and ν = α_t x_t/σ_t² − α_src x_src/σ_src².

    Python-float levels (the samplers' grids) give a float ζ and ν in two tensor ops: the GM-ODE
    sub-steps run this at every sub-step, and on a GPU each op is a kernel launch.
    """
    if _are_numbers(sigma_src, sigma_t):
        s_src, s_t = max(float(sigma_src), SIGMA_FLOOR), max(float(sigma_t), SIGMA_FLOOR)
        c_src, c_t = (1 - s_src) / s_src**2, (1 - s_t) / s_t**2
        precision = ((1 - s_t) / s_t) ** 2 - ((1 - s_src) / s_src) ** 2
        dtype = gm_dtype(x_t.dtype, x_src.dtype)
        return precision, torch.add(x_t.to(dtype) * c_t, x_src.to(dtype), alpha=-c_src)
    s_src = _per_sample(_as_level(sigma_src, x_t), 3).clamp_min(SIGMA_FLOOR)
    s_t = _per_sample(_as_level(sigma_t, x_t), 3).clamp_min(SIGMA_FLOOR)
    a_src, a_t = 1 - s_src, 1 - s_t
    precision = (a_t / s_t).square() - (a_src / s_src).square()
    linear = a_t * x_t / s_t.square() - a_src * x_src / s_src.square()
    return precision, linear


def posterior_condition(
    gm_x0: GaussianMixture, x_src: Tensor, sigma_src: Sigma, x_t: Tensor, sigma_t: Sigma
) -> GaussianMixture:
    """Re-condition an x0-GM from the state (x_src, σ_src) to (x_t, σ_t) (spec 3.5, GM-ODE).

    The GM implies the data density p(x0) ∝ q(x0 | x_src)/N(x_src; α_src x0, σ_src² I);
    conditioning it on x_t gives
        p(x0 | x_t) ∝ q(x0 | x_src)·N(x_t; α_t x0, σ_t²)/N(x_src; α_src x0, σ_src²),
    i.e. the GM times exp(−½ ζ‖x0‖² + ν·x0) with
        ζ = (α_t/σ_t)² − (α_src/σ_src)²,   ν = α_t x_t/σ_t² − α_src x_src/σ_src²
    (σ's floored at 1e-6), applied by :func:`gmflow.gm.gm_condition`. Exact when the data is a
    shared-variance GM; the identity when (x_t, σ_t) = (x_src, σ_src).

    Args:
        gm_x0: means (..., K, C, H, W), the x0-GM obtained at (x_src, σ_src).
        x_src: (..., C, H, W).
        sigma_src: scalar or (...) per sample.
        x_t: (..., C, H, W), the new state.
        sigma_t: scalar or (...) per sample.

    Returns:
        The re-conditioned x0-GM.
    """
    _check_event("posterior_condition", gm_x0, x_src, "x_src")
    _check_event("posterior_condition", gm_x0, x_t, "x_t")
    precision, linear = _reconditioning_terms(x_src, sigma_src, x_t, sigma_t)
    return gm_condition(gm_x0, precision, linear)


def posterior_mean(
    gm_x0: GaussianMixture, x_src: Tensor, sigma_src: Sigma, x_t: Tensor, sigma_t: Sigma
) -> Tensor:
    """Mean of :func:`posterior_condition`, E[x0 | x_t] under the re-conditioned GM (fused form).

    Returns:
        (..., C, H, W).
    """
    _check_event("posterior_mean", gm_x0, x_src, "x_src")
    _check_event("posterior_mean", gm_x0, x_t, "x_t")
    precision, linear = _reconditioning_terms(x_src, sigma_src, x_t, sigma_t)
    return gm_condition_mean(gm_x0, precision, linear)
