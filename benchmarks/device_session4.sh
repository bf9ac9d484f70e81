#!/usr/bin/env bash
# Fourth lease of 2026-11-26: XL/2 machinery per step after the broadcast_shapes change, each solver
# measured twice in one process (the first solver of a process ran slow in earlier leases).
source benchmarks/device_env.sh
t python3 -m pytest -q -p no:cacheprovider tests/gm/test_cuda_backend.py tests/test_sampling.py -k "cuda or CUDA"
t python3 benchmarks/sampling.py --preset XL/2 --device cuda --dtype bf16 --batch 16 --steps 8 --network-evals 5 \
    --repeats 5 --solvers euler,gm-ode2,gm-sde2,gm-ode,gm-sde,euler,gm-ode2,gm-sde2
echo done
