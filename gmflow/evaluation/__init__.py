"""``gmflow evaluate``: FID, IS, precision and recall over solvers x steps x guidance scales.

:func:`evaluate` runs the protocol of spec 11.2-11.3 end to end and resumably:

1. checks, before any sampling: the reference exists and is readable, the Inception weights are
   available (torch-fidelity's cache, ``inception_weights`` or a download), and an existing
   ``out_dir`` was made with the same sample settings (``sweep.json``);
2. computes the reference features once (cached under ``out_dir/reference/`` by fingerprint);
3. for each sweep point, writes the missing uint8 shards of ``num_samples`` samples
   (:mod:`gmflow.evaluation.samples`; under torchrun every rank writes its share), then on rank 0
   extracts the features and computes the metrics into ``points/<id>/metrics.json``;
4. writes ``results.jsonl``, ``summary.md``/``.json``, plots and ADM ``.npz`` files
   (:mod:`gmflow.evaluation.report`).

A rerun skips points whose ``metrics.json`` matches the reference and extractor, and shards that
exist, so an interrupted sweep loses at most one shard per process.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gmflow.errors import ConfigError
from gmflow.evaluation.config import (
    EVAL_SOLVERS,
    PAPER_GUIDANCE_SCALES,
    EvalConfig,
    SweepPoint,
    sweep_points,
)

__all__ = [
    "evaluate",
    "EvalConfig",
    "EvalResult",
    "SweepPoint",
    "PAPER_GUIDANCE_SCALES",
    "sweep_points",
]

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): stage is "reference" or "<point id>: sampling|features"."""


@dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate` produced (rows and summary on rank 0 only; empty elsewhere)."""

    out_dir: Path
    rows: tuple[dict[str, Any], ...]  # one per sweep point, as in results.jsonl
    summary: tuple[Any, ...]  # gmflow.evaluation.report.SummaryRow per (solver, steps)
    paths: dict[str, Path]  # results, summary_md, summary_json, plots, npz_<point>
    timings: dict[str, float] = field(default_factory=dict)  # seconds, this process
    shards_written: int = 0  # by this process in this call
    shards_skipped: int = 0  # already on disk


def _check_sweep(cfg: EvalConfig) -> None:
    """Refuse an out_dir written with other sample settings; record ours (``sweep.json``)."""
    from gmflow.data.manifest import write_json_atomic

    path = cfg.out_dir / "sweep.json"
    ours = cfg.sample_settings()
    if path.is_file():
        theirs = json.loads(path.read_text())
        diff = {
            k: (theirs[k], ours[k]) for k in ours.keys() & theirs.keys() if theirs[k] != ours[k]
        }
        if diff:
            raise ConfigError(
                f"{cfg.out_dir} holds samples made with other settings "
                + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in sorted(diff.items()))
                + "; pass another --out-dir, or the same settings to resume that sweep"
            )
        ours = {**theirs, **ours}
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, json.dumps(ours, indent=1) + "\n")


def _device(cfg: EvalConfig) -> str:
    """init_distributed's device argument; torchrun ranks use cuda:LOCAL_RANK."""
    return "auto" if cfg.device == "auto" else ("cpu" if cfg.device == "cpu" else "cuda")


def _load_model(cfg: EvalConfig, device: str) -> Any:
    from gmflow.model_loading import load_model
    from gmflow.sampling import SampleConfig

    sample_cfg = SampleConfig(
        out_dir=cfg.out_dir,
        pretrained=cfg.pretrained,
        run=cfg.run,
        class_ids=(0,),
        dtype=cfg.dtype,
        device=device,
        vae=cfg.vae,
        use_ema=cfg.use_ema,
        step=cfg.step,
        variant=cfg.variant,
    )
    return load_model(sample_cfg)


def _metrics_valid(path: Path, fingerprint: str, extractor_id: str) -> bool:
    if not path.is_file():
        return False
    row = json.loads(path.read_text())
    return (
        row.get("reference_fingerprint") == fingerprint
        and row.get("feature_extractor") == extractor_id
    )


def evaluate(
    cfg: EvalConfig, *, extractor: Any = None, progress: Progress | None = None
) -> EvalResult:
    """Run the guidance sweep of ``cfg`` (see the module docstring); torchrun-aware.

    Args:
        cfg: the settings.
        extractor: a :class:`gmflow.evaluation.fid.FeatureExtractor` to use instead of
            torch-fidelity's Inception (tests); then no Inception weights are needed.
        progress: see :data:`Progress`.

    Returns:
        The rows of ``results.jsonl``, the best-FID / best-precision summary and the paths written.

    Raises:
        CheckpointError: missing model or Inception weights (before any sampling).
        DataError: an unusable reference set or a damaged shard.
        ConfigError: an ``out_dir`` written with other sample settings.
    """
    import torch.distributed

    from gmflow.config import dump_recipe
    from gmflow.evaluation.fid import InceptionFeatures, resolve_inception_weights
    from gmflow.evaluation.reference import load_reference, reference_kind
    from gmflow.evaluation.samples import generate_point, shard_specs
    from gmflow.training.distributed import barrier, init_distributed, on_main

    t_start = time.perf_counter()
    timings = dict.fromkeys(
        ("reference", "sampling", "decoding", "writing", "features", "metrics"), 0.0
    )
    was_initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    dist = init_distributed(_device(cfg))
    device = str(dist.device)
    if cfg.device.startswith("cuda:") and not dist.distributed:
        device = cfg.device
    report = progress or (lambda stage, done, total: None)

    def preflight() -> str | None:
        reference_kind(cfg.reference)
        weights = (
            None if extractor is not None else resolve_inception_weights(cfg.inception_weights)
        )
        _check_sweep(cfg)
        dump_recipe(cfg, cfg.out_dir / "eval_config.yaml")
        return None if weights is None else str(weights)

    try:
        weights = on_main(dist, preflight)
        model = _load_model(cfg, device)
        points = sweep_points(cfg)
        state: dict[str, Any] = {}

        def prepare_reference() -> list[str]:
            t0 = time.perf_counter()
            state["extractor"] = extractor or InceptionFeatures(weights, device)
            state["reference"] = load_reference(
                cfg.reference,
                state["extractor"],
                cfg.out_dir / "reference",
                batch_size=cfg.feature_batch_size,
                device=device,
                progress=lambda done: report("reference", done, 0),
            )
            timings["reference"] = time.perf_counter() - t0
            fp, xid = state["reference"].fingerprint, state["extractor"].extractor_id
            return [
                p.id
                for p in points
                if not _metrics_valid(cfg.out_dir / "points" / p.id / "metrics.json", fp, xid)
            ]

        todo = set(on_main(dist, prepare_reference))
        written = skipped = 0
        for point in points:
            if point.id not in todo:
                continue
            point_dir = cfg.out_dir / "points" / point.id
            share = sum(
                s.stop - s.start
                for s in shard_specs(cfg.num_samples, cfg.shard_size)[dist.rank :: dist.world_size]
            )
            done = 0

            def advance(n: int, stage: str = f"{point.id}: sampling", total: int = share) -> None:
                nonlocal done
                done += n
                report(stage, done, total)

            stats = generate_point(
                model, point, point_dir,
                num_samples=cfg.num_samples, shard_size=cfg.shard_size,
                batch_size=cfg.batch_size, seed=cfg.seed,
                orthogonal_guidance=cfg.orthogonal,
                guidance_interval=cfg.guidance_interval,
                rank=dist.rank, world_size=dist.world_size, progress=advance,
            )  # fmt: skip
            written, skipped = written + stats.shards_written, skipped + stats.shards_skipped
            timings["sampling"] += stats.sampling_s
            timings["decoding"] += stats.decoding_s
            timings["writing"] += stats.writing_s
            barrier()
            if dist.is_main:
                row_timing = {"sampling": stats.sampling_s, "decoding": stats.decoding_s}
                row = _point_metrics(cfg, point, point_dir, state, row_timing, device, report)
                timings["features"] += row["timing_s"]["features"]
                timings["metrics"] += row["timing_s"]["metrics"]
        barrier()
        if not dist.is_main:
            return EvalResult(cfg.out_dir, (), (), {}, timings, written, skipped)
        rows, summary, paths = _finish(cfg, points, state)
        timings["total"] = time.perf_counter() - t_start
        return EvalResult(
            cfg.out_dir, tuple(rows), tuple(summary), paths, timings, written, skipped
        )
    finally:
        if not was_initialized:
            from gmflow.training.distributed import cleanup_distributed

            cleanup_distributed()


def _point_metrics(
    cfg: EvalConfig,
    point: SweepPoint,
    point_dir: Path,
    state: dict[str, Any],
    sample_timing: dict[str, float],
    device: str,
    report: Progress,
) -> dict[str, Any]:
    """Features and metrics of one complete point; writes and returns its results row."""
    from gmflow.data.manifest import write_json_atomic
    from gmflow.evaluation.fid import compute_metrics, extract_features
    from gmflow.evaluation.report import package_versions
    from gmflow.evaluation.samples import read_point

    extractor, reference = state["extractor"], state["reference"]
    t0 = time.perf_counter()
    done = 0

    def images() -> Any:
        nonlocal done
        for batch, _ in read_point(point_dir, cfg.num_samples, cfg.shard_size):
            yield batch
            done += len(batch)
            report(f"{point.id}: features", done, cfg.num_samples)

    features = extract_features(images(), extractor, cfg.feature_batch_size)
    t1 = time.perf_counter()
    metrics = compute_metrics(
        features, reference.stats, reference.pool,
        prc_neighborhood=cfg.prc_neighborhood, use_kid=cfg.use_kid,
        kid_subset_size=cfg.kid_subset_size, device=device,
    )  # fmt: skip
    solver, order = EVAL_SOLVERS[point.solver]
    row = {
        "point": point.id,
        "solver": point.solver,
        "sampler": solver,
        "order": order,
        "num_steps": point.num_steps,
        "num_substeps": point.num_substeps,
        "guidance_scale": point.guidance_scale,
        "guidance_mode": point.guidance_mode,
        "orthogonal_guidance": cfg.orthogonal,
        "guidance_interval": None if cfg.guidance_interval is None else list(cfg.guidance_interval),
        "num_samples": cfg.num_samples,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "dtype": cfg.dtype,
        "model": cfg.pretrained if cfg.pretrained is not None else str(cfg.run),
        "reference": reference.source,
        "reference_kind": reference.kind,
        "reference_images": reference.num_images,
        "reference_fingerprint": reference.fingerprint,
        "feature_extractor": extractor.extractor_id,
        **metrics,
        "timing_s": {**sample_timing, "features": t1 - t0, "metrics": time.perf_counter() - t1},
        "versions": package_versions(),
    }
    write_json_atomic(point_dir / "metrics.json", json.dumps(row, indent=1) + "\n")
    return row


def _finish(
    cfg: EvalConfig, points: list[SweepPoint], state: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[Any], dict[str, Path]]:
    """Rank 0: results.jsonl, summary, plots, ADM .npz files; drop the shards if asked."""
    from gmflow.evaluation.report import package_versions, write_adm_npz, write_results
    from gmflow.evaluation.samples import read_point

    rows = [
        json.loads((cfg.out_dir / "points" / p.id / "metrics.json").read_text()) for p in points
    ]
    reference = state["reference"]
    meta = {
        "model": rows[0]["model"],
        "reference": reference.source,
        "reference_kind": reference.kind,
        "reference_images": reference.num_images,
        "reference_fingerprint": reference.fingerprint,
        "num_samples": cfg.num_samples,
        "seed": cfg.seed,
        "guidance_scales": list(cfg.guidance_scales),
        "feature_extractor": state["extractor"].extractor_id,
        "versions": package_versions(),
    }
    summary, paths = write_results(cfg.out_dir, rows, meta)
    if cfg.save_npz != "none":
        keep = {p.id for p in points}
        if cfg.save_npz == "best":
            keep = set()
            for s in summary:
                for r in rows:
                    if (r["solver"], r["num_steps"]) != (s.solver, s.num_steps):
                        continue
                    if r["guidance_scale"] in (s.best_fid_guidance, s.best_precision_guidance):
                        keep.add(r["point"])
        for pid in sorted(keep):
            npz = cfg.out_dir / "npz" / f"{pid}.npz"
            if not npz.is_file():
                point_dir = cfg.out_dir / "points" / pid
                if not (point_dir / "shard-000000.tar").is_file():
                    logger.warning("no samples left for %s (keep_samples was off): no .npz", pid)
                    continue
                write_adm_npz(npz, read_point(point_dir, cfg.num_samples, cfg.shard_size))
            paths[f"npz_{pid}"] = npz
    if not cfg.keep_samples:
        for p in points:
            for shard in (cfg.out_dir / "points" / p.id).glob("shard-*.tar"):
                shard.unlink()
    return rows, summary, paths
