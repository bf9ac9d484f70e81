"""numba CPU kernels against their torch twins (fp64, fp32), directly and through the public ops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gm_cases import random_gm
from scipy import special

from gmflow.gm import GaussianMixture, gm1d_inverse_cdf, gm_condition_mean, gm_logprob, kernels
from gmflow.gm.density import gm_logprob_torch
from gmflow.gm.inverse_cdf import _newton_torch
from gmflow.gm.products import _condition_torch

TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-10}, torch.float32: {"rtol": 1e-4, "atol": 1e-4}}


def flat(gm: GaussianMixture):
    """Kernel layout: means (N, K, C, P), logweights (N, K, P), logstds (N, Ks)."""
    b, k, c, h, w = gm.means.shape
    return (
        gm.means.reshape(b, k, c, h * w).contiguous().numpy(),
        gm.logweights.reshape(b, k, h * w).contiguous().numpy(),
        gm.logstds.reshape(b, -1).contiguous().numpy(),
    )


def test_vectorisable_erf_matches_erf():
    y = np.concatenate([np.linspace(0, 7, 70001), [6.0, 1e-300, 50.0]])
    got = np.array([kernels._erf_from_gauss(v, math.exp(-v * v)) for v in y])
    np.testing.assert_allclose(got, special.erf(y), rtol=0, atol=2e-15)
    assert kernels._erf_from_gauss.py_func(0.7, math.exp(-0.49)) == pytest.approx(
        math.erf(0.7), abs=2e-15
    )


def test_vectorisable_exp_matches_exp():
    a = np.concatenate([np.linspace(-745, 709, 100001), [0.0, -1e-300, -800.0, -np.inf]])
    got = np.array([kernels._exp(v) for v in a])
    np.testing.assert_allclose(got, np.exp(a), rtol=3e-16, atol=1e-307)  # subnormals: absolute
    assert kernels._exp.py_func(-1.5) == pytest.approx(math.exp(-1.5), rel=3e-16)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("per_component", [False, True])
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("hw", [1, 4])
def test_inverse_cdf_kernel_matches_torch(k, hw, per_component, dtype):
    gm = random_gm(2, k, 1, hw, dtype, per_component, seed=k)
    g = torch.Generator().manual_seed(1)
    u = (1.998 * torch.rand(2, 5, hw, hw, generator=g, dtype=torch.float64) - 0.999).to(dtype)
    z = math.sqrt(2) * torch.erfinv(u)
    ref = _newton_torch(gm, u, z, 16, 1e-6, 1.5)
    m, lw, ls = flat(gm)
    out = np.empty((2, 5, hw * hw), dtype=m.dtype)
    args = (m[:, :, 0], lw, ls, u.reshape(2, 5, -1).numpy(), z.reshape(2, 5, -1).numpy(), out)
    kernels.gm1d_inverse_cdf_kernel(*args, 16, 1e-6, 1.5)
    torch.testing.assert_close(torch.from_numpy(out).reshape(u.shape), ref, **TOL[dtype])


def _condition_mean_torch(gm, zeta, nu, eps):
    cond = _condition_torch(gm, zeta, nu, eps)
    return (cond.logweights.exp() * cond.means).sum(dim=-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("per_component", [False, True])
@pytest.mark.parametrize(("k", "c", "hw"), [(1, 1, 1), (3, 2, 4), (8, 4, 4), (8, 2, 1)])
def test_condition_mean_kernel_matches_torch(k, c, hw, per_component, dtype):
    gm = random_gm(3, k, c, hw, dtype, per_component, seed=c)
    g = torch.Generator().manual_seed(2)
    zeta = (2 * torch.rand(3, 1, 1, 1, generator=g, dtype=torch.float64)).to(dtype)
    nu = torch.randn(3, c, hw, hw, generator=g, dtype=torch.float64).to(dtype)
    ref = _condition_mean_torch(gm, zeta, nu, 1e-6)
    m, lw, ls = flat(gm)
    out = np.empty((3, c, hw * hw), dtype=m.dtype)
    nu_f = nu.reshape(3, c, -1).numpy()
    kernels.gm_condition_mean_kernel(m, lw, ls, zeta.reshape(3).numpy(), nu_f, out, 1e-6)
    torch.testing.assert_close(torch.from_numpy(out).reshape(ref.shape), ref, **TOL[dtype])


def test_condition_mean_kernel_keeps_the_eps_floor():
    """A negative precision with s²ζ + 1 < eps floors den at eps in both implementations."""
    gm = random_gm(2, 4, 2, 1, per_component=True, seed=3)
    s2 = torch.exp(2 * gm.logstds)
    zeta = (-1.5 / s2.amax(dim=1)).reshape(2, 1, 1, 1)  # den < 0 for the widest
    nu = torch.randn(2, 2, 1, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref = _condition_mean_torch(gm, zeta, nu, 1e-6)
    m, lw, ls = flat(gm)
    out = np.empty((2, 2, 1))
    kernels.gm_condition_mean_kernel(
        m, lw, ls, zeta.reshape(2).numpy(), nu.reshape(2, 2, 1).numpy(), out, 1e-6
    )
    torch.testing.assert_close(torch.from_numpy(out).reshape(ref.shape), ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("per_component", [False, True])
@pytest.mark.parametrize(("k", "c", "hw"), [(1, 1, 1), (3, 2, 4), (8, 4, 4), (8, 2, 1)])
def test_logprob_kernel_matches_torch(k, c, hw, per_component, dtype):
    gm = random_gm(2, k, c, hw, dtype, per_component, seed=k + c)
    x = 2 * torch.randn(2, 3, c, hw, hw, generator=torch.Generator().manual_seed(5)).to(dtype)
    ref = gm_logprob_torch(gm, x)
    m, lw, ls = flat(gm)
    out = np.empty((2, 3, hw * hw), dtype=m.dtype)
    kernels.gm_logprob_kernel(m, lw, ls, x.reshape(2, 3, c, -1).numpy(), out)
    torch.testing.assert_close(torch.from_numpy(out).reshape(ref.shape), ref, **TOL[dtype])


def test_python_bodies_match_the_compiled_kernels():
    """``py_func`` runs the kernel bodies as plain Python (coverage) and must agree with the JIT."""
    rng = np.random.default_rng(6)
    k, c, lanes = 2, 2, 3  # lanes: (K, C, L)
    means, logweights = rng.normal(size=(k, c, lanes)), np.log(np.full((k, lanes), 0.5))
    logstds = rng.normal(scale=0.3, size=(k, lanes))
    u = np.array([[-0.4], [0.3], [0.9]])  # lane-major: (L, M)
    z = math.sqrt(2) * special.erfinv(u)
    inverse_args = (means[:, 0].T.copy(), logweights.T.copy(), logstds.T.copy(), u, z)
    calls = [
        (kernels.gm1d_inverse_cdf_lanes, inverse_args, (16, 1e-6, 1.5), (3, 1)),
        (kernels.gm_condition_mean_lanes,
         (means, logweights, logstds, np.full(3, 0.7), rng.normal(size=(c, 3))),
         (1e-6,), (c, 3)),
        (kernels.gm_logprob_lanes,
         (means, logweights, logstds, rng.normal(size=(2, c, 3))), (), (2, 3)),
    ]  # fmt: skip
    for kernel, arrays, scalars, shape in calls:
        jit_out, py_out = np.empty(shape), np.empty(shape)
        kernel(*arrays, jit_out, *scalars)
        kernel.py_func(*arrays, py_out, *scalars)
        np.testing.assert_allclose(py_out, jit_out, rtol=1e-12, atol=1e-12)


# ---- public ops, GMFLOW_GM_BACKEND=numba against =torch (the wrappers: broadcasting, layout) ----


def _both_backends(monkeypatch, fn):
    out = {}
    for backend in ("torch", "numba"):
        monkeypatch.setenv("GMFLOW_GM_BACKEND", backend)
        out[backend] = fn()
    return out["numba"], out["torch"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_public_gm_logprob_with_broadcast_batch_dims(monkeypatch, dtype):
    gm = random_gm(3, 4, 2, 4, dtype, per_component=True, seed=7)
    x = torch.randn(5, 1, 6, 2, 4, 4, generator=torch.Generator().manual_seed(8)).to(dtype)
    gm = GaussianMixture(gm.means[None], gm.logweights[None], gm.logstds[None])  # batch (1, 3)
    got, ref = _both_backends(monkeypatch, lambda: gm_logprob(gm, x))
    assert got.shape == (5, 3, 6, 4, 4)
    torch.testing.assert_close(got, ref, **TOL[dtype])


@pytest.mark.parametrize("precision", ["scalar", "per_sample"])
def test_public_gm_condition_mean_broadcasts_precision_and_linear(monkeypatch, precision):
    gm = random_gm(3, 4, 2, 4, seed=9)
    g = torch.Generator().manual_seed(10)
    zeta = (
        0.8 if precision == "scalar" else torch.rand(3, 1, 1, 1, generator=g, dtype=torch.float64)
    )
    nu = torch.randn(3, 2, 1, 1, generator=g, dtype=torch.float64)  # spatially constant ν
    got, ref = _both_backends(monkeypatch, lambda: gm_condition_mean(gm, zeta, nu))
    assert got.shape == (3, 2, 4, 4)
    torch.testing.assert_close(got, ref, **TOL[torch.float64])


def test_public_inverse_cdf_with_shared_mixture_across_samples(monkeypatch):
    gm = random_gm(2, 3, 1, 4, seed=11)
    u = (
        1.9
        * torch.rand(2, 7, 4, 4, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
        - 0.95
    )
    got, ref = _both_backends(monkeypatch, lambda: gm1d_inverse_cdf(gm, u))
    torch.testing.assert_close(got, ref, **TOL[torch.float64])


def test_public_ops_accept_empty_batches(monkeypatch):
    monkeypatch.setenv("GMFLOW_GM_BACKEND", "numba")
    gm = random_gm(0, 3, 2, 4)
    assert gm_logprob(gm, torch.zeros(0, 1, 2, 4, 4, dtype=torch.float64)).shape == (0, 1, 4, 4)
    assert gm_condition_mean(gm, 1.0, torch.zeros(0, 2, 4, 4, dtype=torch.float64)).shape == (
        0,
        2,
        4,
        4,
    )
