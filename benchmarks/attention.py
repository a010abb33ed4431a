"""attention: forward, backward and forward+backward TFLOP/s of every fastlm backend against
every SDPA backend torch offers on the device (flash, efficient, cudnn, math on CUDA; the CPU's
default kernel and math on CPU) and torch.compile of plain attention math; decode latency at
Tq = 1. Flops: forward 4*B*H*Tq*Tk*D, halved when causal; backward 2.5x the forward. The
"vs eager" column is the fastest torch SDPA backend's time in that row group over this one."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from benchmarks.common import Row, headline, smoke, time_ms
from fastlm import backend as registry
from fastlm.ops.attention import NO_CAUSAL, OP, TOP_LEFT, attention_forward_ref, scaled_dot_product_attention

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # older torch
    SDPBackend = sdpa_kernel = None


def shapes(device: torch.device, quick: bool):
    """(B, H, Tq, Tk, D) training shapes; B*T = 16k tokens and H*D = 2048 on GPU. Headline:
    D = 128 at T = 4k and 8k."""
    if smoke():
        return [(1, 2, 64, 64, 128 if headline() else 64)]
    if headline():
        return [(16384 // t, 16, t, t, 128) for t in (4096, 8192)] if device.type == "cuda" else [(1, 8, 1024, 1024, 128)]
    if device.type == "cuda":
        ts = [512, 1024, 2048, 4096, 8192, 16384][: 3 if quick else None]
        return [(16384 // t, 2048 // d, t, t, d) for d in (64, 128) for t in ts]
    if quick:
        return [(2, 8, 512, 512, 64)]
    return [(2, 8, 512, 512, 64), (1, 8, 1024, 1024, 64), (1, 8, 1024, 1024, 128)]


def decode_shapes(device: torch.device, quick: bool):
    if headline():
        return []
    tks = [4096, 32768] if quick else [4096, 8192, 16384, 32768]
    if device.type == "cpu":
        tks = [4096]
    return [(1, 32, 1, tk, 128) for tk in tks]


def dtypes(device: torch.device):
    if headline():
        return [torch.bfloat16 if device.type == "cuda" else torch.float32]
    return [torch.bfloat16, torch.float16] if device.type == "cuda" else [torch.float32, torch.bfloat16]


def _math(q, k, v, is_causal):
    s = (q @ k.transpose(-1, -2)) * (1 / math.sqrt(q.shape[-1]))
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), -math.inf)
    return torch.softmax(s.float(), -1).to(q.dtype) @ v


def _torch_sdpa(kind):
    def fn(q, k, v, is_causal):
        ctx = sdpa_kernel([getattr(SDPBackend, kind)]) if kind else contextlib.nullcontext()
        with ctx:
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    return fn


def impls(device, q, causal):
    out = {}
    for name in registry.BACKENDS:
        if name == "reference" or (name == "triton" and device.type == "cpu"):
            continue  # the reference is the oracle, the interpreter a correctness tool
        if not registry.why_not(OP, name, device, q, q, q, None, 0.0, TOP_LEFT if causal else NO_CAUSAL):
            out[f"fastlm:{name}"] = lambda a, b, c, ic, _n=name: scaled_dot_product_attention(a, b, c, is_causal=ic, backend=_n)
    if device.type == "cuda" and SDPBackend is not None:
        for kind in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            out[f"sdpa:{kind.split('_')[0].lower()}"] = _torch_sdpa(kind)
    else:
        out["sdpa:cpu"] = _torch_sdpa(None)
        if SDPBackend is not None:
            out["sdpa:math"] = _torch_sdpa("MATH")
    out["compile(math)"] = torch.compile(_math, fullgraph=True)
    return out


def run(device: torch.device, quick: bool, ceilings: dict, progress=print) -> list[Row]:
    rows: list[Row] = []
    peak = ceilings["matmul_tflops"]
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # one per shape/mode
    for dtype in dtypes(device):
        for (b, h, tq, tk, d) in shapes(device, quick):
            for causal in (True, False):
                case = f"{b}x{h}x{tq}x{d} {str(dtype)[6:]}{' causal' if causal else ''}"
                progress(f"  attention {case}")
                q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype, requires_grad=True) for t in (tq, tk, tk))
                g = torch.randn(b, h, tq, d, device=device, dtype=dtype)
                ref = attention_forward_ref(q.detach().double(), k.detach().double(), v.detach().double(), None, 0.0,
                                            TOP_LEFT if causal else NO_CAUSAL, 1 / math.sqrt(d), None)[0]
                fwd_flops = 4 * b * h * tq * tk * d / (2 if causal else 1)
                rows += _time_all(device, impls(device, q, causal), q, k, v, g, causal, ref, case, fwd_flops, peak)
        for (b, h, tq, tk, d) in decode_shapes(device, quick):
            case = f"decode {b}x{h}x{tq}x{tk}x{d} {str(dtype)[6:]}"
            progress(f"  attention {case}")
            q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype) for t in (tq, tk, tk))
            ref = attention_forward_ref(q.double(), k.double(), v.double(), None, 0.0, NO_CAUSAL, 1 / math.sqrt(d), None)[0]
            rows += _time_all(device, impls(device, q, False), q, k, v, None, False, ref, case,
                              4 * b * h * tq * tk * d, peak, modes=("fwd",))
    return rows


def _time_all(device, fns, q, k, v, g, causal, ref, case, fwd_flops, peak, modes=("fwd", "bwd", "fwd+bwd")):
    rows, base_ms = [], {}
    for impl, fn in fns.items():
        try:
            with torch.no_grad():
                out = fn(q, k, v, causal)
        except Exception as exc:  # a torch backend that can't take this shape/dtype/device
            rows.append(Row(OP, case, impl, "fwd", None, note=f"failed: {type(exc).__name__}: {exc}"[:160]))
            continue
        err = (out.double() - ref).abs().max().item()
        tol = 1e-4 if q.dtype == torch.float32 else 3e-2
        if not err <= tol:
            rows.append(Row(OP, case, impl, "fwd", None, note=f"WRONG: max err {err:.3g} > {tol}"))
            continue
        measured = {}
        for mode in [m for m in ("fwd", "fwd+bwd") if m in modes]:
            if mode == "fwd":
                def step(i, fn=fn):
                    with torch.no_grad():
                        fn(q, k, v, causal)
            else:
                def step(i, fn=fn):
                    torch.autograd.grad(fn(q, k, v, causal), (q, k, v), g)
            try:
                measured[mode] = time_ms(step, device)
            except Exception as exc:
                rows.append(Row(OP, case, impl, mode, None, note=f"failed: {type(exc).__name__}: {exc}"[:160]))
        if not all(m in measured for m in ("fwd", "fwd+bwd") if m in modes):
            continue
        if "bwd" in modes:  # (fwd+bwd) - fwd: works for compiled graphs too, which can't retain theirs
            measured["bwd"] = max(measured["fwd+bwd"] - measured["fwd"], 1e-9)
        for mode in modes:
            ms = measured[mode]
            flops = fwd_flops * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
            tflops = flops / (ms * 1e-3) / 1e12
            if impl.startswith("sdpa:") and (mode not in base_ms or ms < base_ms[mode]):
                base_ms[mode] = ms  # the fastest torch SDPA backend is the baseline
            rows.append(Row(OP, case, impl, mode, ms, tflops=tflops, pct_ceiling=100 * tflops / peak,
                            note="(fwd+bwd) - fwd" if mode == "bwd" else ""))
    for r in rows:
        if r.ms and r.mode in base_ms:
            r.vs_eager = base_ms[r.mode] / r.ms
    return rows
