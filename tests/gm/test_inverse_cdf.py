"""1-D GM pdf, scaled CDF and its Newton inverse (spec 7.2, 7.3; oracles 16.19-16.20, vector 52)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special

from gmflow.gm import GaussianMixture, gm1d_inverse_cdf, gm1d_pdf_cdf

F64 = torch.float64
BACKENDS = ["torch", "numba"]


def random_gm1d(k: int, hw: int, batch: int = 2, per_component: bool = False, seed: int = 0):
    """Random 1-D mixture: means N(0, 1.5²), random weights, s ∈ [0.05, 2]."""
    g = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(batch, k, 1, hw, hw, generator=g, dtype=F64)
    logweights = (2 * torch.randn(batch, k, 1, hw, hw, generator=g, dtype=F64)).log_softmax(1)
    ks = k if per_component else 1
    logstds = (0.05 + 1.95 * torch.rand(batch, ks, 1, 1, 1, generator=g, dtype=F64)).log()
    return GaussianMixture(means, logweights, logstds)


def numpy_pdf_cdf(gm: GaussianMixture, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Independent fp64 NumPy/SciPy reference; x (B, n, H, W)."""
    mu = gm.means.numpy()[:, None, :, 0]  # (B, 1, K, H, W)
    w = np.exp(gm.logweights.numpy())[:, None, :, 0]
    s = np.exp(gm.logstds.numpy())[:, None, :, 0]  # (B, 1, 1|K, 1, 1)
    d = (x[:, :, None] - mu) / s
    pdf = (w * np.exp(-0.5 * d**2) / (s * math.sqrt(2 * math.pi))).sum(2)
    cdf = (w * special.erf(d / math.sqrt(2))).sum(2)
    return pdf, cdf


@pytest.mark.parametrize("per_component", [False, True])
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("hw", [1, 4])
def test_pdf_cdf_matches_independent_reference(k, hw, per_component):
    gm = random_gm1d(k, hw, per_component=per_component)
    x = 3 * torch.randn(2, 5, hw, hw, generator=torch.Generator().manual_seed(1), dtype=F64)
    pdf, cdf = gm1d_pdf_cdf(gm, x)
    ref_pdf, ref_cdf = numpy_pdf_cdf(gm, x.numpy())
    torch.testing.assert_close(pdf, torch.from_numpy(ref_pdf), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(cdf, torch.from_numpy(ref_cdf), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_cdf_derivative_is_twice_pdf(k):
    """Oracle 19: dF̃/dx = 2·pdf, by central differences."""
    gm = random_gm1d(k, 4, per_component=True)
    x = 2 * torch.randn(2, 7, 4, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    h = 1e-6
    _, cdf_hi = gm1d_pdf_cdf(gm, x + h)
    _, cdf_lo = gm1d_pdf_cdf(gm, x - h)
    pdf, _ = gm1d_pdf_cdf(gm, x)
    torch.testing.assert_close((cdf_hi - cdf_lo) / (2 * h), 2 * pdf, rtol=1e-6, atol=1e-8)


def test_cdf_tends_to_plus_minus_one():
    """Oracle 19: F̃ → ±1 at ±∞ and the pdf vanishes there."""
    gm = random_gm1d(8, 4)
    x = torch.tensor([-1e4, 1e4], dtype=F64).view(1, 2, 1, 1).expand(2, 2, 4, 4)
    pdf, cdf = gm1d_pdf_cdf(gm, x)
    torch.testing.assert_close(cdf[:, 0], -torch.ones(2, 4, 4, dtype=F64))
    torch.testing.assert_close(cdf[:, 1], torch.ones(2, 4, 4, dtype=F64))
    assert pdf.abs().max() == 0


def test_single_component_cdf_is_erf():
    """Oracle 19, K = 1: F̃ = erf((x − μ)/(s√2)) and the pdf is the normal density."""
    gm = random_gm1d(1, 4)
    x = torch.randn(2, 6, 4, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    pdf, cdf = gm1d_pdf_cdf(gm, x)
    mu, s = gm.means[:, :, 0], gm.logstds.exp()[:, :, 0]  # (B, 1, H, W), (B, 1, 1, 1)
    torch.testing.assert_close(cdf, torch.erf((x - mu) / (s * math.sqrt(2))))
    normal = torch.distributions.Normal(mu, s)
    torch.testing.assert_close(pdf, normal.log_prob(x).exp())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_component", [False, True])
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("hw", [1, 4])
def test_inverse_cdf_solves_the_equation(k, hw, per_component, backend, monkeypatch):
    """Oracle 20: |F̃(x*) − ũ| < 1e-5 for ũ in [−0.999, 0.999], 16 Newton steps."""
    monkeypatch.setenv("GMFLOW_GM_BACKEND", backend)
    gm = random_gm1d(k, hw, per_component=per_component, seed=k + hw)
    u = torch.linspace(-0.999, 0.999, 41, dtype=F64).view(1, 41, 1, 1).expand(2, 41, hw, hw)
    x = gm1d_inverse_cdf(gm, u)
    _, cdf = gm1d_pdf_cdf(gm, x)
    assert (cdf - u).abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_inverse_cdf_single_component_closed_form(backend, monkeypatch):
    """Oracle 20, K = 1: x* = μ + s√2·erfinv(ũ)."""
    monkeypatch.setenv("GMFLOW_GM_BACKEND", backend)
    gm = random_gm1d(1, 4)
    u = torch.linspace(-0.999, 0.999, 21, dtype=F64).view(1, 21, 1, 1).expand(2, 21, 4, 4)
    x = gm1d_inverse_cdf(gm, u)
    expected = gm.means[:, :, 0] + gm.logstds.exp()[:, :, 0] * math.sqrt(2) * torch.erfinv(u)
    torch.testing.assert_close(x, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inverse_cdf_numeric_vector_52(backend, monkeypatch):
    """Vector 52: means [−1, 2], weights [0.4, 0.6], s = 0.5."""
    monkeypatch.setenv("GMFLOW_GM_BACKEND", backend)
    gm = GaussianMixture(
        torch.tensor([-1.0, 2.0], dtype=F64).view(2, 1, 1, 1),
        torch.tensor([0.4, 0.6], dtype=F64).log().view(2, 1, 1, 1),
        torch.tensor(0.5, dtype=F64).log().view(1, 1, 1, 1),
    )
    u = torch.tensor([-0.5, 0.0, 0.7], dtype=F64).view(3, 1, 1)
    x = gm1d_inverse_cdf(gm, u)
    expected = torch.tensor([-0.84068033, 1.51628954, 2.33724488], dtype=F64).view(3, 1, 1)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-8)


def test_kernel_and_torch_backends_agree(monkeypatch):
    """Oracle 20: kernel and PyTorch fallback agree (1e-5; fp64 agrees far tighter)."""
    gm = random_gm1d(8, 4, per_component=True, seed=5)
    u = 1.99 * torch.rand(2, 9, 4, 4, generator=torch.Generator().manual_seed(6), dtype=F64) - 0.995
    results = {}
    for backend in BACKENDS:
        monkeypatch.setenv("GMFLOW_GM_BACKEND", backend)
        results[backend] = gm1d_inverse_cdf(gm, u)
    torch.testing.assert_close(results["numba"], results["torch"], rtol=0, atol=1e-9)


def test_per_sample_weights_by_folding_the_sample_axis():
    """A mixture with batch (B, n) and targets (B, n, 1, H, W) solves each sample's own mixture."""
    b, n, k, hw = 2, 3, 4, 4
    g = torch.Generator().manual_seed(7)
    means = torch.randn(b, 1, k, 1, hw, hw, generator=g, dtype=F64)
    logweights = torch.randn(b, n, k, 1, hw, hw, generator=g, dtype=F64).log_softmax(2)
    logstds = torch.full((b, 1, 1, 1, 1, 1), -0.5, dtype=F64)
    u = 1.9 * torch.rand(b, n, 1, hw, hw, generator=g, dtype=F64) - 0.95
    x = gm1d_inverse_cdf(GaussianMixture(means, logweights, logstds), u)
    for i in range(n):
        one = GaussianMixture(means[:, 0], logweights[:, i], logstds[:, 0])
        torch.testing.assert_close(x[:, i], gm1d_inverse_cdf(one, u[:, i]))


def test_given_gaussian_samples_initialise_to_the_same_root():
    gm = random_gm1d(3, 4, seed=8)
    z = torch.randn(2, 5, 4, 4, generator=torch.Generator().manual_seed(9), dtype=F64).clamp(-3, 3)
    u = torch.erf(z / math.sqrt(2))
    torch.testing.assert_close(gm1d_inverse_cdf(gm, u, gaussian_samples=z), gm1d_inverse_cdf(gm, u))


def test_gradient_is_the_implicit_function_gradient():
    """∂x*/∂ũ = 1/(2·pdf(x*)) and ∂x*/∂μ_k = A_k·N(x*; μ_k, s²)/pdf(x*) (shared s)."""
    gm = random_gm1d(3, 1, batch=1, seed=10)
    means = gm.means.clone().requires_grad_(True)
    u = torch.tensor([[[[-0.3]], [[0.4]]]], dtype=F64, requires_grad=True)  # (1, 2, 1, 1)
    x = gm1d_inverse_cdf(GaussianMixture(means, gm.logweights, gm.logstds), u)
    grad_means, grad_u = torch.autograd.grad(x.sum(), (means, u))
    pdf, _ = gm1d_pdf_cdf(gm, x.detach())
    torch.testing.assert_close(grad_u, 0.5 / pdf)
    s = gm.logstds.exp().squeeze(-3)  # (1, 1, 1, 1)
    mu = gm.means.squeeze(-3)[:, None]  # (1, 1, K, 1, 1)
    weights = gm.logweights.exp().squeeze(-3)[:, None]
    comp = weights * torch.exp(-0.5 * ((x.detach()[:, :, None] - mu) / s) ** 2)
    comp = comp / (s * math.sqrt(2 * math.pi))  # (1, n, K, 1, 1)
    expected = (comp / pdf[:, :, None]).sum(1).unsqueeze(-3)  # (1, K, 1, 1, 1)
    torch.testing.assert_close(grad_means, expected)


def test_gradcheck():
    gm = random_gm1d(3, 1, batch=1, per_component=True, seed=11)
    u = torch.tensor([-0.6, 0.1, 0.8], dtype=F64).view(1, 3, 1, 1)

    def solve(means, logweights, logstds, u):
        return gm1d_inverse_cdf(GaussianMixture(means, logweights.log_softmax(1), logstds), u)

    inputs = [t.clone().requires_grad_(True) for t in (gm.means, gm.logweights, gm.logstds, u)]
    assert torch.autograd.gradcheck(solve, inputs, atol=1e-6, rtol=1e-5)


def test_fp32_inputs_are_solved_in_fp32():
    gm = random_gm1d(3, 4, seed=12).to(torch.float32)
    u = torch.linspace(-0.99, 0.99, 11).view(1, 11, 1, 1).expand(2, 11, 4, 4)
    x = gm1d_inverse_cdf(gm, u)
    assert x.dtype == torch.float32
    _, cdf = gm1d_pdf_cdf(gm.to(F64), x.to(F64))
    assert (cdf - u.to(F64)).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("means_shape", "u_shape", "match"),
    [
        ((2, 3, 2, 4, 4), (2, 5, 4, 4), "C = 1"),
        ((2, 3, 1, 4, 4), (2, 5, 3, 3), "H=4, W=4"),
        ((2, 3, 1, 4, 4), (3, 5, 4, 4), "do not broadcast"),
    ],
)
def test_bad_shapes_raise(means_shape, u_shape, match):
    k = means_shape[1]
    gm = GaussianMixture(
        torch.zeros(means_shape),
        torch.full((*means_shape[:2], 1, *means_shape[3:]), -math.log(k)),
        torch.zeros(means_shape[0], 1, 1, 1, 1),
    )
    with pytest.raises(ValueError, match=match):
        gm1d_inverse_cdf(gm, torch.zeros(u_shape))


def test_gradient_with_zero_steps_raises():
    gm = random_gm1d(1, 1)
    with pytest.raises(ValueError, match="n_steps"):
        gm1d_inverse_cdf(gm, torch.zeros(2, 1, 1, 1, dtype=F64, requires_grad=True), n_steps=0)
