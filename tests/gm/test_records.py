"""GM records, argument validation and the dtype rule of every GM op (spec 2.3, 17.3; issue 2 §2).

Bad input raises a ValueError whose message names the argument and the shapes it got and expected
(asserted with ``match=``); half-precision inputs are computed in fp32 and fp64 stays fp64.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.testing import assert_close

from gmflow.gm import (
    FullGaussianMixture,
    Gaussian,
    GaussianMixture,
    IsoGaussian,
    gaussian_mul_gaussian,
    gm_condition,
    gm_condition_mean,
    gm_entropy,
    gm_kl_div,
    gm_logprob,
    gm_mul_gaussian,
    gm_mul_gm,
    gm_mul_iso_gaussian,
    gm_temperature,
    gm_to_gaussian,
    gm_to_iso_gaussian,
    gm_to_mean,
    gm_to_sample,
    iso_gaussian_logprob,
    iso_gaussian_mul_iso_gaussian,
)
from gmflow.gm.mixture import gm_dtype

f64 = torch.float64


def shape(*dims: int) -> str:
    """Regex matching a shape as error messages print it, e.g. '\\(2, 3\\)'."""
    return re.escape(str(tuple(dims)))


def gm_of(B: int = 2, K: int = 3, C: int = 2, H: int = 4, W: int = 4) -> GaussianMixture:
    return GaussianMixture(
        torch.randn(B, K, C, H, W, dtype=f64),
        torch.log_softmax(torch.randn(B, K, 1, H, W, dtype=f64), dim=-4),
        torch.full((B, 1, 1, 1, 1), -0.5, dtype=f64),
    )


# ---- records ----


@pytest.mark.parametrize(
    ("means", "logweights", "logstds", "pattern"),
    [
        (
            (2, 3, 4),
            (2, 3, 1),
            (2, 1, 1),
            r"GaussianMixture\.means: expected .*got " + shape(2, 3, 4),
        ),
        (
            (2, 3, 2, 4, 4),
            (2, 4, 1, 4, 4),
            (2, 1, 1, 1, 1),
            r"logweights: .*K=3.*got " + shape(2, 4, 1, 4, 4),
        ),
        (
            (2, 3, 2, 4, 4),
            (2, 3, 2, 4, 4),
            (2, 1, 1, 1, 1),
            r"logweights: .*got " + shape(2, 3, 2, 4, 4),
        ),
        (
            (2, 3, 2, 4, 4),
            (2, 3, 1, 2, 4),
            (2, 1, 1, 1, 1),
            r"logweights: .*H=4, W=4.*got " + shape(2, 3, 1, 2, 4),
        ),
        (
            (2, 3, 2, 4, 4),
            (2, 3, 1, 4, 4),
            (2, 1, 1, 4, 4),
            r"logstds: .*got " + shape(2, 1, 1, 4, 4),
        ),
        (
            (2, 3, 2, 4, 4),
            (2, 3, 1, 4, 4),
            (2, 2, 1, 1, 1),
            r"logstds: .*K=3.*got " + shape(2, 2, 1, 1, 1),
        ),
        (
            (2, 3, 2, 4, 4),
            (3, 3, 1, 4, 4),
            (2, 1, 1, 1, 1),
            r"batch dims have shapes \(2,\) and \(3,\)",
        ),
    ],
    ids=["means-rank", "K", "C", "H", "logstds-per-pixel", "logstds-K", "batch"],
)
def test_gaussian_mixture_rejects_inconsistent_shapes(means, logweights, logstds, pattern):
    with pytest.raises(ValueError, match=pattern):
        GaussianMixture(torch.zeros(means), torch.zeros(logweights), torch.zeros(logstds))


@pytest.mark.parametrize("var", [(2, 4, 4), (2, 3, 4, 4), (2, 1, 2, 4)], ids=["rank", "C", "H"])
def test_iso_gaussian_rejects_a_var_of_the_wrong_shape(var):
    with pytest.raises(ValueError, match=r"IsoGaussian\.var: expected .*got " + shape(*var)):
        IsoGaussian(torch.zeros(2, 3, 4, 4), torch.ones(var))


def test_gaussian_and_full_mixture_reject_mismatched_covariances():
    with pytest.raises(ValueError, match=r"Gaussian\.cov: .*C=3.*got " + shape(2, 4, 4, 2, 2)):
        Gaussian(torch.zeros(2, 4, 4, 3), torch.zeros(2, 4, 4, 2, 2))
    with pytest.raises(
        ValueError, match=r"FullGaussianMixture\.covs: .*got " + shape(2, 2, 4, 4, 3, 3)
    ):
        FullGaussianMixture(
            torch.zeros(2, 3, 4, 4, 3), torch.zeros(2, 2, 4, 4, 3, 3), torch.zeros(2, 3, 4, 4)
        )


def test_gaussian_mixture_cat_chunk_and_index_round_trip():
    gm = gm_of(B=4)
    parts = gm.chunk(2)
    back = GaussianMixture.cat(list(parts))
    for a, b in zip(
        (back.means, back.logweights, back.logstds),
        (gm.means, gm.logweights, gm.logstds),
        strict=True,
    ):
        assert torch.equal(a, b)
    assert torch.equal(
        gm[1:3].logweights, torch.cat([parts[0].logweights[1:], parts[1].logweights[:1]])
    )
    assert (gm.num_gaussians, gm.num_channels, tuple(gm.batch_shape)) == (3, 2, (4,))
    assert gm.to(torch.float32).dtype == torch.float32


def test_gm_dtype_promotes_half_precision_to_fp32_and_keeps_fp64():
    assert gm_dtype(torch.bfloat16) == torch.float32
    assert gm_dtype(torch.float16, torch.float32) == torch.float32
    assert gm_dtype(torch.float32, f64) == f64


# ---- argument validation of the ops ----


def _bad_calls():
    gm, x = gm_of(), torch.randn(2, 5, 2, 4, 4, dtype=f64)
    mean, var = torch.randn(2, 2, 4, 4, dtype=f64), torch.ones(2, 1, 1, 1, dtype=f64)
    nan_gm = GaussianMixture(
        gm.means, gm.logweights, torch.tensor([0.0, math.nan], dtype=f64).reshape(2, 1, 1, 1, 1)
    )
    inf_gm = GaussianMixture(
        gm.means, gm.logweights, torch.full((2, 3, 1, 1, 1), -math.inf, dtype=f64)
    )
    eye = torch.eye(2, dtype=f64).expand(2, 4, 4, 2, 2)
    return [
        (
            "logprob-C",
            lambda: gm_logprob(gm, x[:, :, :1]),
            r"gm_logprob: x .*C=2.*got " + shape(2, 5, 1, 4, 4),
        ),
        (
            "logprob-no-n",
            lambda: gm_logprob(gm, x[0, 0]),
            r"gm_logprob: x must be .*got " + shape(2, 4, 4),
        ),
        (
            "logprob-HW",
            lambda: gm_logprob(gm, x[..., :2, :2]),
            r"gm_logprob: x .*H=4, W=4.*got " + shape(2, 5, 2, 2, 2),
        ),
        (
            "logprob-batch",
            lambda: gm_logprob(gm, x.expand(3, 2, 5, 2, 4, 4)[:, 0].expand(3, 5, 2, 4, 4)),
            r"gm_logprob: x: batch dims \(3,\) .*mixture batch dims \(2,\)",
        ),
        (
            "iso-logprob-C",
            lambda: iso_gaussian_logprob(IsoGaussian(mean, var), x[:, :, :1]),
            r"iso_gaussian_logprob: x .*C=2.*got " + shape(2, 5, 1, 4, 4),
        ),
        (
            "iso-logprob-batch",
            lambda: iso_gaussian_logprob(IsoGaussian(mean, var), x.expand(3, 2, 5, 2, 4, 4)[:, 0]),
            r"iso_gaussian_logprob: x batch dims \(3,\) .*mean batch dims \(2,\)",
        ),
        (
            "mul-iso-C",
            lambda: gm_mul_iso_gaussian(gm, IsoGaussian(mean[:, :1], var)),
            r"gm_mul_iso_gaussian: g\.mean: .*C=2.*got " + shape(2, 1, 4, 4),
        ),
        (
            "mul-iso-per-pixel-var",
            lambda: gm_mul_iso_gaussian(gm, IsoGaussian(mean, torch.ones(2, 1, 4, 4))),
            r"gm_mul_iso_gaussian: g\.var: expected a per-sample variance .*got "
            + shape(2, 1, 4, 4),
        ),
        (
            "mul-iso-batch",
            lambda: gm_mul_iso_gaussian(gm, IsoGaussian(mean.expand(3, 2, 2, 4, 4)[:, 0], var[:1])),
            r"g\.mean: batch dims \(3,\) .*mixture batch dims \(2,\)",
        ),
        (
            "mul-iso-var-batch",
            lambda: gm_mul_iso_gaussian(gm, IsoGaussian(mean[:1], torch.ones(3, 1, 1, 1))),
            r"g\.var: batch dims \(3,\) .*mixture batch dims \(2,\)",
        ),
        (
            "mul-iso-power",
            lambda: gm_mul_iso_gaussian(gm, IsoGaussian(mean, var), 0.0),
            r"gm_power must be non-zero",
        ),
        (
            "mul-full-C",
            lambda: gm_mul_gaussian(gm, Gaussian(mean.movedim(1, -1)[..., :1], eye[..., :1, :1])),
            r"gm_mul_gaussian: g\.mean: .*C=2.*got " + shape(2, 1, 4, 4),
        ),
        (
            "mul-gm-C",
            lambda: gm_mul_gm(gm, gm_of(C=3)),
            r"gm_mul_gm: .*" + shape(2, 3, 2, 4, 4) + ".*" + shape(2, 3, 3, 4, 4),
        ),
        (
            "mul-gm-batch",
            lambda: gm_mul_gm(gm, gm_of(B=3)),
            r"gm_mul_gm: gm2: batch dims \(3,\) .*\(2,\)",
        ),
        (
            "iso-iso-C",
            lambda: iso_gaussian_mul_iso_gaussian(
                IsoGaussian(mean, var), IsoGaussian(mean[:, :1], var)
            ),
            r"iso_gaussian_mul_iso_gaussian: .*" + shape(2, 2, 4, 4) + ".*" + shape(2, 1, 4, 4),
        ),
        (
            "full-full-C",
            lambda: gaussian_mul_gaussian(
                Gaussian(mean.movedim(1, -1), eye),
                Gaussian(mean.movedim(1, -1)[..., :1], eye[..., :1, :1]),
            ),
            r"gaussian_mul_gaussian: .*" + shape(2, 4, 4, 2) + ".*" + shape(2, 4, 4, 1),
        ),
        (
            "condition-C",
            lambda: gm_condition(gm, 0.5, mean[:, :1]),
            r"gm_condition: linear: .*C=2.*got " + shape(2, 1, 4, 4),
        ),
        (
            "condition-precision-rank",
            lambda: gm_condition(gm, torch.ones(2, 1, 1), mean),
            r"gm_condition: precision must be .*\(\.\.\., 1, 1, 1\).*got " + shape(2, 1, 1),
        ),
        (
            "condition-precision-batch",
            lambda: gm_condition_mean(gm, torch.ones(3, 1, 1, 1), mean),
            r"gm_condition_mean: precision: batch dims \(3,\) .*mixture batch dims \(2,\)",
        ),
        (
            "condition-nan-logstds",
            lambda: gm_condition(nan_gm, 0.5, mean),
            r"gm_condition: gm\.logstds: expected finite values.*" + shape(2, 1, 1, 1, 1),
        ),
        (
            "condition-mean-inf-logstds",
            lambda: gm_condition_mean(inf_gm, 0.5, mean),
            r"gm_condition_mean: gm\.logstds: expected finite values.*" + shape(2, 3, 1, 1, 1),
        ),
        ("sample-n", lambda: gm_to_sample(gm, 0), r"gm_to_sample: n must be >= 1, got 0"),
        ("entropy-n", lambda: gm_entropy(gm, n=0), r"n must be >= 1, got 0"),
        (
            "kl-event",
            lambda: gm_kl_div(gm, gm_of(C=3)),
            r"gm_kl_div: q\.means .*"
            + shape(2, 3, 3, 4, 4)
            + ".*p\\.means "
            + shape(2, 3, 2, 4, 4),
        ),
        ("temperature", lambda: gm_temperature(gm, 0.0), r"gm_temperature: tau must be > 0, got 0"),
    ]


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize(
    ("call", "pattern"), [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS]
)
def test_bad_input_raises_value_error_naming_the_argument_and_shapes(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


# ---- dtype rule: half in -> fp32 maths and outputs; fp64 stays fp64 ----


def _inputs(dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(7)

    def r(*s: int) -> torch.Tensor:
        return torch.randn(*s, dtype=f64, generator=gen)

    gm = GaussianMixture(
        r(2, 3, 2, 4, 4), torch.log_softmax(r(2, 3, 1, 4, 4), -4), 0.3 * r(2, 1, 1, 1, 1)
    )
    gm2 = GaussianMixture(
        r(2, 2, 2, 4, 4), torch.log_softmax(r(2, 2, 1, 4, 4), -4), 0.3 * r(2, 2, 1, 1, 1)
    )
    a = 0.3 * r(2, 4, 4, 2, 2).tanh()
    raw = {
        "gm": gm,
        "gm2": gm2,
        "x": r(2, 3, 2, 4, 4),
        "mean": r(2, 2, 4, 4),
        "var": 0.5 + r(2, 1, 1, 1).abs(),
        "var2": 1.5 + r(2, 1, 1, 1).abs(),
        "cov": torch.eye(2, dtype=f64) + a @ a.transpose(-1, -2),
        "zeta": 0.2 + r(2, 1, 1, 1).abs(),
    }
    return {k: v.to(dtype) for k, v in raw.items()}


def _fields(out) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    return tuple(getattr(out, f) for f in out.__dataclass_fields__)


OPS = {
    "gm_to_mean": lambda d: gm_to_mean(d["gm"], power=1.5),
    "gm_to_iso_gaussian": lambda d: gm_to_iso_gaussian(d["gm"]),
    "gm_to_gaussian": lambda d: gm_to_gaussian(d["gm"]),
    "gm_temperature": lambda d: gm_temperature(d["gm"], 0.5),
    "gm_logprob": lambda d: gm_logprob(d["gm"], d["x"]),
    "gm_to_sample": lambda d: gm_to_sample(d["gm"], 3, generator=torch.Generator().manual_seed(0)),
    "gm_kl_div": lambda d: gm_kl_div(
        d["gm"], d["gm2"], 3, generator=torch.Generator().manual_seed(0)
    ),
    "gm_entropy": lambda d: gm_entropy(d["gm"], 3, generator=torch.Generator().manual_seed(0)),
    "iso_gaussian_logprob": lambda d: iso_gaussian_logprob(
        IsoGaussian(d["mean"], d["var"]), d["x"]
    ),
    "gm_mul_iso_gaussian": lambda d: gm_mul_iso_gaussian(d["gm"], IsoGaussian(d["mean"], d["var"])),
    "iso_gaussian_mul_iso_gaussian": lambda d: iso_gaussian_mul_iso_gaussian(
        IsoGaussian(d["mean"], d["var"]), IsoGaussian(d["x"][:, 0], d["var2"])
    ),
    "gaussian_mul_gaussian": lambda d: gaussian_mul_gaussian(
        Gaussian(d["mean"].movedim(1, -1), d["cov"]),
        Gaussian(d["x"][:, 0].movedim(1, -1), d["cov"]),
    ),
    "gm_mul_gaussian": lambda d: gm_mul_gaussian(
        d["gm"], Gaussian(d["mean"].movedim(1, -1), d["cov"])
    ),
    "gm_mul_gm": lambda d: gm_mul_gm(d["gm"], d["gm2"]),
    "gm_condition": lambda d: gm_condition(d["gm"], d["zeta"], d["mean"]),
    "gm_condition_mean": lambda d: gm_condition_mean(d["gm"], d["zeta"], d["mean"]),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", OPS.values(), ids=OPS.keys())
def test_half_precision_inputs_are_computed_in_fp32(op, dtype):
    half = _inputs(dtype)
    upcast = {k: v.to(torch.float32) for k, v in half.items()}
    out, ref = _fields(op(half)), _fields(op(upcast))
    assert all(t.dtype == torch.float32 for t in out)
    for a, b in zip(out, ref, strict=True):
        assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", OPS.values(), ids=OPS.keys())
def test_fp64_inputs_stay_fp64(op):
    assert all(t.dtype == f64 for t in _fields(op(_inputs(f64))))


def test_an_fp64_operand_promotes_an_fp32_mixture_to_fp64():
    d = _inputs(torch.float32)
    out = gm_mul_iso_gaussian(d["gm"], IsoGaussian(d["mean"].double(), d["var"].double()))
    assert all(t.dtype == f64 for t in _fields(out))
    assert gm_condition_mean(d["gm"], d["zeta"].double(), d["mean"]).dtype == f64
