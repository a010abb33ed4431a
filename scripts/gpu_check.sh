#!/usr/bin/env bash
# scripts/gpu_check.sh OUT --budget SECONDS [--dry-run]
#
# The whole check for a GPU machine lent for a short time (torch preinstalled, no network):
# stages run in priority order, each with a time estimate; a stage whose estimate exceeds what
# is left of the budget is skipped (the summary says so), and a stage that runs is killed
# (`timeout`) when it would run past the budget. Whatever happens, OUT ends up with exactly two
# files: OUT/summary.txt and OUT/gpu_check.tar.gz (logs, test report, benchmark results).
#
#   stage     what                                                             estimate (H200)
#   build     third_party/wheels/*.whl (Liger-Kernel, ninja) into a scratch folder; pip install
#             -e . with FASTLM_BUILD_CUDA=1, MAX_JOBS=nproc; `python -m fastlm info`   150 s
#   tests     cuda + triton + gpu-marked tests, one Triton config per kernel,
#             fail-fast, a per-test deadline; capped at 330 s (FASTLM_CAP_TESTS)
#             so that the headline benchmarks still fit a 780 s budget             270 s
#   headline  python -m benchmarks --headline                                      300 s
#   full      python -m benchmarks (full), or --quick when only that fits      1500 / 240 s
# The estimates are guesses until a run has measured them: summary.txt records each stage's
# seconds next to its estimate; override with FASTLM_EST_<STAGE>=seconds (e.g. FASTLM_EST_TESTS).
#
# --dry-run (CI, CPU only): the same stages and command lines, CPU-sized: no build (the command
# is printed, setup.py parsed, `fastlm info` run), `pytest --collect-only` on exactly the GPU
# selection (must collect > 0 tests), the headline and the full benchmark with --smoke --device
# cpu (full: bias_act only). tests/test_gpu_check.py runs it.
#
# Per-test deadline: pytest-timeout isn't installed on the GPU machine, so scripts/pytest_deadline.py
# (loaded with -p) arms faulthandler.dump_traceback_later(exit=True) around each test: a test
# past FASTLM_TEST_DEADLINE seconds (default 120) dumps every thread's stack and ends the run.
#
# Versions: the GPU machine has Python 3.12, torch 2.11 (+cu130), Triton 3.6, nvcc 13.0; CI has
# Python 3.11, torch 2.14, Triton 3.8. What the benchmarks and this script rely on:
# - torch >= 2.5 for SDPBackend.CUDNN_ATTENTION and sdpa_kernel([...]) (both have it);
#   torch._dynamo.config.recompile_limit (the name since 2.7; cache_size_limit before);
#   F.rms_norm (2.4+); torch._addmm_activation (private, present in 2.11 and 2.14);
#   torch.OutOfMemoryError (2.5+); torch.library.custom_op / register_fake (2.4+).
# - Timing uses CUDA events (torch.cuda.Event), not triton.testing.do_bench, whose signature
#   changed between Triton versions (fast_flush/grad_to_none/quantiles/return_mode); nothing here
#   depends on it. Triton kernels use only tl.* basics present in 3.6 and 3.8; the autotune
#   switch FASTLM_TRITON_AUTOTUNE=0 is read by fastlm.triton, not by Triton.
# - Liger-Kernel (third_party/wheels, pure Python, BSD-2) asks for torch >= 2.1.2 and
#   triton >= 2.3.1, and imports `packaging` (pytest depends on it, so it is there when tests
#   can run); it is installed --no-deps, and every benchmark runs without it if it won't import.
# - Nothing built under one torch runs under the other: the build stage always rebuilds.
# - Python 3.12: no distutils; the build goes through setuptools (pip --no-build-isolation).
set -uo pipefail

usage() { echo "usage: scripts/gpu_check.sh OUT --budget SECONDS [--dry-run]" >&2; exit 2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$ROOT/scripts/gpu_check.sh"
PY=${PYTHON:-python3}
STAGES="build tests headline full"
# gpu tests: every test parametrized on the cuda or triton backend, plus those marked gpu; not the
# ones that need no GPU, which CI runs and which are slow (nvcc spill reports, Triton AOT compiles
# for sm_80/sm_90, install-without-extension checks)
TEST_SELECT='(cuda or triton or gpu) and not emu and not gpu_check and not do_not_spill and not test_triton_aot and not test_install'

# ---- one stage's body (the script calls itself with --run-stage under `timeout`) -------------------
if [ "${1:-}" = "--run-stage" ]; then
    cd "$ROOT" || exit 1
    set -x
    case "$2" in
    build)
        # wheels first: ninja (Apache-2.0) when the machine has none, else torch builds one file at a time
        if compgen -G "third_party/wheels/*.whl" > /dev/null; then
            "$PY" -m pip install --no-index --no-deps --quiet --target "$SITE" third_party/wheels/*.whl \
                || echo "third_party wheels: pip could not install them; going on without"
        else
            echo "third_party/wheels: none; the benchmarks run without Liger-Kernel"
        fi
        command -v ninja > /dev/null || export PATH="$SITE/bin:$PATH"
        ninja --version || echo "no ninja: the extension builds serially (slow)"
        build_cmd=("$PY" -m pip install --no-build-isolation --no-deps --no-index -e .)
        if [ "$DRY" = 1 ]; then
            : "dry run: would run MAX_JOBS=$(nproc) FASTLM_BUILD_CUDA=1 ${build_cmd[*]}"
            "$PY" -m pip --version || exit 1
            "$PY" -c "import ast; ast.parse(open('setup.py').read())" || exit 1
        else  # PIP_BREAK_SYSTEM_PACKAGES: the machine's torch may live in a distribution's own Python
            PIP_BREAK_SYSTEM_PACKAGES=1 MAX_JOBS=$(nproc) FASTLM_BUILD_CUDA=1 "${build_cmd[@]}" || exit 1
        fi
        "$PY" -m fastlm info || exit 1
        PYTHONPATH="$SITE" "$PY" -c "import liger_kernel.transformers.functional; print('liger-kernel importable')" \
            || echo "liger-kernel: not importable here; the benchmarks run without it"
        ;;
    tests)
        export FASTLM_TRITON_AUTOTUNE=0 FASTLM_TEST_DEADLINE=${FASTLM_TEST_DEADLINE:-120}
        export PYTHONPATH="$ROOT/scripts${PYTHONPATH:+:$PYTHONPATH}"
        args=(tests -k "$TEST_SELECT" -p pytest_deadline -p no:cacheprovider -x)
        if [ "$DRY" = 1 ]; then
            "$PY" -m pytest "${args[@]}" --collect-only -q
        else
            "$PY" -m pytest "${args[@]}" -v -rfE --durations=25 --junitxml="$WORK/results/tests.xml"
        fi
        ;;
    headline)
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        if [ "$DRY" = 1 ]; then
            "$PY" -m benchmarks --headline --smoke --device cpu --out "$WORK/results/headline"
        else
            "$PY" -m benchmarks --headline --out "$WORK/results/headline"
        fi
        ;;
    full)
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        if [ "$DRY" = 1 ]; then
            "$PY" -m benchmarks --smoke --device cpu --ops bias_act --out "$WORK/results/full"
        elif [ "$LEFT" -ge "$EST_FULL" ]; then
            "$PY" -m benchmarks --out "$WORK/results/full"
        else
            echo "only ${LEFT} s left (full needs ~${EST_FULL} s): --quick"
            "$PY" -m benchmarks --quick --out "$WORK/results/quick"
        fi
        ;;
    *) echo "unknown stage $2" >&2; exit 2 ;;
    esac
    exit $?
fi

# ---- driver ---------------------------------------------------------------------------------------
[ $# -ge 1 ] && [ "${1#-}" = "$1" ] || usage
OUT=$1; shift
BUDGET=; DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
    --budget) BUDGET=${2:-}; shift 2 || usage ;;
    --budget=*) BUDGET=${1#--budget=}; shift ;;
    --dry-run) DRY=1; shift ;;
    *) usage ;;
    esac
done
[[ "$BUDGET" =~ ^[0-9]+$ ]] || usage

if [ "$DRY" = 1 ]; then  # CPU-sized estimates (2 cores)
    EST_BUILD=${FASTLM_EST_BUILD:-20} EST_TESTS=${FASTLM_EST_TESTS:-20}
    EST_HEADLINE=${FASTLM_EST_HEADLINE:-90} EST_FULL=${FASTLM_EST_FULL:-40} EST_QUICK=$EST_FULL MARGIN=3
    CAP_TESTS=${FASTLM_CAP_TESTS:-100000}
else
    EST_BUILD=${FASTLM_EST_BUILD:-150} EST_TESTS=${FASTLM_EST_TESTS:-270}
    EST_HEADLINE=${FASTLM_EST_HEADLINE:-300} EST_FULL=${FASTLM_EST_FULL:-1500} EST_QUICK=${FASTLM_EST_QUICK:-240}
    CAP_TESTS=${FASTLM_CAP_TESTS:-330}
    MARGIN=15  # kept for the summary and the archive
fi

mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
WORK="$OUT/gpu_check"  # the archive's content; removed once archived
SITE=$(mktemp -d "${TMPDIR:-/tmp}/fastlm-gpu-check-site.XXXXXX")
rm -rf "$WORK" "$OUT/summary.txt" "$OUT/gpu_check.tar.gz"
mkdir -p "$WORK/logs" "$WORK/results"
export PY DRY WORK SITE EST_FULL PYTHONUNBUFFERED=1
START=$(date +%s)
DEADLINE=$((START + BUDGET))
ROWS=()
FAILED=0
CHILD=
INTERRUPTED=

cd "$ROOT" || exit 1
COMMIT=${FASTLM_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
DIRTY=$(git status --porcelain --untracked-files=no 2>/dev/null | head -1)
export FASTLM_COMMIT=$COMMIT  # the benchmarks record it too (a copied tree may have no .git)
if command -v nvidia-smi > /dev/null; then
    nvidia-smi > "$WORK/logs/nvidia-smi.txt" 2>&1
    DEVICE=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
fi
DEVICE=${DEVICE:-none (nvidia-smi not found or no GPU)}
VERSIONS=$("$PY" - <<'EOF' 2>&1
import sys
out = ["python " + sys.version.split()[0]]
for mod in ("torch", "triton", "pytest", "transformers", "matplotlib"):
    try:
        m = __import__(mod)
        out.append(f"{mod} {getattr(m, '__version__', '?')}")
    except Exception as exc:
        out.append(f"{mod} missing ({type(exc).__name__})")
try:
    import torch
    out.append(f"cuda {torch.version.cuda}")
except Exception:
    pass
print(", ".join(out))
EOF
)

finish() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$CHILD" ]; then  # interrupted while a stage ran: stop it (timeout passes it on)
        kill -TERM "$CHILD" 2> /dev/null; wait "$CHILD" 2> /dev/null
    fi
    local used=$(( $(date +%s) - START ))
    {
        echo "fastlm gpu_check $([ "$DRY" = 1 ] && echo "DRY RUN (CPU-sized; measures nothing)" || echo "GPU run")"
        echo "commit:   $COMMIT${DIRTY:+ (uncommitted changes in tracked files)}"
        echo "date:     $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "device:   $DEVICE"
        echo "host:     $(nproc) cores"
        echo "versions: $VERSIONS"
        echo "budget:   $BUDGET s, used $used s${INTERRUPTED:+, $INTERRUPTED}"
        echo
        printf '%-9s %-8s %4s %7s %9s  %s\n' stage status rc seconds estimate note
        for s in "${ROWS[@]}"; do echo "$s"; done
        for s in $STAGES; do  # stages never reached (interrupted before them)
            printf '%s\n' "${ROWS[@]}" | grep -q "^$s " || printf '%-9s %-8s %4s %7s %9s  %s\n' "$s" skipped - 0 - "not reached"
        done
        echo
        echo "archive: gpu_check.tar.gz (logs/<stage>.log, results/tests.xml, results/<headline|full|quick>/)"
    } > "$OUT/summary.txt"
    cp "$OUT/summary.txt" "$WORK/summary.txt"
    if tar -czf "$OUT/gpu_check.tar.gz" -C "$OUT" gpu_check; then
        rm -rf "$WORK"
    fi
    rm -rf "$SITE"
    cat "$OUT/summary.txt"
    exit $rc
}
trap finish EXIT
trap 'INTERRUPTED="interrupted by a signal"; exit 130' INT TERM

row() { ROWS+=("$(printf '%-9s %-8s %4s %7s %9s  %s' "$@")"); }

# run_stage NAME ESTIMATE [MIN_ESTIMATE [CAP]]: skip when even MIN_ESTIMATE (default ESTIMATE)
# doesn't fit in what is left; kill the stage at the end of the budget or after CAP seconds
run_stage() {
    local name=$1 est=$2 min=${3:-$2} cap=${4:-} t0 rc status note=
    LEFT=$((DEADLINE - $(date +%s) - MARGIN))
    if [ "$min" -gt "$LEFT" ]; then
        row "$name" skipped - 0 "$est" "estimate ${min} s > ${LEFT} s left"
        echo "== $name: skipped (estimate ${min} s > ${LEFT} s left)"
        return 0
    fi
    [ -n "$cap" ] && [ "$cap" -lt "$LEFT" ] && LEFT=$cap
    echo "== $name (estimate ${est} s, killed after ${LEFT} s): log $WORK/logs/$name.log"
    t0=$(date +%s)
    LEFT=$LEFT timeout -k 20 "$LEFT" bash "$SELF" --run-stage "$name" < /dev/null > "$WORK/logs/$name.log" 2>&1 &
    CHILD=$!
    wait "$CHILD"; rc=$?
    CHILD=
    case $rc in
    0) status=ok ;;
    124 | 137) status=timeout; note="killed after ${LEFT} s (budget or stage cap)" ;;
    *) status=failed; note="see logs/$name.log: $(grep -v '^+' "$WORK/logs/$name.log" | tail -1 | cut -c1-100)" ;;
    esac
    [ "$name" = tests ] && [ "$DRY" = 1 ] && note="$(grep -Eo '[0-9]+(/[0-9]+)? tests? collected' "$WORK/logs/$name.log" | tail -1) $note"
    [ "$name" = full ] && grep -q -- '--quick' "$WORK/logs/$name.log" && [ "$DRY" = 0 ] && note="ran --quick (full needs ~$EST_FULL s) $note"
    row "$name" "$status" "$rc" $(( $(date +%s) - t0 )) "$est" "$note"
    echo "== $name: $status (rc $rc)"
    [ "$rc" = 0 ] || FAILED=1
}

echo "gpu_check: commit $COMMIT, device $DEVICE, budget $BUDGET s$([ "$DRY" = 1 ] && echo ", dry run")"
run_stage build "$EST_BUILD"
run_stage tests "$EST_TESTS" "$EST_TESTS" "$CAP_TESTS"
run_stage headline "$EST_HEADLINE"
run_stage full "$EST_FULL" "$EST_QUICK"
exit $FAILED  # 1 when a stage failed or timed out; skipped stages don't count
