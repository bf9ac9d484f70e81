"""Files that ``gmflow toy`` writes besides metrics.json: the markdown report and the two figures.

Figures use matplotlib's Agg backend (no display needed); nothing here prints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "HIST_BINS",
    "HIST_RANGE",
    "histogram_counts",
    "write_report",
    "write_sample_grid",
    "write_loss_plot",
]

HIST_BINS = 200  # bins per axis of the sample figure (the reference visualisation uses 200)
HIST_RANGE = 4.2  # the figure shows [−4.2, 4.2]²


def histogram_counts(points: Tensor, bins: int = HIST_BINS) -> np.ndarray:
    """(bins, bins) counts of (N, 2) points over [−4.2, 4.2]²; [a, b] is x-bin a, y-bin b."""
    x = points.detach().to("cpu", torch.float64)
    x = x[torch.isfinite(x).all(-1)]
    counts, _ = torch.histogramdd(x, bins=[bins, bins], range=[-HIST_RANGE, HIST_RANGE] * 2)
    return counts.numpy()


def _table(grid: Sequence[Mapping[str, Any]], key: str, fmt: str) -> list[str]:
    solvers = list(dict.fromkeys(c["solver"] for c in grid))
    nfes = sorted({c["nfe"] for c in grid})
    cell = {(c["solver"], c["nfe"]): c for c in grid}
    lines = [
        "| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
        "|---" * (len(nfes) + 1) + "|",
    ]
    for s in solvers:
        vals = [format(cell[(s, n)][key], fmt) if (s, n) in cell else "" for n in nfes]
        lines.append(f"| {s} | " + " | ".join(vals) + " |")
    return lines


def write_report(path: Path, metrics: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """Markdown tables of the grid (KL, inside, SW2, sampling seconds), the floor and training."""
    grid, floor, train = metrics["grid"], metrics["noise_floor"], metrics["train"]
    m, t = config["model"], config["train"]
    lines = [
        "# gmflow toy: 2-D checkerboard",
        "",
        f"GMFlow K = {m['num_gaussians']} and a K = 1 flow-matching baseline, MLP width "
        f"{m['hidden_dim']} × {m['num_layers']} layers, {t['iters']} iterations of batch "
        f"{t['batch_size']} each "
        f"(AdamW lr {t['lr']}, warm-up {t['warmup_steps']}, EMA {t['ema']}, "
        f"trans_ratio {t['trans_ratio']}).",
        f"Metrics on {metrics['eval']['num_samples']:,} samples per cell. "
        "NFE = network evaluations "
        "(Heun: 2N − 1 for N steps, so an even budget uses one evaluation less).",
        "",
        "## KL(true ‖ model), 64 × 64 histogram over [−4.2, 4.2]² (lower is better)",
        "",
        *_table(grid, "kl", ".4f"),
        "",
        "## Fraction of samples inside the occupied squares (higher is better)",
        "",
        *_table(grid, "inside", ".4f"),
        "",
        "## Sliced Wasserstein-2 to the exact distribution (lower is better)",
        "",
        *_table(grid, "sw2", ".4f"),
        "",
        f"Noise floor ({metrics['eval']['num_samples']:,} exact samples): KL {floor['kl']:.4f}, "
        f"inside {floor['inside']:.4f}, SW2 {floor['sw2']:.4f}.",
        "",
        "## Sampling time (seconds per cell, all samples)",
        "",
        *_table(grid, "seconds", ".2f"),
        "",
        "## Training",
        "",
        "| model | K | seconds / iteration | final loss (mean of the last 10%) |",
        "|---|---|---|---|",
        *[
            f"| {k} | {v['num_gaussians']} | {v['seconds_per_iter']:.4f} | {v['final_loss']:.4f} |"
            for k, v in train.items()
        ],
        "",
        "Figures: `samples.png` (rows solvers, columns NFE), `loss.png`.",
        "",
    ]
    path.write_text("\n".join(lines))


def write_sample_grid(
    path: Path,
    hists: Mapping[tuple[str, int], np.ndarray],
    solvers: Sequence[str],
    nfes: Sequence[int],
) -> None:
    """PNG grid of sample histograms: one row per solver, one column per NFE, plus the exact row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ["exact", *solvers]
    fig, axes = plt.subplots(
        len(rows), len(nfes), figsize=(1.6 * len(nfes), 1.6 * len(rows)), squeeze=False
    )
    exact = hists[("exact", 0)]
    scale = 2.0 * exact[exact > 0].mean()  # twice the mean count of an occupied bin
    for r, solver in enumerate(rows):
        for c, nfe in enumerate(nfes):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            h = hists.get(("exact", 0) if solver == "exact" else (solver, nfe))
            if h is None or (solver == "exact" and c > 0):
                ax.axis("off")
                continue
            ax.imshow(np.clip(h.T / scale, 0, 1), origin="lower", cmap="viridis", vmin=0, vmax=1)
            if r <= 1:
                ax.set_title("exact samples" if r == 0 else f"NFE {nfe}", fontsize=8)
            if c == 0:
                ax.set_ylabel(solver, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_loss_plot(path: Path, losses: Mapping[str, Sequence[float]]) -> None:
    """PNG of the training losses (raw and a 50-step moving average), one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(losses), figsize=(5 * len(losses), 3.5), squeeze=False)
    for ax, (name, values) in zip(axes[0], losses.items(), strict=True):
        v = np.asarray(values, dtype=np.float64)
        ax.plot(v, lw=0.5, alpha=0.4, label="loss")
        w = min(50, len(v))
        if w > 1:
            smooth = np.convolve(v, np.ones(w) / w, mode="valid")
            ax.plot(np.arange(w - 1, len(v)), smooth, lw=1.5, label=f"{w}-step mean")
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.set_ylabel("transition loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
