"""numba.cuda kernels for the hot GM operations (spec 7.15), twins of :mod:`gmflow.gm.kernels`.

Same maths, array layouts and stopping rule as the CPU kernels (see that module's docstring); one
thread per output element, 256 threads per block, arithmetic in the input dtype (float32 kernels
keep float32 registers; constants are typed so nothing is promoted to float64).

Two layers:

* ``launch_*`` take any arrays numba.cuda accepts — device arrays, or host NumPy arrays under the
  CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, which is how the tests run them on CPU) — and a
  stream.
* ``*_cuda`` take flattened, contiguous CUDA torch tensors (prepared by :mod:`gmflow.gm.backend`),
  wrap them without copies through ``__cuda_array_interface__`` (``numba.cuda.as_cuda_array``)
  and launch on torch's current stream.

numba.cuda is imported lazily by :mod:`gmflow.gm.backend` (never by ``import gmflow.gm``); the
kernels are compiled on first use, once per dtype.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace
from typing import Any

import numba
import numpy as np

from gmflow.gm._numba_compat import import_numba_cuda

cuda = import_numba_cuda()

__all__ = [
    "THREADS_PER_BLOCK",
    "MAX_CHANNELS",
    "launch_gm1d_inverse_cdf",
    "launch_gm_condition_mean",
    "launch_gm_logprob",
    "gm1d_inverse_cdf_cuda",
    "gm_condition_mean_cuda",
    "gm_logprob_cuda",
]

THREADS_PER_BLOCK = 256
MAX_CHANNELS = 32  # size of the per-thread accumulator of gm_condition_mean (larger C -> torch)


@functools.cache
def _kernels(dtype_name: str) -> SimpleNamespace:
    """Compile-on-first-use kernels whose constants are typed for ``dtype_name`` (float32/64)."""
    ft = numba.float32 if dtype_name == "float32" else numba.float64
    zero, half, one, two = ft(0.0), ft(0.5), ft(1.0), ft(2.0)
    inv_sqrt2, inv_sqrt_2pi = ft(1 / math.sqrt(2.0)), ft(1 / math.sqrt(2 * math.pi))
    half_log_2pi = ft(0.5 * math.log(2 * math.pi))
    neg_inf = ft(-np.inf)
    tol = ft(1e-9 if dtype_name == "float64" else 1e-5)  # Newton stopping rule, units of s̄
    trust = ft(np.sqrt(np.finfo(dtype_name).eps))  # steps below trust·s̄ are never bisected

    @cuda.jit
    def inverse_cdf(means, logweights, logstds, u, z, out, n_steps, eps, max_step_size):
        i = cuda.grid(1)
        n_batch, k_num, n_pix = means.shape
        m_num = u.shape[1]
        if i >= n_batch * m_num * n_pix:
            return
        b = i // (m_num * n_pix)
        m = (i // n_pix) % m_num
        p = i % n_pix
        per_comp = logstds.shape[1] > 1
        mean = zero
        for k in range(k_num):
            mean += math.exp(logweights[b, k, p]) * means[b, k, p]
        var = zero
        comp_var = zero
        for k in range(k_num):
            w = math.exp(logweights[b, k, p])
            s2 = math.exp(two * (logstds[b, k] if per_comp else logstds[b, 0]))
            d = means[b, k, p] - mean
            var += w * (s2 + d * d)
            comp_var += w * s2
        max_step = max_step_size * math.sqrt(comp_var)
        trust_tol = trust * math.sqrt(comp_var)
        stop_tol = tol * math.sqrt(comp_var)
        target = u[b, m, p]
        zm = z[b, m, p]
        lo = -neg_inf
        hi = neg_inf
        for k in range(k_num):
            q = means[b, k, p] + math.exp(logstds[b, k] if per_comp else logstds[b, 0]) * zm
            lo = min(lo, q)
            hi = max(hi, q)
        x = min(max(mean + math.sqrt(var) * zm, lo), hi)
        step = hi - lo
        for _ in range(n_steps):
            pdf = zero
            cdf = zero
            for k in range(k_num):
                ls = logstds[b, k] if per_comp else logstds[b, 0]
                lw = logweights[b, k, p]
                d = (x - means[b, k, p]) * math.exp(-ls)
                pdf += math.exp(lw - half * d * d - ls)
                cdf += math.exp(lw) * math.erf(d * inv_sqrt2)
            if cdf < target:
                lo = x
            else:
                hi = x
            delta = half * (cdf - target) / max(pdf * inv_sqrt_2pi, eps)
            newton = x - delta
            size = abs(delta)
            distrust = size > max_step or newton < lo or newton > hi or size > half * abs(step)
            x_new = half * (lo + hi) if distrust and size > trust_tol else newton
            step = x_new - x
            x = x_new
            if abs(step) <= stop_tol:
                break
        out[b, m, p] = x

    @cuda.jit
    def condition_mean(means, logweights, logstds, precision, linear, out, eps):
        i = cuda.grid(1)
        n_batch, k_num, c_num, n_pix = means.shape
        if i >= n_batch * n_pix:
            return
        b = i // n_pix
        p = i % n_pix
        per_comp = logstds.shape[1] > 1
        acc = cuda.local.array(MAX_CHANNELS, ft)
        for c in range(c_num):
            acc[c] = zero
        zeta = precision[b]
        half_c = half * ft(c_num)
        run_max = neg_inf
        run_sum = zero
        for k in range(k_num):
            s2 = math.exp(two * (logstds[b, k] if per_comp else logstds[b, 0]))
            den = max(s2 * zeta + one, eps)
            quad = zero
            for c in range(c_num):
                mu = means[b, k, c, p]
                nu = linear[b, c, p]
                quad += two * mu * nu + s2 * nu * nu - zeta * mu * mu
            logit = logweights[b, k, p] + half * quad / den - half_c * math.log(den)
            if logit == neg_inf:
                continue
            if logit > run_max:
                scale = math.exp(run_max - logit)
                run_sum *= scale
                for c in range(c_num):
                    acc[c] *= scale
                run_max = logit
            e = math.exp(logit - run_max)
            run_sum += e
            for c in range(c_num):
                acc[c] += e * (means[b, k, c, p] + s2 * linear[b, c, p]) / den
        for c in range(c_num):
            out[b, c, p] = acc[c] / run_sum

    @cuda.jit
    def logprob(means, logweights, logstds, x, out):
        i = cuda.grid(1)
        n_batch, k_num, c_num, n_pix = means.shape
        m_num = x.shape[1]
        if i >= n_batch * m_num * n_pix:
            return
        b = i // (m_num * n_pix)
        m = (i // n_pix) % m_num
        p = i % n_pix
        per_comp = logstds.shape[1] > 1
        fc = ft(c_num)
        run_max = neg_inf
        run_sum = zero
        for k in range(k_num):
            ls = logstds[b, k] if per_comp else logstds[b, 0]
            sq = zero
            for c in range(c_num):
                d = x[b, m, c, p] - means[b, k, c, p]
                sq += d * d
            logit = logweights[b, k, p] - half * sq * math.exp(-two * ls) - fc * ls
            if logit == neg_inf:
                continue
            if logit > run_max:
                run_sum = run_sum * math.exp(run_max - logit) + one
                run_max = logit
            else:
                run_sum += math.exp(logit - run_max)
        out[b, m, p] = run_max + math.log(run_sum) - fc * half_log_2pi

    return SimpleNamespace(inverse_cdf=inverse_cdf, condition_mean=condition_mean, logprob=logprob)


def _grid(n_threads: int, threads_per_block: int) -> int:
    return max(1, (n_threads + threads_per_block - 1) // threads_per_block)


def _dtype_name(a: Any) -> str:
    name = np.dtype(a.dtype).name
    if name not in ("float32", "float64"):
        raise TypeError(f"numba.cuda GM kernels take float32 or float64 arrays, got {name}")
    return name


def launch_gm1d_inverse_cdf(
    means, logweights, logstds, u, z, out, n_steps: int, eps: float, max_step_size: float,
    stream: Any = 0, threads_per_block: int = THREADS_PER_BLOCK,
) -> None:  # fmt: skip
    """Launch the 1-D inverse-CDF kernel; arrays and maths as ``kernels.gm1d_inverse_cdf_kernel``.

    Args:
        means: (N, K, P). logweights: (N, K, P). logstds: (N, Ks). u, z, out: (N, M, P).
        n_steps: maximum Newton iterations (stops after a step <= tol·s̄, tol 1e-9 fp64 /
            1e-5 fp32; safeguards as the CPU kernel, with √(dtype eps) as the trust tolerance).
        eps: pdf floor. max_step_size: longest trusted Newton step in units of s̄.
        stream: a numba.cuda stream (0 = default stream).
        threads_per_block: block size.
    """
    if out.size == 0:
        return
    name = _dtype_name(means)
    ft = np.float32 if name == "float32" else np.float64
    kern = _kernels(name).inverse_cdf
    kern[_grid(out.size, threads_per_block), threads_per_block, stream](
        means, logweights, logstds, u, z, out, int(n_steps), ft(eps), ft(max_step_size)
    )


def launch_gm_condition_mean(
    means, logweights, logstds, precision, linear, out, eps: float,
    stream: Any = 0, threads_per_block: int = THREADS_PER_BLOCK,
) -> None:  # fmt: skip
    """Launch the conditioned-mean kernel; arrays as ``kernels.gm_condition_mean_kernel``.

    Args:
        means: (N, K, C, P), C <= MAX_CHANNELS. logweights: (N, K, P). logstds: (N, Ks).
        precision: (N,). linear: (N, C, P). out: (N, C, P).
        eps: floor of den. stream: a numba.cuda stream. threads_per_block: block size.
    """
    if means.shape[2] > MAX_CHANNELS:
        raise ValueError(f"gm_condition_mean kernel: C = {means.shape[2]} > {MAX_CHANNELS}")
    if out.size == 0:
        return
    name = _dtype_name(means)
    ft = np.float32 if name == "float32" else np.float64
    n_threads = means.shape[0] * means.shape[3]
    kern = _kernels(name).condition_mean
    kern[_grid(n_threads, threads_per_block), threads_per_block, stream](
        means, logweights, logstds, precision, linear, out, ft(eps)
    )


def launch_gm_logprob(
    means, logweights, logstds, x, out, stream: Any = 0, threads_per_block: int = THREADS_PER_BLOCK
) -> None:
    """Launch the log-density kernel; arrays as ``kernels.gm_logprob_kernel``.

    Args:
        means: (N, K, C, P). logweights: (N, K, P). logstds: (N, Ks). x: (N, M, C, P).
        out: (N, M, P). stream: a numba.cuda stream. threads_per_block: block size.
    """
    if out.size == 0:
        return
    kern = _kernels(_dtype_name(means)).logprob
    kern[_grid(out.size, threads_per_block), threads_per_block, stream](
        means, logweights, logstds, x, out
    )


# ---- torch-facing entry points (real GPU only: the simulator has no external streams) ----


def _on_torch_stream(launch, *tensors, **kwargs) -> None:  # type: ignore[no-untyped-def]
    import torch

    stream = cuda.external_stream(torch.cuda.current_stream(tensors[0].device).cuda_stream)
    # sync=False: the kernel runs on the stream that produced the tensors, so it is ordered after
    # their writers already; numba's default synchronises that stream once per array (a full
    # host-device round trip each, which cost more than the kernel itself).
    arrays = [
        cuda.as_cuda_array(t, sync=False) if isinstance(t, torch.Tensor) else t for t in tensors
    ]
    launch(*arrays, stream=stream, **kwargs)


def gm1d_inverse_cdf_cuda(means, logweights, logstds, u, z, out, n_steps, eps, max_step_size):  # type: ignore[no-untyped-def]
    """``launch_gm1d_inverse_cdf`` on flattened contiguous CUDA tensors, torch's current stream."""
    _on_torch_stream(
        launch_gm1d_inverse_cdf, means, logweights, logstds, u, z, out, n_steps, eps, max_step_size
    )


def gm_condition_mean_cuda(means, logweights, logstds, precision, linear, out, eps):  # type: ignore[no-untyped-def]
    """``launch_gm_condition_mean`` on flattened contiguous CUDA tensors, torch's current stream."""
    _on_torch_stream(
        launch_gm_condition_mean, means, logweights, logstds, precision, linear, out, eps
    )


def gm_logprob_cuda(means, logweights, logstds, x, out):  # type: ignore[no-untyped-def]
    """``launch_gm_logprob`` on flattened contiguous CUDA tensors, torch's current stream."""
    _on_torch_stream(launch_gm_logprob, means, logweights, logstds, x, out)
