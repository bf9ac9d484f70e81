#!/usr/bin/env bash
# Fifth lease of 2026-11-26: whole sampling steps with the real XL/2 network in the loop
# (benchmarks/sampling.py --end-to-end), next to the isolated machinery table.
source benchmarks/device_env.sh
S="python3 benchmarks/sampling.py --preset XL/2 --device cuda --dtype bf16 --batch 16 --steps 8 --network-evals 5"
t $S --repeats 5 --solvers gm-ode2,gm-sde2,euler,gm-ode,gm-sde --end-to-end
echo done
