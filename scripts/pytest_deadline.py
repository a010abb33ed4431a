"""A per-test deadline for pytest without pytest-timeout: `-p pytest_deadline` with this folder on
PYTHONPATH and FASTLM_TEST_DEADLINE=<seconds>. A test still running at its deadline gets every
thread's traceback written to stderr and the whole run ends at once (exit status 1): a hung GPU
kernel can't be interrupted from Python anyway, and the run is fail-fast. Run pytest with -v so
the log names the test. Built on faulthandler, so don't combine it with pytest's own
faulthandler_timeout (faulthandler keeps one timer per process)."""
import faulthandler
import os

import pytest

DEADLINE = float(os.environ.get("FASTLM_TEST_DEADLINE") or 0)
# pytest's fd capture points fd 2 at a temporary file while a test runs; keep the real stderr
# (-p plugins are imported before capture starts)
_STDERR = os.fdopen(os.dup(2), "w") if DEADLINE > 0 else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if DEADLINE > 0:
        faulthandler.dump_traceback_later(DEADLINE, exit=True, file=_STDERR)
    try:
        yield
    finally:
        if DEADLINE > 0:
            faulthandler.cancel_dump_traceback_later()
