#!/usr/bin/env bash
# One-shot check on a CUDA machine whose torch is preinstalled and which has no network:
# build in place, run the whole test suite (gpu-marked tests included), run the full
# benchmarks, and leave logs and results in the folder given as the only argument.
# Commit that folder's results under benchmarks/results/<device>/ with commit.txt.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$out"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
git rev-parse HEAD > "$out/commit.txt" 2>/dev/null || echo unknown > "$out/commit.txt"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1

start=$(date +%s)
FASTLM_BUILD_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1
build_rc=$?
echo "build rc=$build_rc in $(( $(date +%s) - start )) s" | tee -a "$out/summary.txt"
[ $build_rc -eq 0 ] || { tail -50 "$out/build.log"; exit 1; }

"$PY" -m fastlm info 2>&1 | tee "$out/info.txt"
"$PY" -m pytest tests -q -p no:cacheprovider 2>&1 | tee "$out/tests.log"
echo "tests rc=${PIPESTATUS[0]}" | tee -a "$out/summary.txt"
"$PY" -m benchmarks --out "$out/results" "${@:2}" 2>&1 | tee "$out/bench.log"
echo "bench rc=${PIPESTATUS[0]}" | tee -a "$out/summary.txt"
