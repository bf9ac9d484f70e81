"""Exact GM data for the solver tests: the denoiser of Bayes' rule and the probability-flow ODE.

Imported by its module name (pytest puts this folder on ``sys.path`` for the tests in it).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats
from scipy.integrate import solve_ivp

from gmflow.gm import GaussianMixture

F64 = torch.float64
NULL = 2  # null class id of the class-conditional test data (classes 0 and 1)


class ExactDenoiser:
    """The exact u-GM of data Σ_k A_k N(m_k, v0 I), one data GM per class label (Bayes' rule).

    p(x0 | x_t) is a K-GM with variance v = (1/v0 + α²/σ²)⁻¹, means v (m_k/v0 + α x_t/σ²) and
    weights ∝ A_k N(x_t; α m_k, (α² v0 + σ²) I); mapped to u = (x_t − x0)/σ. ``means`` is
    (L, K, C, H, W) and ``logweights`` (L, K, 1, H, W) for L labels (label None uses row 0).
    Records the batch size and labels of every call.
    """

    def __init__(self, means: torch.Tensor, logweights: torch.Tensor, v0: float) -> None:
        self.means, self.logweights, self.v0 = means, logweights, v0
        self.calls: list[tuple[int, torch.Tensor | None]] = []

    def x0_posterior(self, x_t: torch.Tensor, sigma: torch.Tensor, labels=None) -> GaussianMixture:
        dev = x_t.device
        idx = torch.zeros(x_t.shape[0], dtype=torch.long, device=dev) if labels is None else labels
        m, lw = self.means.to(dev)[idx], self.logweights.to(dev)[idx]  # (B, K, C, H, W)
        s = sigma.to(F64).reshape(-1, 1, 1, 1, 1)
        a = 1 - s
        var = 1 / (1 / self.v0 + a**2 / s**2)
        x = x_t.to(F64).unsqueeze(1)
        means = var * (m / self.v0 + a * x / s**2)
        evidence = -0.5 * (x - a * m).square().sum(2, keepdim=True) / (a**2 * self.v0 + s**2)
        logstds = (0.5 * torch.log(var)).expand(x_t.shape[0], 1, 1, 1, 1)
        return GaussianMixture(means, torch.log_softmax(lw + evidence, dim=1), logstds)

    def __call__(self, x_t, sigma, labels):
        self.calls.append((x_t.shape[0], labels))
        gm = self.x0_posterior(x_t, sigma, labels)
        s = sigma.to(F64).reshape(-1, 1, 1, 1, 1)
        u_means = (x_t.to(F64).unsqueeze(1) - gm.means) / s
        return GaussianMixture(u_means, gm.logweights, gm.logstds - torch.log(s))

    def data_cdf_1d(self, x, label: int = 0):
        w = self.logweights[label].exp().flatten().tolist()
        m = self.means[label].flatten().tolist()
        return sum(
            wk * stats.norm.cdf(x, mk, math.sqrt(self.v0)) for wk, mk in zip(w, m, strict=True)
        )


def data_1d() -> ExactDenoiser:
    means = torch.tensor([-2.0, 0.5, 3.0], dtype=F64).reshape(1, 3, 1, 1, 1)
    logweights = torch.tensor([0.2, 0.5, 0.3], dtype=F64).log().reshape(1, 3, 1, 1, 1)
    return ExactDenoiser(means, logweights, 0.1)


def data_2d() -> ExactDenoiser:
    means = torch.tensor([[-1.5, 0.5], [0.2, -1.0], [1.8, 1.2]], dtype=F64).reshape(1, 3, 2, 1, 1)
    logweights = torch.tensor([0.2, 0.5, 0.3], dtype=F64).log().reshape(1, 3, 1, 1, 1)
    return ExactDenoiser(means, logweights, 0.09)


def data_classes() -> ExactDenoiser:
    """Class 0 on the left, class 1 on the right, the null class (2) is their even mixture."""
    left = torch.tensor([[-2.0, 0.5], [-1.5, -1.0]], dtype=F64)
    right = torch.tensor([[2.0, -0.5], [1.5, 1.0]], dtype=F64)
    means = torch.cat([left, right]).reshape(1, 4, 2, 1, 1).expand(3, 4, 2, 1, 1).contiguous()
    off = -200.0  # a component that a class lacks (exp(-200) ~ 1e-87)
    lw = torch.tensor([[0.0, 0.0, off, off], [off, off, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=F64)
    return ExactDenoiser(means, torch.log_softmax(lw, dim=1).reshape(3, 4, 1, 1, 1), 0.2)


def noise(b: int, c: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, c, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=F64)


def pf_ode_reference(
    den: ExactDenoiser, x1: torch.Tensor, sigma_end: float = 1e-5, sigma_start: float = 1.0
) -> torch.Tensor:
    """The exact probability-flow ODE from σ_start (1) to 0: an independent NumPy velocity, DOP853.

    Integrated to σ_end, then x0 = E[x0 | x] there (one Euler step to 0, error O(σ_end²)).
    """
    m = den.means.reshape(-1, 2).numpy()
    logw, v0 = den.logweights.flatten().numpy(), den.v0

    def velocity(sigma: float, y: np.ndarray) -> np.ndarray:
        x, a = y.reshape(-1, 2), 1 - sigma
        var = 1 / (1 / v0 + a**2 / sigma**2)
        means = var * (m[None] / v0 + a * x[:, None] / sigma**2)
        ev = logw - 0.5 * ((x[:, None] - a * m[None]) ** 2).sum(-1) / (a**2 * v0 + sigma**2)
        w = np.exp(ev - ev.max(1, keepdims=True))
        x0 = ((w / w.sum(1, keepdims=True))[..., None] * means).sum(1)
        return ((x - x0) / sigma).ravel()

    y1 = x1.reshape(-1).numpy()
    sol = solve_ivp(velocity, (sigma_start, sigma_end), y1, method="DOP853", rtol=1e-11, atol=1e-11)
    y = sol.y[:, -1]
    return torch.from_numpy((y - sigma_end * velocity(sigma_end, y)).reshape(x1.shape))
