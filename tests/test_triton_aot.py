"""Every Triton kernel compiled ahead of time for sm_80 and sm_90 (no GPU needed), with the
specialisations and autotune configs its launcher really produces (fastlm/triton/aot.py, CI
subset). Fails on a compile error, shared memory over the target's per-block limit, spills over
the kernel's budget below, or a compile over 60 s. The exhaustive sweep (every case, dtype and
sm_80/86/90) is scripts/triton_aot_sweep.py."""
import json
import os
import subprocess
import sys

import pytest

MAX_COMPILE_SECONDS = 60
MODULES = ("attention", "attention_decode", "linear", "softmax", "norms", "cross_entropy", "bias_act")

# Spill-store bytes allowed per compiled config. The autotuner benchmarks every config that fits
# and a spilling one only wins where it is still the fastest; each case keeps a spill-free config.
SPILL_BUDGET = {
    # fp32 (IEEE FMA dots, operands in registers) and 128-row 16-bit tiles at D >= 128 run out of
    # 255 registers; a spill-free smaller tile is always among the configs (checked below).
    "attention._fwd_kernel": 4096,
    "attention._dkdv_kernel": 4096,  # dK and dV accumulators plus K, V resident: the heaviest kernel
    "attention._dq_kernel": 2048,
    # fp32 with 64 rows at D=256 holds Q and the accumulator for all rows of the GQA group
    "attention_decode._split_kernel": 2048,
}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "rows.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, don't interpret
    proc = subprocess.run([sys.executable, "-m", "fastlm.triton.aot", "--ci", "--jsonl", str(out)],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
@pytest.mark.parametrize("module", MODULES)
def test_kernels_compile_within_limits(rows, module, target):
    mine = [r for r in rows if r["kernel"].split(".")[0] == module and r["target"] == target]
    assert mine, f"no {module} launch compiled for {target}"
    problems = []
    for r in mine:
        where = f"{r['kernel']} {r['dtype']} [{r['case']}] {r['config']}"
        budget = SPILL_BUDGET.get(r["kernel"], 0)
        if r["error"]:
            problems.append(f"{where}: compile failed: {r['error']}")
        elif r["smem"] > r["limit"]:
            problems.append(f"{where}: {r['smem']} B shared memory > {r['limit']} B per block")
        elif r["spills"] > budget:
            problems.append(f"{where}: {r['spills']} B spilled > budget {budget} B")
        if r["seconds"] > MAX_COMPILE_SECONDS:
            problems.append(f"{where}: compiled in {r['seconds']} s > {MAX_COMPILE_SECONDS} s")
    assert not problems, "\n".join(problems)


def test_every_tuned_case_has_a_spill_free_config(rows):
    by_case = {}
    for r in rows:
        if r["kernel"] in SPILL_BUDGET:
            by_case.setdefault((r["kernel"], r["target"], r["dtype"], r["case"]), []).append(r["spills"])
    spilling = [k for k, spills in by_case.items() if min(spills) > 0]
    # decode has one tile per call (no autotuning), so it may only be within budget
    assert not [k for k in spilling if not k[0].startswith("attention_decode")], spilling
