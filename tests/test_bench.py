"""The benchmark pipeline end to end in smoke mode (tiny shapes): it checks correctness, then
writes the table, results.json, report.md and a plot. No timing is asserted."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "fastlm.bench", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def test_smoke_report_is_written(tmp_path):
    out = _bench("--smoke", "--ops", "bias_act", "--device", "cpu", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "copy" in out.stdout and "total" in out.stdout
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["mode"] == "smoke"
    impls = {r["impl"] for r in data["rows"] if r["ms"]}
    assert {"fastlm:cpu", "fastlm:reference", "torch eager"} <= impls
    assert all(not r["note"].startswith("WRONG") for r in data["rows"])
    assert "| bias_act |" in (tmp_path / "report.md").read_text()
    table = json.loads((tmp_path / "dispatch.json").read_text())  # per bucket, what each backend took
    assert table["format"] == 1 and table["device_class"] == "cpu"
    entry = table["entries"]["bias_act"]["fp32 n2^8 fwd+bwd"]
    assert {"cpu", "reference"} <= set(entry["ms"]) and entry["winner"] in entry["ms"]
    assert "torch eager" in entry["peers"] and entry["torch"]["impl"] == "torch eager"
    pytest.importorskip("matplotlib")
    assert (tmp_path / "bias_act.png").stat().st_size > 1000

    # compare mode against itself: no regression
    res = tmp_path / "results.json"
    cmp = _bench("--compare", str(res), str(res))
    assert cmp.returncode == 0 and "0 regression(s)" in cmp.stdout


def test_dispatch_entries_from_every_case_format():
    """Each benchmark's case string maps to the bucket select() computes; fastlm backends compete,
    peers are information, and torch's own op is named when it beats them."""
    from benchmarks.common import Row
    from benchmarks.report import dispatch_entries, dispatch_lines

    rows = [Row("attention", "4x16x4096x128 bfloat16 causal", impl, "fwd+bwd", ms) for impl, ms in
            (("fastlm:cuda", 3.0), ("fastlm:triton", 2.0), ("sdpa:flash", 1.5), ("compile(math)", 9.0))]
    rows += [Row("attention", "4x16x4096x128 bfloat16 causal", "fastlm:cuda", "bwd", 1.0),  # bwd rows: no bucket
             Row("attention", "decode 1x32x1x32768x128 float16", "fastlm:cuda", "fwd", 0.5),
             Row("attention", "decode 1x32x1x32768x128 float16", "fastlm:triton", "fwd", None, note="WRONG: x"),
             Row("norms", "rms_norm 8192x4096 bfloat16 +residual", "fastlm:triton", "fwd", 0.2),
             Row("softmax", "4096x1000 float32 scale+mask", "fastlm:cuda", "fwd", 0.1),
             Row("linear", "M8192 K4096 N16384 bfloat16 bias+gelu", "fastlm:cuda", "fwd", 4.0),
             Row("linear", "M8192 K4096 N16384 bfloat16 bias+gelu", "torch._addmm_activation", "fwd", 3.0),
             Row("model", "gpt2 B=1 T=1024 bfloat16", "fastlm", "fwd", 9.0)]
    entries = dispatch_entries(rows, {"commit": "abc"})
    train = entries["attention"]["bf16 d128 causal prefill T2^12 fwd+bwd"]
    assert train["ms"] == {"cuda": 3.0, "triton": 2.0} and train["winner"] == "triton"
    assert train["torch"] == {"impl": "sdpa:flash", "ms": 1.5} and train["slower_than_torch"]
    assert train["peers"] == {"sdpa:flash": 1.5, "compile(math)": 9.0} and train["source"]["commit"] == "abc"
    assert entries["attention"]["fp16 d128 full decode T2^15 fwd"]["ms"] == {"cuda": 0.5}  # a wrong result never counts
    assert set(entries) == {"attention", "rms_norm", "softmax", "linear"}
    assert "fp32 n2^10 fwd" in entries["softmax"] and "bf16 n2^12 fwd" in entries["rms_norm"]
    assert entries["linear"]["bf16 m2^13 k2^12 n2^14 fwd"]["slower_than_torch"]
    assert dispatch_lines(entries)[0] == ("attention [bf16 d128 causal prefill T2^12 fwd+bwd]: triton 2 ms < cuda 3 ms; "
                                          "torch's own op is faster: sdpa:flash 1.5 ms")


def test_bench_buckets_match_what_select_computes():
    import torch

    import fastlm
    from fastlm import backend
    from benchmarks.common import Row
    from benchmarks.report import bucket_of

    q, k, v = (torch.randn(1, 2, 64, 16, requires_grad=True) for _ in range(3))
    x, r, w = torch.randn(8, 64, requires_grad=True), torch.randn(8, 64), torch.randn(64)
    with backend.record_buckets() as seen:
        fastlm.ops.scaled_dot_product_attention(q, k, v, is_causal=True)
        with torch.no_grad():
            fastlm.ops.rms_norm(x, (64,), w, 1e-6, residual=r)
    assert seen == [bucket_of(Row("attention", "1x2x64x16 float32 causal", "fastlm:cpu", "fwd+bwd", 1.0)),
                    bucket_of(Row("norms", "rms_norm 8x64 float32 +residual", "fastlm:cpu", "fwd", 1.0))]


def test_compare_flags_regressions(tmp_path):
    rows = [{"op": "x", "case": "c", "impl": "i", "mode": "fwd", "ms": 1.0}]
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps({"meta": {}, "rows": rows}))
    new.write_text(json.dumps({"meta": {}, "rows": [dict(rows[0], ms=1.5)]}))
    out = _bench("--compare", str(old), str(new), "--threshold", "0.2")
    assert out.returncode == 1 and "REGRESSION" in out.stdout and "1 regression(s) beyond 20%" in out.stdout


def test_bad_op_is_named():
    out = _bench("--ops", "nope")
    assert out.returncode == 2 and "--ops: unknown op(s) nope" in out.stderr


def test_pytest_benchmark_suite_runs():
    """The pytest-benchmark suite, each case checked and run once (no timing)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_pytest_suite.py", "--benchmark-disable",
                          "-q", "-p", "no:cacheprovider"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "12 passed" in out.stdout


def test_smoke_rope_and_patch_benchmarks(tmp_path):
    """The rope op and the patched-Llama training step run end to end, correctness checked first."""
    pytest.importorskip("transformers")
    out = _bench("--smoke", "--ops", "rope,patch", "--device", "cpu", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert all(not r["note"].startswith("WRONG") for r in rows)
    patched = [r for r in rows if r["op"] == "patch" and r["impl"] == "fastlm.patch"]
    assert len(patched) == 1 and patched[0]["ms"] and "grad rel err" in patched[0]["note"]
    assert {r["impl"] for r in rows if r["op"] == "rope" and r["ms"]} >= {"fastlm:cpu", "torch eager"}


def test_smoke_attention_options_benchmark(tmp_path):
    """Window, varlen and paged-decode rows run end to end, each checked against the oracle first."""
    out = _bench("--smoke", "--ops", "attention_options", "--device", "cpu", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert all(not r["note"].startswith(("WRONG", "failed")) for r in rows), [r["note"] for r in rows]
    timed = {r["impl"] for r in rows if r["ms"]}
    assert {"fastlm:cpu window", "fastlm:cpu varlen", "sdpa:cpu mask", "sdpa:cpu contiguous"} <= timed, timed


def test_smoke_moe_benchmark(tmp_path):
    """The MoE layer against HF Mixtral's block (eager and grouped_mm), correctness checked first,
    and the routing balance / drop-rate table for each router kind and capacity factor."""
    pytest.importorskip("transformers")
    out = _bench("--smoke", "--ops", "moe", "--device", "cpu", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert all(not r["note"].startswith(("WRONG", "failed")) for r in rows), [r["note"] for r in rows]
    timed = {(r["impl"], r["mode"]) for r in rows if r["ms"]}
    want = {("HF eager", "fwd+bwd")} | ({("fastlm:cpu", "fwd+bwd")} if hasattr(torch.ops.fastlm, "grouped_linear_fwd")
                                        else set())
    assert want <= timed, timed
    routing = [r for r in rows if r["impl"].startswith("routing")]
    assert len(routing) == 9 and all("dropped" in r["note"] for r in routing)
