"""The 2-D checkerboard experiment end to end: train GMFlow and a flow-matching baseline, evaluate.

``run_toy(cfg, out_dir)`` trains a K-component GMFlow MLP with the transition loss (spec 4.3,
λ = ``trans_ratio``) and a K = 1 flow-matching baseline (the same network with one component and a
constant std: the L2 flow-matching loss, spec 4.3 item 7) on the same budget, then samples
``eval.num_samples`` points with every solver × NFE of the grid and scores them against the exact
density (:mod:`gmflow.data.checkerboard`):

* ``kl``: KL(true ‖ model) of a 64 × 64 histogram over [−4.2, 4.2]², p the exact bin masses,
  q = counts / in-range samples, both smoothed (x + 1e-8)/Σ;
* ``inside``: the fraction of samples in the 8 occupied squares;
* ``sw2``: sliced Wasserstein-2 to the exact distribution over 64 fixed directions;

and the noise floor, the same metrics for as many exact samples. Solver names: ``gm-sde``,
``gm-ode`` (order 1) and ``gm-sde2``, ``gm-ode2`` (order 2) on GMFlow; ``euler``, ``heun`` on the
baseline. NFE counts network evaluations: GM solvers and Euler take N = NFE steps (GM-ODE sub-steps
are analytic, no network call); Heun takes N steps with 2N − 1 evaluations (the last step is Euler),
so a budget of NFE runs N = ⌊(NFE + 1)/2⌋ steps and the grid records the evaluations it used.

Outputs in ``out_dir``: ``config.yaml``, ``metrics.json``, ``report.md``, ``samples.png``
(histograms, rows solvers × columns NFE), ``loss.png`` and the EMA weights of both models
(safetensors).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from gmflow.config import dump_recipe, to_dict
from gmflow.errors import ConfigError
from gmflow.toy_train import (
    ProgressFn,
    ToyProgress,
    TrainLog,
    build_toy_model,
    toy_loss,
    train_step,
    train_toy_model,
    trunk_dtype,
    warmup_lr,
)

if TYPE_CHECKING:
    from gmflow.models.mlp2d import SigmaDenoiser

__all__ = [
    "ToyModelConfig",
    "ToyTrainConfig",
    "ToyBaselineConfig",
    "ToyEvalConfig",
    "ToyConfig",
    "ToyProgress",
    "ToyResult",
    "TrainLog",
    "GM_SOLVERS",
    "BASELINE_SOLVERS",
    "build_toy_model",
    "toy_loss",
    "train_step",
    "train_toy_model",
    "warmup_lr",
    "point_cloud_metrics",
    "sample_cell",
    "run_toy",
]

GM_SOLVERS = ("gm-sde2", "gm-ode2", "gm-sde", "gm-ode")  # evaluated on the GMFlow model
BASELINE_SOLVERS = ("euler", "heun")  # evaluated on the K = 1 flow-matching baseline


# ---- configuration (recipes/toy_checkerboard_k64.yaml holds the same values) ----


@dataclass(frozen=True, kw_only=True)
class ToyModelConfig:
    """The GMFlow MLP (spec 12.2); the baseline uses the same trunk with K = 1."""

    num_gaussians: int = 64  # K, mixture components of the GMFlow model
    hidden_dim: int = 128  # trunk width (the reference network is 512 wide)
    num_layers: int = 5  # Linear → SiLU blocks

    def __post_init__(self) -> None:
        if self.num_gaussians < 1 or self.hidden_dim < 1 or self.num_layers < 1:
            raise ValueError(
                "model.num_gaussians, model.hidden_dim and model.num_layers must be >= 1"
            )


@dataclass(frozen=True, kw_only=True)
class ToyTrainConfig:
    """The small trainer (spec 4.7): AdamW, linear warm-up, karras EMA, transition loss."""

    iters: int = 1500  # optimiser steps, per model
    batch_size: int = 4096  # points per step
    lr: float = 1e-3  # peak AdamW learning rate (reference 2e-4 over 200k iterations)
    weight_decay: float = 0.0  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.99)  # AdamW betas
    warmup_steps: int = 200  # linear warm-up from warmup_start_ratio·lr to lr
    warmup_start_ratio: float = 0.001  # lr(0) / lr
    trans_ratio: float = 0.9  # λ of the transition pair (1 = plain GM NLL)
    loss_scale: float = 2.0  # scale of the [LL] transition loss (toy: 2 = channel-summed NLL)
    ema: Literal["karras", "none"] = "karras"  # evaluation weights
    ema_gamma: float = 7.0  # karras EMA: β_i = (1 − 1/(i+1))^(γ+1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # trunk matmuls; auto: bf16 where fast
    seed: int = 0  # model init and data
    device: Literal["cpu", "cuda"] = "cpu"

    def __post_init__(self) -> None:
        if self.iters < 1 or self.batch_size < 1 or self.warmup_steps < 0:
            raise ValueError("train.iters and train.batch_size must be >= 1, warmup_steps >= 0")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if not 0 < self.trans_ratio <= 1:
            raise ValueError(f"train.trans_ratio must lie in (0, 1], got {self.trans_ratio}")


@dataclass(frozen=True, kw_only=True)
class ToyBaselineConfig:
    """How the K = 1 flow-matching baseline differs from the GMFlow model (all else is shared)."""

    trans_ratio: float = 1.0  # 1: the loss is exactly ‖u − μ‖²/2 + const (L2 flow matching)
    constant_logstd: float | None = 0.0  # fixed log s (no std head); null: learned, as GMFlow

    def __post_init__(self) -> None:
        if not 0 < self.trans_ratio <= 1:
            raise ValueError(f"baseline.trans_ratio must lie in (0, 1], got {self.trans_ratio}")


@dataclass(frozen=True, kw_only=True)
class ToyEvalConfig:
    """The evaluation grid and its metrics (issue 3 §4)."""

    num_samples: int = 100_000  # samples per grid cell (and for the noise floor)
    solvers: tuple[str, ...] = GM_SOLVERS + BASELINE_SOLVERS
    nfes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # network evaluations per sample
    gm_ode_fine_steps: int = 32  # GM-ODE sub-steps S = max(ceil(fine_steps / N), 2); paper: 128
    batch_size: int = 10_000  # points per sampler call (small chunks stay in the CPU caches)
    sw2_projections: int = 64  # directions of the sliced Wasserstein-2
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # trunk matmuls while sampling
    seed: int = 1234  # initial noise and solver noise (the same for every cell)

    def __post_init__(self) -> None:
        unknown = [s for s in self.solvers if s not in GM_SOLVERS + BASELINE_SOLVERS]
        if unknown:
            raise ValueError(
                f"eval.solvers: unknown {unknown}; valid: {list(GM_SOLVERS + BASELINE_SOLVERS)}"
            )
        if min(self.num_samples, self.batch_size, self.gm_ode_fine_steps, *self.nfes) < 1:
            raise ValueError(
                "eval.num_samples, eval.batch_size, eval.gm_ode_fine_steps and every eval.nfes "
                "must be >= 1"
            )


@dataclass(frozen=True, kw_only=True)
class ToyConfig:
    """``gmflow toy``: the whole experiment (defaults finish in minutes on 2 CPU cores)."""

    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    train: ToyTrainConfig = field(default_factory=ToyTrainConfig)
    baseline: ToyBaselineConfig = field(default_factory=ToyBaselineConfig)
    eval: ToyEvalConfig = field(default_factory=ToyEvalConfig)


@dataclass(frozen=True)
class ToyResult:
    """The outputs of :func:`run_toy`."""

    out_dir: Path
    metrics: dict[str, Any]  # the content of metrics.json
    files: dict[str, Path]  # name → path of every file written


# ---- evaluation ----


def point_cloud_metrics(x: Tensor, sw2_projections: int = 64) -> dict[str, float]:
    """``kl``, ``inside`` and ``sw2`` of (N, 2) points against the exact checkerboard."""
    from gmflow.data.checkerboard import histogram_kl, inside_fraction, sliced_wasserstein2

    return {
        "kl": histogram_kl(x),
        "inside": inside_fraction(x),
        "sw2": sliced_wasserstein2(x, num_projections=sw2_projections),
    }


def _solver_call(name: str, nfe: int) -> tuple[str, int, int, int]:
    """Grid name and NFE budget → (solver, order, num_steps, network evaluations)."""
    if name == "heun":
        steps = (nfe + 1) // 2
        return "heun", 1, steps, 2 * steps - 1
    solver, order = (name[:-1], 2) if name.endswith("2") else (name, 1)
    return solver, order, nfe, nfe


def sample_cell(
    denoiser: SigmaDenoiser, name: str, nfe: int, cfg: ToyEvalConfig, device: torch.device
) -> tuple[Tensor, dict[str, float]]:
    """Draw ``cfg.num_samples`` points with one grid solver at one NFE budget.

    The initial noise and the solver noise come from a generator seeded with ``cfg.seed``, so every
    cell starts from the same noise.

    Returns:
        (N, 2) points and ``{"num_steps", "substeps", "network_evals", "seconds"}`` (wall time of
        the sampler calls).
    """
    from gmflow.flow import sample

    solver, order, steps, evals = _solver_call(name, nfe)
    substeps = max(math.ceil(cfg.gm_ode_fine_steps / steps), 2) if solver == "gm-ode" else 1
    denoiser.net.trunk_dtype = trunk_dtype(cfg.precision, device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    noise = torch.randn(cfg.num_samples, 2, 1, 1, generator=generator, device=device)
    start = time.perf_counter()
    out = [
        sample(
            denoiser,
            chunk,
            solver=solver,
            num_steps=steps,
            num_substeps=substeps if solver == "gm-ode" else None,
            order=order,
            generator=generator,
        )
        for chunk in noise.split(cfg.batch_size)
    ]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    info = {"num_steps": steps, "substeps": substeps, "network_evals": evals, "seconds": seconds}
    return torch.cat(out).flatten(1), info


def _check_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but CUDA is not available here; use --device cpu")
    return torch.device(name)


def run_toy(cfg: ToyConfig, out_dir: str | Path, progress: ProgressFn | None = None) -> ToyResult:
    """Train GMFlow and the K = 1 baseline, evaluate the solver × NFE grid, write every output.

    Args:
        cfg: the experiment.
        out_dir: output folder (created).
        progress: called with a :class:`ToyProgress` during training and evaluation.

    Returns:
        The metrics and the paths written.

    Raises:
        ConfigError: CUDA requested but not available.
        DivergenceError: a training loss became non-finite.
    """
    from safetensors.torch import save_file

    from gmflow.data.checkerboard import sample_checkerboard
    from gmflow.models.mlp2d import SigmaDenoiser
    from gmflow.toy_report import histogram_counts, write_loss_plot, write_report, write_sample_grid

    device = _check_device(cfg.train.device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"config": out / "config.yaml"}
    dump_recipe(cfg, files["config"])

    # ---- train both models on the same budget ----
    models, logs = {}, {}
    specs = {
        "gmflow": (cfg.model.num_gaussians, None, cfg.train.trans_ratio),
        "baseline": (1, cfg.baseline.constant_logstd, cfg.baseline.trans_ratio),
    }
    if not any(s in GM_SOLVERS for s in cfg.eval.solvers):
        del specs["gmflow"]  # only the models that some solver of the grid uses are trained
    if not any(s in BASELINE_SOLVERS for s in cfg.eval.solvers):
        del specs["baseline"]
    for key, (k, logstd, trans_ratio) in specs.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            net = build_toy_model(cfg.model, num_gaussians=k, constant_logstd=logstd)
        logs[key] = train_toy_model(
            net,
            cfg.train,
            trans_ratio=trans_ratio,
            device=device,
            task=f"train {key}",
            progress=progress,
        )
        models[key] = SigmaDenoiser(net)
        files[f"{key}_weights"] = out / f"{key}_k{k}_ema.safetensors"
        save_file(
            {n: p.detach().cpu().contiguous() for n, p in net.state_dict().items()},
            str(files[f"{key}_weights"]),
        )

    # ---- evaluate the grid and the noise floor ----
    cells = [(s, n) for s in cfg.eval.solvers for n in cfg.eval.nfes]
    total = len(cells) + 1
    exact = sample_checkerboard(
        cfg.eval.num_samples, generator=torch.Generator().manual_seed(cfg.eval.seed)
    )
    noise_floor = point_cloud_metrics(exact, cfg.eval.sw2_projections)
    hists = {("exact", 0): histogram_counts(exact)}
    if progress is not None:
        progress(ToyProgress("evaluate", 1, total, detail="noise floor"))
    grid = []
    for i, (name, nfe) in enumerate(cells):
        model = models["gmflow" if name in GM_SOLVERS else "baseline"]
        points, info = sample_cell(model, name, nfe, cfg.eval, device)
        points = points.cpu()
        grid.append(
            {
                "solver": name,
                "nfe": nfe,
                **point_cloud_metrics(points, cfg.eval.sw2_projections),
                **info,
            }
        )
        hists[(name, nfe)] = histogram_counts(points)
        if progress is not None:
            progress(ToyProgress("evaluate", i + 2, total, detail=f"{name} NFE {nfe}"))

    metrics = {
        "grid": grid,
        "noise_floor": noise_floor,
        "train": {
            key: {
                "num_gaussians": specs[key][0],
                "iters": cfg.train.iters,
                "batch_size": cfg.train.batch_size,
                "seconds_per_iter": logs[key].seconds_per_iter,
                "final_loss": logs[key].final_loss,
                "last_loss": logs[key].losses[-1],
                "trunk_dtype": str(trunk_dtype(cfg.train.precision, device) or torch.float32),
            }
            for key in specs
        },
        "eval": {
            "num_samples": cfg.eval.num_samples,
            "device": str(device),
            "trunk_dtype": str(trunk_dtype(cfg.eval.precision, device) or torch.float32),
        },
    }
    files["metrics"] = out / "metrics.json"
    files["metrics"].write_text(json.dumps(metrics, indent=2) + "\n")
    files["report"] = out / "report.md"
    write_report(files["report"], metrics, to_dict(cfg))
    files["samples"] = out / "samples.png"
    write_sample_grid(files["samples"], hists, cfg.eval.solvers, cfg.eval.nfes)
    files["loss"] = out / "loss.png"
    titles = {"gmflow": f"GMFlow K = {cfg.model.num_gaussians}", "baseline": "baseline K = 1"}
    write_loss_plot(files["loss"], {titles[k]: v.losses for k, v in logs.items()})
    return ToyResult(out_dir=out, metrics=metrics, files=files)
