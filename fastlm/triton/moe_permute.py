"""Triton kernels for moe_permute / moe_unpermute: tokens into expert-contiguous rows and back.

Permute is a counting sort over the T*k flat assignments (t*k + slot order), dropped ones (-1, or
any id outside [0, E) on the GPU, where ids are not checked on the host) counted as a bucket E
after the experts, which is what puts them in the zero tail:
1. `_count_kernel`: per block of BLOCK_A assignments, how many fall in each bucket.
2. On the device (torch, int32, fixed order): bucket starts = exclusive cumsum of the totals
   (= offsets, with offsets[E] the start of the tail), plus each block's exclusive prefix.
3. `_place_kernel`: each assignment's row = its bucket's start + earlier blocks' count + its rank
   among the same bucket inside its block (a BLOCK_A^2 comparison: stable), and the row is
   copied (or zeroed, for the tail) right there, H in BLOCK_H chunks: one pass over x_sorted.
Permute's backward and unpermute's forward are one gather-sum each (a program owns BLOCK_T
tokens x BLOCK_H columns, k rows gathered per token, fp32 accumulation). Unpermute's backward
writes each row of grad_y_sorted once, from the row's side: a tiny scatter makes the inverse
map row -> assignment, then a program owns BLOCK_R rows, walks H, writes w * grad_out[t] (0 for
rows nobody references) and reduces dot(y_row, grad_out[t]) in registers for grad_weights.
Row indices outside [0, N) are skipped, never dereferenced.

Why it is fast: all memory-bound, and each (T*k, H) tensor is read or written exactly once
(x_sorted never zero-filled and then overwritten); the counting passes move 4 bytes an
assignment. Tiles are about 4096 elements (16 a thread at 8 warps) with unit-stride columns.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.triton import _tune

BLOCK_A = 64  # assignments per counting program: the rank comparison is BLOCK_A^2
TILE_ELEMENTS = 4096


@triton.jit
def _buckets(ids_ptr, a, a_ok, E):
    """Each assignment's bucket: its expert, or E when dropped (or out of range)."""
    idx = tl.load(ids_ptr + a, mask=a_ok, other=-1)
    return tl.where((idx >= 0) & (idx < E), idx, E)


@triton.jit
def _count_kernel(ids_ptr, block_counts_ptr, n, E, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    pid = tl.program_id(0)
    a = pid * BLOCK_A + tl.arange(0, BLOCK_A)
    a_ok = a < n
    bucket = _buckets(ids_ptr, a, a_ok, E)
    b = tl.arange(0, BLOCK_B)
    hits = tl.sum(((bucket[:, None] == b[None, :]) & a_ok[:, None]).to(tl.int32), axis=0)
    tl.store(block_counts_ptr + pid * (E + 1) + b, hits, mask=b <= E)


@triton.jit
def _place_kernel(
    x_ptr, ids_ptr, base_ptr, xs_ptr, rows_ptr, n, E, K, H, sx0, sx1,
    BLOCK_A: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK_A)
    a = pid * BLOCK_A + r
    a_ok = a < n
    bucket = _buckets(ids_ptr, a, a_ok, E)
    earlier = (r[None, :] < r[:, None]) & a_ok[None, :]
    rank = tl.sum((earlier & (bucket[:, None] == bucket[None, :])).to(tl.int32), axis=1)
    row = tl.load(base_ptr + pid * (E + 1) + bucket, mask=a_ok, other=0) + rank
    kept = bucket < E
    tl.store(rows_ptr + a, tl.where(kept, row, -1), mask=a_ok)
    src = x_ptr + (a // K).to(tl.int64)[:, None] * sx0
    dst = xs_ptr + row.to(tl.int64)[:, None] * H
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)[None, :]
        h_ok = a_ok[:, None] & (h < H)
        v = tl.load(src + h * sx1, mask=h_ok & kept[:, None], other=0.0)  # the tail gets zeros
        tl.store(dst + h, v, mask=h_ok)


@triton.jit
def _gather_sum_kernel(
    y_ptr, rows_ptr, w_ptr, out_ptr, T, K, N, H, sy0, sy1,
    WEIGHTED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[t] = sum_slot (w[t, slot] *) y[rows[t, slot]], rows outside [0, N) skipped."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_ok = t < T
    h_ok = h < H
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for s in range(K):
        at = t.to(tl.int64) * K + s
        row = tl.load(rows_ptr + at, mask=t_ok, other=-1)
        ok = t_ok & (row >= 0) & (row < N)
        v = tl.load(y_ptr + row.to(tl.int64)[:, None] * sy0 + h[None, :] * sy1, mask=ok[:, None] & h_ok[None, :],
                    other=0.0).to(tl.float32)
        if WEIGHTED:
            v *= tl.load(w_ptr + at, mask=ok, other=0.0)[:, None]
        acc += v
    tl.store(out_ptr + t.to(tl.int64)[:, None] * H + h[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=t_ok[:, None] & h_ok[None, :])


@triton.jit
def _invert_kernel(rows_ptr, owner_ptr, n, N, BLOCK: tl.constexpr):
    """owner[row] = the assignment that reads it (rows nobody references keep -1)."""
    a = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a_ok = a < n
    row = tl.load(rows_ptr + a, mask=a_ok, other=-1)
    tl.store(owner_ptr + row, a, mask=a_ok & (row >= 0) & (row < N))


@triton.jit
def _unpermute_grad_kernel(
    g_ptr, y_ptr, owner_ptr, w_ptr, gy_ptr, gw_ptr, N, K, H, sg0, sy0, sy1,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = row < N
    a = tl.load(owner_ptr + row, mask=row_ok, other=-1)
    used = a >= 0
    w = tl.load(w_ptr + a, mask=used, other=0.0)
    tok = (a // K).to(tl.int64)[:, None]
    dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)[None, :]
        h_ok = h < H
        g = tl.load(g_ptr + tok * sg0 + h, mask=used[:, None] & h_ok, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + row.to(tl.int64)[:, None] * sy0 + h * sy1, mask=used[:, None] & h_ok,
                    other=0.0).to(tl.float32)
        tl.store(gy_ptr + row.to(tl.int64)[:, None] * H + h, (w[:, None] * g).to(gy_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & h_ok)
        dot += tl.sum(y * g, axis=1)
    tl.store(gw_ptr + a, dot, mask=used)


def _tile(h: int) -> tuple[int, int, int]:
    """(rows a program, BLOCK_H, num_warps) for rows of h columns: about TILE_ELEMENTS a tile."""
    block_h = min(triton.next_power_of_2(max(h, 1)), 1024)
    rows = max(1, TILE_ELEMENTS // block_h)
    return rows, block_h, 8 if rows * block_h >= 4096 else 4


def permute(x, expert_ids, num_experts):
    """(x_sorted (T*k, H), row_index (T, k) int32, offsets (E+1,) int32): moe_permute_fwd's schema."""
    t, k = expert_ids.shape
    h = x.shape[1]
    n, dev = t * k, x.device
    x_sorted = torch.empty(n, h, dtype=x.dtype, device=dev)
    rows = torch.empty(t, k, dtype=torch.int32, device=dev)
    if n == 0:
        return x_sorted, rows, torch.zeros(num_experts + 1, dtype=torch.int32, device=dev)
    ids = expert_ids.contiguous()
    blocks = triton.cdiv(n, BLOCK_A)
    counts = torch.empty(blocks, num_experts + 1, dtype=torch.int32, device=dev)
    _tune.launch(_count_kernel, (blocks,), ids, counts, n, num_experts, BLOCK_A=BLOCK_A,
                 BLOCK_B=triton.next_power_of_2(num_experts + 1), num_warps=4)
    totals = counts.sum(0, dtype=torch.int32)
    offsets = torch.cat([totals.new_zeros(1), totals.cumsum(0, dtype=torch.int32)[:-1]])  # bucket starts
    base = (counts.cumsum(0, dtype=torch.int32) - counts + offsets).contiguous()
    _, block_h, warps = _tile(h)
    _tune.launch(_place_kernel, (blocks,), x, ids, base, x_sorted, rows, n, num_experts, k, h,
                 x.stride(0), x.stride(1), BLOCK_A=BLOCK_A, BLOCK_H=min(block_h, TILE_ELEMENTS // BLOCK_A),
                 num_warps=warps)
    return x_sorted, rows, offsets


def _gather_sum(y, row_index, weights, dtype):
    t, k = row_index.shape
    h = y.shape[1]
    out = torch.empty(t, h, dtype=dtype, device=y.device)
    if out.numel() == 0:
        return out
    block_t, block_h, warps = _tile(h)
    grid = (triton.cdiv(t, block_t), triton.cdiv(h, block_h))
    _tune.launch(_gather_sum_kernel, grid, y, row_index.contiguous(), weights if weights is not None else y, out,
                 t, k, y.shape[0], h, y.stride(0), y.stride(1), WEIGHTED=weights is not None, BLOCK_T=block_t,
                 BLOCK_H=block_h, num_warps=warps)
    return out


def permute_backward(grad_sorted, row_index):
    """grad_x (T, H) = sum over a token's slots of its grad_sorted rows: moe_permute_bwd's schema."""
    return _gather_sum(grad_sorted, row_index, None, grad_sorted.dtype)


def unpermute(y_sorted, row_index, weights):
    """out (T, H) = sum_slot w * y_sorted[row]: moe_unpermute_fwd's schema."""
    return _gather_sum(y_sorted, row_index, weights.contiguous(), y_sorted.dtype)


def unpermute_backward(grad_out, y_sorted, row_index, weights):
    """(grad_y_sorted (N, H), grad_weights (T, k) fp32): moe_unpermute_bwd's schema."""
    n, h = y_sorted.shape
    dev = y_sorted.device
    grad_y = torch.empty(n, h, dtype=y_sorted.dtype, device=dev)
    grad_w = torch.zeros(row_index.shape, dtype=torch.float32, device=dev)  # dropped slots: 0
    if n == 0:
        return grad_y, grad_w
    owner = torch.full((n,), -1, dtype=torch.int32, device=dev)
    if row_index.numel():
        _tune.launch(_invert_kernel, (triton.cdiv(row_index.numel(), 1024),), row_index.contiguous(), owner,
                     row_index.numel(), n, BLOCK=1024, num_warps=4)
    block_h = min(triton.next_power_of_2(h), 256)  # rows walk H: the tile stays ~TILE_ELEMENTS
    block_r = max(1, TILE_ELEMENTS // block_h)
    warps = 8 if block_r * block_h >= 4096 else 4
    grad_out = grad_out.contiguous()
    _tune.launch(_unpermute_grad_kernel, (triton.cdiv(n, block_r),), grad_out, y_sorted, owner, weights.contiguous(),
                 grad_y, grad_w, n, row_index.shape[1], h, grad_out.stride(0), y_sorted.stride(0), y_sorted.stride(1),
                 BLOCK_R=block_r, BLOCK_H=block_h, num_warps=warps)
    return grad_y, grad_w
