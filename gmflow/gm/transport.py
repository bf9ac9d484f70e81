"""Knothe-Rosenblatt (KR) transport between a Gaussian mixture and N(0, I), per pixel (spec 7.9).

Per pixel, in a C×C orthonormal basis V (eigenvectors of the moment-matched covariance, columns in
descending eigenvalue order), the mixture is factorised axis by axis, a = 0..C−1:
    p(x̃) = Π_a p(x̃_a | x̃_{<a}),   p(x̃_a | x̃_{<a}) = Σ_k A_k^{(a)} N(x̃_a; μ̃_{k,a}, s_k²),
    log A_k^{(a)} = log_softmax_k(log A_k − Σ_{b<a} [½ ((x̃_b − μ̃_{k,b})/s_k)² + log s_k]),
the posterior component weights given the earlier coordinates (exact because the components are
isotropic; the log s_k term is constant over k, hence void, for a shared std). The forward map
sends each coordinate through its conditional CDF and the Gaussian quantile,
z_a = √2·erfinv(F̃_a(x̃_a)); the inverse solves F̃_a(x̃_a) = erf(z_a/√2) by Newton
(:func:`~gmflow.gm.inverse_cdf.gm1d_inverse_cdf`).

Bases: ``axis_aligned=True`` uses one V per sample, from the covariance Σ_p = Σ_k A_k d_k d_kᵀ +
Σ_k A_k s_k² I averaged over the sample's pixels (the KR axes the spectrum MLP of spec 9 refers to);
``axis_aligned=False`` uses one V per pixel. V is computed without gradient, in the GM maths dtype
(fp64 for fp64 inputs, where the spec says fp32: the basis is only a choice of coordinates, and
fp64 keeps the fp64 round trip exact), by :func:`gmflow.gm.eigh.eigh_descending`: LAPACK on CPU, a
sync-free Jacobi method on the GPU, each eigenvector with a canonical sign (largest entry
positive), so both devices pick the same basis. With ``axis_aligned`` the Gaussian side lives in
the rotated coordinates (the forward map returns z̃, the inverse takes z̃); otherwise it is rotated
back, z = V z̃.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gmflow.gm._checks import check_gm_event, promote_gm
from gmflow.gm._shapes import broadcast_shapes
from gmflow.gm.eigh import eigh_descending
from gmflow.gm.inverse_cdf import gm1d_inverse_cdf, gm1d_pdf_cdf
from gmflow.gm.mixture import GaussianMixture
from gmflow.gm.moments import gm_to_gaussian

__all__ = ["gm_to_gaussian_samples", "gaussian_to_gm_samples"]


def _check_args(name: str, gm: GaussianMixture, t: Tensor, what: str, n_axes: int | None) -> int:
    if t.dim() < 4:
        raise ValueError(
            f"{name}: {what} must be (..., n, C, H, W) with a sample axis n before C, got "
            f"{tuple(t.shape)}; add one with unsqueeze(-4)"
        )
    check_gm_event(f"{name}: {what}", gm, tuple(t.shape[:-4] + t.shape[-3:]), "samples")
    if t.shape[-2:] != gm.means.shape[-2:]:
        raise ValueError(
            f"{name}: {what} spatial size {tuple(t.shape[-2:])} differs from the mixture's "
            f"{tuple(gm.means.shape[-2:])}"
        )
    c = gm.num_channels
    n_axes = c if n_axes is None else n_axes
    if not 0 <= n_axes <= c:
        raise ValueError(f"{name}: n_axes must be in [0, C={c}], got {n_axes}")
    return n_axes


def _kr_basis(gm: GaussianMixture, axis_aligned: bool) -> Tensor:
    """Return V, (..., C, C) or per pixel (..., H, W, C, C): eigenvector columns, descending."""
    with torch.no_grad():
        cov = gm_to_gaussian(gm.detach()).cov  # (..., H, W, C, C)
        if axis_aligned:
            cov = cov.mean(dim=(-4, -3))  # (..., C, C)
        return eigh_descending(cov)[1]


def _rotate(v: Tensor, t: Tensor, axis_aligned: bool, transpose: bool) -> Tensor:
    """Return Vᵀ t (``transpose``) or V t for t (..., n, C, H, W), channels as the vector axis."""
    rows = "ca" if transpose else "ac"
    spec = f"...{rows},...nchw->...nahw" if axis_aligned else f"...hw{rows},...nchw->...nahw"
    return torch.einsum(spec, v, t)


def _condition(logw: Tensor, logstds: Tensor, mu_a: Tensor, x_a: Tensor) -> Tensor:
    """Posterior weights after observing coordinate a: (..., n, K, 1, H, W)."""
    d = (x_a.unsqueeze(-4) - mu_a) * torch.exp(-logstds)  # (..., n, K, 1, H, W)
    return torch.log_softmax(logw - 0.5 * d.square() - logstds, dim=-4)


def gm_to_gaussian_samples(
    gm: GaussianMixture,
    x: Tensor,
    n_axes: int | None = None,
    axis_aligned: bool = True,
    eps: float = 1e-6,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Map mixture samples to standard-normal samples by the forward KR map (closed form, spec 7.9).

    z_a = √2·erfinv(clamp(F̃_a(x̃_a | x̃_{<a}), −1 + eps, 1 − eps)) for a < n_axes, where
    F̃_a(y) = Σ_k A_k^{(a)} erf((y − μ̃_{k,a})/(s_k√2)); coordinates a >= n_axes are fresh N(0, 1)
    noise. Samples of the mixture map to N(0, I) samples. Differentiable (except through V).

    Args:
        gm: means (..., K, C, H, W).
        x: (..., n, C, H, W) points.
        n_axes: number of KR axes mapped (default C); the rest are filled with noise.
        axis_aligned: one basis per sample (True) or per pixel (False); see the module docstring.
        eps: clamp of F̃ before erfinv.
        generator: random generator of the fill noise (n_axes < C).

    Returns:
        (..., n, C, H, W) Gaussian samples: z̃ in the rotated coordinates if ``axis_aligned``,
        else V z̃; fp32 or fp64.

    Raises:
        ValueError: if x does not match the mixture or n_axes is outside [0, C].
    """
    n_axes = _check_args("gm_to_gaussian_samples", gm, x, "x", n_axes)
    gm, (x,) = promote_gm(gm, x)
    v = _kr_basis(gm, axis_aligned)
    mu = _rotate(v, gm.means, axis_aligned, transpose=True).unsqueeze(-5)  # (..., 1, K, C, H, W)
    x_rot = _rotate(v, x, axis_aligned, transpose=True)  # (..., n, C, H, W)
    logstds = gm.logstds.unsqueeze(-5)  # (..., 1, 1|K, 1, 1, 1)
    logw = gm.logweights.unsqueeze(-5)  # (..., 1, K, 1, H, W)
    z_axes = []
    for a in range(n_axes):
        mu_a = mu[..., a : a + 1, :, :]  # (..., 1, K, 1, H, W)
        x_a = x_rot[..., a : a + 1, :, :]  # (..., n, 1, H, W)
        _, cdf = gm1d_pdf_cdf(GaussianMixture(mu_a, logw, logstds), x_a)
        z_axes.append(math.sqrt(2.0) * torch.erfinv(cdf.clamp(-1 + eps, 1 - eps)))
        if a + 1 < n_axes:
            logw = _condition(logw, logstds, mu_a, x_a)
    if n_axes < gm.num_channels:
        shape = (*x_rot.shape[:-3], gm.num_channels - n_axes, *x_rot.shape[-2:])
        z_axes.append(torch.randn(shape, generator=generator, dtype=x.dtype, device=x.device))
    z = torch.cat(z_axes, dim=-3)  # (..., n, C, H, W)
    return z if axis_aligned else _rotate(v, z, axis_aligned, transpose=False)


def _sample_rest(
    logw: Tensor,
    logstds: Tensor,
    mu_rest: Tensor,
    batch: torch.Size,
    generator: torch.Generator | None,
) -> Tensor:
    """Draw coordinates a >= n_axes from the conditional mixture: (*batch, C', H, W)."""
    k, c_rest, h, w = mu_rest.shape[-4:]
    weights = logw.exp().expand(*batch, k, 1, h, w)  # (..., n, K, 1, H, W)
    cdf = weights.cumsum(dim=-4)
    u = torch.rand((*batch, 1, 1, h, w), generator=generator, dtype=cdf.dtype, device=cdf.device)
    idx = (cdf < u * cdf[..., -1:, :, :, :]).sum(dim=-4, keepdim=True).clamp_max(k - 1)
    means = mu_rest.expand(*batch, k, c_rest, h, w)
    chosen = torch.gather(means, -4, idx.expand(*batch, 1, c_rest, h, w)).squeeze(-4)
    ls = logstds.expand(*batch, logstds.shape[-4], 1, 1, 1)
    if ls.shape[-4] > 1:
        ls = torch.gather(ls.expand(*batch, k, 1, h, w), -4, idx)  # (..., n, 1, 1, H, W)
    noise = torch.randn(chosen.shape, generator=generator, dtype=chosen.dtype, device=chosen.device)
    return chosen + ls.squeeze(-4).exp() * noise


def gaussian_to_gm_samples(
    gm: GaussianMixture,
    z: Tensor,
    n_axes: int | None = None,
    axis_aligned: bool = True,
    n_steps: int = 16,
    eps: float = 1e-6,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Map standard-normal samples to mixture samples by the inverse KR map (Newton, spec 7.9).

    For a < n_axes: x̃_a solves F̃_a(x̃_a | x̃_{<a}) = erf(z̃_a/√2) (:func:`gm1d_inverse_cdf`, started
    from z̃_a); coordinates a >= n_axes are drawn from the conditional mixture given x̃_{<n_axes}
    (component from A^{(n_axes)}, then μ̃_{k,a} + s_k·N(0, 1)). Returns x = V x̃. Runs in fp32 at
    least (fp64 stays fp64) and casts back to the dtype of ``z``. Differentiable (implicit-function
    gradient of the Newton solves; not through V).

    Args:
        gm: means (..., K, C, H, W).
        z: (..., n, C, H, W) standard-normal samples (rotated coordinates z̃ if ``axis_aligned``).
        n_axes: number of KR axes solved (default C); the rest are sampled.
        axis_aligned: one basis per sample (True) or per pixel (False).
        n_steps: Newton iterations per axis.
        eps: floors and clamps of the Newton solve.
        generator: random generator for the sampled axes (n_axes < C).

    Returns:
        (..., n, C, H, W) samples of the mixture, in the dtype of ``z``.

    Raises:
        ValueError: if z does not match the mixture or n_axes is outside [0, C].
    """
    n_axes = _check_args("gaussian_to_gm_samples", gm, z, "z", n_axes)
    out_dtype = z.dtype
    gm, (z,) = promote_gm(gm, z)
    v = _kr_basis(gm, axis_aligned)
    mu = _rotate(v, gm.means, axis_aligned, transpose=True).unsqueeze(-5)  # (..., 1, K, C, H, W)
    z_rot = z if axis_aligned else _rotate(v, z, axis_aligned, transpose=True)
    logstds = gm.logstds.unsqueeze(-5)  # (..., 1, 1|K, 1, 1, 1)
    logw = gm.logweights.unsqueeze(-5)  # (..., 1, K, 1, H, W)
    x_axes = []
    for a in range(n_axes):
        mu_a = mu[..., a : a + 1, :, :]  # (..., 1, K, 1, H, W)
        z_a = z_rot[..., a : a + 1, :, :]  # (..., n, 1, H, W)
        u_a = torch.erf(z_a * math.sqrt(0.5))
        gm1d = GaussianMixture(mu_a, logw, logstds)
        x_a = gm1d_inverse_cdf(gm1d, u_a, n_steps, eps, gaussian_samples=z_a)
        x_axes.append(x_a)
        if a + 1 < gm.num_channels:
            logw = _condition(logw, logstds, mu_a, x_a)
    batch = broadcast_shapes(z_rot.shape[:-3], mu.shape[:-4])
    if n_axes < gm.num_channels:
        x_axes.append(_sample_rest(logw, logstds, mu[..., n_axes:, :, :], batch, generator))
    x_rot = torch.cat([t.expand(*batch, *t.shape[-3:]) for t in x_axes], dim=-3)
    return _rotate(v, x_rot, axis_aligned, transpose=False).to(out_dtype)
