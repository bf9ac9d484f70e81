"""The ``sample`` loop: GM-SDE, GM-ODE (orders 1, 2) and the flow-matching baselines (spec 8).

The single steps are pure functions in :mod:`gmflow.flow.steps` and the option checks live in
:mod:`gmflow.flow.sample_options`; steps run over an explicit σ grid (:func:`sigma_grid`); the loop
keeps the state x in fp32 (fp64 when the noise is fp64) whatever the network dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gmflow.flow.guidance import GuidanceResult, cfg_guidance, guide
from gmflow.flow.path import posterior_mean, u_to_x0
from gmflow.flow.sample_options import (
    SOLVERS,
    GuidanceSettings,
    validate_guidance,
    validate_options,
)
from gmflow.flow.scheduler_solvers import (
    SCHEDULER_SOLVERS,
    check_flow_scheduler,
    make_flow_scheduler,
    run_scheduler,
)
from gmflow.flow.second_order import SecondOrderState, second_order_correction
from gmflow.flow.steps import default_num_substeps, flow_euler_step, flow_sde_step
from gmflow.flow.timesteps import sigma_grid
from gmflow.gm import GaussianMixture, IsoGaussian, gm_to_iso_gaussian, gm_to_mean, gm_to_sample
from gmflow.gm.random import Generators, randn

__all__ = [
    "SOLVERS",
    "Denoiser",
    "flow_euler_step",
    "flow_sde_step",
    "default_num_substeps",
    "sample",
    "SamplerStep",
]


@dataclass(frozen=True)
class SamplerStep:
    """What ``sample(..., callback=...)`` reports after each network step (spec 17.1's
    ``save_intermediate``): the step's levels, states and x0 predictions.

    Attributes:
        index: 1-based network step, up to ``num_steps``.
        num_steps: N.
        sigma: the level the step starts from; ``sigma_next``: where it ends.
        x_t: the state at ``sigma``, (B, C, H, W).
        gm_x0: the x0-GM the step used (after guidance and the order-2 correction); None for
            the ``heun`` steps that average two evaluations (all but its last, Euler, step).
        x0_hat: the step's first x0 estimate: the GM mean (ODE solvers, baselines) or the GM-SDE
            draw.
        x: the state at ``sigma_next``.
    """

    index: int
    num_steps: int
    sigma: float
    sigma_next: float
    x_t: Tensor
    gm_x0: GaussianMixture | None
    x0_hat: Tensor
    x: Tensor


Denoiser = Callable[[Tensor, Tensor, Tensor | None], GaussianMixture]
"""denoiser(x_t (B, C, H, W), sigma (B,), class_labels (B,) or None) -> GaussianMixture over u."""


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
    denoiser: Denoiser, x: Tensor, sigma: float, guidance: GuidanceSettings
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
        return cfg_guidance(gm_cond, gm_uncond, guidance.scale, guidance.orthogonal), None
    result = guide(gm_cond, gm_uncond, guidance.scale, guidance.orthogonal)
    return result.gm, result


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
    guidance: GuidanceSettings,
    gm2_coefs: tuple[float, float],
    shift: float,
    generator: Generators,
    spectrum_net: Callable[[IsoGaussian], Tensor] | None,
    progress: Callable[[int, int], None] | None,
    gm2_correction_steps: int = 0,
    callback: Callable[[SamplerStep], None] | None = None,
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
                gm, g, x, sigma, sigma - sigma_end, prev, guidance=terms, coefs=gm2_coefs,
                correction_steps=gm2_correction_steps,
            )  # fmt: skip
        x_base = x
        first_x0 = x
        for q in range(num_substeps):
            s, s_next = grid[j0 + q], grid[j0 + q + 1]
            if q > 0:  # GM-ODE sub-step: re-condition the GM on the moved state (spec 3.5)
                x0_hat = posterior_mean(gm, x_base, sigma, x, s)
            elif sde:
                x0_hat = first_x0 = _draw_x0(gm, g, spectrum_net, generator)
            else:
                x0_hat = first_x0 = gm_to_mean(gm)
            if not sde:
                x = flow_euler_step(x, x0_hat, s, s_next)
            elif s_next == 0:
                x = x0_hat
            else:
                x = flow_sde_step(x, x0_hat, s, s_next, _randn_like(x, generator))
        if callback is not None:
            callback(SamplerStep(i + 1, num_steps, sigma, sigma_end, x_base, gm, first_x0, x))
        if progress is not None:
            progress(i + 1, num_steps)
    return x


def _sample_mean(
    denoiser: Denoiser,
    x: Tensor,
    *,
    solver: str,
    num_steps: int,
    guidance: GuidanceSettings,
    shift: float,
    generator: Generators,
    progress: Callable[[int, int], None] | None,
    callback: Callable[[SamplerStep], None] | None = None,
    sde_h: float = 1.0,
) -> Tensor:
    """Flow-matching baselines driven by the GM mean only: Euler, Heun, DDPM (spec 8.1)."""
    grid = sigma_grid(num_steps, shift).tolist()

    for i in range(num_steps):
        s, s_next = grid[i], grid[i + 1]
        x_t = x
        gm = _evaluate(denoiser, x, s, guidance)[0]
        x0_hat = gm_to_mean(gm)
        if solver == "ddpm":
            noise = _randn_like(x, generator) if s_next > 0 else None
            x = x0_hat if noise is None else flow_sde_step(x, x0_hat, s, s_next, noise, sde_h)
        elif solver == "euler" or s_next == 0:
            x = flow_euler_step(x, x0_hat, s, s_next)
        else:  # heun: average the velocities at both ends (the last step stays Euler)
            x_euler = flow_euler_step(x, x0_hat, s, s_next)
            x0_end = gm_to_mean(_evaluate(denoiser, x_euler, s_next, guidance)[0])
            u = 0.5 * ((x - x0_hat) / s + (x_euler - x0_end) / s_next)
            x = x + (s_next - s) * u
            gm = None  # the step averaged two evaluations
        if callback is not None:
            callback(SamplerStep(i + 1, num_steps, s, s_next, x_t, gm, x0_hat, x))
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
    cfg_orthogonal_guidance: float = 0.0,
    guidance_interval: tuple[float, float] | None = None,
    guidance: str = "probabilistic",
    null_class_id: int | None = None,
    gm2_coefs: tuple[float, float] = (0.005, 1.0),
    gm2_correction_steps: int = 0,
    shift: float = 1.0,
    class_labels: Tensor | None = None,
    generator: Generators = None,
    spectrum_net: Callable[[IsoGaussian], Tensor] | None = None,
    progress: Callable[[int, int], None] | None = None,
    callback: Callable[[SamplerStep], None] | None = None,
    scheduler: Any = None,
    sde_h: float = 1.0,
) -> Tensor:
    """Integrate from σ = 1 (the given noise) to σ = 0 with a GM or baseline solver (spec 8.2).

    Solvers (N = ``num_steps``; network evaluations per call, NFE, in brackets; a guided
    evaluation is one call on the doubled batch [cond; null]):

    * ``gm-sde`` [N]: draw x̂0 from the x0-GM, then the DDPM posterior step (FlowSDE, h = 1) —
      exactly a draw from the reverse-transition GM (spec 3.4). S = 1.
    * ``gm-ode`` [N]: the x0-GM mean, then S Euler (DDIM) sub-steps per network step, re-deriving
      E[x0 | x] analytically at each sub-step (spec 3.5). S defaults to the paper's
      max(ceil(128/N), 2), with S = 8 at N = 4 or 6 (:func:`default_num_substeps`).
    * baselines that only use the GM mean (flow matching): ``euler`` [N], ``ddpm`` [N] (DDPM
      posterior sample around the mean; ``sde_h`` sets FlowSDE's h), ``heun`` [2N − 1] (the
      last step is Euler);
      Diffusers' multistep solvers on the GM velocity (:mod:`gmflow.flow.scheduler_solvers`):
      ``dpmpp-2m`` [N], ``dpmpp-2m-sde`` [N], ``unipc`` [N] on their own flow σ grids, and
      ``diffusers`` [N] with any velocity scheduler passed as ``scheduler``.

    ``order=2`` adds the second-order GM correction (spec 8.3) to ``gm-sde`` / ``gm-ode``, guided
    or not (unguided it uses w = 0 in its damping). Guidance: ``"probabilistic"`` (spec 6,
    0 ≤ w < 1, orthogonal strength ``orthogonal_guidance``, default 1) or ``"cfg"`` (vanilla CFG,
    every component mean shifted by b = (g − 1)(μ_c − μ_u), g ≥ 1). CFG takes its own projection
    strength ``cfg_orthogonal_guidance`` (default 0 = plain CFG, as the baseline; o > 0 applies
    probabilistic guidance's projection b ← b − o ⟨b, μ_c⟩/⟨μ_c, μ_c⟩ μ_c, see
    :func:`gmflow.flow.cfg_guidance`) and ignores ``orthogonal_guidance``: the two modes have
    different defaults, so one shared argument could not keep both. Outside
    ``guidance_interval`` = (σ_a, σ_b) the scale is 0 and only the conditional batch is
    evaluated; w = 0 (or g = 1) never evaluates the null class.

    The state x is kept in fp32 (fp64 if ``noise`` is fp64) and the denoiser output is cast to
    that dtype; every random draw uses ``generator``, so a fixed generator gives a fixed result.
    Runs under ``torch.no_grad``.

    Args:
        denoiser: denoiser(x_t (B, C, H, W), sigma (B,), class_labels) → GaussianMixture over
            u = ε − x0. σ ∈ [0, 1]; a network that expects t = 1000·σ scales it in its embedding.
        noise: x at σ = 1, (B, C, H, W).
        solver: one of ``gm-sde``, ``gm-ode``, ``euler``, ``heun``, ``ddpm``, ``dpmpp-2m``,
            ``dpmpp-2m-sde``, ``unipc``, ``diffusers``.
        num_steps: N ≥ 1 network steps.
        num_substeps: S for ``gm-ode`` only (None = the default above).
        order: 1, or 2 for the GM second-order correction.
        guidance_scale: w ∈ [0, 1) (probabilistic) or g ≥ 1 (cfg).
        orthogonal_guidance: o ∈ [0, 1] of probabilistic guidance (not used by ``"cfg"``).
        cfg_orthogonal_guidance: o ∈ [0, 1] of ``"cfg"``'s opt-in orthogonal projection
            (0 = off, plain CFG); must stay 0 with ``"probabilistic"``.
        guidance_interval: (σ_a, σ_b), inclusive; None = everywhere.
        guidance: ``"probabilistic"`` or ``"cfg"``.
        null_class_id: the unconditional label, required when guided.
        gm2_coefs: (c_a, c_b) of the order-2 damping.
        gm2_correction_steps: iterations that make the order-2 GM's mean match its extrapolated
            target exactly (spec 8.3 step 9; 0, the paper's setting, skips them).
        shift: σ-grid shift s > 0 (1 = uniform grid).
        class_labels: (B,) labels passed to the denoiser (cond half when guided), or None.
        generator: RNG for every draw: one torch.Generator (or None, the global RNG), or one
            generator per row of ``noise`` so that each sample's result depends on its own seed only
            (independent of the batch size; see :mod:`gmflow.gm.random`).
        spectrum_net: for ``gm-sde``: maps the x0 iso Gaussian to a log power spectrum (B, C, H, W);
            x̂0 is then drawn by ``gmflow.flow.spectral.spectral_sample`` (spec 9.3).
        progress: called as progress(step, num_steps) after each network step.
        callback: called with a :class:`SamplerStep` after each network step (intermediate
            states, x0-GMs and x0 estimates; for plots and debugging). Costs nothing when None.
        scheduler: for ``solver="diffusers"``: a Diffusers scheduler that takes a velocity
            (``prediction_type="flow_prediction"`` with ``use_flow_sigmas=True``, or a
            ``FlowMatch*`` one) and whose σ grid ends at 0; its own shift applies.
        sde_h: the diffusion coefficient h of the ``ddpm`` baseline's FlowSDE step (spec 8.1;
            1 = the DDPM posterior sample, 0 = the Euler step, larger = more noise).

    Returns:
        x at σ = 0, (B, C, H, W), fp32 (fp64 if ``noise`` is fp64).

    Raises:
        ConfigError: an invalid option (checked before the first network call).
        ValueError: tensors of the wrong shape.
    """
    substeps = validate_options(
        denoiser, noise, solver, num_steps, num_substeps, order, gm2_coefs, shift, spectrum_net,
        gm2_correction_steps, scheduler, sde_h,
    )  # fmt: skip
    if solver == "diffusers" or solver in SCHEDULER_SOLVERS:
        scheduler = scheduler if solver == "diffusers" else make_flow_scheduler(solver, shift)
        check_flow_scheduler(scheduler)
    settings = validate_guidance(
        guidance,
        guidance_scale,
        orthogonal_guidance,
        guidance_interval,
        class_labels,
        null_class_id,
        noise.shape[0],
        cfg_orthogonal=cfg_orthogonal_guidance,
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
                gm2_correction_steps=gm2_correction_steps,
                shift=shift,
                generator=generator,
                spectrum_net=spectrum_net,
                progress=progress,
                callback=callback,
            )
        if scheduler is not None:

            def evaluate(x: Tensor, s: float) -> tuple[GaussianMixture, Tensor]:
                gm = _evaluate(denoiser, x, s, settings)[0]
                return gm, gm_to_mean(gm)

            def report(i, s, s_next, x_t, gm, x0_hat, x):  # type: ignore[no-untyped-def]
                if callback is not None:
                    callback(SamplerStep(i, num_steps, s, s_next, x_t, gm, x0_hat, x))

            return run_scheduler(
                evaluate, x, scheduler=scheduler, num_steps=num_steps, generator=generator,
                progress=progress, report=report,
            )  # fmt: skip
        return _sample_mean(
            denoiser,
            x,
            solver=solver,
            num_steps=num_steps,
            guidance=settings,
            shift=shift,
            generator=generator,
            progress=progress,
            callback=callback,
            sde_h=float(sde_h),
        )
