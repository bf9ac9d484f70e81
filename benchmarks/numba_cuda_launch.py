"""Host time of one numba-cuda launch, split into its parts, against a torch launch (GPU only).

    python benchmarks/numba_cuda_launch.py [--repeats 200]

Why: on an H100 the numba-cuda GM kernels cost ~0.4-0.6 ms per call even on tiny inputs
(benchmarks/results/gm_ops.md), more than the torch ops they replace for the one-pass kernels.
This splits a call of ``gmflow.gm.cuda_kernels.gm1d_inverse_cdf_cuda`` on a tiny input into:
wrapping torch tensors (``as_cuda_array``, with and without its stream sync), making the external
stream, the configured launch of pre-wrapped arrays, and the whole wrapper, next to ``x.add_(1)``.
Times are host-side medians per call (µs), each after a synchronised warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def per_call_us(fn: Callable[[], object], repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args()
    from gmflow.gm import cuda_kernels as ck

    cuda = ck.cuda
    dev = torch.device("cuda")
    f = torch.zeros
    means, logw = f(1, 2, 4, device=dev), f(1, 2, 4, device=dev)
    logstds, u, z, out = (
        f(1, 1, device=dev),
        f(1, 1, 4, device=dev),
        f(1, 1, 4, device=dev),
        f(1, 1, 4, device=dev),
    )
    tensors = (means, logw, logstds, u, z, out)
    stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
    wrapped = [cuda.as_cuda_array(t, sync=False) for t in tensors]
    kern = ck._kernels("float32").inverse_cdf
    import numpy as np

    kern[1, 32, stream](*wrapped, 2, np.float32(1e-6), np.float32(1.5))  # compile
    rows = {
        "torch x.add_(1)": lambda: out.add_(1),
        "as_cuda_array x1 (sync=True)": lambda: cuda.as_cuda_array(out),
        "as_cuda_array x1 (sync=False)": lambda: cuda.as_cuda_array(out, sync=False),
        "external_stream": lambda: cuda.external_stream(torch.cuda.current_stream().cuda_stream),
        "launch, pre-wrapped arrays": lambda: kern[1, 32, stream](
            *wrapped, 2, np.float32(1e-6), np.float32(1.5)
        ),
        "launch, torch tensors as args": lambda: kern[1, 32, stream](
            *tensors, 2, np.float32(1e-6), np.float32(1.5)
        ),
        "gm1d_inverse_cdf_cuda (whole wrapper)": lambda: ck.gm1d_inverse_cdf_cuda(
            *tensors, 2, 1e-6, 1.5
        ),
    }
    try:  # the compiled overload, launched without the dispatcher's per-call argument typing
        compiled = next(iter(kern.overloads.values()))
        scalars = (2, np.float32(1e-6), np.float32(1.5))
        rows["_Kernel.launch of the compiled overload"] = lambda: compiled.launch(
            (*wrapped, *scalars), (1, 1, 1), (32, 1, 1), stream, 0
        )
    except Exception as err:  # noqa: BLE001 - an internal API: report, do not fail
        print(f"(no direct overload launch: {type(err).__name__}: {err})")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| call | host µs per call (median) |\n|---|---:|")
    for name, fn in rows.items():
        try:
            print(f"| {name} | {per_call_us(fn, args.repeats):.1f} |", flush=True)
        except Exception as err:  # noqa: BLE001
            print(f"| {name} | failed: {type(err).__name__}: {err} |", flush=True)


if __name__ == "__main__":
    main()
