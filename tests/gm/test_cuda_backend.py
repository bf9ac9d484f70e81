"""The numba-cuda kernels on a real GPU against the torch reference on the same CUDA inputs.

Skipped without CUDA (the kernels' maths is covered on CPU under the CUDA simulator by
test_cuda_kernels.py); on a GPU machine this checks the real compile, the zero-copy
``__cuda_array_interface__`` wrapping, torch's stream and the automatic selection.
"""

from __future__ import annotations

import pytest
import torch
from gm_cases import random_gm

import gmflow.gm as G
from gmflow.gm import backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

FP32 = {"rtol": 2e-4, "atol": 2e-4}


def _both(monkeypatch, fn):  # type: ignore[no-untyped-def]
    """fn() under the torch reference and under forced numba (numba-cuda on CUDA tensors)."""
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    ref = fn()
    monkeypatch.setenv(backend.ENV_VAR, "numba")
    out = fn()
    torch.cuda.synchronize()
    return ref, out


@pytest.mark.parametrize("per_component", [False, True])
def test_numba_cuda_is_selected_and_compiles(per_component):
    gm = random_gm(2, 3, 4, 4, torch.float32, per_component, 0).to("cuda")
    for op in backend.OPS:
        want = "numba-cuda" if op in backend._CUDA_AUTO_OPS else "torch"
        assert backend.selected_backend(op, gm.means) == want
        assert backend._cuda_op_works(op), backend._CUDA_FAILURES  # every kernel compiles


@pytest.mark.parametrize("per_component", [False, True])
def test_inverse_cdf_matches_torch(monkeypatch, per_component):
    gm = random_gm(16, 8, 1, 8, torch.float32, per_component, 1).to("cuda")
    u = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(2)).mul(1.99).sub(0.995)
    u = u.to("cuda")
    ref, out = _both(monkeypatch, lambda: G.gm1d_inverse_cdf(gm, u))
    assert out.device.type == "cuda" and out.shape == ref.shape
    # compare on the CDF scale: both solve F(x) = u to fp32 accuracy
    f_ref, f_out = G.gm1d_pdf_cdf(gm, ref)[1], G.gm1d_pdf_cdf(gm, out)[1]
    torch.testing.assert_close(f_out, f_ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(out, ref, **FP32)


@pytest.mark.parametrize("per_component", [False, True])
def test_condition_mean_matches_torch(monkeypatch, per_component):
    gm = random_gm(8, 8, 4, 8, torch.float32, per_component, 3).to("cuda")
    g = torch.Generator().manual_seed(4)
    precision = (torch.rand(8, 1, 1, 1, generator=g) + 0.5).to("cuda")
    linear = torch.randn(8, 4, 8, 8, generator=g).to("cuda")
    ref, out = _both(monkeypatch, lambda: G.gm_condition_mean(gm, precision, linear))
    torch.testing.assert_close(out, ref, **FP32)


def test_logprob_matches_torch(monkeypatch):
    gm = random_gm(4, 8, 4, 8, torch.float32, True, 5).to("cuda")
    x = torch.randn(4, 3, 4, 8, 8, generator=torch.Generator().manual_seed(6)).to("cuda")
    ref, out = _both(monkeypatch, lambda: G.gm_logprob(gm, x))
    torch.testing.assert_close(out, ref, **FP32)


def test_kernels_follow_the_current_stream(monkeypatch):
    """A kernel launched on a side stream is ordered after that stream's earlier work."""
    gm = random_gm(4, 8, 4, 8, torch.float32, False, 7).to("cuda")
    linear = torch.randn(4, 4, 8, 8, device="cuda")
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    ref = G.gm_condition_mean(gm, 1.0, linear)
    monkeypatch.setenv(backend.ENV_VAR, "numba")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        scaled = linear * 1.0  # queued on the side stream before the kernel
        out = G.gm_condition_mean(gm, 1.0, scaled)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ref, **FP32)


@pytest.mark.parametrize("env", ["auto", "torch"])  # numba-cuda kernel / torch Jacobi
def test_kr_basis_matches_lapack(monkeypatch, env):
    from gmflow.gm.eigh import eigh_descending

    monkeypatch.setenv(backend.ENV_VAR, env)
    x = torch.randn(64, 4, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    a = x @ x.transpose(-1, -2)
    ref_values, ref_vectors = eigh_descending(a, method="lapack")
    values, vectors = eigh_descending(a.float().cuda())
    want = "numba-cuda" if env == "auto" else "torch"
    assert backend.selected_backend("symmetric_eigh", a.cuda()) == want
    torch.testing.assert_close(values.cpu().double(), ref_values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vectors.cpu().double(), ref_vectors, rtol=0, atol=5e-4)


@pytest.mark.parametrize("env", ["auto", "torch"])
def test_spectral_sampling_never_waits_for_the_gpu(monkeypatch, env):
    """No CUDA tensor is read back (torch.linalg.eigh would: it checks its error flag on the
    host), so the sampler keeps queueing work behind the network."""
    from gmflow.flow.spectral import spectral_sample

    monkeypatch.setenv(backend.ENV_VAR, env)
    gm = random_gm(4, 8, 4, 8, torch.float32, False, 9).to("cuda")
    lam = 0.3 * torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(10)).to("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    spectral_sample(gm, lam, gen)  # warm-up: kernel compiles and probes synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = spectral_sample(gm, lam, gen)
        with pytest.raises(RuntimeError):  # the check itself works
            torch.ones(1, device="cuda").item()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert bool(torch.isfinite(x).all())
