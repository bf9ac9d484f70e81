"""Sweep the toy's tuning knobs (lr, warm-up, EMA, trans_ratio, precision, width, sub-steps).

Each named variant trains GMFlow (and, where asked, the K = 1 baseline) with ``gmflow.toy``'s
trainer and scores a few grid cells with the metrics of issue 3 §4. Meant for a GPU (minutes for
the whole sweep at the anchor budget); on a CPU pass --only to run one variant.

Variants and --set items are in the keys of ``gmflow toy --set`` (the training recipe plus its
toy: section: optim.lr, train.max_steps, loss.trans_ratio, ema.kind, toy.eval.precision, ...).

Usage:
    python benchmarks/toy_sweep.py --device cuda
    python benchmarks/toy_sweep.py --device cpu --only spec --iters 100 --num-samples 5000
    python benchmarks/toy_sweep.py --device cpu --only lr1e-3 --set optim.lr=2e-3 --iters 300
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from gmflow.models.mlp2d import SigmaDenoiser
from gmflow.toy import (
    ToyConfig,
    build_toy_model,
    load_toy_recipe,
    point_cloud_metrics,
    sample_cell,
    toy_config_from_run,
    train_toy_model,
)

ANCHOR = [
    "model.num_gaussians=64",
    "model.hidden_dim=512",
    "train.batch_size_per_device=4096",
    "train.global_batch_size=4096",
    "train.max_steps=4000",
    "toy.eval.gm_ode_fine_steps=128",
    "train.precision=fp32",
    "toy.eval.precision=fp32",
]
OFFICIAL = [
    "optim.lr=2e-4",
    "optim.betas=[0.9, 0.999]",
    "optim.warmup_steps=0",
    "loss.trans_ratio=1.0",
    "ema.kind=none",
]
VARIANTS: dict[str, list[str]] = {
    "official": ANCHOR + OFFICIAL,
    "spec": ANCHOR + ["optim.lr=2e-4", "optim.betas=[0.9, 0.999]", "optim.warmup_steps=1000"],
    "lr5e-4": ANCHOR + ["optim.lr=5e-4", "optim.warmup_steps=200"],
    "lr1e-3": ANCHOR + ["optim.lr=1e-3", "optim.warmup_steps=200"],
    "lr2e-3": ANCHOR + ["optim.lr=2e-3", "optim.warmup_steps=400"],
    "lr1e-3-nll": ANCHOR + ["optim.lr=1e-3", "optim.warmup_steps=200", "loss.trans_ratio=1.0"],
    "lr1e-3-bf16": ANCHOR + ["optim.lr=1e-3", "optim.warmup_steps=200", "train.precision=bf16"],
    "lr1e-3-tr0.8": ANCHOR + ["optim.lr=1e-3", "optim.warmup_steps=200", "loss.trans_ratio=0.8"],
    "lr1e-3-noema": ANCHOR + ["optim.lr=1e-3", "optim.warmup_steps=200", "ema.kind=none"],
    "lr1e-3-d256": ANCHOR + ["optim.lr=1e-3", "optim.warmup_steps=200", "model.hidden_dim=256"],
    "lr2e-3-d256": ANCHOR + ["optim.lr=2e-3", "optim.warmup_steps=400", "model.hidden_dim=256"],
}


def _default_variant(width: int, lr: str, precision: str) -> list[str]:
    """1500 steps with a 200-step warm-up; fp32 runs score GM-ODE with the paper's 128 fine steps
    (as run on the H100), bf16 runs with the CPU default's 32."""
    fine_steps = 128 if precision == "fp32" else 32
    return [
        f"model.hidden_dim={width}",
        "train.max_steps=1500",
        f"optim.lr={lr}",
        "optim.warmup_steps=200",
        f"train.precision={precision}",
        f"toy.eval.precision={precision}",
        f"toy.eval.gm_ode_fine_steps={fine_steps}",
    ]


DEFAULT_VARIANTS: dict[str, list[str]] = {  # candidates for the CPU default of `gmflow toy`
    "d256-1500": _default_variant(256, "1e-3", "fp32"),
    "d128-1500": _default_variant(128, "2e-3", "fp32"),
    "d128-1500-bf16": _default_variant(128, "2e-3", "bf16"),
    "d128-1500-bf16-g3": [*_default_variant(128, "2e-3", "bf16"), "ema.gamma=3"],
}
CELLS = [
    ("gm-sde2", 2),
    ("gm-sde2", 4),
    ("gm-sde2", 8),
    ("gm-ode2", 2),
    ("gm-ode2", 4),
    ("gm-ode2", 8),
]
BASELINE_CELLS = [("euler", 8), ("euler", 16), ("euler", 32)]


def evaluate(model, cfg: ToyConfig, cells, device, substeps=None) -> dict[str, float]:  # noqa: ANN001
    ev = cfg.eval if substeps is None else dataclasses.replace(cfg.eval, gm_ode_fine_steps=substeps)
    out = {}
    for name, nfe in cells:
        points, info = sample_cell(model, name, nfe, ev, device)
        m = point_cloud_metrics(points.cpu())
        out[f"{name}@{nfe}" + (f"/F{substeps}" if substeps else "")] = round(m["kl"], 4)
    return out


def run(name: str, overrides: list[str], args: argparse.Namespace, baseline: bool) -> dict:
    recipe = load_toy_recipe(
        None,
        [
            *overrides,
            f"train.device={args.device}",
            f"toy.eval.num_samples={args.num_samples}",
            *args.set,
            *([f"train.max_steps={args.iters}"] if args.iters else []),
        ],
    )
    cfg = toy_config_from_run(recipe)
    device = torch.device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    net = build_toy_model(cfg.model, num_gaussians=cfg.model.num_gaussians)
    start = time.time()
    log = train_toy_model(net, cfg.train, trans_ratio=cfg.train.trans_ratio, device=device)
    row = {
        "variant": name,
        "s_per_iter": round(log.seconds_per_iter, 4),
        "final_loss": round(log.final_loss, 4),
    }
    model = SigmaDenoiser(net)
    cells = (
        CELLS
        if args.cells is None
        else [(c.split("@")[0], int(c.split("@")[1])) for c in args.cells]
    )
    row.update(evaluate(model, cfg, [c for c in cells if c[0].startswith("gm")], device))
    if args.substeps:
        row.update(
            evaluate(model, cfg, [("gm-ode2", 4), ("gm-ode2", 8)], device, substeps=args.substeps)
        )
    if baseline:
        torch.manual_seed(cfg.train.seed)
        base = build_toy_model(
            cfg.model, num_gaussians=1, constant_logstd=cfg.baseline.constant_logstd
        )
        train_toy_model(base, cfg.train, trans_ratio=cfg.baseline.trans_ratio, device=device)
        base_cells = (
            BASELINE_CELLS
            if args.cells is None
            else [c for c in cells if not c[0].startswith("gm")]
        )
        row.update(evaluate(SigmaDenoiser(base), cfg, base_cells, device))
    row["wall_s"] = round(time.time() - start, 1)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="train.device: cpu, cuda or auto")
    parser.add_argument("--only", nargs="*", default=None, help="variants to run, in this order")
    parser.add_argument(
        "--iters", type=int, default=0, help="train.max_steps of every variant (0: the variant's)"
    )
    parser.add_argument(
        "--num-samples", type=int, default=100_000, help="toy.eval.num_samples per grid cell"
    )
    parser.add_argument(
        "--substeps", type=int, default=0, help="also score gm-ode2 with these fine steps (0: skip)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override for every variant, in the keys of `gmflow toy --set`, e.g. "
        "optim.lr=2e-3 or ema.gamma=3 (repeatable; after the variant's, before --iters)",
    )
    parser.add_argument(
        "--cells", nargs="*", default=None, help="grid cells as solver@nfe (default: all above)"
    )
    args = parser.parse_args()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # keep fp32 numerics comparable with the CPU
    todo = {**VARIANTS, **DEFAULT_VARIANTS}
    for name in args.only if args.only is not None else todo:
        run(name, todo[name], args, baseline=name in DEFAULT_VARIANTS)


if __name__ == "__main__":
    main()
