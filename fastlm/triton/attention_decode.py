"""Triton split-KV attention forward for decoding: a few queries against a long key/value
history, so a single query still fills the GPU. Serves dense decode steps (attention.forward,
Tq <= 16) and decode against a KV cache (paged_forward: fastlm.ops.decode_attention), paged
(vLLM's block table) or contiguous.

The query rows of one (batch, key/value head) are its GQA group's heads times Tq (row r is
query r % Tq of head r // Tq), so the group's heads run in parallel inside one program and
each K/V tile is read once for all of them. A program owns a chunk of keys and a block of those
rows (ROW_BLOCK: all of them, or fewer where that many would spill), runs the online softmax
(log2 units, exp2; scores soft-capped under SOFTCAP, ALiBi under ALIBI, the band of
attention.py under LOWER / UPPER) over its chunk and writes fp32 partials (max, sum,
unnormalized output). The chunks split only the keys some query of the sequence can see, so a
sliding window spreads its few keys over every program instead of leaving most of them idle. A
second kernel merges the chunks in a fixed order (deterministic, no atomics) and adds the sinks
(SINKS) to the denominator as the regular forward does. The backward of such calls is the
regular one (it only needs out and lse).

Against a cache (CACHE) each sequence's length L_b is read on the device (cache_seqlens), so the
grid is sized by the cache's capacity and each program derives its sequence's split from L_b
(_plan; programs past it return at once); query i sits at L_b - Tq + i (bottom-right). Each key
tile's rows are gathered through the block table (page = table[b, j // page], slot = j % page);
a contiguous cache is the same kernel with page b of size max_len, so both run the same
instructions in the same order and agree bit for bit: the split and the tile loop depend only
on L_b, never on the page layout. The table costs one int32 load per key row, next to the
2 * D-element K and V rows it addresses.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.triton import _tune
from fastlm.triton.attention import (
    LOG2E, _LOG2E, _common, _dot, _finish, _masked, _online_step, _scores, fp32_precision, relative_band,
)

MAX_ROWS = 64  # group * Tq handled per (batch, key/value head)
MERGE_ROWS = 16  # rows per merge program: a 16 x 256 fp32 accumulator fits without spilling


@triton.jit
def _plan(seqlens_ptr, b, TK, TQ, diag, lower, upper, WANT, START, END, CHUNK, SPLITS, CACHE: tl.constexpr,
          LOWER: tl.constexpr, UPPER: tl.constexpr, CHUNK_UNIT: tl.constexpr):
    """Sequence b's split: (diag, lower, upper, start, end, chunk, splits). Keys [start, end) are
    those some query sees (start a multiple of CHUNK_UNIT), in `splits` chunks of `chunk` (a
    multiple of CHUNK_UNIT, at least 4 of them, at most WANT chunks; none when no key is seen).
    Dense: the launcher's (plan(), the same function of Tk) and its band, all kernel parameters
    (nothing more held in registers than before caches existed). CACHE: computed here from L =
    min(cache_seqlens[b], TK = the capacity), with diag = diag * (L - Tq) and the band's edges,
    given relative to it (attention.relative_band), moved onto it. A function of L, Tq, the band
    and WANT only: the same for any layout of the keys."""
    start, end, chunk, splits = START, END, CHUNK, SPLITS
    if CACHE:
        L = tl.minimum(tl.load(seqlens_ptr + b), TK)  # (the capacity: never past the table)
        diag = diag * (L - TQ)
        lower, upper = lower + diag, upper + diag
        start, end = 0, L
        if LOWER:
            start = tl.minimum(tl.maximum(lower, 0), L) // CHUNK_UNIT * CHUNK_UNIT
        if UPPER:
            end = tl.minimum(tl.maximum(TQ + upper, 0), L)
        n = tl.maximum(end - start, 0)
        splits = tl.minimum(WANT, tl.cdiv(n, 4 * CHUNK_UNIT))
        chunk = tl.cdiv(tl.cdiv(n, tl.maximum(splits, 1)), CHUNK_UNIT) * CHUNK_UNIT
        splits = tl.cdiv(n, tl.maximum(chunk, 1))
    return diag, lower, upper, start, end, chunk, splits


def plan(tq, tk, lower, upper, want):
    """_plan on the host for a dense call (every sequence has tk keys): (start, end, chunk,
    splits), lower / upper absolute or None."""
    start = 0 if lower is None else min(max(lower, 0), tk) // CHUNK_UNIT * CHUNK_UNIT
    end = tk if upper is None else min(max(tq + upper, 0), tk)
    n = max(end - start, 0)
    splits = min(want, triton.cdiv(n, 4 * CHUNK_UNIT))
    chunk = triton.cdiv(triton.cdiv(n, max(splits, 1)), CHUNK_UNIT) * CHUNK_UNIT
    return start, end, chunk, triton.cdiv(n, max(chunk, 1))


@triton.jit(do_not_specialize=["TK_B"])
def _split_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, part_o, part_m, part_l, seqlens_ptr, table_ptr,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, smb, smh, smq, smk, stb, stp,
    HKV, GROUP, TQ, TK, PAGE, qk_scale, softcap, WANT, SPLITS, START, END, CHUNK, TK_B, diag, lower, upper, alibi_ptr,
    alibi_stride,
    D: tl.constexpr, DV: tl.constexpr, LOWER: tl.constexpr, UPPER: tl.constexpr, MASK: tl.constexpr,
    PREC: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, CACHE: tl.constexpr, ROWS: tl.constexpr,
    ROW_BLOCK: tl.constexpr, CHUNK_UNIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Grid (SPLITS * B * HKV, row blocks), SPLITS >= any sequence's split count: chunk `split` of
    the keys _plan gives sequence b. B * HKV shares axis 0 with the split (split fastest, so the
    CTAs are issued in the order of the old (SPLITS, B * HKV, row blocks) grid) rather than taking
    axis 1: CUDA caps axes 1 and 2 at 65,535, which B * HKV passes in large decode batches
    (2,048 x 32). One integer division per program (a loop of whole K/V tiles follows); the CI
    configs compile spill-free as before. Dense: k / v (B, HKV, TK, D) by their strides. CACHE:
    key j of b at page table[b, j // PAGE] (strides stb, stp), slot j % PAGE: k_cache (pages,
    PAGE, HKV, D) with (page, slot) strides (skb, skt)."""
    pid, rb = tl.program_id(0), tl.program_id(1)
    split, bhk = pid % SPLITS, pid // SPLITS
    b, hk = bhk // HKV, bhk % HKV
    diag, lower, upper, k_start, k_end, chunk, splits = _plan(seqlens_ptr, b, TK, TQ, diag, lower, upper, WANT, START,
                                                              END, CHUNK, SPLITS, CACHE, LOWER, UPPER, CHUNK_UNIT)
    if CACHE:  # (dense calls launch exactly their split count: no branch around the loop)
        if split >= splits:  # this sequence needs fewer chunks (the grid is sized by the capacity)
            return
    r = rb * ROW_BLOCK + tl.arange(0, ROW_BLOCK)
    g, i = r // TQ, r % TQ
    h = hk * GROUP + g
    row_ok = g < GROUP
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    q_rows = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + i.to(tl.int64) * sqt
    q = tl.load(q_rows[:, None] + offs_d[None, :] * sqd, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    m_rows = m_ptr + b.to(tl.int64) * smb + h.to(tl.int64) * smh  # per-row mask base (head varies by row)
    k_base = k_ptr + hk.to(tl.int64) * skh
    v_base = v_ptr + hk.to(tl.int64) * svh
    if not CACHE:  # sequence b's rows
        k_base += b.to(tl.int64) * skb
        v_base += b.to(tl.int64) * svb
    qi = tl.where(row_ok, i, TQ)  # padded rows count as out of range: nothing visible
    slope = 0.0
    if ALIBI:  # per row: the rows are several heads
        slope = (tl.load(alibi_ptr + b * alibi_stride + h, mask=row_ok, other=0.0) * _LOG2E)[:, None]
    m_i = tl.full((ROW_BLOCK,), float("-inf"), tl.float32)
    l_i = tl.zeros((ROW_BLOCK,), tl.float32)
    acc = tl.zeros((ROW_BLOCK, BLOCK_DV), tl.float32)
    lo = tl.multiple_of(k_start + split * chunk, CHUNK_UNIT)  # (aligned tiles, as the dense call's were)
    hi = tl.minimum(lo + chunk, k_end)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_chunk = offs_n < hi
        if CACHE:  # each row through the block table
            page = tl.load(table_ptr + b * stb + (offs_n // PAGE) * stp, mask=in_chunk, other=0).to(tl.int64)
            slot = (offs_n % PAGE).to(tl.int64)
            k_rows = page * skb + slot * skt
        else:
            k_rows = offs_n.to(tl.int64) * skt
        k = tl.load(k_base + k_rows[:, None] + offs_d[None, :] * skd,
                    mask=in_chunk[:, None] & (offs_d[None, :] < D), other=0.0)
        s, _ = _scores(_dot(q, tl.trans(k), PREC), qk_scale, softcap, qi[:, None], offs_n[None, :], diag, slope,
                       SOFTCAP, ALIBI, PREC)
        ok, s = _masked(s, qi[:, None], offs_n[None, :], TQ, hi, lower, upper, m_rows[:, None], smq, smk,
                        LOWER, UPPER, MASK)
        live = tl.max(ok.to(tl.int32), 0) > 0  # few rows: the reduction is cheap next to the K/V reads
        if CACHE:  # (V's row offsets made here, not held through the scores)
            v_rows = page * svb + slot * svt
        else:
            v_rows = offs_n.to(tl.int64) * svt
        v = tl.load(v_base + v_rows[:, None] + offs_dv[None, :] * svd,
                    mask=in_chunk[:, None] & (offs_dv[None, :] < DV) & live[:, None], other=0.0)
        m_i, l_i, acc = _online_step(s, v, m_i, l_i, acc, 1.0, PREC, False)
    base = (bhk.to(tl.int64) * SPLITS + split) * ROWS
    tl.store(part_m + base + r, m_i)
    tl.store(part_l + base + r, l_i)
    tl.store(part_o + (base + r[:, None]) * BLOCK_DV + offs_dv[None, :], acc)


@triton.jit
def _merge_kernel(part_o, part_m, part_l, o_ptr, lse_ptr, sinks_ptr, seqlens_ptr, sob, soh, sot, HKV, GROUP, TQ, TK,
                  DV, WANT, SPLITS, START, END, CHUNK, diag, lower, upper, CACHE: tl.constexpr, LOWER: tl.constexpr, UPPER: tl.constexpr,
                  CHUNK_UNIT: tl.constexpr, SINKS: tl.constexpr, ROWS: tl.constexpr, MERGE_ROWS: tl.constexpr,
                  BLOCK_DV: tl.constexpr):
    """The sequence's chunks (_plan's count: the same as the split kernel's) in order; out
    (b, h, i) at b * sob + h * soh + i * sot (its last dim contiguous), lse (B, H, Tq)."""
    bhk, rb = tl.program_id(0), tl.program_id(1)
    b, hk = bhk // HKV, bhk % HKV
    splits = _plan(seqlens_ptr, b, TK, TQ, diag, lower, upper, WANT, START, END, CHUNK, SPLITS, CACHE, LOWER, UPPER,
                   CHUNK_UNIT)[6]
    r = rb * MERGE_ROWS + tl.arange(0, MERGE_ROWS)
    offs_dv = tl.arange(0, BLOCK_DV)
    m = tl.full((MERGE_ROWS,), float("-inf"), tl.float32)
    for s in range(0, splits):
        m = tl.maximum(m, tl.load(part_m + (bhk.to(tl.int64) * SPLITS + s) * ROWS + r))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros((MERGE_ROWS,), tl.float32)
    acc = tl.zeros((MERGE_ROWS, BLOCK_DV), tl.float32)
    for s in range(0, splits):
        base = (bhk.to(tl.int64) * SPLITS + s) * ROWS
        w = tl.exp2(tl.load(part_m + base + r) - m_safe)  # a chunk that saw nothing has m = -inf: weight 0
        l += tl.load(part_l + base + r) * w
        acc += tl.load(part_o + (base + r[:, None]) * BLOCK_DV + offs_dv[None, :]) * w[:, None]
    g, i = r // TQ, r % TQ
    row_ok = g < GROUP
    sink = 0.0
    if SINKS:
        sink = tl.load(sinks_ptr + hk * GROUP + g, mask=row_ok, other=0.0) * _LOG2E
    inv, lse = _finish(m, l, sink, SINKS)
    h = hk * GROUP + g
    out_rows = b.to(tl.int64) * sob + h.to(tl.int64) * soh + i.to(tl.int64) * sot
    tl.store(o_ptr + out_rows[:, None] + offs_dv[None, :], (acc * inv[:, None]).to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(lse_ptr + (b.to(tl.int64) * HKV * GROUP + h) * TQ + i, lse, mask=row_ok)  # (B, H, Tq)


# (ROW_BLOCK, BLOCK_N, warps, stages), best first; pruned to ROW_BLOCK <= ROWS, shared memory
# that fits and registers that don't spill. Chunks are multiples of CHUNK_UNIT keys so the
# split count (and the partial buffers) don't depend on the config the tuner picks.
_TILES = ((64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 2), (32, 64, 4, 3), (32, 32, 4, 2), (16, 64, 4, 3),
          (16, 32, 4, 2), (16, 16, 4, 2), (16, 16, 4, 1))
CHUNK_UNIT = 64
REG_LIMIT = 150  # see attention.REG_LIMIT; 16-bit decode tiles measured spilling from 176
REG_LIMIT_TF32 = 120  # fp32 operands: measured spilling at 144


def _smem(cfg, a):
    """Upper estimate: K and V tiles per stage, the Q rows, and P for its layout change."""
    e, kw = a["q_ptr"].element_size(), cfg.kwargs
    return e * (max(cfg.num_stages, 2) * kw["BLOCK_N"] * (a["BLOCK_D"] + a["BLOCK_DV"])
                + kw["ROW_BLOCK"] * a["BLOCK_D"] + kw["ROW_BLOCK"] * kw["BLOCK_N"]) + 1024


def _regs(cfg, a):
    """As attention._regs: the fp32 accumulator, the resident Q rows, three score-sized tiles;
    with TF32 and a user mask three more (its 64-bit pointers and values: TF32 decode tiles of
    32 x 64 over 4 warps and 64 x 64 over 8 with a mask spilled 8-20 B at 255 registers on
    sm_80, where this estimate without them said 96)."""
    e, rb, bn = a["q_ptr"].element_size(), cfg.kwargs["ROW_BLOCK"], cfg.kwargs["BLOCK_N"]
    tiles = 6 if a["PREC"] == "tf32" and a["MASK"] != 0 else 3
    return (rb * a["BLOCK_DV"] + rb * a["BLOCK_D"] * e / 4 + tiles * rb * bn) / (32 * cfg.num_warps) + 32


def _allowed(cfg, a):
    rb, bn = cfg.kwargs["ROW_BLOCK"], cfg.kwargs["BLOCK_N"]
    if rb > a["ROWS"]:
        return False
    if a["PREC"] == "ieee":  # FMA dots: whole operand rows in registers (see attention._allowed)
        return rb * bn <= 256
    return _regs(cfg, a) <= (REG_LIMIT if a["PREC"] == "" else REG_LIMIT_TF32)


_KEY = ["D", "DV", "ROWS", "TK_B", "LOWER", "UPPER", "MASK", "SOFTCAP", "ALIBI", "PREC", "CACHE"]
_split_tuned = _tune.autotune(
    [triton.Config({"ROW_BLOCK": rb, "BLOCK_N": bn}, num_warps=w, num_stages=s) for rb, bn, w, s in _TILES],
    _KEY, _smem, "triton attention decode", _allowed)(_split_kernel)


def serves(q, k, v=None) -> bool:
    """Whether a call is a decode step this path should take: few query rows, many keys (every
    head dim fits: the smallest row block needs under 100 KB even for fp32 at D=256)."""
    group = q.shape[1] // k.shape[1]
    return group * q.shape[2] <= MAX_ROWS and q.shape[2] <= 16 and k.shape[2] >= 256


def _rows(group, tq):
    return max(16, triton.next_power_of_2(group * tq))


def _want(b, hkv, device):
    """Chunks per sequence that give every SM about two programs (_plan keeps each chunk at least
    4 key tiles long). Depends on the batch's shape, not its lengths or layout."""
    return max(1, 2 * _tune.sm_count(device) // max(1, b * hkv))


def _run(q, k, v, mask_t, out, lse, strides, out_strides, b, h, hkv, tq, tk, qk_scale, softcap, options, meta,
         sinks, seqlens=None, table=None, page=0, tk_bucket=0):
    """Both launches. tk: the keys (dense) or the cache's capacity (seqlens given: CACHE)."""
    group = h // hkv
    rows = _rows(group, tq)
    bdv = meta["BLOCK_DV"]
    cache = seqlens is not None
    want = _want(b, hkv, q.device)
    if cache:  # a bound on every sequence's count (_plan), which programs past it return
        start = end = chunk = 0
        splits = max(1, min(want, triton.cdiv(tk, 4 * CHUNK_UNIT)))
    else:  # the plan itself (no key visible: one program, whose chunk is empty)
        start, end, chunk, splits = plan(tq, tk, *(options[i] if meta[e] else None for i, e in ((1, "LOWER"),
                                                                                                  (2, "UPPER"))), want)
        splits = max(splits, 1)
    part_o = torch.empty(b * hkv, splits, rows, bdv, device=q.device, dtype=torch.float32)
    part_m = torch.empty(b * hkv, splits, rows, device=q.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    table_strides = (table.stride(0), table.stride(1)) if cache else (0, 0)
    diag, lower, upper = options[:3]
    args = (q, k, v, mask_t, part_o, part_m, part_l, seqlens, table, *strides, *table_strides, hkv, group, tq, tk,
            page, qk_scale, float(softcap), want, splits, start, end, chunk, tk_bucket, *options)
    meta = dict(meta, CACHE=cache, ROWS=rows, CHUNK_UNIT=CHUNK_UNIT)
    grid = lambda m: (splits * b * hkv, rows // m["ROW_BLOCK"])  # noqa: E731  (_split_kernel: axis 1 <= 4)
    if _tune.interpreting():
        _tune.launch(_split_kernel, grid(dict(ROW_BLOCK=16)), *args, **meta, ROW_BLOCK=16, BLOCK_N=16)
    else:
        _tune.launch(_split_tuned, grid, *args, **meta)
    _tune.launch(_merge_kernel, (b * hkv, rows // MERGE_ROWS), part_o, part_m, part_l, out, lse, sinks, seqlens,
                 *out_strides, hkv, group, tq, tk, meta["DV"], want, splits, start, end, chunk, diag, lower, upper,
                 CACHE=cache,
                 LOWER=meta["LOWER"], UPPER=meta["UPPER"], CHUNK_UNIT=CHUNK_UNIT, SINKS=sinks is not None,
                 ROWS=rows, MERGE_ROWS=MERGE_ROWS, BLOCK_DV=bdv)
    return out, lse


def forward(q, k, v, mask, causal, scale, softcap=0.0, window=(-1, -1), alibi=None, sinks=None):
    """attention.forward for decode steps (same arguments, no dropout)."""
    b, h, hkv, tq, tk, mask_t, strides, qk_scale, options, meta = _common(q, k, v, mask, causal, scale, 0.0, softcap,
                                                                          window, alibi)
    for name in ("DROPOUT", "VARLEN"):
        meta.pop(name)
    out = torch.empty(b, h, tq, meta["DV"], device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, tq, device=q.device, dtype=torch.float32)
    return _run(q, k, v, mask_t, out, lse, strides, out.stride()[:3], b, h, hkv, tq, tk, qk_scale, softcap,
                options, meta, sinks, tk_bucket=_tune.bucket(tk))


_PAGE_B: dict = {}  # (B, device) -> arange(B) as (B, 1) int32: a contiguous cache's block table


def paged_forward(q, k_cache, v_cache, block_table, seqlens, causal, scale, softcap=0.0, window=(-1, -1), alibi=None,
                  sinks=None):
    """Decode against a KV cache: (out (B, Tq, H, Dv) contiguous, lse (B, H, Tq) fp32).
    q (B, Tq, H, D), any strides; k_cache / v_cache (num_pages, page_size, H_kv, D / Dv) with
    block_table int32 (B, max_pages), or contiguous (B, max_len, H_kv, D / Dv) with block_table
    None (page b of size max_len: the same kernel, so the same bits). seqlens int32 (B,) on the
    device: query i of sequence b sits at position L_b - Tq + i; causal (bool) is bottom-right and
    the window, ALiBi ((H,) or (B, H)), softcap and sinks (H,) are measured from that diagonal."""
    fn = "paged_forward"
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(f"{fn}: q, k_cache and v_cache must be 4-D, got {tuple(q.shape)}, {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    b, tq, h, d = q.shape
    hkv = k_cache.shape[2]
    if k_cache.shape[:3] != v_cache.shape[:3] or k_cache.shape[3] != d or hkv == 0 or h % hkv:
        raise ValueError(f"{fn}: k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)} do not fit q "
                         f"{tuple(q.shape)} (pages, page size and heads agree, heads divide q's, head dim q's)")
    if seqlens.dtype != torch.int32 or tuple(seqlens.shape) != (b,) or seqlens.stride(0) != 1:
        raise ValueError(f"{fn}: seqlens must be a contiguous int32 tensor of shape ({b},), got {seqlens.dtype} "
                         f"{tuple(seqlens.shape)}")
    if block_table is None:
        if k_cache.shape[0] != b:
            raise ValueError(f"{fn}: a contiguous cache has one row per sequence: k_cache has {k_cache.shape[0]}, "
                             f"q {b}")
        key = (b, q.device)
        if key not in _PAGE_B:
            _PAGE_B[key] = torch.arange(b, device=q.device, dtype=torch.int32).view(b, 1)
        block_table = _PAGE_B[key]
    elif block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != b:
        raise ValueError(f"{fn}: block_table must be an int32 tensor of shape ({b}, max_pages), got "
                         f"{block_table.dtype} {tuple(block_table.shape)}")
    page = k_cache.shape[1]
    capacity = page * block_table.shape[1]
    dv = v_cache.shape[-1]
    out = torch.empty(b, tq, h, dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, tq, device=q.device, dtype=torch.float32)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    # (B, Tq, H, D) as the kernels' (b, h, row, d); a cache's (page, slot, head, d) likewise
    def bhtd(t):
        return [t.stride(0), t.stride(2), t.stride(1), t.stride(3)]
    factor, lower, upper = relative_band(2 if causal else 0, tq, capacity, window)
    options = (factor, lower or 0, upper or 0, alibi, 0 if alibi is None or alibi.dim() == 1 else alibi.stride(0))
    meta = dict(D=d, DV=dv, LOWER=lower is not None, UPPER=upper is not None, MASK=0, SOFTCAP=softcap > 0,
                ALIBI=alibi is not None, PREC=fp32_precision() if q.dtype == torch.float32 else "",
                BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(dv)))
    strides = bhtd(q) + bhtd(k_cache) + bhtd(v_cache) + [0, 0, 0, 0]
    # the tuner's length key: 0, as the lengths are on the device and change every token (one
    # tuning per shape class), and so a paged and a contiguous cache get the same config
    return _run(q, k_cache, v_cache, q, out, lse, strides, (out.stride(0), out.stride(2), out.stride(1)), b, h,
                hkv, tq, capacity, scale * LOG2E, softcap, options, meta, sinks, seqlens, block_table, page, 0)
