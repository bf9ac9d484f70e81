#!/usr/bin/env bash
# Second lease of 2026-11-26: numba-cuda launch overhead after as_cuda_array(sync=False), and the
# XL/2 sampling machinery with each automatic kernel choice. Logs to $OUT.
source benchmarks/device_env.sh
t python3 -m pytest -q -p no:cacheprovider tests/gm/test_cuda_backend.py tests/flow/test_solvers.py \
    tests/test_sampling.py -k "cuda or CUDA"
t python3 benchmarks/gm_ops.py --device cuda --cases imagenet,imagenet125,toy --repeats 7 --budget 0.4 \
    --ops gm_logprob,gm_condition_mean,gm1d_inverse_cdf,gaussian_to_gm_samples
S="python3 benchmarks/sampling.py --preset XL/2 --device cuda --dtype bf16 --batch 16 --steps 8 --repeats 3 --network-evals 5"
t $S --solvers gm-ode2,gm-sde2,gm-ode,gm-sde,euler
t $S --solvers gm-ode2,gm-sde2,euler --cuda-kernels gm1d_inverse_cdf
t $S --solvers gm-ode2,gm-sde2,euler --cuda-kernels none
echo done
