"""Log-densities, sampling and Monte-Carlo divergences of Gaussian mixtures (spec 7.12, 7.13)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gmflow.gm import backend as _backend
from gmflow.gm._checks import check_batch, promote, promote_gm
from gmflow.gm._shapes import broadcast_shapes
from gmflow.gm.full import full_gm_logprob, full_gm_to_sample
from gmflow.gm.mixture import (
    AnyGaussianMixture,
    FullGaussianMixture,
    GaussianMixture,
    IsoGaussian,
    gm_dtype,
)
from gmflow.gm.random import Generators, categorical, randn

__all__ = ["iso_gaussian_logprob", "gm_logprob", "gm_to_sample", "gm_kl_div", "gm_entropy"]

_LOG_2PI = math.log(2 * math.pi)


def iso_gaussian_logprob(g: IsoGaussian, x: Tensor) -> Tensor:
    """Log-density of N(m, v I_C) per pixel: −½‖x − m‖²/v − (C/2) log v − (C/2) log 2π.

    Args:
        g: mean (..., C, H, W), var (..., 1, H, W) or (..., 1, 1, 1).
        x: (..., n, C, H, W) points.

    Returns:
        (..., n, H, W).
    """
    c = g.mean.shape[-3]
    if x.dim() < 4 or x.shape[-3] != c or x.shape[-2:] != g.mean.shape[-2:]:
        raise ValueError(
            f"iso_gaussian_logprob: x must be (..., n, C={c}, H, W) to match mean "
            f"{tuple(g.mean.shape)}, got {tuple(x.shape)}"
        )
    try:
        broadcast_shapes(tuple(x.shape[:-4]), tuple(g.mean.shape[:-3]))
    except RuntimeError:
        raise ValueError(
            f"iso_gaussian_logprob: x batch dims {tuple(x.shape[:-4])} do not broadcast with the "
            f"mean batch dims {tuple(g.mean.shape[:-3])} (x {tuple(x.shape)}, mean "
            f"{tuple(g.mean.shape)})"
        ) from None
    mean, var, x = promote(g.mean, g.var, x)
    sq = (x - mean.unsqueeze(-4)).square().sum(dim=-3)  # (..., n, H, W)
    v = var.unsqueeze(-4).squeeze(-3)  # (..., 1, h, w)
    return -0.5 * sq / v - 0.5 * c * (torch.log(v) + _LOG_2PI)


def _check_points(name: str, gm: GaussianMixture, x: Tensor) -> None:
    c, h, w = gm.means.shape[-3:]
    if x.dim() < 4 or tuple(x.shape[-3:]) != (c, h, w):
        raise ValueError(
            f"{name}: x must be (..., n, C={c}, H={h}, W={w}), with a sample axis n before C, to "
            f"match the mixture means {tuple(gm.means.shape)}, got {tuple(x.shape)}; add a "
            "sample axis with x.unsqueeze(-4)"
        )
    check_batch(name + ": x", gm, tuple(x.shape[:-4]))


def gm_logprob_torch(gm: GaussianMixture, x: Tensor) -> Tensor:
    """Reference (torch, differentiable) mixture log-density; see :func:`gm_logprob`."""
    c = gm.num_channels
    means = gm.means.unsqueeze(-5)  # (..., 1, K, C, H, W)
    xs = x.unsqueeze(-4)  # (..., n, 1, C, H, W)
    logstds = gm.logstds.unsqueeze(-5)  # (..., 1, 1|K, 1, 1, 1)
    sq = (xs - means).square().sum(dim=-3, keepdim=True)  # (..., n, K, 1, H, W)
    comp = -0.5 * sq * torch.exp(-2 * logstds) - c * logstds - 0.5 * c * _LOG_2PI
    return torch.logsumexp(gm.logweights.unsqueeze(-5) + comp, dim=-4).squeeze(-3)


def gm_logprob(gm: AnyGaussianMixture, x: Tensor) -> Tensor:
    """Log-density of each pixel's mixture (spec 7.13).

    log p(x) = logsumexp_k [log A_k − ½‖x − μ_k‖²/s_k² − C log s_k − (C/2) log 2π]; a
    :class:`FullGaussianMixture` uses its Cholesky factors instead
    (:func:`~gmflow.gm.full.full_gm_logprob`).

    Args:
        gm: means (..., K, C, H, W), or a full mixture (channel-last).
        x: (..., n, C, H, W).

    Returns:
        (..., n, H, W).
    """
    if isinstance(gm, FullGaussianMixture):
        return full_gm_logprob(gm, x)
    _check_points("gm_logprob", gm, x)
    gm, (x,) = promote_gm(gm, x)
    kernel = _backend.kernel_for("gm_logprob", gm.means, gm.logweights, gm.logstds, x)
    if kernel is not None:
        return kernel(gm.means, gm.logweights, gm.logstds, x)
    return gm_logprob_torch(gm, x)


def gm_to_sample(
    gm: AnyGaussianMixture,
    n: int = 1,
    power: float = 1.0,
    generator: Generators = None,
    cov_sharpen: bool = False,
) -> Tensor:
    """Draw n samples per pixel: a component from softmax(p·log A), then μ_k + s_k·N(0, I).

    Spec 7.12.

    Pixels are independent. Exact for p = 1. ``generator`` is one torch.Generator, None (the
    global RNG), or one generator per row of the leading batch dim (see :mod:`gmflow.gm.random`).
    ``cov_sharpen`` also narrows each component to s_k/√p: with the weights A^p, the samples then
    follow GM(x)^p (normalised) for well-separated components, each N(μ_k, s_k²)^p ∝ N(μ_k, s_k²/p).
    A :class:`FullGaussianMixture` adds L_k z with the Cholesky factor L_k of the chosen
    covariance (:func:`~gmflow.gm.full.full_gm_to_sample`), from the same random numbers.

    Returns:
        (..., n, C, H, W).
    """
    if n < 1:
        raise ValueError(f"gm_to_sample: n must be >= 1, got {n}")
    if cov_sharpen and not power > 0:
        raise ValueError(f"gm_to_sample: cov_sharpen needs power > 0 (std s/√p), got {power}")
    if isinstance(gm, FullGaussianMixture):
        return full_gm_to_sample(gm, n, power, generator, cov_sharpen)
    gm, _ = promote_gm(gm)
    batch = broadcast_shapes(gm.means.shape[:-4], gm.logweights.shape[:-4], gm.logstds.shape[:-4])
    k, c, h, w = gm.means.shape[-4:]
    logw = gm.logweights if power == 1.0 else torch.log_softmax(power * gm.logweights, dim=-4)
    idx = categorical(logw.expand(*batch, k, 1, h, w).squeeze(-3), n, generator)
    idx = idx.unsqueeze(-3)  # (..., n, 1, H, W)
    means = gm.means.expand(*batch, k, c, h, w)
    chosen = torch.gather(means, -4, idx.expand(*batch, n, c, h, w))  # (..., n, C, H, W)
    noise = randn((*batch, n, c, h, w), generator, device=chosen.device, dtype=chosen.dtype)
    logstds = gm.logstds.expand(*batch, *gm.logstds.shape[-4:])
    if logstds.shape[-4] == 1:
        std = logstds.exp()  # (..., 1, 1, 1, 1)
    else:
        std = torch.gather(logstds.expand(*batch, k, 1, h, w), -4, idx).exp()
    if cov_sharpen and power != 1.0:
        std = std * (1.0 / math.sqrt(power))
    return chosen + std * noise


def _event_shape(gm: AnyGaussianMixture) -> tuple[int, int, int]:
    """(C, H, W) of either kind of mixture."""
    if isinstance(gm, FullGaussianMixture):
        h, w, c = gm.means.shape[-3:]
        return c, h, w
    return tuple(gm.means.shape[-3:])  # type: ignore[return-value]


def gm_kl_div(
    p: AnyGaussianMixture,
    q: AnyGaussianMixture,
    n: int = 32,
    generator: Generators = None,
    use_kr: bool = False,
) -> Tensor:
    """Monte-Carlo KL(p ‖ q) = E_p[log p − log q] per pixel with n samples (spec 7.13).

    The samples of p come from :func:`gm_to_sample`, or with ``use_kr`` from the inverse KR map of
    N(0, I) noise (:func:`~gmflow.gm.transport.gaussian_to_gm_samples`, axis-aligned): the same
    distribution, but a reparameterised draw, so the estimate is differentiable in p's parameters
    (the component choice of ``gm_to_sample`` is not). Either mixture may be a
    :class:`FullGaussianMixture`, except p with ``use_kr`` (the KR map needs isotropic components).

    Returns:
        (..., 1, H, W).
    """
    if _event_shape(p) != _event_shape(q):
        raise ValueError(
            f"gm_kl_div: q.means {tuple(q.means.shape)} has the event shape (C, H, W) = "
            f"{_event_shape(q)}, p.means {tuple(p.means.shape)} has {_event_shape(p)}; they "
            "must match"
        )
    check_batch("gm_kl_div: q", p, tuple(q.batch_shape))
    if use_kr and isinstance(p, FullGaussianMixture):
        raise ValueError(
            "gm_kl_div: use_kr=True needs an isotropic p (the Knothe-Rosenblatt map of spec 7.9 "
            "assumes components s_k² I), got a FullGaussianMixture; pass use_kr=False"
        )
    if use_kr:
        from gmflow.gm.transport import gaussian_to_gm_samples  # transport builds on this module

        if n < 1:
            raise ValueError(f"gm_kl_div: n must be >= 1, got {n}")
        batch = broadcast_shapes(p.means.shape[:-4], p.logweights.shape[:-4], p.logstds.shape[:-4])
        z = randn((*batch, n, *p.means.shape[-3:]), generator, device=p.means.device,
                  dtype=gm_dtype(p.means.dtype))  # fmt: skip
        x = gaussian_to_gm_samples(p, z)  # (..., n, C, H, W)
    else:
        x = gm_to_sample(p, n, generator=generator)  # (..., n, C, H, W)
    return (gm_logprob(p, x) - gm_logprob(q, x)).mean(dim=-3, keepdim=True)


def gm_entropy(gm: AnyGaussianMixture, n: int = 32, generator: Generators = None) -> Tensor:
    """Monte-Carlo entropy −E[log p] per pixel with n samples (spec 7.13).

    Returns:
        (..., 1, H, W).
    """
    x = gm_to_sample(gm, n, generator=generator)
    return -gm_logprob(gm, x).mean(dim=-3, keepdim=True)
