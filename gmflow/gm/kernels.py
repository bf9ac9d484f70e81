"""Numba CPU kernels for the hot GM operations (spec 7.3, 7.13, 7.15 and 3.5).

Each kernel mirrors a torch reference that defines the maths and that the tests compare against:

* :func:`gm1d_inverse_cdf_kernel` — ``gmflow.gm.inverse_cdf._newton_torch`` (1-D inverse CDF);
* :func:`gm_condition_mean_kernel` — ``gmflow.gm.products._condition_torch`` followed by the mean;
* :func:`gm_logprob_kernel` — ``gmflow.gm.density.gm_logprob_torch``.

Entry points (``*_kernel``) take C-contiguous float32/float64 NumPy arrays in the flattened GM
layout of the CUDA kernels: leading batch dims folded into N, pixels H·W into P (p = h·W + w),
components K, channels C, samples M; ``logstds`` is (N, Ks), Ks = 1 (per sample) or K. They regroup
the (batch, pixel) pairs into L = N·P "lanes" and call the compiled ``*_lanes`` kernels, which run
``prange`` over chunks of lanes:

* ``gm_condition_mean_lanes`` and ``gm_logprob_lanes`` take lanes last, (K, C, L): their innermost
  loops run over 16 consecutive lanes without branches or libm calls, which LLVM turns into SIMD
  code. ``_exp`` and ``_erf_from_gauss`` are written for that (libm ``exp``/``erf`` are scalar
  calls that block vectorisation).
* ``gm1d_inverse_cdf_lanes`` takes lanes first, (L, K): each lane runs its own Newton iteration
  (stopping when converged, which is where it gains over the fixed-step torch path), and the sums
  over K are the vectorised loops.

Arithmetic is float64 whatever the input dtype (more accurate than the float32 torch path); the
fast-math flags allow FMA contraction (and, in the Newton kernel, reassociation of the sums over
K). Results go to a caller-allocated ``out`` array. Imports: numpy, numba and math only.

Vectorisation needs three things numba does not do by default, all checked with
``inspect_asm`` (ymm/zmm packed instructions in the hot loops): ``error_model="numpy"`` (numba's
default Python error model tests every float division for zero, a branch that blocks SIMD; every
denominator here is floored anyway), no ``abs``/``math.copysign`` (numba lowers them to calls;
selects instead), and no ``continue`` in the loops meant to vectorise. The Newton kernel went from
x1.2-1.6 to x2.7-5.7 against torch single-threaded with these alone (benchmarks/results/gm_ops.md).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

__all__ = [
    "gm1d_inverse_cdf_kernel",
    "gm_condition_mean_kernel",
    "gm_logprob_kernel",
    "gm1d_inverse_cdf_lanes",
    "gm_condition_mean_lanes",
    "gm_logprob_lanes",
]

_LANES = 16  # lanes per SIMD block
_CHUNK = 256  # lanes per prange work item (scratch arrays are allocated once per chunk)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_LOG_2PI = math.log(2.0 * math.pi)
_FAST = {"contract"}
_FAST_SUM = {"contract", "reassoc"}  # reassociation lets LLVM vectorise the sums over K

# exp(a) = 2^k·e^r, k = round(a·log2 e), r = a − k·ln 2 (Cody-Waite split), |r| <= ln2/2; e^r by its
# degree-13 Taylor polynomial (remainder < 4e-18), 2^k from a table. Relative error < 3e-16.
_LOG2E = 1.4426950408889634
_LN2_HI = 0.6931471803691238  # ln 2 to 32 bits: k·_LN2_HI is exact
_LN2_LO = 1.9082149292705877e-10
_EXP_TAYLOR = tuple(1.0 / math.factorial(i) for i in range(13, -1, -1))
_POW2 = np.ldexp(1.0, np.arange(-1075, 1024))  # 2^k for k in [−1075, 1023]

# erf(y) = 1 − exp(−y²)·erfcx(y), y >= 0, with erfcx a degree-18 polynomial in s = 3·(t − 2/3),
# t = 1/(1 + y/3), fitted on y ∈ [0, 6] (y is clamped to 6: erfc(6) = 2e-17). Coefficients (highest
# degree first): numpy.polynomial.chebyshev.chebinterpolate of scipy.special.erfcx in s at degree
# 18, converted with cheb2poly. Max |error| of erf: 1.6e-15.
_ERFCX = (
    8.42479302694923e-12, 4.748519706098657e-11, -1.5509278072338357e-11, -9.432896101651227e-10,
    9.640643838793037e-10, 1.4469169161058843e-08, -3.493692259469658e-08, -2.275556626404738e-07,
    8.118818186630961e-07, 4.532614541568292e-06, -1.5153825819724214e-05, -0.00012716420179764416,
    7.012531853661504e-05, 0.003956151637047854, 0.023308261232112774, 0.08162684513397442,
    0.20143885681924614, 0.3681515648982624, 0.32158541645431754,
)  # fmt: skip

# Newton stopping rules (units of s̄): a step shorter than _STOP_TOL, or a trusted step below
# _QUAD_ZONE whose predicted error |pdf'/(2 pdf)|·δ² (Newton's quadratic model) is below _QUAD_TOL.
# Steps shorter than _TRUST_TOL = √(float64 eps) are never replaced by bisection.
_STOP_TOL = 1e-9
_QUAD_ZONE = 1e-3
_QUAD_TOL = 1e-13
_TRUST_TOL = 1.5e-8


@njit(cache=True, fastmath=_FAST, error_model="numpy")
def _exp(a):
    """exp(a) for a <= 709 without libm (vectorisable); 0 below −745."""
    a = min(max(a, -745.0), 709.0)
    k = math.floor(a * _LOG2E + 0.5)
    r = a - k * _LN2_HI - k * _LN2_LO
    p = 0.0
    for c in _EXP_TAYLOR:
        p = p * r + c
    return p * _POW2[int(k) + 1075]


_ERFCX_HI, _ERFCX_LO = (
    _ERFCX[:9],
    _ERFCX[9:],
)  # p(s) = hi(s)·s^10 + lo(s): two short, unrolled loops


@njit(cache=True, fastmath=_FAST, error_model="numpy")
def _erf_from_gauss(y, gauss):
    """erf(y) for y >= 0 given gauss = exp(−y²), without libm (vectorisable); |error| < 2e-15."""
    s = (1.0 / (1.0 + min(y, 6.0) / 3.0) - 2.0 / 3.0) * 3.0
    hi = 0.0
    for c in _ERFCX_HI:
        hi = hi * s + c
    lo = 0.0
    for c in _ERFCX_LO:
        lo = lo * s + c
    s2 = s * s
    s8 = s2 * s2 * s2 * s2
    return 1.0 - gauss * (hi * s8 * s2 + lo)


@njit(cache=True, parallel=True, fastmath=_FAST_SUM, error_model="numpy")
def gm1d_inverse_cdf_lanes(means, logweights, logstds, u, z, out, n_steps, eps, max_step_size):
    """Solve F̃(x) = ũ per lane and sample by safeguarded Newton (spec 7.3, 7.15).

    Twin of ``gmflow.gm.inverse_cdf._newton_torch`` (its docstring derives the bracket). Per lane
    l the 1-D mixture is Σ_k A_k N(μ_k, s_k²); per target:
        bracket [lo, hi] = [min_k(μ_k + s_k z), max_k(μ_k + s_k z)],  x = clamp(m + √v·z, lo, hi),
    then at most ``n_steps`` iterations of
        (lo, hi) ← (x, hi) if F̃(x) < ũ else (lo, x),   δ = ½ (F̃(x) − ũ)/max(pdf(x), eps),
        x ← (lo + hi)/2 if |δ| > 1.5e-8·s̄ and (|δ| > max_step_size·s̄ or x − δ ∉ [lo, hi]
             or |δ| > ½|previous step|), else x − δ,
    s̄ = √(Σ_k A_k s_k²). Stopping rules: after a step shorter than 1e-9·s̄, or once a Newton step
    δ <= 1e-3·s̄ leaves a predicted error |pdf'/(2·pdf)|·δ² <= 1e-13·s̄ (Newton's quadratic
    model; it saves the confirming evaluation). The difference from running every step is far
    below the float64 rounding of x. Every component is evaluated at every step, without branches
    (|x − μ_k|/s_k clamped to 40, where erf is ±1 and the pdf term 0 in float64), so that LLVM
    vectorises the sums over k.

    Args:
        means: (L, K) μ_k. logweights: (L, K) log A_k. logstds: (L, Ks) log s_k, Ks ∈ {1, K}.
        u: (L, M) target ũ ∈ (−1, 1). z: (L, M) √2·erfinv(ũ) (or the samples that gave ũ).
        out: (L, M) the roots, written in place.
        n_steps: maximum Newton iterations. eps: pdf floor. max_step_size: in units of s̄.
    """
    n_lanes, k_num = means.shape
    m_num = u.shape[1]
    ks = logstds.shape[1]
    for chunk in prange((n_lanes + _CHUNK - 1) // _CHUNK):
        w, w_inv_s = np.empty(k_num), np.empty(k_num)  # A_k, A_k/s_k
        std, inv_s = np.empty(k_num), np.empty(k_num)
        for lane in range(chunk * _CHUNK, min(n_lanes, (chunk + 1) * _CHUNK)):
            mu = means[lane]
            # ---- the lane's mixture constants and moments ----
            mean = 0.0
            s_bar = 0.0
            for k in range(k_num):
                std[k] = _exp(logstds[lane, k if ks > 1 else 0])
                inv_s[k] = 1.0 / std[k]
                w[k] = _exp(logweights[lane, k])
                w_inv_s[k] = w[k] * inv_s[k]
                mean += w[k] * mu[k]
                s_bar += w[k] * std[k] * std[k]
            var = s_bar
            for k in range(k_num):
                var += w[k] * (mu[k] - mean) * (mu[k] - mean)
            sd = math.sqrt(var)
            s_bar = math.sqrt(s_bar)
            for m in range(m_num):
                target = u[lane, m]
                zm = z[lane, m]
                lo = np.inf
                hi = -np.inf
                for k in range(k_num):
                    lo = min(lo, mu[k] + std[k] * zm)
                    hi = max(hi, mu[k] + std[k] * zm)
                x = min(max(mean + sd * zm, lo), hi)
                step = hi - lo
                for _ in range(n_steps):
                    pdf = 0.0  # √(2π)·pdf
                    slope = 0.0  # −√(2π)·pdf'
                    cdf = 0.0
                    for k in range(k_num):  # branch-free: LLVM vectorises it over k
                        d = min(max((x - mu[k]) * inv_s[k], -40.0), 40.0)
                        gauss = _exp(-0.5 * d * d)
                        e = w_inv_s[k] * gauss
                        pdf += e
                        slope += e * d * inv_s[k]
                        erf = _erf_from_gauss((d if d >= 0.0 else -d) * _INV_SQRT2, gauss)
                        cdf += w[k] * (erf if d >= 0.0 else -erf)
                    if cdf < target:
                        lo = x
                    else:
                        hi = x
                    delta = 0.5 * (cdf - target) / max(pdf * _INV_SQRT_2PI, eps)
                    newton = x - delta
                    size = abs(delta)
                    distrust = size > max_step_size * s_bar or size > 0.5 * abs(step)
                    if (distrust or newton < lo or newton > hi) and size > _TRUST_TOL * s_bar:
                        newton = 0.5 * (lo + hi)
                    elif (
                        size <= _QUAD_ZONE * s_bar
                        and size * size * abs(slope) <= _QUAD_TOL * s_bar * 2 * pdf
                    ):
                        x = newton
                        break
                    step = newton - x
                    x = newton
                    if abs(step) <= _STOP_TOL * s_bar:
                        break
                out[lane, m] = x


@njit(cache=True, parallel=True, fastmath=_FAST, error_model="numpy")
def gm_condition_mean_lanes(means, logweights, logstds, precision, linear, out, eps):
    """Mean of the mixture multiplied by exp(−½ζ‖x‖² + ν·x), without K-sized temporaries (spec 3.5).

    With s_k² = exp(2 logstds), den_k = max(s_k² ζ + 1, eps):
        μ'_k = (μ_k + s_k² ν)/den_k,
        ℓ_k = log A_k + (Σ_c 2 μ_kc ν_c − ζ μ_kc² + s_k² ν_c²)/(2 den_k) − (C/2) log den_k,
        out = Σ_k softmax_k(ℓ)_k μ'_k;
    the last term of ℓ is dropped for a shared std (constant over k, it cancels in the softmax).
    Two passes over K per block of 16 lanes: the logits ℓ_k and their max, then one exp per
    component into the weighted sums (x2.4 faster than an online softmax's two exps at K = 64).
    Scratch: (K, 16) logits and (C, 16) sums per block.

    Args:
        means: (K, C, L) μ_k. logweights: (K, L). logstds: (Ks, L). precision: (L,) ζ.
        linear: (C, L) ν. out: (C, L) the conditioned mean. eps: floor of den_k.
    """
    k_num, c_num, n_lanes = means.shape
    ks = logstds.shape[0]
    for chunk in prange((n_lanes + _CHUNK - 1) // _CHUNK):
        s2 = np.empty((ks, _LANES))
        inv_den = np.empty((ks, _LANES))
        acc = np.empty((c_num, _LANES))
        logit = np.empty((k_num, _LANES))
        top, total, nu_sq = np.empty(_LANES), np.empty(_LANES), np.empty(_LANES)
        for l0 in range(chunk * _CHUNK, min(n_lanes, (chunk + 1) * _CHUNK), _LANES):
            nl = min(_LANES, n_lanes - l0)
            for j in range(nl):
                nu_sq[j] = 0.0
                top[j] = -np.inf
                total[j] = 0.0
            for c in range(c_num):
                for j in range(nl):
                    nu_sq[j] += linear[c, l0 + j] * linear[c, l0 + j]
                    acc[c, j] = 0.0
            for k in range(ks):
                for j in range(nl):
                    s2[k, j] = _exp(2.0 * logstds[k, l0 + j])
                    inv_den[k, j] = 1.0 / max(s2[k, j] * precision[l0 + j] + 1.0, eps)
            # pass 1: the logits and their max
            for k in range(k_num):
                kk = k if ks > 1 else 0
                for j in range(nl):
                    logit[k, j] = s2[kk, j] * nu_sq[j]
                for c in range(c_num):
                    for j in range(nl):
                        mu = means[k, c, l0 + j]
                        logit[k, j] += mu * (2.0 * linear[c, l0 + j] - precision[l0 + j] * mu)
                for j in range(nl):
                    logit[k, j] = logweights[k, l0 + j] + 0.5 * logit[k, j] * inv_den[kk, j]
                if ks > 1:
                    for j in range(nl):
                        logit[k, j] += 0.5 * c_num * math.log(inv_den[k, j])
                for j in range(nl):
                    top[j] = max(top[j], logit[k, j])
            # pass 2: one exp per component
            for k in range(k_num):
                kk = k if ks > 1 else 0
                for j in range(nl):
                    e = _exp(logit[k, j] - top[j])
                    total[j] += e
                    logit[k, j] = e * inv_den[kk, j]  # the weight of component k
                for c in range(c_num):
                    for j in range(nl):
                        mu = means[k, c, l0 + j] + s2[kk, j] * linear[c, l0 + j]
                        acc[c, j] += logit[k, j] * mu
            for c in range(c_num):
                for j in range(nl):
                    out[c, l0 + j] = acc[c, j] / total[j]


@njit(cache=True, parallel=True, fastmath=_FAST, error_model="numpy")
def gm_logprob_lanes(means, logweights, logstds, x, out):
    """Mixture log-density logsumexp_k [log A_k − ½‖x − μ_k‖²/s_k² − C log s_k − (C/2) log 2π].

    Two passes over K per lane and sample: the component log-densities and their max, then the
    sum of exponentials (scratch (K, 16) per block).

    Args:
        means: (K, C, L) μ_k. logweights: (K, L). logstds: (Ks, L). x: (M, C, L) points.
        out: (M, L) log-densities, written in place.
    """
    k_num, c_num, n_lanes = means.shape
    m_num = x.shape[0]
    ks = logstds.shape[0]
    const = 0.5 * c_num * _LOG_2PI
    for chunk in prange((n_lanes + _CHUNK - 1) // _CHUNK):
        logit = np.empty((k_num, _LANES))
        neg_half_prec = np.empty((ks, _LANES))  # −½/s_k²
        log_norm = np.empty((ks, _LANES))  # −C log s_k
        top, total = np.empty(_LANES), np.empty(_LANES)
        for l0 in range(chunk * _CHUNK, min(n_lanes, (chunk + 1) * _CHUNK), _LANES):
            nl = min(_LANES, n_lanes - l0)
            for k in range(ks):
                for j in range(nl):
                    neg_half_prec[k, j] = -0.5 * _exp(-2.0 * logstds[k, l0 + j])
                    log_norm[k, j] = -c_num * logstds[k, l0 + j]
            for m in range(m_num):
                for j in range(nl):
                    top[j] = -np.inf
                    total[j] = 0.0
                for k in range(k_num):
                    kk = k if ks > 1 else 0
                    for j in range(nl):
                        logit[k, j] = 0.0
                    for c in range(c_num):
                        for j in range(nl):
                            d = x[m, c, l0 + j] - means[k, c, l0 + j]
                            logit[k, j] += d * d
                    for j in range(nl):
                        logit[k, j] = (
                            logweights[k, l0 + j]
                            + neg_half_prec[kk, j] * logit[k, j]
                            + log_norm[kk, j]
                        )
                        top[j] = max(top[j], logit[k, j])
                for k in range(k_num):
                    for j in range(nl):
                        total[j] += _exp(logit[k, j] - top[j])
                for j in range(nl):
                    lse = top[j] + math.log(total[j]) if top[j] > -np.inf else top[j]
                    out[m, l0 + j] = lse - const


# ---- entry points in the (N, K, C, P) layout: regroup (batch, pixel) pairs into lanes ----


def _lanes_last(a: np.ndarray) -> np.ndarray:
    """(N, ..., P) -> (..., N·P)."""
    moved = np.moveaxis(a, 0, -2)
    return np.ascontiguousarray(moved).reshape(*moved.shape[:-2], -1)


def _lanes_first(a: np.ndarray) -> np.ndarray:
    """(N, X, P) -> (N·P, X)."""
    return np.ascontiguousarray(np.moveaxis(a, 1, -1)).reshape(-1, a.shape[1])


def _lane_logstds(logstds: np.ndarray, p: int) -> np.ndarray:
    """(N, Ks) -> (N, Ks, P): the same std for every pixel of a sample."""
    return np.repeat(logstds[:, :, None], p, axis=2)


def gm1d_inverse_cdf_kernel(means, logweights, logstds, u, z, out, n_steps, eps, max_step_size):  # type: ignore[no-untyped-def]
    """Run :func:`gm1d_inverse_cdf_lanes`.

    Shapes: means, logweights (N, K, P); logstds (N, Ks); u, z, out (N, M, P).
    """
    n, _, p = means.shape
    m = u.shape[1]
    res = np.empty((n * p, m))
    gm1d_inverse_cdf_lanes(
        _lanes_first(means), _lanes_first(logweights), _lanes_first(_lane_logstds(logstds, p)),
        _lanes_first(u), _lanes_first(z), res, int(n_steps), float(eps), float(max_step_size),
    )  # fmt: skip
    out[...] = res.reshape(n, p, m).transpose(0, 2, 1)


def gm_condition_mean_kernel(means, logweights, logstds, precision, linear, out, eps):  # type: ignore[no-untyped-def]
    """Run :func:`gm_condition_mean_lanes`.

    Shapes: means (N, K, C, P); logweights (N, K, P); logstds (N, Ks); precision (N,);
    linear, out (N, C, P).
    """
    n, c, p = linear.shape
    res = np.empty((c, n * p))
    gm_condition_mean_lanes(
        _lanes_last(means), _lanes_last(logweights), _lanes_last(_lane_logstds(logstds, p)),
        np.repeat(precision, p), _lanes_last(linear), res, float(eps),
    )  # fmt: skip
    out[...] = np.moveaxis(res.reshape(c, n, p), 1, 0)


def gm_logprob_kernel(means, logweights, logstds, x, out):  # type: ignore[no-untyped-def]
    """Run :func:`gm_logprob_lanes`.

    Shapes: means (N, K, C, P); logweights (N, K, P); logstds (N, Ks); x (N, M, C, P);
    out (N, M, P).
    """
    n, m, _, p = x.shape
    res = np.empty((m, n * p))
    gm_logprob_lanes(
        _lanes_last(means), _lanes_last(logweights), _lanes_last(_lane_logstds(logstds, p)),
        _lanes_last(x), res,
    )  # fmt: skip
    out[...] = np.moveaxis(res.reshape(m, n, p), 1, 0)
