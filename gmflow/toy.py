"""The 2-D checkerboard experiment end to end: train GMFlow and a flow-matching baseline, evaluate.

``run_toy(cfg, out_dir)`` trains a K-component GMFlow MLP with the transition loss (spec 4.3,
λ = ``loss.trans_ratio``) and a K = 1 flow-matching baseline (the same network with one component
and a constant std: the L2 flow-matching loss, spec 4.3 item 7) on the same budget, then samples
``toy.eval.num_samples`` points with every solver × NFE of the grid and scores them against the
exact density (:mod:`gmflow.data.checkerboard`):

* ``kl``: KL(true ‖ model) of a 64 × 64 histogram over [−4.2, 4.2]², p the exact bin masses,
  q = counts / in-range samples, both smoothed (x + 1e-8)/Σ;
* ``inside``: the fraction of samples in the 8 occupied squares;
* ``sw2``: sliced Wasserstein-2 to the exact distribution over 64 fixed directions;

and the noise floor, the same metrics for as many exact samples. Solver names: ``gm-sde``,
``gm-ode`` (order 1) and ``gm-sde2``, ``gm-ode2`` (order 2) on GMFlow; ``euler``, ``heun`` on the
baseline. NFE counts network evaluations: GM solvers and Euler take N = NFE steps (GM-ODE sub-steps
are analytic, no network call); Heun takes N steps with 2N − 1 evaluations (the last step is Euler),
so a budget of NFE runs N = ⌊(NFE + 1)/2⌋ steps and the grid records the evaluations it used.

The experiment is a training recipe with a ``toy:`` section (:func:`load_toy_recipe`,
recipes/toy_checkerboard_k64.yaml), the same file ``gmflow train`` reads;
:mod:`gmflow.toy_recipe` maps it onto the resolved :class:`ToyConfig` that :func:`run_toy` runs on
(its names are re-exported here).

Outputs in ``out_dir``: ``config.yaml`` (the recipe), ``metrics.json``, ``report.md``,
``samples.png`` (histograms, rows solvers × columns NFE), ``loss.png`` and the EMA weights of both
models (safetensors).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gmflow.config import dump_recipe, to_dict
from gmflow.errors import ConfigError
from gmflow.run_config import (
    BASELINE_SOLVERS,
    GM_SOLVERS,
    RunConfig,
    ToyBaselineConfig,
    ToyEvalConfig,
    ToySectionConfig,
)
from gmflow.toy_recipe import (
    ToyConfig,
    ToyModelConfig,
    ToyTrainConfig,
    load_toy_recipe,
    toy_config_from_run,
    toy_run_config,
)
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
    "ToySectionConfig",
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
    "toy_run_config",
    "toy_config_from_run",
    "load_toy_recipe",
    "run_toy",
]


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


def run_toy(
    cfg: ToyConfig | RunConfig, out_dir: str | Path, progress: ProgressFn | None = None
) -> ToyResult:
    """Train GMFlow and the K = 1 baseline, evaluate the solver × NFE grid, write every output.

    ``config.yaml`` holds the experiment as a training recipe with its ``toy:`` section, so
    ``gmflow toy --recipe OUT/config.yaml`` reruns it.

    Args:
        cfg: the experiment, or a recipe that :func:`toy_config_from_run` maps to it.
        out_dir: output folder (created).
        progress: called with a :class:`ToyProgress` during training and evaluation.

    Returns:
        The metrics and the paths written.

    Raises:
        ConfigError: CUDA requested but not available, or a recipe the toy cannot run.
        DivergenceError: a training loss became non-finite.
    """
    from safetensors.torch import save_file

    from gmflow.data.checkerboard import sample_checkerboard
    from gmflow.models.mlp2d import SigmaDenoiser
    from gmflow.toy_report import histogram_counts, write_loss_plot, write_report, write_sample_grid

    if isinstance(cfg, RunConfig):
        recipe, cfg = cfg, toy_config_from_run(cfg)
    else:
        recipe = toy_run_config(cfg)
    device = _check_device(cfg.train.device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"config": out / "config.yaml"}
    dump_recipe(recipe, files["config"])

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
