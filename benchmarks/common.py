"""Timing, ceilings and result rows shared by every benchmark module.

Method: correctness against the reference first, then a median over repeated runs after a
warm-up, cycling through several input copies so caches don't flatter small sizes. Every
throughput is also shown as a share of a ceiling measured in the same run: device copy
bandwidth for memory-bound ops, a large matmul's rate for compute-bound ones.
"""
from __future__ import annotations

import dataclasses
import platform
import random
import re
import statistics
import time
from typing import Callable

import torch


# Smoke mode (CI): tiny shapes and a few repetitions; proves the pipeline, measures nothing.
SMOKE = False


def smoke() -> bool:
    return SMOKE


# Headline mode (--headline): only the cases a short GPU session must measure (see each module's
# shapes()); it combines with --smoke, which then shrinks them to CPU-sized pipeline checks.
HEADLINE = False


def headline() -> bool:
    return HEADLINE


@dataclasses.dataclass
class Row:
    op: str
    case: str  # shape/dtype description
    impl: str  # "fastlm:cpu", "torch eager", "torch.compile", ...
    mode: str  # "fwd", "fwd+bwd", ...
    ms: float | None
    gbps: float | None = None
    tflops: float | None = None
    pct_ceiling: float | None = None
    vs_eager: float | None = None  # eager time / this time (>1 = faster than eager)
    note: str = ""
    tokens_per_s: float | None = None  # model rows: training / generation throughput
    size: str = ""  # the x axis of the plots, e.g. "4096x4096" (default: the case)
    dtype: str = ""  # plots get one panel per (mode, dtype)
    bucket: str = ""  # dispatch-table key (fastlm.backend.bucket); "" = derived from op and case by report.py


def contenders(op: str, device: torch.device, *inputs) -> list[str]:
    """fastlm's backends that can serve op on these inputs and are worth timing: not the reference,
    and on CPU neither the Triton interpreter nor the emulator (correctness tools, not contenders)."""
    from fastlm import backend as registry

    return [n for n in registry.BACKENDS if n not in ("reference", "cuda-emu")
            and not (n == "triton" and device.type == "cpu") and not registry.why_not(op, n, device, *inputs)]


def device_name(device: torch.device) -> str:
    """Folder-friendly name of the hardware, e.g. nvidia-h100-80gb-hbm3 or cpu-intel-xeon-2c."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_model() + f" {torch.get_num_threads()}t"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "cpu " + line.split(":", 1)[1].replace("(R)", "").replace("Processor", "").strip()
    except OSError:
        pass
    return "cpu " + (platform.processor() or platform.machine())


def keep_freed_memory() -> bool:
    """Have glibc keep freed tensors' memory for reuse instead of handing it back to the OS.

    By default glibc serves each allocation past a moving threshold (up to 32 MiB) with a fresh
    mmap and unmaps it on free, so the next call's output is page-faulted in and zeroed again:
    about 1 us per 4 KiB page on this class of VM, which is 12-15 ms for two 25 MiB outputs,
    2-3x the kernel time of a layer norm. Whether a given call pays it flips with the
    allocation history, so the same benchmark swung between 0.7x and 1.5x run to run. Pinning
    the thresholds (what jemalloc or tcmalloc, the allocators Intel's PyTorch CPU guide
    recommends, do anyway) takes it out for every peer alike. Returns False off glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _once_ms(fn: Callable[[int], object], i: int, device: torch.device) -> float:
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn(i)
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)
    t0 = time.perf_counter()
    fn(i)
    return (time.perf_counter() - t0) * 1e3


def time_ms(fn: Callable[[int], object], device: torch.device, *, min_seconds: float = 0.25,
            warmup: int = 2, max_reps: int = 200) -> float:
    """Median milliseconds of fn(i), i cycling over input copies; CUDA events on GPU."""
    return time_interleaved({"fn": fn}, device, min_seconds=min_seconds, warmup=warmup, max_rounds=max_reps)["fn"]


def time_interleaved(steps: dict[str, Callable[[int], object]], device: torch.device, *,
                     min_seconds: float = 0.25, warmup: int = 2, min_rounds: int = 5,
                     max_rounds: int = 200) -> dict[str, float]:
    """Median milliseconds of each step, timed round-robin (one call of each per round), so that
    drifting load or memory state on the machine hits every implementation alike.

    Each call gets the next input copy (i counts calls, not rounds): with one copy per round,
    whoever ran first paid the cold reads and the rest found the inputs in cache. The order is
    shuffled every round (fixed seed) because a call also inherits its predecessor's cache
    state through the output buffers malloc hands back: after a peer that left its freed
    output hot in cache, an implementation writes faster than after one that streamed past it."""
    if SMOKE:
        min_seconds, warmup, min_rounds, max_rounds = 0.0, 1, 3, 3
    for fn in steps.values():
        for i in range(warmup):
            fn(i)
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    order, shuffle = list(steps), random.Random(0).shuffle
    start, rounds, calls = time.perf_counter(), 0, 0
    budget = min_seconds * len(steps)
    while rounds < min_rounds or (time.perf_counter() - start < budget and rounds < max_rounds):
        for name in order:
            samples[name].append(_once_ms(steps[name], calls, device))
            calls += 1
        shuffle(order)
        rounds += 1
    return {name: statistics.median(ts) for name, ts in samples.items()}


def copies_for(nbytes: int, device: torch.device) -> int:
    """How many input copies to rotate so the working set exceeds the last-level cache."""
    cache = 256 << 20 if device.type == "cpu" else 100 << 20
    return max(1, min(4, cache // max(nbytes, 1) + 1))


def copy_bandwidth_gbps(device: torch.device, quick: bool) -> float:
    """Device-to-device copy rate (read + write bytes), the memory-bound ceiling. Four 64 MiB
    sources on CPU: with two 32 MiB ones the rate read ~30% low on a 2-core VM, under what the
    fused norms then reached (their streaming stores skip the read-for-ownership a copy pays)."""
    n = (64 << 20 if quick else 256 << 20) // 4 if device.type == "cuda" else (64 << 20) // 4
    n = 1 << 20 if SMOKE else n
    srcs = [torch.randn(n, device=device) for _ in range(4 if device.type == "cpu" else 2)]
    dst = torch.empty(n, device=device)
    ms = time_ms(lambda i: dst.copy_(srcs[i % len(srcs)]), device)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, quick: bool) -> float:
    """A large matmul's rate: bf16 on GPU, fp32 on CPU; the compute-bound ceiling."""
    if device.type == "cuda":
        n, dtype = (4096 if quick else 8192), torch.bfloat16
    else:
        n, dtype = (1024 if quick else 2048), torch.float32
    n = 256 if SMOKE else n
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda i: a @ b, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _time_or_oom(steps: dict, device: torch.device) -> dict:
    """time_interleaved, except that when the peers together run out of device memory (big
    shapes x eager temporaries) each is timed alone, and one that still can't fit gets a note."""
    try:
        return time_interleaved(steps, device)
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out: dict = {}
    for name, step in steps.items():
        try:
            out[name] = time_ms(step, device)
        except torch.OutOfMemoryError as exc:
            out[name] = f"failed: out of memory ({exc})"[:120]
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def time_impls(op: str, case: str, impls: dict, check, step_for, modes: dict, device: torch.device,
               rate) -> list[Row]:
    """Check every impl with check(impl_fn) -> error string or None, then time step_for(fn, mode)
    per mode; rate(mode, ms) -> dict of Row throughput fields. vs_eager uses the "torch eager" row."""
    rows: list[Row] = []
    eager_ms: dict[str, float] = {}
    ok = {}
    for impl, fn in impls.items():
        try:
            err = check(fn)
        except Exception as exc:  # e.g. torch.compile without a working toolchain
            rows.append(Row(op, case, impl, "fwd", None, note=f"failed: {type(exc).__name__}: {exc}"[:200]))
            continue
        if err:
            rows.append(Row(op, case, impl, "fwd", None, note=f"WRONG: {err}"))
            continue
        ok[impl] = fn
    impl_modes = {impl: modes.get(impl, ("fwd", "fwd+bwd")) for impl in ok}
    for mode in dict.fromkeys(m for ms in impl_modes.values() for m in ms):
        steps = {impl: step_for(fn, mode) for impl, fn in ok.items() if mode in impl_modes[impl]}
        for impl, ms in _time_or_oom(steps, device).items():
            if isinstance(ms, str):
                rows.append(Row(op, case, impl, mode, None, note=ms))
                continue
            if impl == "torch eager":
                eager_ms[mode] = ms
            rows.append(Row(op, case, impl, mode, ms, **rate(mode, ms)))
    for r in rows:
        if r.ms and r.mode in eager_ms:
            r.vs_eager = eager_ms[r.mode] / r.ms
    return rows
