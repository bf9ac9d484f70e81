"""numba.cuda eigen-decomposition of small symmetric matrices: one thread per matrix (spec 7.9).

The same cyclic Jacobi method as :func:`gmflow.gm.eigh.jacobi_eigh` (rotation formulas in that
module's docstring), but serial per matrix, so it can do what a batched torch version cannot
without reading back to the host: skip negligible rotations and stop after the first sweep that
rotates nothing. A rotation of (p, q) is skipped when |a_pq| <= ε·√|a_pp a_qq| (ε the dtype's
machine epsilon: the entry is rounding noise relative to the two diagonal entries), or a_pq = 0.
Then the eigenvalues are sorted in descending order (columns of V with them) and each column gets
the canonical sign (its entry of largest magnitude positive), as in :mod:`gmflow.gm.eigh`.

One launch replaces the ~250 small kernels of the torch Jacobi for C = 4, and nothing is read
back, so the sampler keeps queueing work behind the network. Matrices are tiny (C <= 16 in
practice), so the work arrays live in global memory: a (N, C, C) copy of the input, which the
kernel destroys, the values (N, C) and the vectors (N, C, C).

Two layers, as in :mod:`gmflow.gm.cuda_kernels`: ``launch_symmetric_eigh`` takes numba.cuda (or
simulator) arrays; ``symmetric_eigh_cuda`` takes flattened contiguous CUDA torch tensors and runs
on torch's current stream.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numba
import numpy as np

from gmflow.gm._numba_compat import import_numba_cuda
from gmflow.gm.cuda_kernels import THREADS_PER_BLOCK, _dtype_name, _grid, _on_torch_stream

cuda = import_numba_cuda()

__all__ = ["MAX_SWEEPS", "launch_symmetric_eigh", "symmetric_eigh_cuda"]

MAX_SWEEPS = 30  # a safety bound only: C <= 16 converges in <= 8 sweeps (quadratic convergence)


@functools.cache
def _kernel(dtype_name: str) -> Any:
    """Compile-on-first-use Jacobi kernel with constants typed for ``dtype_name``."""
    ft = numba.float32 if dtype_name == "float32" else numba.float64
    zero, one = ft(0.0), ft(1.0)
    eps = ft(np.finfo(dtype_name).eps)

    @cuda.jit
    def symmetric_eigh(a, values, vectors, max_sweeps):
        i = cuda.grid(1)
        n_mat, c_num = a.shape[0], a.shape[1]
        if i >= n_mat:
            return
        for r in range(c_num):
            for s in range(c_num):
                vectors[i, r, s] = one if r == s else zero
        for _ in range(max_sweeps):
            rotated = False
            for p in range(c_num - 1):
                for q in range(p + 1, c_num):
                    apq = a[i, p, q]
                    app = a[i, p, p]
                    aqq = a[i, q, q]
                    if abs(apq) <= eps * math.sqrt(abs(app)) * math.sqrt(abs(aqq)) or apq == zero:
                        continue
                    rotated = True
                    d = aqq - app
                    two_apq = apq + apq
                    t = two_apq / (d + math.copysign(math.sqrt(d * d + two_apq * two_apq), d))
                    cs = one / math.sqrt(one + t * t)
                    sn = t * cs
                    for k in range(c_num):  # A <- A J (columns p, q)
                        akp = a[i, k, p]
                        akq = a[i, k, q]
                        a[i, k, p] = cs * akp - sn * akq
                        a[i, k, q] = sn * akp + cs * akq
                    for k in range(c_num):  # A <- Jᵀ A (rows p, q)
                        apk = a[i, p, k]
                        aqk = a[i, q, k]
                        a[i, p, k] = cs * apk - sn * aqk
                        a[i, q, k] = sn * apk + cs * aqk
                    a[i, p, q] = zero
                    a[i, q, p] = zero
                    for k in range(c_num):  # V <- V J
                        vkp = vectors[i, k, p]
                        vkq = vectors[i, k, q]
                        vectors[i, k, p] = cs * vkp - sn * vkq
                        vectors[i, k, q] = sn * vkp + cs * vkq
            if not rotated:
                break
        for r in range(c_num):
            values[i, r] = a[i, r, r]
        for r in range(c_num):  # selection sort, descending, columns of V along
            best = r
            for s in range(r + 1, c_num):
                if values[i, s] > values[i, best]:
                    best = s
            if best != r:
                tmp = values[i, r]
                values[i, r] = values[i, best]
                values[i, best] = tmp
                for k in range(c_num):
                    tmp = vectors[i, k, r]
                    vectors[i, k, r] = vectors[i, k, best]
                    vectors[i, k, best] = tmp
            pivot = vectors[i, 0, r]  # canonical sign: the largest entry (first of ties) > 0
            for k in range(1, c_num):
                if abs(vectors[i, k, r]) > abs(pivot):
                    pivot = vectors[i, k, r]
            if pivot < zero:
                for k in range(c_num):
                    vectors[i, k, r] = -vectors[i, k, r]

    return symmetric_eigh


def launch_symmetric_eigh(
    a, values, vectors, max_sweeps: int = MAX_SWEEPS, stream: Any = 0,
    threads_per_block: int = THREADS_PER_BLOCK,
) -> None:  # fmt: skip
    """Eigen-decompose each symmetric a[i] (destroyed) into values[i] (descending) and vectors[i].

    Args:
        a: (N, C, C) float32/float64, symmetric; overwritten (nearly diagonal on return).
        values: (N, C) output. vectors: (N, C, C) output, eigenvectors as columns.
        max_sweeps: bound on the sweeps (the kernel stops after a sweep with no rotation).
        stream: a numba.cuda stream (0 = default stream). threads_per_block: block size.
    """
    if a.shape[0] == 0:
        return
    kern = _kernel(_dtype_name(a))
    kern[_grid(a.shape[0], threads_per_block), threads_per_block, stream](
        a, values, vectors, int(max_sweeps)
    )


def symmetric_eigh_cuda(a, values, vectors, max_sweeps):  # type: ignore[no-untyped-def]
    """``launch_symmetric_eigh`` on contiguous CUDA torch tensors, torch's current stream."""
    _on_torch_stream(launch_symmetric_eigh, a, values, vectors, max_sweeps)
