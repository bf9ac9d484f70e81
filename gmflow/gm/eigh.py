"""Eigen-decomposition of small symmetric matrices without host synchronisation (spec 7.9).

The KR basis of spectral sampling is the eigenbasis of a C×C covariance (C = 4 for SD-VAE
latents), computed once per sampler step. ``torch.linalg.eigh`` on CUDA reads its solver's error
flag back to the host, which stalls the host until the GPU has finished all queued work (the
network evaluation), so the rest of the step can no longer be queued behind it. On CUDA (and any
non-CPU device) :func:`eigh_descending` therefore runs a cyclic Jacobi method that reads nothing
back: one numba-cuda kernel (:mod:`gmflow.gm.cuda_eigh`, one thread per matrix) where numba-cuda
works, else plain torch tensor ops with a fixed number of sweeps (:func:`jacobi_eigh`).

Parallel (round-robin) Jacobi: with the size padded to even n, each sweep has n − 1 rounds; a
round rotates n/2 disjoint index pairs at once, and over a sweep every pair of indices meets
once. For a pair (p, q) with d = a_qq − a_pp and h = hypot(d, 2a_pq), the rotation of smallest
angle that zeroes a_pq is

    t = 2a_pq / (d + sign(d)·h),   c = 1/√(1 + t²),   s = t·c,   R = [[c, s], [−s, c]],
    A ← Rᵀ A R   (on rows and columns p, q),   V ← V R,

(Golub and Van Loan, Matrix Computations, sym.schur2). Every update is an orthogonal similarity,
so V stays orthonormal to rounding and V diag(λ) Vᵀ = A whatever the number of sweeps; the sweeps
only decide how diagonal the last A is. Convergence is quadratic; :func:`default_sweeps` reaches
the dtype's precision (tests check it against LAPACK).

Both paths return eigenvalues in descending order and a canonical sign per eigenvector (its
entry of largest magnitude is positive), so CPU (LAPACK) and GPU (Jacobi) give the same basis up
to rounding wherever the eigenvalues are distinct.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from gmflow.gm import backend as _backend

__all__ = ["eigh_descending", "jacobi_eigh", "default_sweeps"]


def default_sweeps(n: int, dtype: torch.dtype) -> int:
    """Jacobi sweeps that reach the dtype's precision for size n: ⌈log₂ n⌉ + 3 (fp64) or + 2.

    Measured on Wishart and clustered (I + εS) matrices, C = 3..16: fp64 reaches ~1e-15 relative
    off-diagonal in 4 sweeps for C = 4, 6 for C = 8 and 7 for C = 16; fp32 its own floor one sweep
    earlier. A single 2×2 rotation is exact (n = 2).
    """
    if n <= 2:
        return 1
    return math.ceil(math.log2(n)) + (3 if dtype == torch.float64 else 2)


@functools.cache
def _rounds(
    n: int, device: torch.device, dtype: torch.dtype
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], ...]:
    """The n − 1 rounds of a sweep (circle method): index 0 stays, the others rotate one place.

    Round r pairs ring[i] with ring[n − 1 − i]. Per round: ``partner`` (n,); ``flat``, the index
    of a_pq (p < q) in the flattened matrix for both members of the pair (they must read the same
    entry: the updated A is symmetric only to rounding, and J would not be orthogonal); σ/2 and −σ
    (n,) in ``dtype``, with σ = +1 for the first index p of each pair and −1 for the second q.
    """
    rounds = []
    for r in range(n - 1):
        ring = [0, *[1 + (r + i) % (n - 1) for i in range(n - 1)]]
        partner, sigma = [0] * n, [0.0] * n
        for i in range(n // 2):
            p, q = ring[i], ring[n - 1 - i]
            partner[p], partner[q], sigma[p], sigma[q] = q, p, 1.0, -1.0
        flat = [min(i, j) * n + max(i, j) for i, j in enumerate(partner)]
        sig = torch.tensor(sigma, device=device, dtype=dtype)
        index = [torch.tensor(x, device=device) for x in (partner, flat)]
        rounds.append((*index, 0.5 * sig, -sig))
    return tuple(rounds)


def _jacobi_round(a: Tensor, v: Tensor, partner: Tensor, flat: Tensor, half_sigma: Tensor,
                  neg_sigma: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One round: rotate every pair (p, q) of the round at once; returns (Jᵀ A J, V J).

    Per index i (member of the pair (p, q)), with the module docstring's t written in halves,
    t = a_pq / (δ + sign(δ)·hypot(δ, a_pq)), δ = (a_qq − a_pp)/2 (the same at p and q):
    c_i = 1/√(1 + t²) and s_i = −σ_i·t·c, so that (A J)[:, i] = c_i A[:, i] + s_i A[:, partner(i)]
    (J[p, p] = J[q, q] = c, J[q, p] = −s, J[p, q] = s), and likewise on the rows.
    """
    diag = torch.diagonal(a, dim1=-2, dim2=-1)
    delta = (diag.index_select(-1, partner) - diag) * half_sigma  # (a_qq − a_pp)/2 at p and q
    apq = a.flatten(-2).index_select(-1, flat)
    tiny = torch.finfo(a.dtype).tiny  # 0/0 -> 0 (no rotation) for an already diagonal pair
    t = apq / (delta + torch.copysign(torch.hypot(delta, apq) + tiny, delta))
    c = torch.rsqrt(t * t + 1)
    s = t * c * neg_sigma
    c_col, s_col = c.unsqueeze(-2), s.unsqueeze(-2)
    aj = torch.addcmul(a * c_col, a.index_select(-1, partner), s_col)
    a = torch.addcmul(aj * c.unsqueeze(-1), aj.index_select(-2, partner), s.unsqueeze(-1))
    v = torch.addcmul(v * c_col, v.index_select(-1, partner), s_col)
    return a, v


def _canonical_signs(vectors: Tensor) -> Tensor:
    """Flip each column so that its entry of largest magnitude is positive."""
    pivot = torch.take_along_dim(vectors, vectors.abs().argmax(dim=-2, keepdim=True), dim=-2)
    return vectors * torch.where(pivot < 0, -1.0, 1.0).to(vectors.dtype)


def _sorted_descending(values: Tensor, vectors: Tensor) -> tuple[Tensor, Tensor]:
    values, order = values.sort(dim=-1, descending=True)
    return values, torch.take_along_dim(vectors, order.unsqueeze(-2), dim=-1)


def jacobi_eigh(a: Tensor, sweeps: int | None = None) -> tuple[Tensor, Tensor]:
    """Eigen-decompose symmetric matrices by parallel cyclic Jacobi, with no host sync.

    Args:
        a: (..., C, C) symmetric, floating point.
        sweeps: Jacobi sweeps (default :func:`default_sweeps` of the size and dtype).

    Returns:
        (eigenvalues (..., C) descending, eigenvectors (..., C, C) as orthonormal columns with
        canonical signs), in the dtype of ``a``.
    """
    c = _check_square("jacobi_eigh", a)
    n = c + c % 2
    sweeps = default_sweeps(n, a.dtype) if sweeps is None else sweeps
    if n != c:  # odd C: a decoupled last index (zero row and column) that never rotates
        a = torch.nn.functional.pad(a, (0, 1, 0, 1))
    v = torch.eye(n, dtype=a.dtype, device=a.device).expand(a.shape).clone()
    rounds = _rounds(n, a.device, a.dtype)
    for _ in range(sweeps):
        for constants in rounds:
            a, v = _jacobi_round(a, v, *constants)
    values = torch.diagonal(a, dim1=-2, dim2=-1)[..., :c]
    values, v = _sorted_descending(values, v[..., :c, :c])
    return values, _canonical_signs(v)


def eigh_descending(
    a: Tensor, method: str = "auto", sweeps: int | None = None
) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and orthonormal eigenvectors (canonical signs) of symmetric ``a``.

    Args:
        a: (..., C, C) symmetric, fp32 or fp64.
        method: "lapack" (``torch.linalg.eigh``: exact, but synchronises on CUDA), "jacobi"
            (:func:`jacobi_eigh`: sync-free), or "auto": LAPACK on CPU; elsewhere the numba-cuda
            kernel of :mod:`gmflow.gm.cuda_eigh` where the GM backend selects it
            (``GMFLOW_GM_BACKEND``, :mod:`gmflow.gm.backend`), else :func:`jacobi_eigh`.
        sweeps: sweeps of :func:`jacobi_eigh` (default by size and dtype).

    Returns:
        (eigenvalues (..., C), eigenvectors (..., C, C)); column i belongs to eigenvalue i.

    Raises:
        ValueError: for a non-square input or an unknown method.
    """
    _check_square("eigh_descending", a)
    if method not in ("auto", "lapack", "jacobi"):
        raise ValueError(
            f"eigh_descending: method must be 'auto', 'lapack' or 'jacobi', got {method!r}"
        )
    if method == "auto" and a.device.type != "cpu":
        kernel = _backend.kernel_for("symmetric_eigh", a)
        return kernel(a) if kernel is not None else jacobi_eigh(a, sweeps)
    if method == "jacobi":
        return jacobi_eigh(a, sweeps)
    values, vectors = torch.linalg.eigh(a)
    return values.flip(-1), _canonical_signs(vectors.flip(-1))


def _check_square(name: str, a: Tensor) -> int:
    if a.dim() < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{name}: expected (..., C, C) symmetric matrices, got {tuple(a.shape)}")
    if not a.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a floating-point tensor, got {a.dtype}")
    return a.shape[-1]
