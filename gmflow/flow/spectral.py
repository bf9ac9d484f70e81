"""Spectral sampling of x_0 and the spectral loss of the spectrum MLP (spec 4.4, 9.3).

A GM-DiT output is a per-pixel mixture, so drawing x_0 pixel by pixel leaves white residual
noise. Spectral sampling instead draws the Gaussian variable z of the Knothe-Rosenblatt (KR) map
with a learned power spectrum e^λ over discrete-Hartley frequencies and maps it through the
inverse KR map of the mixture:

    ŝ ~ N(0, diag e^λ),   z = iDHT(ŝ),   x_0 = KR⁻¹_GM(z)               (B, C, H, W)

The discrete Hartley transform (DHT) used here is, per channel, H(z) = Re F(z) + Im F(z) with F
the orthonormal 2-D FFT. It is real, orthonormal and an involution (H(H(z)) = z), so iDHT = DHT;
:func:`idht` nevertheless implements the half-spectrum construction of spec 9.3 (with the output
size passed, so odd sizes work) and the tests check that both agree.

Each pixel's z is N(0, 1) whenever mean_{h,w} e^{λ_c} = 1 (the SpectrumMLP normalisation) and λ
is symmetric under k → −k: Var z_p = (1/HW) Σ_k e^{λ_k} (1 − sin 2θ_{pk}) and the sine term
cancels between k and −k. The spectrum of a stationary field is symmetric, so a trained λ nearly
is; then every pixel's marginal is exactly the GM and only the spatial correlation is learned.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gmflow.gm import (
    GaussianMixture,
    gaussian_to_gm_samples,
    gm_logprob,
    gm_to_gaussian_samples,
)
from gmflow.gm.mixture import as_scalar_tensor
from gmflow.gm.random import Generators, randn

__all__ = [
    "dht",
    "idht",
    "spectral_sample",
    "gm_spectral_logprobs",
    "spectral_loss",
    "SPECTRAL_LOSS_WEIGHT",
]

SPECTRAL_LOSS_WEIGHT = 4.0
"""w_spec of the [LL] spectral loss (spec 4.4 item 6, 11.1)."""


def dht(z: Tensor) -> Tensor:
    """Orthonormal 2-D discrete Hartley transform over the last two axes.

    H(z)[k] = Re F(z)[k] + Im F(z)[k] = (1/√(HW)) Σ_n z[n] (cos θ_{kn} − sin θ_{kn}),
    θ_{kn} = 2π (k_h n_h / H + k_w n_w / W), with F the orthonormal FFT.

    Args:
        z: (..., H, W) real.

    Returns:
        (..., H, W), same dtype; ‖H(z)‖ = ‖z‖ and H(H(z)) = z.
    """
    f = torch.fft.fft2(z, norm="ortho")
    return f.real + f.imag


def idht(s: Tensor) -> Tensor:
    """Inverse DHT through the half spectrum and an inverse real FFT (spec 9.3).

    With s[−k] the index-reversed spectrum (k → −k mod size, per axis), the FFT of the signal is
    F[k] = ((s[k] + s[−k]) + i (s[k] − s[−k])) / 2, which is Hermitian; its non-negative last-axis
    half goes through ``irfft2`` with the output size given, so odd H, W work too.

    Args:
        s: (..., H, W) real DHT coefficients.

    Returns:
        (..., H, W) real; equals :func:`dht` (s) up to rounding.
    """
    h, w = s.shape[-2:]
    s_rev = torch.roll(torch.flip(s, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))
    half = w // 2 + 1
    spectrum = torch.complex(s + s_rev, s - s_rev)[..., :half] * 0.5
    return torch.fft.irfft2(spectrum, s=(h, w), norm="ortho")


def spectral_sample(
    gm_x0: GaussianMixture, log_spectrum: Tensor, generator: Generators = None
) -> Tensor:
    """Draw one x_0 per mixture with spatially correlated KR noise (spec 9.3).

    ŝ ~ N(0, diag e^λ) per channel and frequency, z = iDHT(ŝ), x_0 = KR⁻¹(z) (axis-aligned: channel
    c of z is the c-th KR axis, the c-th eigenvector of the pixel-averaged GM covariance; 16 Newton
    steps). With λ ≡ 0 this is exactly per-pixel KR sampling (z is white N(0, I)).

    Args:
        gm_x0: the x_0-space mixture, means (B, K, C, H, W), logstds (B, 1, 1, 1, 1).
        log_spectrum: λ, (B, C, H, W), e.g. from :class:`gmflow.models.spectrum.SpectrumMLP`.
        generator: random source of ŝ (torch's global RNG when None), or one generator per row.

    Returns:
        (B, C, H, W) samples, in the mixture's maths dtype (fp32, or fp64 for fp64 inputs).
    """
    shape = gm_x0.means.shape[:-4] + gm_x0.means.shape[-3:]
    if tuple(log_spectrum.shape) != tuple(shape):
        raise ValueError(
            f"spectral_sample: log_spectrum must be (B, C, H, W) = {tuple(shape)} to match the "
            f"mixture means {tuple(gm_x0.means.shape)}, got {tuple(log_spectrum.shape)}"
        )
    dtype = torch.float64 if torch.float64 in (gm_x0.dtype, log_spectrum.dtype) else torch.float32
    noise = randn(shape, generator, dtype=dtype, device=log_spectrum.device)
    s_hat = noise * torch.exp(0.5 * log_spectrum.to(dtype))
    z = idht(s_hat)
    x0 = gaussian_to_gm_samples(gm_x0, z.unsqueeze(-4), axis_aligned=True, n_steps=16)
    return x0.squeeze(-4)


def gm_spectral_logprobs(
    gm: GaussianMixture,
    x: Tensor,
    log_spectrum: Tensor | None = None,
    *,
    power_spectrum: Tensor | None = None,
) -> Tensor:
    """Log-density of whole images under spectral sampling with log power spectrum λ (spec 7.13).

    Spectral sampling is x = KR⁻¹(iDHT(ŝ)) with ŝ ~ N(0, diag e^λ). The KR map is per pixel (one
    basis per sample) and the DHT is orthonormal, so by the change of variables

        log p(x) = Σ_{h,w} log GM_{h,w}(x_{h,w}) + Σ_{c,h,w} [ −½ ŝ² (e^{−λ} − 1) − ½ λ ],
        ŝ = DHT(KR_forward(gm, x)),

    i.e. the independent per-pixel mixture density times N(ŝ; 0, e^λ) / N(ŝ; 0, I). This is the
    exact per-element form; the reference code sums ŝ² over channels before multiplying by the
    per-channel factor and uses −½·C·λ, which agrees only for channel-independent λ (spec 15.9).
    Without λ (or λ ≡ 0) it is the summed ``gm_logprob``. KR_forward clamps its CDFs at ±(1 − 1e-6),
    so points beyond about 4.9 mixture standard deviations get a slightly wrong correction.

    Args:
        gm: means (..., K, C, H, W), one basis per sample (axis-aligned KR, as in sampling).
        x: (..., n, C, H, W) images.
        log_spectrum: λ (..., C, H, W), broadcast over n; None for white noise.
        power_spectrum: the reference's name for ``log_spectrum`` (also a log power spectrum).

    Returns:
        (..., n) log-densities, in the GM maths dtype (fp32, or fp64 for fp64 inputs).

    Raises:
        ValueError: if both spectrum arguments are given or λ does not match the images.
    """
    if log_spectrum is not None and power_spectrum is not None:
        raise ValueError(
            "gm_spectral_logprobs: pass the log power spectrum once, as log_spectrum "
            "(power_spectrum is the reference's name for the same argument)"
        )
    lam = log_spectrum if log_spectrum is not None else power_spectrum
    logp = gm_logprob(gm, x).sum(dim=(-2, -1))  # (..., n)
    if lam is None:
        return logp
    if lam.shape[-3:] != x.shape[-3:]:
        raise ValueError(
            f"gm_spectral_logprobs: log_spectrum must be (..., C, H, W) with C, H, W = "
            f"{tuple(x.shape[-3:])} as the images, got {tuple(lam.shape)}"
        )
    z = gm_to_gaussian_samples(gm, x, axis_aligned=True)  # (..., n, C, H, W), rotated coordinates
    s_sq = dht(z).square()
    lam = lam.to(s_sq.dtype).unsqueeze(-4)
    correction = (-0.5 * s_sq * (torch.exp(-lam) - 1) - 0.5 * lam).sum(dim=(-3, -2, -1))
    return logp.to(correction.dtype) + correction


def spectral_loss(
    gm_u: GaussianMixture,
    x0: Tensor,
    x_high: Tensor,
    sigma_high: Tensor | float,
    log_spectrum: Tensor,
    weight: float = SPECTRAL_LOSS_WEIGHT,
) -> Tensor:
    """The spectral NLL that trains the spectrum MLP (spec 4.4); gradients reach λ only.

        u* = (x_high − x_0) / σ_high,    z = KR_GM(u*) (axis-aligned),    ŝ = DHT(z),
        L = ½ · w · mean_{B,C,H,W}[ ŝ² (e^{−λ} − 1) + λ ],

    i.e. w × the mean over elements of NLL_{N(0, e^λ)}(ŝ) − NLL_{N(0, 1)}(ŝ): zero at λ ≡ 0 and
    minimised per element at λ = log ŝ². This is the [LL] convention with a fixed weight
    (w = 4.0 by default); [orig] uses ½·C·mean with weight 1, the same value for C = 4 but
    proportional to C otherwise (spec 15.2). A fixed weight keeps the loss scale independent of
    the channel count (pass ``weight=C`` to reproduce [orig] for other C).

    Args:
        gm_u: the predicted GM over u at (x_high, σ_high), means (B, K, C, H, W) (detached here).
        x0: (B, C, H, W) the clean data.
        x_high: (B, C, H, W) the network input x_t.
        sigma_high: σ of x_high, a float or (B,); floored at 1e-9 (1e-6 in timestep units).
        log_spectrum: λ (B, C, H, W), the spectrum MLP output (the only input with gradients).
        weight: w_spec.

    Returns:
        A scalar tensor.
    """
    with torch.no_grad():
        gm_u = gm_u.detach()
        dtype = torch.float64 if torch.float64 in (gm_u.dtype, x0.dtype) else torch.float32
        sigma = as_scalar_tensor(sigma_high, dtype=dtype, device=x0.device).reshape(-1, 1, 1, 1)
        u_true = (x_high.to(dtype) - x0.to(dtype)) / sigma.clamp_min(1e-9)
        z = gm_to_gaussian_samples(gm_u, u_true.unsqueeze(-4), axis_aligned=True).squeeze(-4)
        s_sq = dht(z).square()
    log_spectrum = log_spectrum.to(s_sq.dtype)
    return 0.5 * weight * (s_sq * (torch.exp(-log_spectrum) - 1) + log_spectrum).mean()
