"""Single solver steps over a σ grid: pure functions of the state (spec 8.1, 8.2).

Used by :func:`gmflow.flow.solvers.sample` and by the Diffusers schedulers of
:mod:`gmflow.pipelines`. Python-float levels (the samplers' grids) take a fused path of one or two
tensor ops (one kernel launch each on a GPU); per-sample tensor levels the general one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gmflow.flow.path import SIGMA_FLOOR, Sigma, _are_numbers, _as_level, _per_sample
from gmflow.gm.mixture import gm_dtype

__all__ = ["flow_euler_step", "flow_sde_step", "default_num_substeps"]


def flow_euler_step(x_t: Tensor, x0_hat: Tensor, sigma: Sigma, sigma_next: Sigma) -> Tensor:
    """One Euler step of dx/dσ = (x − x̂0)/σ in its x0 form (FlowEulerODE, spec 8.1).

    x' = (σ'/σ) x + (1 − σ'/σ) x̂0 = x + (σ' − σ)(x − x̂0)/σ (a DDIM step); σ' = 0 returns x̂0.

    Args:
        x_t: (B, C, H, W).
        x0_hat: the x0 estimate, same shape.
        sigma: σ, scalar or (B,).
        sigma_next: σ' < σ, scalar or (B,).

    Returns:
        x at σ'.
    """
    if _are_numbers(sigma, sigma_next):  # the samplers' grids: one fused op (a launch on GPUs)
        ratio = float(sigma_next) / max(float(sigma), SIGMA_FLOOR)
        dtype = torch.promote_types(gm_dtype(x_t.dtype), x0_hat.dtype)
        return torch.lerp(x0_hat.to(dtype), x_t.to(dtype), ratio)
    s = _per_sample(_as_level(sigma, x_t), 3).clamp_min(SIGMA_FLOOR)
    ratio = _per_sample(_as_level(sigma_next, x_t), 3) / s
    return ratio * x_t + (1 - ratio) * x0_hat


def flow_sde_step(
    x_t: Tensor,
    x0_hat: Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    noise: Tensor,
    diffusion: float = 1.0,
) -> Tensor:
    """One step of the canonical flow SDE with diffusion coefficient h (FlowSDE, spec 8.1).

    With ε̂ = (x − α x̂0)/σ and m = (σ' α/(σ α'))^{h²} (σ, σ α' floored at 1e-6):
        x' = α' x̂0 + σ' (m ε̂ + sqrt(1 − m²) z).
    h = 1 is exactly the DDPM posterior sample c1 x + c2 x̂0 + sqrt(c3) z (spec 1.3), h = 0 the
    Euler/DDIM step; σ' = 0 returns x̂0.

    Args:
        x_t: (B, C, H, W).
        x0_hat: the x0 estimate, same shape.
        sigma: σ, scalar or (B,).
        sigma_next: σ' ≤ σ, scalar or (B,).
        noise: z ~ N(0, I), same shape as ``x_t``.
        diffusion: h ≥ 0.

    Returns:
        x at σ'.
    """
    if _are_numbers(sigma, sigma_next):  # the same maths as coefficients of x, x̂0 and z
        s, s_next = float(sigma), float(sigma_next)
        a, a_next = 1 - s, 1 - s_next
        m = (s_next * a / max(s * a_next, SIGMA_FLOOR)) ** (diffusion**2)
        c_x = s_next * m / max(s, SIGMA_FLOOR)
        dtype = torch.promote_types(gm_dtype(x_t.dtype), x0_hat.dtype)
        out = torch.add(x_t.to(dtype) * c_x, x0_hat.to(dtype), alpha=a_next - c_x * a)
        return torch.add(out, noise.to(dtype), alpha=s_next * math.sqrt(max(1 - m * m, 0.0)))
    s = _per_sample(_as_level(sigma, x_t), 3)
    s_next = _per_sample(_as_level(sigma_next, x_t), 3)
    a, a_next = 1 - s, 1 - s_next
    eps_hat = (x_t - a * x0_hat) / s.clamp_min(SIGMA_FLOOR)
    m = (s_next * a / (s * a_next).clamp_min(SIGMA_FLOOR)).pow(diffusion**2)
    return a_next * x0_hat + s_next * (m * eps_hat + (1 - m.square()).clamp_min(0).sqrt() * noise)


def default_num_substeps(num_steps: int) -> int:
    """GM-ODE sub-steps S for N network steps, the paper's setting (spec 14).

    max(ceil(128 / N), 2), so that N·S ≥ 128 fine steps, except S = 8 at N = 4 and N = 6.
    """
    if num_steps in (4, 6):
        return 8
    return max(math.ceil(128 / num_steps), 2)
