"""``train(cfg, run_dir)``: the whole GMFlow training loop, top-down (spec 4).

One code path for the 2-D toy on a laptop and GM-DiT on many GPUs: single process or torchrun
(DDP, nccl on GPU, gloo on CPU), gradient accumulation, bf16 autocast on GPU, EMA, atomic
checkpoints every N steps with exact resume (weights, optimiser, step, RNG of every rank, data
position), metrics.jsonl + TensorBoard, and a progress callback for the CLI.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gmflow.config import dump_recipe, to_dict
from gmflow.errors import ConfigError, DivergenceError
from gmflow.run_config import RunConfig
from gmflow.training import checkpoint as ckpt
from gmflow.training.build import build_objective
from gmflow.training.data import build_batches
from gmflow.training.distributed import DistInfo, barrier, cleanup_distributed, init_distributed
from gmflow.training.ema import EMA, EMASchedule
from gmflow.training.logs import MetricsLogger
from gmflow.training.online_eval import prepare_online_eval
from gmflow.training.optim import build_optimizer, lr_at
from gmflow.training.validation import load_validation_vae, save_validation_grid

__all__ = ["TrainResult", "ProgressFn", "train"]

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, dict[str, float]], None]
"""progress(step, max_steps, metrics) — called on rank 0 after every step."""


@dataclass(frozen=True)
class TrainResult:
    """What a finished (or stopped) run produced."""

    run_dir: Path
    final_step: int
    last_checkpoint: Path | None
    final_loss: float


def _check_world(cfg: RunConfig, dist: DistInfo) -> None:
    expected = cfg.world_size()
    if dist.world_size != expected:
        t = cfg.train
        suggested = max(1, t.global_batch_size // (t.batch_size_per_device * dist.world_size))
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} = batch_size_per_device "
            f"{t.batch_size_per_device} x grad_accum_steps {t.grad_accum_steps} x world size "
            f"needs {expected} processes, but this run has {dist.world_size}; change "
            f"train.grad_accum_steps or train.batch_size_per_device (e.g. --set "
            f"train.grad_accum_steps={suggested})"
        )
    if cfg.train.device == "cuda" and dist.device.type != "cuda":
        raise ConfigError(
            "train.device='cuda' but CUDA is not available; use --set train.device=cpu"
        )
    if cfg.train.compile and dist.device.type != "cuda":
        raise ConfigError("train.compile=true is a GPU option; set train.compile=false on CPU")
    if cfg.train.tf32 and dist.device.type != "cuda":
        raise ConfigError(
            "train.tf32=true is a GPU option (TF32 tensor cores); set it false on CPU"
        )


def ema_schedule(cfg: RunConfig) -> EMASchedule:
    """The EMA schedule of a recipe (the rampup schedule counts images of the global batch)."""
    e = cfg.ema
    kind = "constant" if e.kind == "none" else e.kind
    return EMASchedule(
        kind=kind,
        ema_kimg=e.ema_kimg,
        rampup=e.rampup,
        batch_size=cfg.train.global_batch_size,
        gamma=e.gamma,
        beta=e.beta,
    )


def _autocast(cfg: RunConfig, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on GPU for precision 'bf16', and for 'auto' where the GPU supports bf16."""
    precision = cfg.train.precision
    if device.type == "cuda" and (
        precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported())
    ):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def tf32_mode(enabled: bool, device: torch.device) -> Iterator[None]:
    """Allow TF32 matmuls and cuDNN convolutions inside, on CUDA only; restore the flags after."""
    if not enabled or device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    progress: ProgressFn | None = None,
    stop_after: int | None = None,
    eval_extractor: Any = None,
) -> TrainResult:
    """Train (or resume) a GMFlow model described by ``cfg`` in ``run_dir``.

    Resumes automatically from the newest complete checkpoint in ``run_dir/checkpoints``. An
    interrupted run continues exactly as if it had not stopped (same weights bit for bit on CPU).

    Args:
        cfg: the resolved recipe.
        run_dir: the run folder (config.yaml, checkpoints/, metrics.jsonl, tensorboard/, samples/).
        progress: optional callback for the CLI's progress bar (rank 0 only).
        stop_after: stop (after checkpointing) once this many steps are done in total; for tests
            and time-boxed jobs. None runs to ``cfg.train.max_steps``.
        eval_extractor: a feature extractor for ``online_eval`` instead of torch-fidelity's
            Inception (tests; see :func:`gmflow.training.online_eval.prepare_online_eval`).

    Returns:
        A :class:`TrainResult`.
    """
    run_dir = Path(run_dir)
    dist = init_distributed(cfg.train.device)
    try:
        with tf32_mode(cfg.train.tf32, dist.device):
            return _train(cfg, run_dir, dist, progress, stop_after, eval_extractor)
    finally:
        cleanup_distributed()


def _train(
    cfg: RunConfig,
    run_dir: Path,
    dist: DistInfo,
    progress: ProgressFn | None,
    stop_after: int | None,
    eval_extractor: Any,
) -> TrainResult:
    # ===== Set-up: checks, config provenance, model, optimiser, data =====
    _check_world(cfg, dist)
    device = dist.device
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_recipe(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.train.seed + dist.rank)
    objective = build_objective(cfg).to(device)
    data = build_batches(cfg, dist)  # validates shards against the model before step 0
    online_eval = prepare_online_eval(cfg, run_dir, dist, extractor=eval_extractor)
    val_vae = None
    if dist.is_main:  # before step 0, and without touching the training RNG streams
        if online_eval is not None and cfg.validation.vae == cfg.online_eval.vae:
            val_vae = online_eval.vae  # the same decoder: load it once
        else:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                val_vae = load_validation_vae(cfg, device)
    optimizer = build_optimizer(objective, cfg.optim, device)
    ema = EMA(objective, ema_schedule(cfg)) if cfg.ema.kind != "none" else None

    # ===== Resume =====
    start_step = 0
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is not None:
        state = ckpt.load_checkpoint(latest, rank=dist.rank)
        objective.load_state_dict(state["model"])
        optimizer.load_state_dict(state["state"]["optimizer"])
        if ema is not None and state["ema"] is not None:
            ema.load_state_dict(state["ema"])
        start_step = int(state["state"]["step"])
        if int(state["state"].get("world_size", 1)) != dist.world_size:
            raise ConfigError(
                f"checkpoint {latest} was written by {state['state']['world_size']} processes "
                "but this "
                f"run has {dist.world_size}; resume with the same number of processes"
            )
        data.load_state_dict(state["state"]["data"][dist.rank])
        if state["rng"] is not None:
            ckpt.set_rng_state(state["rng"])
        logger.info("resumed from %s at step %d", latest, start_step)
    model: nn.Module = objective
    if dist.distributed:
        model = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.train.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    metrics_log = MetricsLogger(
        run_dir,
        enabled=dist.is_main,
        resume_step=start_step,
        use_tensorboard=cfg.train.use_tensorboard,
    )

    # ===== Loop =====
    end_step = cfg.train.max_steps if stop_after is None else min(stop_after, cfg.train.max_steps)
    accum = cfg.train.grad_accum_steps
    consecutive_skips = 0
    last_ckpt = latest
    loss_value = math.nan
    window: list[dict[str, float]] = []
    step_seconds = 0.0
    for step in range(start_step, end_step):
        tick = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg.optim, step)
        stats: dict[str, float] = {}
        for micro in range(accum):
            x0, labels = data.next_batch()
            sync = (
                contextlib.nullcontext()
                if micro == accum - 1 or not dist.distributed
                else model.no_sync()
            )
            with sync:
                with _autocast(cfg, device):
                    out = model(
                        x0.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                    )
                (out["loss"] / accum).backward()
            for k, v in out["stats"].items():
                stats[k] = stats.get(k, 0.0) + v / accum

        # gradient clipping (from a given step) and non-finite gradient skipping
        clip = (
            cfg.optim.grad_clip
            if (cfg.optim.grad_clip and step >= cfg.optim.grad_clip_from_step)
            else math.inf
        )
        grad_norm = float(torch.nn.utils.clip_grad_norm_(objective.parameters(), clip))
        if math.isfinite(grad_norm):
            optimizer.step()
            consecutive_skips = 0
        else:
            consecutive_skips += 1
            logger.warning("step %d: non-finite gradient norm, step skipped", step)
            if consecutive_skips >= cfg.optim.max_consecutive_skips:
                raise DivergenceError(
                    f"{consecutive_skips} consecutive steps had non-finite gradients (last loss "
                    f"{stats.get('loss', math.nan)}); lower optim.lr or check the data",
                    step=step,
                )
        optimizer.zero_grad(set_to_none=True)
        beta = ema.update(objective, step) if ema is not None else math.nan
        done = step + 1
        loss_value = stats.get("loss", math.nan)

        # ===== Logs, progress, validation, checkpoints =====
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_seconds += time.perf_counter() - tick
        window.append({**stats, "grad_norm": grad_norm})
        if dist.is_main and progress is not None:
            progress(done, end_step, {"loss": loss_value, "grad_norm": grad_norm})
        if done % cfg.train.log_every == 0 or done == end_step:
            keys = sorted({k for w in window for k in w})
            row = {
                k: sum(w[k] for w in window if k in w) / sum(k in w for w in window) for k in keys
            }
            row |= {
                "lr": optimizer.param_groups[0]["lr"],
                "ema_beta": beta,
                "samples_per_s": len(window)
                * cfg.train.global_batch_size
                / max(step_seconds, 1e-9),
                "skipped_steps": consecutive_skips,
            }
            metrics_log.log(done, row)
            window, step_seconds = [], 0.0
        if cfg.validation.every and done % cfg.validation.every == 0 and dist.is_main:
            save_validation_grid(cfg, objective, ema, run_dir, done, device, metrics_log, val_vae)
        if online_eval is not None and done % cfg.online_eval.every == 0:
            eval_row = online_eval(objective, ema, done)  # every rank samples its share
            if eval_row is not None:
                metrics_log.log(done, eval_row)
        if (
            done % cfg.train.checkpoint_every == 0
            or done == end_step
            or done in cfg.train.checkpoint_milestones
        ):
            last_ckpt = _save(cfg, run_dir, done, objective, ema, optimizer, data, dist)

    metrics_log.close()
    return TrainResult(
        run_dir=run_dir, final_step=end_step, last_checkpoint=last_ckpt, final_loss=loss_value
    )


def _save(
    cfg: RunConfig,
    run_dir: Path,
    step: int,
    objective: nn.Module,
    ema: EMA | None,
    optimizer: torch.optim.Optimizer,
    data: Any,
    dist: DistInfo,
) -> Path:
    data_states = [data.state_dict()]
    if dist.distributed:
        gathered: list[Any] = [None] * dist.world_size
        torch.distributed.all_gather_object(gathered, data_states[0])
        data_states = gathered
    path = ckpt.save_checkpoint(
        run_dir,
        step,
        model_state=objective.state_dict(),
        ema_state=ema.state_dict() if ema is not None else None,
        train_state={
            "optimizer": optimizer.state_dict(),
            "data": data_states,
            "config": to_dict(cfg),
        },
        rank=dist.rank,
        world_size=dist.world_size,
        barrier=barrier,
    )
    if dist.is_main:
        ckpt.prune_checkpoints(run_dir, cfg.train.keep_last, set(cfg.train.checkpoint_milestones))
    barrier()
    return path
