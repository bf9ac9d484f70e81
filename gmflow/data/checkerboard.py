"""The 2-D checkerboard distribution of the GMFlow toy experiment (spec 12.1), exactly.

The board has 4 × 4 cells of side 2 covering [−4, 4]²; cell (i, j) (i along the first coordinate,
j along the second, both 0..3) spans [−4 + 2i, −2 + 2i] × [−4 + 2j, −2 + 2j]. The 8 "white" cells
with i + j even are occupied, and the data density is uniform on them:

    p(x) = 1/32 on the occupied cells (total area 8 · 2² = 32), 0 elsewhere.

This matches the reference ``CheckerboardData(n_rc=4, scale=4)``: x = ((i, j) + U[0,1]²)·(2/4) − 1,
then × 4. Besides the sampler, the module gives the exact quantities the toy metrics need: the
occupied cells, a membership test and the exact probability mass of every bin of a histogram.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = [
    "BOARD_CELLS",
    "CELL_SIZE",
    "OCCUPIED_AREA",
    "occupied_squares",
    "sample_checkerboard",
    "inside_occupied",
    "histogram_bin_masses",
    "inside_fraction",
    "histogram_kl",
    "projected_quantiles",
    "sliced_wasserstein2",
]

BOARD_CELLS = 4  # cells per side (reference n_rc = 4)
CELL_SIZE = 2.0  # side of one cell after the ×4 scale: (2/4)·4
BOARD_HALF_WIDTH = BOARD_CELLS * CELL_SIZE / 2  # the board covers [−4, 4]²
OCCUPIED_AREA = 8 * CELL_SIZE**2  # 32: total area of the 8 occupied cells


def occupied_squares(dtype: torch.dtype = torch.float64) -> Tensor:
    """Lower-left corners of the 8 occupied cells, in the order i-major, j-minor.

    Returns:
        (8, 2): corner (−4 + 2i, −4 + 2j) of every cell with i + j even; each cell is
        [corner, corner + 2]² (side :data:`CELL_SIZE`).
    """
    cells = [(i, j) for i in range(BOARD_CELLS) for j in range(BOARD_CELLS) if (i + j) % 2 == 0]
    ij = torch.tensor(cells, dtype=dtype)  # (8, 2)
    return ij * CELL_SIZE - BOARD_HALF_WIDTH


def sample_checkerboard(
    n: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw ``n`` exact samples: a uniformly chosen occupied cell, then a uniform point in it.

    Random numbers are drawn on the generator's device (CPU without one), in fp64, then cast, so a
    given ``generator`` state gives the same points on every device and dtype.

    Args:
        n: number of points (>= 0).
        generator: source of randomness (``torch.Generator``); None uses the global RNG.
        dtype: dtype of the result.
        device: device of the result (default: the generator's device, else CPU).

    Returns:
        (n, 2) points in [−4, 4]².

    Raises:
        ValueError: ``n`` is negative.
    """
    if n < 0:
        raise ValueError(f"sample_checkerboard: n must be >= 0, got {n}")
    rng_device = generator.device if generator is not None else torch.device("cpu")
    corners = occupied_squares(torch.float64).to(rng_device)
    cell = torch.randint(len(corners), (n,), generator=generator, device=rng_device)
    offset = torch.rand(n, 2, generator=generator, device=rng_device, dtype=torch.float64)
    x = corners[cell] + CELL_SIZE * offset  # (n, 2)
    return x.to(device=device if device is not None else rng_device, dtype=dtype)


def inside_occupied(x: Tensor) -> Tensor:
    """Whether each point lies in an occupied cell (closed on the lower edges, open on the upper).

    Args:
        x: (..., 2) points.

    Returns:
        (...,) bool.
    """
    if x.shape[-1] != 2:
        raise ValueError(
            f"inside_occupied: expected points of shape (..., 2), got {tuple(x.shape)}"
        )
    ij = torch.floor((x + BOARD_HALF_WIDTH) / CELL_SIZE)  # (..., 2) cell indices
    on_board = ((ij >= 0) & (ij < BOARD_CELLS)).all(dim=-1)
    white = torch.remainder(ij.sum(dim=-1), 2) == 0
    return on_board & white


def _interval_overlaps(edges: Tensor) -> Tensor:
    """Length of the overlap of every bin [e_a, e_{a+1}] with every board column [−4 + 2i, −2 + 2i].

    Args:
        edges: (bins + 1,) increasing bin edges.

    Returns:
        (bins, 4) overlap lengths.
    """
    lo = torch.arange(BOARD_CELLS, dtype=edges.dtype) * CELL_SIZE - BOARD_HALF_WIDTH  # (4,)
    hi = lo + CELL_SIZE
    left = torch.maximum(edges[:-1, None], lo[None, :])  # (bins, 4)
    right = torch.minimum(edges[1:, None], hi[None, :])
    return (right - left).clamp_min(0.0)


def histogram_bin_masses(bins: int = 64, low: float = -4.2, high: float = 4.2) -> Tensor:
    """Exact probability of each bin of a ``bins × bins`` histogram over [low, high]², in fp64.

    The mass of bin (a, b) is the overlap area of the bin with the occupied cells divided by 32;
    the density is separable per cell, so mass = O_x · M · O_yᵀ / 32 with O the (bins, 4) matrix of
    1-D overlaps and M[i, j] = 1 when i + j is even.

    Args:
        bins: bins per axis.
        low: lower edge of the histogram on both axes.
        high: upper edge of the histogram on both axes.

    Returns:
        (bins, bins) masses; entry [a, b] is the bin a along the first coordinate and b along the
        second (the layout of ``torch.histogramdd`` on (x, y) points). They sum to the probability
        of [low, high]², i.e. 1 when the range covers [−4, 4]².
    """
    if bins < 1 or not high > low:
        raise ValueError(
            f"histogram_bin_masses: need bins >= 1 and high > low, got {bins}, {low}, {high}"
        )
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
    overlap = _interval_overlaps(edges)  # (bins, 4)
    ij = torch.arange(BOARD_CELLS)
    occupied = ((ij[:, None] + ij[None, :]) % 2 == 0).to(torch.float64)  # (4, 4)
    return overlap @ occupied @ overlap.T / OCCUPIED_AREA


# ---- distances between a point cloud and the exact distribution (the toy's metrics) ----


def inside_fraction(x: Tensor) -> float:
    """Fraction of points in the occupied cells (non-finite points count as outside).

    Args:
        x: (N, 2) points.
    """
    return inside_occupied(x).double().mean().item()


def histogram_kl(
    x: Tensor, bins: int = 64, low: float = -4.2, high: float = 4.2, smoothing: float = 1e-8
) -> float:
    """KL(true ‖ model) between the exact bin masses and a histogram of ``x`` (the toy metric).

    p = exact mass of each bin (:func:`histogram_bin_masses`); q = counts / number of points that
    fall in [low, high)²; both smoothed as (v + smoothing) / Σ(v + smoothing); KL = Σ p log(p/q).
    Points outside the range (or non-finite) are ignored by q; :func:`inside_fraction` sees them.

    Args:
        x: (N, 2) points.
        bins: bins per axis.
        low: lower edge of the histogram on both axes.
        high: upper edge of the histogram on both axes.
        smoothing: additive smoothing of both distributions.

    Returns:
        The KL divergence in nats.
    """
    x = x.detach().to("cpu", torch.float64)
    idx = torch.floor((x - low) / (high - low) * bins).long()  # (N, 2) bin indices
    ok = torch.isfinite(x).all(-1) & ((idx >= 0) & (idx < bins)).all(-1)
    flat = idx[ok, 0] * bins + idx[ok, 1]
    counts = torch.bincount(flat, minlength=bins * bins).double()
    q = counts / max(int(ok.sum()), 1)
    p = _cached_bin_masses(bins, low, high).flatten()
    p = (p + smoothing) / (p + smoothing).sum()
    q = (q + smoothing) / (q + smoothing).sum()
    return (p * (p.log() - q.log())).sum().item()


@functools.lru_cache(maxsize=8)
def _cached_bin_masses(bins: int, low: float, high: float) -> Tensor:
    return histogram_bin_masses(bins, low, high)


@functools.lru_cache(maxsize=8)
def _sliced_reference(num_projections: int, num_levels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Directions θ (L,), levels q (M,) and exact quantiles (L, M) of the sliced W2."""
    theta = (torch.arange(num_projections, dtype=torch.float64) + 0.5) * math.pi / num_projections
    levels = (torch.arange(num_levels, dtype=torch.float64) + 0.5) / num_levels
    return theta, levels, projected_quantiles(theta, levels)


def _projected_cdf(z: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
    """Exact CDF and density of ⟨x, (cos θ, sin θ)⟩ for x from the checkerboard, at z.

    On one cell the projection is a sum of two independent uniforms of widths w1 = 2|cos θ| and
    w2 = 2|sin θ| starting at l; its CDF is
    [g(z − l) − g(z − l − w1) − g(z − l − w2) + g(z − l − w1 − w2)] / (w1 w2), g(t) = max(t, 0)²/2,
    and its density the same with g'(t) = max(t, 0). The checkerboard's CDF is the average over the
    8 cells. Needs θ off the axes (w1, w2 > 0).

    Args:
        z: (L, M) points, one row per direction.
        theta: (L,) directions.

    Returns:
        (L, M) CDF values and (L, M) densities.
    """
    c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]  # (L, 1, 1)
    corners = occupied_squares(z.dtype)  # (8, 2)
    w1, w2 = CELL_SIZE * c.abs(), CELL_SIZE * s.abs()
    start = torch.minimum(corners[:, 0] * c, (corners[:, 0] + CELL_SIZE) * c) + torch.minimum(
        corners[:, 1] * s, (corners[:, 1] + CELL_SIZE) * s
    )  # (L, 1, 8)
    t = z[:, :, None] - start  # (L, M, 8)
    r = torch.stack([t, t - w1, t - w2, t - (w1 + w2)]).clamp_min_(0)  # (4, L, M, 8)
    norm = 8 * (w1 * w2)[..., 0]  # (L, 1)
    pdf = (r[0] - r[1] - r[2] + r[3]).sum(-1) / norm
    r.square_()
    cdf = (r[0] - r[1] - r[2] + r[3]).sum(-1) / (2 * norm)
    return cdf, pdf


def projected_quantiles(theta: Tensor, levels: Tensor, grid: int = 256, iters: int = 6) -> Tensor:
    """Exact quantiles of the checkerboard projected on each direction θ (fp64).

    The CDF is tabulated on ``grid`` points of [−4√2, 4√2] to bracket every level, then refined by
    safeguarded Newton steps (the CDF is piecewise quadratic, so a few steps reach fp64 precision;
    a step that leaves the bracket is replaced by bisection).

    Args:
        theta: (L,) directions, none on an axis.
        levels: (M,) probabilities in (0, 1).
        grid: points of the bracketing table.
        iters: Newton steps.

    Returns:
        (L, M) quantiles.
    """
    theta, levels = theta.double(), levels.double()
    half = BOARD_HALF_WIDTH * math.sqrt(2)
    z = torch.linspace(-half, half, grid + 1, dtype=torch.float64).expand(len(theta), -1)
    table, _ = _projected_cdf(z.contiguous(), theta)  # (L, G + 1), non-decreasing
    q = levels.expand(len(theta), -1).contiguous()  # (L, M)
    idx = torch.searchsorted(table, q).clamp(1, grid)  # table[idx − 1] < q <= table[idx]
    lo, hi = z.gather(1, idx - 1), z.gather(1, idx)
    f_lo, f_hi = table.gather(1, idx - 1), table.gather(1, idx)
    x = lo + (hi - lo) * (q - f_lo) / (f_hi - f_lo).clamp_min(1e-300)  # linear start
    for _ in range(iters):
        cdf, pdf = _projected_cdf(x, theta)
        below = cdf < q
        lo, hi = torch.where(below, x, lo), torch.where(below, hi, x)
        step = x - (cdf - q) / pdf.clamp_min(1e-300)
        x = torch.where((step >= lo) & (step <= hi), step, (lo + hi) / 2)
    return x


def sliced_wasserstein2(x: Tensor, num_projections: int = 64, num_levels: int = 1000) -> float:
    """Sliced Wasserstein-2 distance between the points and the exact checkerboard.

    SW2² = mean over L fixed directions θ_l = (l + ½)π/L (never on an axis) of the 1-D W2² between
    the projected points and the exact projected distribution, each W2² taken as the mean over M
    levels q_m = (m + ½)/M of (empirical quantile − exact quantile)². The empirical quantile at q is
    the ⌊qN⌋-th smallest projection; the exact one comes from :func:`projected_quantiles`.
    Non-finite points are dropped.

    Args:
        x: (N, 2) points.
        num_projections: L.
        num_levels: M.

    Returns:
        SW2 in the units of x.
    """
    x = x.detach().to("cpu", torch.float64)
    x = x[torch.isfinite(x).all(-1)]
    if len(x) == 0:
        return math.inf
    theta, levels, exact = _sliced_reference(num_projections, num_levels)
    directions = torch.stack([torch.cos(theta), torch.sin(theta)])  # (2, L)
    proj = (x @ directions).T.float().sort(dim=-1).values.double()  # (L, N); fp32 sort is faster
    idx = (levels * len(x)).long().clamp_max(len(x) - 1)
    diff = proj[:, idx] - exact  # (L, M)
    return diff.pow(2).mean().sqrt().item()
