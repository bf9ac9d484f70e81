"""Training-step throughput: GM-DiT (K = 8, transition GM-NLL) vs the same trunk with a K = 1
flow-matching head (plain L2 on u), in the same run on the same machine.

    .venv/bin/python benchmarks/training.py [--preset S/2] [--batch 16] [--steps 10] [--device cpu]
        [--precision fp32|bf16]

Prints samples/s of each and the GM overhead (target <= 5%, spec: "similar training cost").
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from gmflow.flow import sample_timesteps, transition_pair
from gmflow.losses import transition_loss
from gmflow.models.gmdit import build_gmdit


def gm_step(model, x0, labels, opt):
    sigma = sample_timesteps(x0.shape[0], kind="logit_normal", device=x0.device)
    x_low, x_high, sigma_low = transition_pair(x0, sigma, 0.5)
    gm_u = model(x_high, sigma, labels)
    loss = transition_loss(gm_u, x_low, x_high, sigma_low, sigma, scale=8.0)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def fm_step(model, x0, labels, opt):
    sigma = sample_timesteps(x0.shape[0], kind="logit_normal", device=x0.device)
    noise = torch.randn_like(x0)
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    pred = model(x_t, sigma, labels).means[:, 0]  # K = 1 mean = the velocity
    loss = (pred - (noise - x0)).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed(step, model, x0, labels, steps, device, autocast):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with autocast():
        step(model, x0, labels, opt)  # warm-up
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast():
            step(model, x0, labels, opt)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="S/2")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16: autocast of the forward pass, as the trainer's bf16 (fp32 weights and loss)",
    )
    args = p.parse_args()
    device = torch.device(args.device)

    def autocast() -> contextlib.AbstractContextManager[object]:
        if args.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    torch.manual_seed(0)
    x0 = torch.randn(args.batch, 4, 32, 32, device=device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    gm_model = build_gmdit(args.preset, num_gaussians=8).to(device)
    fm_model = build_gmdit(args.preset, num_gaussians=1, constant_logstd=0.0).to(device)
    gm_t, fm_t = [], []
    for _ in range(args.rounds):  # interleave: fair under shared CPUs
        gm_t.append(timed(gm_step, gm_model, x0, labels, args.steps, device, autocast))
        fm_t.append(timed(fm_step, fm_model, x0, labels, args.steps, device, autocast))
    g, f = statistics.median(gm_t), statistics.median(fm_t)
    n_gm = sum(p.numel() for p in gm_model.parameters())
    n_fm = sum(p.numel() for p in fm_model.parameters())
    print(
        f"GM-DiT {args.preset}, batch {args.batch}, {device}, {args.precision}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"{'model':<28}{'params':>12}{'s/step':>10}{'samples/s':>12}")
    print(f"{'GM head K=8 + trans. NLL':<28}{n_gm:>12,}{g:>10.4f}{args.batch / g:>12.1f}")
    print(f"{'FM head K=1 + L2':<28}{n_fm:>12,}{f:>10.4f}{args.batch / f:>12.1f}")
    print(f"GM overhead: {100 * (g / f - 1):+.1f}% time per step (target <= +5%)")


if __name__ == "__main__":
    main()
