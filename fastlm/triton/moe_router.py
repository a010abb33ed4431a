"""Triton kernels for moe_router: top-k routing, GShard capacity and the router losses.

Forward, three launches-worth of work in two kernels and two tiny device-side reductions, no
host sync anywhere:
1. `_route_kernel`, one program per BLOCK_T rows: the (BLOCK_T, BLOCK_E) logits tile in fp32
   registers, softmax or sigmoid scores, logsumexp, then top-k by k passes of a row max (NaN
   ranked first as torch's descending sort does, ties to the lower expert: the smallest index
   holding the max), the weights renormalised over the k. It writes the ids and weights and,
   per (slot, row block), how many assignments each expert got, plus per-block partial sums of
   the routing probabilities and of lse^2 (the two losses). Partials are reduced in a fixed
   order by torch on the device: deterministic, no float atomics.
2. With a capacity, `_capacity_kernel` gives each assignment its GShard position: the number of
   earlier slot-major assignments to its expert = the exclusive prefix of the per-(slot, block)
   counts (a cumsum of k * blocks * E ints) plus its rank inside its own block (a BLOCK_T^2
   comparison), and drops it (id -1, weight 0) when that position is >= capacity. The kept
   count per expert is then min(picked, capacity), with no second pass.
Backward, `_route_grad_kernel`: one pass per row block, recomputing scores and selection from
the logits (the same @jit helper as the forward), the kept mask from the forward's ids, and the
chain rule of fastlm/ops/moe_router.py in fp32.

Why it is fast: the router is memory-bound on reading the (T, E) logits once (E = 8..256: a
row is 16..512 bytes); k passes of a BLOCK_E-wide max are k * log2(BLOCK_E) shuffle steps per
row, small next to that load. Tiles hold about 2048 elements (BLOCK_T = 2048 / BLOCK_E rows, at
most 64), 8 per thread: the scores, softmax, selection mask and gradient tiles all stay live, and
16 a thread spilled 4 B at E = 256 on sm_86.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.triton import _tune

TILE_ELEMENTS = 2048


@triton.jit
def _scores(logits_ptr, rows, row_ok, s0, s1, E, SIGMOID: tl.constexpr, BLOCK_E: tl.constexpr):
    """(scores s, softmax q, lse, expert ids, expert mask) of a row block, fp32; padded experts
    score 0 (never picked: selection skips them) and padded rows read logits 0 (finite)."""
    e = tl.arange(0, BLOCK_E)
    e_ok = e < E
    ptrs = logits_ptr + rows[:, None].to(tl.int64) * s0 + e[None, :].to(tl.int64) * s1
    l = tl.load(ptrs, mask=row_ok[:, None] & e_ok[None, :], other=0.0).to(tl.float32)
    l = tl.where(e_ok[None, :], l, float("-inf"))
    m = tl.max(l, axis=1)
    ex = tl.exp(l - m[:, None])
    total = tl.sum(ex, axis=1)
    q = ex / total[:, None]
    lse = m + tl.log(total)
    if SIGMOID:
        s = tl.sigmoid(l)
    else:
        s = q
    return s, q, lse, e, e_ok


@triton.jit
def _pick(s, taken, e, e_ok, BLOCK_E: tl.constexpr):
    """One top-k pass: the best expert not yet taken per row, as a one-hot (BLOCK_T, BLOCK_E) mask
    and its index. NaN ranks above every number (as torch's descending sort puts it first);
    ties go to the lower index."""
    key = tl.where(s != s, float("inf"), s)
    key = tl.where(taken | (e_ok[None, :] == 0), -1.0, key)  # scores are >= 0: -1 is never the max
    best = tl.max(key, axis=1)
    idx = tl.min(tl.where(key == best[:, None], e[None, :], BLOCK_E), axis=1)
    return e[None, :] == idx[:, None], idx


@triton.jit
def _route_kernel(
    logits_ptr, ids_ptr, w_ptr, slot_counts_ptr, prob_part_ptr, z_part_ptr,
    T, E, s0, s1, n_blocks,
    K: tl.constexpr, SIGMOID: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    s, q, lse, e, e_ok = _scores(logits_ptr, rows, row_ok, s0, s1, E, SIGMOID, BLOCK_E)
    slot = tl.arange(0, BLOCK_K)
    taken = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for i in tl.static_range(K):
        hit, idx = _pick(s, taken, e, e_ok, BLOCK_E)
        taken = taken | hit
        ids = tl.where(slot[None, :] == i, idx[:, None], ids)
        w = tl.where(slot[None, :] == i, tl.sum(tl.where(hit, s, 0.0), axis=1)[:, None], w)
        picked = tl.sum((hit & row_ok[:, None]).to(tl.int32), axis=0)
        tl.store(slot_counts_ptr + (i * n_blocks + pid) * E + e, picked, mask=e_ok)
    if NORMALIZE:
        w = w / tl.sum(w, axis=1)[:, None]
    out = rows[:, None].to(tl.int64) * K + slot[None, :]
    out_ok = row_ok[:, None] & (slot[None, :] < K)
    tl.store(ids_ptr + out, ids, mask=out_ok)
    tl.store(w_ptr + out, w, mask=out_ok)
    # load-balancing loss: P_e = mean_t p_te, p = softmax, or the sigmoid scores normalised per token
    if SIGMOID:
        p = s / tl.sum(s, axis=1)[:, None]
    else:
        p = q
    tl.store(prob_part_ptr + pid * E + e, tl.sum(tl.where(row_ok[:, None], p, 0.0), axis=0), mask=e_ok)
    tl.store(z_part_ptr + pid, tl.sum(tl.where(row_ok, lse * lse, 0.0), axis=0))


@triton.jit
def _capacity_kernel(ids_ptr, w_ptr, before_ptr, T, E, n_blocks, capacity, K: tl.constexpr, BLOCK_T: tl.constexpr):
    """Drops the assignments whose slot-major position in their expert is >= capacity.
    before[(slot, block), e]: the expert's assignments in all earlier (slot, block) pairs."""
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK_T)
    rows = pid * BLOCK_T + r
    row_ok = rows < T
    earlier = (r[None, :] < r[:, None]) & row_ok[None, :]  # [i, j]: row j comes before row i in the block
    for i in tl.static_range(K):
        at = rows.to(tl.int64) * K + i
        idx = tl.load(ids_ptr + at, mask=row_ok, other=0)
        rank = tl.sum((earlier & (idx[:, None] == idx[None, :])).to(tl.int32), axis=1)
        pos = tl.load(before_ptr + (i * n_blocks + pid) * E + idx, mask=row_ok, other=0) + rank
        drop = row_ok & (pos >= capacity)
        tl.store(ids_ptr + at, tl.full((BLOCK_T,), -1, tl.int32), mask=drop)
        tl.store(w_ptr + at, tl.zeros((BLOCK_T,), tl.float32), mask=drop)


@triton.jit
def _route_grad_kernel(
    gw_ptr, ga_ptr, gz_ptr, logits_ptr, ids_ptr, picked_ptr, dl_ptr,
    T, E, s0, s1,
    K: tl.constexpr, SIGMOID: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    s, q, lse, e, e_ok = _scores(logits_ptr, rows, row_ok, s0, s1, E, SIGMOID, BLOCK_E)
    taken = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
    g = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)  # grad of each selected expert's weight
    for i in tl.static_range(K):
        hit, idx = _pick(s, taken, e, e_ok, BLOCK_E)
        taken = taken | hit
        at = rows.to(tl.int64) * K + i
        kept = tl.load(ids_ptr + at, mask=row_ok, other=-1) >= 0  # dropped slots: constant 0 weights
        gi = tl.where(kept, tl.load(gw_ptr + at, mask=row_ok, other=0.0), 0.0)
        g = tl.where(hit, gi[:, None], g)
    sel = tl.where(taken, s, 0.0)
    if NORMALIZE:  # w_i = s_i / S: ds_i = (g_i - sum_j g_j w_j) / S
        total = tl.sum(sel, axis=1)
        ds = tl.where(taken, (g - (tl.sum(g * sel, axis=1) / total)[:, None]) / total[:, None], 0.0)
    else:
        ds = g
    # aux = E * sum_e f_e P_e: dP_te = grad_aux * E * f_e / T, f_e = picked_e / T
    t_f = T * 1.0  # (not T.to: Triton passes a size of 1 as a constexpr)
    f = tl.load(picked_ptr + e, mask=e_ok, other=0).to(tl.float32) / t_f
    dp = (tl.load(ga_ptr) * (E * 1.0) / t_f * f)[None, :]
    if SIGMOID:
        ssum = tl.sum(s, axis=1)[:, None]
        ds += (dp - tl.sum(dp * s, axis=1)[:, None] / ssum) / ssum
        dl = ds * s * (1.0 - s)
    else:
        d = ds + dp
        dl = s * (d - tl.sum(s * d, axis=1)[:, None])
    dl += (tl.load(gz_ptr) * 2.0 / t_f * lse)[:, None] * q
    out = rows[:, None].to(tl.int64) * E + e[None, :]
    tl.store(dl_ptr + out, dl.to(dl_ptr.dtype.element_ty), mask=row_ok[:, None] & e_ok[None, :])


def _blocks(e: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_E, num_warps): about TILE_ELEMENTS a tile, at most 64 rows (the capacity
    kernel's BLOCK_T^2 rank comparison)."""
    block_e = triton.next_power_of_2(max(e, 1))
    block_t = max(1, min(64, TILE_ELEMENTS // block_e))
    return block_t, block_e, max(1, min(8, block_t * block_e // 256))  # 8 elements of a tile a thread


def _route(logits, top_k, sigmoid, normalize, capacity):
    """(ids, weights, picked per expert before capacity (E,) int32, prob partials, z partials)."""
    t, e = logits.shape
    block_t, block_e, warps = _blocks(e)
    n_blocks = triton.cdiv(t, block_t)
    dev = logits.device
    ids = torch.empty(t, top_k, dtype=torch.int32, device=dev)
    w = torch.empty(t, top_k, dtype=torch.float32, device=dev)
    slot_counts = torch.empty(top_k * n_blocks, e, dtype=torch.int32, device=dev)
    prob_part = torch.empty(n_blocks, e, dtype=torch.float32, device=dev)
    z_part = torch.empty(n_blocks, dtype=torch.float32, device=dev)
    _tune.launch(
        _route_kernel, (n_blocks,), logits, ids, w, slot_counts, prob_part, z_part,
        t, e, logits.stride(0), logits.stride(1), n_blocks,
        K=top_k, SIGMOID=bool(sigmoid), NORMALIZE=bool(normalize), BLOCK_T=block_t, BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k), num_warps=warps,
    )
    if capacity >= 0:
        before = (slot_counts.cumsum(0, dtype=torch.int32) - slot_counts).contiguous()  # slot-major order
        _tune.launch(_capacity_kernel, (n_blocks,), ids, w, before, t, e, n_blocks, capacity,
                     K=top_k, BLOCK_T=block_t, num_warps=warps)
    picked = slot_counts.sum(0, dtype=torch.int32)
    return ids, w, picked, prob_part, z_part


def forward(logits, top_k, sigmoid=False, normalize=True, capacity=-1):
    """(expert_ids, weights, counts, aux_loss, z_loss), the schema of moe_router_fwd."""
    t, e = logits.shape
    dev = logits.device
    if t == 0:
        zero = torch.zeros((), dtype=torch.float32, device=dev)
        return (torch.empty(0, top_k, dtype=torch.int32, device=dev),
                torch.empty(0, top_k, dtype=torch.float32, device=dev),
                torch.zeros(e, dtype=torch.int32, device=dev), zero, zero.clone())
    ids, w, picked, prob_part, z_part = _route(logits, top_k, sigmoid, normalize, capacity)
    counts = picked.clamp(max=capacity) if capacity >= 0 else picked  # kept = min(picked, capacity)
    aux = e * (picked.to(torch.float32) / t * (prob_part.sum(0) / t)).sum()
    return ids, w, counts, aux, z_part.sum() / t


def backward(grad_weights, grad_aux, grad_z, logits, top_k, sigmoid, normalize, capacity):
    """grad_logits (T, E) in logits' dtype, the schema of moe_router_bwd."""
    t, e = logits.shape
    dl = torch.empty(t, e, dtype=logits.dtype, device=logits.device)
    if t == 0:
        return dl
    ids, _, picked, _, _ = _route(logits, top_k, sigmoid, normalize, capacity)
    block_t, block_e, warps = _blocks(e)
    _tune.launch(
        _route_grad_kernel, (triton.cdiv(t, block_t),), grad_weights.contiguous(), grad_aux.to(torch.float32),
        grad_z.to(torch.float32), logits, ids, picked, dl, t, e, logits.stride(0), logits.stride(1),
        K=top_k, SIGMOID=bool(sigmoid), NORMALIZE=bool(normalize), BLOCK_T=block_t, BLOCK_E=block_e,
        num_warps=warps,
    )
    return dl
