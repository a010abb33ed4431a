"""Triton kernel for base_assignment: BASE layers' balanced assignment by an auction, in ONE program.

The whole solve of fastlm/ops/base_assignment.py runs in one launch of one program (grid (1,))
that loops its eps phases and rounds on the device, in float64, with no host sync: the default
eps (from max - min of the scores) is found there too, and non-finite scores or a solve past the
round cap give the invalid result (every id -1, every price NaN), as the cuda kernel does.

Why one program: a round's bids need the last round's prices, so the solve is a chain of
thousands of small dependent passes; one program keeps each step a loop iteration (a block
barrier) where several would need a launch or a grid-wide sync per round. Triton has no shared
memory to index, so an expert's slots live in global scratch (L2-resident: T doubles + T ints)
and per-expert state in (BLOCK_E,) registers.

A round, two passes over T in tiles of BLOCK_T tokens (slots) x BLOCK_E experts:
1. Slot pass: each expert's cheapest slot price P_e, the lowest slot holding it, and its second
   cheapest price S_e, by one running (min, argmin, second min) merge per tile.
2. Bid pass: every free token bids for its best expert e (value a - P_e), bid =
   a_e - max(best other value, a_e - S_e) + eps. Ranks by token order (the running per-expert
   count of earlier bidders, a tl.cumsum down the tile): rank r targets e's slot
   (cheapest + r) mod c_e and wins when r < c_e and its bid beats that slot's price; a winner
   evicts the holder and the slot's price becomes its bid. Ranks are distinct, so targets are.
   Tokens evicted by an earlier tile bid in the same round (Gauss-Seidel in token order:
   deterministic, and a bid made from round-start prices stays valid, as prices only rise).
Certificate: a winner's slot price is its bid <= a_e - (best other value) + eps at prices that
only rise, and P_e is at most that slot's price, so every holder of e ends with
a_e - P_e >= max_e' (a_e' - P_e') - eps in float64 (eps-complementary slackness). Progress: rank 0
of every bid-on expert targets its cheapest slot with a bid >= P_e + eps, so it always wins.

Not the reference's warm start: the prices start at 0 (the dual coordinate descent needs an exact
c_e-th largest margin per expert: a bisection with counting passes, left as the next step), so
eps-scaling does all the work. What that costs, measured on the reference's auction (its docstring):
4096 tokens x 8 experts take ~16,000 rounds from zero prices against ~10 warm-started; this
kernel's own round counts at that size are not measured (the interpreter is too slow for it).
The ids and prices are eps-optimal but not the cpu/cuda kernels'. A user's eps reaches the kernel
as a float32 scalar (Triton's float arguments), rounded by at most 6e-8 of itself.
Cost per round (estimate, H100-class SM, 4 warps): the slot pass reads T doubles and does ~4
reductions of a BLOCK_T x BLOCK_E tile per tile, the bid pass reads T x E scores (L2) and ~10 tile
reductions: at T = 4096, E = 8 (BLOCK_T = 64, 64 tiles a pass, ~200 clk a tile) ~26 k clk ~ 14 us
a round, ~0.2 s for 16,000 rounds. A latency-bound fallback, not per-step material at that size.
Launch: tiles of <= 512 elements (<= 64 tokens), 4 warps. ptxas (sm_80, sm_90; fp32, fp16, bf16;
E = 1..1024): 40-214 registers, no spills except 8 B at bf16, E = 8 on sm_90 (72 registers: a
value parked across the nested round loops, not pressure; every other warps/tile choice tried
spilled 8-36 B somewhere).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.triton import _tune

TILE_ELEMENTS = 512  # float64 tiles: the scores, values and one-hot masks of a tile stay live
MAX_TILE_TOKENS = 64
NUM_WARPS = 4
MAX_EXPERTS = 1024  # as the cuda kernel's (kBaseMaxExpertsCuda): one (BLOCK_E,) register vector per expert state


@triton.jit
def _auction_kernel(
    scores_ptr, base_ptr, ids_ptr, prices_ptr, slot_price_ptr, holder_ptr,
    T, E, s0, s1, eps_arg, max_rounds,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    inf = float("inf")
    e = tl.arange(0, BLOCK_E)
    e_ok = e < E
    lo = tl.load(base_ptr + e, mask=e_ok, other=0)  # expert e owns slots [lo, hi)
    hi = tl.load(base_ptr + e + 1, mask=e_ok, other=0)
    cap = hi - lo
    has_slots = e_ok & (cap > 0)
    r = tl.arange(0, BLOCK_T)

    # spread of the scores (the default eps) and whether any is not finite; slot prices start at 0
    lowest = tl.full((BLOCK_E,), inf, tl.float64)
    highest = tl.full((BLOCK_E,), -inf, tl.float64)
    bad = tl.zeros((BLOCK_E,), tl.int32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + r
        ok = (t < T)[:, None] & e_ok[None, :]
        a = tl.load(scores_ptr + t[:, None].to(tl.int64) * s0 + e[None, :].to(tl.int64) * s1, mask=ok,
                    other=0.0).to(tl.float64)
        bad += tl.sum((ok & ((a != a) | (tl.abs(a) == inf))).to(tl.int32), axis=0)
        lowest = tl.minimum(lowest, tl.min(tl.where(ok, a, inf), axis=0))
        highest = tl.maximum(highest, tl.max(tl.where(ok, a, -inf), axis=0))
        tl.store(slot_price_ptr + t, tl.zeros((BLOCK_T,), tl.float64), mask=t < T)
    spread = tl.max(highest, axis=0) - tl.min(lowest, axis=0)
    eps = tl.maximum(spread, 1e-12) * 1e-4 * (1.0 / E)
    if eps_arg > 0:
        eps = eps_arg + 0.0 * spread
    step = tl.maximum(tl.maximum(spread, eps) / 64, eps)
    n_free = T + tl.sum(bad, axis=0)  # > 0 marks a failed solve; stays T + bad when nothing runs
    go = tl.sum(bad, axis=0) == 0
    rounds = 0
    while go:  # eps phases, coarse to fine, each from the last one's prices
        for t0 in range(0, T, BLOCK_T):
            t = t0 + r
            tl.store(holder_ptr + t, tl.full((BLOCK_T,), -1, tl.int32), mask=t < T)
            tl.store(ids_ptr + t, tl.full((BLOCK_T,), -1, tl.int32), mask=t < T)
        tl.debug_barrier()
        n_free = T + 0 * n_free
        while (n_free > 0) & (rounds < max_rounds):
            rounds += 1
            # 1. per expert: cheapest price, its lowest slot, second cheapest price
            cheapest = tl.full((BLOCK_E,), inf, tl.float64)
            second = tl.full((BLOCK_E,), inf, tl.float64)
            cheapest_slot = tl.zeros((BLOCK_E,), tl.int32)
            for j0 in range(0, T, BLOCK_T):
                j = j0 + r
                inside = (j[:, None] >= lo[None, :]) & (j[:, None] < hi[None, :])
                p = tl.where(inside, tl.load(slot_price_ptr + j, mask=j < T, other=inf)[:, None], inf)
                tile_min = tl.min(p, axis=0)
                tile_arg = tl.min(tl.where(inside & (p == tile_min[None, :]), j[:, None], T), axis=0)
                tile_second = tl.min(tl.where(j[:, None] == tile_arg[None, :], inf, p), axis=0)
                lower = tile_min < cheapest  # ties keep the earlier (lower) slot
                second = tl.where(lower, tl.minimum(cheapest, tile_second), tl.minimum(second, tile_min))
                cheapest_slot = tl.where(lower, tile_arg, cheapest_slot)
                cheapest = tl.where(lower, tile_min, cheapest)
            # 2. free tokens bid; ranks by token order from the running per-expert count of bidders
            bidders = tl.zeros((BLOCK_E,), tl.int32)
            fills = 0
            for t0 in range(0, T, BLOCK_T):
                t = t0 + r
                t_ok = t < T
                free = t_ok & (tl.load(ids_ptr + t, mask=t_ok, other=0) < 0)
                a = tl.load(scores_ptr + t[:, None].to(tl.int64) * s0 + e[None, :].to(tl.int64) * s1,
                            mask=t_ok[:, None] & e_ok[None, :], other=0.0).to(tl.float64)
                value = tl.where(has_slots[None, :], a - cheapest[None, :], -inf)
                best = tl.max(value, axis=1)
                choice = tl.min(tl.where(value == best[:, None], e[None, :], BLOCK_E), axis=1)
                pick = e[None, :] == choice[:, None]
                others = tl.max(tl.where(pick, -inf, value), axis=1)
                a_c = tl.sum(tl.where(pick, a, 0.0), axis=1)
                same = a_c - tl.sum(tl.where(pick, second[None, :], 0.0), axis=1)  # e's next-cheapest slot
                runner_up = tl.maximum(others, same)
                runner_up = tl.where(runner_up > -inf, runner_up, best - 1.0)  # a single option: bid + 1
                bid = a_c - runner_up + step
                hot = pick & free[:, None]
                count = hot.to(tl.int32)
                rank = tl.sum(tl.where(hot, tl.cumsum(count, axis=0) - count + bidders[None, :], 0), axis=1)
                bidders += tl.sum(count, axis=0)
                lo_c = tl.sum(tl.where(pick, lo[None, :], 0), axis=1)
                cap_c = tl.sum(tl.where(pick, cap[None, :], 0), axis=1)
                slot0 = tl.sum(tl.where(pick, cheapest_slot[None, :], 0), axis=1)
                target = lo_c + (slot0 - lo_c + rank) % tl.maximum(cap_c, 1)
                can = free & (rank < cap_c)
                win = can & (bid > tl.load(slot_price_ptr + target, mask=can, other=inf))
                evicted = tl.load(holder_ptr + target, mask=win, other=-1)
                tl.store(ids_ptr + evicted, tl.full((BLOCK_T,), -1, tl.int32), mask=win & (evicted >= 0))
                tl.store(holder_ptr + target, t, mask=win)
                tl.store(ids_ptr + t, choice, mask=win)
                tl.store(slot_price_ptr + target, bid, mask=win)
                fills += tl.sum((win & (evicted < 0)).to(tl.int32), axis=0)
                tl.debug_barrier()  # the next tile reads owners and slots this one wrote
            n_free -= fills
        go = (n_free == 0) & (step > eps)
        step = tl.maximum(step / 8, eps)

    # final cheapest prices (the last round's slot pass is stale by that round's bids)
    cheapest = tl.full((BLOCK_E,), inf, tl.float64)
    for j0 in range(0, T, BLOCK_T):
        j = j0 + r
        inside = (j[:, None] >= lo[None, :]) & (j[:, None] < hi[None, :])
        p = tl.where(inside, tl.load(slot_price_ptr + j, mask=j < T, other=inf)[:, None], inf)
        cheapest = tl.minimum(cheapest, tl.min(p, axis=0))
    solved = n_free == 0
    prices = tl.where(cheapest < inf, cheapest, 0.0)
    prices = tl.where(solved, prices, float("nan"))
    tl.store(prices_ptr + e, prices.to(prices_ptr.dtype.element_ty), mask=e_ok)
    if not solved:
        for t0 in range(0, T, BLOCK_T):
            t = t0 + r
            tl.store(ids_ptr + t, tl.full((BLOCK_T,), -1, tl.int32), mask=t < T)


def solve(scores: torch.Tensor, capacity: list[int], eps: float, max_rounds: int = 1_000_000):
    """(expert_ids (T,) int32, prices (E,) in scores' dtype); eps 0: the default. No host sync:
    bad scores or the round cap give ids -1 and NaN prices instead of an error."""
    t, e = scores.shape
    if e > MAX_EXPERTS:
        raise ValueError(f"base_assignment: the triton kernel takes up to {MAX_EXPERTS} experts, got scores of "
                         f"shape {tuple(scores.shape)}")
    dev = scores.device
    ids = torch.empty(t, dtype=torch.int32, device=dev)
    prices = torch.empty(e, dtype=scores.dtype, device=dev)
    if t == 0:  # no tokens, no slots: every price 0 (the reference's)
        return ids, prices.zero_()
    base = torch.tensor([0] + capacity, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(dev)
    slot_price = torch.empty(t, dtype=torch.float64, device=dev)
    holder = torch.empty(t, dtype=torch.int32, device=dev)
    block_e = triton.next_power_of_2(e)
    block_t = max(1, min(MAX_TILE_TOKENS, TILE_ELEMENTS // block_e))
    _tune.launch(_auction_kernel, (1,), scores, base, ids, prices, slot_price, holder,
                 t, e, scores.stride(0), scores.stride(1), float(eps), int(max_rounds),
                 BLOCK_T=block_t, BLOCK_E=block_e, num_warps=NUM_WARPS)
    return ids, prices
