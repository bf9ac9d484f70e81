"""numba.cuda kernels under the CUDA simulator against the torch references (fp32 tolerance).

Run in their own process: ``NUMBA_ENABLE_CUDASIM=1 pytest -m cudasim`` (``make test`` does), since
the variable must be set before numba is first imported. Sizes are tiny: the simulator runs every
GPU thread as a Python thread.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gm_cases import CUDASIM, random_gm

from gmflow.gm import backend
from gmflow.gm.density import gm_logprob_torch
from gmflow.gm.inverse_cdf import _newton_torch
from gmflow.gm.products import _condition_torch

pytestmark = CUDASIM

FP32 = {"rtol": 1e-4, "atol": 1e-4}
TPB = 8  # threads per block: several blocks even at these sizes, so the grid indexing is exercised


@pytest.fixture(scope="module")
def ck():
    from gmflow.gm import cuda_kernels

    return cuda_kernels


def flat(gm):
    b, k, c, h, w = gm.means.shape
    return (
        gm.means.reshape(b, k, c, h * w).numpy().copy(),
        gm.logweights.reshape(b, k, h * w).numpy().copy(),
        gm.logstds.reshape(b, -1).numpy().copy(),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("k", "hw", "per_component"), [(1, 1, False), (3, 2, False), (3, 2, True)])
def test_inverse_cdf_kernel_matches_torch(ck, k, hw, per_component, dtype):
    gm = random_gm(2, k, 1, hw, dtype, per_component, seed=k)
    u = (1.99 * torch.rand(2, 3, hw, hw, generator=torch.Generator().manual_seed(1)) - 0.995).to(
        dtype
    )
    z = math.sqrt(2) * torch.erfinv(u)
    ref = _newton_torch(gm, u, z, 16, 1e-6, 1.5)
    m, lw, ls = flat(gm)
    out = np.zeros((2, 3, hw * hw), dtype=m.dtype)
    args = (
        m[:, :, 0].copy(),
        lw,
        ls,
        u.reshape(2, 3, -1).numpy(),
        z.reshape(2, 3, -1).numpy(),
        out,
    )
    ck.launch_gm1d_inverse_cdf(*args, 16, 1e-6, 1.5, threads_per_block=TPB)
    torch.testing.assert_close(torch.from_numpy(out).reshape(ref.shape), ref, **FP32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("k", "c", "hw", "per_component"), [(1, 1, 1, False), (3, 2, 2, True), (4, 3, 2, False)]
)
def test_condition_mean_kernel_matches_torch(ck, k, c, hw, per_component, dtype):
    gm = random_gm(2, k, c, hw, dtype, per_component, seed=c)
    g = torch.Generator().manual_seed(2)
    zeta = (2 * torch.rand(2, 1, 1, 1, generator=g) - 0.2).to(dtype)
    nu = torch.randn(2, c, hw, hw, generator=g).to(dtype)
    cond = _condition_torch(gm, zeta, nu, 1e-6)
    ref = (cond.logweights.exp() * cond.means).sum(dim=-4)
    m, lw, ls = flat(gm)
    out = np.zeros((2, c, hw * hw), dtype=m.dtype)
    nu_f = nu.reshape(2, c, -1).numpy()
    ck.launch_gm_condition_mean(
        m, lw, ls, zeta.reshape(2).numpy(), nu_f, out, 1e-6, threads_per_block=TPB
    )
    torch.testing.assert_close(torch.from_numpy(out).reshape(ref.shape), ref, **FP32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("k", "c", "hw", "per_component"), [(1, 1, 1, False), (3, 2, 2, True), (4, 3, 2, False)]
)
def test_logprob_kernel_matches_torch(ck, k, c, hw, per_component, dtype):
    gm = random_gm(2, k, c, hw, dtype, per_component, seed=k + c)
    x = 2 * torch.randn(2, 3, c, hw, hw, generator=torch.Generator().manual_seed(3)).to(dtype)
    ref = gm_logprob_torch(gm, x)
    m, lw, ls = flat(gm)
    out = np.zeros((2, 3, hw * hw), dtype=m.dtype)
    ck.launch_gm_logprob(m, lw, ls, x.reshape(2, 3, c, -1).numpy(), out, threads_per_block=TPB)
    torch.testing.assert_close(torch.from_numpy(out).reshape(ref.shape), ref, **FP32)


def test_backend_wrappers_drive_the_cuda_kernels(ck):
    """The backend's torch-side layout code (broadcasting, flattening) with the CUDA launchers."""

    def host(launch):
        def run(*args):  # torch CPU tensors -> host arrays, as as_cuda_array would give on a GPU
            arrays = [a.numpy() if isinstance(a, torch.Tensor) else a for a in args]
            launch(*arrays, threads_per_block=TPB)

        return run

    gm = random_gm(2, 3, 2, 2, torch.float32, True, seed=4)
    x = torch.randn(1, 3, 2, 2, 2, generator=torch.Generator().manual_seed(5))  # batch broadcasts
    got = backend._WRAPPERS["gm_logprob"](
        host(ck.launch_gm_logprob), gm.means, gm.logweights, gm.logstds, x
    )
    torch.testing.assert_close(got, gm_logprob_torch(gm, x), **FP32)

    nu = torch.randn(2, 2, 1, 1, generator=torch.Generator().manual_seed(6))  # spatially constant
    got = backend._WRAPPERS["gm_condition_mean"](
        host(ck.launch_gm_condition_mean),
        gm.means,
        gm.logweights,
        gm.logstds,
        torch.tensor(0.5),
        nu,
        1e-6,
    )
    cond = _condition_torch(gm, torch.tensor(0.5), nu, 1e-6)
    torch.testing.assert_close(got, (cond.logweights.exp() * cond.means).sum(dim=-4), **FP32)


def test_condition_mean_kernel_rejects_too_many_channels(ck):
    c = ck.MAX_CHANNELS + 1
    m = np.zeros((1, 1, c, 1), np.float32)
    with pytest.raises(ValueError, match="C = 33"):
        ck.launch_gm_condition_mean(
            m, *(np.zeros(shape, np.float32) for shape in [(1, 1, 1), (1, 1), (1,), (1, c, 1)]),
            np.zeros((1, c, 1), np.float32), 1e-6,
        )  # fmt: skip
