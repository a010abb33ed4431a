"""Triton flash attention, forward and backward (FlashAttention-2 structure).

Forward: a program owns BLOCK_M queries of one (batch, head), walks the key blocks it can see
(stopping at the causal diagonal) with an online softmax in fp32, and writes out and lse.
Backward: a pre-pass computes delta = rowsum(dO * O); one kernel owns a block of keys of one
key/value head and accumulates dK, dV over every query head of its GQA group; another owns a
block of queries and accumulates dQ. No atomics: the gradients are deterministic.

Masking: key j is visible to query i when j < Tk, j <= i + offset (causal), and the mask
allows it. Hidden scores are -inf and their probabilities exactly 0; keys no query of a tile
sees are zeroed before they enter a product, so NaN there can't leak. Block sizes are autotuned
on a GPU per (head dims, lengths rounded up to powers of two, causal, mask, dropout), among the
configs whose shared memory fits the device (fastlm/triton/_tune.py), and fixed small under the
interpreter. Head and batch offsets are int64 (_offset).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.triton import _tune


@triton.jit
def _visible(offs_m, offs_n, tq, tk, offset, mask_ptr, msq, msk, CAUSAL: tl.constexpr, MASK: tl.constexpr):
    """(bool visible, additive bias) for the (offs_m x offs_n) score tile; offs may be transposed views."""
    ok = (offs_m < tq) & (offs_n < tk)
    if CAUSAL:
        ok = ok & (offs_n <= offs_m + offset)
    bias = tl.zeros(ok.shape, dtype=tl.float32)
    if MASK == 1:
        keep = tl.load(mask_ptr + offs_m.to(tl.int64) * msq + offs_n * msk, mask=ok, other=0)
        ok = ok & (keep != 0)
    elif MASK == 2:
        bias = tl.load(mask_ptr + offs_m.to(tl.int64) * msq + offs_n * msk, mask=ok, other=0.0).to(tl.float32)
        ok = ok & (bias > float("-inf"))
    return ok, bias


@triton.jit
def _offset(b, sb, h, sh):
    """b * sb + h * sh in int64: a head term alone passes 2^31 elements, e.g. for a per-head
    (1, H, 16384, 16384) mask."""
    return b.to(tl.int64) * sb + h.to(tl.int64) * sh


@triton.jit
def _load_rows(base, offs_r, offs_c, sr, sc, NR, NC, extra=None):
    """A (rows x cols) tile at base + r*sr + c*sc, zero outside (NR, NC) (and where extra is False)."""
    msk = (offs_r[:, None] < NR) & (offs_c[None, :] < NC)
    if extra is not None:
        msk = msk & extra[:, None]
    return tl.load(base + offs_r[:, None].to(tl.int64) * sr + offs_c[None, :] * sc, mask=msk, other=0.0)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _online_step(s, v, m_i, l_i, acc, drop, IEEE: tl.constexpr, DROPOUT: tl.constexpr):
    """One key tile of the online softmax: s has -inf where hidden; returns (m, l, acc) updated.
    With dropout, drop is keep / (1 - p) per score: it scales what reaches acc, not l."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)  # 0 while nothing was seen (m_i = -inf)
    l_new = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = p * drop
    if not IEEE:
        p = p.to(v.dtype)
    return m_new, l_new, acc * alpha[:, None] + _dot(p, v, IEEE)


@triton.jit
def _drop_scale(seed, bh, offs_m, offs_n, TK, p_drop, DROPOUT: tl.constexpr):
    """keep / (1 - p) for scores (offs_m, offs_n) of head bh: Philox from (seed + bh, i * Tk + j),
    so the forward and both backward kernels regenerate the same mask."""
    drop = 1.0  # one return: Triton rejects a tensor returned in one branch and a scalar in another
    if DROPOUT:
        keep = tl.rand(seed + bh, (offs_m * TK + offs_n).to(tl.uint32)) >= p_drop
        drop = tl.where(keep, 1.0 / (1.0 - p_drop), 0.0)
    return drop


@triton.jit(do_not_specialize=["TQ_B", "TK_B"])
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, lse_ptr,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, smb, smh, smq, smk,
    H, GROUP, TQ, TK, D, DV, offset, scale, seed, p_drop, TQ_B, TK_B,
    CAUSAL: tl.constexpr, MASK: tl.constexpr, IEEE: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    q_base = q_ptr + _offset(b, sqb, h, sqh)
    k_base = k_ptr + _offset(b, skb, hk, skh)
    v_base = v_ptr + _offset(b, svb, hk, svh)
    m_base = m_ptr + _offset(b, smb, h, smh)
    q = _load_rows(q_base, offs_m, offs_d, sqt, sqd, TQ, D)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    hi = TK
    if CAUSAL:
        hi = tl.minimum(TK, pid_m * BLOCK_M + BLOCK_M + offset)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, offs_d, skt, skd, TK, D)
        ok, bias = _visible(offs_m[:, None], offs_n[None, :], TQ, TK, offset, m_base, smq, smk, CAUSAL, MASK)
        s = tl.where(ok, _dot(q, tl.trans(k), IEEE) * scale + bias, float("-inf"))
        live = tl.max(ok.to(tl.int32), 0) > 0  # keys some query of the tile sees
        v = _load_rows(v_base, offs_n, offs_dv, svt, svd, TK, DV, live)
        drop = _drop_scale(seed, bh, offs_m[:, None], offs_n[None, :], TK, p_drop, DROPOUT)
        m_i, l_i, acc = _online_step(s, v, m_i, l_i, acc, drop, IEEE, DROPOUT)
    inv = tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
    out = acc * inv[:, None]
    o_base = o_ptr + bh.to(tl.int64) * TQ * DV
    tl.store(o_base + offs_m[:, None] * DV + offs_dv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < TQ) & (offs_dv[None, :] < DV))
    lse = tl.where(l_i > 0.0, m_i + tl.log(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + bh.to(tl.int64) * TQ + offs_m, lse, mask=offs_m < TQ)


@triton.jit
def _delta_kernel(o_ptr, do_ptr, delta_ptr, TQ, DV, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta = rowsum(dO * O) in fp32; o and do contiguous (B*H, Tq, Dv)."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    msk = (offs_m[:, None] < TQ) & (offs_dv[None, :] < DV)
    off = bh.to(tl.int64) * TQ * DV + offs_m[:, None] * DV + offs_dv[None, :]
    o = tl.load(o_ptr + off, mask=msk, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + off, mask=msk, other=0.0).to(tl.float32)
    tl.store(delta_ptr + bh.to(tl.int64) * TQ + offs_m, tl.sum(o * do, 1), mask=offs_m < TQ)


@triton.jit(do_not_specialize=["TQ_B", "TK_B"])
def _dkdv_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, smb, smh, smq, smk,
    H, HKV, GROUP, TQ, TK, D, DV, offset, scale, seed, p_drop, TQ_B, TK_B,
    CAUSAL: tl.constexpr, MASK: tl.constexpr, IEEE: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_n, bhk = tl.program_id(0), tl.program_id(1)
    b, hk = bhk // HKV, bhk % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    kmask = (offs_n[:, None] < TK) & (offs_d[None, :] < D)
    vmask = (offs_n[:, None] < TK) & (offs_dv[None, :] < DV)
    k = tl.load(k_ptr + _offset(b, skb, hk, skh) + offs_n[:, None].to(tl.int64) * skt + offs_d[None, :] * skd,
                mask=kmask, other=0.0)
    v = tl.load(v_ptr + _offset(b, svb, hk, svh) + offs_n[:, None].to(tl.int64) * svt + offs_dv[None, :] * svd,
                mask=vmask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)
    lo = 0
    if CAUSAL:
        lo = tl.maximum(pid_n * BLOCK_N - offset, 0) // BLOCK_M * BLOCK_M
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        q_base = q_ptr + _offset(b, sqb, h, sqh)
        m_base = m_ptr + _offset(b, smb, h, smh)
        for start_m in range(lo, TQ, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _load_rows(q_base, offs_m, offs_d, sqt, sqd, TQ, D)
            rows = bh.to(tl.int64) * TQ + offs_m
            do = _load_rows(do_ptr + bh.to(tl.int64) * TQ * DV, offs_m, offs_dv, DV, 1, TQ, DV)
            lse = tl.load(lse_ptr + rows, mask=offs_m < TQ, other=0.0)
            delta = tl.load(delta_ptr + rows, mask=offs_m < TQ, other=0.0)
            # transposed tile: keys down, queries across
            ok, bias = _visible(offs_m[None, :], offs_n[:, None], TQ, TK, offset, m_base, smq, smk, CAUSAL, MASK)
            st = _dot(k, tl.trans(q), IEEE) * scale + bias
            pt = tl.where(ok, tl.exp(st - tl.where(ok, lse[None, :], 0.0)), 0.0)
            live = tl.max(ok.to(tl.int32), 1) > 0
            v_live = tl.where(live[:, None], v, 0.0).to(v.dtype)
            dropt = _drop_scale(seed, bh, offs_m[None, :], offs_n[:, None], TK, p_drop, DROPOUT)
            dpt = _dot(v_live, tl.trans(do), IEEE) * dropt
            dst = tl.where(ok, pt * (dpt - delta[None, :]), 0.0)
            pdt = pt * dropt
            if IEEE:
                dv += _dot(pdt, do, IEEE)
                dk += _dot(dst, q, IEEE)
            else:
                dv += _dot(pdt.to(do.dtype), do, IEEE)
                dk += _dot(dst.to(q.dtype), q, IEEE)
    out = bhk.to(tl.int64) * TK
    tl.store(dk_ptr + (out + offs_n[:, None]) * D + offs_d[None, :], (dk * scale).to(dk_ptr.dtype.element_ty), mask=kmask)
    tl.store(dv_ptr + (out + offs_n[:, None]) * DV + offs_dv[None, :], dv.to(dv_ptr.dtype.element_ty), mask=vmask)


@triton.jit(do_not_specialize=["TQ_B", "TK_B"])
def _dq_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, smb, smh, smq, smk,
    H, GROUP, TQ, TK, D, DV, offset, scale, seed, p_drop, TQ_B, TK_B,
    CAUSAL: tl.constexpr, MASK: tl.constexpr, IEEE: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    qmask = (offs_m[:, None] < TQ) & (offs_d[None, :] < D)
    q = _load_rows(q_ptr + _offset(b, sqb, h, sqh), offs_m, offs_d, sqt, sqd, TQ, D)
    rows = bh.to(tl.int64) * TQ + offs_m
    do = _load_rows(do_ptr + bh.to(tl.int64) * TQ * DV, offs_m, offs_dv, DV, 1, TQ, DV)
    lse = tl.load(lse_ptr + rows, mask=offs_m < TQ, other=0.0)
    delta = tl.load(delta_ptr + rows, mask=offs_m < TQ, other=0.0)
    k_base = k_ptr + _offset(b, skb, hk, skh)
    v_base = v_ptr + _offset(b, svb, hk, svh)
    m_base = m_ptr + _offset(b, smb, h, smh)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    hi = TK
    if CAUSAL:
        hi = tl.minimum(TK, pid_m * BLOCK_M + BLOCK_M + offset)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ok, bias = _visible(offs_m[:, None], offs_n[None, :], TQ, TK, offset, m_base, smq, smk, CAUSAL, MASK)
        live = tl.max(ok.to(tl.int32), 0) > 0
        k = _load_rows(k_base, offs_n, offs_d, skt, skd, TK, D, live)
        v = _load_rows(v_base, offs_n, offs_dv, svt, svd, TK, DV, live)
        s = _dot(q, tl.trans(k), IEEE) * scale + bias
        p = tl.where(ok, tl.exp(s - tl.where(ok, lse[:, None], 0.0)), 0.0)
        dp = _dot(do, tl.trans(v), IEEE) * _drop_scale(seed, bh, offs_m[:, None], offs_n[None, :], TK, p_drop, DROPOUT)
        ds = tl.where(ok, p * (dp - delta[:, None]), 0.0)
        if IEEE:
            dq += _dot(ds, k, IEEE)
        else:
            dq += _dot(ds.to(k.dtype), k, IEEE)
    tl.store(dq_ptr + rows[:, None] * D + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty), mask=qmask)


# ---------------------------------------------------------------- launch helpers
# (BLOCK_M, BLOCK_N, warps, stages), best first; the small ones exist for fp32 / wide heads on
# GPUs with less shared memory, and pruning keeps them out where a bigger one fits.
_TILES = ((128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 32, 4, 2), (64, 32, 4, 1),
          (32, 32, 4, 1), (32, 16, 4, 1), (16, 16, 4, 1))
_KEY = ["D", "DV", "TQ_B", "TK_B", "CAUSAL", "MASK", "DROPOUT"]


def _configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in _TILES]


def _smem_fwd(cfg, a):
    """Upper estimate of the forward's shared memory (checked against compiled kernels by
    tests/test_triton_aot.py): K and V tiles per pipeline stage, the Q tile, and an fp32 score
    tile (the P / bias layout changes)."""
    e, kw, st = a["q_ptr"].element_size(), cfg.kwargs, max(cfg.num_stages, 1)
    bm, bn, d, dv = kw["BLOCK_M"], kw["BLOCK_N"], a["BLOCK_D"], a["BLOCK_DV"]
    return e * (bm * d + st * bn * (d + dv)) + 4 * bm * bn + 1024


def _smem_bwd(cfg, a):
    """Backward kernels: the streamed pair (Q, dO or K, V) per stage plus the resident pair, and
    two fp32 score tiles that change layout into the gradient dots."""
    e, kw, st = a["q_ptr"].element_size(), cfg.kwargs, max(cfg.num_stages, 1)
    bm, bn, d, dv = kw["BLOCK_M"], kw["BLOCK_N"], a["BLOCK_D"], a["BLOCK_DV"]
    return e * (st + 1) * max(bm, bn) * (d + dv) + 8 * bm * bn + 1024


def _allowed(cfg, a):
    """fp32 dots run on FMA units with operands in registers: tiles over 32x32 (32x16 at D=256)
    spill kilobytes (13-44 KB measured on sm_80) and take 5-30 s to compile, for no speed."""
    return not a["IEEE"] or cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] <= (512 if a["BLOCK_D"] >= 256 else 1024)


def _tuned(kernel, smem, what):
    return _tune.autotune(_configs(), _KEY, smem, f"triton attention {what}", _allowed)(kernel)


_fwd_tuned = _tuned(_fwd_kernel, _smem_fwd, "forward")
_dkdv_tuned = _tuned(_dkdv_kernel, _smem_bwd, "backward (dK, dV)")
_dq_tuned = _tuned(_dq_kernel, _smem_bwd, "backward (dQ)")


def _strides4(t):
    return [0 if t.shape[i] == 1 else t.stride(i) for i in range(4)]


def _common(q, k, v, mask, causal, scale, dropout_p=0.0):
    b, h, tq, d = q.shape
    hkv, tk, dv = k.shape[1], k.shape[2], v.shape[-1]
    if mask is None:
        mask_t, mask_code, mstr = q, 0, [0, 0, 0, 0]
    elif mask.dtype == torch.bool:
        mask_t, mask_code, mstr = mask.view(torch.uint8), 1, _strides4(mask)
    else:
        mask_t, mask_code, mstr = mask, 2, _strides4(mask)
    offset = tk - tq if causal == 2 else 0
    meta = dict(CAUSAL=causal != 0, MASK=mask_code, IEEE=q.dtype == torch.float32, DROPOUT=dropout_p > 0,
                BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(dv)))
    strides = _strides4(q) + _strides4(k) + _strides4(v) + mstr
    return b, h, hkv, tq, tk, d, dv, mask_t, strides, offset, meta


def _launch(kernel, tuned, grid, args, meta):
    if _tune.interpreting():  # fixed small blocks: the interpreter is slow and autotuning it pointless
        _tune.launch(kernel, grid(dict(BLOCK_M=16, BLOCK_N=16)), *args, **meta, BLOCK_M=16, BLOCK_N=16)
    else:
        _tune.launch(tuned, grid, *args, **meta)


def forward(q, k, v, mask, causal, scale, dropout_p=0.0, seed=0):
    """(out (B, H, Tq, Dv) contiguous, lse (B, H, Tq) fp32). Decode steps take the split-KV path."""
    from fastlm.triton import attention_decode

    if attention_decode.serves(q, k, v) and q.shape[0] * k.shape[1] > 0 and dropout_p == 0:
        return attention_decode.forward(q, k, v, mask, causal, scale)
    b, h, hkv, tq, tk, d, dv, mask_t, strides, offset, meta = _common(q, k, v, mask, causal, scale, dropout_p)
    out = torch.empty(b, h, tq, dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, tq, device=q.device, dtype=torch.float32)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    args = (q, k, v, mask_t, out, lse, *strides, h, h // hkv, tq, tk, d, dv, offset, scale, seed, dropout_p,
            _tune.bucket(tq), _tune.bucket(tk))
    _launch(_fwd_kernel, _fwd_tuned, lambda m: (triton.cdiv(tq, m["BLOCK_M"]), b * h), args, meta)
    return out, lse


def backward(grad_out, q, k, v, mask, out, lse, causal, scale, dropout_p=0.0, seed=0):
    b, h, hkv, tq, tk, d, dv, mask_t, strides, offset, meta = _common(q, k, v, mask, causal, scale, dropout_p)
    dq, dk, dvv = (torch.empty(t.shape, device=q.device, dtype=q.dtype) for t in (q, k, v))
    if 0 in (b, h, tq, tk):
        return dq.zero_(), dk.zero_(), dvv.zero_()
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    delta = torch.empty(b, h, tq, device=q.device, dtype=torch.float32)
    _tune.launch(_delta_kernel, (triton.cdiv(tq, 64), b * h), out, grad_out, delta, tq, dv,
                 BLOCK_M=64, BLOCK_DV=meta["BLOCK_DV"])
    buckets = (_tune.bucket(tq), _tune.bucket(tk))
    args = (q, k, v, mask_t, grad_out, lse, delta, dk, dvv, *strides, h, hkv, h // hkv, tq, tk, d, dv, offset, scale,
            seed, dropout_p, *buckets)
    _launch(_dkdv_kernel, _dkdv_tuned, lambda m: (triton.cdiv(tk, m["BLOCK_N"]), b * hkv), args, meta)
    args = (q, k, v, mask_t, grad_out, lse, delta, dq, *strides, h, h // hkv, tq, tk, d, dv, offset, scale,
            seed, dropout_p, *buckets)
    _launch(_dq_kernel, _dq_tuned, lambda m: (triton.cdiv(tq, m["BLOCK_M"]), b * h), args, meta)
    return dq, dk, dvv
