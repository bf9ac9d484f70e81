"""Time every public op of ``gmflow.gm`` per backend, with the kernel/torch ratio on the same input.

Usage:
    python benchmarks/gm_ops.py [--repeats 7] [--budget 1.0] [--cases imagenet,toy] [--ops a,b]
        [--threads N] [--device cpu|cuda]

Cases: ImageNet latents (B=16, K=8, C=4, 32x32; ``imagenet125``: B=125) and the 2-D toy (B=4096,
K=64, C=2, 1x1), fp32.
Each op runs under GMFLOW_GM_BACKEND=torch and, where it routes through a numba kernel, under
GMFLOW_GM_BACKEND=numba (numba-cpu on CPU; a second table on CUDA when a GPU is present). The time
is the median of ``--repeats`` batches of calls, the torch and kernel batches interleaved (about
``--budget`` seconds per op in all), after warm-up calls that also compile the kernels.
Speed-up = torch time / kernel time, measured in the
same run, so it stays meaningful on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

import gmflow.gm as G
from gmflow.gm import backend

# imagenet125: the batch of the CUDA target (issue 2: numba-cuda >= 5x torch-CUDA inverse CDF)
CASES = {
    "imagenet": (16, 8, 4, 32, 32),
    "imagenet125": (125, 8, 4, 32, 32),
    "toy": (4096, 64, 2, 1, 1),
}


def make_inputs(
    b: int, k: int, c: int, h: int, w: int, device: str
) -> dict[str, Callable[[], object]]:
    """Return op name -> zero-argument call on fixed random inputs (fp32)."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    gm = G.GaussianMixture(
        rnd(b, k, c, h, w), rnd(b, k, 1, h, w).log_softmax(1), (0.3 * rnd(b, 1, 1, 1, 1)).sub(1.0)
    )
    gm2 = G.GaussianMixture(
        rnd(b, 4, c, h, w),
        rnd(b, 4, 1, h, w).log_softmax(1),
        torch.zeros(b, 1, 1, 1, 1, device=device),
    )
    iso = G.IsoGaussian(rnd(b, c, h, w), rnd(b, 1, 1, 1).exp())
    a = rnd(b, h, w, c, c)
    full = G.Gaussian(rnd(b, h, w, c), a @ a.transpose(-1, -2) + torch.eye(c, device=device))
    x = rnd(b, 1, c, h, w)
    gm1d = G.GaussianMixture(gm.means[:, :, :1], gm.logweights, gm.logstds)
    u = torch.rand(b, 1, h, w, generator=g).to(device).mul(1.998).sub(0.999)
    zeta = torch.rand(b, 1, 1, 1, generator=g).to(device) + 0.5
    nu = rnd(b, c, h, w)
    return {
        "gm_to_mean": lambda: G.gm_to_mean(gm),
        "gm_to_iso_gaussian": lambda: G.gm_to_iso_gaussian(gm),
        "gm_to_gaussian": lambda: G.gm_to_gaussian(gm),
        "gm_to_sample": lambda: G.gm_to_sample(gm, 1),
        "gm_temperature": lambda: G.gm_temperature(gm, 0.5),
        "iso_gaussian_logprob": lambda: G.iso_gaussian_logprob(iso, x),
        "gm_logprob": lambda: G.gm_logprob(gm, x),
        "gm_kl_div": lambda: G.gm_kl_div(gm, gm2, n=8),
        "gm_entropy": lambda: G.gm_entropy(gm, n=8),
        "gm_mul_iso_gaussian": lambda: G.gm_mul_iso_gaussian(gm, iso),
        "iso_gaussian_mul_iso_gaussian": lambda: G.iso_gaussian_mul_iso_gaussian(iso, iso),
        "gaussian_mul_gaussian": lambda: G.gaussian_mul_gaussian(full, full),
        "gm_mul_gaussian": lambda: G.gm_mul_gaussian(gm, full),
        "gm_mul_gm": lambda: G.gm_mul_gm(gm, gm2),
        "gm_condition": lambda: G.gm_condition(gm, zeta, nu),
        "gm_condition_mean": lambda: G.gm_condition_mean(gm, zeta, nu),
        "gm1d_pdf_cdf": lambda: G.gm1d_pdf_cdf(gm1d, u),
        "gm1d_inverse_cdf": lambda: G.gm1d_inverse_cdf(gm1d, u, n_steps=16),
        "gm_to_gaussian_samples": lambda: G.gm_to_gaussian_samples(gm, x),
        "gaussian_to_gm_samples": lambda: G.gaussian_to_gm_samples(gm, x),
    }


def uses_kernel(fn: Callable[[], object]) -> bool:
    """Whether ``fn`` reaches a kernel through ``backend.kernel_for`` (under the current env)."""
    hits = []
    original = backend.kernel_for

    def spy(op, *tensors):  # type: ignore[no-untyped-def]
        kernel = original(op, *tensors)
        hits.append(kernel is not None)
        return kernel

    backend.kernel_for = spy
    try:
        fn()
    finally:
        backend.kernel_for = original
    return any(hits)


def _batch_time(fn: Callable[[], object], calls: int, sync: Callable[[], None]) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls


def time_paired(
    fns: dict[str, Callable[[], object]], repeats: int, budget: float, sync: Callable[[], None]
) -> dict[str, tuple[float, float]]:
    """(median, min) seconds per call of each backend, batches interleaved so load hits all alike.

    Each value of ``fns`` runs under its backend (the key, a GMFLOW_GM_BACKEND value). A few
    warm-up calls first (kernel compilation, allocator growth).
    """
    per_batch = {}
    for name, fn in fns.items():
        os.environ[backend.ENV_VAR] = name
        for _ in range(3):
            once = _batch_time(fn, 1, sync)
        per_batch[name] = max(1, int(budget / len(fns) / repeats / max(once, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            os.environ[backend.ENV_VAR] = name
            samples[name].append(_batch_time(fn, per_batch[name], sync))
    os.environ.pop(backend.ENV_VAR, None)
    return {name: (statistics.median(v), min(v)) for name, v in samples.items()}


def run(
    device: str, cases: list[str], ops: list[str] | None, repeats: int, budget: float
) -> list[tuple]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    kernel_name = "numba-cuda" if device == "cuda" else "numba-cpu"
    rows = []
    for case in cases:
        calls = make_inputs(*CASES[case], device=device)
        for name in [op for op in G.__all__ if op in calls and (ops is None or op in ops)]:
            fn = calls[name]
            with torch.no_grad():
                auto = "kernel" if uses_kernel(fn) else "torch"
                os.environ[backend.ENV_VAR] = "numba"
                has_kernel = uses_kernel(fn)
                fns = {"torch": fn, "numba": fn} if has_kernel else {"torch": fn}
                times = time_paired(fns, repeats, budget, sync)
            rows.append((case, name, times["torch"], kernel_name, times.get("numba"), auto))
    return rows


def print_table(device: str, rows: list[tuple]) -> None:
    print(f"\n### {device}\n")
    print(
        "| case | op | torch ms (median / min) | kernel | kernel ms (median / min) "
        "| kernel/torch (median) | speed-up (median / min) | auto |"
    )
    print("|---|---|---:|---|---:|---:|---:|---|")
    for case, name, (t_med, t_min), kernel_name, kernel, auto in rows:
        if kernel is None:
            print(
                f"| {case} | {name} | {1e3 * t_med:.3f} / {1e3 * t_min:.3f} "
                "| - | - | - | - | torch |"
            )
            continue
        k_med, k_min = kernel
        print(
            f"| {case} | {name} | {1e3 * t_med:.3f} / {1e3 * t_min:.3f} | {kernel_name} "
            f"| {1e3 * k_med:.3f} / {1e3 * k_min:.3f} | {k_med / t_med:.3f} "
            f"| x{t_med / k_med:.1f} / x{t_min / k_min:.1f} | {auto} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per op and backend")
    parser.add_argument("--cases", default="imagenet,toy")
    parser.add_argument("--ops", default=None, help="comma-separated subset of ops")
    parser.add_argument("--device", default=None, help="cpu, cuda or both (default: both if CUDA)")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads, torch and numba alike"
    )
    args = parser.parse_args()
    if args.threads:
        import numba

        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    cases = args.cases.split(",")
    ops = args.ops.split(",") if args.ops else None
    devices = (
        [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, fp32, no grad")
    for device in devices:
        print_table(device, run(device, cases, ops, args.repeats, args.budget))


if __name__ == "__main__":
    main()
