"""base_assignment: BASE layers' balanced token-to-expert assignment, solved by an auction.

    expert_ids, prices = fastlm.ops.base_assignment(scores, *, capacity=None, eps=None, backend=None)

scores (T, E): token-expert affinities (BASE: h_t . w_e). Each token gets exactly one expert and
expert e exactly capacity[e] tokens: T // E each by default, the first T % E experts one more when
E does not divide T. Among such assignments it maximises the total score (a linear assignment
problem), as BASE layers (Lewis et al., 2021) do with their auction.

Algorithm: Bertsekas' forward auction with similar objects (expert e = capacity[e] identical
slots), Jacobi style: every unassigned token bids at once for its best expert at its cheapest slot,
raising that slot's price by (best value - second best value + eps); each expert keeps its
highest bids and evicts the rest, who bid again next round. Prices only rise, so it terminates.

Exactness: the result is exactly balanced, and eps-optimal: every token's assigned value
score - price is within eps of its best alternative (eps-complementary slackness), so the total
score is within T * eps of the optimum; with eps below (minimum nonzero score gap) / T it is the
optimum. Default eps = 1e-4 * (max - min score) / E. `prices` (E,) are the final cheapest-slot
prices. Not differentiable: BASE gates the chosen expert's output with sigmoid(score), which the
caller differentiates.

Speed: the auction starts from near-equilibrium prices found by a few sweeps (DUAL_SWEEPS = 5) of
coordinate descent on the dual (E prices, each set so its expert is wanted by exactly its
capacity), then eps-scaling finishes the job: warm-started, each eps phase takes about 2 rounds at
4096 tokens x 8 experts (2 sweeps are not enough: 27,000 rounds; none: 16,000). With many
experts 5 sweeps leave the prices further off: 16384 tokens x 64 experts take 30,000-100,000
rounds (cpu kernel: ~14 s on 2 loaded cores, most of it the warm start's T x E x 5E loads).

Backends (the same algorithm, float64 throughout, the same tie rules, so cpu and cuda return the
same ids and prices for the same scores):
- cpu (csrc/cpu/moe_base_assignment.cpp): the warm start's margins and the bids in parallel over
  tokens (OpenMP), exact selection by nth_element, bids grouped and sorted per expert.
- cuda (csrc/cuda/moe_base_assignment.cu): the whole solve in one launch of one CTA that loops its
  rounds on the device; the default eps (from max - min of the scores) is found there too, and no
  value is read on the host. For GPU tensors finiteness is not checked on the host: non-finite
  scores give the invalid result, every id -1 and every price NaN. The same invalid result marks a
  solve that exceeds the kernels' round cap (1,000,000 rounds as the reference's; the schema's max_rounds), so a
  pathological input can never hang the device. Up to 1024 experts.
- triton (fastlm/triton/base_assignment.py): the same one-program form as cuda (device rounds, the
  default eps found there, the same invalid result), float64 in registers and global scratch, ranks
  by token order from running per-expert counts (tl.cumsum), rank r bidding for the expert's slot
  (cheapest + r) mod c_e. No warm start yet (prices start at 0; eps-scaling does the work: ~16,000
  rounds at 4096 x 8), so its ids and prices are eps-optimal but not step for step the cpu/cuda ones.
- reference (vectorised PyTorch rounds with host syncs, any device, any float dtype): the oracle.
  It raises on non-finite scores and on its own round cap instead.
All are registered behind one opaque custom op, so torch.compile(fullgraph=True) takes them.
"""
from __future__ import annotations

import torch

from fastlm import _ext
from fastlm import backend as _backend

OP = "base_assignment"
CPU_DTYPES = (torch.float32, torch.bfloat16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DUAL_SWEEPS = 5  # coordinate-descent sweeps of the warm start (kBaseDualSweeps in csrc/include/fastlm/moe.h)


def default_capacity(tokens: int, experts: int) -> list[int]:
    base, extra = divmod(tokens, experts)
    return [base + (e < extra) for e in range(experts)]


def _default_eps(scores: torch.Tensor) -> float:
    spread = float(scores.max() - scores.min()) if scores.numel() else 0.0
    return max(spread, 1e-12) * 1e-4 * (1.0 / max(1, scores.shape[1]))


def base_assignment_ref(scores: torch.Tensor, capacity: list[int], eps: float, max_rounds: int = 1_000_000):
    """(expert_ids (T,) int32, prices (E,)) by the Jacobi forward auction with eps-scaling (rounds
    at eps = spread / 64, then / 8 each time down to eps, each from the last one's prices: a coarse
    auction settles the prices cheaply, the fine ones only adjust them); see the module docstring."""
    a = scores.detach().to(torch.float64)
    t, e = a.shape
    dev = a.device
    slots = max(capacity, default=0)
    # price of each expert's slots; a slot an expert doesn't have costs +inf, a free one starts at 0
    price = torch.zeros(e, slots, dtype=torch.float64, device=dev)
    price[torch.arange(slots, device=dev).view(1, -1) >= torch.tensor(capacity, device=dev).view(-1, 1)] = torch.inf
    valid = torch.isfinite(price)
    price[valid] = _dual_prices(a, capacity).view(-1, 1).expand_as(price)[valid]
    step = max(float(a.max() - a.min()), eps) / 64 if t else eps
    rounds = 0
    while True:
        step = max(step, eps)
        owner, rounds = _auction(a, price, slots, step, rounds, max_rounds)
        if step <= eps:
            break
        step /= 8
    cheapest = price.min(1).values if slots else price.new_full((e,), torch.inf)  # T = 0: no slots at all
    return owner.to(torch.int32), torch.where(torch.isfinite(cheapest), cheapest, 0.0).to(scores.dtype)


def _dual_prices(a, capacity, sweeps: int = DUAL_SWEEPS):
    """Near-equilibrium expert prices by coordinate descent on the dual, sum_t max_e (a_te - p_e)
    + sum_e c_e p_e: each expert's price in turn is set so that exactly c_e tokens prefer it at the
    others' prices (between its c_e-th and c_e+1-th largest margin). E prices for T tokens: cheap
    sweeps that leave the auction only the last adjustments."""
    t, e = a.shape
    p = torch.zeros(e, dtype=a.dtype, device=a.device)
    if e < 2 or t == 0:
        return p
    for _ in range(sweeps):
        for ex in range(e):
            others = (a - p).index_fill(1, torch.tensor([ex], device=a.device), -torch.inf).max(1).values
            margin = (a[:, ex] - others).sort(descending=True).values  # what each token would pay for ex
            c = capacity[ex]
            hi = margin[c - 1] if c > 0 else margin[0] + 1
            lo = margin[c] if c < t else hi - 1
            p[ex] = (hi + lo) / 2
    return p


def _auction(a, price, slots, eps, rounds, max_rounds):
    """One auction at this eps from the given prices (updated in place); returns (owner, rounds)."""
    t, e = a.shape
    dev = a.device
    holder = torch.full((e, slots), -1, dtype=torch.long, device=dev)  # token in each slot
    owner = torch.full((t,), -1, dtype=torch.long, device=dev)
    while rounds < max_rounds:
        rounds += 1
        free = (owner < 0).nonzero().view(-1)
        if free.numel() == 0:
            return owner, rounds
        slot_prices, slot_ids = price.sort(1)  # each expert's slots, cheapest first
        cheapest = slot_prices[:, 0]  # (E,)
        second = slot_prices[:, 1] if slots > 1 else torch.full_like(cheapest, torch.inf)
        value = a[free] - cheapest  # (F, E)
        best, choice = value.max(1)
        others = value.scatter(1, choice.view(-1, 1), -torch.inf).max(1).values
        same = a[free, choice] - second[choice]  # the same expert's next-cheapest slot
        runner_up = torch.maximum(others, same)
        runner_up = torch.where(torch.isfinite(runner_up), runner_up, best - 1.0)  # a single option: bid + 1
        bid = a[free, choice] - runner_up + eps  # the price that leaves the bidder indifferent, plus eps
        # expert e's r-th highest bid takes its r-th cheapest slot while it beats that slot's price
        # (each winner pays its own bid; ties to the lower token index)
        order = torch.argsort(bid, descending=True, stable=True)
        by_expert = order[torch.argsort(choice[order], stable=True)]  # grouped by expert, bids descending
        ce = choice[by_expert]
        group_start = torch.searchsorted(ce, ce, right=False)
        rank = torch.arange(ce.numel(), device=dev) - group_start
        r = rank.clamp(max=slots - 1)
        ok = (rank < slots) & (bid[by_expert] > slot_prices[ce, r])
        winners, ex = by_expert[ok], ce[ok]
        slot = slot_ids[ex, r[ok]]
        evicted = holder[ex, slot]
        owner[evicted[evicted >= 0]] = -1
        holder[ex, slot] = free[winners]
        owner[free[winners]] = ex
        price[ex, slot] = bid[winners]
    raise RuntimeError(f"base_assignment: the auction did not finish in {max_rounds} rounds (eps={eps})")


def _triton(scores, capacity, eps):
    from fastlm.triton import base_assignment as kernel

    return kernel.solve(scores, capacity, eps)


def _reference(scores, capacity, eps):
    """eps 0: the default. The finiteness check lives here, where the scores are concrete."""
    if not torch.isfinite(scores).all():
        raise ValueError("base_assignment: scores must be finite (an auction cannot price NaN or inf)")
    return base_assignment_ref(scores, capacity, eps or _default_eps(scores))


_IMPLS = _backend.implementations(reference=_reference, triton=_triton, ext="moe_base_assignment")


# one opaque op for torch.compile: the auction's data-dependent rounds stay out of the graph
@torch.library.custom_op("fastlm::base_assignment", mutates_args=())
def _assignment_op(scores: torch.Tensor, capacity: list[int], eps: float,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """eps 0: the default (found on the device by the kernels)."""
    if scores.device.type == "cpu" and not torch.isfinite(scores).all():  # a host check only where it costs no sync
        raise ValueError("base_assignment: scores must be finite (an auction cannot price NaN or inf)")
    return _IMPLS[backend](scores, capacity, eps)


@_assignment_op.register_fake
def _(scores, capacity, eps, backend):
    return scores.new_empty(scores.shape[0], dtype=torch.int32), scores.new_empty(scores.shape[1])


_backend.register_kernels(OP, lambda device: (torch.empty(16, 4, device=device),), "moe_base_assignment",
                          cpu=CPU_DTYPES, triton=GPU_DTYPES, cuda=GPU_DTYPES)


def base_assignment(scores: torch.Tensor, *, capacity: list[int] | None = None, eps: float | None = None,
                    backend: str | None = None):
    """Balanced, eps-optimal token-to-expert assignment; see the module docstring."""
    fn = "base_assignment"
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or not scores.dtype.is_floating_point:
        raise ValueError(f"{fn}: scores must be a floating-point (tokens, experts) tensor, got "
                         f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    t, e = scores.shape
    if e == 0:
        raise ValueError(f"{fn}: scores has no experts (shape {tuple(scores.shape)})")
    capacity = default_capacity(t, e) if capacity is None else list(capacity)
    if len(capacity) != e or any(not isinstance(c, int) or c < 0 for c in capacity) or sum(capacity) != t:
        raise ValueError(f"{fn}: capacity must be {e} ints >= 0 summing to the {t} tokens, got {capacity}")
    if eps is not None and not float(eps) > 0:
        raise ValueError(f"{fn}: eps must be > 0, got {float(eps)}")
    chosen = _backend.select(OP, scores.device, scores, backend=backend)
    return _assignment_op(scores, capacity, 0.0 if eps is None else float(eps), chosen)


if _ext.HAS_EXTENSION and hasattr(torch.ops.fastlm, "moe_base_assignment"):

    @torch.library.register_fake("fastlm::moe_base_assignment")
    def _(scores, capacity, eps=0.0, max_rounds=1_000_000):
        return scores.new_empty(scores.shape[0], dtype=torch.int32), scores.new_empty(scores.shape[1])
