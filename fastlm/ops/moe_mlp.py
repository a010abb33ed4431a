"""moe_mlp: a sparse mixture-of-experts MLP, router to weighted sum, as one differentiable call.

    fastlm.ops.moe_mlp(x, router_weight, w_gate_up, w_down, top_k, *, b_gate_up=None,
        b_down=None, activation="swiglu", score="softmax", normalize=True, capacity=None,
        jitter=0.0, backend=None) -> MoEOutput(out, router_logits, routing)

x (..., H); router_weight (E, H); w_gate_up (E, 2I, H) for gated activations ("swiglu",
"geglu": Mixtral's and Qwen-MoE's experts) or (E, I, H) for plain ones ("gelu", "relu", ...);
w_down (E, H, I). The pipeline, each stage a fused fastlm op with its own backward:

    logits  = x @ router_weight^T                             (T, E)
    routing = moe_router(logits, top_k, ...)                  ids (T, k), weights (T, k), losses
    xs, rows, offsets = moe_permute(x, routing.expert_ids)    (T*k, H), expert-contiguous
    h   = grouped_linear(xs, w_gate_up, offsets, act)         (T*k, I), one call for all experts
    y   = grouped_linear(h, w_down, offsets)                  (T*k, H)
    out = moe_unpermute(y, rows, routing.weights)             (T, H), weighted in the gather

No Python loop over experts and no per-expert index_select / index_add (what HF's eager block
does), so the work is two grouped GEMMs plus three memory passes over (T*k, H). Tokens dropped
by capacity contribute 0 (the caller's residual carries them); routing.counts says how many
were kept. routing.aux_loss / z_loss are differentiable; scale them by your coefficients.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastlm.ops.grouped_linear import GATED, grouped_linear
from fastlm.ops.moe_permute import moe_permute, moe_unpermute
from fastlm.ops.moe_router import RouterOutput, moe_router


class MoEOutput(NamedTuple):
    out: torch.Tensor  # x's shape
    router_logits: torch.Tensor  # (T, E)
    routing: RouterOutput


def moe_experts(x, expert_ids, weights, w_gate_up, w_down, *, b_gate_up=None, b_down=None, activation="swiglu",
                backend=None) -> torch.Tensor:
    """The experts half of moe_mlp for routing decided elsewhere (HF's experts modules take
    top_k_index / top_k_weights): x (T, H), expert_ids (T, k) int32 (-1: dropped), weights (T, k)
    fp32 -> (T, H)."""
    num_experts = w_gate_up.shape[0]
    x_sorted, rows, offsets = moe_permute(x, expert_ids, num_experts, backend=backend)
    h = grouped_linear(x_sorted, w_gate_up, offsets, bias=b_gate_up, activation=activation, backend=backend)
    y = grouped_linear(h, w_down, offsets, bias=b_down, backend=backend)
    return moe_unpermute(y, rows, weights, backend=backend)


def _check(x, router_weight, w_gate_up, w_down, activation):
    fn = "moe_mlp"
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{fn}: x must be a (..., hidden) tensor, got {type(x).__name__}")
    h = x.shape[-1]
    e = router_weight.shape[0] if isinstance(router_weight, torch.Tensor) and router_weight.dim() == 2 else None
    if e is None or router_weight.shape[1] != h:
        raise ValueError(f"{fn}: router_weight must be (experts, {h}), got "
                         f"{tuple(router_weight.shape) if isinstance(router_weight, torch.Tensor) else router_weight}")
    inner = w_down.shape[2] if isinstance(w_down, torch.Tensor) and w_down.dim() == 3 else None
    want_up = (e, 2 * inner if activation in GATED else inner, h) if inner is not None else None
    if want_up is None or tuple(w_down.shape) != (e, h, inner) or tuple(w_gate_up.shape) != want_up:
        raise ValueError(f"{fn}: with {e} experts and hidden {h}, w_down must be (E, H, I) and w_gate_up "
                         f"(E, {'2I' if activation in GATED else 'I'}, H), got w_gate_up "
                         f"{tuple(getattr(w_gate_up, 'shape', ()))} and w_down {tuple(getattr(w_down, 'shape', ()))}")


def moe_mlp(x: torch.Tensor, router_weight: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
            top_k: int, *, b_gate_up: torch.Tensor | None = None, b_down: torch.Tensor | None = None,
            activation: str = "swiglu", score: str = "softmax", normalize: bool = True,
            capacity: int | None = None, jitter: float = 0.0, backend: str | None = None) -> MoEOutput:
    """Router, permute, grouped expert MLP, weighted unpermute; see the module docstring."""
    _check(x, router_weight, w_gate_up, w_down, activation)
    flat = x.reshape(-1, x.shape[-1])  # (..., H) -> (T, H)
    logits = F.linear(flat, router_weight)
    routing = moe_router(logits, top_k, score=score, normalize=normalize, capacity=capacity, jitter=jitter,
                         backend=backend)
    out = moe_experts(flat, routing.expert_ids, routing.weights, w_gate_up, w_down, b_gate_up=b_gate_up,
                      b_down=b_down, activation=activation, backend=backend)
    return MoEOutput(out.view(x.shape), logits, routing)
