"""The exact checkerboard: sampler support and uniformity, membership test and exact bin masses."""

from __future__ import annotations

import math

import pytest
import torch

from gmflow.data.checkerboard import (
    histogram_bin_masses,
    inside_occupied,
    occupied_squares,
    sample_checkerboard,
)

N = 400_000


def test_occupied_squares_are_the_white_cells_of_the_reference_formula():
    # reference: x = ((i, j) + U)·(2/4) − 1, then × 4, over the cells with i + j even
    expected = {
        ((i * 0.5 - 1) * 4, (j * 0.5 - 1) * 4)
        for i in range(4)
        for j in range(4)
        if (i + j) % 2 == 0
    }
    got = {tuple(c.tolist()) for c in occupied_squares()}
    assert got == expected and len(got) == 8


def test_inside_occupied_on_known_points():
    pts = torch.tensor(
        [[-3.0, -3.0], [-1.0, -3.0], [3.0, 3.0], [1.0, -1.0], [4.5, 0.0], [-0.5, 0.5], [0.5, 0.5]],
        dtype=torch.float64,
    )
    # cells (0,0) white, (1,0) black, (3,3) white, (2,1) black, off-board, (1,2) black, (2,2) white
    assert inside_occupied(pts).tolist() == [True, False, True, False, False, False, True]


def test_samples_lie_on_the_occupied_cells(generator):
    x = sample_checkerboard(N, generator=generator, dtype=torch.float64)
    assert x.shape == (N, 2) and x.dtype == torch.float64
    assert inside_occupied(x).all()
    assert x.abs().max() <= 4.0


def test_cells_are_equally_likely_and_uniform_inside(generator):
    x = sample_checkerboard(N, generator=generator, dtype=torch.float64)
    corners = occupied_squares()
    cell = torch.floor((x + 4) / 2)  # (N, 2) cell indices
    idx = ((cell[:, None, :] == (corners[None] + 4) / 2).all(-1)).float().argmax(-1)
    freq = torch.bincount(idx, minlength=8).double() / N
    se = math.sqrt((1 / 8) * (7 / 8) / N)  # binomial standard error
    assert (freq - 1 / 8).abs().max() < 5 * se
    # the offset inside the cell, rescaled to [0, 1]², is U[0,1]²: mean 1/2, variance 1/12,
    # no correlation
    u = (x - corners[idx]) / 2
    torch.testing.assert_close(
        u.mean(0),
        torch.full((2,), 0.5, dtype=torch.float64),
        atol=5 * math.sqrt(1 / 12 / N),
        rtol=0,
    )
    torch.testing.assert_close(
        u.var(0),
        torch.full((2,), 1 / 12, dtype=torch.float64),
        atol=5 * math.sqrt(1 / 180 / N),
        rtol=0,
    )
    corr = torch.corrcoef(u.T)[0, 1]
    assert abs(corr) < 5 / math.sqrt(N)


def test_sampler_is_deterministic_for_a_generator():
    a = sample_checkerboard(1000, generator=torch.Generator().manual_seed(3))
    b = sample_checkerboard(1000, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bin_masses_sum_to_one_when_the_range_covers_the_board():
    masses = histogram_bin_masses(64, -4.2, 4.2)
    assert masses.shape == (64, 64) and masses.dtype == torch.float64
    assert masses.min() >= 0
    torch.testing.assert_close(
        masses.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-14
    )
    # a range that covers only part of the board holds the probability of that part
    torch.testing.assert_close(
        histogram_bin_masses(10, -4.0, 0.0).sum(), torch.tensor(0.25, dtype=torch.float64)
    )


def test_bin_masses_on_a_cell_aligned_grid():
    # 8 bins of width 1 over [−4, 4]: a bin is a quarter of a cell, mass 1/32 if the cell is white
    masses = histogram_bin_masses(8, -4.0, 4.0)
    i = torch.arange(8) // 2
    white = ((i[:, None] + i[None, :]) % 2 == 0).double()
    torch.testing.assert_close(masses, white / 32, rtol=0, atol=1e-15)


def test_bin_masses_match_a_fine_midpoint_integration():
    bins, sub = 64, 64
    edges = torch.linspace(-4.2, 4.2, bins * sub + 1, dtype=torch.float64)
    mid = (edges[:-1] + edges[1:]) / 2
    grid = torch.stack(torch.meshgrid(mid, mid, indexing="ij"), dim=-1)  # (bins·sub, bins·sub, 2)
    density = inside_occupied(grid).double() / 32
    cell_area = (8.4 / (bins * sub)) ** 2
    ref = (density * cell_area).reshape(bins, sub, bins, sub).sum((1, 3))
    # the midpoint rule errs only on sub-cells cut by a cell edge: at most one sub-row per bin edge
    tol = 2 * sub * cell_area / 32
    torch.testing.assert_close(histogram_bin_masses(bins), ref, rtol=0, atol=tol)


def test_bin_masses_match_monte_carlo_frequencies(generator):
    x = sample_checkerboard(N, generator=generator, dtype=torch.float64)
    counts, _ = torch.histogramdd(x, bins=[64, 64], range=[-4.2, 4.2, -4.2, 4.2])
    p = histogram_bin_masses(64).flatten()
    occupied = p > 0
    assert counts.flatten()[~occupied].sum() == 0  # no sample in an empty bin
    # Pearson chi-square over the non-empty bins: mean dof, std sqrt(2·dof)
    e = N * p[occupied]
    chi2 = ((counts.flatten()[occupied] - e) ** 2 / e).sum().item()
    dof = int(occupied.sum()) - 1
    assert abs(chi2 - dof) < 5 * math.sqrt(2 * dof)


@pytest.mark.parametrize("n", [-1])
def test_negative_sample_count_is_rejected(n):
    with pytest.raises(ValueError, match="n must be >= 0"):
        sample_checkerboard(n)


def test_projected_cdf_matches_monte_carlo(generator):
    from gmflow.data.checkerboard import _projected_cdf

    theta = torch.tensor([0.05, 0.7, 1.3, 2.9], dtype=torch.float64)
    x = sample_checkerboard(N, generator=generator, dtype=torch.float64)
    proj = x @ torch.stack([torch.cos(theta), torch.sin(theta)])  # (N, L)
    z = torch.linspace(-6, 6, 49, dtype=torch.float64)  # the support is within ±4√2
    empirical = (proj[:, :, None] <= z).double().mean(0)  # (L, Z)
    cdf, _ = _projected_cdf(z.expand(len(theta), -1).contiguous(), theta)
    se = (cdf * (1 - cdf) / N).sqrt()
    bad = (empirical - cdf).abs() > 5 * se + 1e-12
    assert not bad.any(), (empirical[bad], cdf[bad], torch.nonzero(bad))
    torch.testing.assert_close(
        cdf[:, [0, -1]], torch.tensor([[0.0, 1.0]] * 4, dtype=torch.float64), rtol=0, atol=1e-12
    )


def test_projected_density_is_the_derivative_of_the_cdf():
    from gmflow.data.checkerboard import _projected_cdf

    theta = torch.tensor([0.3, 1.9], dtype=torch.float64)
    z = torch.linspace(-5.5, 5.5, 203, dtype=torch.float64).expand(2, -1).contiguous()
    h = 1e-6
    (up, _), (down, _), (_, pdf) = (
        _projected_cdf(z + h, theta),
        _projected_cdf(z - h, theta),
        _projected_cdf(z, theta),
    )
    torch.testing.assert_close((up - down) / (2 * h), pdf, rtol=0, atol=1e-6)


def test_projected_quantiles_invert_the_cdf():
    from gmflow.data.checkerboard import _projected_cdf, projected_quantiles

    theta = (torch.arange(16, dtype=torch.float64) + 0.5) * math.pi / 16
    levels = torch.tensor([1e-4, 0.01, 0.25, 0.5, 0.77, 0.999], dtype=torch.float64)
    q = projected_quantiles(theta, levels)
    cdf, _ = _projected_cdf(q, theta)
    torch.testing.assert_close(cdf, levels.expand_as(cdf), rtol=0, atol=1e-12)
    # the distribution is symmetric under x → −x: Q(1 − q) = −Q(q)
    torch.testing.assert_close(projected_quantiles(theta, 1 - levels), -q, rtol=0, atol=1e-10)
