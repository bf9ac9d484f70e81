"""The numba.cuda Jacobi eigen-decomposition under the CUDA simulator, against LAPACK.

Run in their own process with ``NUMBA_ENABLE_CUDASIM=1 pytest -m cudasim`` (``make test`` does).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gm_cases import CUDASIM

from gmflow.gm import backend
from gmflow.gm.eigh import eigh_descending

pytestmark = CUDASIM

TPB = 4  # several blocks even for a dozen matrices: exercises the grid bound


def _launch(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run the kernel on (..., C, C) through the same wrapper the GPU path uses."""
    from gmflow.gm import cuda_eigh

    def launch(work, values, vectors, max_sweeps):  # type: ignore[no-untyped-def]
        arrays = [t.numpy() for t in (work, values, vectors)]
        cuda_eigh.launch_symmetric_eigh(*arrays, max_sweeps, threads_per_block=TPB)

    values, vectors = backend._WRAPPERS["symmetric_eigh"](launch, torch.from_numpy(a))
    return values.numpy(), vectors.numpy()


def _wishart(shape, c, seed):  # type: ignore[no-untyped-def]
    x = np.random.default_rng(seed).standard_normal((*shape, c, c + 2))
    return x @ np.swapaxes(x, -1, -2)


@pytest.mark.parametrize("c", [1, 2, 3, 4, 5, 8])
def test_kernel_matches_lapack_fp64(c):
    a = _wishart((3, 3), c, seed=c)
    values, vectors = _launch(a.copy())
    ref_values, ref_vectors = eigh_descending(torch.from_numpy(a), method="lapack")
    scale = np.abs(a).max()
    np.testing.assert_allclose(values, ref_values.numpy(), rtol=0, atol=1e-13 * scale)
    np.testing.assert_allclose(vectors, ref_vectors.numpy(), rtol=0, atol=1e-10)  # signs too


def test_kernel_fp32_and_the_input_is_left_alone():
    a = _wishart((10,), 4, seed=11).astype(np.float32)
    before = a.copy()
    values, vectors = _launch(a)
    np.testing.assert_array_equal(a, before)  # the wrapper hands the kernel a copy
    assert values.dtype == vectors.dtype == np.float32
    ref_values, ref_vectors = eigh_descending(torch.from_numpy(a).double(), method="lapack")
    np.testing.assert_allclose(values, ref_values.numpy(), rtol=2e-6, atol=1e-5)
    np.testing.assert_allclose(vectors, ref_vectors.numpy(), rtol=0, atol=1e-4)
    gram = np.swapaxes(vectors, -1, -2) @ vectors
    np.testing.assert_allclose(gram, np.broadcast_to(np.eye(4), gram.shape), rtol=0, atol=1e-6)


def test_kernel_on_degenerate_inputs():
    a = np.stack([np.zeros((3, 3)), np.eye(3), np.diag([1.0, 5.0, 2.0]), np.diag([2.0, 2.0, 7.0])])
    values, vectors = _launch(a)
    np.testing.assert_array_equal(values, [[0, 0, 0], [1, 1, 1], [5, 2, 1], [7, 2, 2]])
    assert (np.abs(vectors).sum(-2) == 1).all() and (vectors >= 0).all()  # unit axes, sign +


def test_kernel_matches_the_torch_jacobi_on_gm_covariances():
    """The KR-basis use: pixel-averaged covariances of random mixtures (s² I plus a spread)."""
    from gm_cases import random_gm

    from gmflow.gm import gm_to_gaussian
    from gmflow.gm.eigh import jacobi_eigh

    cov = gm_to_gaussian(random_gm(6, 8, 4, 4, seed=12)).cov.mean(dim=(1, 2))
    values, vectors = _launch(cov.numpy())
    ref_values, ref_vectors = jacobi_eigh(cov)
    np.testing.assert_allclose(values, ref_values.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(vectors, ref_vectors.numpy(), rtol=0, atol=1e-10)
