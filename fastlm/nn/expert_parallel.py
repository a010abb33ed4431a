"""Expert parallelism: P processes each hold E/P experts and trade tokens with two all-to-alls.

    out = expert_parallel_experts(x, expert_ids, weights, w_gate_up, w_down, num_experts, group)

Every rank routes its own tokens over all E experts (the router is replicated, like any data-
parallel weight); rank r owns experts r*E/P .. (r+1)*E/P - 1, whose weights w_gate_up
(E/P, 2I, H) and w_down (E/P, H, I) it alone holds. One MoE layer then runs:

    moe_permute          local rows grouped by global expert: destination ranks are contiguous
    all_to_all(counts)   how many rows each rank will send this one, per local expert (E ints)
    all_to_all(rows)     the payload, variable splits; arrives [source rank][local expert]
    regroup              to [local expert][source rank], so each local expert's rows are one block
    grouped_linear x 2   this rank's experts over every rank's tokens
    regroup back, all_to_all(rows) back, moe_unpermute with the routing weights

The backward is the same exchange reversed: the all-to-all's gradient is the all-to-all with the
splits swapped, so expert weights get the gradients of every rank's tokens and x the gradient of
every expert it visited. Tokens dropped by capacity are never sent.

At scale (README, "Mixture of experts"): each layer moves 2 * T * k * H elements per rank
forward (and again backward), T tokens per rank, k experts per token; overlap comes from
splitting the batch and running one chunk's exchange behind the other's GEMMs, and a capacity
factor bounds the busiest rank's receive buffer at the cost of dropped tokens.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from fastlm.ops.grouped_linear import grouped_linear
from fastlm.ops.moe_permute import moe_permute, moe_unpermute


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_rows: int, send: list, recv: list, group):
        ctx.args = (x.shape[0], send, recv, group)
        out = x.new_empty(out_rows, *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        in_rows, send, recv, group = ctx.args
        out = grad.new_empty(in_rows, *grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), output_split_sizes=send, input_split_sizes=recv, group=group)
        return out, None, None, None, None


def _expert_major(counts: torch.Tensor) -> torch.Tensor:
    """Row order that turns blocks laid out [source][expert] (counts (P, L)) into [expert][source]."""
    flat = counts.reshape(-1)
    starts = (flat.cumsum(0) - flat).view_as(counts).t().reshape(-1)  # each block's first row, expert-major
    lengths = counts.t().reshape(-1)
    total = int(lengths.sum())
    within = torch.arange(total, device=counts.device) - (lengths.cumsum(0) - lengths).repeat_interleave(lengths)
    return starts.repeat_interleave(lengths) + within


def expert_parallel_experts(x, expert_ids, weights, w_gate_up, w_down, num_experts: int, group=None, *,
                            b_gate_up=None, b_down=None, activation="swiglu", backend=None) -> torch.Tensor:
    """The experts half of an MoE layer with this rank's experts only; see the module docstring.
    x (T, H), expert_ids / weights (T, k) over all num_experts -> (T, H)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if num_experts % world:
        raise ValueError(f"expert_parallel_experts: num_experts={num_experts} is not divisible by the "
                         f"{world} processes of the group")
    local = num_experts // world
    if w_gate_up.shape[0] != local or w_down.shape[0] != local:
        raise ValueError(f"expert_parallel_experts: rank {rank} must hold {local} experts (experts "
                         f"{rank * local}..{rank * local + local - 1}), got w_gate_up {tuple(w_gate_up.shape)} and "
                         f"w_down {tuple(w_down.shape)}")
    x_sorted, rows, offsets = moe_permute(x, expert_ids, num_experts, backend=backend)
    counts = (offsets[1:] - offsets[:-1]).long()  # (E,) rows per global expert = per (rank, local expert)
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)  # (P * local,): [source rank][local expert]
    send = counts.view(world, local).sum(1).tolist()
    recv_counts = recv_counts.view(world, local)
    recv = recv_counts.sum(1).tolist()
    kept = sum(send)
    received = _AllToAll.apply(x_sorted[:kept], sum(recv), send, recv, group)  # (R, H)
    order = _expert_major(recv_counts)
    local_offsets = torch.cat([recv_counts.new_zeros(1), recv_counts.sum(0).cumsum(0)]).to(torch.int32)
    h = grouped_linear(received[order], w_gate_up, local_offsets, bias=b_gate_up, activation=activation,
                       backend=backend)
    y = grouped_linear(h, w_down, local_offsets, bias=b_down, backend=backend)
    back = torch.empty_like(y).index_copy(0, order, y)  # [expert][source] -> [source][expert]
    returned = _AllToAll.apply(back, kept, recv, send, group)  # (kept, H), in x_sorted's row order
    y_sorted = torch.cat([returned, returned.new_zeros(x_sorted.shape[0] - kept, returned.shape[1])])
    return moe_unpermute(y_sorted, rows, weights, backend=backend)
