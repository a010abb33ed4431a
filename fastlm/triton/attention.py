"""Triton flash attention, forward and backward (FlashAttention-2 structure).

Forward: a program owns BLOCK_M queries of one (batch, head), walks the key blocks it can see
(stopping at the causal diagonal) with an online softmax in fp32, and writes out and lse.
Backward: a pre-pass computes delta = rowsum(dO * O); one kernel owns a block of keys of one
key/value head and accumulates dK, dV over the query heads of its GQA group; another owns a
block of queries and accumulates dQ. No atomics: the gradients are deterministic.

Packed variable-length sequences (varlen_forward / varlen_backward, FlashAttention's varlen) are
the same kernels under the VARLEN constexpr, not copies: batch entry b becomes sequence b, whose
bounds each program reads from cu_seqlens on the device (_sequence); the grid is sized by the
longest sequence and programs past their own sequence's end return at once, so no padding is
computed. The packed (total, H, D) tensors pass their row stride as the batch stride (a
sequence's "batch index" is its first row), lengths, diagonal, band, window tile skipping and
ALiBi are per sequence, and out / lse / dq / dk / dv use the packed layouts ((total, H, D) and
FlashAttention's (H, total) lse).

Masking: key j is visible to query i when j < Tk, j lies in the band [i + lower, i + upper] and
the mask allows it. The band folds causality and the sliding window (issue #13, band()): with
diag = 0 for top-left causal, else Tk - Tq, upper = diag under causality, diag + window_right
for a right window, the smaller when both (UPPER), and lower = diag - window_left for a left
window (LOWER); an unbounded side costs nothing (constexprs). Every key loop runs in two kinds of tiles: full ones,
which every query of the tile sees (no bounds, band or padding work at all), and edge ones (the
band's two edges, ragged ends), which compute the masks; tiles outside the band are not visited
(_ranges gives each query block its key range, each key block its query range). A user mask is
read on every tile it covers. Hidden scores are -inf and their probabilities exactly 0; keys no
query of a tile sees are zeroed before they enter a product, so NaN there can't leak.

Scores are kept in log2 units (scale * log2(e) folded into one multiply) so the softmax uses
exp2; lse is stored in natural log. With a softcap (SOFTCAP, a constexpr: softcap > 0) each
score is softcap * log2(e) * tanh(scale * q.k / softcap) before any mask (_scores), and the
backward multiplies dS by 1 - tanh^2; without one the kernels compile exactly as before. ALiBi
(ALIBI) adds -slope * log2(e) * |i + diag - j| after the cap, slope read per (batch, head) in the
kernel; it is constant in q and k, so the backward only recomputes it. Attention sinks (SINKS,
forward only) add exp(sink_h) to the softmax denominator in the finalisation (_finish); the
backward needs nothing for them, since its P = exp(s - lse) reads the forward's lse.
fp32 inputs use TF32 dots when torch allows TF32 for matmuls (read per call, part of the
autotune key), else IEEE dots on small FMA tiles.
Block sizes are autotuned on a GPU per (head dims, lengths rounded up to powers of two,
causal, mask, dropout, precision) from one config list per kernel, among the configs whose
shared memory fits the device and whose register estimate keeps them from spilling
(fastlm/triton/_tune.py), each config letting ptxas use all 255 registers (MAX_REGS); fixed
small under the interpreter. Offsets are int64 (_offset).

Why it should be fast (static estimate; no GPU has timed it): a 128 x 64 forward tile at D = 128
does 2 GEMMs of 128 x 64 x 128, 4.2 MFLOP, per 32 KB of K and V, 128 FLOP per byte, and the K/V
of one head are re-read from L2 by each of its query blocks, so the loop is bound by the tensor
cores, not memory. tl.dot lowers to wgmma on sm_90 (tests/test_triton_aot.py asserts it for the
16-bit forward) and to mma.sync on sm_80. Per score the softmax issues about 4 instructions
per 32 scores (the FFMA into exp2, MUFU.EX2, the max and the sum), as many as the tensor-core
instructions behind that score at D = 128 (2 x 128 multiply-adds, 1/8 of an m16n8k16 HMMA):
folding the scale into the exp2 keeps it from growing. No kept config spills (AOT budget 0).
Every warp of a kept forward tile owns whole rows of it (_whole_rows), so the row max and sum
never leave the warp: on mma.sync targets that means BLOCK_M >= the head dim (128 x 32 at
D = 128), because Triton lays both chained dots out by the P V product's shape. The exceptions
(_no_whole_row_tile) are 16-bit D = 256, TF32 from D = 128, and a user mask or ALiBi at D = 128
on sm_80/86, where no whole-row tile fits the registers.
"""
from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from fastlm.triton import _tune

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # kernels read globals only as constexprs
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _masked(s, offs_m, offs_n, tq, tk, lower, upper, mask_ptr, msq, msk,
            LOWER: tl.constexpr, UPPER: tl.constexpr, MASK: tl.constexpr):
    """(visible, s with the additive mask added in log2 units and -inf where hidden) for the
    (offs_m x offs_n) score tile; the offsets may be transposed views (keys down). LOWER / UPPER
    check the band's edges (full tiles pass False: every key of theirs is inside it)."""
    ok = (offs_m < tq) & (offs_n < tk)
    if UPPER:
        ok = ok & (offs_n <= offs_m + upper)
    if LOWER:
        ok = ok & (offs_n >= offs_m + lower)
    if MASK == 1:
        keep = tl.load(mask_ptr + offs_m.to(tl.int64) * msq + offs_n * msk, mask=ok, other=0)
        ok = ok & (keep != 0)
    elif MASK == 2:
        bias = tl.load(mask_ptr + offs_m.to(tl.int64) * msq + offs_n * msk, mask=ok, other=0.0).to(tl.float32)
        ok = ok & (bias > float("-inf"))
        s = s + bias * _LOG2E
    return ok, tl.where(ok, s, float("-inf"))


@triton.jit
def _tanh(x, PRECISE: tl.constexpr):
    """tanh(x) = 1 - 2 / (e^{2x} + 1), |x| clamped to 9 where tanh is +-1 in fp32 (the compares
    pass NaN through): ~1e-7 absolute, plenty for 16-bit inputs. PRECISE (fp32 inputs) takes
    Cephes' odd polynomial below |x| = 0.625, a few 1e-7 relative there too. Plain exp2, divides
    and FMAs: the same in the interpreter and on every GPU."""
    c = tl.where(x > 9.0, 9.0, tl.where(x < -9.0, -9.0, x))
    t = 1.0 - 2.0 / (tl.exp2(c * (2.0 * _LOG2E)) + 1.0)
    if PRECISE:
        z = x * x
        p = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z
             - 3.33332819422e-1)
        t = tl.where(tl.abs(x) < 0.625, p * z * x + x, t)
    return t


@triton.jit
def _scores(qk, qk_scale, softcap, rows, cols, diag, slope, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
            PREC: tl.constexpr):
    """(s, g): the raw products qk as scores in log2 units (qk_scale = scale * log2(e)), soft-capped
    under SOFTCAP, and there g = 1 - tanh^2 = d(capped)/d(raw) for the backward (else a dummy).
    Under ALIBI, after the cap, s -= slope * |i + diag - j| for queries rows, keys cols (broadcast
    views, either orientation), slope in log2 units (_slope); g is untouched (no q, k in it)."""
    if SOFTCAP:
        t = _tanh(qk * (qk_scale / (softcap * _LOG2E)), PREC != "")
        s = t * (softcap * _LOG2E)
        g = 1.0 - t * t
    else:
        s = qk * qk_scale
        g = qk_scale
    if ALIBI:
        s = s - slope * tl.abs(rows + diag - cols).to(tl.float32)
    return s, g


@triton.jit
def _slope(alibi_ptr, b, stride, h, ALIBI: tl.constexpr):
    """Head h's ALiBi slope in log2 units (slopes (H,) have stride 0, (B, H) stride H); a dummy
    without ALIBI."""
    slope = 0.0
    if ALIBI:
        slope = tl.load(alibi_ptr + b * stride + h) * _LOG2E
    return slope


@triton.jit
def _offset(b, sb, h, sh):
    """b * sb + h * sh in int64: a head term alone passes 2^31 elements, e.g. for a per-head
    (1, H, 16384, 16384) mask."""
    return b.to(tl.int64) * sb + h.to(tl.int64) * sh


@triton.jit
def _tile(T, BLOCK: tl.constexpr, FOLD: tl.constexpr):
    """(tile, bh) of this program. Grid (tiles, B * heads) as always, unless B * heads passes
    65,535, CUDA's cap on grid axes 1 and 2 (a packed batch of 2,048 sequences x 32 heads):
    then FOLD (the launcher's _grid) and a 1-D grid of tiles * B * heads programs (axis 0 takes
    2^31 - 1), decomposed with the tile index fastest as csrc's attention does it, so CTAs are
    issued in the 2-D grid's order and the query blocks of one head still run together, sharing
    its K/V in L2; T is the length the tiles cover (the longest sequence's). Only that case pays
    the division, and every other launch compiles to exactly the code it did: the 1-D grid for
    all launches, and a (tiles, heads, B) one, were measured making ptxas spill 8 to 12 B in a
    few sm_80 configs at its register target (IEEE fp32 16 x 16 dK/dV, a bf16 64 x 64 forward)."""
    if FOLD:
        tiles = tl.cdiv(T, BLOCK)
        pid = tl.program_id(0)
        return pid % tiles, pid // tiles
    return tl.program_id(0), tl.program_id(1)


@triton.jit
def _sequence(cu_q, cu_k, b, TQ, TK, diag, lower, upper, VARLEN: tl.constexpr):
    """(qb, kb, Tq, Tk, diag, lower, upper) of batch entry b: dense, b itself (the index the batch
    strides multiply) and the call's lengths and band. Under VARLEN b is a sequence of the
    packed tensors, whose launcher passes row strides as batch strides: qb / kb are its first
    rows, Tq / Tk its lengths (cu_seqlens, read on the device), diag = diag * (Tk - Tq) (the
    launcher passes 0 for top-left causal, else 1) and lower / upper, given relative to the
    diagonal (relative_band), moved onto it."""
    qb, kb = b, b
    if VARLEN:
        qb, kb = tl.load(cu_q + b), tl.load(cu_k + b)
        TQ, TK = tl.load(cu_q + b + 1) - qb, tl.load(cu_k + b + 1) - kb
        diag = diag * (TK - TQ)
        lower, upper = lower + diag, upper + diag
    return qb, kb, TQ, TK, diag, lower, upper


@triton.jit
def _rows(ptr, bh, h, H, T, W, t0, VARLEN: tl.constexpr):
    """(base, row stride) of head h's rows in a contiguous (B, H, T, W) output (bh = b * H + h),
    or under VARLEN in a packed (total, H, W) one from row t0."""
    if VARLEN:
        base = ptr + (tl.cast(t0, tl.int64) * H + h) * W
        stride = H * W
    else:
        base = ptr + bh.to(tl.int64) * T * W
        stride = W
    return base, stride


@triton.jit
def _stat_row(bh, h, T, t0, VARLEN: tl.constexpr):
    """Index of query row 0 of bh in the per-row statistics (lse, delta): (B, H, T), or under
    VARLEN (H, total) with the sequence's rows from t0 (FlashAttention's varlen lse)."""
    if VARLEN:
        row = h.to(tl.int64) * T + t0
    else:
        row = bh.to(tl.int64) * T
    return row


@triton.jit
def _load(base, offs_r, offs_c, sr, sc, nr, NC: tl.constexpr, ROWS: tl.constexpr, keep=None):
    """A (rows x cols) tile at base + r*sr + c*sc. Rows are bounds-checked only when ROWS (full
    tiles skip it), columns only when the head dim NC is narrower than the block; zero outside
    and where keep (per row) is False."""
    ptrs = base + offs_r[:, None].to(tl.int64) * sr + offs_c[None, :] * sc
    msk = offs_c[None, :] < NC
    if ROWS:
        msk = msk & (offs_r[:, None] < nr)
    if keep is not None:
        msk = msk & keep[:, None]
    if ROWS or keep is not None or NC < offs_c.shape[0]:
        tile = tl.load(ptrs, mask=msk, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """PREC: "ieee" / "tf32" for fp32 operands, "" for 16-bit ones (whose products need no
    precision choice)."""
    if PREC == "":
        out = tl.dot(a, b)
    else:
        out = tl.dot(a, b, input_precision=PREC)
    return out


@triton.jit
def _operand(x, like, PREC: tl.constexpr):
    """A probability / gradient tile as a dot operand: the input dtype for 16-bit dots (as
    FlashAttention), fp32 for TF32 / IEEE ones."""
    if PREC == "":
        x = x.to(like.dtype)
    return x


@triton.jit
def _live_keys(ok, offs_n, first_row, last_row, lower, upper, LOWER: tl.constexpr, UPPER: tl.constexpr,
               MASK: tl.constexpr):
    """Keys some query row (first_row..last_row) of an edge tile sees. The band's edges give it
    without a reduction; only a user mask needs the column reduction of ok."""
    if MASK != 0:
        live = tl.max(ok.to(tl.int32), 0) > 0
    else:
        live = offs_n >= 0  # every key in bounds (the load's row check covers j >= Tk)
        if UPPER:
            live = live & (offs_n <= last_row + upper)
        if LOWER:
            live = live & (offs_n >= first_row + lower)
    return live


@triton.jit
def _drop_scale(seed, bh, offs_m, offs_n, TK, p_drop):
    """keep / (1 - p) for scores (offs_m, offs_n) of head bh: Philox from (seed + bh, i * Tk + j),
    so the forward and both backward kernels regenerate the same mask."""
    keep = tl.rand(seed + bh, (offs_m * TK + offs_n).to(tl.uint32)) >= p_drop
    return tl.where(keep, 1.0 / (1.0 - p_drop), 0.0)


@triton.jit
def _online_step(s, v, m_i, l_i, acc, drop, PREC: tl.constexpr, DROPOUT: tl.constexpr):
    """One key tile of the online softmax, s in log2 units (-inf where hidden): (m, l, acc)
    updated. The running max stays per row in registers. With dropout, drop is keep / (1 - p)
    per score: it scales what reaches acc, not l."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: keep exp2 finite
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)  # 0 while nothing was seen (m_i = -inf)
    l_new = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = p * drop
    return m_new, l_new, acc * alpha[:, None] + _dot(_operand(p, v, PREC), v, PREC)


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, m_base, offs_m, first_row, last_row, lo, hi,
               skt, skd, svt, svd, smq, smk, TQ, TK, diag, lower, upper, slope, qk_scale, softcap, seed, bh, p_drop,
               EDGE: tl.constexpr, LOWER: tl.constexpr, UPPER: tl.constexpr, MASK: tl.constexpr,
               PREC: tl.constexpr, DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
               D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DV: tl.constexpr):
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load(k_base, offs_n, offs_d, skt, skd, TK, D, EDGE)
        s, _ = _scores(_dot(q, tl.trans(k), PREC), qk_scale, softcap, offs_m[:, None], offs_n[None, :], diag, slope,
                       SOFTCAP, ALIBI, PREC)
        if EDGE or MASK != 0:
            ok, s = _masked(s, offs_m[:, None], offs_n[None, :], TQ, TK, lower, upper, m_base, smq, smk,
                            LOWER and EDGE, UPPER and EDGE, MASK)
            v = _load(v_base, offs_n, offs_dv, svt, svd, TK, DV, EDGE,
                      _live_keys(ok, offs_n, first_row, last_row, lower, upper, LOWER, UPPER, MASK))
        else:
            v = _load(v_base, offs_n, offs_dv, svt, svd, TK, DV, False)
        drop = 1.0
        if DROPOUT:
            drop = _drop_scale(seed, bh, offs_m[:, None], offs_n[None, :], TK, p_drop)
        m_i, l_i, acc = _online_step(s, v, m_i, l_i, acc, drop, PREC, DROPOUT)
    return acc, m_i, l_i


@triton.jit
def _ranges(start, n, n_full, lo_off, hi_off, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, BLOCK: tl.constexpr,
            TILE: tl.constexpr):
    """Which TILE-sized tiles of an axis [0, n) the BLOCK indices a = start.. of the other axis
    see, when a sees [a + lo_off, a + hi_off] (a side without HAS_* unbounded): (lo, full_lo,
    full_hi, hi). Tiles in [full_lo, full_hi) are seen whole by every a (and end by n_full, the
    caller's bound for tiles that need no bounds checks); [lo, full_lo) and [full_hi, hi) are
    the band's edges and the ragged end; nothing outside [lo, hi) is seen by any a. A query
    block's key tiles take (lower, upper); a key block's query tiles (-upper, -lower)."""
    lo, full_lo = 0, 0
    hi, full_hi = n, n_full
    if HAS_HI:
        hi = tl.minimum(n, tl.maximum(start + BLOCK + hi_off, 0))
        full_hi = tl.minimum(full_hi, tl.maximum(start + hi_off + 1, 0) // TILE * TILE)
    if HAS_LO:  # (a band starting past n still visits the one tile below n: rare, and masked)
        lo = tl.minimum(tl.maximum(start + lo_off, 0) // TILE * TILE, hi)
        full_lo = tl.minimum(tl.cdiv(tl.maximum(start + BLOCK - 1 + lo_off, 0), TILE) * TILE, hi)
        full_lo = tl.maximum(full_lo, lo)
    full_hi = tl.maximum(full_hi, full_lo)  # a narrow band: no full tile, one edge run [lo, hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _finish(m_i, l_i, sink, SINKS: tl.constexpr):
    """(inv, lse) from the online softmax's row max m and sum l (log2 units): out = acc * inv, lse
    in natural log. Under SINKS the sink logit (log2 units, -inf = none) joins the denominator:
    lse = logaddexp(m + log l, sink), inv = exp(m + log l - lse) / l. A row that saw no key
    gets out 0 and lse = sink (-inf without)."""
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    inv = tl.where(seen, 1.0 / l_safe, 0.0)
    lse = tl.where(seen, m_i + tl.log2(l_safe), float("-inf"))
    if SINKS:
        top = tl.maximum(lse, sink)
        top = tl.where(top == float("-inf"), 0.0, top)  # neither: log2(0) gives -inf below
        total = top + tl.log2(tl.exp2(lse - top) + tl.exp2(sink - top))
        inv = tl.where(seen, inv * tl.exp2(lse - total), 0.0)
        lse = total
    return inv, lse * _LN2


@triton.jit(do_not_specialize=["TQ_B", "TK_B", "TILE_T"])
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, lse_ptr,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, smb, smh, smq, smk,
    H, GROUP, TQ, TK, qk_scale, seed, p_drop, TQ_B, TK_B, TILE_T, softcap, diag, lower, upper, alibi_ptr, alibi_stride,
    sinks_ptr, cu_q_ptr, cu_k_ptr,
    D: tl.constexpr, DV: tl.constexpr, LOWER: tl.constexpr, UPPER: tl.constexpr, MASK: tl.constexpr,
    PREC: tl.constexpr, DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, SINKS: tl.constexpr,
    VARLEN: tl.constexpr, FOLD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Grid (query blocks, B * H); under VARLEN (blocks of the longest sequence, sequences * H);
    folded into axis 0 past 65,535 (_tile). TILE_T: Tq, or the longest sequence's."""
    pid_m, bh = _tile(TILE_T, BLOCK_M, FOLD)
    b, h = bh // H, bh % H
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    TQ_ALL = TQ  # (the packed total under VARLEN: the layout of out and lse)
    qb, kb, TQ, TK, diag, lower, upper = _sequence(cu_q_ptr, cu_k_ptr, b, TQ, TK, diag, lower, upper, VARLEN)
    if VARLEN:
        if start_m >= TQ:  # past this sequence's end
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    q = _load(q_ptr + _offset(qb, sqb, h, sqh), offs_m, offs_d, sqt, sqd, TQ, D, True)
    k_base = k_ptr + _offset(kb, skb, hk, skh)
    v_base = v_ptr + _offset(kb, svb, hk, svh)
    m_base = m_ptr + _offset(b, smb, h, smh)
    slope = _slope(alibi_ptr, b, alibi_stride, h, ALIBI)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    last_row = tl.minimum(start_m + BLOCK_M, TQ) - 1
    lo, full_lo, full_hi, hi = _ranges(start_m, TK, TK // BLOCK_N * BLOCK_N, lower, upper, LOWER, UPPER,
                                       BLOCK_M, BLOCK_N)
    if LOWER:  # the window's left edge
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, m_base, offs_m, start_m, last_row, lo, full_lo,
                                   skt, skd, svt, svd, smq, smk, TQ, TK, diag, lower, upper, slope, qk_scale, softcap,
                                   seed, bh, p_drop, True, LOWER, UPPER, MASK, PREC, DROPOUT, SOFTCAP, ALIBI,
                                   D, DV, BLOCK_N, BLOCK_D, BLOCK_DV)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, m_base, offs_m, start_m, last_row, full_lo, full_hi,
                               skt, skd, svt, svd, smq, smk, TQ, TK, diag, lower, upper, slope, qk_scale, softcap,
                               seed, bh, p_drop, False, LOWER, UPPER, MASK, PREC, DROPOUT, SOFTCAP, ALIBI,
                               D, DV, BLOCK_N, BLOCK_D, BLOCK_DV)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, m_base, offs_m, start_m, last_row, full_hi, hi,
                               skt, skd, svt, svd, smq, smk, TQ, TK, diag, lower, upper, slope, qk_scale, softcap,
                               seed, bh, p_drop, True, LOWER, UPPER, MASK, PREC, DROPOUT, SOFTCAP, ALIBI,
                               D, DV, BLOCK_N, BLOCK_D, BLOCK_DV)
    sink = 0.0
    if SINKS:
        sink = tl.load(sinks_ptr + h) * _LOG2E
    inv, lse = _finish(m_i, l_i, sink, SINKS)
    out = acc * inv[:, None]
    o_base, so = _rows(o_ptr, bh, h, H, TQ_ALL, DV, qb, VARLEN)
    tl.store(o_base + offs_m[:, None] * so + offs_dv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < TQ) & (offs_dv[None, :] < DV))
    tl.store(lse_ptr + _stat_row(bh, h, TQ_ALL, qb, VARLEN) + offs_m, lse, mask=offs_m < TQ)


@triton.jit
def _delta_kernel(o_ptr, do_ptr, delta_ptr, TQ, DV, H, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_DV: tl.constexpr):
    """delta = rowsum(dO * O) in fp32, laid out as lse; o and do contiguous (B*H, Tq, Dv), or
    under VARLEN (total, H, Dv) (grid (blocks of total * H,): every packed row at once); 1-D
    grid as _tile."""
    tiles = tl.cdiv(TQ, BLOCK_M)  # (a memory-bound pass: the division is free)
    pid_m, bh = tl.program_id(0) % tiles, tl.program_id(0) // tiles
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    msk = (offs_m[:, None] < TQ) & (offs_dv[None, :] < DV)
    o_base, sr = _rows(o_ptr, bh, h, H, TQ, DV, 0, VARLEN)
    do_base, _ = _rows(do_ptr, bh, h, H, TQ, DV, 0, VARLEN)
    off = offs_m[:, None] * sr + offs_dv[None, :]
    o = tl.load(o_base + off, mask=msk, other=0.0).to(tl.float32)
    do = tl.load(do_base + off, mask=msk, other=0.0).to(tl.float32)
    tl.store(delta_ptr + _stat_row(bh, h, TQ, 0, VARLEN) + offs_m, tl.sum(o * do, 1), mask=offs_m < TQ)


@triton.jit
def _row_stats(lse_ptr, delta_ptr, rows, row_ok, EDGE: tl.constexpr):
    """lse in log2 units (0 for fully masked rows, whose probabilities the masks zero) and delta."""
    if EDGE:
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
    else:
        lse, delta = tl.load(lse_ptr + rows), tl.load(delta_ptr + rows)
    return tl.where(lse == float("-inf"), 0.0, lse * _LOG2E), delta


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, sdo, lse_ptr, delta_ptr, h, qb, TQ_ALL, m_base, offs_n, bh, lo, hi,
                sqt, sqd, smq, smk, TQ, TK, diag, lower, upper, slope, qk_scale, softcap, seed, p_drop,
                EDGE: tl.constexpr, LOWER: tl.constexpr, UPPER: tl.constexpr, MASK: tl.constexpr,
                PREC: tl.constexpr, DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr, VARLEN: tl.constexpr):
    """Query tiles [lo, hi) of one query head against the resident key block, transposed (keys
    down, queries across) so dK and dV accumulate as plain products. dO rows are sdo apart; lse
    and delta rows as _stat_row(bh, h, TQ_ALL, qb) says (made per tile: one register less held
    through the loop than its int64 base)."""
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load(q_base, offs_m, offs_d, sqt, sqd, TQ, D, EDGE)
        do = _load(do_base, offs_m, offs_dv, sdo, 1, TQ, DV, EDGE)
        lse, delta = _row_stats(lse_ptr, delta_ptr, _stat_row(bh, h, TQ_ALL, qb, VARLEN) + offs_m, offs_m < TQ, EDGE)
        st, gt = _scores(_dot(k, tl.trans(q), PREC), qk_scale, softcap, offs_m[None, :], offs_n[:, None], diag, slope,
                         SOFTCAP, ALIBI, PREC)
        dpt = _dot(v, tl.trans(do), PREC)
        if DROPOUT:
            dropt = _drop_scale(seed, bh, offs_m[None, :], offs_n[:, None], TK, p_drop)
            dpt = dpt * dropt
        if EDGE or MASK != 0:
            ok, st = _masked(st, offs_m[None, :], offs_n[:, None], TQ, TK, lower, upper, m_base, smq, smk,
                             LOWER and EDGE, UPPER and EDGE, MASK)
            pt = tl.where(ok, tl.exp2(st - lse[None, :]), 0.0)
            dst = pt * (dpt - delta[None, :])
            if SOFTCAP:
                dst = dst * gt
            dst = tl.where(ok, dst, 0.0)  # dpt of a hidden NaN value stays out
        else:
            pt = tl.exp2(st - lse[None, :])
            dst = pt * (dpt - delta[None, :])
            if SOFTCAP:
                dst = dst * gt
        if DROPOUT:
            pt = pt * dropt
        dv += _dot(_operand(pt, do, PREC), do, PREC)
        dk += _dot(_operand(dst, q, PREC), q, PREC)
    return dk, dv


@triton.jit(do_not_specialize=["TQ_B", "TK_B", "TILE_T"])
def _dkdv_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, smb, smh, smq, smk,
    H, HKV, GROUP, SPLIT, TQ, TK, qk_scale, seed, p_drop, TQ_B, TK_B, TILE_T, softcap, diag, lower, upper, alibi_ptr,
    alibi_stride, cu_q_ptr, cu_k_ptr,
    D: tl.constexpr, DV: tl.constexpr, LOWER: tl.constexpr, UPPER: tl.constexpr, MASK: tl.constexpr,
    PREC: tl.constexpr, DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, VARLEN: tl.constexpr,
    FOLD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Grid (key blocks, B * HKV * SPLIT) (folded past 65,535: _tile; TILE_T = Tk, or the longest
    sequence's under VARLEN): the GQA group's query heads are split over SPLIT
    programs, each writing its own (Tk, D) slice of dk / dv (summed by the launcher when
    SPLIT > 1): (B, HKV, SPLIT, Tk, D), under VARLEN (SPLIT, total_k, HKV, D)."""
    pid_n, bhs = _tile(TILE_T, BLOCK_N, FOLD)
    b, hs = bhs // (HKV * SPLIT), bhs % (HKV * SPLIT)
    hk, part = hs // SPLIT, hs % SPLIT
    per = GROUP // SPLIT
    start_n = pid_n * BLOCK_N
    TQ_ALL, TK_ALL = TQ, TK
    qb, kb, TQ, TK, diag, lower, upper = _sequence(cu_q_ptr, cu_k_ptr, b, TQ, TK, diag, lower, upper, VARLEN)
    if VARLEN:
        if start_n >= TK:  # past this sequence's keys
            return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    k = _load(k_ptr + _offset(kb, skb, hk, skh), offs_n, offs_d, skt, skd, TK, D, True)
    v = _load(v_ptr + _offset(kb, svb, hk, svh), offs_n, offs_dv, svt, svd, TK, DV, True)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)
    # query tiles [lo, full_lo) cross the band's upper edge (the causal diagonal), [full_lo,
    # full_hi) see every key of the block (only when the block is whole), [full_hi, hi) cross its
    # lower edge or are the ragged end; queries outside [lo, hi) see none of these keys
    lo, full_lo, full_hi, hi = _ranges(start_n, TQ, tl.where(start_n + BLOCK_N > TK, 0, TQ // BLOCK_M * BLOCK_M),
                                       -upper, -lower, UPPER, LOWER, BLOCK_N, BLOCK_M)
    for g in range(0, per):
        h = hk * GROUP + part * per + g
        bh = b * H + h
        q_base = q_ptr + _offset(qb, sqb, h, sqh)
        do_base, sdo = _rows(do_ptr, bh, h, H, TQ_ALL, DV, qb, VARLEN)
        m_base = m_ptr + _offset(b, smb, h, smh)
        slope = _slope(alibi_ptr, b, alibi_stride, h, ALIBI)
        if UPPER:
            dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, sdo, lse_ptr, delta_ptr, h, qb, TQ_ALL, m_base,
                                 offs_n, bh, lo, full_lo, sqt, sqd, smq, smk, TQ, TK, diag, lower, upper, slope,
                                 qk_scale, softcap, seed, p_drop, True, LOWER, UPPER, MASK, PREC, DROPOUT,
                                 SOFTCAP, ALIBI, D, DV, BLOCK_M, BLOCK_D, BLOCK_DV, VARLEN)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, sdo, lse_ptr, delta_ptr, h, qb, TQ_ALL, m_base,
                             offs_n, bh, full_lo, full_hi, sqt, sqd, smq, smk, TQ, TK, diag, lower, upper, slope,
                             qk_scale, softcap, seed, p_drop, False, LOWER, UPPER, MASK, PREC, DROPOUT,
                             SOFTCAP, ALIBI, D, DV, BLOCK_M, BLOCK_D, BLOCK_DV, VARLEN)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, sdo, lse_ptr, delta_ptr, h, qb, TQ_ALL, m_base,
                             offs_n, bh, full_hi, hi, sqt, sqd, smq, smk, TQ, TK, diag, lower, upper, slope,
                             qk_scale, softcap, seed, p_drop, True, LOWER, UPPER, MASK, PREC, DROPOUT,
                             SOFTCAP, ALIBI, D, DV, BLOCK_M, BLOCK_D, BLOCK_DV, VARLEN)
    kmask = (offs_n[:, None] < TK) & (offs_d[None, :] < D)
    vmask = (offs_n[:, None] < TK) & (offs_dv[None, :] < DV)
    scale = qk_scale * _LN2  # dS is in natural units: dK = dS^T Q * scale
    # rows of dk / dv: dense (B, HKV, SPLIT, Tk, D) from row bhs * Tk, VARLEN (SPLIT, total_k, HKV, D) from row
    # (part * total_k + kb) * HKV + hk, HKV rows apart (the dense form as it was: IEEE fp32 16x16 tiles sit at
    # ptxas's register target, and a pointer + int32 offset form spilled 16 B there)
    row0, rs = bhs.to(tl.int64) * TK, 1
    if VARLEN:
        row0, rs = (part.to(tl.int64) * TK_ALL + kb) * HKV + hk, HKV
    tl.store(dk_ptr + (row0 + offs_n[:, None] * rs) * D + offs_d[None, :], (dk * scale).to(dk_ptr.dtype.element_ty),
             mask=kmask)
    tl.store(dv_ptr + (row0 + offs_n[:, None] * rs) * DV + offs_dv[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=vmask)


@triton.jit
def _dot_rows(a_base, offs_a, sar, sac, na, b_base, offs_b, sbr, sbc, nb, NC: tl.constexpr, BLOCK: tl.constexpr,
              PREC: tl.constexpr):
    """A B^T over NC columns, A's and B's rows read from memory 64 columns at a time. For IEEE
    fp32 (FMA) dots at D = 256: their operands hold whole rows in registers, and a resident
    16 x 256 q or dO spills; chunks re-read from L2 don't."""
    acc = tl.zeros((offs_a.shape[0], offs_b.shape[0]), tl.float32)
    for c0 in tl.static_range(0, BLOCK, 64):
        offs_c = c0 + tl.arange(0, 64)
        a = tl.load(a_base + offs_a[:, None].to(tl.int64) * sar + offs_c[None, :] * sac,
                    mask=(offs_a[:, None] < na) & (offs_c[None, :] < NC), other=0.0)
        b = tl.load(b_base + offs_b[:, None].to(tl.int64) * sbr + offs_c[None, :] * sbc,
                    mask=(offs_b[:, None] < nb) & (offs_c[None, :] < NC), other=0.0)
        acc += _dot(a, tl.trans(b), PREC)
    return acc


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, m_base, offs_m, first_row, last_row, bh, lo, hi,
              skt, skd, svt, svd, smq, smk, TQ, TK, diag, lower, upper, slope, qk_scale, softcap, seed, p_drop,
              EDGE: tl.constexpr, LOWER: tl.constexpr, UPPER: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr,
              DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, q_base, do_base, sdo, sqt, sqd,
              CHUNK: tl.constexpr):
    """CHUNK: q and dO are not resident; their products are read in column chunks (_dot_rows)."""
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if CHUNK:
            dp = _dot_rows(do_base, offs_m, sdo, 1, TQ, v_base, offs_n, svt, svd, TK, DV, BLOCK_DV, PREC)
            qk = _dot_rows(q_base, offs_m, sqt, sqd, TQ, k_base, offs_n, skt, skd, TK, D, BLOCK_D, PREC)
        else:
            v = _load(v_base, offs_n, offs_dv, svt, svd, TK, DV, EDGE)
            dp = _dot(do, tl.trans(v), PREC)
        if DROPOUT:
            dp = dp * _drop_scale(seed, bh, offs_m[:, None], offs_n[None, :], TK, p_drop)
        if EDGE or MASK != 0:
            if MASK != 0:  # the live keys come from the mask: K is loaded after it
                k = _load(k_base, offs_n, offs_d, skt, skd, TK, D, EDGE)
                if not CHUNK:
                    qk = _dot(q, tl.trans(k), PREC)
                s, g = _scores(qk, qk_scale, softcap, offs_m[:, None], offs_n[None, :], diag, slope,
                               SOFTCAP, ALIBI, PREC)
                ok, s = _masked(s, offs_m[:, None], offs_n[None, :], TQ, TK,
                                lower, upper, m_base, smq, smk, LOWER and EDGE, UPPER and EDGE, MASK)
                k = tl.where(_live_keys(ok, offs_n, first_row, last_row, lower, upper, LOWER, UPPER, MASK)[:, None],
                             k, 0.0).to(k.dtype)
            else:
                k = _load(k_base, offs_n, offs_d, skt, skd, TK, D, EDGE,
                          _live_keys(None, offs_n, first_row, last_row, lower, upper, LOWER, UPPER, MASK))
                if not CHUNK:
                    qk = _dot(q, tl.trans(k), PREC)
                s, g = _scores(qk, qk_scale, softcap, offs_m[:, None], offs_n[None, :], diag, slope,
                               SOFTCAP, ALIBI, PREC)
                ok, s = _masked(s, offs_m[:, None], offs_n[None, :], TQ, TK,
                                lower, upper, m_base, smq, smk, LOWER, UPPER, MASK)
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * g
            ds = tl.where(ok, ds, 0.0)
        else:
            k = _load(k_base, offs_n, offs_d, skt, skd, TK, D, False)
            if not CHUNK:
                qk = _dot(q, tl.trans(k), PREC)
            s, g = _scores(qk, qk_scale, softcap, offs_m[:, None], offs_n[None, :], diag, slope,
                           SOFTCAP, ALIBI, PREC)
            p = tl.exp2(s - lse[:, None])
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * g
        dq += _dot(_operand(ds, k, PREC), k, PREC)
    return dq


@triton.jit(do_not_specialize=["TQ_B", "TK_B", "TILE_T"])
def _dq_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, smb, smh, smq, smk,
    H, GROUP, TQ, TK, qk_scale, seed, p_drop, TQ_B, TK_B, TILE_T, softcap, diag, lower, upper, alibi_ptr, alibi_stride,
    cu_q_ptr, cu_k_ptr,
    D: tl.constexpr, DV: tl.constexpr, LOWER: tl.constexpr, UPPER: tl.constexpr, MASK: tl.constexpr,
    PREC: tl.constexpr, DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, VARLEN: tl.constexpr,
    FOLD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Grid (query blocks, B * H) as _fwd_kernel's (_tile)."""
    pid_m, bh = _tile(TILE_T, BLOCK_M, FOLD)
    b, h = bh // H, bh % H
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    TQ_ALL = TQ
    qb, kb, TQ, TK, diag, lower, upper = _sequence(cu_q_ptr, cu_k_ptr, b, TQ, TK, diag, lower, upper, VARLEN)
    if VARLEN:
        if start_m >= TQ:  # past this sequence's end
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    q_base = q_ptr + _offset(qb, sqb, h, sqh)
    q = _load(q_base, offs_m, offs_d, sqt, sqd, TQ, D, True)
    do_base, sdo = _rows(do_ptr, bh, h, H, TQ_ALL, DV, qb, VARLEN)
    do = _load(do_base, offs_m, offs_dv, sdo, 1, TQ, DV, True)
    lse, delta = _row_stats(lse_ptr, delta_ptr, _stat_row(bh, h, TQ_ALL, qb, VARLEN) + offs_m, offs_m < TQ, True)
    k_base = k_ptr + _offset(kb, skb, hk, skh)
    v_base = v_ptr + _offset(kb, svb, hk, svh)
    m_base = m_ptr + _offset(b, smb, h, smh)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    last_row = tl.minimum(start_m + BLOCK_M, TQ) - 1
    slope = _slope(alibi_ptr, b, alibi_stride, h, ALIBI)
    lo, full_lo, full_hi, hi = _ranges(start_m, TK, TK // BLOCK_N * BLOCK_N, lower, upper, LOWER, UPPER,
                                       BLOCK_M, BLOCK_N)
    if LOWER:  # the window's left edge
        dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, m_base, offs_m, start_m, last_row, bh, lo, full_lo,
                       skt, skd, svt, svd, smq, smk, TQ, TK, diag, lower, upper, slope, qk_scale, softcap, seed, p_drop,
                       True, LOWER, UPPER, MASK, PREC, DROPOUT, SOFTCAP, ALIBI, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV,
                       q_base, do_base, sdo, sqt, sqd, CHUNK)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, m_base, offs_m, start_m, last_row, bh, full_lo, full_hi,
                   skt, skd, svt, svd, smq, smk, TQ, TK, diag, lower, upper, slope, qk_scale, softcap, seed, p_drop,
                   False, LOWER, UPPER, MASK, PREC, DROPOUT, SOFTCAP, ALIBI, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV,
                   q_base, do_base, sdo, sqt, sqd, CHUNK)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, m_base, offs_m, start_m, last_row, bh, full_hi, hi,
                   skt, skd, svt, svd, smq, smk, TQ, TK, diag, lower, upper, slope, qk_scale, softcap, seed, p_drop,
                   True, LOWER, UPPER, MASK, PREC, DROPOUT, SOFTCAP, ALIBI, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV,
                   q_base, do_base, sdo, sqt, sqd, CHUNK)
    qmask = (offs_m[:, None] < TQ) & (offs_d[None, :] < D)
    dq_base, sdq = _rows(dq_ptr, bh, h, H, TQ_ALL, D, qb, VARLEN)
    tl.store(dq_base + offs_m[:, None] * sdq + offs_d[None, :], (dq * (qk_scale * _LN2)).to(dq_ptr.dtype.element_ty),
             mask=qmask)


# ---------------------------------------------------------------- launch helpers
# (BLOCK_M, BLOCK_N, warps, stages), best first, one list per kernel: the forward and dQ keep
# their queries resident (tall BLOCK_M) and stream keys, dK/dV keeps keys resident (tall
# BLOCK_N) and streams queries. The small tiles serve IEEE fp32 (FMA dots, operands in
# registers) and wide heads on GPUs with less shared memory; pruning keeps them out where a
# bigger one fits and doesn't spill. The forward keeps only tiles whose warps own whole rows
# (_whole_rows), so the online softmax's row max and sum never cross warps; the 2-stage
# 128-row tiles are for sm_86's 99 KB at D = 128.
_FWD_TILES = ((128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 4, 3),
              (64, 32, 4, 2), (32, 32, 2, 1), (32, 16, 2, 1), (16, 16, 1, 1), (32, 32, 4, 1), (32, 16, 4, 1),
              (16, 16, 4, 1))
_DKDV_TILES = ((32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (16, 64, 4, 2), (32, 32, 8, 1), (32, 32, 4, 1),
               (16, 16, 4, 1), (16, 16, 8, 1))
_DQ_TILES = ((128, 64, 8, 3), (128, 32, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 64, 8, 2), (64, 32, 4, 2),
             (64, 32, 8, 2), (32, 32, 8, 1), (32, 32, 4, 1), (32, 16, 4, 1), (16, 16, 4, 1), (16, 16, 8, 1))
_KEY = ["D", "DV", "TQ_B", "TK_B", "LOWER", "UPPER", "MASK", "DROPOUT", "SOFTCAP", "ALIBI", "PREC", "VARLEN"]
REG_LIMIT = 190  # estimated 32-bit registers per thread a config may need (255 exist; see _regs)
REG_LIMIT_TF32 = 150  # fp32 operands: TF32 tiles measured spilling from an estimate of 160


# Every config lets ptxas use all 255 registers (.maxnreg). Left to itself, ptxas caps these
# kernels near an occupancy step (128 registers: two 8-warp or four 4-warp programs per SM; 168:
# three 4-warp ones) and spills 4-24 B to get there; given the registers it allocates what the
# schedule needs (spilling configs measured took 138-214) and spills only where a config truly
# needs more than 255, which _allowed prunes. An 8-warp program over 128 registers is already alone
# on its SM, and a 4-warp one keeps two programs per SM at 255, so occupancy is lost only where
# ptxas would have settled under the cap without spilling. Not for IEEE fp32 (FMA dots): there
# the cap made ptxas fill all 255 and spill (dQ at D = 256, 16 x 16 over 8 warps: 8 B), which
# it doesn't left to itself, nor for dQ at D = 256 (_uncapped); so each tile comes twice, with
# the cap and without, and _allowed picks. Triton >= 3.0 has Config.maxnreg; without it every
# config is uncapped.
MAX_REGS = 255
_HAS_MAXNREG = "maxnreg" in inspect.signature(triton.Config.__init__).parameters


def _configs(tiles):
    caps = (MAX_REGS, None) if _HAS_MAXNREG else (None,)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s,
                          **({"maxnreg": cap} if cap else {}))
            for cap in caps for bm, bn, w, s in tiles]


def _capped(cfg) -> bool:
    return getattr(cfg, "maxnreg", None) is not None


def _uncapped(kind, a) -> bool:
    """Where ptxas is left its own register target: dQ at D = 256 (16-bit: the cap made it fill
    255 registers and spill 8-40 B, 32 x 32 over 8 warps; 176-186 uncapped, clean) and IEEE dQ
    (16 x 16 over 8 warps at D = 256: 8 B spilled capped). IEEE's forward and dK/dV are capped:
    left to itself ptxas held their 16 x 16 tiles at 72-168 registers and spilled 4-56 B."""
    return kind == "dq" and (a["PREC"] == "ieee" or a["BLOCK_D"] >= 256)


def _dims(cfg, a):
    return a["q_ptr"].element_size(), cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], a["BLOCK_D"], a["BLOCK_DV"]


def _smem_fwd(cfg, a):
    """Upper estimate of the forward's shared memory: K and V tiles per pipeline stage, the Q
    tile, an fp32 score tile and P in the input dtype (layout changes)."""
    e, bm, bn, d, dv = _dims(cfg, a)
    return e * (bm * d + max(cfg.num_stages, 1) * bn * (d + dv)) + (4 + e) * bm * bn + 1024


def _smem_bwd(cfg, a):
    """Backward kernels: the streamed pair (Q, dO or K, V) per stage (at least two: single-stage
    tiles measured 2.5 pairs) plus the resident pair, and two fp32 score tiles that change
    layout into the gradient dots."""
    e, bm, bn, d, dv = _dims(cfg, a)
    return e * (max(cfg.num_stages, 2) + 1) * max(bm, bn) * (d + dv) + 8 * bm * bn + 1024


def _regs(kind):
    """Registers per thread a config needs, estimated: fp32 accumulators, resident dot operands
    (16-bit ones pack two to a register) and the fp32 score-sized tiles alive at once, spread over
    the threads, plus addressing. Configs over REG_LIMIT spill (calibrated on sm_80 / sm_90
    ptxas reports, tests/test_triton_aot.py) and are pruned."""
    def need(cfg, a):
        e, bm, bn, d, dv = _dims(cfg, a)
        tiles = 2 + (a["MASK"] != 0) + a["DROPOUT"]  # scores and probabilities, bias, keep-mask
        if kind != "fwd":
            tiles += bool(a.get("SOFTCAP", False))  # 1 - tanh^2 of the capped scores
        if kind == "fwd":
            acc, resident = bm * dv, bm * d
        elif kind == "dkdv":
            acc, resident, tiles = bn * (d + dv), bn * (d + dv), tiles + 2  # + dP, dS
        else:
            acc, resident, tiles = bm * d, bm * (d + dv), tiles + 2
        return (acc + resident * e / 4 + tiles * bm * bn) / (32 * cfg.num_warps) + 32
    return need


def _chunked(a) -> bool:
    """dQ reads q and dO in column chunks (CHUNK, _dot_rows) instead of holding them: IEEE fp32
    from D = 128 (FMA dots hold whole rows of K = D: a resident 16 x 128 pair took all 255
    registers and spilled 4-8 B on sm_86 / sm_90)."""
    return a["PREC"] == "ieee" and a["BLOCK_D"] >= 128


def _allowed(regs, kind):
    def allowed(cfg, a):
        if _HAS_MAXNREG and _capped(cfg) == _uncapped(kind, a):
            return False
        bm, bn, warps, d = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, a["BLOCK_D"]
        tile = bm * bn
        if a["PREC"] == "ieee":  # FMA dots hold whole rows of K = D in registers: only the smallest tiles
            # 32 x 16 forward tiles to D = 64 (at D = 128 a varlen one took 255 registers and spilled 604 B)
            most = 512 if kind == "fwd" and d < 128 else 256
            # the backward's 16x16 tiles spread over 8 warps (half the registers each) for dQ, and
            # for dK/dV at D = 256
            want = 8 if kind == "dq" or (kind == "dkdv" and d >= 256) else 4
            return warps == want and tile <= most
        limit = REG_LIMIT if a["PREC"] == "" else REG_LIMIT_TF32
        if kind == "fwd" and _per_score_heavy(a) and bm >= 128:
            return False
        if kind == "fwd" and not _whole_rows(bm, warps, a) and not _no_whole_row_tile(a):
            return False  # the row max would cross warps; kept only where no whole-row tile fits
        if a["PREC"] == "tf32" and not _tf32_fits(kind, a, bm, warps):
            return False
        if tile <= 256 and kind == "fwd":  # the 16 x 16 forward over one warp, where it fits
            return regs(cfg, a) <= limit
        if tile <= 256:  # 16x16, every list's last resort (TF32 at D=256 has nothing else)
            # but not masked 16-bit dQ at D = 256 over 8 warps (128 registers, 4 B spilled)
            return not (kind == "dq" and d >= 256 and a["MASK"] != 0 and warps == 8 and a["PREC"] == "")
        # Measured at or over 255 registers even with all of them allowed (MAX_REGS), so spilling: a
        # forward with a user mask at D >= 64 whose threads hold 32 scores each (the mask tile's
        # 64-bit pointers alone are 64 registers), and 4-warp dQ at D = 256 (64 fp32 accumulators
        # a thread, with q and dO replicated over the two warps that share each 16 rows), and
        # dK/dV streaming a user mask through 3 stages (254 registers on sm_80, 16-36 B spilled on
        # sm_86, at D = 32: the register estimate prunes them at larger D), and on mma.sync targets
        # (sm_80/86; sm_90's wgmma dQ took 158-199) dQ with a user mask at D >= 64 whose threads
        # hold 16 scores each (255 registers on sm_80, 16 B spilled on sm_86).
        if kind == "fwd" and (a["MASK"] != 0 or a["ALIBI"]) and d >= 64 and tile >= 32 * 32 * warps:
            return False  # ALiBi too: its bias tile spilled 8 B in a 128 x 64 / 8 varlen forward (sm_86)
        if (kind == "dq" and a["MASK"] != 0 and d >= 64 and tile >= 16 * 32 * warps
                and _tune.capability(a["q_ptr"].device) < 90):
            return False
        if kind == "dkdv" and a["MASK"] != 0 and cfg.num_stages >= 3:
            return False
        if kind == "dq" and d >= 256 and warps == 4:
            return False
        return regs(cfg, a) <= limit
    return allowed


def _whole_rows(bm, warps, a) -> bool:
    """Whether each warp of a forward config owns whole rows of its score tile, so the softmax's
    row max and sum stay in the warp (checked on the compiled layouts: tests/test_triton_aot.py).
    wgmma (sm_90, 64-row tiles) puts warpgroups along M, 64 rows each: rows are whole when
    BLOCK_M >= 16 warps. mma.sync (sm_80/86, and sm_90's smaller tiles) lays out the two chained
    dots of the loop by the P V product's (BLOCK_M, head dim) shape: along M only when BLOCK_M is
    at least the value head dim, so a 64-row tile at D = 128 spreads its 4 warps along N and
    passes P and the row statistics through shared memory every tile. One warp is always whole."""
    if warps == 1:
        return True
    if warps > bm // 16:
        return False
    if bm >= 64 and _tune.capability(a["q_ptr"].device) >= 90:
        return True
    return bm >= a["BLOCK_DV"]


def _per_score_heavy(a) -> bool:
    """A user mask or ALiBi (per-score tiles: the mask's 64-bit pointers and values, the bias) at
    D >= 128 on mma.sync targets (sm_80/86): there a 128-row forward tile, the only whole-row one
    at that head dim, sat at 255 registers and spilled 8-24 B (sm_80, 128 x 32 over 8 warps)."""
    return (a["MASK"] != 0 or a["ALIBI"]) and a["BLOCK_DV"] >= 128 and _tune.capability(a["q_ptr"].device) < 90


def _no_whole_row_tile(a) -> bool:
    """Where the forward keeps tiles whose warps share rows: 16-bit at D = 256 and TF32 from
    D = 128 (a 16-row tile over one warp spilled 612-904 B, and a whole-row mma.sync tile needs
    BLOCK_M >= D), and _per_score_heavy."""
    return a["BLOCK_DV"] >= (256 if a["PREC"] == "" else 128) or _per_score_heavy(a)


def _tf32_fits(kind, a, bm, warps) -> bool:
    """TF32 operands are fp32 in the MMA fragments, twice a 16-bit one's registers, and a
    resident tile is repeated in every warp that shares its rows: dQ's q and dO then cost about
    D registers a thread whatever the tile, so ptxas runs out where _regs says there is room
    (sweep of every TF32 config, sm_80/86/90, at the 255 cap; spills 4-112 B):
    - dQ at D >= 128: only 16-row tiles over 8 warps (32 x 32 / 8 and 32 x 16 / 4 spilled);
    - dQ with 64-row tiles over 8 warps on mma.sync targets (sm_80/86) with a user mask, dropout
      or packed sequences, or at D = 64 (64 x 64 and 64 x 32 spilled or sat at 255);
    - dK/dV at D = 256: 8 warps (16 x 16 over 4 with dropout: 255 registers, 16 B spilled)."""
    d = a["BLOCK_D"]
    if kind == "dq" and d >= 128:
        return bm == 16 and warps == 8
    if kind == "dq" and bm == 64 and warps == 8 and _tune.capability(a["q_ptr"].device) < 90:
        return not (a["MASK"] != 0 or a["DROPOUT"] or a["VARLEN"] or d >= 64)
    if kind == "dkdv" and d >= 256:
        return warps == 8
    return True


def _tuned(kernel, tiles, smem, kind, what):
    return _tune.autotune(_configs(tiles), _KEY, smem, f"triton attention {what}", _allowed(_regs(kind), kind))(kernel)


_fwd_tuned = _tuned(_fwd_kernel, _FWD_TILES, _smem_fwd, "fwd", "forward")
_dkdv_tuned = _tuned(_dkdv_kernel, _DKDV_TILES, _smem_bwd, "dkdv", "backward (dK, dV)")
_dq_tuned = _tuned(_dq_kernel, _DQ_TILES, _smem_bwd, "dq", "backward (dQ)")


def fp32_precision() -> str:
    """How fp32 dots run, as torch's matmuls would right now: "tf32" when torch allows TF32
    (allow_tf32 or a float32 matmul precision below "highest"), else "ieee"."""
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "ieee"


def _strides4(t):
    return [0 if t.shape[i] == 1 else t.stride(i) for i in range(4)]


def relative_band(causal, tq, tk, window=(-1, -1)):
    """band() for lengths the kernels read on the device (varlen, decode against a cache), tq and
    tk bounding them: (factor, lower, upper) with the diagonal diag = factor * (Tk - Tq) (factor
    0 for top-left causal, else 1) and the band's edges relative to it (the kernels add diag)."""
    left, right = (min(w, tq + tk) for w in window)
    upper = 0 if causal else None
    if right >= 0:
        upper = right if upper is None else min(upper, right)
    lower = -left if left >= 0 else None
    return (0 if causal == 1 else 1), lower, upper


def band(causal, tq, tk, window=(-1, -1)):
    """(diag, lower, upper): the diagonal ALiBi measures from (0 for top-left causal, else
    Tk - Tq) and the keys [i + lower, i + upper] query i may see, None for an unbounded side:
    causality and a right window are one edge (the tighter wins). A window side longer than
    Tq + Tk hides nothing: clamped there so the kernels' int32 index sums can't overflow."""
    factor, lower, upper = relative_band(causal, tq, tk, window)
    diag = factor * (tk - tq)
    return diag, None if lower is None else diag + lower, None if upper is None else diag + upper


def _packed_strides(t):
    """(total, heads, dim) as the kernels' (batch, head, row, dim) strides: a sequence's "batch
    index" is its first row (_sequence), so the batch stride is the row stride."""
    return [t.stride(0), t.stride(1), t.stride(0), t.stride(2)]


def _common(q, k, v, mask, causal, scale, dropout_p=0.0, softcap=0.0, window=(-1, -1), alibi=None, lengths=None):
    """Launch facts shared by every attention kernel: sizes, the mask as kernel argument, the
    strides, scale * log2(e), the option arguments every kernel takes after softcap (diag,
    lower, upper, alibi, alibi_stride) and the constexprs. lengths = (max_q, max_k) for packed
    varlen q (total_q, H, D), k, v (total_k, H_kv, D): then b is None, tq / tk are the totals
    and the band is relative_band's."""
    if lengths is None:
        b, h, tq, d = q.shape
        hkv, tk, dv = k.shape[1], k.shape[2], v.shape[-1]
    else:
        (tq, h, d), (tk, hkv), dv, b = q.shape, k.shape[:2], v.shape[-1], None
    if mask is None:
        mask_t, mask_code, mstr = q, 0, [0, 0, 0, 0]
    elif mask.dtype == torch.bool:
        mask_t, mask_code, mstr = mask.view(torch.uint8), 1, _strides4(mask)
    else:
        mask_t, mask_code, mstr = mask, 2, _strides4(mask)
    diag, lower, upper = band(causal, tq, tk, window) if lengths is None else relative_band(causal, *lengths, window)
    options = (diag, lower or 0, upper or 0, alibi, 0 if alibi is None or alibi.dim() == 1 else alibi.stride(0))
    meta = dict(D=d, DV=dv, LOWER=lower is not None, UPPER=upper is not None, MASK=mask_code, DROPOUT=dropout_p > 0,
                SOFTCAP=softcap > 0, ALIBI=alibi is not None, PREC=fp32_precision() if q.dtype == torch.float32 else "",
                VARLEN=lengths is not None,
                BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(dv)))
    layout = _strides4 if lengths is None else _packed_strides
    strides = layout(q) + layout(k) + layout(v) + mstr
    return b, h, hkv, tq, tk, mask_t, strides, scale * LOG2E, options, meta


MAX_GRID_YZ = 65535  # CUDA's cap on grid axis 1 (a test lowers it to run FOLD in the interpreter)


def _grid(t, block, heads, b):
    """(grid(meta), FOLD) for a kernel tiling length t in meta[block] rows per program over
    b * heads (batch entry, head) pairs: (tiles, b * heads), or past axis 1's cap (tiles * b *
    heads,) (_tile)."""
    if b * heads > MAX_GRID_YZ:
        return (lambda m: (triton.cdiv(t, m[block]) * b * heads,)), True
    return (lambda m: (triton.cdiv(t, m[block]), b * heads)), False


def _launch(kernel, tuned, grid, args, meta):
    if _tune.interpreting():  # fixed small blocks: the interpreter is slow and autotuning it pointless
        _tune.launch(kernel, grid(dict(BLOCK_M=16, BLOCK_N=16)), *args, **meta, BLOCK_M=16, BLOCK_N=16)
    else:
        _tune.launch(tuned, grid, *args, **meta)


def forward(q, k, v, mask, causal, scale, dropout_p=0.0, seed=0, softcap=0.0, window=(-1, -1), alibi=None,
            sinks=None):
    """(out (B, H, Tq, Dv) contiguous, lse (B, H, Tq) fp32). Decode steps take the split-KV path.
    softcap > 0 caps the scores (softcap * tanh(s / softcap)); 0 is off. window = (left, right),
    -1 unbounded; alibi: fp32 slopes (H,) or (B, H), contiguous; sinks: fp32 logits (H,). lse
    includes the sinks (the backward reads it so)."""
    from fastlm.triton import attention_decode

    if attention_decode.serves(q, k, v) and q.shape[0] * k.shape[1] > 0 and dropout_p == 0:
        return attention_decode.forward(q, k, v, mask, causal, scale, softcap, window, alibi, sinks)
    from fastlm.triton import attention_tma  # the Hopper TMA / warp-specialised forward, where it serves

    if not attention_tma.why_not(q, k, v, mask, causal, dropout_p, softcap, window, alibi, sinks):
        return attention_tma.forward(q, k, v, causal, scale)
    b, h, hkv, tq, tk, mask_t, strides, qk_scale, options, meta = _common(q, k, v, mask, causal, scale, dropout_p,
                                                                          softcap, window, alibi)
    out = torch.empty(b, h, tq, meta["DV"], device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, tq, device=q.device, dtype=torch.float32)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    args = (q, k, v, mask_t, out, lse, *strides, h, h // hkv, tq, tk, qk_scale, seed, dropout_p,
            _tune.bucket(tq), _tune.bucket(tk), tq, float(softcap), *options, sinks, None, None)
    grid, fold = _grid(tq, "BLOCK_M", h, b)
    _launch(_fwd_kernel, _fwd_tuned, grid, args, dict(meta, SINKS=sinks is not None, FOLD=fold))
    return out, lse


def group_split(b, hkv, tk, group, device) -> int:
    """How many programs share one key block's GQA group in dK/dV: 1 (the group's heads in one
    program, written straight into dk / dv) when the key blocks alone give every SM a program,
    else the smallest divisor of the group that does (fp32 partials, summed afterwards)."""
    programs = b * hkv * triton.cdiv(tk, 128)  # the tallest key block any config uses
    sms = _tune.sm_count(device)
    return next((s for s in range(1, group + 1) if group % s == 0 and programs * s >= sms), group)


def backward(grad_out, q, k, v, mask, out, lse, causal, scale, dropout_p=0.0, seed=0, softcap=0.0, window=(-1, -1),
             alibi=None):
    """(dq, dk, dv). No sinks argument: P = exp(s - lse) with the forward's lse already
    divides by them."""
    b, h, hkv, tq, tk, mask_t, strides, qk_scale, options, meta = _common(q, k, v, mask, causal, scale, dropout_p,
                                                                          softcap, window, alibi)
    dq, dk, dvv = (torch.empty(t.shape, device=q.device, dtype=q.dtype) for t in (q, k, v))
    if 0 in (b, h, tq, tk):
        return dq.zero_(), dk.zero_(), dvv.zero_()
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    delta = torch.empty(b, h, tq, device=q.device, dtype=torch.float32)
    _tune.launch(_delta_kernel, (triton.cdiv(tq, 64) * b * h,), out, grad_out, delta, tq, meta["DV"], h,
                 VARLEN=False, BLOCK_M=64, BLOCK_DV=meta["BLOCK_DV"])
    buckets = (_tune.bucket(tq), _tune.bucket(tk))
    split = group_split(b, hkv, tk, h // hkv, q.device)
    dk_out, dv_out = dk, dvv
    if split > 1:
        dk_out, dv_out = (torch.empty(b, hkv, split, tk, t.shape[-1], device=q.device, dtype=torch.float32)
                          for t in (k, v))
    args = (q, k, v, mask_t, grad_out, lse, delta, dk_out, dv_out, *strides, h, hkv, h // hkv, split, tq, tk,
            qk_scale, seed, dropout_p, *buckets, tk, float(softcap), *options, None, None)
    grid, fold = _grid(tk, "BLOCK_N", hkv * split, b)
    _launch(_dkdv_kernel, _dkdv_tuned, grid, args, dict(meta, FOLD=fold))
    if split > 1:
        dk.copy_(dk_out.sum(2))
        dvv.copy_(dv_out.sum(2))
    args = (q, k, v, mask_t, grad_out, lse, delta, dq, *strides, h, h // hkv, tq, tk, qk_scale,
            seed, dropout_p, *buckets, tq, float(softcap), *options, None, None)
    chunk = _chunked(meta)  # IEEE fp32 from D = 128: q, dO not resident
    grid, fold = _grid(tq, "BLOCK_M", h, b)
    _launch(_dq_kernel, _dq_tuned, grid, args, dict(meta, CHUNK=chunk, FOLD=fold))
    return dq, dk, dvv


# ---------------------------------------------------------------- varlen (packed sequences)
def _check_packed(fn, q, k, v, cu_q, cu_k, max_q, max_k):
    """What the kernels rely on and the ops layer may not have checked (direct calls): shapes,
    and cu_seqlens as contiguous int32 on q's device (their values are read on the device)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{fn}: {name} must be packed (total, heads, head_dim), got shape {tuple(t.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] or v.shape[:2] != k.shape[:2] or k.shape[2] != q.shape[2]:
        raise ValueError(f"{fn}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not agree "
                         "(heads a multiple of k's, k / v rows and heads, q / k head dims)")
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1 or cu.stride(0) != 1 or cu.device != q.device:
            raise ValueError(f"{fn}: {name} must be a contiguous 1-D int32 tensor on {q.device}, got {cu.dtype} "
                             f"{tuple(cu.shape)} on {cu.device}")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"{fn}: cu_seqlens_q has {cu_q.numel() - 1} sequences but cu_seqlens_k {cu_k.numel() - 1}")
    for name, m in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if not isinstance(m, int) or m < 0:
            raise ValueError(f"{fn}: {name} must be an int >= 0, got {m!r}")


def varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, softcap=0.0, window=(-1, -1), alibi=None,
                   sinks=None):
    """Packed sequences (FlashAttention's varlen): (out (total_q, H, Dv), lse (H, total_q) fp32).
    q (total_q, H, D), k (total_k, H_kv, D), v (total_k, H_kv, Dv), any strides; cu_q / cu_k int32
    (num_seqs + 1,) prefix sums on q's device; max_q / max_k bound the lengths and size the grid
    (programs past their sequence's end return at once). causal: 0 none, 1 top-left, 2
    bottom-right, per sequence, as are the window, ALiBi ((H,) or (num_seqs, H)) and sinks (H,)."""
    _check_packed("varlen_forward", q, k, v, cu_q, cu_k, max_q, max_k)
    seqs = cu_q.numel() - 1
    _, h, hkv, tq, tk, mask_t, strides, qk_scale, options, meta = _common(
        q, k, v, None, causal, scale, 0.0, softcap, window, alibi, lengths=(max_q, max_k))
    out = torch.empty(tq, h, meta["DV"], device=q.device, dtype=q.dtype)
    lse = torch.empty(h, tq, device=q.device, dtype=torch.float32)
    if out.numel() == 0 and lse.numel() == 0 or max_q == 0:
        return out, lse
    args = (q, k, v, mask_t, out, lse, *strides, h, h // hkv, tq, tk, qk_scale, 0, 0.0,
            _tune.bucket(max_q), _tune.bucket(max_k), max_q, float(softcap), *options, sinks, cu_q, cu_k)
    grid, fold = _grid(max_q, "BLOCK_M", h, seqs)
    _launch(_fwd_kernel, _fwd_tuned, grid, args, dict(meta, SINKS=sinks is not None, FOLD=fold))
    return out, lse


def varlen_backward(grad_out, q, k, v, cu_q, cu_k, max_q, max_k, out, lse, causal, scale, softcap=0.0,
                    window=(-1, -1), alibi=None):
    """(dq, dk, dv) of varlen_forward, shaped as q, k, v (contiguous); lse is its (H, total_q)."""
    _check_packed("varlen_backward", q, k, v, cu_q, cu_k, max_q, max_k)
    seqs = cu_q.numel() - 1
    _, h, hkv, tq, tk, mask_t, strides, qk_scale, options, meta = _common(
        q, k, v, None, causal, scale, 0.0, softcap, window, alibi, lengths=(max_q, max_k))
    dq, dk, dvv = (torch.empty(t.shape, device=q.device, dtype=q.dtype) for t in (q, k, v))
    if 0 in (seqs, h, tq, tk, max_q, max_k):
        return dq.zero_(), dk.zero_(), dvv.zero_()
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    delta = torch.empty(h, tq, device=q.device, dtype=torch.float32)
    _tune.launch(_delta_kernel, (triton.cdiv(tq, 64) * h,), out, grad_out, delta, tq, meta["DV"], h,
                 VARLEN=True, BLOCK_M=64, BLOCK_DV=meta["BLOCK_DV"])
    buckets = (_tune.bucket(max_q), _tune.bucket(max_k))
    split = group_split(seqs, hkv, max_k, h // hkv, q.device)
    dk_out, dv_out = dk, dvv
    if split > 1:  # (SPLIT, total_k, H_kv, D) fp32 partials
        dk_out, dv_out = (torch.empty(split, *t.shape, device=q.device, dtype=torch.float32) for t in (k, v))
    args = (q, k, v, mask_t, grad_out, lse, delta, dk_out, dv_out, *strides, h, hkv, h // hkv, split, tq, tk,
            qk_scale, 0, 0.0, *buckets, max_k, float(softcap), *options, cu_q, cu_k)
    grid, fold = _grid(max_k, "BLOCK_N", hkv * split, seqs)
    _launch(_dkdv_kernel, _dkdv_tuned, grid, args, dict(meta, FOLD=fold))
    if split > 1:
        dk.copy_(dk_out.sum(0))
        dvv.copy_(dv_out.sum(0))
    args = (q, k, v, mask_t, grad_out, lse, delta, dq, *strides, h, h // hkv, tq, tk, qk_scale, 0, 0.0, *buckets,
            max_q, float(softcap), *options, cu_q, cu_k)
    chunk = _chunked(meta)
    grid, fold = _grid(max_q, "BLOCK_M", h, seqs)
    _launch(_dq_kernel, _dq_tuned, grid, args, dict(meta, CHUNK=chunk, FOLD=fold))
    return dq, dk, dvv
