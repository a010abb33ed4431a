"""Triton split-KV attention forward for decoding: a few queries (Tq <= 16) against a long
key/value history, so a single query still fills the GPU.

The query rows of one (batch, key/value head) are its GQA group's heads times Tq (row r is
query r % Tq of head r // Tq), so the group's heads run in parallel inside one program and
each K/V tile is read once for all of them. A program owns a chunk of keys and a block of those
rows (ROW_BLOCK: all of them, or fewer where that many would spill), runs the online softmax
(log2 units, exp2; scores soft-capped under SOFTCAP, ALiBi under ALIBI, the band of
attention.py under LOWER / UPPER) over its chunk and writes fp32 partials (max, sum,
unnormalized output). The chunks split only the keys some query of the call can see, so a
sliding window spreads its few keys over every program instead of leaving most of them idle. A
second kernel merges the chunks in a fixed order (deterministic, no atomics) and adds the sinks
(SINKS) to the denominator as the regular forward does. The backward of such calls is the
regular one (it only needs out and lse).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.triton import _tune
from fastlm.triton.attention import _LOG2E, _common, _dot, _finish, _masked, _online_step, _offset, _scores, band

MAX_ROWS = 64  # group * Tq handled per (batch, key/value head)
MERGE_ROWS = 16  # rows per merge program: a 16 x 256 fp32 accumulator fits without spilling


@triton.jit(do_not_specialize=["TK_B"])
def _split_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, part_o, part_m, part_l,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, smb, smh, smq, smk,
    HKV, GROUP, TQ, K_START, K_END, qk_scale, softcap, CHUNK, SPLITS, TK_B, diag, lower, upper, alibi_ptr,
    alibi_stride,
    D: tl.constexpr, DV: tl.constexpr, LOWER: tl.constexpr, UPPER: tl.constexpr, MASK: tl.constexpr,
    PREC: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, ROWS: tl.constexpr, ROW_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Keys [K_START, K_END) (those some query sees) in chunks of CHUNK, one per program."""
    split, bhk, rb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = bhk // HKV, bhk % HKV
    r = rb * ROW_BLOCK + tl.arange(0, ROW_BLOCK)
    g, i = r // TQ, r % TQ
    h = hk * GROUP + g
    row_ok = g < GROUP
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    q_rows = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + i.to(tl.int64) * sqt
    q = tl.load(q_rows[:, None] + offs_d[None, :] * sqd, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    m_rows = m_ptr + b.to(tl.int64) * smb + h.to(tl.int64) * smh  # per-row mask base (head varies by row)
    k_base = k_ptr + _offset(b, skb, hk, skh)
    v_base = v_ptr + _offset(b, svb, hk, svh)
    qi = tl.where(row_ok, i, TQ)  # padded rows count as out of range: nothing visible
    slope = 0.0
    if ALIBI:  # per row: the rows are several heads
        slope = (tl.load(alibi_ptr + b * alibi_stride + h, mask=row_ok, other=0.0) * _LOG2E)[:, None]
    m_i = tl.full((ROW_BLOCK,), float("-inf"), tl.float32)
    l_i = tl.zeros((ROW_BLOCK,), tl.float32)
    acc = tl.zeros((ROW_BLOCK, BLOCK_DV), tl.float32)
    lo = K_START + split * CHUNK
    hi = tl.minimum(lo + CHUNK, K_END)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_chunk = offs_n < hi
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * skt + offs_d[None, :] * skd,
                    mask=in_chunk[:, None] & (offs_d[None, :] < D), other=0.0)
        s, _ = _scores(_dot(q, tl.trans(k), PREC), qk_scale, softcap, qi[:, None], offs_n[None, :], diag, slope,
                       SOFTCAP, ALIBI, PREC)
        ok, s = _masked(s, qi[:, None], offs_n[None, :], TQ, hi, lower, upper, m_rows[:, None], smq, smk,
                        LOWER, UPPER, MASK)
        live = tl.max(ok.to(tl.int32), 0) > 0  # few rows: the reduction is cheap next to the K/V reads
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svt + offs_dv[None, :] * svd,
                    mask=in_chunk[:, None] & (offs_dv[None, :] < DV) & live[:, None], other=0.0)
        m_i, l_i, acc = _online_step(s, v, m_i, l_i, acc, 1.0, PREC, False)
    base = (bhk.to(tl.int64) * SPLITS + split) * ROWS
    tl.store(part_m + base + r, m_i)
    tl.store(part_l + base + r, l_i)
    tl.store(part_o + (base + r[:, None]) * BLOCK_DV + offs_dv[None, :], acc)


@triton.jit
def _merge_kernel(part_o, part_m, part_l, o_ptr, lse_ptr, sinks_ptr, HKV, GROUP, TQ, DV, SPLITS,
                  SINKS: tl.constexpr, ROWS: tl.constexpr, MERGE_ROWS: tl.constexpr, BLOCK_DV: tl.constexpr):
    bhk, rb = tl.program_id(0), tl.program_id(1)
    r = rb * MERGE_ROWS + tl.arange(0, MERGE_ROWS)
    offs_dv = tl.arange(0, BLOCK_DV)
    m = tl.full((MERGE_ROWS,), float("-inf"), tl.float32)
    for s in range(0, SPLITS):
        m = tl.maximum(m, tl.load(part_m + (bhk.to(tl.int64) * SPLITS + s) * ROWS + r))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros((MERGE_ROWS,), tl.float32)
    acc = tl.zeros((MERGE_ROWS, BLOCK_DV), tl.float32)
    for s in range(0, SPLITS):
        base = (bhk.to(tl.int64) * SPLITS + s) * ROWS
        w = tl.exp2(tl.load(part_m + base + r) - m_safe)  # a chunk that saw nothing has m = -inf: weight 0
        l += tl.load(part_l + base + r) * w
        acc += tl.load(part_o + (base + r[:, None]) * BLOCK_DV + offs_dv[None, :]) * w[:, None]
    b, hk = bhk // HKV, bhk % HKV
    g, i = r // TQ, r % TQ
    row_ok = g < GROUP
    sink = 0.0
    if SINKS:
        sink = tl.load(sinks_ptr + hk * GROUP + g, mask=row_ok, other=0.0) * _LOG2E
    inv, lse = _finish(m, l, sink, SINKS)
    out_rows = (b.to(tl.int64) * HKV * GROUP + hk * GROUP + g) * TQ + i  # (b, h, i) in (B, H, Tq)
    tl.store(o_ptr + out_rows[:, None] * DV + offs_dv[None, :], (acc * inv[:, None]).to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(lse_ptr + out_rows, lse, mask=row_ok)


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
    """As attention._regs: the fp32 accumulator, the resident Q rows, three score-sized tiles."""
    e, rb, bn = a["q_ptr"].element_size(), cfg.kwargs["ROW_BLOCK"], cfg.kwargs["BLOCK_N"]
    return (rb * a["BLOCK_DV"] + rb * a["BLOCK_D"] * e / 4 + 3 * rb * bn) / (32 * cfg.num_warps) + 32


def _allowed(cfg, a):
    rb, bn = cfg.kwargs["ROW_BLOCK"], cfg.kwargs["BLOCK_N"]
    if rb > a["ROWS"]:
        return False
    if a["PREC"] == "ieee":  # FMA dots: whole operand rows in registers (see attention._allowed)
        return rb * bn <= 256
    return _regs(cfg, a) <= (REG_LIMIT if a["PREC"] == "" else REG_LIMIT_TF32)


_KEY = ["D", "DV", "ROWS", "TK_B", "LOWER", "UPPER", "MASK", "SOFTCAP", "ALIBI", "PREC"]
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


def _splits(b, hkv, tk, device):
    """Enough chunks to give every SM about two programs, each at least 4 key tiles long."""
    sms = _tune.sm_count(device)
    want = max(1, 2 * sms // max(1, b * hkv))
    return max(1, min(want, triton.cdiv(tk, 4 * CHUNK_UNIT)))


def _visible(tq, tk, lower, upper):
    """[start, end) of the keys some query sees under the band, start a multiple of CHUNK_UNIT
    (aligned tiles); start < end (an empty band: one chunk whose keys are all masked)."""
    start = 0 if lower is None else min(max(lower, 0), tk - 1) // CHUNK_UNIT * CHUNK_UNIT
    end = tk if upper is None else min(max(tq + upper, 0), tk)
    return start, max(end, start + 1)


def forward(q, k, v, mask, causal, scale, softcap=0.0, window=(-1, -1), alibi=None, sinks=None):
    """attention.forward for decode steps (same arguments, no dropout)."""
    b, h, hkv, tq, tk, mask_t, strides, qk_scale, options, meta = _common(q, k, v, mask, causal, scale, 0.0, softcap,
                                                                          window, alibi)
    meta.pop("DROPOUT")
    group = h // hkv
    rows = _rows(group, tq)
    bdv = meta["BLOCK_DV"]
    k_start, k_end = _visible(tq, tk, *band(causal, tq, tk, window)[1:])
    splits = _splits(b, hkv, k_end - k_start, q.device)
    chunk = triton.cdiv(triton.cdiv(k_end - k_start, splits), CHUNK_UNIT) * CHUNK_UNIT
    splits = triton.cdiv(k_end - k_start, chunk)
    part_o = torch.empty(b * hkv, splits, rows, bdv, device=q.device, dtype=torch.float32)
    part_m = torch.empty(b * hkv, splits, rows, device=q.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    args = (q, k, v, mask_t, part_o, part_m, part_l, *strides, hkv, group, tq, k_start, k_end, qk_scale,
            float(softcap), chunk, splits, _tune.bucket(k_end - k_start), *options)
    grid = lambda m: (splits, b * hkv, rows // m["ROW_BLOCK"])  # noqa: E731
    if _tune.interpreting():
        _tune.launch(_split_kernel, grid(dict(ROW_BLOCK=16)), *args, **meta, ROWS=rows, ROW_BLOCK=16, BLOCK_N=16)
    else:
        _tune.launch(_split_tuned, grid, *args, **meta, ROWS=rows)
    out = torch.empty(b, h, tq, meta["DV"], device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, tq, device=q.device, dtype=torch.float32)
    _tune.launch(_merge_kernel, (b * hkv, rows // MERGE_ROWS), part_o, part_m, part_l, out, lse, sinks, hkv, group,
                 tq, meta["DV"], splits, SINKS=sinks is not None, ROWS=rows, MERGE_ROWS=MERGE_ROWS, BLOCK_DV=bdv)
    return out, lse
