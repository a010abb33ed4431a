"""scripts/gpu_check.sh in its --dry-run mode (what CI can run without a GPU): every stage walks
its real command line CPU-sized, and the summary and the one archive are written whatever
happens; a small budget skips the later stages and says so. Plus the per-test deadline plugin."""
import os
import re
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
STAGES = ("build", "tests", "headline", "full")


def _dry_run(out, budget, timeout=300, **extra_env):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra_env)
    return subprocess.run(["bash", SCRIPT, str(out), "--budget", str(budget), "--dry-run"], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=timeout)


def _stages(summary: str) -> dict:
    """stage -> (status, rest of the line) from summary.txt's table."""
    found = {}
    for line in summary.splitlines():
        m = re.match(r"^(\w+)\s+(ok|failed|timeout|skipped)\s+(.*)$", line)
        if m and m.group(1) in STAGES:
            found[m.group(1)] = (m.group(2), m.group(3))
    return found


def test_dry_run_walks_every_stage(tmp_path):
    res = _dry_run(tmp_path, 400)
    summary = (tmp_path / "summary.txt").read_text()
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    stages = _stages(summary)
    assert {s: st for s, (st, _) in stages.items()} == {s: "ok" for s in STAGES}, summary
    assert re.search(r"[1-9]\d*/\d+ tests collected", stages["tests"][1]), summary  # the GPU selection isn't empty
    for field in ("commit:", "device:", "versions: python", "torch", "triton", "budget:   400 s"):
        assert field in summary
    assert sorted(os.listdir(tmp_path)) == ["gpu_check.tar.gz", "summary.txt"]  # a handful of files come back
    with tarfile.open(tmp_path / "gpu_check.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"gpu_check/logs/{s}.log" for s in STAGES} | {"gpu_check/summary.txt"} <= names
    assert {"gpu_check/results/headline/results.json", "gpu_check/results/full/results.json"} <= names


def test_small_budget_skips_later_stages(tmp_path):
    # dry-run estimates: build 20 s, tests 20 s, headline and full raised to 100 s here (a quick
    # machine finishes build and tests early enough to fit the default 40 s full stage); 3 s kept
    # for the archive. 60 s: build runs, tests runs if the machine is quick enough, the rest can't fit
    res = _dry_run(tmp_path, 60, FASTLM_EST_HEADLINE="100", FASTLM_EST_FULL="100")
    summary = (tmp_path / "summary.txt").read_text()
    assert res.returncode in (0, 1), res.stdout[-3000:] + res.stderr[-2000:]
    stages = _stages(summary)
    assert set(stages) == set(STAGES), summary
    assert stages["build"][0] == "ok", summary
    assert stages["tests"][0] in ("ok", "skipped", "timeout"), summary
    for late in ("headline", "full"):
        assert stages[late][0] == "skipped" and "s left" in stages[late][1], summary
    with tarfile.open(tmp_path / "gpu_check.tar.gz") as tar:
        assert "gpu_check/logs/build.log" in tar.getnames()


def test_bad_arguments_are_refused(tmp_path):
    for args in ([], [str(tmp_path)], [str(tmp_path), "--budget", "soon"], [str(tmp_path), "--budget", "9", "--nope"]):
        res = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=30)
        assert res.returncode == 2 and "usage: scripts/gpu_check.sh OUT --budget SECONDS" in res.stderr


def test_deadline_plugin_ends_a_hung_test(tmp_path):
    (tmp_path / "test_hang.py").write_text("import time\n\ndef test_ok():\n    pass\n\n"
                                           "def test_hangs():\n    time.sleep(60)\n")
    env = dict(os.environ, FASTLM_TEST_DEADLINE="2", PYTHONPATH=os.path.join(ROOT, "scripts"))
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "pytest_deadline", "-p", "no:cacheprovider", "-v",
                          "test_hang.py"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert res.returncode != 0
    assert "test_ok PASSED" in res.stdout and "test_hangs" in res.stdout
    assert "Timeout" in res.stderr and "test_hang.py" in res.stderr, res.stderr[-2000:]
