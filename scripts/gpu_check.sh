#!/usr/bin/env bash
# One prepared GPU check that fits a short lease (see scripts/gpu_check.py for the parts and caps).
#
#   make gpu-wheels                      # here: the wheels the GPU machine's image lacks -> .gpu-wheels/
#   scripts/gpu_check.sh                 # there, in the repo root, with .gpu-wheels carried; JSON to $OUT
#   scripts/gpu_check.sh --dry-run       # here, on the CPU: the same plumbing with tiny settings
#
# The carried wheels are installed into a site folder of their own (nothing in the image changes)
# that goes first on PYTHONPATH, with the repo root (the project is not installed there).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.gpu-wheels}
export OUT=${OUT:-$PWD/gpu_check_out}
export GPU_CHECK_STARTED=$(date +%s.%N)
mkdir -p "$OUT"
# A fixed path, left in place for a rerun on the still-warm machine: gsplat's compiled kernels are
# reused only if its sources keep their path and their timestamps (ninja), so the same wheels are
# not installed again.
SITE=${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/difix3d-gpu-site}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    wanted=$(cd "$WHEELS" && ls *.whl | sort | tr '\n' ' ')
    if [ "$(cat "$SITE/.wheels" 2>/dev/null)" != "$wanted" ]; then
        rm -rf "$SITE"
        "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
            --target "$SITE" "$WHEELS"/*.whl
        echo "$wanted" >"$SITE/.wheels"
    fi
    export GPU_CHECK_WHEELS=$(ls "$WHEELS"/*.whl | wc -l)
else
    echo "gpu_check: no wheels in $WHEELS: using the packages $PYTHON already has" >&2
    export GPU_CHECK_WHEELS=0
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" scripts/gpu_check.py "$@"
