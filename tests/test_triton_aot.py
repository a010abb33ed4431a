"""Every Triton kernel compiled ahead of time for sm_80 and sm_90 (no GPU needed), with the
specialisations and autotune configs its launcher really produces (fastlm/triton/aot.py, CI
subset), and a few for sm_86/89's 99 KB per block (Case.ci86: fp32 linear, 16-bit D = 128
attention forward / backward, decode). Fails on a compile error, a launcher with no config that
fits the target, shared memory over the target's per-block limit or over the kernel file's own
estimate (the one its autotuner prunes by), spills over the kernel's budget below, or a compile
over 60 s. The exhaustive sweep (every case, dtype and sm_80/86/90) is
scripts/triton_aot_sweep.py. The session's summary says how many compiles were checked."""
import json
import os
import re
import subprocess
import sys

import pytest

MAX_COMPILE_SECONDS = 60
MODULES = ("attention", "attention_decode", "linear", "softmax", "norms", "cross_entropy", "bias_act", "rope",
           "moe_router", "moe_permute", "grouped_linear", "base_assignment")

# Spill-store bytes allowed per compiled config (maxima measured in the CI set, rounded up);
# kernels not named get 0. The attention kernels (forward, dK/dV, dQ, decode) prune every config
# whose register estimate spills, so any config their autotuner can pick must compile clean.
SPILL_BUDGET: dict[str, int] = {}  # linear and cross_entropy compile clean since issue #14's triton work
# fp32 attention without TF32 (what CI compiles: torch's default) runs its dots on FMA units,
# which hold whole rows of the D-long reduction in registers: its backward tiles are 16x16 over
# 8 warps, and dQ at D=256 reads q and dO in 64-column chunks rather than keeping them resident.
# Every attention config compiles spill-free, IEEE fp32 included, and so do the packed-sequence
# (varlen) and paged-decode ones. The tensor-core attention configs carry maxnreg = 255
# (attention.MAX_REGS): without it ptxas held them at its 128 / 168 register targets and 41 of
# sm_80's 820 16-bit configs spilled 4-24 B (sweep); CI compiles one of each kernel
# (aot._attention_cases' `spilled`).
IEEE_SPILL_BUDGET: dict[str, int] = {}
SM86_SPILL_BUDGET: dict[str, int] = {}


# what the session checked, for its terminal summary (tests/conftest.py pytest_terminal_summary)
SUMMARY = {"compiles": 0, "seconds": 0.0, "targets": {}}
# modules sm_86 compiles in CI (Case.ci86), and the kernels among them with no estimate to check
SM86_MODULES = ("attention", "attention_decode", "linear", "grouped_linear")


def problems_of(r) -> list[str]:
    """What is wrong with one compile row (empty: within every limit)."""
    where = f"{r['kernel']} {r['dtype']} {r['target']} [{r['case']}] {r['config']}"
    budget = SPILL_BUDGET.get(r["kernel"], 0)
    if r["target"] == "sm_86":
        budget = max(budget, SM86_SPILL_BUDGET.get(r["kernel"], 0))
    if r["dtype"] == "fp32":
        budget = max(budget, IEEE_SPILL_BUDGET.get(r["kernel"], 0))
    problems = []
    if r["status"] == "no-config":  # a case a launcher really hits must have a config that fits
        problems.append(f"{where}: the launcher has no config for {r['limit']} B: {r['error']}")
    elif r["error"]:
        problems.append(f"{where}: compile failed: {r['error']}")
    elif r["smem"] > r["limit"]:
        problems.append(f"{where}: {r['smem']} B shared memory > {r['limit']} B per block")
    elif 0 <= r.get("smem_estimate", -1) < r["smem"]:
        problems.append(f"{where}: compiled with {r['smem']} B shared memory > the {r['smem_estimate']} B "
                        "its pruning estimated")
    elif r["spills"] > budget:
        problems.append(f"{where}: {r['spills']} B spilled > budget {budget} B")
    if r["seconds"] > MAX_COMPILE_SECONDS:
        problems.append(f"{where}: compiled in {r['seconds']} s > {MAX_COMPILE_SECONDS} s")
    return problems


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "rows.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, don't interpret
    proc = subprocess.run([sys.executable, "-m", "fastlm.triton.aot", "--ci", "--jsonl", str(out)],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    compiled = [r for r in rows if r["status"] != "no-config"]
    SUMMARY["compiles"] = len(compiled)
    SUMMARY["seconds"] = round(sum(r["seconds"] for r in compiled), 1)
    for r in compiled:
        SUMMARY["targets"][r["target"]] = SUMMARY["targets"].get(r["target"], 0) + 1
    return rows


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
@pytest.mark.parametrize("module", MODULES)
def test_kernels_compile_within_limits(rows, module, target):
    mine = [r for r in rows if r["kernel"].split(".")[0] == module and r["target"] == target]
    assert mine, f"no {module} launch compiled for {target}"
    problems = [p for r in mine for p in problems_of(r)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module", SM86_MODULES)
def test_kernels_fit_sm_86(rows, module):
    """sm_86/89 allow 99 KB per block: the configs pruning keeps there must compile within it."""
    mine = [r for r in rows if r["kernel"].split(".")[0] == module and r["target"] == "sm_86"]
    assert mine, f"no {module} launch compiled for sm_86"
    problems = [p for r in mine for p in problems_of(r)]
    assert not problems, "\n".join(problems)


def test_no_config_and_estimate_rows_fail():
    """The row checks themselves: a launcher without a fitting config, and a compiled kernel
    over its own shared-memory estimate, are failures."""
    base = dict(kernel="attention._fwd_kernel", target="sm_86", dtype="fp16", case="c", config="x", smem=1000,
                smem_estimate=2000, limit=101376, regs=100, spills=0, seconds=1.0, error="", status="clean")
    assert problems_of(base) == []
    assert "no config" in problems_of(dict(base, kernel="attention.<triton attention forward>", smem=-1,
                                           smem_estimate=-1, status="no-config", error="no config fits"))[0]
    assert "estimated" in problems_of(dict(base, smem_estimate=999))[0]


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_varlen_and_paged_specialisations_compile(rows, target):
    """The packed-sequence (VARLEN) forward and backward and the paged-cache decode (CACHE: the
    block-table gather, lengths read on the device) are compiled in CI, not only the dense ones
    (the limits themselves are checked above)."""
    mine = [r for r in rows if r["target"] == target]
    for kernel, prefix in (("attention._fwd_kernel", "varlen"), ("attention._dkdv_kernel", "varlen"),
                           ("attention._dq_kernel", "varlen"), ("attention._delta_kernel", "varlen"),
                           ("attention_decode._split_kernel", "paged"), ("attention_decode._merge_kernel", "paged")):
        assert any(r["kernel"] == kernel and r["case"].startswith(prefix) for r in mine), \
            f"no {prefix} {kernel} compiled for {target}"


def test_attention_uses_wgmma_on_sm_90(rows):
    """On Hopper tl.dot must lower to wgmma, not the mma.sync of sm_80, wherever the tile allows it:
    a warpgroup MMA needs 64 rows, the tile's BLOCK_M for the forward and dQ, its BLOCK_N for dK/dV
    (dK = dS^T Q). Every 16-bit config compiled for sm_90 with such a tile uses it, and each kernel
    has some; none on sm_80."""
    rows_of = {"attention._fwd_kernel": "BLOCK_M", "attention._dq_kernel": "BLOCK_M",
               "attention._dkdv_kernel": "BLOCK_N"}
    sm90 = [r for r in rows if r["target"] == "sm_90" and r["dtype"] in ("fp16", "bf16") and r["kernel"] in rows_of]
    for kernel, dim in rows_of.items():
        wide = [r for r in sm90 if r["kernel"] == kernel
                and int(dict(kv.split("=") for kv in r["config"].split(",") if "=" in kv)[dim]) >= 64]
        assert wide, f"no 16-bit {kernel} config with {dim} >= 64 compiled for sm_90"
        bad = [f"{r['case']} | {r['config']}" for r in wide if not r["wgmma"]]
        assert not bad, f"{kernel}: {dim} >= 64 without wgmma: {bad}"
    assert not any(r["wgmma"] for r in rows if r["target"] == "sm_80"), "wgmma in an sm_80 compile"


def test_attention_forward_rows_stay_in_their_warp(rows):
    """The online softmax's row max and sum must not cross warps (issue #12): in every compiled
    tensor-core forward config, each warp owns whole rows of the score tile (the MMA layout's
    warpsPerCTA has one warp along N). Exempt, as attention._no_whole_row_tile says: 16-bit at
    D = 256, TF32 from D = 128, and a user mask or ALiBi at D = 128 on sm_80/86, where no
    whole-row tile fits the registers. The D = 128 forward, the common case, must have
    whole-row configs on sm_80 (on sm_90 that call takes the TMA forward, attention_tma, whose
    wgmma tiles test_attention_tma_compiles_to_tma_and_wgmma_on_sm_90 checks)."""
    fwd = [r for r in rows if r["kernel"] == "attention._fwd_kernel" and r["mma_warps_n"] > 0]
    head = {r["case"]: int(re.search(r"\bd(\d+)\b", r["case"]).group(1)) for r in fwd}

    def exempt(r):
        per_score = any(k in r["case"] for k in ("mask=bool", "mask=float", "alibi"))
        return head[r["case"]] >= (128 if r["case"].startswith("tf32") else 256) or (
            per_score and head[r["case"]] >= 128 and r["target"] in ("sm_80", "sm_86"))
    crossing = [f"{r['target']} {r['dtype']} [{r['case']}] {r['config']}: {r['mma_warps_n']} warps along N"
                for r in fwd if r["mma_warps_n"] != 1 and not exempt(r)]
    assert not crossing, crossing
    assert any(r["target"] == "sm_80" and head[r["case"]] == 128 and r["dtype"] != "fp32" and r["mma_warps_n"] == 1
               for r in fwd), "no whole-row 16-bit D = 128 forward compiled for sm_80"


def test_linear_is_persistent_tma_wgmma_on_sm_90(rows):
    """16-bit linear GEMMs (forward, dX, dW: every operand orientation) compile on sm_90 to the
    persistent TMA kernel: every config loads by cp.async.bulk.tensor and multiplies with
    wgmma; sm_80 keeps the pointer kernel (no TMA there)."""
    sm90 = [r for r in rows if r["target"] == "sm_90" and r["kernel"].startswith("linear.")
            and r["dtype"] in ("fp16", "bf16")]
    assert sm90 and all(r["kernel"] == "linear._gemm_tma_kernel" for r in sm90), {r["kernel"] for r in sm90}
    assert all(r["wgmma"] and r["tma"] for r in sm90), [r["config"] for r in sm90 if not (r["wgmma"] and r["tma"])]
    assert not any(r.get("tma") for r in rows if r["target"] != "sm_90")


def test_sweep_records_a_case_without_a_fitting_config(monkeypatch):
    """A target where a launcher has no config that fits (here a 1 KB one) is a "no-config" row
    with the launcher's message, not a crash of the sweep (nothing is compiled for it)."""
    from fastlm.triton import _tune, aot

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # capture only records: nothing runs
    monkeypatch.setitem(aot.TARGETS, 86, _tune.Target(86, 1024, 84))
    monkeypatch.setattr(aot, "compile_launch", lambda *a, **k: pytest.fail("compiled a launch without a config"))
    got = aot.sweep([86], ["fp32"], True, ["linear"], report=lambda row: None)
    assert [r["status"] for r in got] == ["no-config"]
    assert got[0]["kernel"] == "linear.<triton linear GEMM>"
    assert "no config fits 1024 B of shared memory per block" in got[0]["error"]
    assert problems_of(got[0])


def test_attention_tma_compiles_to_tma_and_wgmma_on_sm_90(rows):
    """The Hopper TMA forward (fastlm/triton/attention_tma.py, its aot_cases): sm_90 only (the
    launcher takes it nowhere else), every config within the limits above, TMA and wgmma in each
    (its warp specialisation: tests/test_attention_tma.py)."""
    mine = [r for r in rows if r["kernel"].startswith("attention_tma.")]
    assert mine and {r["target"] for r in mine} == {"sm_90"}, {r["target"] for r in mine}
    problems = [p for r in mine for p in problems_of(r)]
    assert not problems, "\n".join(problems)
    assert all(r["wgmma"] and r["tma"] for r in mine), [r["config"] for r in mine if not (r["wgmma"] and r["tma"])]
