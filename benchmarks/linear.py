"""linear: act(x @ w^T + b) (GEMM + fused epilogue) and the GPT-2 MLP shapes, every fastlm backend
vs torch eager (F.linear then F.gelu), torch._addmm_activation (the cuBLASLt epilogue) and
torch.compile, in TFLOP/s and % of the plain matmul (x @ w^T) rate of the same shape and run.
On CPU fp32 also "fastlm:cpu prepacked": the forward with the weight packed once for the GEMM
(fastlm.ops.linear_prepacked, what fastlm.nn.Linear.prepack uses for inference)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import copies_for, headline, smoke, time_impls, time_ms
from fastlm import backend as registry
from fastlm.ops.linear import linear, linear_ref
from fastlm.ops.linear_prepacked import PackedWeight, linear_prepacked, prepack_available

OP = "linear"


def shapes(device: torch.device, quick: bool):
    """(M, K, N): GPT-2 B*T = 8192 at widths 768/1024/1280/1600 (d -> 4d and 4d -> d), then cubes.
    Headline: 4096^3."""
    if smoke():
        return [(64, 128, 256)]
    if headline():
        return [(4096, 4096, 4096)] if device.type == "cuda" else [(2048, 768, 3072)]
    if device.type == "cpu":
        return [(2048, 768, 3072), (2048, 3072, 768)][: 1 if quick else None]
    gpt = [(8192, d, 4 * d) for d in (768, 1024, 1280, 1600)] + [(8192, 4 * d, d) for d in (768, 1024, 1280, 1600)]
    return [(8192, 768, 3072), (8192, 3072, 768), (4096, 4096, 4096)] if quick else gpt + [(4096,) * 3, (8192,) * 3]


def dtypes(device: torch.device):
    if headline():
        return [torch.bfloat16 if device.type == "cuda" else torch.float32]
    return [torch.bfloat16, torch.float16] if device.type == "cuda" else [torch.float32, torch.bfloat16]


def _eager(x, w, b):
    return F.gelu(F.linear(x, w, b))


def _addmm_act(x, w, b):
    return torch._addmm_activation(b, x, w.t(), use_gelu=True)


def run(device: torch.device, quick: bool, ceilings: dict, progress=print) -> list:
    rows = []
    compiled = torch.compile(_eager, fullgraph=True)
    for dtype in dtypes(device)[: 1 if quick else None]:
        for m, k, n in shapes(device, quick):
            case = f"M{m} K{k} N{n} {str(dtype)[6:]} bias+gelu"
            progress(f"  {OP} {case}")
            elt = torch.finfo(dtype).bits // 8
            copies = copies_for((m * k + m * n) * elt, device)
            xs = [torch.randn(m, k, device=device, dtype=dtype, requires_grad=True) for _ in range(copies)]
            w = (torch.randn(n, k, device=device) / k**0.5).to(dtype).requires_grad_()
            b = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
            gy = torch.randn(m, n, device=device, dtype=dtype)
            matmul = lambda x, w_, b_: x @ w_.t()  # noqa: E731  (the ceiling: same shape, no epilogue)
            impls = {"torch matmul (x @ w^T)": matmul}
            for name in registry.BACKENDS:
                if name in ("triton", "reference") and device.type == "cpu":
                    continue  # the interpreter / the oracle are not contenders
                if not registry.why_not(OP, name, device, xs[0], w):
                    impls[f"fastlm:{name}"] = lambda x, w_, b_, _n=name: linear(x, w_, b_, activation="gelu", backend=_n)
            if device.type == "cpu" and dtype == torch.float32 and prepack_available():
                packed = PackedWeight()  # inference with the weight packed once (fastlm.nn.Linear.prepack)
                impls["fastlm:cpu prepacked"] = lambda x, w_, b_: linear_prepacked(x, packed, w_, b_, activation="gelu")
            impls["torch eager"] = _eager
            impls["torch._addmm_activation"] = _addmm_act
            impls["torch.compile"] = compiled
            with torch.no_grad():
                ref = linear_ref(xs[0][:256].float(), w.float(), b.float(), activation="gelu")
                ref_plain = xs[0][:256].float() @ w.float().t()
            plain = {}

            def check(fn):
                with torch.no_grad():
                    y = fn(xs[0], w, b)[:256].float()
                err = (y - (ref_plain if fn is matmul else ref)).abs().max().item()
                tol = 1e-3 if dtype == torch.float32 else 0.1
                return None if err <= tol else f"max err {err:.3g} > {tol}"

            def step_for(fn, mode):
                if mode == "fwd":
                    def step(i):
                        with torch.no_grad():
                            fn(xs[i % copies], w, b)
                else:
                    def step(i):
                        x = xs[i % copies]
                        torch.autograd.grad(fn(x, w, b), (x, w, b), gy, allow_unused=True)
                return step

            def rate(mode, ms):
                tflops = (2 if mode == "fwd" else 6) * m * n * k / (ms * 1e-3) / 1e12
                plain.setdefault(mode, tflops)  # the matmul row runs first
                return {"tflops": tflops, "pct_ceiling": 100 * tflops / plain[mode]}

            modes = {"torch._addmm_activation": ("fwd",), "fastlm:cpu prepacked": ("fwd",)}
            if device.type == "cpu" and quick:
                modes = {**modes, **{i: ("fwd",) for i in impls}}
            rows += time_impls(OP, case, impls, check, step_for, modes, device, rate)
    return rows
