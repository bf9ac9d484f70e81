"""Backend selection for the hot GM operations, in one place (spec 7.15).

Three backends implement ``gm1d_inverse_cdf``, ``gm_condition_mean`` and ``gm_logprob``
(``symmetric_eigh``, the KR basis, has a numba-cuda kernel and torch; see ``CUDA_ONLY_OPS``):

* ``torch`` — the reference that defines the maths: any device, differentiable.
* ``numba-cuda`` — :mod:`gmflow.gm.cuda_kernels` (and :mod:`gmflow.gm.cuda_eigh`), for CUDA
  tensors without autograd.
* ``numba-cpu`` — :mod:`gmflow.gm.kernels` (``@njit(parallel=True)``), for CPU tensors without
  autograd, chosen automatically only for the ops where it measurably beats torch.

Automatic choice: autograd needed -> torch; CUDA tensors -> numba-cuda for the ops in
``_CUDA_AUTO_OPS`` (when numba.cuda finds a GPU and the kernel compiles), else torch; CPU tensors ->
numba-cpu for the ops in ``_CPU_AUTO_OPS``, else torch.

``GMFLOW_GM_BACKEND`` forces a choice: ``torch`` (always the reference), ``numba`` (numba-cuda on
CUDA tensors, numba-cpu on CPU tensors, for every op), or ``auto``/unset. A forced backend that
cannot run (numba with autograd, numba on CUDA without a usable numba.cuda) and unknown values
raise :class:`~gmflow.errors.ConfigError` instead of silently falling back.

numba and numba.cuda are imported lazily, on the first call that selects them, so
``import gmflow.gm`` stays light and never initialises CUDA.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import torch
from torch import Tensor

from gmflow.errors import ConfigError
from gmflow.gm._shapes import broadcast_shapes

__all__ = ["ENV_VAR", "OPS", "CUDA_ONLY_OPS", "kernel_for", "requested_backend", "selected_backend"]

ENV_VAR = "GMFLOW_GM_BACKEND"
OPS = ("gm1d_inverse_cdf", "gm_condition_mean", "gm_logprob")
# Ops with a numba-cuda kernel and no numba-cpu twin: off CUDA they always run their torch path
# (``symmetric_eigh``: LAPACK on CPU, see gmflow.gm.eigh), whatever GMFLOW_GM_BACKEND says.
CUDA_ONLY_OPS = ("symmetric_eigh",)

# numba-cpu is the automatic CPU choice for every op where it measurably beats torch in
# ``python benchmarks/gm_ops.py --threads 1`` (2-core CPU sandbox, otherwise idle; fp32, no grad;
# kernel and torch batches interleaved in the same run; median speed-up torch/kernel at ImageNet
# B=16,K=8,C=4,32x32 | toy B=4096,K=64,C=2,1x1; 2026-11-26, vectorised kernels):
#   gm_condition_mean          x2.0 | x2.6  (two passes over K, no (B,K,C,H,W) temporaries)
#   gm1d_inverse_cdf (16 st.)  x2.3 | x3.3  (per-element early stop, SIMD sums over K)
#   gaussian_to_gm_samples     x3.2 | x2.9  (the KR inverse of spectral sampling)
#   gm_logprob (n=1)           x1.5 | x1.1  (n=8 inside gm_kl_div/gm_entropy: x1.5 | x3)
# No run showed a kernel slower than torch by more than the noise. With torch's default 2 threads
# on a loaded machine, torch slows down far more than numba (x1.3-x13 in the kernels' favour).
# Full tables: benchmarks/results/gm_ops.md.
_CPU_AUTO_OPS = frozenset(OPS)
# The ops whose numba-cuda kernel the automatic choice uses on CUDA tensors. One H100, numba-cuda
# 0.30.4, torch 2.11 (benchmarks/results/gm_ops.md, CUDA table, 2026-11-26), speed-up torch/kernel:
#   gm1d_inverse_cdf (16 st.)  x8.5 (B=16) | x8.6-10.8 (B=125) | x8.3 toy   -> numba-cuda
#   gaussian_to_gm_samples     x6.1 | x6.1 | x4.8 (through the inverse CDF)
#   gm_condition_mean          x0.7 | x0.7 | x0.6                           -> torch
#   gm_logprob                 x0.5 | x0.5 | x0.5                           -> torch
# A numba-cuda launch costs ~0.4-0.6 ms of host time (argument typing and array wrapping), more
# than torch's few fused launches of the one-pass ops; the Newton loop replaces ~200 torch launches.
# GMFLOW_GM_BACKEND=numba still forces every kernel (benchmarks/sampling.py --cuda-kernels too).
# symmetric_eigh (the KR basis of spectral sampling, gmflow.gm.cuda_eigh): one launch instead of
# the ~250 small kernels of the sync-free torch Jacobi (C = 4); not yet timed on a GPU.
_CUDA_AUTO_OPS = frozenset({"gm1d_inverse_cdf", "symmetric_eigh"})


def requested_backend() -> str:
    """Return the backend asked for by ``GMFLOW_GM_BACKEND``: 'auto', 'torch' or 'numba'.

    Raises:
        ConfigError: for any other value.
    """
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("torch", "numba"):
        return value
    raise ConfigError(
        f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not a GM backend; expected 'torch', 'numba' or "
        f"'auto' (or leave it unset for the automatic choice by device and autograd)"
    )


@functools.cache
def _numba_cuda_usable() -> bool:
    from gmflow.gm._numba_compat import import_numba_cuda

    cuda = import_numba_cuda()
    return bool(cuda.is_available())


def _probe_inputs(op: str, device: torch.device) -> tuple[Tensor, ...]:
    """Tiny valid inputs of ``op`` in the kernel-call layout (for the compile probe)."""
    f = functools.partial(torch.zeros, device=device, dtype=torch.float32)
    if op == "gm1d_inverse_cdf":
        return (
            f(1, 2, 1, 1, 1),
            f(1, 2, 1, 1, 1),
            f(1, 1, 1, 1, 1),
            f(1, 1, 1, 1),
            f(1, 1, 1, 1),
            2,
            1e-6,
            1.5,
        )
    if op == "gm_condition_mean":
        return (
            f(1, 2, 2, 1, 1),
            f(1, 2, 1, 1, 1),
            f(1, 1, 1, 1, 1),
            f(1, 1, 1, 1),
            f(1, 2, 1, 1),
            1e-6,
        )
    if op == "symmetric_eigh":
        return (torch.tensor([[2.0, 1.0], [1.0, 2.0]], device=device),)
    return (f(1, 2, 2, 1, 1), f(1, 2, 1, 1, 1), f(1, 1, 1, 1, 1), f(1, 1, 2, 1, 1))


def _check_probe(op: str, result: object) -> None:
    """Raise if a probe's result is wrong (only ops whose probe has a known closed-form answer)."""
    if op == "symmetric_eigh":
        values, vectors = result  # type: ignore[misc]
        r = math.sqrt(0.5)
        expected = torch.tensor([[r, r], [r, -r]], device=vectors.device)
        if not (
            torch.allclose(values.cpu(), torch.tensor([3.0, 1.0]), atol=1e-5)
            and torch.allclose(vectors, expected, atol=1e-5)
        ):
            raise RuntimeError(f"wrong eigen-decomposition of [[2, 1], [1, 2]]: {result}")


_CUDA_FAILURES: dict[str, str] = {}


@functools.cache
def _cuda_op_works(op: str) -> bool:
    """Compile and run the numba-cuda kernel of ``op`` once on a tiny input.

    numba-cuda can be present yet unable to compile on a given machine (a driver, toolkit or NumPy
    it does not support); the automatic choice then falls back to the torch reference with one
    warning instead of crashing mid-sampling, and a forced ``numba`` reports the reason.
    """
    import warnings

    try:
        if not _numba_cuda_usable():
            _CUDA_FAILURES[op] = "numba.cuda finds no usable GPU"
            return False
        inputs = _probe_inputs(op, torch.device("cuda"))
        result = _WRAPPERS[op](_launcher(op, "numba-cuda"), *inputs)
        torch.cuda.synchronize()
        _check_probe(op, result)
        return True
    except Exception as err:  # noqa: BLE001 - any compile/launch failure means "use torch"
        _CUDA_FAILURES[op] = f"{type(err).__name__}: {err}"
        warnings.warn(
            f"gmflow.gm: the numba-cuda kernel of {op} cannot run here ({_CUDA_FAILURES[op]}); "
            "using the torch reference instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return False


def selected_backend(op: str, *tensors: Tensor) -> str:
    """Return 'torch', 'numba-cpu' or 'numba-cuda': the backend ``op`` runs on for these inputs.

    Args:
        op: one of ``OPS`` or ``CUDA_ONLY_OPS``.
        *tensors: the op's tensor inputs (already promoted to the GM maths dtype).

    Raises:
        ConfigError: ``GMFLOW_GM_BACKEND`` is invalid, or forces numba where it cannot run.
    """
    if op not in OPS + CUDA_ONLY_OPS:
        raise ValueError(f"kernel_for: unknown op {op!r}; expected one of {OPS + CUDA_ONLY_OPS}")
    choice = requested_backend()
    if choice == "torch" or (op in CUDA_ONLY_OPS and any(t.device.type != "cuda" for t in tensors)):
        return "torch"
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    devices = {t.device for t in tensors}
    kernel_dtypes = all(t.dtype in (torch.float32, torch.float64) for t in tensors)
    if choice == "auto":
        if needs_grad or len(devices) != 1 or not kernel_dtypes:
            return "torch"
        device = devices.pop()
        if device.type == "cuda" and op in _CUDA_AUTO_OPS and _cuda_op_works(op):
            return "numba-cuda"
        if device.type == "cpu" and op in _CPU_AUTO_OPS:
            return "numba-cpu"
        return "torch"
    # ---- forced numba: say exactly why it cannot run rather than fall back ----
    if needs_grad:
        raise ConfigError(
            f"{ENV_VAR}=numba: {op} got inputs that require grad, but the numba kernels are "
            "forward-only; call it under torch.no_grad(), or unset the variable so autograd "
            "uses the torch backend"
        )
    if len(devices) != 1 or not kernel_dtypes:
        raise ConfigError(
            f"{ENV_VAR}=numba: {op} needs float32/float64 inputs on one device, got devices "
            f"{sorted(map(str, devices))} and dtypes {sorted({str(t.dtype) for t in tensors})}"
        )
    device = devices.pop()
    if device.type == "cpu":
        return "numba-cpu"
    if device.type == "cuda":
        if not _cuda_op_works(op):
            raise ConfigError(
                f"{ENV_VAR}=numba: {op} got CUDA tensors but its numba-cuda kernel cannot run "
                f"({_CUDA_FAILURES.get(op, 'unknown reason')}); install the CUDA extra "
                "(pip install 'gmflow[cuda]') or unset the variable to use torch"
            )
        return "numba-cuda"
    raise ConfigError(f"{ENV_VAR}=numba: {op}: no numba kernels for device {device}")


def kernel_for(op: str, *tensors: Tensor) -> Callable[..., Tensor] | None:
    """Return a kernel implementing ``op`` for these tensors, or None to use the torch reference.

    The callable takes the same arguments as the op's call site (and returns the same result):

    * ``gm1d_inverse_cdf``: (means, logweights, logstds, u, z, n_steps, eps, max_step_size) with
      a C = 1 mixture and u, z (..., n, H, W); returns x (..., n, H, W).
    * ``gm_condition_mean``: (means, logweights, logstds, precision, linear, eps); returns
      (..., C, H, W).
    * ``gm_logprob``: (means, logweights, logstds, x); returns (..., n, H, W).
    * ``symmetric_eigh``: (a,) with a (..., C, C); returns (eigenvalues (..., C) descending,
      eigenvectors (..., C, C) with canonical signs), as :func:`gmflow.gm.eigh.eigh_descending`.

    Raises:
        ConfigError: see :func:`selected_backend`.
    """
    backend = selected_backend(op, *tensors)
    if backend == "torch":
        return None
    if op == "gm_condition_mean" and backend == "numba-cuda":
        from gmflow.gm.cuda_kernels import MAX_CHANNELS

        if tensors[0].shape[-3] > MAX_CHANNELS:
            return None
    return functools.partial(_WRAPPERS[op], _launcher(op, backend))


# ---- launchers: flattened contiguous torch tensors -> kernel ----


def _launcher(op: str, backend: str) -> Callable[..., None]:
    if backend == "numba-cuda":
        from gmflow.gm import cuda_eigh, cuda_kernels

        return getattr(cuda_eigh if op in CUDA_ONLY_OPS else cuda_kernels, f"{op}_cuda")
    from gmflow.gm import kernels

    kernel = getattr(kernels, f"{op}_kernel")

    def launch(*args):  # type: ignore[no-untyped-def]
        kernel(*(a.numpy() if isinstance(a, Tensor) else a for a in args))

    return launch


# ---- wrappers: GM layout (..., K, C, H, W) <-> flattened kernel layout (N, K, C, P) ----


def _flat_gm(means: Tensor, logweights: Tensor, logstds: Tensor, batch: torch.Size):
    """Expand to the full batch and fold it into N, H·W into P: (N,K,C,P), (N,K,P), (N,Ks)."""
    k, c, h, w = means.shape[-4:]
    n = math.prod(batch)
    dtype = means.dtype
    m = means.expand(*batch, k, c, h, w).reshape(n, k, c, h * w).contiguous()
    lw = logweights.to(dtype).expand(*batch, k, 1, h, w).reshape(n, k, h * w).contiguous()
    ks = logstds.shape[-4]
    ls = logstds.to(dtype).expand(*batch, ks, 1, 1, 1).reshape(n, ks).contiguous()
    return m, lw, ls


def _inverse_cdf(launch, means, logweights, logstds, u, z, n_steps, eps, max_step_size):  # type: ignore[no-untyped-def]
    batch = broadcast_shapes(
        means.shape[:-4], logweights.shape[:-4], logstds.shape[:-4], u.shape[:-3], z.shape[:-3]
    )
    n_samples = broadcast_shapes(u.shape[-3:-2], z.shape[-3:-2])[0]
    h, w = means.shape[-2:]
    m, lw, ls = _flat_gm(means, logweights, logstds, batch)
    n = m.shape[0]
    m = m.reshape(n, m.shape[1], h * w)  # (N, K, P)
    shape = (*batch, n_samples, h, w)
    u_f = u.to(m.dtype).expand(shape).reshape(n, n_samples, h * w).contiguous()
    z_f = z.to(m.dtype).expand(shape).reshape(n, n_samples, h * w).contiguous()
    out = torch.empty_like(u_f)  # (N, M, P)
    launch(m, lw, ls, u_f, z_f, out, int(n_steps), float(eps), float(max_step_size))
    return out.reshape(shape)


def _condition_mean(launch, means, logweights, logstds, precision, linear, eps):  # type: ignore[no-untyped-def]
    zeta_batch = tuple(precision.shape[:-3]) if precision.dim() else ()
    batch = broadcast_shapes(
        means.shape[:-4], logweights.shape[:-4], logstds.shape[:-4], linear.shape[:-3], zeta_batch
    )
    c, h, w = means.shape[-3:]
    m, lw, ls = _flat_gm(means, logweights, logstds, batch)
    n = m.shape[0]
    zeta = precision.to(m.dtype).reshape(zeta_batch).expand(batch).reshape(n).contiguous()
    nu = linear.to(m.dtype).expand(*batch, c, h, w).reshape(n, c, h * w).contiguous()
    out = torch.empty_like(nu)  # (N, C, P)
    launch(m, lw, ls, zeta, nu, out, float(eps))
    return out.reshape(*batch, c, h, w)


def _logprob(launch, means, logweights, logstds, x):  # type: ignore[no-untyped-def]
    batch = broadcast_shapes(
        means.shape[:-4], logweights.shape[:-4], logstds.shape[:-4], x.shape[:-4]
    )
    c, h, w = means.shape[-3:]
    n_samples = x.shape[-4]
    m, lw, ls = _flat_gm(means, logweights, logstds, batch)
    n = m.shape[0]
    x_f = x.to(m.dtype).expand(*batch, n_samples, c, h, w).reshape(n, n_samples, c, h * w)
    x_f = x_f.contiguous()
    out = x_f.new_empty(n, n_samples, h * w)  # (N, M, P)
    launch(m, lw, ls, x_f, out)
    return out.reshape(*batch, n_samples, h, w)


def _symmetric_eigh(launch, a):  # type: ignore[no-untyped-def]
    from gmflow.gm.cuda_eigh import MAX_SWEEPS

    c = a.shape[-1]
    work = a.reshape(-1, c, c).clone(memory_format=torch.contiguous_format)  # destroyed
    values = work.new_empty(work.shape[:-1])  # (N, C)
    vectors = torch.empty_like(work)  # (N, C, C)
    launch(work, values, vectors, MAX_SWEEPS)
    return values.reshape(a.shape[:-1]), vectors.reshape(a.shape)


_WRAPPERS = {
    "gm1d_inverse_cdf": _inverse_cdf,
    "gm_condition_mean": _condition_mean,
    "gm_logprob": _logprob,
    "symmetric_eigh": _symmetric_eigh,
}
