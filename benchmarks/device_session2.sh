#!/usr/bin/env bash
# Second lease of 2026-11-26: numba-cuda launch overhead after as_cuda_array(sync=False), and the
# XL/2 sampling machinery with each automatic kernel choice. Logs to $OUT.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD PYTHONWARNINGS=ignore
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/diffusers-*.whl .whl/importlib_metadata-*.whl >"$OUT/pip.log" 2>&1 || cat "$OUT/pip.log"
t() { echo; echo "### $*"; timeout 200 "$@" 2>&1 | grep -v -i "NumbaPerformanceWarning\|warn(errors"; }
t python3 -m pytest -q -p no:cacheprovider tests/gm/test_cuda_backend.py tests/flow/test_solvers.py \
    tests/test_sampling.py -k "cuda or CUDA"
t python3 benchmarks/gm_ops.py --device cuda --cases imagenet,imagenet125,toy --repeats 7 --budget 0.4 \
    --ops gm_logprob,gm_condition_mean,gm1d_inverse_cdf,gaussian_to_gm_samples
S="python3 benchmarks/sampling.py --preset XL/2 --device cuda --dtype bf16 --batch 16 --steps 8 --repeats 3 --network-evals 5"
t $S --solvers gm-ode2,gm-sde2,gm-ode,gm-sde,euler
t $S --solvers gm-ode2,gm-sde2,euler --cuda-kernels gm1d_inverse_cdf
t $S --solvers gm-ode2,gm-sde2,euler --cuda-kernels none
echo done
