"""``gmflow sample``: images from a pipeline or a training run, via gmflow.sampling.generate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gmflow_cli.options import GuidanceIntervalOpt, StepOpt

SAMPLE_CONTEXT = {"allow_extra_args": True}
"""Registration settings: the values after the first of ``--classes jay magpie`` reach the
command as extra arguments (Typer options take one value per flag) and are appended to the
``--classes`` or ``--class-ids`` list that was given."""


def sample(
    ctx: typer.Context,
    *,
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out-dir", help="Output folder (PNGs, grid.png, samples.json).", show_default=False
        ),
    ],
    pretrained: Annotated[
        str | None,
        typer.Option(
            "--pretrained",
            help="Pipeline folder or hub id (e.g. Lakonik/gmflow_imagenet_k8_ema).",
            show_default=False,
        ),
    ] = None,
    run: Annotated[
        Path | None,
        typer.Option(
            "--run", help="Training run folder (its latest EMA weights).", show_default=False
        ),
    ] = None,
    step: StepOpt = None,
    solver: Annotated[
        str,
        typer.Option(
            "--solver",
            help="gm-ode2, gm-sde2, gm-ode, gm-sde; baselines on the GM mean: euler, heun, ddpm, "
            "dpmpp-2m, dpmpp-2m-sde, unipc.",
        ),
    ] = "gm-ode2",
    classes: Annotated[
        list[str] | None,
        typer.Option(
            "--classes",
            help="Class names, e.g. --classes jay magpie (quote names with spaces).",
            show_default=False,
        ),
    ] = None,
    class_ids: Annotated[
        list[int] | None,
        typer.Option("--class-ids", help="Class ids, e.g. --class-ids 17 18.", show_default=False),
    ] = None,
    num_per_class: Annotated[int, typer.Option("--num-per-class", help="Images per class.")] = 1,
    steps: Annotated[int, typer.Option("--steps", help="Network evaluations N per image.")] = 32,
    substeps: Annotated[
        str,
        typer.Option(
            "--substeps",
            help="GM-ODE sub-steps per step; auto = max(ceil(128/N), 2), 8 at N = 4 or 6.",
        ),
    ] = "auto",
    guidance: Annotated[
        float,
        typer.Option(
            "--guidance",
            help="Probabilistic guidance w in [0, 1) (0 = off); with --guidance-mode cfg the CFG "
            "scale g >= 1.",
        ),
    ] = 0.45,
    guidance_mode: Annotated[
        str,
        typer.Option(
            "--guidance-mode",
            help="probabilistic (GMFlow's) or cfg (vanilla classifier-free guidance, a baseline).",
        ),
    ] = "probabilistic",
    orthogonal_guidance: Annotated[
        float | None,
        typer.Option(
            "--orthogonal-guidance",
            help="Orthogonal projection o in [0, 1] of the guidance bias (default: 1, or 0 with "
            "cfg).",
            show_default=False,
        ),
    ] = None,
    guidance_interval: GuidanceIntervalOpt = None,
    gm2_coefs: Annotated[
        tuple[float, float],
        typer.Option("--gm2-coefs", help="Order-2 damping coefficients c_a c_b."),
    ] = (0.005, 1.0),
    gm2_correction_steps: Annotated[
        int,
        typer.Option(
            "--gm2-correction-steps", help="Order-2 mean-matching iterations (0 = the paper's)."
        ),
    ] = 0,
    shift: Annotated[
        float | None,
        typer.Option(
            "--shift",
            help="Time shift of the noise-level grid (default: the model's).",
            show_default=False,
        ),
    ] = None,
    sde_h: Annotated[
        float,
        typer.Option(
            "--sde-h", help="ddpm only: FlowSDE diffusion coefficient h (1 = DDPM, 0 = Euler)."
        ),
    ] = 1.0,
    seed: Annotated[
        int, typer.Option("--seed", help="Image i starts from the noise of seed + i.")
    ] = 42,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per network call.")] = 16,
    dtype: Annotated[str, typer.Option("--dtype", help="Network weights: fp32 or bf16.")] = "fp32",
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")] = "cpu",
    vae: Annotated[
        str | None,
        typer.Option(
            "--vae",
            help="--run only: VAE hub id or folder, or 'none' (default: from the run's dataset).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Draw class-conditional images with a GM solver; write PNGs, a grid and samples.json.

    Offline, a hub id must be in the local Hugging Face cache; else download it elsewhere.

    Examples:

      gmflow sample --pretrained Lakonik/gmflow_imagenet_k8_ema --classes jay magpie --out-dir out

      gmflow sample --pretrained DIR --solver gm-sde2 --class-ids 17 18 --num-per-class 4

      gmflow sample --run runs/in256_b2 --solver gm-ode2 --steps 16 --class-ids 207 --device cuda
    """

    from gmflow.sampling import SampleConfig, generate
    from gmflow_cli.progress import progress_bar

    names, ids = list(classes or []), list(class_ids or [])
    if ctx.args:  # the later values of `--classes jay magpie` / `--class-ids 17 18`
        if names and not ids:
            names += ctx.args
        elif ids and not names:
            try:
                ids += [int(v) for v in ctx.args]
            except ValueError:
                raise typer.BadParameter(
                    f"class ids must be integers, got {ctx.args}", param_hint="--class-ids"
                ) from None
        else:
            raise typer.BadParameter(
                f"unexpected argument(s) {ctx.args}; values follow --classes or --class-ids"
            )
    if substeps == "auto":
        num_substeps = None
    else:
        try:
            num_substeps = int(substeps)
        except ValueError:
            raise typer.BadParameter(
                f"expected a positive integer or 'auto', got {substeps!r}", param_hint="--substeps"
            ) from None
    cfg = SampleConfig(
        out_dir=out_dir,
        pretrained=pretrained,
        run=run,
        solver=solver,
        classes=tuple(names),
        class_ids=tuple(ids),
        num_per_class=num_per_class,
        num_steps=steps,
        num_substeps=num_substeps,
        guidance_scale=guidance,
        guidance_mode=guidance_mode,
        orthogonal_guidance=orthogonal_guidance,
        guidance_interval=guidance_interval,
        gm2_coefs=tuple(gm2_coefs),
        gm2_correction_steps=gm2_correction_steps,
        shift=shift,
        sde_h=sde_h,
        seed=seed,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        vae=vae,
        step=step,
    )
    bar = progress_bar()
    task = bar.add_task("sampling", total=None, info="steps")
    with bar:
        result = generate(
            cfg, progress=lambda done, total: bar.update(task, completed=done, total=total)
        )
    typer.echo(
        f"{len(result.image_paths)} images in {result.out_dir} (grid: {result.grid_path.name}, "
        f"settings and seeds: {result.manifest_path.name}) in {result.elapsed_s:.1f} s"
    )
