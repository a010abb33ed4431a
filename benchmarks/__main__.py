"""python -m benchmarks [--quick | --smoke] [--headline] [--ops bias_act,...] [--device cpu|cuda] [--out DIR]
       python -m benchmarks --compare OLD.json NEW.json [--threshold 0.1]

Checks each op against its reference, times every available backend and peer, and writes the
table, results.json, report.md, dispatch.json and plots under benchmarks/results/<device-name>/.
On a GPU (not --smoke) it also merges the per-bucket times into the shipped dispatch table
fastlm/dispatch/<device-class>.json, from which fastlm's `auto` picks the fastest backend."""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import signal
import subprocess
import sys
import time

import torch

from benchmarks import common, compare, report

OPS = ["bias_act", "attention", "attention_options", "softmax", "cross_entropy", "linear", "norms", "rope", "moe", "model",
       "patch"]
# --headline: what a short GPU session measures first (each module's shapes() picks the cases)
HEADLINE_OPS = ["attention", "linear", "cross_entropy", "softmax", "norms", "model"]


class _Stopped(BaseException):  # not Exception: the benchmarks catch those per implementation
    """SIGTERM (e.g. `timeout` at the end of a time budget): write what was measured, then exit."""


def _stop(signum, frame):
    raise _Stopped(f"stopped by signal {signum}")


def _git_commit() -> str:
    if os.environ.get("FASTLM_COMMIT"):  # scripts/gpu_check.sh sets it (a copied tree may have no .git)
        return os.environ["FASTLM_COMMIT"][:12]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.check_output(["git", "-C", here, "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _triton_version() -> str:
    try:
        import triton
    except Exception:  # not installed, or it can't import here
        return "not importable"
    return triton.__version__


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer, smaller shapes (about a minute on a laptop CPU)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, few repetitions: proves the pipeline (CI)")
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="diff two results.json files and exit")
    p.add_argument("--threshold", type=float, default=0.10, help="--compare: slowdown flagged as a regression")
    p.add_argument("--headline", action="store_true",
                   help="only the headline cases: attention D=128 T=4k/8k, GEMM+bias+GELU 4096^3, cross-entropy, "
                        "softmax, RMSNorm, one GPT-2 124M training step (bf16 on GPU); combines with --smoke")
    p.add_argument("--ops", default=None, help=f"comma-separated subset of {','.join(OPS)} (default: all, "
                                               f"or {','.join(HEADLINE_OPS)} with --headline)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--system-malloc", action="store_true",
                   help="CPU: leave glibc's default of unmapping big freed buffers (see common.keep_freed_memory)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device-name>)")
    p.add_argument("--no-dispatch-table", action="store_true",
                   help="GPU: don't merge this run's times into fastlm/dispatch/<device-class>.json")
    args = p.parse_args(argv)
    if args.compare:
        lines, regressions = compare.compare(*args.compare, args.threshold)
        print("\n".join(lines))
        return 1 if regressions else 0
    common.SMOKE = args.smoke
    common.HEADLINE = args.headline
    args.quick = args.quick or args.smoke
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    mode += " headline" if args.headline else ""
    args.ops = args.ops or ",".join(HEADLINE_OPS if args.headline else OPS)
    unknown = [o for o in args.ops.split(",") if o not in OPS]
    if unknown:
        p.error(f"--ops: unknown op(s) {', '.join(unknown)}; choose from {', '.join(OPS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    started = time.perf_counter()
    malloc = "system default"
    if device.type == "cpu" and not args.system_malloc and common.keep_freed_memory():
        malloc = "glibc, freed memory kept (mmap threshold 32 MiB, no trim)"
    import fastlm  # noqa: F401  (after arg parsing: its import warning, if any, is informative here)

    print(f"fastlm benchmarks on {common.device_name(device)} ({mode} mode, malloc: {malloc})", flush=True)
    print("  measuring ceilings: copy bandwidth, matmul rate", flush=True)
    ceilings = {"copy_gbps": common.copy_bandwidth_gbps(device, args.quick),
                "matmul_tflops": common.matmul_tflops(device, args.quick)}
    print(f"  copy {ceilings['copy_gbps']:.1f} GB/s, matmul {ceilings['matmul_tflops']:.2f} TFLOP/s", flush=True)
    rows = []
    ops = args.ops.split(",")
    stopped = None
    signal.signal(signal.SIGTERM, _stop)
    try:
        for k, op in enumerate(ops, 1):
            print(f"[{k}/{len(ops)}] {op} ({time.perf_counter() - started:.0f} s elapsed)", flush=True)
            module = importlib.import_module(f"benchmarks.{op}")
            rows += module.run(device, args.quick, ceilings, progress=lambda s: print(s, flush=True))
    except _Stopped as exc:  # keep the ops finished so far (the one under way is lost)
        stopped = f"{exc} during {op}; ops after it not run"
        print(stopped, file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    meta = {
        "device_name": common.device_name(device),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "mode": mode,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "malloc": malloc,
        "copy_gbps": round(ceilings["copy_gbps"], 2),
        "matmul_tflops": round(ceilings["matmul_tflops"], 3),
        "python": sys.version.split()[0],
        "triton": _triton_version(),
    }
    if stopped:
        meta["partial"] = stopped
    print()
    print("\n".join(report.table(rows)))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", meta["device_name"])
    for path in report.write(out, meta, rows):
        print(f"wrote {path}")
    _dispatch_table(device, out, meta, rows, write_shipped=not (args.smoke or args.no_dispatch_table or stopped))
    wrong = [r for r in rows if r.note.startswith("WRONG")]
    print(f"total {time.perf_counter() - started:.1f} s")
    if wrong:
        print(f"{len(wrong)} implementation(s) gave wrong results", file=sys.stderr)
        return 1
    return 124 if stopped else 0


def _dispatch_table(device, out: str, meta: dict, rows, write_shipped: bool) -> None:
    """Which backend won each op and size bucket: dispatch.json beside the results, and on a GPU
    merged into the table shipped in the package."""
    from fastlm import backend
    from fastlm.dispatch import tables

    entries = report.dispatch_entries(rows, meta)
    cls = backend.device_class(device) if device.type == "cuda" else device.type
    print("\ndispatch (fastest fastlm backend per op and size bucket):")
    print("\n".join("  " + line for line in report.dispatch_lines(entries)) or "  nothing measured")
    print(f"wrote {report.write_dispatch(out, cls, entries)}")
    if device.type == "cuda" and write_shipped and entries:
        path = tables.shipped_path(cls)
        tables.write(path, cls, entries)
        print(f"wrote {path} (merged; commit it with the results)")


if __name__ == "__main__":
    sys.exit(main())
