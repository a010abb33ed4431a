import os
import random
import sys
import zlib

import pytest
import torch

# Without a GPU the triton backend is tested through its interpreter on CPU tensors.
# Must be set before any fastlm.triton module is imported (triton reads it at @jit time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
# Fresh draws every session, reproducible on demand: FASTLM_TEST_SEED=<the seed in the header>.
SESSION_SEED = int(os.environ.get("FASTLM_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    return f"fastlm test seed: FASTLM_TEST_SEED={SESSION_SEED}"


def pytest_terminal_summary(terminalreporter):
    """What ran under the SIMT emulator this session (csrc/emu), and how many Triton compiles
    tests/test_triton_aot.py checked (its module-level SUMMARY), for CI logs."""
    aot = getattr(sys.modules.get("test_triton_aot"), "SUMMARY", None)
    if aot and aot["compiles"]:
        targets = ", ".join(f"{n} {t}" for t, n in sorted(aot["targets"].items()))
        terminalreporter.write_line(f"Triton AOT: {aot['compiles']} kernel compiles checked ({targets}), "
                                    f"{aot['seconds']} s compiling")
    from fastlm import _ext

    if not _ext.HAS_EMULATOR:
        return
    launches, blocks, threads, accesses, barriers, collectives, faults = torch.ops.fastlm_emu.emu_stats()
    if launches:
        provoked = _EMU_FAULTS["provoked"]
        terminalreporter.write_line(
            f"SIMT emulator: {launches} kernel launches, {blocks} blocks, {threads} threads, {accesses} shared-memory "
            f"accesses checked, {barriers} barriers, {collectives} warp collectives; {faults} launches stopped by a "
            f"reported kernel error (race, out of bounds, uninitialized read, ...): {provoked} provoked on purpose "
            f"by the emulator's self-tests, {faults - provoked} in fastlm's kernels"
        )


_EMU_FAULTS = {"provoked": 0}


@pytest.fixture(autouse=True)
def _count_emulator_faults(request):
    """Splits the emulator's fault count into what its self-tests provoke and what fastlm's own
    kernels hit (a race or bad index in a kernel: the summary line's second number)."""
    from fastlm import _ext

    if not _ext.HAS_EMULATOR or request.node.module.__name__ != "test_emulator":
        yield
        return
    before = torch.ops.fastlm_emu.emu_stats()[6]
    yield
    _EMU_FAULTS["provoked"] += torch.ops.fastlm_emu.emu_stats()[6] - before


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_seed_and_nan_empties(request):
    """Fresh random draws per test, and every torch.empty (ours included) prefilled with NaN,
    so an output element a kernel forgets to write fails the comparison."""
    torch.manual_seed((zlib.crc32(request.node.nodeid.encode()) ^ SESSION_SEED) % (2**31))
    prev = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
