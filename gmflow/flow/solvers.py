"""Stateless solver steps and the ``sample`` loop: GM-SDE, GM-ODE (orders 1, 2), baselines (spec 8).

Every step is a pure function of its inputs over an explicit σ grid (:func:`sigma_grid`); the loop
keeps the state x in fp32 (fp64 when the noise is fp64) whatever the network dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gmflow.errors import ConfigError
from gmflow.flow.guidance import GuidanceResult, cfg_guidance, guide
from gmflow.flow.path import SIGMA_FLOOR, Sigma, _as_level, _per_sample, posterior_mean, u_to_x0
from gmflow.flow.second_order import SecondOrderState, second_order_correction
from gmflow.flow.timesteps import sigma_grid
from gmflow.gm import GaussianMixture, IsoGaussian, gm_to_iso_gaussian, gm_to_mean, gm_to_sample
from gmflow.gm.mixture import gm_dtype
from gmflow.gm.random import Generators, randn

__all__ = [
    "SOLVERS",
    "Denoiser",
    "flow_euler_step",
    "flow_sde_step",
    "default_num_substeps",
    "sample",
]

SOLVERS = ("gm-sde", "gm-ode", "euler", "heun", "ddpm")
GUIDANCE_MODES = ("probabilistic", "cfg")

Denoiser = Callable[[Tensor, Tensor, Tensor | None], GaussianMixture]
"""denoiser(x_t (B, C, H, W), sigma (B,), class_labels (B,) or None) -> GaussianMixture over u."""


def _both_floats(*levels: Sigma) -> bool:
    return all(isinstance(v, float | int) and not isinstance(v, bool) for v in levels)


def flow_euler_step(x_t: Tensor, x0_hat: Tensor, sigma: Sigma, sigma_next: Sigma) -> Tensor:
    """One Euler step of dx/dσ = (x − x̂0)/σ in its x0 form (FlowEulerODE, spec 8.1).

    x' = (σ'/σ) x + (1 − σ'/σ) x̂0 = x + (σ' − σ)(x − x̂0)/σ (a DDIM step); σ' = 0 returns x̂0.

    Args:
        x_t: (B, C, H, W).
        x0_hat: the x0 estimate, same shape.
        sigma: σ, scalar or (B,).
        sigma_next: σ' < σ, scalar or (B,).

    Returns:
        x at σ'.
    """
    if _both_floats(sigma, sigma_next):  # the samplers' grids: one fused op (a launch on GPUs)
        ratio = float(sigma_next) / max(float(sigma), SIGMA_FLOOR)
        dtype = torch.promote_types(gm_dtype(x_t.dtype), x0_hat.dtype)
        return torch.lerp(x0_hat.to(dtype), x_t.to(dtype), ratio)
    s = _per_sample(_as_level(sigma, x_t), 3).clamp_min(SIGMA_FLOOR)
    ratio = _per_sample(_as_level(sigma_next, x_t), 3) / s
    return ratio * x_t + (1 - ratio) * x0_hat


def flow_sde_step(
    x_t: Tensor,
    x0_hat: Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    noise: Tensor,
    diffusion: float = 1.0,
) -> Tensor:
    """One step of the canonical flow SDE with diffusion coefficient h (FlowSDE, spec 8.1).

    With ε̂ = (x − α x̂0)/σ and m = (σ' α/(σ α'))^{h²} (σ, σ α' floored at 1e-6):
        x' = α' x̂0 + σ' (m ε̂ + sqrt(1 − m²) z).
    h = 1 is exactly the DDPM posterior sample c1 x + c2 x̂0 + sqrt(c3) z (spec 1.3), h = 0 the
    Euler/DDIM step; σ' = 0 returns x̂0.

    Args:
        x_t: (B, C, H, W).
        x0_hat: the x0 estimate, same shape.
        sigma: σ, scalar or (B,).
        sigma_next: σ' ≤ σ, scalar or (B,).
        noise: z ~ N(0, I), same shape as ``x_t``.
        diffusion: h ≥ 0.

    Returns:
        x at σ'.
    """
    if _both_floats(sigma, sigma_next):  # the same maths as coefficients of x, x̂0 and z
        s, s_next = float(sigma), float(sigma_next)
        a, a_next = 1 - s, 1 - s_next
        m = (s_next * a / max(s * a_next, SIGMA_FLOOR)) ** (diffusion**2)
        c_x = s_next * m / max(s, SIGMA_FLOOR)
        dtype = torch.promote_types(gm_dtype(x_t.dtype), x0_hat.dtype)
        out = torch.add(x_t.to(dtype) * c_x, x0_hat.to(dtype), alpha=a_next - c_x * a)
        return torch.add(out, noise.to(dtype), alpha=s_next * math.sqrt(max(1 - m * m, 0.0)))
    s = _per_sample(_as_level(sigma, x_t), 3)
    s_next = _per_sample(_as_level(sigma_next, x_t), 3)
    a, a_next = 1 - s, 1 - s_next
    eps_hat = (x_t - a * x0_hat) / s.clamp_min(SIGMA_FLOOR)
    m = (s_next * a / (s * a_next).clamp_min(SIGMA_FLOOR)).pow(diffusion**2)
    return a_next * x0_hat + s_next * (m * eps_hat + (1 - m.square()).clamp_min(0).sqrt() * noise)


def default_num_substeps(num_steps: int) -> int:
    """GM-ODE sub-steps: max(ceil(128 / N), 2), so that N·S ≥ 128 fine steps (paper, spec 14)."""
    return max(math.ceil(128 / num_steps), 2)


@dataclass(frozen=True)
class _Guidance:
    """Validated guidance settings of one ``sample`` call."""

    mode: str
    scale: float
    orthogonal: float
    interval: tuple[float, float] | None
    class_labels: Tensor | None
    null_class_id: int | None

    @property
    def enabled(self) -> bool:
        return self.scale > (0.0 if self.mode == "probabilistic" else 1.0)

    def active_at(self, sigma: float) -> bool:
        """Guidance applies at σ (inside the interval, inclusive, when one is given)."""
        if not self.enabled:
            return False
        return self.interval is None or self.interval[0] <= sigma <= self.interval[1]


def _check_output(out: object, batch: int, shape: tuple[int, ...]) -> GaussianMixture:
    if not isinstance(out, GaussianMixture):
        raise TypeError(
            f"sample: the denoiser must return a gmflow.gm.GaussianMixture over u, got "
            f"{type(out).__name__}"
        )
    if tuple(out.means.shape[-3:]) != shape[-3:] or out.means.shape[:-4] != (batch,):
        raise ValueError(
            f"sample: the denoiser returned means of shape {tuple(out.means.shape)}; expected "
            f"({batch}, K, {', '.join(map(str, shape[-3:]))}) for an input of shape "
            f"({batch}, {', '.join(map(str, shape[-3:]))})"
        )
    lw, ls = out.logweights, out.logstds
    return GaussianMixture(
        out.means, lw.expand(batch, *lw.shape[-4:]), ls.expand(batch, *ls.shape[-4:])
    )


def _evaluate(
    denoiser: Denoiser, x: Tensor, sigma: float, guidance: _Guidance
) -> tuple[GaussianMixture, GuidanceResult | None]:
    """One network evaluation → (x0-GM after guidance, guidance terms or None).

    Guided evaluations run cond and uncond in one call on the doubled batch [cond; null].
    """
    labels = guidance.class_labels
    guided = guidance.active_at(sigma)
    x_in = torch.cat([x, x]) if guided else x
    if guided:
        assert labels is not None and guidance.null_class_id is not None
        labels = torch.cat([labels, torch.full_like(labels, guidance.null_class_id)])
    sigmas = torch.full((x_in.shape[0],), sigma, dtype=x.dtype, device=x.device)
    gm_u = _check_output(denoiser(x_in, sigmas, labels), x_in.shape[0], tuple(x.shape))
    gm_x0 = u_to_x0(gm_u.to(x.dtype), x_in, sigma)
    if not guided:
        return gm_x0, None
    gm_cond, gm_uncond = gm_x0.chunk(2)
    if guidance.mode == "cfg":
        return cfg_guidance(gm_cond, gm_uncond, guidance.scale), None
    result = guide(gm_cond, gm_uncond, guidance.scale, guidance.orthogonal)
    return result.gm, result


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate(
    denoiser: object,
    noise: object,
    solver: str,
    num_steps: int,
    num_substeps: int | None,
    order: int,
    gm2_coefs: tuple[float, float],
    shift: float,
    spectrum_net: object,
) -> int:
    """Check the non-guidance arguments of :func:`sample`; return the number of sub-steps S."""
    if not callable(denoiser):
        raise ConfigError(f"sample: denoiser must be callable, got {type(denoiser).__name__}")
    if not isinstance(noise, Tensor) or noise.dim() != 4 or not noise.is_floating_point():
        got = f"shape {tuple(noise.shape)}, {noise.dtype}" if isinstance(noise, Tensor) else noise
        raise ValueError(f"sample: noise must be a float tensor of shape (B, C, H, W), got {got}")
    if solver not in SOLVERS:
        raise ConfigError(f"sample: solver={solver!r}; expected one of {', '.join(SOLVERS)}")
    if not _is_int(num_steps) or num_steps < 1:
        raise ConfigError(f"sample: num_steps must be an integer >= 1, got {num_steps!r}")
    if num_substeps is not None and solver != "gm-ode":
        raise ConfigError(
            f"sample: num_substeps={num_substeps!r} is only used by solver='gm-ode' (GM-SDE and "
            f"the baselines take one sub-step); leave it None for solver={solver!r}"
        )
    if num_substeps is not None and (not _is_int(num_substeps) or num_substeps < 1):
        raise ConfigError(f"sample: num_substeps must be an integer >= 1, got {num_substeps!r}")
    if order not in (1, 2) or isinstance(order, bool):
        raise ConfigError(f"sample: order must be 1 or 2, got {order!r}")
    if order == 2 and solver not in ("gm-sde", "gm-ode"):
        raise ConfigError(
            f"sample: order=2 is the GM second-order correction of 'gm-sde' and 'gm-ode'; "
            f"solver={solver!r} takes order=1 ('heun' is already a second-order baseline)"
        )
    if len(gm2_coefs) != 2 or not all(math.isfinite(c) and c >= 0 for c in gm2_coefs):
        raise ConfigError(f"sample: gm2_coefs must be two finite numbers >= 0, got {gm2_coefs!r}")
    if not (math.isfinite(shift) and shift > 0):
        raise ConfigError(f"sample: shift must be a finite number > 0 (1 = none), got {shift!r}")
    if spectrum_net is not None and (solver != "gm-sde" or not callable(spectrum_net)):
        raise ConfigError(
            "sample: spectrum_net draws the GM-SDE x0 sample with spectral correlation; it needs "
            f"solver='gm-sde' and a callable, got solver={solver!r}"
        )
    if solver == "gm-ode":
        return num_substeps if num_substeps is not None else default_num_substeps(num_steps)
    return 1


def _validate_guidance(
    mode: str,
    scale: float,
    orthogonal: float,
    interval: tuple[float, float] | None,
    class_labels: Tensor | None,
    null_class_id: int | None,
    batch: int,
) -> _Guidance:
    if mode not in GUIDANCE_MODES:
        raise ConfigError(f"sample: guidance={mode!r}; expected 'probabilistic' or 'cfg'")
    if not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ConfigError(f"sample: guidance_scale must be a finite number, got {scale!r}")
    if mode == "probabilistic" and not 0 <= scale < 1:
        raise ConfigError(
            f"sample: probabilistic guidance_scale w must lie in [0, 1) (0 = off; ~0.04 best FID, "
            f"~0.45 best precision), got {scale}; for vanilla CFG with g >= 1 pass guidance='cfg'"
        )
    if mode == "cfg" and not scale >= 1:
        raise ConfigError(
            f"sample: with guidance='cfg' guidance_scale is the CFG scale g >= 1 (1 = off), "
            f"got {scale}"
        )
    if not 0 <= orthogonal <= 1:
        raise ConfigError(f"sample: orthogonal_guidance must lie in [0, 1], got {orthogonal!r}")
    if interval is not None and (len(interval) != 2 or not 0 <= interval[0] <= interval[1] <= 1):
        raise ConfigError(
            f"sample: guidance_interval must be (sigma_a, sigma_b) with 0 <= sigma_a <= sigma_b "
            f"<= 1, got {interval!r}"
        )
    if class_labels is not None and (
        not isinstance(class_labels, Tensor) or tuple(class_labels.shape) != (batch,)
    ):
        got = tuple(class_labels.shape) if isinstance(class_labels, Tensor) else class_labels
        raise ValueError(f"sample: class_labels must be a tensor of shape ({batch},), got {got}")
    settings = _Guidance(
        mode, float(scale), float(orthogonal), interval, class_labels, null_class_id
    )
    if settings.enabled and (class_labels is None or null_class_id is None):
        raise ConfigError(
            f"sample: guidance_scale={scale} evaluates the conditional and the unconditional model "
            "in one call on [cond; null]; pass class_labels (B,) and null_class_id (e.g. 1000 for "
            "ImageNet GMDiT), or set guidance_scale to "
            f"{'0' if mode == 'probabilistic' else '1'}"
        )
    if null_class_id is not None and not _is_int(null_class_id):
        raise ConfigError(f"sample: null_class_id must be an integer, got {null_class_id!r}")
    return settings


def _draw_x0(
    gm: GaussianMixture,
    g: IsoGaussian | None,
    spectrum_net: Callable[[IsoGaussian], Tensor] | None,
    generator: Generators,
) -> Tensor:
    """GM-SDE's x̂0: a pixel-wise GM sample, or a spectrally correlated one with a spectrum net."""
    if spectrum_net is None:
        return gm_to_sample(gm, 1, generator=generator).squeeze(-4)
    from gmflow.flow.spectral import spectral_sample  # lazy: optional piece of spec 9

    assert g is not None
    return spectral_sample(gm, spectrum_net(g), generator).to(gm.dtype)


def _randn_like(x: Tensor, generator: Generators) -> Tensor:
    return randn(x.shape, generator, device=x.device, dtype=x.dtype)


def _sample_gm(
    denoiser: Denoiser,
    x: Tensor,
    *,
    sde: bool,
    num_steps: int,
    num_substeps: int,
    order: int,
    guidance: _Guidance,
    gm2_coefs: tuple[float, float],
    shift: float,
    generator: Generators,
    spectrum_net: Callable[[IsoGaussian], Tensor] | None,
    progress: Callable[[int, int], None] | None,
) -> Tensor:
    """The GM-SDE / GM-ODE loop of spec 8.2 (N network steps, S sub-steps each)."""
    grid = sigma_grid(num_steps * num_substeps, shift).tolist()
    prev: SecondOrderState | None = None
    for i in range(num_steps):
        j0 = i * num_substeps
        sigma, sigma_end = grid[j0], grid[j0 + num_substeps]
        gm, terms = _evaluate(denoiser, x, sigma, guidance)
        g = None
        if order == 2 or spectrum_net is not None:
            g = terms.target if terms is not None else gm_to_iso_gaussian(gm)
        if order == 2:
            assert g is not None
            gm, g, prev = second_order_correction(
                gm, g, x, sigma, sigma - sigma_end, prev, guidance=terms, coefs=gm2_coefs
            )
        x_base = x
        for q in range(num_substeps):
            s, s_next = grid[j0 + q], grid[j0 + q + 1]
            if q > 0:  # GM-ODE sub-step: re-condition the GM on the moved state (spec 3.5)
                x0_hat = posterior_mean(gm, x_base, sigma, x, s)
            elif sde:
                x0_hat = _draw_x0(gm, g, spectrum_net, generator)
            else:
                x0_hat = gm_to_mean(gm)
            if not sde:
                x = flow_euler_step(x, x0_hat, s, s_next)
            elif s_next == 0:
                x = x0_hat
            else:
                x = flow_sde_step(x, x0_hat, s, s_next, _randn_like(x, generator))
        if progress is not None:
            progress(i + 1, num_steps)
    return x


def _sample_mean(
    denoiser: Denoiser,
    x: Tensor,
    *,
    solver: str,
    num_steps: int,
    guidance: _Guidance,
    shift: float,
    generator: Generators,
    progress: Callable[[int, int], None] | None,
) -> Tensor:
    """Flow-matching baselines driven by the GM mean only: Euler, Heun, DDPM (spec 8.1)."""
    grid = sigma_grid(num_steps, shift).tolist()

    def x0_mean(x_t: Tensor, sigma: float) -> Tensor:
        return gm_to_mean(_evaluate(denoiser, x_t, sigma, guidance)[0])

    for i in range(num_steps):
        s, s_next = grid[i], grid[i + 1]
        x0_hat = x0_mean(x, s)
        if solver == "ddpm":
            noise = _randn_like(x, generator) if s_next > 0 else None
            x = x0_hat if noise is None else flow_sde_step(x, x0_hat, s, s_next, noise)
        elif solver == "euler" or s_next == 0:
            x = flow_euler_step(x, x0_hat, s, s_next)
        else:  # heun: average the velocities at both ends (the last step stays Euler)
            x_euler = flow_euler_step(x, x0_hat, s, s_next)
            x0_end = x0_mean(x_euler, s_next)
            u = 0.5 * ((x - x0_hat) / s + (x_euler - x0_end) / s_next)
            x = x + (s_next - s) * u
        if progress is not None:
            progress(i + 1, num_steps)
    return x


def sample(
    denoiser: Denoiser,
    noise: Tensor,
    *,
    solver: str,
    num_steps: int,
    num_substeps: int | None = None,
    order: int = 1,
    guidance_scale: float = 0.0,
    orthogonal_guidance: float = 1.0,
    guidance_interval: tuple[float, float] | None = None,
    guidance: str = "probabilistic",
    null_class_id: int | None = None,
    gm2_coefs: tuple[float, float] = (0.005, 1.0),
    shift: float = 1.0,
    class_labels: Tensor | None = None,
    generator: Generators = None,
    spectrum_net: Callable[[IsoGaussian], Tensor] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Integrate from σ = 1 (the given noise) to σ = 0 with a GM or baseline solver (spec 8.2).

    Solvers (N = ``num_steps``; network evaluations per call, NFE, in brackets; a guided
    evaluation is one call on the doubled batch [cond; null]):

    * ``gm-sde`` [N]: draw x̂0 from the x0-GM, then the DDPM posterior step (FlowSDE, h = 1) —
      exactly a draw from the reverse-transition GM (spec 3.4). S = 1.
    * ``gm-ode`` [N]: the x0-GM mean, then S Euler (DDIM) sub-steps per network step, re-deriving
      E[x0 | x] analytically at each sub-step (spec 3.5). S defaults to max(ceil(128/N), 2).
    * baselines that only use the GM mean (flow matching): ``euler`` [N], ``ddpm`` [N] (DDPM
      posterior sample around the mean), ``heun`` [2N − 1] (the last step is Euler).

    ``order=2`` adds the second-order GM correction (spec 8.3) to ``gm-sde`` / ``gm-ode``, guided
    or not (unguided it uses w = 0 in its damping). Guidance: ``"probabilistic"`` (spec 6,
    0 ≤ w < 1, orthogonal strength ``orthogonal_guidance``) or ``"cfg"`` (vanilla CFG, every
    component mean shifted by (g − 1)(μ_c − μ_u), g ≥ 1; ``orthogonal_guidance`` is not used
    there, as in the baseline). Outside ``guidance_interval`` = (σ_a, σ_b) the scale is 0 and only
    the conditional batch is evaluated; w = 0 (or g = 1) never evaluates the null class.

    The state x is kept in fp32 (fp64 if ``noise`` is fp64) and the denoiser output is cast to
    that dtype; every random draw uses ``generator``, so a fixed generator gives a fixed result.
    Runs under ``torch.no_grad``.

    Args:
        denoiser: denoiser(x_t (B, C, H, W), sigma (B,), class_labels) → GaussianMixture over
            u = ε − x0. σ ∈ [0, 1]; a network that expects t = 1000·σ scales it in its embedding.
        noise: x at σ = 1, (B, C, H, W).
        solver: one of ``gm-sde``, ``gm-ode``, ``euler``, ``heun``, ``ddpm``.
        num_steps: N ≥ 1 network steps.
        num_substeps: S for ``gm-ode`` only (None = the default above).
        order: 1, or 2 for the GM second-order correction.
        guidance_scale: w ∈ [0, 1) (probabilistic) or g ≥ 1 (cfg).
        orthogonal_guidance: o ∈ [0, 1] of probabilistic guidance.
        guidance_interval: (σ_a, σ_b), inclusive; None = everywhere.
        guidance: ``"probabilistic"`` or ``"cfg"``.
        null_class_id: the unconditional label, required when guided.
        gm2_coefs: (c_a, c_b) of the order-2 damping.
        shift: σ-grid shift s > 0 (1 = uniform grid).
        class_labels: (B,) labels passed to the denoiser (cond half when guided), or None.
        generator: RNG for every draw: one torch.Generator (or None, the global RNG), or one
            generator per row of ``noise`` so that each sample's result depends on its own seed only
            (independent of the batch size; see :mod:`gmflow.gm.random`).
        spectrum_net: for ``gm-sde``: maps the x0 iso Gaussian to a log power spectrum (B, C, H, W);
            x̂0 is then drawn by ``gmflow.flow.spectral.spectral_sample`` (spec 9.3).
        progress: called as progress(step, num_steps) after each network step.

    Returns:
        x at σ = 0, (B, C, H, W), fp32 (fp64 if ``noise`` is fp64).

    Raises:
        ConfigError: an invalid option (checked before the first network call).
        ValueError: tensors of the wrong shape.
    """
    substeps = _validate(
        denoiser, noise, solver, num_steps, num_substeps, order, gm2_coefs, shift, spectrum_net
    )
    settings = _validate_guidance(
        guidance,
        guidance_scale,
        orthogonal_guidance,
        guidance_interval,
        class_labels,
        null_class_id,
        noise.shape[0],
    )
    dtype = torch.float64 if noise.dtype == torch.float64 else torch.float32
    x = noise.to(dtype)
    with torch.no_grad():
        if solver in ("gm-sde", "gm-ode"):
            return _sample_gm(
                denoiser,
                x,
                sde=solver == "gm-sde",
                num_steps=num_steps,
                num_substeps=substeps,
                order=order,
                guidance=settings,
                gm2_coefs=(float(gm2_coefs[0]), float(gm2_coefs[1])),
                shift=shift,
                generator=generator,
                spectrum_net=spectrum_net,
                progress=progress,
            )
        return _sample_mean(
            denoiser,
            x,
            solver=solver,
            num_steps=num_steps,
            guidance=settings,
            shift=shift,
            generator=generator,
            progress=progress,
        )
