"""rope: q and k rotated in one pass (LLaMA shapes, GQA), forward and forward+backward, every
fastlm backend vs HF's apply_rotary_pos_emb in torch eager and torch.compile of it, and Liger's
rope where importable, in GB/s and % of copy bandwidth. The tables (B, T, D) are HF's."""
from __future__ import annotations

import torch

from benchmarks.common import Row, copies_for, smoke, time_impls
from fastlm import backend as registry
from fastlm.ops.rope import rope, rope_frequencies, rope_ref

OP = "rope"


def shapes(device: torch.device, quick: bool):
    """(B, Hq, Hk, T, D)"""
    if smoke():
        return [(1, 4, 2, 64, 64)]
    if device.type == "cuda":
        return [(1, 32, 8, 4096, 128), (8, 32, 8, 2048, 128), (16, 16, 16, 1024, 64)][: 2 if quick else None]
    return [(1, 8, 2, 512, 64)] if quick else [(1, 8, 2, 512, 64), (1, 32, 8, 1024, 128)]


def dtypes(device: torch.device):
    return [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32, torch.bfloat16]


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _eager(q, k, cos, sin):  # HF's LLaMA apply_rotary_pos_emb
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _liger():
    try:
        from liger_kernel.ops.rope import LigerRopeFunction
    except Exception:  # not installed, or no GPU build of it here
        return None
    return lambda q, k, cos, sin: LigerRopeFunction.apply(q, k, cos, sin)


def run(device: torch.device, quick: bool, ceilings: dict, progress=print) -> list[Row]:
    rows: list[Row] = []
    compiled = torch.compile(_eager, fullgraph=True)
    for dtype in dtypes(device):
        for B, hq, hk, T, D in shapes(device, quick):
            case = f"B{B} Hq{hq} Hk{hk} T{T} D{D} {str(dtype)[6:]}"
            progress(f"  {OP} {case}")
            elt = torch.finfo(dtype).bits // 8
            per_copy = B * (hq + hk) * T * D * elt
            copies = copies_for(per_copy, device)
            qs = [torch.randn(B, hq, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(copies)]
            ks = [torch.randn(B, hk, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(copies)]
            inv, _ = rope_frequencies(D, device=device)
            freqs = torch.arange(T, device=device).float()[:, None] * inv
            emb = torch.cat((freqs, freqs), -1)[None].expand(B, T, D)
            cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
            gq, gk = torch.randn_like(qs[0]), torch.randn_like(ks[0])
            bytes_fwd = 2 * per_copy + 2 * B * T * D * elt  # read q, k; write both; tables
            bytes_fb = 2 * bytes_fwd
            impls = {}
            for name in registry.BACKENDS:
                if name in ("triton", "cuda-emu") and device.type == "cpu":
                    continue  # the interpreter and the emulator are correctness tools, not contenders
                if not registry.why_not(OP, name, device, qs[0], ks[0], cos[..., :D // 2], sin[..., :D // 2],
                                        None, None, 1.0, False, False):
                    impls[f"fastlm:{name}"] = lambda q, k, c, s, _n=name: rope(q, k, c, s, backend=_n)
            impls["torch eager"] = _eager
            impls["torch.compile"] = compiled
            liger = _liger() if device.type == "cuda" else None
            if liger is not None:
                impls["liger"] = liger
            ref = rope_ref(qs[0].detach().double(), ks[0].detach().double(), cos.double(), sin.double())
            tol = 1e-4 if dtype == torch.float32 else 5e-2

            def check(fn):
                out = fn(qs[0], ks[0], cos, sin)
                err = max((o.double() - r).abs().max().item() for o, r in zip(out, ref))
                return None if err <= tol else f"max err {err:.3g} > {tol}"

            def step_for(fn, mode):
                if mode == "fwd":
                    def step(i):
                        with torch.no_grad():
                            fn(qs[i % copies], ks[i % copies], cos, sin)
                else:
                    def step(i):
                        q, k = qs[i % copies], ks[i % copies]
                        torch.autograd.grad(fn(q, k, cos, sin), (q, k), (gq, gk))
                return step

            def rate(mode, ms):
                gbps = (bytes_fwd if mode == "fwd" else bytes_fb) / (ms * 1e-3) / 1e9
                return dict(gbps=gbps, pct_ceiling=100 * gbps / ceilings["copy_gbps"],
                            size=f"{B}x{hq}+{hk}x{T}x{D}", dtype=str(dtype)[6:])

            rows += time_impls(OP, case, impls, check, step_for, {}, device, rate)
    return rows
