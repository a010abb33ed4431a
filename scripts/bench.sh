#!/usr/bin/env bash
# The main job: checks every op against its reference, then benchmarks every available
# backend against torch eager and torch.compile (and SDPA/Liger/HF where they apply) on
# whatever hardware is here. Writes benchmarks/results/<device>/{results.json,report.md,*.png}.
# Extra arguments go to `python -m benchmarks` (--quick, --ops, --device, --out).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh
.venv/bin/python -m fastlm.bench "$@"
