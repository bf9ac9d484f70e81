#!/usr/bin/env bash
# One GPU lease, every device measurement of issues 2, 4 and 6 (run from the repo root on the
# device machine; logs go to $OUT). Carries .whl (diffusers, importlib_metadata, numpy 2.4.6).
#   bash benchmarks/device_session.sh [quick]
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/diffusers-*.whl .whl/importlib_metadata-*.whl >"$OUT/pip.log" 2>&1 || cat "$OUT/pip.log"
nvidia-smi -L; python3 -c "import torch, numpy, numba; print('torch', torch.__version__, 'numpy', numpy.__version__, 'numba', numba.__version__)"
python3 -m pip show numba-cuda 2>/dev/null | grep -i ^version
probe() {  # does every numba-cuda kernel compile and run here?
    python3 - <<'PY'
import warnings, torch
from gmflow.gm import backend
ok = {op: backend._cuda_op_works(op) for op in backend.OPS}
print("numba-cuda probe:", ok, backend._CUDA_FAILURES)
raise SystemExit(0 if all(ok.values()) else 1)
PY
}
if ! probe; then  # fall back to the pinned NumPy of constraints.txt
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/np .whl/numpy-*.whl
    export PYTHONPATH=/tmp/np:$PYTHONPATH; echo "retrying with numpy 2.4.6"; probe
fi
t() { echo; echo "### $*"; timeout 240 "$@"; }
t python3 -m pytest -q -p no:cacheprovider tests/gm/test_cuda_backend.py tests/flow/test_solvers.py \
    tests/test_sampling.py tests/test_losses.py -k "cuda or CUDA" 2>&1 | tail -15
t python3 benchmarks/gm_ops.py --device cuda --cases imagenet,imagenet125,toy --repeats 7 --budget 0.5 \
    --ops gm_logprob,gm_condition_mean,gm1d_inverse_cdf,gaussian_to_gm_samples
t python3 benchmarks/sampling.py --preset XL/2 --device cuda --dtype bf16 --batch 16 --steps 8 --repeats 3 \
    --network-evals 5 --solvers gm-ode2,gm-sde2,gm-ode,gm-sde,euler
GMFLOW_GM_BACKEND=torch t python3 benchmarks/sampling.py --preset XL/2 --device cuda --dtype bf16 \
    --batch 16 --steps 8 --repeats 3 --network-evals 5 --solvers gm-ode2,gm-sde2,euler
t python3 benchmarks/sampler_overhead.py --device cuda --imagenet-batch 125 --toy-batch 100000 --steps 8 --repeats 5
t python3 benchmarks/training.py --preset XL/2 --batch 32 --steps 10 --rounds 3 --device cuda --precision bf16
echo done
