"""Decode attention against a (paged) KV cache: FlashAttention's flash_attn_with_kvcache.

    fastlm.ops.decode_attention(q, k_cache, v_cache, cache_seqlens, *, block_table=None, k=None,
        v=None, is_causal=True, scale=None, softcap=0.0, window=None, alibi_slopes=None, sinks=None,
        return_lse=False, backend=None) -> out (B, Tq, H, Dv)  [, lse (B, H, Tq) fp32]

q (B, Tq, H, D): a few new queries per sequence (Tq = 1 when decoding). The cache is paged,
k_cache (num_pages, page_size, H_kv, D) and v_cache (num_pages, page_size, H_kv, Dv) with
block_table (B, max_pages) int32 (key j of sequence b sits in page block_table[b, j // page_size],
slot j % page_size: vLLM's and FlashAttention's layout), or contiguous, (B, max_len, H_kv, D) with
no block_table. cache_seqlens (B,) int32 counts each sequence's cached keys. k, v (B, Tq, H_kv, D),
when given, are written into the cache in place at positions cache_seqlens[b].. (one index_put
per tensor, through the pages) before attending; cache_seqlens itself is not changed (the caller
advances it, as with FlashAttention).

Query i of sequence b sits at position L_b - Tq + i, L_b its key count after the append: is_causal
lets it see keys j <= L_b - Tq + i (bottom-right), and windows / ALiBi are measured from that
diagonal, as scaled_dot_product_attention's with Tk = L_b. Inference only: nothing here has a
gradient (inputs that require one are refused).

Backends: reference (gathers each sequence's keys and runs the dense oracle), cpu
(csrc/cpu/attention_decode.cpp: K/V read once per KV head for all its query heads, keys split
across threads and merged by log-sum-exp, pages gathered tile by tile, never copied whole), and
triton and cuda: their decode kernels, with each key tile's rows gathered through block_table.
"""
from __future__ import annotations

import math

import torch

from fastlm import _ext
from fastlm import backend as _backend
from fastlm.ops.attention import (
    BOTTOM_RIGHT, NO_CAUSAL, _per_head, _softcap, _window, attention_forward_ref, cuda_reasons, packed_cpu_reasons,
    triton_reasons,
)

OP = "decode_attention"


# ---------------------------------------------------------------- reference (the oracle)
def cache_rows(cache: torch.Tensor, block_table: torch.Tensor | None, b: int, n: int) -> torch.Tensor:
    """Keys (or values) 0..n-1 of sequence b as (n, H_kv, D), gathered through the pages."""
    if block_table is None:
        return cache[b, :n]
    j = torch.arange(n, device=cache.device)
    page_size = cache.shape[1]
    return cache[block_table[b, j // page_size].long(), j % page_size]


def decode_forward_ref(q, k_cache, v_cache, block_table, seqlens, causal, scale, softcap=0.0, window=(-1, -1),
                       alibi=None, sinks=None):
    """(out (B, Tq, H, Dv), lse (B, H, Tq)): the dense oracle on each sequence's gathered keys."""
    b_, tq, h, _ = q.shape
    out = q.new_zeros(b_, tq, h, v_cache.shape[-1])
    lse = torch.full((b_, h, tq), -math.inf, dtype=torch.float32, device=q.device)
    if sinks is not None:
        lse.copy_(sinks.float().view(1, -1, 1).expand_as(lse))
    for b, n in enumerate(seqlens.tolist()):
        if n == 0:
            continue
        k = cache_rows(k_cache, block_table, b, n).transpose(0, 1).unsqueeze(0)  # (n, Hkv, D) -> (1, Hkv, n, D)
        v = cache_rows(v_cache, block_table, b, n).transpose(0, 1).unsqueeze(0)
        a = None if alibi is None else (alibi[b] if alibi.dim() == 2 else alibi)
        o, l = attention_forward_ref(q[b].transpose(0, 1).unsqueeze(0), k, v, None, 0.0,
                                     BOTTOM_RIGHT if causal else NO_CAUSAL, scale, None, softcap, window, a, sinks)
        out[b], lse[b] = o[0].transpose(0, 1), l[0]
    return out, lse


def _ext_forward(q, k_cache, v_cache, block_table, seqlens, causal, scale, softcap=0.0, window=(-1, -1), alibi=None,
                 sinks=None, ops=torch.ops.fastlm):
    return ops.attention_decode_fwd(q, k_cache, v_cache, block_table, seqlens, causal, scale, softcap, window[0],
                                    window[1], alibi, sinks)


def _triton_forward(q, k_cache, v_cache, block_table, seqlens, causal, scale, softcap=0.0, window=(-1, -1),
                    alibi=None, sinks=None):
    from fastlm.triton import attention_decode as kernels  # imported late: TRITON_INTERPRET is read at import

    return kernels.paged_forward(q, k_cache, v_cache, block_table, seqlens, causal, scale, softcap=softcap,
                                 window=window, alibi=alibi, sinks=sinks)


_FORWARD = _backend.implementations(reference=decode_forward_ref, triton=_triton_forward, cpu=_ext_forward,
                                    cuda=_ext_forward)


@torch.library.custom_op("fastlm::decode_attention", mutates_args=())
def _decode_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor | None,
    seqlens: torch.Tensor, causal: bool, scale: float, softcap: float, window_left: int, window_right: int,
    alibi: torch.Tensor | None, sinks: torch.Tensor | None, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _FORWARD[backend](q, k_cache, v_cache, block_table, seqlens, causal, scale, softcap,
                             (window_left, window_right), alibi, sinks)


@_decode_op.register_fake
def _(q, k_cache, v_cache, block_table, seqlens, causal, scale, softcap, window_left, window_right, alibi, sinks,
      backend):
    b, tq, h, _ = q.shape
    return q.new_empty(b, tq, h, v_cache.shape[-1]), q.new_empty(b, h, tq, dtype=torch.float32)


# ---------------------------------------------------------------- who can serve what
def _example(device: torch.device):
    q, cache = torch.empty(1, 1, 2, 64, device=device), torch.empty(1, 16, 2, 64, device=device)
    return (q, cache, cache)


@_backend.register(OP, "reference", example=_example)
def _(q, k_cache, v_cache):
    return [] if q.dtype.is_floating_point else [f"dtype {q.dtype} is not floating point"]


@_backend.register(OP, "cpu")
def _(q, k_cache, v_cache):
    return packed_cpu_reasons(q, (q.shape[-1], v_cache.shape[-1]), "attention_decode_fwd")


@_backend.register(OP, "triton")
def _(q, k_cache, v_cache):
    return triton_reasons(q, v_cache)


@_backend.register(OP, "cuda")
def _(q, k_cache, v_cache):
    return cuda_reasons(q, k_cache, v_cache, ext_op="attention_decode_fwd")


# ---------------------------------------------------------------- public entry point
def _check(q, k_cache, v_cache, cache_seqlens, block_table, k, v):
    fn = "decode_attention"
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be a 4-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype != q.dtype or t.device != q.device or not t.dtype.is_floating_point:
            raise TypeError(f"{fn}: {name} must be floating point with q's dtype and device, got {t.dtype} on "
                            f"{t.device} (q: {q.dtype} on {q.device})")
    if k_cache.shape[:3] != v_cache.shape[:3] or k_cache.shape[-1] != q.shape[-1]:
        raise ValueError(f"{fn}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must agree but "
                         f"in the last dim, and k_cache's head dim must be q's {q.shape[-1]}")
    hkv = k_cache.shape[2]
    if hkv == 0 or q.shape[2] % hkv:
        raise ValueError(f"{fn}: q has {q.shape[2]} heads, not a multiple of the cache's {hkv}")
    batch = q.shape[0]
    for name, t, dims in (("cache_seqlens", cache_seqlens, (batch,)),
                          ("block_table", block_table, (batch, None) if block_table is not None else None)):
        if dims is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != len(dims) or \
                any(d is not None and s != d for s, d in zip(t.shape, dims)):
            want = "(B,)" if len(dims) == 1 else "(B, max_pages)"
            raise TypeError(f"{fn}: {name} must be an int32 tensor of shape {want} with B = {batch}, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__} "
                            f"{tuple(t.shape) if isinstance(t, torch.Tensor) else ''}")
        if t.device != q.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but q is on {q.device}")
    if block_table is None and k_cache.shape[0] != batch:
        raise ValueError(f"{fn}: a contiguous cache (no block_table) has one row per sequence: k_cache has "
                         f"{k_cache.shape[0]}, q {batch}")
    if (k is None) != (v is None):
        raise ValueError(f"{fn}: give both k and v to append, or neither")
    for name, t, cache in (("k", k, k_cache), ("v", v, v_cache)):
        if t is not None and (t.shape[:2] != q.shape[:2] or t.shape[2:] != cache.shape[2:] or t.dtype != q.dtype):
            raise ValueError(f"{fn}: {name} must be (B, Tq, H_kv, D) = {(*q.shape[:2], *cache.shape[2:])} with q's "
                             f"dtype, got {tuple(t.shape)} {t.dtype}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"decode_attention: {name} requires grad; decode attention is inference only "
                             "(use scaled_dot_product_attention to train)")


def append_to_cache(cache, block_table, cache_seqlens, new) -> None:
    """Writes new (B, T, H_kv, D) at positions cache_seqlens[b] + 0..T-1 of each sequence, in place."""
    b, t = new.shape[:2]
    pos = cache_seqlens.long().view(b, 1) + torch.arange(t, device=new.device)  # (B, T)
    if block_table is None:
        cache[torch.arange(b, device=new.device).view(b, 1).expand(b, t), pos] = new
        return
    page_size = cache.shape[1]
    cache[block_table.long().gather(1, pos // page_size), pos % page_size] = new


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, block_table=None, k=None, v=None, is_causal=True,
                     scale=None, softcap: float = 0.0, window=None, alibi_slopes=None, sinks=None,
                     return_lse: bool = False, backend: str | None = None):
    """Attention of a few new queries per sequence against its KV cache; see the module docstring."""
    _check(q, k_cache, v_cache, cache_seqlens, block_table, k, v)
    seqlens = cache_seqlens
    if k is not None:
        append_to_cache(k_cache, block_table, cache_seqlens, k)
        append_to_cache(v_cache, block_table, cache_seqlens, v)
        seqlens = cache_seqlens + q.shape[1]
    capacity = k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)
    if not torch.compiler.is_compiling() and seqlens.numel() and int(seqlens.max()) > capacity:
        raise ValueError(f"decode_attention: a sequence of {int(seqlens.max())} keys exceeds the cache's capacity "
                         f"of {capacity} per sequence")
    fn, batch_heads = "decode_attention", (q.shape[0], q.shape[2])  # q is (B, Tq, H, D)
    alibi = None if alibi_slopes is None else _per_head("alibi_slopes", alibi_slopes, q, True, fn, batch_heads)
    sinks = None if sinks is None else _per_head("sinks", sinks, q, False, fn, batch_heads)
    chosen = _backend.select(OP, q.device, q, k_cache, v_cache, backend=backend)
    out, lse = _decode_op(q, k_cache, v_cache, block_table, seqlens, bool(is_causal),
                          1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale), _softcap(softcap, fn),
                          *_window(window, fn), alibi, sinks, chosen)
    return (out, lse) if return_lse else out


if _ext.HAS_EXTENSION and hasattr(torch.ops.fastlm, "attention_decode_fwd"):

    @torch.library.register_fake("fastlm::attention_decode_fwd")
    def _(q, k_cache, v_cache, block_table, cache_seqlens, causal, scale, softcap=0.0, window_left=-1,
          window_right=-1, alibi_slopes=None, sinks=None):
        b, tq, h, _ = q.shape
        return q.new_empty(b, tq, h, v_cache.shape[-1]), q.new_empty(b, h, tq, dtype=torch.float32)
