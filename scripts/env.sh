#!/usr/bin/env bash
# Sets up .venv on first use (torch, test and bench tools) and builds fastlm._C in place.
# Every other script starts here, so `bash scripts/test.sh` works on a fresh machine that has
# only Python, a C++ compiler and (optionally) nvcc.
#   FASTLM_TORCH   pip spec for torch (default torch==2.14.1, a CUDA 13.0 build: the CUDA
#                  kernels compile and link even on a machine without a GPU)
#   PYTHON         interpreter for the venv (default python3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3}
TORCH_SPEC=${FASTLM_TORCH:-torch==2.14.1}
DEPS=("$TORCH_SPEC" numpy ninja "setuptools>=64" wheel pytest pytest-benchmark matplotlib transformers safetensors tqdm)

if [ ! -x .venv/bin/python ]; then
  echo "fastlm: creating .venv with $($PY --version 2>&1)"
  "$PY" -m venv .venv
fi
stamp=.venv/.fastlm-deps
want="${DEPS[*]}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "fastlm: installing ${DEPS[*]} into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "${DEPS[@]}"
  echo "$want" > "$stamp"
fi

# pip builds an editable install from scratch each time, so skip it when nothing it compiles
# or installs has changed since the last successful build (and the module is still there).
sources=$(cat setup.py pyproject.toml $(find csrc -type f | sort) | sha1sum | cut -d' ' -f1)
build_stamp=.venv/.fastlm-build
if [ -f "$build_stamp" ] && [ "$(cat "$build_stamp")" = "$sources${FASTLM_BUILD_CUDA:-}" ] && ls fastlm/_C*.so > /dev/null 2>&1; then
  echo "fastlm: extension up to date (sources unchanged since the last build)"
  exit 0
fi
start=$(date +%s)
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}
if ! .venv/bin/python -m pip install -q --no-build-isolation --no-deps -e . > .venv/build.log 2>&1; then
  cat .venv/build.log
  echo "fastlm: build failed (log above, also in .venv/build.log)" >&2
  exit 1
fi
echo "$sources${FASTLM_BUILD_CUDA:-}" > "$build_stamp"
echo "fastlm: build took $(( $(date +%s) - start )) s ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
