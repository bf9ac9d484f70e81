"""Typed records for Gaussian mixtures and Gaussians (see the notation block in ``gmflow.gm``).

Every record is a frozen dataclass of torch tensors with arbitrary leading batch dims ``...``.
Derived quantities are computed by functions in :mod:`gmflow.gm.ops`, never cached in the record.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gmflow.gm._shapes import broadcast_shapes

__all__ = [
    "GaussianMixture",
    "IsoGaussian",
    "Gaussian",
    "FullGaussianMixture",
    "AnyGaussianMixture",
    "gm_dtype",
    "as_scalar_tensor",
]


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_broadcast(name: str, a: tuple[int, ...], b: tuple[int, ...], what: str) -> None:
    try:
        broadcast_shapes(a, b)
    except RuntimeError:
        raise ValueError(
            f"{name}: {what} have shapes {a} and {b}, which do not broadcast; "
            "leading batch dims must match or be 1"
        ) from None


def as_scalar_tensor(
    value: Tensor | float,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``torch.as_tensor`` without a host-to-device copy for Python numbers.

    ``torch.as_tensor(0.5, device="cuda")`` copies from pageable host memory, which waits for the
    stream's queued work: one hidden synchronisation per call, so the host cannot run ahead of the
    GPU during sampling. A Python number becomes a 0-dim ``torch.full`` (a fill kernel) instead;
    tensors go through ``torch.as_tensor`` (no copy when dtype and device already match).
    """
    if not isinstance(value, int | float):  # tensors, arrays, sequences
        return torch.as_tensor(value, dtype=dtype, device=device)
    if dtype is None:
        dtype = (
            torch.bool
            if isinstance(value, bool)
            else torch.int64
            if isinstance(value, int)
            else torch.get_default_dtype()
        )
    return torch.full((), value, dtype=dtype, device=device)


def gm_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Return the dtype GM maths runs in: float64 if any input is float64, else float32.

    Network outputs in bf16/fp16 are promoted, so GM maths never runs in half precision
    (spec 2.3, 17.3).
    """
    return torch.float64 if torch.float64 in dtypes else torch.float32


@dataclass(frozen=True)
class GaussianMixture:
    """Per-pixel isotropic GM, p(x_p) = Σ_k A_{k,p} N(x_p; μ_{k,p}, s² I_C).

    Attributes:
        means: (..., K, C, H, W) component means μ_k.
        logweights: (..., K, 1, H, W) log A_k, normalised so that logsumexp over K is 0.
        logstds: (..., 1, 1, 1, 1) one log s per sample, or (..., K, 1, 1, 1) one per component.
    """

    means: Tensor
    logweights: Tensor
    logstds: Tensor

    def __post_init__(self) -> None:
        m, lw, ls = _shape(self.means), _shape(self.logweights), _shape(self.logstds)
        if len(m) < 4:
            raise ValueError(
                f"GaussianMixture.means: expected shape (..., K, C, H, W), got {m}; "
                "a 2-D point cloud is (B, K, 2, 1, 1)"
            )
        if len(lw) != len(m) or lw[-3] != 1 or lw[-4] != m[-4] or lw[-2:] != m[-2:]:
            raise ValueError(
                f"GaussianMixture.logweights: expected shape (..., K={m[-4]}, 1, H={m[-2]}, "
                f"W={m[-1]}) to match means {m}, got {lw}"
            )
        if len(ls) != len(m) or ls[-3:] != (1, 1, 1) or ls[-4] not in (1, m[-4]):
            raise ValueError(
                f"GaussianMixture.logstds: expected shape (..., 1, 1, 1, 1) or (..., K={m[-4]}, "
                f"1, 1, 1) to match means {m}, got {ls}"
            )
        _check_broadcast("GaussianMixture", m[:-4], lw[:-4], "means and logweights batch dims")
        _check_broadcast("GaussianMixture", m[:-4], ls[:-4], "means and logstds batch dims")

    # ---- shape helpers (cheap, no maths) ----
    @property
    def num_gaussians(self) -> int:
        """K, the number of components."""
        return self.means.shape[-4]

    @property
    def num_channels(self) -> int:
        """C, the event dimension per pixel."""
        return self.means.shape[-3]

    @property
    def batch_shape(self) -> torch.Size:
        """The leading batch dims ``...``."""
        return self.means.shape[:-4]

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    @property
    def device(self) -> torch.device:
        return self.means.device

    def to(self, *args, **kwargs) -> GaussianMixture:  # type: ignore[no-untyped-def]
        """Apply ``Tensor.to`` to every field."""
        return GaussianMixture(
            self.means.to(*args, **kwargs),
            self.logweights.to(*args, **kwargs),
            self.logstds.to(*args, **kwargs),
        )

    def detach(self) -> GaussianMixture:
        return GaussianMixture(self.means.detach(), self.logweights.detach(), self.logstds.detach())

    def __getitem__(self, index) -> GaussianMixture:  # type: ignore[no-untyped-def]
        """Index the leading batch dims (e.g. ``gm[:4]``); K, C, H, W are kept."""
        return GaussianMixture(self.means[index], self.logweights[index], self.logstds[index])

    @staticmethod
    def cat(gms: list[GaussianMixture], dim: int = 0) -> GaussianMixture:
        """Concatenate mixtures along a batch dim."""
        return GaussianMixture(
            torch.cat([g.means for g in gms], dim),
            torch.cat([g.logweights for g in gms], dim),
            torch.cat([g.logstds for g in gms], dim),
        )

    def chunk(self, chunks: int, dim: int = 0) -> tuple[GaussianMixture, ...]:
        """Split along a batch dim (the inverse of :meth:`cat`)."""
        parts = zip(
            self.means.chunk(chunks, dim),
            self.logweights.chunk(chunks, dim),
            self.logstds.chunk(chunks, dim),
            strict=True,
        )
        return tuple(GaussianMixture(m, lw, ls) for m, lw, ls in parts)


@dataclass(frozen=True)
class IsoGaussian:
    """Per-pixel isotropic Gaussian N(x_p; m_p, v_p I_C).

    Attributes:
        mean: (..., C, H, W).
        var: (..., 1, H, W) per pixel or (..., 1, 1, 1) per sample.
    """

    mean: Tensor
    var: Tensor

    def __post_init__(self) -> None:
        m, v = _shape(self.mean), _shape(self.var)
        if len(m) < 3:
            raise ValueError(f"IsoGaussian.mean: expected shape (..., C, H, W), got {m}")
        if len(v) != len(m) or v[-3] != 1 or v[-2:] not in (m[-2:], (1, 1)):
            raise ValueError(
                f"IsoGaussian.var: expected shape (..., 1, H={m[-2]}, W={m[-1]}) or "
                f"(..., 1, 1, 1) to match mean {m}, got {v}"
            )
        _check_broadcast("IsoGaussian", m[:-3], v[:-3], "mean and var batch dims")

    def to(self, *args, **kwargs) -> IsoGaussian:  # type: ignore[no-untyped-def]
        return IsoGaussian(self.mean.to(*args, **kwargs), self.var.to(*args, **kwargs))


@dataclass(frozen=True)
class Gaussian:
    """Per-pixel full-covariance Gaussian, channel-last layout.

    Attributes:
        mean: (..., H, W, C).
        cov: (..., H, W, C, C), symmetric positive definite.
    """

    mean: Tensor
    cov: Tensor

    def __post_init__(self) -> None:
        m, c = _shape(self.mean), _shape(self.cov)
        if len(m) < 3:
            raise ValueError(f"Gaussian.mean: expected shape (..., H, W, C), got {m}")
        if len(c) != len(m) + 1 or c[-2:] != (m[-1], m[-1]) or c[-4:-2] != m[-3:-1]:
            raise ValueError(
                f"Gaussian.cov: expected shape (..., H={m[-3]}, W={m[-2]}, C={m[-1]}, "
                f"C={m[-1]}) to match mean {m}, got {c}"
            )


@dataclass(frozen=True)
class FullGaussianMixture:
    """Per-pixel GM with full covariances (spec 7.7), channel-last layout.

    Arises as the product of an isotropic GM and a full-covariance Gaussian
    (:func:`~gmflow.gm.gm_mul_gaussian`) or from :func:`~gmflow.gm.gm_to_full`. The consumers
    (``gm_to_mean``, ``gm_to_iso_gaussian``, ``gm_to_gaussian``, ``gm_to_sample``, ``gm_logprob``,
    ``gm_kl_div``, ``gm_entropy``, ``gm_temperature``) accept it wherever they accept an isotropic
    mixture, and take and return points in the image layout (..., n, C, H, W).

    Attributes:
        means: (..., K, H, W, C).
        covs: (..., 1 or K, H, W, C, C).
        logweights: (..., K, H, W), logsumexp over K is 0.
    """

    means: Tensor
    covs: Tensor
    logweights: Tensor

    def __post_init__(self) -> None:
        m, c, lw = _shape(self.means), _shape(self.covs), _shape(self.logweights)
        if len(m) < 4:
            raise ValueError(f"FullGaussianMixture.means: expected (..., K, H, W, C), got {m}")
        if len(c) != len(m) + 1 or c[-2:] != (m[-1], m[-1]) or c[-5] not in (1, m[-4]):
            raise ValueError(
                f"FullGaussianMixture.covs: expected (..., 1 or K, H, W, C, C) to match means "
                f"{m}, got {c}"
            )
        if len(lw) != len(m) - 1 or lw[-3:] != m[-4:-1]:
            raise ValueError(
                f"FullGaussianMixture.logweights: expected (..., K, H, W) to match means {m}, "
                f"got {lw}"
            )
        _check_broadcast("FullGaussianMixture", m[:-4], c[:-5], "means and covs batch dims")
        _check_broadcast("FullGaussianMixture", m[:-4], lw[:-3], "means and logweights batch dims")

    @property
    def num_gaussians(self) -> int:
        """K, the number of components."""
        return self.means.shape[-4]

    @property
    def num_channels(self) -> int:
        """C, the event dimension per pixel."""
        return self.means.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        """The leading batch dims ``...`` (of all three fields, broadcast)."""
        return broadcast_shapes(self.means.shape[:-4], self.covs.shape[:-5],
                                self.logweights.shape[:-3])  # fmt: skip

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    @property
    def device(self) -> torch.device:
        return self.means.device

    def to(self, *args, **kwargs) -> FullGaussianMixture:  # type: ignore[no-untyped-def]
        """Apply ``Tensor.to`` to every field."""
        return FullGaussianMixture(
            self.means.to(*args, **kwargs),
            self.covs.to(*args, **kwargs),
            self.logweights.to(*args, **kwargs),
        )

    def detach(self) -> FullGaussianMixture:
        return FullGaussianMixture(
            self.means.detach(), self.covs.detach(), self.logweights.detach()
        )


AnyGaussianMixture = GaussianMixture | FullGaussianMixture
"""An isotropic or a full-covariance mixture: what the GM consumers accept."""
