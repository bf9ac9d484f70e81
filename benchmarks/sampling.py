"""GM machinery against the network: time per step of each solver for a real GM-DiT (issue 4 §5).

For GM-DiT (default B/2, K = 8, 4x32x32 latents, 1000 classes) at batch B with probabilistic
guidance w = 0.45 (every evaluation is one call on the doubled batch [cond; null]):

* network time: the median of ``--network-evals`` real forward passes on 2B inputs;
* machinery time per step: one whole ``gmflow.flow.sample`` run of ``--steps`` steps whose
  denoiser *replays* a GM captured from a real forward (so everything but the network runs: u->x0,
  guidance, the order-2 correction, GM-ODE sub-steps, x0 draws, spectral sampling with a real
  SpectrumMLP, the Euler/SDE steps), minus the replay calls, divided by the steps.

ratio = machinery per step / (network evaluations per step x network time). Targets: <= 5 % for
gm-ode2 (all 4 sub-steps included) and <= 10 % for gm-sde2 (the paper: 0.005 s of 0.39 s per step
on an A100). Both parts are measured in the same process, so the ratio stays meaningful on a
shared CPU; the absolute times do not.

    python benchmarks/sampling.py                                   # B/2, batch 16, CPU, 1 thread
    python benchmarks/sampling.py --preset XL/2 --device cuda --dtype bf16
    python benchmarks/sampling.py --profile gm-sde2                 # where the machinery time goes
    python benchmarks/sampling.py ... --end-to-end      # also whole steps with the real network

``--end-to-end`` adds a second table: whole ``sample`` runs with the network in the loop, step time
minus the network's (and against Euler, the flow-matching sampler). On a GPU the host queues the
machinery while the network's kernels still run, so this is the cost a user sees; the first table
is the machinery's own host + device time with nothing to overlap it.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time

import torch

from gmflow.flow import sample
from gmflow.gm import GaussianMixture
from gmflow.models.gmdit import build_gmdit
from gmflow.models.spectrum import SpectrumMLP

# name -> (flow.sample arguments, network evaluations per step)
SOLVERS = {
    "gm-ode2 (S=4)": ({"solver": "gm-ode", "order": 2, "num_substeps": 4}, 1.0),
    "gm-sde2 (spectral)": ({"solver": "gm-sde", "order": 2, "spectral": True}, 1.0),
    "gm-ode (S=4)": ({"solver": "gm-ode", "num_substeps": 4}, 1.0),
    "gm-sde (spectral)": ({"solver": "gm-sde", "spectral": True}, 1.0),
    "euler": ({"solver": "euler"}, 1.0),
    "heun": ({"solver": "heun"}, None),  # 2N - 1 evaluations in N steps
    "ddpm": ({"solver": "ddpm"}, 1.0),
}
TARGETS = {"gm-ode2 (S=4)": 0.05, "gm-sde2 (spectral)": 0.10}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Replay:
    """Returns a captured GM (sliced to the batch asked for); counts calls and their time."""

    def __init__(self, gm: GaussianMixture, device: str) -> None:
        self.gm, self.device, self.calls, self.elapsed = gm, device, 0, 0.0

    def __call__(self, x_t, sigma, labels):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        b = x_t.shape[0]
        gm = GaussianMixture(self.gm.means[:b], self.gm.logweights[:b], self.gm.logstds[:b])
        self.calls += 1
        self.elapsed += time.perf_counter() - t0
        return gm


def build(
    preset: str, k: int, device: str, dtype: torch.dtype
) -> tuple[torch.nn.Module, SpectrumMLP]:
    """GM-DiT with a random (nonzero) head, so the captured GM has spread-out components."""
    g = torch.Generator().manual_seed(0)
    with torch.device(device):  # initialise where it runs (XL/2 has 676M parameters)
        model = build_gmdit(preset, num_gaussians=k)
        spectrum = SpectrumMLP(base_size=(4, 32, 32))
    with torch.no_grad():
        for p in (model.final_modulation.weight, model.head.proj.weight):
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
        for p in model.head.logstd_mlp[-1].parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g) - 0.5)
        last = spectrum.layers[-1].weight
        last.copy_(0.3 * torch.randn(last.shape, generator=g))
    return model.to(dtype).eval(), spectrum.eval()


def network_time(model, batch: int, evals: int, device: str) -> tuple[float, GaussianMixture]:  # type: ignore[no-untyped-def]
    """Median seconds of one forward on the doubled batch, and the GM of the last one."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * batch, 4, 32, 32, generator=g).to(device)
    labels = torch.cat([torch.randint(0, 1000, (batch,), generator=g), torch.full((batch,), 1000)])
    sigma = torch.full((2 * batch,), 0.5, device=device)
    times = []
    with torch.no_grad():
        for i in range(evals + 1):
            _sync(device)
            t0 = time.perf_counter()
            gm = model(x, sigma, labels.to(device))
            _sync(device)
            if i > 0:  # the first call warms up
                times.append(time.perf_counter() - t0)
    return statistics.median(times), GaussianMixture(
        gm.means.float(), gm.logweights.float(), gm.logstds.float()
    )


def _per_step_time(
    name: str, make_denoiser, spectrum, batch: int, steps: int, repeats: int, device: str
) -> float:  # type: ignore[no-untyped-def]
    """Median seconds per step of ``repeats`` whole ``sample`` runs of one solver (after one
    warm-up run, which compiles kernels and warms the allocator), minus the time the denoiser
    reports as its own (``elapsed``, when it has one)."""
    kwargs = dict(SOLVERS[name][0])
    spectral = kwargs.pop("spectral", False)
    noise = torch.randn(batch, 4, 32, 32, generator=torch.Generator().manual_seed(2)).to(device)
    labels = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(3)).to(device)
    times = []
    for i in range(repeats + 1):
        denoiser = make_denoiser()
        gen = torch.Generator(device=device).manual_seed(4)
        _sync(device)
        t0 = time.perf_counter()
        sample(
            denoiser, noise, num_steps=steps, guidance_scale=0.45, null_class_id=1000,
            class_labels=labels, generator=gen, spectrum_net=spectrum if spectral else None,
            **kwargs,
        )  # fmt: skip
        _sync(device)
        if i > 0 or repeats == 0:
            own = getattr(denoiser, "elapsed", 0.0)
            times.append((time.perf_counter() - t0 - own) / steps)
    return statistics.median(times)


def machinery_time(
    name: str, gm: GaussianMixture, spectrum, batch: int, steps: int, repeats: int, device: str
) -> float:  # type: ignore[no-untyped-def]
    """Median seconds per step of everything but the network (replayed GM)."""
    return _per_step_time(name, lambda: Replay(gm, device), spectrum, batch, steps, repeats, device)


def end_to_end_time(
    name: str, model, spectrum, batch: int, steps: int, repeats: int, device: str
) -> float:  # type: ignore[no-untyped-def]
    """Median seconds per step of a whole ``sample`` run with the real network in the loop.

    On a GPU the host queues the machinery's kernels while the network's are still running, so
    host-side launch time only costs where it exceeds the GPU's queue (or at a synchronisation);
    this is the step time a user sees.
    """
    return _per_step_time(name, lambda: model, spectrum, batch, steps, repeats, device)


def _solver_keys(arg: str) -> list[str]:
    """--solvers items as SOLVERS keys ("gm-ode2" -> "gm-ode2 (S=4)")."""
    short = {key.split(" ")[0]: key for key in SOLVERS}
    return [short.get(n, n) for n in arg.split(",")]


def _verdict(name: str, ratio: float) -> str:
    target = TARGETS.get(name)
    return "" if target is None else f"<= {target:.0%} {'met' if ratio <= target else 'MISSED'}"


def print_end_to_end(args, model, spectrum, t_net: float) -> None:  # type: ignore[no-untyped-def]
    """The second table: whole steps with the network, against the network alone and Euler."""
    names = _solver_keys(args.solvers)
    e2e = {
        n: end_to_end_time(n, model, spectrum, args.batch, args.steps, args.repeats, args.device)
        for n in dict.fromkeys(["euler", *names])
    }
    print(
        "\nEnd to end (the real network in the loop; overhead = step time - network evaluations "
        "x network time):\n"
    )
    print("| solver | step ms | network ms / step | overhead ms | ratio | vs euler | target |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        evals = SOLVERS[name][1] or (2 * args.steps - 1) / args.steps
        over = e2e[name] - evals * t_net
        ratio = over / (evals * t_net)
        print(
            f"| {name} | {e2e[name] * 1e3:.2f} | {evals * t_net * 1e3:.2f} | {over * 1e3:.2f} | "
            f"{ratio:.2%} | {e2e[name] / e2e['euler'] - 1:+.2%} | {_verdict(name, ratio)} |",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="B/2")
    p.add_argument("--num-gaussians", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="steps per machinery run")
    p.add_argument("--repeats", type=int, default=3, help="machinery runs (median)")
    p.add_argument("--network-evals", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="network weights")
    p.add_argument("--threads", type=int, default=1, help="torch (and numba) CPU threads")
    p.add_argument("--solvers", default=",".join(SOLVERS))
    p.add_argument("--profile", default=None, help="cProfile the machinery of one solver")
    p.add_argument(
        "--end-to-end",
        action="store_true",
        help="also time whole sampling runs with the real network in the loop",
    )
    p.add_argument(
        "--cuda-kernels",
        default=None,
        help="comma-separated ops the automatic GM backend runs as numba-cuda kernels "
        "(default: gmflow's choice); 'none' = torch for every op",
    )
    p.add_argument(
        "--kr-eigh",
        choices=("auto", "jacobi", "lapack"),
        default="auto",
        help="eigen-decomposition of the KR basis in spectral sampling: gmflow's choice (numba-cuda"
        " kernel on CUDA), the torch Jacobi, or torch.linalg.eigh (synchronises on CUDA)",
    )
    args = p.parse_args()
    if args.kr_eigh != "auto":
        import functools

        from gmflow.gm import eigh, transport

        transport.eigh_descending = functools.partial(eigh.eigh_descending, method=args.kr_eigh)
    if args.cuda_kernels is not None:
        from gmflow.gm import backend as gm_backend

        chosen = [] if args.cuda_kernels == "none" else args.cuda_kernels.split(",")
        gm_backend._CUDA_AUTO_OPS = frozenset(chosen)
    torch.set_num_threads(args.threads)
    try:
        import numba

        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    except (ImportError, ValueError):
        pass
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, spectrum = build(args.preset, args.num_gaussians, args.device, dtype)
    t_net, gm = network_time(model, args.batch, args.network_evals, args.device)
    if not args.end_to_end:
        del model
    backend = os.environ.get("GMFLOW_GM_BACKEND", "auto")
    if args.cuda_kernels is not None:
        backend += f" (numba-cuda for: {args.cuda_kernels})"
    backend += f", KR eigh {args.kr_eigh}"
    print(
        f"GM-DiT {args.preset} K={args.num_gaussians}, batch {args.batch} guided (network batch "
        f"{2 * args.batch}), {args.dtype} weights, {args.device}, {args.threads} threads, GM "
        f"backend {backend}; network {t_net * 1e3:.1f} ms per evaluation\n"
    )
    if args.profile:
        machinery_time(args.profile, gm, spectrum, args.batch, args.steps, 0, args.device)
        profiler = cProfile.Profile()
        profiler.enable()
        machinery_time(args.profile, gm, spectrum, args.batch, args.steps, 0, args.device)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
        return
    print(
        "| solver | network evals / step | network ms / step | GM machinery ms / step | ratio |",
        end="",
    )
    print(" target |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in _solver_keys(args.solvers):
        evals = SOLVERS[name][1] or (2 * args.steps - 1) / args.steps
        t_gm = machinery_time(name, gm, spectrum, args.batch, args.steps, args.repeats, args.device)
        ratio = t_gm / (evals * t_net)
        print(
            f"| {name} | {evals:.2f} | {evals * t_net * 1e3:.1f} | {t_gm * 1e3:.2f} | "
            f"{ratio:.2%} | {_verdict(name, ratio)} |",
            flush=True,
        )
    if args.end_to_end:
        print_end_to_end(args, model, spectrum, t_net)


if __name__ == "__main__":
    main()
