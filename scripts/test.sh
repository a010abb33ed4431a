#!/usr/bin/env bash
# Runs the test suite (building first). Extra arguments go to pytest, e.g. -k bias_act.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh
start=$(date +%s)
# pytest exits 5 when it collected no test: that fails this script too.
.venv/bin/python -m pytest tests "$@"
echo "fastlm: tests took $(( $(date +%s) - start )) s"
