"""Results of a sweep: ``results.jsonl``, best-FID / best-precision summary, plots, ADM ``.npz``.

* ``results.jsonl``: one JSON object per sweep point (solver x steps x guidance) with every setting,
  every metric (``fid``, ``is``, ``is_std``, ``precision``, ``recall``, ``kid``, ``kid_std`` when
  computed), the reference and its fingerprint, the feature extractor id, timings and the package
  versions (torch, torch-fidelity, gmflow, numpy).
* ``summary.md`` / ``summary.json``: per solver and step count, the best FID and the best
  precision over the guidance scales, with the other metrics at those scales (the paper reports
  both, spec 14); :func:`summarize` returns the same rows for the CLI's table.
* ``fid_vs_guidance.png``, ``precision_vs_guidance.png``, ``precision_recall.png``.
* ``npz/<point>.npz``: ``arr_0`` uint8 (N, H, W, 3) and ``arr_1`` labels (N,), the layout of the
  ADM evaluator (``evaluator.py REF_BATCH SAMPLE_BATCH``) for cross-checking with TensorFlow.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "METRIC_KEYS",
    "SummaryRow",
    "package_versions",
    "summarize",
    "summary_markdown",
    "write_results",
    "plot_sweep",
    "write_adm_npz",
]

METRIC_KEYS = ("fid", "is", "is_std", "precision", "recall", "kid", "kid_std")


def package_versions() -> dict[str, str]:
    """Versions of what the numbers depend on."""
    import torch

    from gmflow import __version__
    from gmflow.evaluation.fid import torch_fidelity_version

    return {
        "gmflow": __version__,
        "torch": torch.__version__,
        "torch_fidelity": torch_fidelity_version(),
        "numpy": np.__version__,
    }


@dataclass(frozen=True)
class SummaryRow:
    """Best scores of one solver at one step count over the guidance sweep."""

    solver: str
    num_steps: int
    num_substeps: int
    best_fid: float
    best_fid_guidance: float
    is_at_best_fid: float | None
    precision_at_best_fid: float | None
    recall_at_best_fid: float | None
    best_precision: float | None  # None when the reference has no features
    best_precision_guidance: float | None
    fid_at_best_precision: float | None
    recall_at_best_precision: float | None


def summarize(rows: Sequence[dict[str, Any]]) -> list[SummaryRow]:
    """Best FID (lowest) and best precision (highest) per (solver, steps), in first-seen order."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["solver"], r["num_steps"]), []).append(r)
    out = []
    for (solver, n), group in groups.items():
        bf = min(group, key=lambda r: r["fid"])
        with_p = [r for r in group if r.get("precision") is not None]
        bp = max(with_p, key=lambda r: r["precision"]) if with_p else None
        out.append(
            SummaryRow(
                solver=solver,
                num_steps=n,
                num_substeps=bf["num_substeps"],
                best_fid=bf["fid"],
                best_fid_guidance=bf["guidance_scale"],
                is_at_best_fid=bf.get("is"),
                precision_at_best_fid=bf.get("precision"),
                recall_at_best_fid=bf.get("recall"),
                best_precision=None if bp is None else bp["precision"],
                best_precision_guidance=None if bp is None else bp["guidance_scale"],
                fid_at_best_precision=None if bp is None else bp["fid"],
                recall_at_best_precision=None if bp is None else bp.get("recall"),
            )
        )
    return out


def _fmt(v: float | None, digits: int) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def summary_markdown(summary: Sequence[SummaryRow], meta: dict[str, Any]) -> str:
    """``summary.md``: the protocol in words, then one table row per solver and step count."""
    lines = [
        "# GMFlow guidance sweep",
        "",
        f"- model: `{meta['model']}`",
        f"- reference: `{meta['reference']}` ({meta['reference_kind']}, "
        f"{meta['reference_images'] or 'statistics only'} images, fingerprint "
        f"`{meta['reference_fingerprint'][:16]}`)",
        f"- samples per point: {meta['num_samples']}, seed {meta['seed']}, "
        f"guidance scales: {', '.join(f'{w:g}' for w in meta['guidance_scales'])}",
        f"- feature extractor: `{meta['feature_extractor']}`",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        "",
        "| solver | steps (x sub) | best FID | w | IS | Prec. | Rec. "
        "| best Prec. | w | FID | Rec. |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        sub = f" (x{s.num_substeps})" if s.num_substeps > 1 else ""
        lines.append(
            f"| {s.solver} | {s.num_steps}{sub} | {_fmt(s.best_fid, 2)} | "
            f"{s.best_fid_guidance:g} | {_fmt(s.is_at_best_fid, 1)} | "
            f"{_fmt(s.precision_at_best_fid, 3)} | {_fmt(s.recall_at_best_fid, 3)} | "
            f"{_fmt(s.best_precision, 3)} | "
            f"{'—' if s.best_precision_guidance is None else f'{s.best_precision_guidance:g}'} | "
            f"{_fmt(s.fid_at_best_precision, 2)} | {_fmt(s.recall_at_best_precision, 3)} |"
        )
    lines += ["", "Every point: `results.jsonl`. Plots: `fid_vs_guidance.png`, "
              "`precision_vs_guidance.png`, `precision_recall.png`.", ""]  # fmt: skip
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_results(
    out_dir: Path, rows: Sequence[dict[str, Any]], meta: dict[str, Any]
) -> tuple[list[SummaryRow], dict[str, Path]]:
    """Write results.jsonl, summary.md, summary.json and the plots; returns (summary, paths)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "results": out_dir / "results.jsonl",
        "summary_md": out_dir / "summary.md",
        "summary_json": out_dir / "summary.json",
    }
    _write_atomic(paths["results"], "".join(json.dumps(r) + "\n" for r in rows))
    summary = summarize(rows)
    _write_atomic(paths["summary_md"], summary_markdown(summary, meta))
    _write_atomic(
        paths["summary_json"],
        json.dumps({"meta": meta, "best": [asdict(s) for s in summary]}, indent=1) + "\n",
    )
    paths.update(plot_sweep(rows, out_dir))
    return summary, paths


def plot_sweep(rows: Sequence[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
    """FID and precision against w (one line per solver and step count), precision vs recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(f"{r['solver']} N={r['num_steps']}", []).append(r)
    for g in groups.values():
        g.sort(key=lambda r: r["guidance_scale"])
    paths = {}
    has_prc = any(r.get("precision") is not None for r in rows)
    plots = [("fid", "FID", "fid_vs_guidance.png")]
    if has_prc:
        plots.append(("precision", "precision", "precision_vs_guidance.png"))
    for key, label, name in plots:
        fig, ax = plt.subplots(figsize=(6, 4))
        for legend, g in groups.items():
            pts = [(r["guidance_scale"], r[key]) for r in g if r.get(key) is not None]
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=legend)
        cfg = any(r.get("guidance_mode") == "cfg" for r in rows)
        ax.set_xlabel("CFG scale g" if cfg else "guidance scale w")
        ax.set_ylabel(label)
        if key == "fid" and all(r["fid"] > 0 for r in rows):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths[key + "_plot"] = out_dir / name
        fig.savefig(paths[key + "_plot"], dpi=120)
        plt.close(fig)
    if has_prc:
        fig, ax = plt.subplots(figsize=(5, 4))
        for legend, g in groups.items():
            pts = [(r["recall"], r["precision"]) for r in g if r.get("precision") is not None]
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=legend)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths["pr_plot"] = out_dir / "precision_recall.png"
        fig.savefig(paths["pr_plot"], dpi=120)
        plt.close(fig)
    return paths


def write_adm_npz(
    path: Path, batches: Iterable[tuple[NDArray[np.uint8], NDArray[np.int64]]]
) -> Path:
    """``arr_0`` uint8 (N, H, W, 3), ``arr_1`` int64 (N,) labels; written atomically."""
    images, labels = [], []
    for im, lab in batches:
        images.append(im)
        labels.append(lab)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, arr_0=np.concatenate(images), arr_1=np.concatenate(labels))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
