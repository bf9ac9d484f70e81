#!/usr/bin/env bash
# After the sync-free KR basis (gmflow.gm.eigh + the numba-cuda kernel of gmflow.gm.cuda_eigh):
# the real-GPU tests (including the "never waits for the GPU" checks), then whole sampling steps
# with the XL/2 network in the loop, the KR eigen-decomposition three ways in the same lease.
source benchmarks/device_env.sh
t python3 -m pytest -q -p no:cacheprovider tests/gm/test_cuda_backend.py tests/flow/test_solvers.py \
    tests/flow/test_scheduler_solvers.py \
    tests/test_sampling.py -k "cuda or CUDA"
S="python3 benchmarks/sampling.py --preset XL/2 --device cuda --dtype bf16 --steps 8 --network-evals 5 --end-to-end"
t $S --batch 16 --repeats 5 --solvers gm-ode2,gm-sde2,euler,gm-sde
t $S --batch 16 --repeats 3 --solvers gm-sde2,euler --kr-eigh jacobi
t $S --batch 16 --repeats 3 --solvers gm-sde2,euler --kr-eigh lapack
t $S --batch 64 --repeats 3 --solvers gm-ode2,gm-sde2,euler
echo done
