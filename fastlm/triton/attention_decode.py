"""Triton split-KV attention forward for decoding: a few queries (Tq <= 16) against a long
key/value history, so a single query still fills the GPU.

One program owns a chunk of keys of one (batch, key/value head) and every query row of that
head's GQA group (group x Tq rows, so each K/V tile is read once for all of them), runs the
online softmax over its chunk and writes fp32 partials (max, sum, unnormalized output). A
second kernel merges the chunks in a fixed order: deterministic, no atomics. The backward of
such calls is the regular one (it only needs out and lse).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.triton import _tune
from fastlm.triton.attention import _common, _dot, _offset, _online_step, _visible

MAX_ROWS = 64  # group * Tq handled per program


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, part_o, part_m, part_l,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, smb, smh, smq, smk,
    HKV, GROUP, TQ, TK, D, DV, offset, scale, CHUNK, SPLITS,
    CAUSAL: tl.constexpr, MASK: tl.constexpr, IEEE: tl.constexpr, DROPOUT: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    split, bhk = tl.program_id(0), tl.program_id(1)
    b, hk = bhk // HKV, bhk % HKV
    r = tl.arange(0, ROWS)
    g, i = r // TQ, r % TQ  # row r is query i of head hk * GROUP + g
    h = hk * GROUP + g
    row_ok = g < GROUP
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    q_rows = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + i.to(tl.int64) * sqt
    q = tl.load(q_rows[:, None] + offs_d[None, :] * sqd, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    m_rows = m_ptr + b.to(tl.int64) * smb + h.to(tl.int64) * smh  # per-row mask base (head varies by row)
    k_base = k_ptr + _offset(b, skb, hk, skh)
    v_base = v_ptr + _offset(b, svb, hk, svh)
    qi = tl.where(row_ok, i, TQ)  # padded rows count as out of range: nothing visible
    m_i = tl.full((ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, BLOCK_DV), tl.float32)
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, TK)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_chunk = offs_n < hi
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * skt + offs_d[None, :] * skd,
                    mask=in_chunk[:, None] & (offs_d[None, :] < D), other=0.0)
        s = _dot(q, tl.trans(k), IEEE)
        ok, bias = _visible(qi[:, None], offs_n[None, :], TQ, TK, offset, m_rows[:, None], smq, smk, CAUSAL, MASK)
        ok = ok & in_chunk[None, :]
        s = tl.where(ok, s * scale + bias, float("-inf"))
        live = tl.max(ok.to(tl.int32), 0) > 0
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svt + offs_dv[None, :] * svd,
                    mask=in_chunk[:, None] & (offs_dv[None, :] < DV) & live[:, None], other=0.0)
        m_i, l_i, acc = _online_step(s, v, m_i, l_i, acc, 1.0, IEEE, False)
    base = (bhk.to(tl.int64) * SPLITS + split) * ROWS
    tl.store(part_m + base + r, m_i)
    tl.store(part_l + base + r, l_i)
    tl.store(part_o + (base + r[:, None]) * BLOCK_DV + offs_dv[None, :], acc)


@triton.jit
def _merge_kernel(part_o, part_m, part_l, o_ptr, lse_ptr, HKV, GROUP, TQ, DV, SPLITS,
                  ROWS: tl.constexpr, BLOCK_DV: tl.constexpr):
    bhk = tl.program_id(0)
    r = tl.arange(0, ROWS)
    offs_dv = tl.arange(0, BLOCK_DV)
    m = tl.full((ROWS,), float("-inf"), tl.float32)
    for s in range(0, SPLITS):
        m = tl.maximum(m, tl.load(part_m + (bhk.to(tl.int64) * SPLITS + s) * ROWS + r))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, BLOCK_DV), tl.float32)
    for s in range(0, SPLITS):
        base = (bhk.to(tl.int64) * SPLITS + s) * ROWS
        w = tl.exp(tl.load(part_m + base + r) - m_safe)  # a chunk that saw nothing has m = -inf: weight 0
        l += tl.load(part_l + base + r) * w
        acc += tl.load(part_o + (base + r[:, None]) * BLOCK_DV + offs_dv[None, :]) * w[:, None]
    inv = tl.where(l > 0.0, 1.0 / tl.where(l > 0.0, l, 1.0), 0.0)
    b, hk = bhk // HKV, bhk % HKV
    g, i = r // TQ, r % TQ
    row_ok = g < GROUP
    out_rows = (b.to(tl.int64) * HKV * GROUP + hk * GROUP + g) * TQ + i  # (b, h, i) in (B, H, Tq)
    tl.store(o_ptr + out_rows[:, None] * DV + offs_dv[None, :], (acc * inv[:, None]).to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    lse = tl.where(l > 0.0, m + tl.log(tl.where(l > 0.0, l, 1.0)), float("-inf"))
    tl.store(lse_ptr + out_rows, lse, mask=row_ok)


def serves(q, k, v=None) -> bool:
    """Whether a call is a decode step this path should take: few query rows, many keys, and a
    tile that fits the device's shared memory (else the flash kernel serves it)."""
    group = q.shape[1] // k.shape[1]
    if not (group * q.shape[2] <= MAX_ROWS and q.shape[2] <= 16 and k.shape[2] >= 256):
        return False
    bd, bdv = (max(16, triton.next_power_of_2(t.shape[-1])) for t in (q, k if v is None else v))
    return _tile(_rows(group, q.shape[2]), bd, bdv, q.element_size(), q.device) is not None


def _rows(group, tq):
    return max(16, triton.next_power_of_2(group * tq))


def _splits(b, hkv, tk, block_n, device):
    """Enough chunks to give every SM about two programs, each at least 4 key tiles long."""
    sms = _tune.sm_count(device)
    want = max(1, 2 * sms // max(1, b * hkv))
    return max(1, min(want, triton.cdiv(tk, 4 * block_n)))


# (BLOCK_N, stages, warps), best first: the first whose shared memory fits the device is used
_TILES = ((64, 3, 4), (64, 2, 4), (32, 2, 4), (16, 2, 4), (16, 1, 4))


def _smem(block_n, stages, rows, bd, bdv, elt):
    """Upper estimate: K and V tiles per stage, the Q rows, and P for its layout change."""
    return elt * (max(stages, 2) * block_n * (bd + bdv) + rows * bd + rows * block_n)


def _tile(rows, bd, bdv, elt, device):
    if _tune.interpreting():
        return 16, 1, 4
    limit = _tune.smem_limit(device)
    for block_n, stages, warps in _TILES:
        if _smem(block_n, stages, rows, bd, bdv, elt) <= limit:
            return block_n, stages, warps
    return None  # e.g. fp32, 64 rows of D=256 on sm_86/89


def forward(q, k, v, mask, causal, scale):
    b, h, hkv, tq, tk, d, dv, mask_t, strides, offset, meta = _common(q, k, v, mask, causal, scale)
    group = h // hkv
    rows = _rows(group, tq)
    bdv = meta["BLOCK_DV"]
    block_n, stages, warps = _tile(rows, meta["BLOCK_D"], bdv, q.element_size(), q.device)
    splits = _splits(b, hkv, tk, block_n, q.device)
    chunk = triton.cdiv(triton.cdiv(tk, splits), block_n) * block_n
    splits = triton.cdiv(tk, chunk)
    part_o = torch.empty(b * hkv, splits, rows, bdv, device=q.device, dtype=torch.float32)
    part_m = torch.empty(b * hkv, splits, rows, device=q.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    _tune.launch(_split_kernel, (splits, b * hkv),
                 q, k, v, mask_t, part_o, part_m, part_l, *strides, hkv, group, tq, tk, d, dv, offset, scale, chunk,
                 splits, **meta, ROWS=rows, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    out = torch.empty(b, h, tq, dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, tq, device=q.device, dtype=torch.float32)
    _tune.launch(_merge_kernel, (b * hkv,), part_o, part_m, part_l, out, lse, hkv, group, tq, dv, splits,
                 ROWS=rows, BLOCK_DV=bdv)
    return out, lse
