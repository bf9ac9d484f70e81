"""Gaussian-mixture maths for GMFlow (spec sections 2.1, 3.2-3.5 and 7).

Notation (used by every docstring in this package):

* A mixture over a C-vector at each pixel p:  p(x_p) = Σ_k A_{k,p} · N(x_p; μ_{k,p}, s² I_C).
* Layout ("GM layout"): K is axis −4, C axis −3, H, W the last two; any leading batch dims ``...``.
  ``means`` (..., K, C, H, W), ``logweights`` = log A (..., K, 1, H, W) normalised over K (weights
  are shared across channels), ``logstds`` = log s (..., 1, 1, 1, 1) (one per sample, the GMFlow
  model) or (..., K, 1, 1, 1) (one per component). A 2-D point cloud is C = 2, H = W = 1.
* Isotropic Gaussian: mean (..., C, H, W), var (..., 1, H, W) or (..., 1, 1, 1).
* Full Gaussian: channel-last, mean (..., H, W, C), cov (..., H, W, C, C).
* Sample axis: points evaluated or drawn per mixture sit at axis −4: (..., n, C, H, W).
* All GM maths runs in fp32, or fp64 when any input is fp64, whatever the network dtype.
"""

from gmflow.gm.density import gm_entropy, gm_kl_div, gm_logprob, gm_to_sample, iso_gaussian_logprob
from gmflow.gm.full import gm_to_full
from gmflow.gm.inverse_cdf import gm1d_inverse_cdf, gm1d_pdf_cdf
from gmflow.gm.mixture import (
    AnyGaussianMixture,
    FullGaussianMixture,
    Gaussian,
    GaussianMixture,
    IsoGaussian,
)
from gmflow.gm.moments import gm_temperature, gm_to_gaussian, gm_to_iso_gaussian, gm_to_mean
from gmflow.gm.products import (
    gaussian_mul_gaussian,
    gm_condition,
    gm_condition_mean,
    gm_mul_gaussian,
    gm_mul_gm,
    gm_mul_iso_gaussian,
    iso_gaussian_mul_iso_gaussian,
)
from gmflow.gm.transport import gaussian_to_gm_samples, gm_to_gaussian_samples

__all__ = [
    "GaussianMixture",
    "IsoGaussian",
    "Gaussian",
    "FullGaussianMixture",
    "AnyGaussianMixture",
    "gm_to_mean",
    "gm_to_iso_gaussian",
    "gm_to_gaussian",
    "gm_to_sample",
    "gm_to_full",
    "gm_temperature",
    "iso_gaussian_logprob",
    "gm_logprob",
    "gm_kl_div",
    "gm_entropy",
    "gm_mul_iso_gaussian",
    "iso_gaussian_mul_iso_gaussian",
    "gaussian_mul_gaussian",
    "gm_mul_gaussian",
    "gm_mul_gm",
    "gm_condition",
    "gm_condition_mean",
    "gm1d_pdf_cdf",
    "gm1d_inverse_cdf",
    "gm_to_gaussian_samples",
    "gaussian_to_gm_samples",
]
