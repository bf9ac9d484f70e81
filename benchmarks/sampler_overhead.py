"""Solver overhead of ``gmflow.flow.sample`` per network evaluation (NFE), net of the network.

The denoiser is a stand-in that returns a fixed-shape u-GM from one fused op, so the time is the
GM machinery of each solver (u→x0, guidance, order-2 correction, sub-step re-conditioning,
sampling) on top of a flow-matching Euler step. Ratios to ``euler`` are measured in the same run.

    python benchmarks/sampler_overhead.py                        # CPU, both cases
    python benchmarks/sampler_overhead.py --device cuda --imagenet-batch 125

Cases: ImageNet latents (B, K=8, C=4, 32x32) and the 2-D toy (B, K=64, C=2, 1x1), fp32 state.
Configurations: euler; gm-sde; gm-ode with 4 sub-steps per NFE; both with order 2; both with
order 2 and probabilistic guidance w = 0.45 (one call on the doubled batch); Diffusers' dpmpp-2m,
dpmpp-2m-sde and unipc on the GM mean. Time = median over
``--repeats`` runs of ``--steps`` steps, divided by the steps (NFE).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gmflow.flow import sample
from gmflow.gm import GaussianMixture

CONFIGS = {
    "euler": {"solver": "euler"},
    "gm-sde": {"solver": "gm-sde"},
    "gm-ode (S=4)": {"solver": "gm-ode", "num_substeps": 4},
    "gm-sde2": {"solver": "gm-sde", "order": 2},
    "gm-ode2 (S=4)": {"solver": "gm-ode", "num_substeps": 4, "order": 2},
    "gm-sde2 guided": {"solver": "gm-sde", "order": 2, "guidance_scale": 0.45},
    "gm-ode2 guided (S=4)": {
        "solver": "gm-ode",
        "num_substeps": 4,
        "order": 2,
        "guidance_scale": 0.45,
    },
    # Diffusers' multistep baselines on the GM mean (gmflow.flow.scheduler_solvers)
    "dpmpp-2m": {"solver": "dpmpp-2m"},
    "dpmpp-2m-sde": {"solver": "dpmpp-2m-sde"},
    "unipc": {"solver": "unipc"},
}


class StandInDenoiser:
    """u-GM with means a_k·x + b_k, fixed weights and std: negligible cost, realistic shapes."""

    def __init__(self, k: int, c: int, h: int, w: int, device: str) -> None:
        g = torch.Generator().manual_seed(0)
        self.a = (0.1 * torch.randn(k, 1, 1, 1, generator=g)).to(device)
        self.b = torch.randn(k, c, h, w, generator=g).to(device)
        self.logweights = torch.log_softmax(torch.randn(k, 1, h, w, generator=g), 0).to(device)

    def __call__(self, x_t, sigma, labels):  # type: ignore[no-untyped-def]
        b = x_t.shape[0]
        means = torch.addcmul(self.b, self.a, x_t.unsqueeze(1))
        logweights = self.logweights.expand(b, *self.logweights.shape)
        return GaussianMixture(means, logweights, torch.zeros(b, 1, 1, 1, 1, device=x_t.device))


def time_config(den, noise, labels, steps, repeats, device, **kwargs) -> float:  # type: ignore[no-untyped-def]
    guided = kwargs.get("guidance_scale", 0.0) > 0
    extra = {"class_labels": labels, "null_class_id": 1000} if guided else {}
    gen = torch.Generator(device=device).manual_seed(0)
    times = []
    for i in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sample(den, noise, num_steps=steps, generator=gen, **kwargs, **extra)
        if device == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # the first run warms up (kernel compilation, allocator)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--imagenet-batch", type=int, default=16)
    p.add_argument("--toy-batch", type=int, default=100_000)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", default="imagenet,toy")
    args = p.parse_args()
    cases = {
        "imagenet": (args.imagenet_batch, 8, 4, 32, 32),
        "toy": (args.toy_batch, 64, 2, 1, 1),
    }
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for case in args.cases.split(","):
        b, k, c, h, w = cases[case]
        den = StandInDenoiser(k, c, h, w, args.device)
        noise = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(1)).to(args.device)
        labels = torch.zeros(b, dtype=torch.long, device=args.device)
        print(f"\n{case}: B={b}, K={k}, C={c}, {h}x{w}, {args.steps} steps")
        print("| solver | ms / NFE | x euler |\n|---|---:|---:|")
        base = None
        for label, kwargs in CONFIGS.items():
            t = time_config(den, noise, labels, args.steps, args.repeats, args.device, **kwargs)
            base = base or t
            print(f"| {label} | {1e3 * t:.2f} | {t / base:.1f} |", flush=True)


if __name__ == "__main__":
    main()
