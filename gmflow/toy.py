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
recipes/toy_checkerboard_k64.yaml), the same file ``gmflow train`` reads.

Outputs in ``out_dir``: ``config.yaml`` (the recipe), ``metrics.json``, ``report.md``,
``samples.png`` (histograms, rows solvers × columns NFE), ``loss.png`` and the EMA weights of both
models (safetensors).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import yaml
from torch import Tensor

from gmflow.config import apply_overrides, dump_recipe, from_dict, parse_override, to_dict
from gmflow.errors import ConfigError
from gmflow.run_config import (
    BASELINE_SOLVERS,
    GM_SOLVERS,
    DataConfig,
    EMAConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ToyBaselineConfig,
    ToyEvalConfig,
    ToySectionConfig,
    TrainConfig,
    ValidationConfig,
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

# ---- configuration ----
# ``gmflow toy`` reads a training recipe (RunConfig, recipes/toy_checkerboard_k64.yaml) with an
# optional ``toy:`` section; :func:`toy_config_from_run` maps it onto the resolved ToyConfig below
# that the experiment runs on, and :func:`toy_run_config` maps back. The defaults of ToyConfig are
# the values of recipes/toy_checkerboard_k64.yaml (tests/test_toy.py checks it).


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
class ToyConfig:
    """The resolved ``gmflow toy`` experiment that :func:`run_toy` runs on.

    Users write the experiment as a training recipe (:class:`~gmflow.run_config.RunConfig` with a
    ``toy:`` section, recipes/toy_checkerboard_k64.yaml); :func:`toy_config_from_run` maps it here.
    The defaults are that recipe's values and finish in minutes on 2 CPU cores.
    """

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


# ---- the recipe <-> ToyConfig ----

# Old `gmflow toy` recipe keys (before the toy recipe became a training recipe) -> the new keys.
_OLD_TOY_KEYS = {
    "train.iters": "train.max_steps",
    "train.batch_size": "train.batch_size_per_device and train.global_batch_size (equal)",
    "train.lr": "optim.lr",
    "train.weight_decay": "optim.weight_decay",
    "train.betas": "optim.betas",
    "train.warmup_steps": "optim.warmup_steps",
    "train.warmup_start_ratio": "optim.warmup_start_ratio",
    "train.trans_ratio": "loss.trans_ratio",
    "train.loss_scale": "loss.loss_scale",
    "train.ema": "ema.kind",
    "train.ema_gamma": "ema.gamma",
}


def _new_key(old: str) -> str | None:
    """The new key of an old `gmflow toy` recipe key, None if ``old`` is not one."""
    head = old.split(".", 1)[0]
    if head in ("baseline", "eval"):
        return f"toy.{old}"
    return _OLD_TOY_KEYS.get(old)


def toy_run_config(cfg: ToyConfig | None = None) -> RunConfig:
    """The training recipe (with its ``toy:`` section) of an experiment.

    Args:
        cfg: the experiment; None: the defaults, i.e. exactly recipes/toy_checkerboard_k64.yaml
            (what ``gmflow toy`` runs without ``--recipe``).

    Returns:
        A RunConfig that :func:`toy_config_from_run` maps back to ``cfg``. The settings that only
        ``gmflow train`` reads (validation grid, checkpoints, logs) are those of the recipe file.
    """
    cfg = ToyConfig() if cfg is None else cfg
    m, t = cfg.model, cfg.train
    return RunConfig(
        model=ModelConfig(
            arch="mlp2d",
            num_gaussians=m.num_gaussians,
            in_channels=2,
            sample_size=1,
            hidden_dim=m.hidden_dim,
            num_layers=m.num_layers,
            use_spectrum_net=False,
        ),
        data=DataConfig(kind="checkerboard", label_dropout=0.0),
        loss=LossConfig(
            timesteps="uniform", shift=1.0, trans_ratio=t.trans_ratio, loss_scale=t.loss_scale
        ),
        optim=OptimConfig(
            kind="adamw",
            lr=t.lr,
            betas=t.betas,
            weight_decay=t.weight_decay,
            warmup_steps=t.warmup_steps,
            warmup_start_ratio=t.warmup_start_ratio,
            grad_clip=None,
            grad_clip_from_step=0,
        ),
        ema=EMAConfig(kind=t.ema, gamma=t.ema_gamma),
        validation=ValidationConfig(every=500),
        train=TrainConfig(
            max_steps=t.iters,
            global_batch_size=t.batch_size,
            batch_size_per_device=t.batch_size,
            grad_accum_steps=1,
            seed=t.seed,
            device=t.device,
            precision=t.precision,
            checkpoint_every=500,
            checkpoint_milestones=(),
            keep_last=2,
            log_every=50,
        ),
        toy=ToySectionConfig(baseline=cfg.baseline, eval=cfg.eval),
    )


def toy_config_from_run(run: RunConfig) -> ToyConfig:
    """Map a training recipe (and its optional ``toy:`` section) onto the experiment.

    ``model.num_gaussians / hidden_dim / num_layers``, ``optim.lr / betas / weight_decay /
    warmup_steps / warmup_start_ratio``, ``loss.trans_ratio / loss_scale``, ``ema.kind / gamma`` and
    ``train.max_steps / batch_size_per_device / seed / device / precision`` set the GMFlow training
    (the baseline shares them except for ``toy.baseline``); ``toy.eval`` is the grid. Settings only
    the general trainer uses (validation, checkpoints, logs, clipping from a step, the GM-DiT model
    fields) are ignored. ``train.device='auto'`` is cuda when available, else cpu.

    Raises:
        ConfigError: a setting the toy cannot honour (not mlp2d on the checkerboard, other
            timesteps, optimiser, clipping, EMA, or a global batch other than the per-device one).
    """
    m, lo, o, e, t = run.model, run.loss, run.optim, run.ema, run.train
    problems = []
    if m.arch != "mlp2d":
        problems.append(
            f"model.arch must be 'mlp2d' (the 2-D MLP), got {m.arch!r}; GM-DiT recipes run with "
            "`gmflow train`"
        )
    if run.data.kind != "checkerboard":
        problems.append(f"data.kind must be 'checkerboard', got {run.data.kind!r}")
    if m.constant_logstd is not None:
        problems.append(
            "model.constant_logstd must be null (GMFlow learns its std; the baseline's fixed std "
            "is toy.baseline.constant_logstd)"
        )
    if lo.timesteps != "uniform" or lo.shift != 1.0:
        problems.append(
            f"the toy draws sigma ~ U(0, 1]: loss.timesteps must be 'uniform' (got "
            f"{lo.timesteps!r}) and loss.shift 1 (got {lo.shift})"
        )
    if o.kind != "adamw":
        problems.append(f"optim.kind must be 'adamw', got {o.kind!r}")
    if o.grad_clip is not None:
        problems.append(f"optim.grad_clip must be null (the toy does not clip), got {o.grad_clip}")
    if e.kind not in ("karras", "none"):
        problems.append(f"ema.kind must be 'karras' or 'none', got {e.kind!r}")
    if t.global_batch_size != t.batch_size_per_device:
        problems.append(
            f"train.global_batch_size ({t.global_batch_size}) must equal "
            f"train.batch_size_per_device ({t.batch_size_per_device}): the toy trains on one "
            "device without accumulation (--batch-size sets both)"
        )
    if problems:
        raise ConfigError("gmflow toy cannot run this recipe: " + "; ".join(problems))
    device = t.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    toy = run.toy if run.toy is not None else ToySectionConfig()
    try:
        return ToyConfig(
            model=ToyModelConfig(
                num_gaussians=m.num_gaussians, hidden_dim=m.hidden_dim, num_layers=m.num_layers
            ),
            train=ToyTrainConfig(
                iters=t.max_steps,
                batch_size=t.batch_size_per_device,
                lr=o.lr,
                weight_decay=o.weight_decay,
                betas=o.betas,
                warmup_steps=o.warmup_steps,
                warmup_start_ratio=o.warmup_start_ratio,
                trans_ratio=lo.trans_ratio,
                loss_scale=lo.loss_scale,
                ema="karras" if e.kind == "karras" else "none",
                ema_gamma=e.gamma,
                precision=t.precision,
                seed=t.seed,
                device=device,
            ),
            baseline=toy.baseline,
            eval=toy.eval,
        )
    except ValueError as err:
        raise ConfigError(f"gmflow toy cannot run this recipe: {err}") from None


def _reject_old_keys(keys: list[str], where: str) -> None:
    old = [(k, _new_key(k)) for k in keys if _new_key(k) is not None]
    if old:
        renames = ", ".join(f"{k} -> {new}" for k, new in old)
        raise ConfigError(
            f"{where}: old `gmflow toy` recipe keys. gmflow toy now reads a training recipe "
            "(the schema of `gmflow train`) with an optional toy: section holding the baseline "
            f"and the evaluation grid. Rename {renames}. To convert a recipe file, start from "
            "recipes/toy_checkerboard_k64.yaml (it also sets model.arch: mlp2d, data.kind: "
            "checkerboard, loss.timesteps: uniform, optim.grad_clip: null) and move your values "
            "there."
        )


def _dotted_keys(data: Any, prefix: str = "") -> list[str]:
    if not isinstance(data, dict):
        return [prefix] if prefix else []
    keys = []
    for name, value in data.items():
        dotted = f"{prefix}.{name}" if prefix else str(name)
        keys += _dotted_keys(value, dotted) if name in ("train", "baseline", "eval") else [dotted]
    return keys


def load_toy_recipe(
    path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()
) -> RunConfig:
    """Load a ``gmflow toy`` recipe: a training recipe with an optional ``toy:`` section.

    Args:
        path: the YAML recipe; None: the built-in defaults (= recipes/toy_checkerboard_k64.yaml).
        overrides: ``--set`` items in the recipe's keys, e.g. ``optim.lr=5e-4``,
            ``toy.eval.nfes=[1,2]``.

    Returns:
        The RunConfig; :func:`toy_config_from_run` gives the experiment.

    Raises:
        ConfigError: a missing or invalid file, an unknown key, or a key of the old toy schema
            (``baseline:``, ``eval:``, ``train.iters``, ...), whose message names the new keys.
    """
    for text in overrides:
        key, _ = parse_override(text)
        _reject_old_keys([".".join(key)], f"--set {text}")
    if path is None:
        return apply_overrides(toy_run_config(), overrides)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe '{path}' does not exist; pass the path of a YAML recipe file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    _reject_old_keys(_dotted_keys(data), str(path))
    cfg = from_dict(data, RunConfig, source=str(path))
    return apply_overrides(cfg, overrides, source=f"{path} with --set")


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
