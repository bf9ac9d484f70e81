"""The sync-free Jacobi eigen-decomposition against LAPACK (``torch.linalg.eigh``), in fp64."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from gm_cases import random_gm

import gmflow.gm.transport as transport
from gmflow.gm import gaussian_to_gm_samples, gm_to_gaussian_samples
from gmflow.gm.eigh import _rounds, default_sweeps, eigh_descending, jacobi_eigh

F64 = torch.float64


def _wishart(shape, c, seed, dtype=F64):  # type: ignore[no-untyped-def]
    x = torch.randn(*shape, c, c + 2, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return (x @ x.transpose(-1, -2)).to(dtype)


def _clustered(shape, c, eps, seed):  # type: ignore[no-untyped-def]
    """I + ε·S: eigenvalues within ~ε of each other (the s² I term of a GM covariance)."""
    x = torch.randn(*shape, c, c, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return torch.eye(c, dtype=F64) + eps * (x + x.transpose(-1, -2))


def _off_diagonal(a, values, vectors):  # type: ignore[no-untyped-def]
    """max |Vᵀ A V − diag(λ)| relative to max |A|, per matrix."""
    resid = vectors.transpose(-1, -2) @ a @ vectors - torch.diag_embed(values)
    return resid.abs().amax((-1, -2)) / a.abs().amax((-1, -2))


def _orthonormality_error(vectors):  # type: ignore[no-untyped-def]
    eye = torch.eye(vectors.shape[-1], dtype=vectors.dtype)
    return (vectors.transpose(-1, -2) @ vectors - eye).abs().max()


@pytest.mark.parametrize("n", [2, 4, 6, 8, 16])
def test_every_pair_is_rotated_once_per_sweep(n):
    pairs = []
    for partner, flat, half_sigma, neg_sigma in _rounds(n, torch.device("cpu"), F64):
        partner, flat, sigma = partner.tolist(), flat.tolist(), (-neg_sigma).tolist()
        assert (2 * half_sigma).tolist() == sigma
        assert sorted(partner) == list(range(n)) and all(partner[partner[i]] == i for i in range(n))
        firsts = [i for i in range(n) if sigma[i] == 1.0]
        assert len(firsts) == n // 2 and all(sigma[partner[p]] == -1.0 for p in firsts)
        # both members read the same stored entry a_pq, p < q
        assert all(flat[i] == min(i, partner[i]) * n + max(i, partner[i]) for i in range(n))
        pairs += [tuple(sorted((p, partner[p]))) for p in firsts]
    assert sorted(pairs) == list(itertools.combinations(range(n), 2))


@pytest.mark.parametrize("c", [1, 2, 3, 4, 5, 8, 16])
def test_jacobi_matches_lapack_fp64(c):
    a = _wishart((3, 5), c, seed=c)
    values, vectors = jacobi_eigh(a)
    ref_values, ref_vectors = torch.linalg.eigh(a)
    scale = a.abs().amax()
    torch.testing.assert_close(values, ref_values.flip(-1), rtol=0, atol=1e-13 * scale)
    assert _orthonormality_error(vectors) < 1e-13
    assert _off_diagonal(a, values, vectors).max() < 1e-13
    # same vectors as LAPACK's up to sign; the canonical sign makes them equal
    ref_vectors = ref_vectors.flip(-1)
    flips = torch.sign((ref_vectors * vectors).sum(-2, keepdim=True))
    torch.testing.assert_close(vectors, ref_vectors * flips, rtol=0, atol=1e-10)
    torch.testing.assert_close(vectors, eigh_descending(a, method="lapack")[1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("c", [3, 4, 8, 16])
@pytest.mark.parametrize("eps", [1e-1, 1e-3, 1e-6])
def test_default_sweeps_converge_on_clustered_eigenvalues(c, eps):
    a = _clustered((200,), c, eps, seed=7)
    values, vectors = jacobi_eigh(a)
    assert _off_diagonal(a, values, vectors).max() < 1e-14
    torch.testing.assert_close(values, torch.linalg.eigvalsh(a).flip(-1), rtol=0, atol=5e-14)
    # and one sweep fewer than the default is not yet enough on the spread-out case
    a = _wishart((200,), c, seed=8)
    values, vectors = jacobi_eigh(a, sweeps=default_sweeps(c + c % 2, F64) - 2)
    assert _off_diagonal(a, values, vectors).max() > 1e-13


@pytest.mark.parametrize("c", [3, 4, 8])
def test_jacobi_fp32_is_as_accurate_as_lapack_fp32(c):
    a = _wishart((300,), c, seed=9)
    ref_values, ref_vectors = eigh_descending(a, method="lapack")
    values, vectors = jacobi_eigh(a.float())
    lapack_values, lapack_vectors = eigh_descending(a.float(), method="lapack")
    assert values.dtype == vectors.dtype == torch.float32
    assert _orthonormality_error(vectors) < 1e-5
    value_err = (values.double() - ref_values).abs().max()
    lapack_value_err = (lapack_values.double() - ref_values).abs().max()
    assert value_err < 4 * lapack_value_err + 1e-6 * ref_values.abs().max()
    vector_err = (vectors.double() - ref_vectors).abs().max()
    assert vector_err < 4 * (lapack_vectors.double() - ref_vectors).abs().max() + 1e-6


def test_degenerate_and_diagonal_inputs():
    eye = torch.eye(4, dtype=F64)
    for a in (eye, torch.zeros(4, 4, dtype=F64), 3 * eye):
        values, vectors = jacobi_eigh(a)
        torch.testing.assert_close(values, torch.diagonal(a), rtol=0, atol=0)
        torch.testing.assert_close(vectors, eye, rtol=0, atol=0)  # nothing to rotate
    a = torch.diag(torch.tensor([1.0, 5.0, 2.0, 5.0, -1.0], dtype=F64))
    values, vectors = jacobi_eigh(a)
    assert values.tolist() == [5.0, 5.0, 2.0, 1.0, -1.0]
    assert _orthonormality_error(vectors) == 0
    assert (vectors.abs().sum(-2) == 1).all()  # columns are still unit axes
    # a repeated eigenvalue with a non-trivial eigenspace: any orthonormal basis of it will do
    q = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(3), dtype=F64))[0]
    a = q @ torch.diag(torch.tensor([4.0, 4.0, 1.0, 0.5], dtype=F64)) @ q.T
    values, vectors = jacobi_eigh(a)
    torch.testing.assert_close(values, torch.tensor([4.0, 4.0, 1.0, 0.5], dtype=F64))
    assert _off_diagonal(a, values, vectors) < 1e-14 and _orthonormality_error(vectors) < 1e-14


@pytest.mark.parametrize("method", ["jacobi", "lapack"])
def test_signs_are_canonical(method):
    """Each eigenvector's largest entry is positive, whatever sign the input's eigenvectors had."""
    g = torch.Generator().manual_seed(4)
    q = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))[0]
    lam = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=F64))
    _, vectors = eigh_descending(q @ lam @ q.T, method=method)
    pivots = torch.take_along_dim(vectors, vectors.abs().argmax(-2, keepdim=True), -2)
    assert (pivots > 0).all()
    flipped = q * torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=F64)
    again = eigh_descending(flipped @ lam @ flipped.T, method=method)[1]
    torch.testing.assert_close(again, vectors)
    torch.testing.assert_close(vectors.abs(), q.abs(), rtol=0, atol=1e-12)


def test_auto_uses_lapack_on_cpu(monkeypatch):
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a: calls.append(a) or eigh(a))
    a = _wishart((2,), 4, seed=5)
    values, _ = eigh_descending(a)
    assert len(calls) == 1
    torch.testing.assert_close(values, jacobi_eigh(a)[0], rtol=0, atol=1e-12)


def test_auto_uses_the_sync_free_jacobi_off_cpu(monkeypatch):
    """Any non-CPU device without a numba-cuda kernel (here: meta) gets the torch Jacobi."""

    def no_lapack(a):  # type: ignore[no-untyped-def]
        raise AssertionError("torch.linalg.eigh synchronises on GPUs; it must not be called")

    monkeypatch.setattr(torch.linalg, "eigh", no_lapack)
    values, vectors = eigh_descending(torch.empty(3, 5, 4, 4, device="meta"))
    assert values.device.type == vectors.device.type == "meta"
    assert values.shape == (3, 5, 4) and vectors.shape == (3, 5, 4, 4)


def test_transport_agrees_with_either_basis(monkeypatch):
    """The KR maps with the Jacobi basis equal those with the LAPACK basis (fp64)."""
    gm = random_gm(2, 8, 4, 4, per_component=True, seed=6)
    z = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(7), dtype=F64)
    out = {}
    for method in ("lapack", "jacobi"):
        basis = functools.partial(eigh_descending, method=method)
        monkeypatch.setattr(transport, "eigh_descending", basis)
        x = gaussian_to_gm_samples(gm, z)
        out[method] = (x, gm_to_gaussian_samples(gm, x))
    torch.testing.assert_close(out["jacobi"][0], out["lapack"][0], rtol=0, atol=1e-9)
    torch.testing.assert_close(out["jacobi"][1], z, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    ("shape", "dtype", "match"),
    [((3,), F64, r"\(\.\.\., C, C\)"), ((2, 3), F64, "got \\(2, 3\\)"),
     ((3, 3), torch.int64, "floating-point")],
)  # fmt: skip
def test_bad_input_raises(shape, dtype, match):
    a = torch.zeros(shape, dtype=dtype)
    for fn in (jacobi_eigh, eigh_descending):
        with pytest.raises(ValueError, match=match):
            fn(a)
    with pytest.raises(ValueError, match="method must be"):
        eigh_descending(torch.eye(2), method="qr")
