"""``gmflow sample``: class-conditional images from a pretrained pipeline or a training run.

:func:`generate` loads the model with :func:`gmflow.model_loading.load_model` (a pipeline folder
or hub id through :meth:`GMDiTPipeline.from_pretrained`, or a run folder through
:func:`gmflow.training.build.load_run`), resolves class names, integrates
:func:`gmflow.flow.sample` batch by batch, decodes (VAE latents, or pixels in [-1, 1]) and writes
one PNG per sample, a grid PNG and ``samples.json`` (every setting and the seed of each sample).

Seeds: sample i (classes in the order given, ``num_per_class`` each) starts from the noise
``torch.randn(C, H, W)`` of a CPU generator seeded with ``seed + i``, moved to the device, so the
starting points depend neither on the batch size nor on the device. The stochastic solvers
(gm-sde, gm-sde2, ddpm) draw sample i's in-loop noise from its own generator, seeded from
(seed, i) (:mod:`gmflow.gm.random`), so every solver gives the same images for any batch size
(up to floating-point reassociation in batched matmuls).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gmflow.errors import ConfigError
from gmflow.model_loading import DTYPES, LoadedModel, decode_images, load_model
from gmflow.solver_names import (
    GUIDANCE_MODES,
    SOLVER_VARIANTS,
    STOCHASTIC_SOLVERS,
    check_guidance_interval,
    guidance_kwargs,
    orthogonal_for,
)

__all__ = [
    "SOLVERS",
    "SampleConfig",
    "SampleResult",
    "LoadedModel",
    "load_model",
    "generate",
    "decode_images",
]

logger = logging.getLogger(__name__)

SOLVERS = SOLVER_VARIANTS  # CLI solver name -> (gmflow.flow.sample solver, order)
STOCHASTIC = STOCHASTIC_SOLVERS
GRID_MAX_IMAGES = 64  # the grid shows the first 64 samples, one row per class (8 columns at most)


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """Everything ``gmflow sample`` needs (validated on construction; ConfigError otherwise)."""

    out_dir: Path  # written: one PNG per sample, grid.png, samples.json
    pretrained: str | None = None  # pipeline folder or hub id (exclusive with run)
    run: Path | None = None  # training run folder (config.yaml + checkpoints/)
    solver: str = "gm-ode2"  # a key of SOLVERS
    classes: tuple[str, ...] = ()  # class names (exclusive with class_ids)
    class_ids: tuple[int, ...] = ()  # class ids; num_classes is the unconditional class
    num_per_class: int = 1
    num_steps: int = 32  # N network evaluations per sample
    num_substeps: int | None = None  # GM-ODE sub-steps S; None = flow.default_num_substeps(N)
    guidance_scale: float = 0.45  # probabilistic guidance w in [0, 1) (0 = off), or CFG g >= 1
    guidance_mode: str = "probabilistic"  # or "cfg": vanilla classifier-free guidance
    # o in [0, 1], the orthogonal projection of the guidance bias; None = the mode's default
    # (1 = the paper's for probabilistic guidance, 0 = plain CFG)
    orthogonal_guidance: float | None = None
    guidance_interval: tuple[float, float] | None = (
        None  # (σ_a, σ_b): guide only inside; None = all
    )
    gm2_coefs: tuple[float, float] = (0.005, 1.0)  # (c_a, c_b) of the order-2 damping
    gm2_correction_steps: int = 0  # order-2 mean-matching iterations (spec 8.3 step 9)
    shift: float | None = None  # time shift of the σ grid; None = the model's (pipeline/recipe)
    sde_h: float = 1.0  # ddpm only: FlowSDE diffusion coefficient h (1 = DDPM, 0 = Euler)
    seed: int = 42  # sample i starts from the noise of seed + i
    batch_size: int = 16
    dtype: str = "fp32"  # network weights: fp32 or bf16 (GM maths stays fp32)
    device: str = "cpu"  # cpu, cuda or cuda:N
    vae: str | None = None  # run only: hub id/folder, "none"; None = from manifest
    use_ema: bool = True  # run only: EMA weights (else the raw ones)
    step: int | None = None  # run only: the checkpoint's training step; None = the latest
    variant: str | None = None  # pretrained only: weights variant; None = auto

    def __post_init__(self) -> None:
        if (self.pretrained is None) == (self.run is None):
            raise ConfigError(
                "pass exactly one model: --pretrained DIR_OR_HUB_ID (a pipeline) or --run RUN_DIR "
                f"(a training run); got {'both' if self.pretrained is not None else 'neither'}"
            )
        if self.solver not in SOLVERS:
            raise ConfigError(
                f"unknown solver {self.solver!r}; expected one of {', '.join(SOLVERS)}"
            )
        if self.num_substeps is not None and SOLVERS[self.solver][0] != "gm-ode":
            raise ConfigError(
                f"--substeps {self.num_substeps} is only used by the GM-ODE solvers (gm-ode, "
                f"gm-ode2); solver {self.solver!r} takes one sub-step: drop --substeps"
            )
        if self.num_substeps is not None:
            _check_int("num_substeps", self.num_substeps)
        for name in ("num_per_class", "num_steps", "batch_size"):
            _check_int(name, getattr(self, name))
        for name, value in (("seed", self.seed), *(("class id", c) for c in self.class_ids)):
            _check_int(name, value, minimum=0)
        mode, scale = self.guidance_mode, self.guidance_scale
        if mode not in GUIDANCE_MODES:
            raise ConfigError(
                f"--guidance-mode {mode!r}; expected one of {', '.join(GUIDANCE_MODES)}"
            )
        scale_ok = isinstance(scale, int | float) and math.isfinite(scale)
        if mode == "cfg" and not (scale_ok and scale >= 1):
            raise ConfigError(
                f"--guidance {scale} is below 1: with --guidance-mode cfg it is the CFG scale "
                "g >= 1 (1 = off)"
            )
        if mode == "probabilistic" and not (scale_ok and 0 <= scale < 1):
            raise ConfigError(
                f"--guidance {scale} is outside [0, 1): it is the probabilistic "
                "guidance w (0 = off, ~0.04 best FID, 0.45 for sharp images), not a CFG scale "
                "(for CFG pass --guidance-mode cfg)"
            )
        self._check_sampler_options()
        if bool(self.classes) == bool(self.class_ids):
            raise ConfigError(
                "pass the classes to draw with exactly one of --classes (names, e.g. jay magpie) "
                f"or --class-ids (e.g. 17 18); got {'both' if self.classes else 'neither'}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError(f"--device {self.device!r}; expected cpu, cuda or cuda:N")
        if self.run is None and (self.vae is not None or not self.use_ema):
            raise ConfigError("--vae and use_ema apply to --run only (a pipeline has its own VAE)")
        if self.step is not None:
            if self.run is None:
                raise ConfigError("--step picks a checkpoint of a --run; a pipeline has one")
            _check_int("step", self.step, minimum=0)
        if self.pretrained is None and self.variant is not None:
            raise ConfigError("variant applies to --pretrained only")

    @property
    def orthogonal(self) -> float:
        """The orthogonal-projection strength o in use (the mode's default when None)."""
        return orthogonal_for(self.guidance_mode, self.orthogonal_guidance)

    def _check_sampler_options(self) -> None:
        """The options that tune a solver, with the flag that sets each in the message."""
        if not (isinstance(self.orthogonal, int | float) and 0 <= self.orthogonal <= 1):
            raise ConfigError(
                f"--orthogonal-guidance {self.orthogonal} is outside [0, 1]: the strength "
                "of the orthogonal projection of the guidance bias (1 = the paper's, 0 = none)"
            )
        check_guidance_interval("--guidance-interval", self.guidance_interval)
        coefs = self.gm2_coefs
        if len(coefs) != 2 or not all(
            isinstance(c, int | float) and math.isfinite(c) and c >= 0 for c in coefs
        ):
            raise ConfigError(f"--gm2-coefs {coefs} must be two finite numbers >= 0 (c_a c_b)")
        _check_int("gm2_correction_steps", self.gm2_correction_steps, minimum=0)
        if self.gm2_correction_steps and SOLVERS[self.solver][1] != 2:
            raise ConfigError(
                f"--gm2-correction-steps {self.gm2_correction_steps} refines the order-2 "
                f"correction; solver {self.solver!r} has none (use gm-ode2 or gm-sde2)"
            )
        if self.shift is not None and not (
            isinstance(self.shift, int | float) and math.isfinite(self.shift) and self.shift > 0
        ):
            raise ConfigError(f"--shift {self.shift} must be a finite number > 0 (1 = no shift)")
        if not (isinstance(self.sde_h, int | float) and math.isfinite(self.sde_h)
                and self.sde_h >= 0):  # fmt: skip
            raise ConfigError(f"--sde-h {self.sde_h} must be a finite number >= 0 (1 = DDPM)")
        if self.sde_h != 1 and SOLVERS[self.solver][0] != "ddpm":
            raise ConfigError(
                f"--sde-h {self.sde_h} sets the FlowSDE step of the ddpm baseline; solver "
                f"{self.solver!r} does not take it (GM-SDE is exact only with h = 1)"
            )


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class SampleResult:
    """What :func:`generate` wrote."""

    out_dir: Path
    image_paths: tuple[Path, ...]  # one PNG per sample, in sample order
    grid_path: Path
    manifest_path: Path  # samples.json
    class_ids: tuple[int, ...]  # per sample
    seeds: tuple[int, ...]  # per sample: seed + index
    elapsed_s: float


def _class_ids(cfg: SampleConfig, model: LoadedModel) -> list[int]:
    ids = list(model.labels.ids(list(cfg.classes))) if cfg.classes else list(cfg.class_ids)
    bad = [c for c in ids if not 0 <= c <= model.num_classes]
    if bad:
        raise ConfigError(
            f"class ids {bad} are outside [0, {model.num_classes}] for {model.source} "
            f"({model.num_classes} = unconditional)"
        )
    return ids


def _loop_seed(seed: int, index: int) -> int:
    """Seed of sample ``index``'s in-loop generator, independent of every starting-noise stream."""
    return int(np.random.SeedSequence([seed, index, 1]).generate_state(1, np.uint64)[0] >> 1)


def generate(cfg: SampleConfig, progress: Callable[[int, int], None] | None = None) -> SampleResult:
    """Draw ``num_per_class`` images per class and write them under ``cfg.out_dir``.

    Args:
        cfg: the settings (see :class:`SampleConfig`).
        progress: called as progress(network steps done, total) after every network step.

    Returns:
        The paths written and the class id and seed of each sample.

    Raises:
        ConfigError, CheckpointError: bad settings, unknown classes, missing weights.
    """
    from gmflow.flow import sample
    from gmflow.gm.random import row_generators

    start_time = time.perf_counter()
    model = load_model(cfg)
    class_ids = [c for c in _class_ids(cfg, model) for _ in range(cfg.num_per_class)]
    n = len(class_ids)
    solver, order = SOLVERS[cfg.solver]
    num_batches = math.ceil(n / cfg.batch_size)
    total = num_batches * cfg.num_steps
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = (model.in_channels, model.sample_size, model.sample_size)
    images: list[np.ndarray] = []
    paths: list[Path] = []
    for b, first in enumerate(range(0, n, cfg.batch_size)):
        index = range(first, min(n, first + cfg.batch_size))
        noise = torch.stack(
            [
                torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed + i))
                for i in index
            ]
        ).to(cfg.device)
        generator = None
        if solver in STOCHASTIC:
            generator = row_generators([_loop_seed(cfg.seed, i) for i in index], cfg.device)

        def report(step: int, _: int, done: int = b * cfg.num_steps) -> None:
            if progress is not None:
                progress(done + step, total)

        x0 = sample(
            model.denoiser,
            noise,
            solver=solver,
            num_steps=cfg.num_steps,
            num_substeps=cfg.num_substeps,
            order=order,
            guidance_scale=float(cfg.guidance_scale),
            **guidance_kwargs(cfg.guidance_mode, cfg.orthogonal),
            guidance_interval=cfg.guidance_interval,
            gm2_coefs=cfg.gm2_coefs,
            gm2_correction_steps=cfg.gm2_correction_steps if order == 2 else 0,
            null_class_id=model.num_classes,
            shift=model.shift if cfg.shift is None else float(cfg.shift),
            sde_h=float(cfg.sde_h),
            class_labels=torch.tensor([class_ids[i] for i in index], device=cfg.device),
            generator=generator,
            spectrum_net=model.spectrum_net if solver == "gm-sde" else None,
            progress=report,
        )
        batch = decode_images(x0, model.vae)
        batch = (batch * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for i, image in zip(index, batch, strict=True):
            path = out_dir / f"sample-{i:06d}-class-{class_ids[i]:04d}.png"
            _write_png(path, image)
            paths.append(path)
            if len(images) < GRID_MAX_IMAGES:
                images.append(image)
    grid_path = out_dir / "grid.png"
    _write_png(grid_path, _grid(images, min(cfg.num_per_class if cfg.num_per_class > 1 else n, 8)))
    seeds = [cfg.seed + i for i in range(n)]
    elapsed = time.perf_counter() - start_time
    manifest_path = out_dir / "samples.json"
    manifest_path.write_text(
        json.dumps(_manifest(cfg, model, class_ids, seeds, paths, grid_path, elapsed), indent=2)
    )
    return SampleResult(
        out_dir=out_dir,
        image_paths=tuple(paths),
        grid_path=grid_path,
        manifest_path=manifest_path,
        class_ids=tuple(class_ids),
        seeds=tuple(seeds),
        elapsed_s=elapsed,
    )


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)


def _grid(images: list[np.ndarray], ncol: int) -> np.ndarray:
    """(H', W', C) uint8 mosaic of (H, W, C) images, row-major, ``ncol`` per row."""
    h, w, c = images[0].shape
    nrow = math.ceil(len(images) / ncol)
    grid = np.zeros((nrow * h, ncol * w, c), dtype=np.uint8)
    for k, image in enumerate(images):
        r, col = divmod(k, ncol)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = image
    return grid


def _manifest(
    cfg: SampleConfig,
    model: LoadedModel,
    class_ids: list[int],
    seeds: list[int],
    paths: list[Path],
    grid_path: Path,
    elapsed: float,
) -> dict[str, Any]:
    from gmflow import __version__
    from gmflow.flow import default_num_substeps

    solver, order = SOLVERS[cfg.solver]
    substeps = cfg.num_substeps
    if solver == "gm-ode" and substeps is None:
        substeps = default_num_substeps(cfg.num_steps)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    return {
        "format": "gmflow-samples/1",
        "settings": settings,
        "sampler": {
            "solver": solver,
            "order": order,
            "num_steps": cfg.num_steps,
            "num_substeps": substeps if solver == "gm-ode" else 1,
            "guidance_scale": cfg.guidance_scale,
            "guidance_mode": cfg.guidance_mode,
            "orthogonal_guidance": cfg.orthogonal,
            "guidance_interval": cfg.guidance_interval,
            "gm2_coefs": list(cfg.gm2_coefs) if order == 2 else None,
            "gm2_correction_steps": cfg.gm2_correction_steps if order == 2 else None,
            "shift": model.shift if cfg.shift is None else cfg.shift,
            "sde_h": cfg.sde_h if solver == "ddpm" else None,
            "null_class_id": model.num_classes,
            "spectral_sampling": solver == "gm-sde" and model.spectrum_net is not None,
            "in_loop_noise": "one generator per sample" if solver in STOCHASTIC else "none",
        },
        "model": {
            "source": model.source,
            "num_classes": model.num_classes,
            "in_channels": model.in_channels,
            "sample_size": model.sample_size,
            "vae": None if model.vae is None else model.vae.name,
        },
        "grid": grid_path.name,
        "samples": [
            {
                "index": i,
                "file": p.name,
                "class_id": c,
                "class_name": model.labels.name(c),
                "seed": s,
            }
            for i, (p, c, s) in enumerate(zip(paths, class_ids, seeds, strict=True))
        ],
        "versions": {"gmflow": __version__, "torch": torch.__version__},
        "elapsed_s": round(elapsed, 3),
    }
