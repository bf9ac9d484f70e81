"""SpectrumMLP: the learned log power spectrum of the KR-whitened residual (spec 9.1).

Pixels of a GM-DiT output are independent, so x_0 drawn pixel by pixel has white residual noise.
The spectrum MLP predicts, from two summary statistics of the x_0-space Gaussian G, a log power
spectrum λ (C, H, W) over discrete-Hartley frequencies, used by
:func:`gmflow.flow.spectral.spectral_sample` to draw spatially correlated noise (spec 9.3):

    f = [mean(G.var), mean_c Var_{h,w}(G.mean_c)]                (B, 2), Var unbiased over H·W
    λ̃ = Linear(8, C·H₀·W₀)(SiLU(Linear(64, 8)(SiLU(Linear(2, 64)(f)))))  -> (B, C, H₀, W₀)
    λ̃ ← the four low-frequency corner blocks when H < H₀ or W < W₀ (FFT ordering: rows
         [:⌈H/2⌉] ∪ [H₀−⌊H/2⌋:], columns likewise)
    λ_c = log_softmax_{h,w}(λ̃_c) + log(H·W)                       ⇒ mean_{h,w} e^{λ_c} = 1

The normalisation keeps every pixel's total variance at 1, so only the distribution of power over
frequencies is learned. Channel c of λ is the c-th KR axis (eigenvector of the pixel-averaged GM
covariance, descending eigenvalue), not latent channel c. The last layer is zero at
initialisation, so λ ≡ 0 (white noise, plain per-pixel sampling).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gmflow.gm import IsoGaussian

__all__ = ["SpectrumMLP", "spectrum_features", "crop_spectrum"]


def spectrum_features(g: IsoGaussian) -> Tensor:
    """The two MLP inputs [mean of var, channel-mean of the unbiased spatial variance of mean].

    Args:
        g: x_0-space Gaussian, mean (..., C, H, W), var (..., 1, H, W) or (..., 1, 1, 1).

    Returns:
        (..., 2). The second feature is 0 when H·W = 1 (no spatial variance).
    """
    f1 = g.var.mean(dim=(-3, -2, -1))
    h, w = g.mean.shape[-2:]
    if h * w > 1:
        f2 = g.mean.flatten(-2).var(dim=-1, correction=1).mean(dim=-1)
    else:
        f2 = torch.zeros_like(f1)
    f1, f2 = torch.broadcast_tensors(f1, f2)
    return torch.stack([f1, f2], dim=-1)


def crop_spectrum(spectrum: Tensor, size: tuple[int, int]) -> Tensor:
    """Keep the four low-frequency corner blocks of a (..., H₀, W₀) spectrum in FFT ordering.

    Rows kept: [0, ⌈H/2⌉) and [H₀ − ⌊H/2⌋, H₀) (non-negative then negative frequencies); columns
    likewise. The identity when (H, W) = (H₀, W₀).
    """
    h, w = size
    base_h, base_w = spectrum.shape[-2:]
    if h > base_h or w > base_w:
        raise ValueError(f"crop_spectrum: cannot crop a {base_h}x{base_w} spectrum to {h}x{w}")
    if (h, w) == (base_h, base_w):
        return spectrum
    # Slices and a concatenation, not index_select with index tensors: those would be built on
    # the host and copied to the device every sampling step, and a pageable host-to-device copy
    # waits for the GPU queue (issue 4).
    top, bottom = (h + 1) // 2, h // 2
    left, right = (w + 1) // 2, w // 2
    rows = torch.cat([spectrum[..., :top, :], spectrum[..., base_h - bottom :, :]], dim=-2)
    return torch.cat([rows[..., :left], rows[..., base_w - right :]], dim=-1)


class SpectrumMLP(nn.Module):
    """Predict a normalised log power spectrum λ from an x_0-space Gaussian (spec 9.1).

    Args:
        base_size: (C, H₀, W₀), the largest spectrum; smaller H, W are cropped to.
        layers: hidden widths (the released model: (64, 8), 37,576 parameters for (4, 32, 32)).
    """

    def __init__(
        self, base_size: Sequence[int] = (4, 32, 32), layers: Sequence[int] = (64, 8)
    ) -> None:
        super().__init__()
        if len(base_size) != 3:
            raise ValueError(f"SpectrumMLP: base_size must be (C, H, W), got {tuple(base_size)}")
        self.base_size = tuple(int(s) for s in base_size)
        widths = [2, *layers, math.prod(self.base_size)]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights, zero biases, last layer all zero (so λ ≡ 0 at init)."""
        for layer in self.layers:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.layers[-1].weight)

    def forward(self, g: IsoGaussian) -> Tensor:
        """λ, the per-channel normalised log power spectrum.

        Args:
            g: x_0-space Gaussian, mean (..., C, H, W) with C = base C and H, W ≤ base sizes;
                var (..., 1, H, W) or (..., 1, 1, 1).

        Returns:
            (..., C, H, W) with mean_{h,w} exp(λ) = 1 per channel, in the dtype GM maths uses
            (fp32, or fp64 for fp64 inputs); the MLP itself runs in its weights dtype.
        """
        c, base_h, base_w = self.base_size
        if g.mean.shape[-3] != c:
            raise ValueError(
                f"SpectrumMLP: built for C={c} channels, got a Gaussian with mean "
                f"{tuple(g.mean.shape)}; build it with base_size=(C, H, W) of your data"
            )
        h, w = g.mean.shape[-2:]
        out_dtype = torch.float64 if g.mean.dtype == torch.float64 else torch.float32
        features = spectrum_features(g)  # (..., 2)
        batch = features.shape[:-1]
        x = features.reshape(-1, 2).to(self.layers[0].weight.dtype)
        for layer in self.layers[:-1]:
            x = F.silu(layer(x))
        spectrum = self.layers[-1](x).to(out_dtype).reshape(-1, c, base_h, base_w)
        spectrum = crop_spectrum(spectrum, (h, w))
        log_power = spectrum.flatten(-2).log_softmax(dim=-1) + math.log(h * w)
        return log_power.reshape(*batch, c, h, w)
