"""bias_act: act(x + bias) forward and forward+backward, every fastlm backend vs torch eager
(x + b, then the activation) and torch.compile of the same, in GB/s and % of copy bandwidth."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import Row, copies_for, smoke, time_impls
from fastlm import backend as registry
from fastlm.ops.bias_act import bias_act, bias_act_ref

OP = "bias_act"


def shapes(device: torch.device, quick: bool):
    if smoke():
        return [(64, 256)]
    if device.type == "cuda":
        return [(8192, 768), (8192, 3072), (4096, 4096), (16384, 8192)][: 2 if quick else None]
    return [(1024, 1024), (4096, 4096)] if quick else [(1024, 1024), (4096, 4096), (8192, 3072)]


def dtypes(device: torch.device):
    return [torch.bfloat16, torch.float16, torch.float32] if device.type == "cuda" else [torch.float32, torch.bfloat16]


def _eager(x, b):
    return F.gelu(x + b)


def run(device: torch.device, quick: bool, ceilings: dict, progress=print) -> list[Row]:
    rows: list[Row] = []
    compiled = torch.compile(_eager, fullgraph=True)
    for dtype in dtypes(device):
        for m, n in shapes(device, quick):
            case = f"{m}x{n} {str(dtype)[6:]} gelu"
            progress(f"  {OP} {case}")
            elt = torch.finfo(dtype).bits // 8
            copies = copies_for(m * n * elt, device)
            xs = [torch.randn(m, n, device=device, dtype=dtype, requires_grad=True) for _ in range(copies)]
            b = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
            gy = torch.randn(m, n, device=device, dtype=dtype)
            bytes_fwd = (2 * m * n + n) * elt  # read x, bias; write y
            bytes_fb = bytes_fwd + (3 * m * n + 2 * n) * elt  # + read gy, x; write gx; bias, grad_bias
            impls = {}
            for name in registry.BACKENDS:
                if name == "triton" and device.type == "cpu":
                    continue  # the interpreter is a correctness tool, not a contender
                if not registry.why_not(OP, name, device, xs[0], b, "gelu"):
                    impls[f"fastlm:{name}"] = lambda x, bb, _n=name: bias_act(x, bb, "gelu", backend=_n)
            impls["torch eager"] = _eager
            impls["torch.compile"] = compiled
            ref = bias_act_ref(xs[0].detach().double(), b.detach().double())
            tol = 1e-4 if dtype == torch.float32 else 5e-2

            def check(fn):
                err = (fn(xs[0], b).double() - ref).abs().max().item()
                return None if err <= tol else f"max err {err:.3g} > {tol}"

            def step_for(fn, mode):
                if mode == "fwd":
                    def step(i):
                        with torch.no_grad():
                            fn(xs[i % copies], b)
                else:
                    def step(i):
                        x = xs[i % copies]
                        torch.autograd.grad(fn(x, b), (x, b), gy)
                return step

            def rate(mode, ms):
                gbps = (bytes_fwd if mode == "fwd" else bytes_fb) / (ms * 1e-3) / 1e9
                return dict(gbps=gbps, pct_ceiling=100 * gbps / ceilings["copy_gbps"], size=f"{m}x{n}", dtype=str(dtype)[6:])

            rows += time_impls(OP, case, impls, check, step_for, {}, device, rate)
    return rows
