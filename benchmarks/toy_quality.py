"""Toy quality and speed at the anchor budget (issue 3 §4): K = 64, batch 4096, 4000 iterations.

1. Training speed: our step (transition loss λ = 0.9, AdamW, karras EMA) against the official
   minimal trainer's recipe (Adam 2e-4, u-space GM NLL, no EMA, the flat (N, 2) call) on the same
   network, timed in alternating blocks in this process so that both see the same machine load.
2. Quality: ``gmflow.toy.run_toy`` at the anchor budget, the whole solver × NFE grid with the
   metrics of issue 3 §4, next to the anchor's numbers (official trainer, 2-core machine).

--set takes the keys of ``gmflow toy --set`` (the training recipe plus its toy: section, e.g.
optim.lr, train.max_steps, loss.trans_ratio, ema.kind, toy.eval.nfes); it applies after the options.

Usage:
    python benchmarks/toy_quality.py                       # anchor budget, CPU (~20 min on 2 cores)
    python benchmarks/toy_quality.py --iters 300 --timing-iters 20 --out-dir /tmp/tq   # smoke test
    python benchmarks/toy_quality.py --set optim.lr=5e-4 --set toy.eval.nfes=[4,8] --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from gmflow.config import to_dict
from gmflow.data.checkerboard import sample_checkerboard
from gmflow.gm import gm_logprob
from gmflow.toy import (
    ToyConfig,
    ToyModelConfig,
    ToyProgress,
    build_toy_model,
    load_toy_recipe,
    run_toy,
    toy_config_from_run,
    train_step,
    trunk_dtype,
    warmup_lr,
)
from gmflow.training.ema import EMA, EMASchedule

# official minimal trainer on a 2-core machine: KL at NFE 1 / 2 / 4 / 8 (Euler also at 32)
ANCHOR_KL = {
    "gm-sde2": {1: 0.174, 2: 0.153, 4: 0.089, 8: 0.054},
    "gm-ode2": {1: 0.201, 2: 0.159, 4: 0.084, 8: 0.053},
    "euler": {1: 10.3, 2: 5.17, 4: 1.25, 8: 0.382, 32: 0.103},
}
ANCHOR_SECONDS_PER_ITER = 0.129
TARGETS = {
    ("gm-sde2", 8): 0.045,
    ("gm-sde2", 4): 0.075,
    ("gm-ode2", 8): 0.045,
    ("gm-ode2", 4): 0.075,
}


def official_step(net, optimizer, x0, generator):  # noqa: ANN001, ANN201
    """The official minimal trainer: σ ~ U(0,1) ≥ 1e-4, u-space GM NLL (channel-summed), Adam."""
    sigma = torch.rand(x0.shape[0], 1, generator=generator, device=x0.device).clamp_min(1e-4)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    x_t = (1 - sigma) * x0 + sigma * noise
    gm = net(x_t, 1000 * sigma.squeeze(1))  # flat (N, 2) call
    u = (noise - x0).reshape(-1, 1, 2, 1, 1)  # (N, 1, C, H, W)
    loss = -gm_logprob(gm, u).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def time_training(cfg: ToyConfig, iters: int, block: int = 5) -> dict[str, float]:
    """Median seconds per iteration, recipes interleaved in blocks so they share the machine load.

    * ``ours``: ``cfg`` (width, precision), transition loss, AdamW, warm-up, karras EMA update;
    * ``ours at the official width``: the same step on the reference network (512 wide, fp32);
    * ``official``: the reference network with the official minimal trainer's step.
    """
    device = torch.device(cfg.train.device)
    gen = torch.Generator(device=device).manual_seed(0)
    t = cfg.train
    reference = ToyModelConfig(num_gaussians=cfg.model.num_gaussians, hidden_dim=512, num_layers=5)
    torch.manual_seed(0)
    nets = {
        "ours": build_toy_model(cfg.model, num_gaussians=cfg.model.num_gaussians).to(device),
        "ours at the official width (fp32)": build_toy_model(
            reference, num_gaussians=reference.num_gaussians
        ).to(device),
        "official minimal trainer (fp32)": build_toy_model(
            reference, num_gaussians=reference.num_gaussians
        ).to(device),
    }
    nets["ours"].trunk_dtype = trunk_dtype(t.precision, device)
    opts = {
        name: torch.optim.AdamW(
            net.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay, foreach=True
        )
        for name, net in nets.items()
    }
    opts["official minimal trainer (fp32)"] = torch.optim.Adam(
        nets["official minimal trainer (fp32)"].parameters(), lr=2e-4
    )
    emas = {
        name: EMA(net, EMASchedule(kind="karras", gamma=t.ema_gamma)) for name, net in nets.items()
    }

    def step(name: str, i: int) -> None:
        net, opt = nets[name], opts[name]
        if name.startswith("official"):
            official_step(net, opt, sample_checkerboard(t.batch_size, generator=gen), gen)
            return
        x0 = sample_checkerboard(t.batch_size, generator=gen).reshape(-1, 2, 1, 1)
        train_step(
            net,
            opt,
            x0,
            warmup_lr(t, i),
            trans_ratio=t.trans_ratio,
            loss_scale=t.loss_scale,
            generator=gen,
        )
        emas[name].update(net, i)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {name: [] for name in nets}
    for name in nets:  # warm-up
        step(name, 0)
    i = 0
    while len(times["ours"]) < iters:
        for name in nets:
            for _ in range(block):
                sync()
                start = time.perf_counter()
                step(name, i)
                sync()
                times[name].append(time.perf_counter() - start)
        i += block
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iters", type=int, default=4000, help="train.max_steps")
    parser.add_argument("--k", type=int, default=64, help="model.num_gaussians")
    parser.add_argument("--hidden-dim", type=int, default=512, help="model.hidden_dim")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=4096,
        help="train.batch_size_per_device and train.global_batch_size",
    )
    parser.add_argument("--device", default="cpu", help="train.device: cpu, cuda or auto")
    parser.add_argument(
        "--timing-iters", type=int, default=60, help="iterations timed per recipe (0: skip)"
    )
    parser.add_argument("--out-dir", default="runs/toy_quality")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override in the keys of `gmflow toy --set`, e.g. optim.lr=5e-4 or "
        "toy.eval.nfes=[1,2] (repeatable; applied after the options)",
    )
    args = parser.parse_args()

    recipe = load_toy_recipe(
        None,
        [
            f"model.num_gaussians={args.k}",
            f"model.hidden_dim={args.hidden_dim}",
            f"train.max_steps={args.iters}",
            f"train.batch_size_per_device={args.batch_size}",
            f"train.global_batch_size={args.batch_size}",
            f"train.device={args.device}",
            "optim.lr=1e-3",  # our recipe at the anchor budget (benchmarks/toy_sweep.py)
            "optim.warmup_steps=200",
            "toy.eval.gm_ode_fine_steps=128",  # the paper's N·S = 128 fine GM-ODE steps
            *args.overrides,
        ],
    )
    cfg = toy_config_from_run(recipe)
    print(
        f"# toy quality: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"device {cfg.train.device}"
    )
    view = to_dict(recipe)  # the settings the toy reads, in the recipe's keys
    shown = {
        "model": ("num_gaussians", "hidden_dim", "num_layers"),
        "loss": ("trans_ratio", "loss_scale"),
        "optim": ("lr", "betas", "weight_decay", "warmup_steps", "warmup_start_ratio"),
        "ema": ("kind", "gamma"),
        "train": ("max_steps", "batch_size_per_device", "precision", "seed"),
    }
    config = {section: {k: view[section][k] for k in keys} for section, keys in shown.items()}
    print(f"# recipe: {json.dumps(config, default=str)}")

    if args.timing_iters > 0:
        speed = time_training(cfg, args.timing_iters)
        official = speed["official minimal trainer (fp32)"]
        ratio = speed["ours"] / official
        print("\n## training speed (median s/iteration, recipes interleaved in one process)\n")
        print("| recipe | s / iteration | / official |\n|---|---|---|")
        for name, sec in speed.items():
            print(f"| {name} | {sec:.4f} | {sec / official:.3f} |")
        print(f"\n(anchor machine, official trainer: {ANCHOR_SECONDS_PER_ITER} s/iteration)")
        sys.stdout.flush()

    last = {"t": 0.0}

    def progress(p: ToyProgress) -> None:
        now = time.time()
        if now - last["t"] > 30 or p.completed == p.total:
            last["t"] = now
            extra = f"loss {p.loss:.4f}" if p.loss is not None else p.detail
            print(
                f"  [{time.strftime('%H:%M:%S')}] {p.task} {p.completed}/{p.total} {extra}",
                file=sys.stderr,
                flush=True,
            )

    start = time.time()
    result = run_toy(recipe, args.out_dir, progress=progress)
    metrics = result.metrics
    print(
        f"\n## quality (run_toy wall time {time.time() - start:.0f} s; outputs in {result.out_dir})"
    )
    cells = {(c["solver"], c["nfe"]): c for c in metrics["grid"]}
    nfes = sorted({c["nfe"] for c in metrics["grid"]})
    for key, label in (("kl", "KL (anchor in brackets)"), ("inside", "inside"), ("sw2", "SW2")):
        print(f"\n### {label}\n")
        print("| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
        print("|---" * (len(nfes) + 1) + "|")
        for solver in dict.fromkeys(c["solver"] for c in metrics["grid"]):
            row = []
            for n in nfes:
                c = cells.get((solver, n))
                text = f"{c[key]:.4f}" if c else ""
                if key == "kl" and n in ANCHOR_KL.get(solver, {}):
                    text += f" ({ANCHOR_KL[solver][n]})"
                row.append(text)
            print(f"| {solver} | " + " | ".join(row) + " |")
    floor = metrics["noise_floor"]
    print(
        f"\nnoise floor: KL {floor['kl']:.4f}, inside {floor['inside']:.4f}, SW2 {floor['sw2']:.4f}"
    )
    print("\n### sampling time (ms per 1000 samples)\n")
    print("| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
    print("|---" * (len(nfes) + 1) + "|")
    for solver in dict.fromkeys(c["solver"] for c in metrics["grid"]):
        row = [
            f"{1e6 * cells[(solver, n)]['seconds'] / cfg.eval.num_samples:.1f}"
            if (solver, n) in cells
            else ""
            for n in nfes
        ]
        print(f"| {solver} | " + " | ".join(row) + " |")
    print("\n### training (inside run_toy)\n")
    for name, info in metrics["train"].items():
        print(
            f"- {name}: {info['seconds_per_iter']:.4f} s/iter, final loss {info['final_loss']:.4f}"
        )
    print("\n### targets")
    for (solver, n), target in TARGETS.items():
        if (solver, n) in cells:
            kl = cells[(solver, n)]["kl"]
            print(
                f"- {solver} NFE {n}: KL {kl:.4f} <= {target}: {'PASS' if kl <= target else 'FAIL'}"
            )
    if args.timing_iters > 0:
        print(
            f"- training s/iter ours / official = {ratio:.3f} <= 1: "
            f"{'PASS' if ratio <= 1 else 'FAIL'}"
        )


if __name__ == "__main__":
    main()
