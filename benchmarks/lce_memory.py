"""Peak memory and time of one forward+backward of the LM-head loss: fastlm's
linear_cross_entropy against F.linear + F.cross_entropy.

    python -m benchmarks.lce_memory [--n 8192] [--v 50257] [--d 768] [--dtype float32] [--device cpu]

Method. Each implementation runs in its own fresh subprocess, so allocator caches and earlier
peaks can't leak between them. On CPU, torch's allocator keeps no statistics, so the child reads
its resident-set high-water mark (VmHWM in /proc/self/status) and reports the peak above its
RSS just before the step (inputs already allocated, and touched). On CUDA it reports
torch.cuda.max_memory_allocated() above memory_allocated() before the step. Both count every
tensor the step creates (logits, softmax temporaries, gradients).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

IMPLS = ("torch", "fastlm")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(impl: str, n: int, v: int, d: int, dtype_name: str, device_name: str) -> dict:
    import torch
    import torch.nn.functional as F

    from fastlm.ops import linear_cross_entropy

    device, dtype = torch.device(device_name), getattr(torch, dtype_name)
    torch.manual_seed(0)
    h = (torch.randn(n, d, device=device, dtype=dtype) / d**0.5).requires_grad_()
    w = (torch.randn(v, d, device=device, dtype=dtype) / d**0.5).requires_grad_()
    t = torch.randint(0, v, (n,), device=device)
    if impl == "torch":
        fn = lambda: F.cross_entropy(F.linear(h, w), t)  # noqa: E731
    else:
        fn = lambda: linear_cross_entropy(h, w, t)  # noqa: E731
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    loss = fn()
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kib("VmHWM") * 1024) - base
    return {"impl": impl, "peak_bytes": peak, "ms": ms, "loss": float(loss)}


def measure(n: int, v: int, d: int, dtype: str = "float32", device: str = "cpu") -> dict:
    """{impl: {peak_bytes, ms, loss}} from one fresh subprocess per implementation."""
    out = {}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for impl in IMPLS:
        cmd = [sys.executable, "-m", "benchmarks.lce_memory", "--child", impl, "--n", str(n), "--v", str(v),
               "--d", str(d), "--dtype", dtype, "--device", device]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
        if res.returncode != 0:
            out[impl] = {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"rc {res.returncode}"}
            continue
        out[impl] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lce_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--v", type=int, default=50257)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.n, a.v, a.d, a.dtype, a.device)))
        return 0
    res = measure(a.n, a.v, a.d, a.dtype, a.device)
    for impl, r in res.items():
        if "error" in r:
            print(f"{impl:7s} failed: {r['error']}")
        else:
            print(f"{impl:7s} peak +{r['peak_bytes'] / 2**20:9.1f} MiB  {r['ms']:9.1f} ms  loss {r['loss']:.6f}")
    if all("peak_bytes" in r for r in res.values()):
        print(f"fastlm / torch peak memory: {res['fastlm']['peak_bytes'] / res['torch']['peak_bytes']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
