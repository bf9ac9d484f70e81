"""``EvalConfig``: everything ``gmflow evaluate`` needs, as a frozen dataclass (no torch import).

A sweep evaluates every combination ``solvers x steps x guidance_scales`` (a :class:`SweepPoint`
each) on ``num_samples`` images against one reference set. The defaults are the paper protocol of
spec 11.2: GM-ODE 2 at (8, 16) and (32, 4) steps x sub-steps, GM-SDE 2 at 8 and 32 steps, the 20
guidance scales of spec 6, 50,000 samples, batch 125 per device, orthogonal guidance 1.0.
It loads from a YAML recipe with ``gmflow.config.load_recipe(path, EvalConfig, overrides)``
(``recipes/eval_imagenet256_fid50k.yaml``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gmflow.errors import ConfigError
from gmflow.solver_names import (
    GUIDANCE_MODES,
    SOLVER_VARIANTS,
    STOCHASTIC_SOLVERS,
    check_guidance_interval,
    orthogonal_for,
)

__all__ = [
    "PAPER_GUIDANCE_SCALES",
    "EVAL_SOLVERS",
    "EvalConfig",
    "SweepPoint",
    "sweep_points",
    "substeps_for",
]

PAPER_GUIDANCE_SCALES: tuple[float, ...] = (
    0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.11, 0.13,
    0.16, 0.19, 0.23, 0.27, 0.33, 0.39, 0.47, 0.55, 0.65, 0.75,
)  # fmt: skip
"""The FID sweep of the paper (spec 6): ``--guidance-sweep paper``."""

EVAL_SOLVERS = SOLVER_VARIANTS  # the names of ``gmflow sample`` (gmflow.solver_names)

NOISE_SEED_OFFSET = 1000  # spec 11.2 [LL]: the noise of sample i is seeded with i + 1000
SEED_STRIDE = 10**7  # seed s draws sample i from the seeds s·10⁷ + i (+ 1000 for the noise)


def substeps_for(solver: str, num_steps: int, num_substeps: int | None) -> int:
    """Sub-steps S of a sweep point: GM-ODE gets ``num_substeps`` or the paper's default; others 1.

    The default (:func:`gmflow.flow.default_num_substeps`) reproduces the paper's (4, 8), (8, 16)
    and (32, 4) (spec 8.2, 14).
    """
    from gmflow.flow.steps import default_num_substeps

    if EVAL_SOLVERS[solver][0] != "gm-ode":
        return 1
    return num_substeps if num_substeps is not None else default_num_substeps(num_steps)


@dataclass(frozen=True, order=True)
class SweepPoint:
    """One evaluated setting: a solver at N steps (S sub-steps) and guidance scale w."""

    solver: str  # a key of EVAL_SOLVERS, e.g. "gm-ode2"
    num_steps: int  # N network evaluations
    num_substeps: int  # S (1 except GM-ODE)
    guidance_scale: float  # probabilistic guidance w in [0, 1), or the CFG scale g >= 1
    guidance_mode: str = "probabilistic"  # or "cfg" (vanilla classifier-free guidance)

    @property
    def id(self) -> str:
        """Folder name of the point, e.g. ``gm-ode2_n008_s16_w0.0400`` (sorts by N, then w);
        CFG points end in ``_cfg`` (``euler_n032_s01_w1.5000_cfg``)."""
        return (
            f"{self.solver}_n{self.num_steps:03d}_s{self.num_substeps:02d}"
            f"_w{self.guidance_scale:.4f}" + ("_cfg" if self.guidance_mode == "cfg" else "")
        )

    @property
    def stochastic(self) -> bool:
        """True when the solver draws noise inside the loop (its samples depend on batch_size)."""
        return EVAL_SOLVERS[self.solver][0] in STOCHASTIC_SOLVERS


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Settings of one guidance sweep (validated on construction; ConfigError otherwise)."""

    # --- model: exactly one of pretrained / run ---
    pretrained: str | None = None  # GMDiTPipeline folder or hub id
    run: Path | None = None  # training run folder (config.yaml + checkpoints/)
    use_ema: bool = True  # run only: EMA weights
    step: int | None = None  # run only: the checkpoint's training step; None = the latest
    vae: str | None = None  # run only: VAE hub id/folder or "none"; None = from the run's manifest
    variant: str | None = None  # pretrained only: weights variant (None = the only one there)
    dtype: Literal["fp32", "bf16"] = "fp32"  # network weights (the paper ran bf16)
    device: str = "auto"  # auto (CUDA when available), cpu, cuda; torchrun ranks use LOCAL_RANK
    # --- reference and output ---
    reference: str = ""  # ADM .npz (arr_0 images or mu/sigma), an image folder, or our shards
    out_dir: Path = Path("eval")  # samples, features cache, results.jsonl, summary.md, plots
    # --- the sweep ---
    solvers: tuple[str, ...] = ("gm-ode2", "gm-sde2")
    steps: tuple[int, ...] = (8, 32)  # N per solver
    num_substeps: int | None = None  # GM-ODE sub-steps S; None = flow.default_num_substeps(N)
    guidance_scales: tuple[float, ...] = PAPER_GUIDANCE_SCALES
    # probabilistic (spec 6, w in [0, 1)) or cfg (vanilla CFG, g >= 1: Table 4's ablation)
    guidance_mode: Literal["probabilistic", "cfg"] = "probabilistic"
    # o of the orthogonal projection; None = the mode's default (1 probabilistic, 0 cfg)
    orthogonal_guidance: float | None = None
    # (σ_a, σ_b): guide only for σ_a <= σ <= σ_b (spec 17.1 guidance_interval); None = everywhere
    guidance_interval: tuple[float, float] | None = None
    num_samples: int = 50_000  # per sweep point
    batch_size: int = 125  # images per network call and device
    shard_size: int = 1000  # images per uint8 shard (the unit of resuming and of torchrun work)
    seed: int = 0  # 0 reproduces spec 11.2 [LL]: label seed i, noise seed i + 1000
    # --- metrics ---
    inception_weights: Path | None = None  # torch-fidelity's Inception-v3 .pth (None: its cache)
    feature_batch_size: int = 100  # images per Inception call
    prc_neighborhood: int = 3  # k of precision / recall (Kynkäänniemi et al.)
    use_kid: bool = False  # also the kernel Inception distance
    kid_subset_size: int = 1000  # KID subset size (<= num_samples and the reference size)
    # --- what is kept ---
    save_npz: Literal["none", "best", "all"] = "best"  # ADM-style .npz: best FID/precision points
    keep_samples: bool = True  # keep the uint8 shards once the sweep is done

    def __post_init__(self) -> None:
        if (self.pretrained is None) == (self.run is None):
            raise ConfigError(
                "pass exactly one model: --pretrained DIR_OR_HUB_ID (a pipeline) or --run RUN_DIR "
                f"(a training run); got {'both' if self.pretrained is not None else 'neither'}"
            )
        if self.run is None and (self.vae is not None or not self.use_ema):
            raise ConfigError("vae and use_ema apply to --run only (a pipeline has its own VAE)")
        if self.step is not None and self.run is None:
            raise ConfigError("--step picks a checkpoint of a --run; a pipeline has one")
        _check_int("step", self.step, allow_none=True, minimum=0)
        if not self.reference:
            raise ConfigError(
                "no reference set: pass --reference REF, the ADM reference batch "
                "(VIRTUAL_imagenet256_labeled.npz), a folder of images, or a gmflow shard folder"
            )
        _check_unique("solvers", self.solvers)
        bad = [s for s in self.solvers if s not in EVAL_SOLVERS]
        if bad:
            raise ConfigError(f"unknown solvers {bad}; expected some of {', '.join(EVAL_SOLVERS)}")
        _check_unique("steps", self.steps)
        for n in self.steps:
            _check_int("steps", n)
        _check_int("num_substeps", self.num_substeps, allow_none=True)
        _check_unique("guidance_scales", self.guidance_scales)
        if self.guidance_mode not in GUIDANCE_MODES:
            raise ConfigError(
                f"guidance_mode {self.guidance_mode!r}; expected one of {', '.join(GUIDANCE_MODES)}"
            )
        if self.guidance_mode == "cfg":
            bad_w = [w for w in self.guidance_scales if not (math.isfinite(w) and w >= 1)]
            if bad_w:
                raise ConfigError(
                    f"guidance scales {bad_w} are below 1: with guidance_mode cfg they are CFG "
                    "scales g >= 1 (1 = off)"
                )
        else:
            bad_w = [w for w in self.guidance_scales if not 0 <= w < 1]
            if bad_w:
                raise ConfigError(
                    f"guidance scales {bad_w} are outside [0, 1): w is the probabilistic guidance "
                    "(0 = off, ~0.04 best FID, ~0.4 best precision), not a CFG scale; for CFG "
                    "set guidance_mode cfg"
                )
        if not 0 <= self.orthogonal <= 1:
            raise ConfigError(f"orthogonal_guidance must lie in [0, 1], got {self.orthogonal}")
        check_guidance_interval("guidance_interval", self.guidance_interval)
        _check_int("num_samples", self.num_samples, minimum=2)
        for name in ("batch_size", "shard_size", "feature_batch_size", "prc_neighborhood"):
            _check_int(name, getattr(self, name))
        _check_int("seed", self.seed, minimum=0)
        if self.seed * SEED_STRIDE + self.num_samples + NOISE_SEED_OFFSET >= 2**32:
            top = (2**32 - self.num_samples - NOISE_SEED_OFFSET) // SEED_STRIDE
            raise ConfigError(
                f"seed {self.seed} with num_samples {self.num_samples} needs generator seeds "
                f"beyond 2^32 (sample i uses seed x {SEED_STRIDE} + i), which torch's CPU "
                f"generator wraps around; use a seed below {top}"
            )
        if self.prc_neighborhood >= self.num_samples:
            raise ConfigError(
                f"prc_neighborhood k={self.prc_neighborhood} needs more than k samples; "
                f"num_samples is {self.num_samples}"
            )
        if self.use_kid and not 2 <= self.kid_subset_size <= self.num_samples:
            raise ConfigError(
                f"kid_subset_size {self.kid_subset_size} must lie in [2, num_samples = "
                f"{self.num_samples}]; lower it (e.g. --set kid_subset_size=100) or turn KID off"
            )
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device {self.device!r}; expected auto, cpu, cuda or cuda:N")

    @property
    def orthogonal(self) -> float:
        """The orthogonal-projection strength o in use (the mode's default when None)."""
        return float(orthogonal_for(self.guidance_mode, self.orthogonal_guidance))

    def points(self) -> list[SweepPoint]:
        """The sweep in evaluation order (:func:`sweep_points`)."""
        return sweep_points(self)

    def sample_settings(self) -> dict[str, Any]:
        """The settings that fix the pixels of every sample (checked when a sweep resumes).

        ``batch_size`` belongs here only when a stochastic solver is swept: deterministic solvers
        give the same images for any batch size, stochastic ones draw their in-loop noise per batch.
        """
        settings: dict[str, Any] = {
            "model": self.pretrained if self.pretrained is not None else str(self.run),
            "use_ema": self.use_ema,
            "step": self.step,
            "vae": self.vae,
            "variant": self.variant,
            "dtype": self.dtype,
            "num_samples": self.num_samples,
            "shard_size": self.shard_size,
            "seed": self.seed,
            "orthogonal_guidance": self.orthogonal,
        }
        # keys that change the pixels only when set: absent at their defaults, so older sweeps
        # resume
        if self.guidance_mode != "probabilistic":
            settings["guidance_mode"] = self.guidance_mode
        if self.guidance_interval is not None:
            settings["guidance_interval"] = [float(s) for s in self.guidance_interval]
        if any(p.stochastic for p in self.points()):
            settings["batch_size"] = self.batch_size
        return settings


def sweep_points(cfg: EvalConfig) -> list[SweepPoint]:
    """solvers x steps x guidance_scales, in the order given (solver-major)."""
    return [
        SweepPoint(s, n, substeps_for(s, n, cfg.num_substeps), float(w), cfg.guidance_mode)
        for s in cfg.solvers
        for n in cfg.steps
        for w in cfg.guidance_scales
    ]


def _check_int(name: str, value: Any, allow_none: bool = False, minimum: int = 1) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_unique(name: str, values: tuple[Any, ...]) -> None:
    if not values:
        raise ConfigError(f"{name} is empty; give at least one value")
    if len(set(values)) != len(values):
        raise ConfigError(f"{name} has repeated values: {list(values)}")
