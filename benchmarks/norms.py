"""layer_norm / rms_norm with the fused pre-norm residual add, every fastlm backend vs torch eager
(x + residual, then F.layer_norm / F.rms_norm), torch.compile and Liger-Kernel when importable,
in GB/s and % of the copy bandwidth of the same run."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import copies_for, headline, smoke, time_impls
from fastlm import backend as registry
from fastlm.ops.norms import layer_norm, rms_norm

OP = "norms"


def shapes(device: torch.device, quick: bool):
    if smoke():
        return [(64, 256)]
    if headline():
        return [(8192, 4096)] if device.type == "cuda" else [(8192, 768)]
    if device.type == "cuda":
        return [(8192, 768), (8192, 4096), (16384, 8192)][: 2 if quick else None]
    return [(8192, 768)] if quick else [(8192, 768), (4096, 4096)]


def dtypes(device: torch.device):
    if headline():
        return [torch.bfloat16 if device.type == "cuda" else torch.float32]
    return [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32, torch.bfloat16]


def _eager(kind):
    def f(x, r, w, b):
        h = x + r
        n = x.shape[-1]
        return (F.layer_norm(h, (n,), w, b) if kind == "layer_norm" else F.rms_norm(h, (n,), w, 1e-6)), h
    return f


def _liger(kind):
    try:
        if kind == "layer_norm":
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction as fn
            return lambda x, r, w, b: (fn.apply(x + r, w, b, 1e-5), None)
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction as fn
        return lambda x, r, w, b: (fn.apply(x + r, w, 1e-6, 0.0, "llama", False), None)  # in_place=False: gy is reused
    except Exception:  # not installed, or it can't import against this torch/Triton
        return None


def run(device: torch.device, quick: bool, ceilings: dict, progress=print) -> list:
    rows = []
    for kind in ("rms_norm",) if headline() else ("layer_norm", "rms_norm"):
        compiled = torch.compile(_eager(kind), fullgraph=True)
        for dtype in dtypes(device)[: 1 if quick else None]:
            for m, n in shapes(device, quick):
                case = f"{kind} {m}x{n} {str(dtype)[6:]} +residual"
                progress(f"  {OP} {case}")
                elt = torch.finfo(dtype).bits // 8
                copies = copies_for(2 * m * n * elt, device)
                xs = [torch.randn(m, n, device=device, dtype=dtype, requires_grad=True) for _ in range(copies)]
                rs = [torch.randn(m, n, device=device, dtype=dtype, requires_grad=True) for _ in range(copies)]
                w = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
                b = torch.randn(n, device=device, dtype=dtype, requires_grad=True) if kind == "layer_norm" else None
                gy = torch.randn(m, n, device=device, dtype=dtype)
                impls = {}
                for name in registry.BACKENDS:
                    if name in ("triton", "reference") and device.type == "cpu":
                        continue
                    if not registry.why_not(kind, name, device, xs[0], rs[0], w):
                        if kind == "layer_norm":
                            impls[f"fastlm:{name}"] = lambda x, r, w_, b_, _n=name: layer_norm(x, n, w_, b_, residual=r, backend=_n)
                        else:
                            impls[f"fastlm:{name}"] = lambda x, r, w_, b_, _n=name: rms_norm(x, n, w_, 1e-6, residual=r, backend=_n)
                impls["torch eager"] = _eager(kind)
                impls["torch.compile"] = compiled
                liger = _liger(kind) if device.type == "cuda" else None
                if liger is not None:
                    impls["Liger-Kernel"] = liger
                with torch.no_grad():
                    ref = _eager(kind)(xs[0].double(), rs[0].double(), w.double(), None if b is None else b.double())[0]

                def check(fn):
                    with torch.no_grad():
                        err = (fn(xs[0], rs[0], w, b)[0].double() - ref).abs().max().item()
                    tol = 1e-4 if dtype == torch.float32 else 0.1
                    return None if err <= tol else f"max err {err:.3g} > {tol}"

                def step_for(fn, mode):
                    if mode == "fwd":
                        def step(i):
                            with torch.no_grad():
                                fn(xs[i % copies], rs[i % copies], w, b)
                    else:
                        def step(i):
                            x, r = xs[i % copies], rs[i % copies]
                            y, _ = fn(x, r, w, b)
                            torch.autograd.grad(y, [t for t in (x, r, w, b) if t is not None], gy)
                    return step

                def rate(mode, ms):
                    # fwd: read x, r; write h, y. bwd adds: read gy, h; write grad (x and r share it)
                    nbytes = (4 if mode == "fwd" else 7) * m * n * elt
                    gbps = nbytes / (ms * 1e-3) / 1e9
                    return {"gbps": gbps, "pct_ceiling": 100 * gbps / ceilings["copy_gbps"]}

                modes = {i: ("fwd",) for i in impls} if (device.type == "cpu" and quick) else {}
                rows += time_impls(OP, case, impls, check, step_for, modes, device, rate)
    return rows
