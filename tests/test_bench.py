"""The benchmark pipeline end to end in smoke mode (tiny shapes): it checks correctness, then
writes the table, results.json, report.md and a plot. No timing is asserted."""
import json
import os
import subprocess
import sys

import pytest

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
    pytest.importorskip("matplotlib")
    assert (tmp_path / "bias_act.png").stat().st_size > 1000

    # compare mode against itself: no regression
    res = tmp_path / "results.json"
    cmp = _bench("--compare", str(res), str(res))
    assert cmp.returncode == 0 and "0 regression(s)" in cmp.stdout


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
