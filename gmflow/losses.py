"""Training losses: the transition GM negative log-likelihood (spec 4.3).

The spectral loss of the spectrum MLP (spec 4.4) lives in :mod:`gmflow.flow.spectral`.
"""

from __future__ import annotations

from torch import Tensor

from gmflow.flow.path import Sigma, reverse_transition
from gmflow.gm import GaussianMixture, gm_logprob

__all__ = ["DEFAULT_LOSS_SCALE", "transition_nll", "transition_loss"]

DEFAULT_LOSS_SCALE = 1.0
"""Default ``scale`` of :func:`transition_loss`: the loss is then the NLL in nats per dimension.

The [LL] recipes multiply by 8.0 (ImageNet, C = 4) and 2.0 (toy, C = 2), i.e. 2× and 1× the
channel-summed NLL; pass those values to reproduce their gradient scale. With 1.0 the value is
comparable across channel counts and resolutions (the paper's bits/dim = value / ln 2 at λ = 1).
"""


def transition_nll(
    gm_u: GaussianMixture,
    x_low: Tensor,
    x_high: Tensor,
    sigma_low: Sigma,
    sigma_high: Sigma,
) -> Tensor:
    """Per-pixel NLL of x_low under the reverse-transition GM from (x_high, σ_high) (spec 4.3).

    ℓ_p = − logsumexp_k [ log A_k − ‖x_low,p − m_k,p‖²/(2S²) − C log S − (C/2) log 2π ],
    with m_k = c1 x_high + c2 (x_high − σ_high μ_k^{u}) and S² = (σ_high c2 s)² + c3 the transition
    GM of :func:`gmflow.flow.reverse_transition`, computed in fp32 (fp64 for fp64 inputs) whatever
    the network dtype. At σ_low = 0 this is exactly the u-space NLL + C log σ_high.

    Args:
        gm_u: the network's u-GM at (x_high, σ_high), means (B, K, C, H, W).
        x_low: (B, C, H, W).
        x_high: (B, C, H, W), the network input.
        sigma_low: σ_low, scalar or (B,).
        sigma_high: σ_high, scalar or (B,).

    Returns:
        ℓ_p of shape (B, H, W), summed over channels, with the Gaussian constant.
    """
    if x_low.shape != x_high.shape:
        raise ValueError(
            f"transition_nll: x_low {tuple(x_low.shape)} and x_high {tuple(x_high.shape)} must "
            "have the same shape (B, C, H, W)"
        )
    gm_low = reverse_transition(gm_u, x_high, sigma_high, sigma_low)
    return -gm_logprob(gm_low, x_low.unsqueeze(-4)).squeeze(-3)


def transition_loss(
    gm_u: GaussianMixture,
    x_low: Tensor,
    x_high: Tensor,
    sigma_low: Sigma,
    sigma_high: Sigma,
    scale: float = DEFAULT_LOSS_SCALE,
) -> Tensor:
    """The transition loss in the [LL] normalisation (spec 4.3): scale · mean_{B,H,W}(ℓ_p / C).

    ℓ_p is :func:`transition_nll` (channel-summed, with the (C/2) log 2π constant). Up to an
    additive constant this equals the [orig] normalisation (channel-summed NLL without the constant,
    times scale/C): same gradients. ``trans_ratio = 1`` (σ_low = 0) gives the plain GM NLL of u plus
    C log σ_high per pixel; K = 1 with a fixed std is the L2 flow-matching loss.

    Args:
        gm_u: the network's u-GM at (x_high, σ_high), means (B, K, C, H, W).
        x_low: (B, C, H, W).
        x_high: (B, C, H, W).
        sigma_low: σ_low, scalar or (B,).
        sigma_high: σ_high, scalar or (B,).
        scale: multiplier; default 1.0 (nats per dimension, see :data:`DEFAULT_LOSS_SCALE`);
            the reference recipes use 8.0 (ImageNet) and 2.0 (toy).

    Returns:
        A scalar: the batch mean.
    """
    nll = transition_nll(gm_u, x_low, x_high, sigma_low, sigma_high)  # (B, H, W)
    return scale * nll.mean() / gm_u.num_channels
