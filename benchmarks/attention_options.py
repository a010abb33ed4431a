"""attention_options: what FlashAttention's options save, side by side with torch's SDPA given the
same pattern as a dense mask (what a torch user would write).

- sliding window (Mistral's: each query sees itself and the W-1 keys before it): fastlm's
  window=(W - 1, 0), which skips the key tiles outside the band, vs the band as a bool mask;
- packed documents (8 of mixed lengths, 8k tokens): varlen_attention vs one causal block-diagonal
  bool mask over the whole stream (no padding either way);
- paged decode (one query per sequence against a KV cache in 16-token pages, GQA): decode_attention
  vs the dense op and torch's SDPA on the same cache laid out contiguously.
Flops count only the visible (query, key) pairs, so the rows of one case compare times directly."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from benchmarks.attention import _time_all
from benchmarks.common import Row, contenders, headline, smoke
from fastlm.ops import decode_attention, scaled_dot_product_attention, varlen_attention
from fastlm.ops.attention import NO_CAUSAL, OP, attention_forward_ref

OPTION = "attention_options"


def _fastlm_backends(device, q):
    return contenders(OP, device, q, q, q, None, 0.0, NO_CAUSAL)


def _band(t, w, device):
    i = torch.arange(t, device=device)
    return (i.view(1, -1) <= i.view(-1, 1)) & (i.view(1, -1) > i.view(-1, 1) - w)  # (T, T)


def window_cases(device, dtype, peak, progress):
    shape = (1, 2, 256, 64, 64) if smoke() else (1, 8, 4096, 64, 512) if device.type == "cpu" else (4, 16, 4096, 128, 512)
    b, h, t, d, w = shape
    case = f"window {w} {b}x{h}x{t}x{d} {str(dtype)[6:]}"
    progress(f"  {OPTION} {case}")
    q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    band = _band(t, w, device)
    fns = {}
    for name in _fastlm_backends(device, q):
        fns[f"fastlm:{name} window"] = lambda a, b_, c, _, n=name: scaled_dot_product_attention(
            a, b_, c, window=(w - 1, 0), backend=n)
        fns[f"fastlm:{name} mask"] = lambda a, b_, c, _, n=name: scaled_dot_product_attention(a, b_, c, band, backend=n)
    fns[f"sdpa:{device.type} mask"] = lambda a, b_, c, _: F.scaled_dot_product_attention(a, b_, c, band)
    ref = attention_forward_ref(*(x.detach().double() for x in (q, k, v)), band, 0.0, NO_CAUSAL, 1 / math.sqrt(d),
                                None)[0]
    g = torch.randn_like(q)
    return _time_all(device, fns, q, k, v, g, False, ref, case, 4 * b * h * int(band.sum()) * d, peak)


def _doc_lengths(total, n, g):
    """n mixed lengths summing to total (each >= total / (4n))."""
    w = torch.rand(n, generator=g) + 0.25
    lengths = (w / w.sum() * total).long()
    lengths[-1] += total - int(lengths.sum())
    return lengths.tolist()


def varlen_cases(device, dtype, peak, progress):
    h, d, total, n = (2, 64, 256, 3) if smoke() else (8, 64, 8192, 8)
    lengths = _doc_lengths(total, n, torch.Generator().manual_seed(0))
    case = f"varlen {n} docs {total} tokens {h}x{d} {str(dtype)[6:]}"
    progress(f"  {OPTION} {case} (lengths {lengths})")
    q, k, v = (torch.randn(1, h, total, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    doc = torch.arange(n, device=device).repeat_interleave(torch.tensor(lengths, device=device))
    mask = (doc.view(-1, 1) == doc.view(1, -1)) & torch.ones(total, total, dtype=torch.bool, device=device).tril()
    packed = lambda x: x[0].transpose(0, 1)  # (1, H, total, D) -> (total, H, D)  # noqa: E731
    fns = {}
    for name in contenders("varlen_attention", device, packed(q), packed(k), packed(v), cu):
        fns[f"fastlm:{name} varlen"] = lambda a, b_, c, _, nm=name: varlen_attention(
            packed(a), packed(b_), packed(c), cu, cu, max(lengths), max(lengths), is_causal=True,
            backend=nm).transpose(0, 1).unsqueeze(0)
    for name in _fastlm_backends(device, q):
        fns[f"fastlm:{name} mask"] = lambda a, b_, c, _, nm=name: scaled_dot_product_attention(a, b_, c, mask,
                                                                                                backend=nm)
    fns[f"sdpa:{device.type} mask"] = lambda a, b_, c, _: F.scaled_dot_product_attention(a, b_, c, mask)
    ref = attention_forward_ref(*(x.detach().double() for x in (q, k, v)), mask, 0.0, NO_CAUSAL, 1 / math.sqrt(d),
                                None)[0]
    pairs = sum(n_ * (n_ + 1) // 2 for n_ in lengths)
    return _time_all(device, fns, q, k, v, torch.randn_like(q), False, ref, case, 4 * h * pairs * d, peak)


def decode_cases(device, dtype, peak, progress):
    b, h, hkv, tk, d, page = (2, 4, 1, 256, 64, 16) if smoke() else (4, 32, 8, 8192, 128, 16)
    case = f"paged decode {b}x{h}/{hkv}x{tk}x{d} page {page} {str(dtype)[6:]}"
    progress(f"  {OPTION} {case}")
    k, v = (torch.randn(b, hkv, tk, d, device=device, dtype=dtype) for _ in range(2))
    q = torch.randn(b, h, 1, d, device=device, dtype=dtype)
    pages = tk // page
    table = torch.randperm(b * pages, device=device).view(b, pages).to(torch.int32)
    kp, vp = (torch.empty(b * pages, page, hkv, d, device=device, dtype=dtype) for _ in range(2))
    for cache, src in ((kp, k), (vp, v)):  # page table[b, p] holds keys p*page.. of sequence b
        cache[table.long()] = src.transpose(1, 2).reshape(b, pages, page, hkv, d)
    seqlens = torch.full((b,), tk, device=device, dtype=torch.int32)
    fns = {}
    for name in contenders("decode_attention", device, q.transpose(1, 2), kp, vp):
        fns[f"fastlm:{name} paged"] = lambda a, b_, c, _, nm=name: decode_attention(
            a.transpose(1, 2), kp, vp, seqlens, block_table=table, is_causal=False, backend=nm).transpose(1, 2)
    for name in _fastlm_backends(device, q):
        fns[f"fastlm:{name} contiguous"] = lambda a, b_, c, _, nm=name: scaled_dot_product_attention(
            a, b_, c, enable_gqa=True, backend=nm)
    fns[f"sdpa:{device.type} contiguous"] = lambda a, b_, c, _: F.scaled_dot_product_attention(a, b_, c, enable_gqa=True)
    ref = attention_forward_ref(q.double(), k.double(), v.double(), None, 0.0, NO_CAUSAL, 1 / math.sqrt(d), None)[0]
    return _time_all(device, fns, q, k, v, None, False, ref, case, 4 * b * h * tk * d, peak, modes=("fwd",))


def run(device: torch.device, quick: bool, ceilings: dict, progress=print) -> list[Row]:
    if headline():
        return []
    rows: list[Row] = []
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    peak = ceilings["matmul_tflops"]
    for cases in (window_cases, varlen_cases, decode_cases):
        rows += cases(device, dtype, peak, progress)
    for r in rows:
        r.op = OPTION
    return rows

