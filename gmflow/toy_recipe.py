"""The ``gmflow toy`` configuration: the resolved :class:`ToyConfig` and its training recipe.

``gmflow toy`` reads the same file as ``gmflow train``: a training recipe
(:class:`~gmflow.run_config.RunConfig`, recipes/toy_checkerboard_k64.yaml) with an optional
``toy:`` section (the K = 1 baseline and the evaluation grid). This module maps between the two
views of the experiment:

* :class:`ToyConfig` (:class:`ToyModelConfig`, :class:`ToyTrainConfig` and the ``toy:`` section's
  :class:`~gmflow.run_config.ToyBaselineConfig` and :class:`~gmflow.run_config.ToyEvalConfig`) is
  the resolved experiment that :func:`gmflow.toy.run_toy` runs on; its defaults are the values of
  recipes/toy_checkerboard_k64.yaml (tests/test_toy.py checks it);
* :func:`toy_config_from_run` maps a recipe onto it, rejecting settings the toy cannot honour, and
  :func:`toy_run_config` maps back (``run_toy`` writes that recipe as ``config.yaml``);
* :func:`load_toy_recipe` loads a recipe file (or the built-in defaults) with ``--set`` overrides
  and rejects the keys of the old toy schema (``train.iters``, ``eval.*``, ...) with the list of
  their new names.

:mod:`gmflow.toy` re-exports every public name here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gmflow.config import apply_overrides, from_dict, parse_override, read_recipe_yaml
from gmflow.errors import ConfigError
from gmflow.run_config import (
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

__all__ = [
    "ToyModelConfig",
    "ToyTrainConfig",
    "ToyBaselineConfig",
    "ToyEvalConfig",
    "ToySectionConfig",
    "ToyConfig",
    "toy_run_config",
    "toy_config_from_run",
    "load_toy_recipe",
]

# ---- the resolved experiment ----


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
        # each message names the field and the recipe key it comes from (toy_config_from_run)
        checks = [
            ("iters", "train.max_steps", self.iters >= 1, ">= 1"),
            ("batch_size", "train.batch_size_per_device", self.batch_size >= 1, ">= 1"),
            ("warmup_steps", "optim.warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("lr", "optim.lr", self.lr > 0, "> 0"),
            ("trans_ratio", "loss.trans_ratio", 0 < self.trans_ratio <= 1, "in (0, 1]"),
        ]
        for name, key, ok, want in checks:
            if not ok:
                raise ValueError(
                    f"ToyTrainConfig.{name} (recipe key {key}) must be {want}, "
                    f"got {getattr(self, name)!r}"
                )


@dataclass(frozen=True, kw_only=True)
class ToyConfig:
    """The resolved ``gmflow toy`` experiment that :func:`gmflow.toy.run_toy` runs on.

    Users write the experiment as a training recipe (:class:`~gmflow.run_config.RunConfig` with a
    ``toy:`` section, recipes/toy_checkerboard_k64.yaml); :func:`toy_config_from_run` maps it here.
    The defaults are that recipe's values and finish in minutes on 2 CPU cores.
    """

    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    train: ToyTrainConfig = field(default_factory=ToyTrainConfig)
    baseline: ToyBaselineConfig = field(default_factory=ToyBaselineConfig)
    eval: ToyEvalConfig = field(default_factory=ToyEvalConfig)


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
    if t.tf32:
        problems.append("train.tf32 must be false: it is a `gmflow train` setting")
    if problems:
        raise ConfigError("gmflow toy cannot run this recipe: " + "; ".join(problems))
    device = t.device
    if device == "auto":
        import torch

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
    data = read_recipe_yaml(path)
    _reject_old_keys(_dotted_keys(data), str(path))
    cfg = from_dict(data, RunConfig, source=str(path))
    return apply_overrides(cfg, overrides, source=f"{path} with --set")
