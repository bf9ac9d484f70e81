#!/usr/bin/env bash
# Fifth lease of 2026-11-26: whole sampling steps with the real XL/2 network in the loop
# (benchmarks/sampling.py --end-to-end), next to the isolated machinery table.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD PYTHONWARNINGS=ignore
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/diffusers-*.whl .whl/importlib_metadata-*.whl >"$OUT/pip.log" 2>&1 || cat "$OUT/pip.log"
S="python3 benchmarks/sampling.py --preset XL/2 --device cuda --dtype bf16 --batch 16 --steps 8 --network-evals 5"
timeout 200 $S --repeats 5 --solvers gm-ode2,gm-sde2,euler,gm-ode,gm-sde --end-to-end 2>&1 | grep -v -i "NumbaPerformanceWarning\|warn(errors"
echo done
