# Sourced by benchmarks/device_session*.sh: logs to $OUT, and the carried wheels in .whl
# (diffusers and importlib_metadata; the device image lacks them) installed under /tmp/site.
# .whl is git-ignored (.git/info/exclude); on a fresh checkout fetch it here before the lease:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==10.2.0
# and call the device tool with carry [".whl"] and command "bash benchmarks/device_sessionN.sh".
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD PYTHONWARNINGS=ignore
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/diffusers-*.whl .whl/importlib_metadata-*.whl >"$OUT/pip.log" 2>&1 || cat "$OUT/pip.log"
# t CMD...: run one measurement with a header and a time limit, numba's occupancy warnings dropped
t() { echo; echo "### $*"; timeout "${T_LIMIT:-200}" "$@" 2>&1 | grep -v -i "NumbaPerformanceWarning\|warn(errors"; }
