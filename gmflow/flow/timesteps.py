"""Noise levels: training samplers and transition pairs (spec 4.1, 4.2), inference grids (spec 8.1).

All levels are σ ∈ [0, 1] (see the notation block of :mod:`gmflow.flow`); the reference's
timestep t = 1000·σ never appears here.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from gmflow.errors import ConfigError
from gmflow.flow.path import add_noise, forward_transition

__all__ = [
    "TRAIN_SIGMA_EPS",
    "shift_sigma",
    "sample_timesteps",
    "transition_pair",
    "sigma_grid",
]

TRAIN_SIGMA_EPS = 1e-7  # training floor of σ: the reference clamps t ≥ 1e-4 in units of t = 1000·σ


def shift_sigma(sigma: Tensor, shift: float) -> Tensor:
    """Warp noise levels towards noise: shift(σ) = s·σ / (1 + (s − 1)·σ) (spec 4.1, 8.1).

    Monotone increasing for s > 0, maps 0 → 0 and 1 → 1; s = 1 is the identity.
    """
    if not shift > 0:
        raise ConfigError(f"shift must be > 0 (1 = no shift), got {shift}")
    if shift == 1.0:
        return sigma
    scaled = shift * sigma
    return scaled / (scaled + (1 - sigma))  # = s·σ/(1 + (s − 1)·σ), exactly 1 at σ = 1


def sample_timesteps(
    batch: int,
    *,
    kind: Literal["uniform", "logit_normal"] = "uniform",
    shift: float = 1.0,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    eps: float = TRAIN_SIGMA_EPS,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw training noise levels σ_high (spec 4.1).

    raw r = 1 − U[0, 1) ∈ (0, 1] (``uniform``, the toy) or r = sigmoid(N(mean, std²))
    (``logit_normal``, ImageNet); then σ = shift(r) (see :func:`shift_sigma`), clamped to [eps, 1].

    Args:
        batch: B, the number of levels.
        kind: ``"uniform"`` or ``"logit_normal"``.
        shift: s > 0 of the shift warp; 1 is the identity (used by every GMFlow recipe).
        mean: location of the logit-normal's Gaussian.
        std: scale of the logit-normal's Gaussian.
        generator: torch RNG for reproducible draws.
        eps: lower clamp of σ (1e-7, the reference's t ≥ 1e-4 in units of 1000·σ).
        device: where to put the levels.
        dtype: float dtype of the levels.

    Returns:
        σ of shape (B,).
    """
    if batch < 1:
        raise ConfigError(f"sample_timesteps: batch must be >= 1, got {batch}")
    if not 0 <= eps < 1:
        raise ConfigError(f"sample_timesteps: eps must lie in [0, 1), got {eps}")
    match kind:
        case "uniform":
            raw = 1 - torch.rand(batch, generator=generator, device=device, dtype=dtype)
        case "logit_normal":
            if not std > 0:
                raise ConfigError(f"sample_timesteps: logit-normal std must be > 0, got {std}")
            z = torch.randn(batch, generator=generator, device=device, dtype=dtype)
            raw = torch.sigmoid(mean + std * z)
        case _:
            raise ConfigError(
                f"sample_timesteps: kind={kind!r}; expected 'uniform' or 'logit_normal'"
            )
    return shift_sigma(raw, shift).clamp(eps, 1.0)


def transition_pair(
    x0: Tensor,
    sigma_high: Tensor,
    trans_ratio: float,
    generator: torch.Generator | None = None,
    eps: float = TRAIN_SIGMA_EPS,
) -> tuple[Tensor, Tensor, Tensor]:
    """Draw a transition pair (x_low, x_high) for the transition loss (spec 4.2).

    σ_low = max(0, min(σ_high (1 − λ), σ_high − eps)),  x_low = α_low x0 + σ_low ε0,
    x_high = (α_high/α_low) x_low + sqrt(σ_high² − (α_high σ_low/α_low)²) ε1,
    with independent ε0, ε1 ~ N(0, I). x_high then has the marginal α_high x0 + σ_high ε, and
    λ = 1 gives σ_low = 0 and x_low = x0 (the plain GM NLL).

    Args:
        x0: (B, C, H, W) data.
        sigma_high: (B,) noise levels of the network input.
        trans_ratio: λ ∈ (0, 1] (toy 0.9, ImageNet 0.5, 1 = plain NLL).
        generator: torch RNG for the two noises.
        eps: minimum gap σ_high − σ_low.

    Returns:
        (x_low, x_high, sigma_low): (B, C, H, W), (B, C, H, W), (B,).
    """
    if not 0 < trans_ratio <= 1:
        raise ConfigError(
            f"transition_pair: trans_ratio must lie in (0, 1] (1 = plain GM NLL), got {trans_ratio}"
        )
    if sigma_high.dim() != 1 or sigma_high.shape[0] != x0.shape[0]:
        raise ValueError(
            f"transition_pair: sigma_high must have shape (B,) = ({x0.shape[0]},) to match x0 "
            f"{tuple(x0.shape)}, got {tuple(sigma_high.shape)}"
        )
    sigma_high = sigma_high.to(x0.dtype)
    sigma_low = torch.minimum(sigma_high * (1 - trans_ratio), sigma_high - eps).clamp_min(0)
    noise_low = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    noise_high = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_low = add_noise(x0, noise_low, sigma_low)
    x_high = forward_transition(x_low, sigma_low, sigma_high, noise_high)
    return x_low, x_high, sigma_low


def sigma_grid(
    num_steps: int,
    shift: float = 1.0,
    *,
    sigma_max: float = 1.0,
    sigma_min: float = 0.0,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Inference grid of M steps, strictly decreasing from σ_0 to σ_M = 0 (spec 8.1).

    r_j = r_max − j (r_max − r_min)/M for j = 0..M−1, σ_j = shift(r_j), then σ_M = 0 appended.
    Defaults give σ_j = 1 − j/M.

    Args:
        num_steps: M ≥ 1 (for GM-ODE, network steps × sub-steps).
        shift: s > 0 of the shift warp.
        sigma_max: r_max ∈ (0, 1].
        sigma_min: r_min ∈ [0, r_max).
        dtype: float dtype of the grid.

    Returns:
        (M + 1,) levels.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ConfigError(f"sigma_grid: num_steps must be an integer >= 1, got {num_steps!r}")
    if not 0 <= sigma_min < sigma_max <= 1:
        raise ConfigError(
            f"sigma_grid: need 0 <= sigma_min < sigma_max <= 1, got sigma_min={sigma_min}, "
            f"sigma_max={sigma_max}"
        )
    j = torch.arange(num_steps, dtype=dtype)
    raw = sigma_max - j * (sigma_max - sigma_min) / num_steps
    return torch.cat([shift_sigma(raw, shift), torch.zeros(1, dtype=dtype)])
