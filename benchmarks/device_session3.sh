#!/usr/bin/env bash
# Third lease of 2026-11-26: the final code's real-GPU tests, where a numba-cuda launch spends its
# host time, and the XL/2 machinery per step with a profile of gm-sde2. Logs to $OUT.
source benchmarks/device_env.sh
t python3 -m pytest -q -p no:cacheprovider tests/gm/test_cuda_backend.py tests/gm/test_backend.py \
    tests/flow/test_solvers.py tests/test_sampling.py -k "cuda or CUDA or backend"
t python3 benchmarks/numba_cuda_launch.py --repeats 300
S="python3 benchmarks/sampling.py --preset XL/2 --device cuda --dtype bf16 --batch 16 --steps 8 --network-evals 5"
t $S --repeats 3 --solvers gm-ode2,gm-sde2,euler
t $S --profile "gm-sde2 (spectral)"
echo done
