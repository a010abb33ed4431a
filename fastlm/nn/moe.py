"""Sparse mixture-of-experts MLP (fastlm.nn.MoE): router, experts and an optional shared expert.

    moe = fastlm.nn.MoE(hidden_size, intermediate_size, num_experts, top_k=2)
    y = moe(x)                      # (..., H) -> (..., H); moe(x, residual=r) adds r
    loss = task_loss + moe.aux_loss  # aux_loss_coef * load balancing + z_loss_coef * router z-loss
    moe.expert_load, moe.drop_rate  # of the last forward

Parameters and state_dict keys are HF transformers 5.x's, so `load_state_dict` works both ways:
MixtralSparseMoeBlock's `gate.weight` (E, H), `experts.gate_up_proj` (E, 2I, H) (gate half
first; (E, I, H) for plain activations) and `experts.down_proj` (E, H, I); with
shared_expert_size, Qwen2MoeSparseMoeBlock's `shared_expert.{gate,up,down}_proj.weight` and
`shared_expert_gate.weight` (1, H): the shared expert runs on every token and its output, scaled
by sigmoid(x @ shared_expert_gate^T), is added. HF Qwen2-MoE's `config.norm_topk_prob` is
`normalize` here.

The routed experts are fastlm.ops.moe_mlp's pipeline (moe_router, then moe_experts: permute, two
grouped GEMMs, weighted unpermute), never a Python loop over experts; with a process_group the
experts are spread over the group's processes (expert parallelism, fastlm.nn.expert_parallel).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastlm import ops
from fastlm.nn._base import ACTIVATIONS, FastModule, check_backend
from fastlm.nn.expert_parallel import expert_parallel_experts
from fastlm.nn.modules import Linear
from fastlm.ops.grouped_linear import GATED
from fastlm.ops.moe_router import RouterOutput, capacity_for

EXPERT_ACTIVATIONS = tuple(GATED) + ACTIVATIONS  # swiglu, geglu (gate_up halves), then the plain ones
ROUTERS = ("topk", "switch", "base")
SCORES = ("softmax", "sigmoid")


class Experts(nn.Module):
    """The experts' stacked weights (HF's MixtralExperts layout); MoE calls the op on them."""

    def __init__(self, num_experts, hidden_size, intermediate_size, gated, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        up = 2 * intermediate_size if gated else intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, up, hidden_size, **kw))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **kw))
        self.reset_parameters()

    def reset_parameters(self):
        for w in (self.gate_up_proj, self.down_proj):  # each expert as nn.Linear initialises its weight
            bound = 1 / math.sqrt(w.shape[2])
            nn.init.uniform_(w, -bound, bound)


class SharedExpert(nn.Module):
    """Qwen2-MoE's shared expert (Qwen2MoeMLP): gate_proj, up_proj, down_proj without biases; for a
    plain activation only up_proj and down_proj (act(x up^T) down^T), as the routed experts."""

    def __init__(self, hidden_size, intermediate_size, activation, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.activation = activation
        if activation in GATED:
            self.gate_proj = Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = Linear(intermediate_size, hidden_size, **kw)

    def forward(self, x):
        if self.activation in GATED:
            return ops.gated_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight,
                                 activation=GATED[self.activation])
        return ops.mlp(x, self.up_proj.weight, None, self.down_proj.weight, None, activation=self.activation)


def _check(hidden_size, intermediate_size, num_experts, top_k, activation, router, score, normalize,
           capacity_factor, aux_loss_coef, z_loss_coef, jitter, shared_expert_size, process_group):
    def positive_int(name, v):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"MoE: {name} must be an int >= 1, got {v!r}")

    for name, v in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                    ("num_experts", num_experts)):
        positive_int(name, v)
    if process_group is not None:
        world = process_group.size() if hasattr(process_group, "size") else None
        if world is None or num_experts % world:
            raise ValueError(f"MoE: process_group must be a torch.distributed ProcessGroup whose size divides "
                             f"num_experts={num_experts}, got {process_group!r}"
                             f"{f' of size {world}' if world is not None else ''}")
    if router == "base":  # BASE layers: one expert per token, balanced exactly; no aux loss to tune
        if top_k != 1 or capacity_factor is not None or normalize:
            raise ValueError(f"MoE: router='base' assigns each token one expert, exactly balanced: it takes top_k=1, "
                             f"capacity_factor=None and normalize=None, got top_k={top_k!r}, "
                             f"capacity_factor={capacity_factor!r}, normalize={normalize!r}")
    if router not in ROUTERS:
        raise ValueError(f"MoE: router must be one of {', '.join(ROUTERS)}, got {router!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"MoE: top_k must be an int in [1, {num_experts}] (num_experts), got {top_k!r}")
    if activation not in EXPERT_ACTIVATIONS:
        raise ValueError(f"MoE: activation must be one of {', '.join(EXPERT_ACTIVATIONS)}, got {activation!r}")
    if score not in SCORES:
        raise ValueError(f"MoE: score must be one of {', '.join(SCORES)}, got {score!r}")
    if router == "switch":  # Switch Transformer: one expert, weighted by its (unrenormalised) softmax probability
        if top_k != 1:
            raise ValueError(f"MoE: router='switch' sends each token to one expert: top_k must be 1, got {top_k}")
        if score != "softmax" or normalize:
            raise ValueError(f"MoE: router='switch' weighs a token's expert by its softmax probability: it takes "
                             f"score='softmax' and normalize=None/False, got score={score!r}, normalize={normalize!r}")
    if capacity_factor is not None and (isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float))
                                        or not capacity_factor > 0):
        raise ValueError(f"MoE: capacity_factor must be None (no dropping) or a number > 0, got {capacity_factor!r}")
    for name, v in (("aux_loss_coef", aux_loss_coef), ("z_loss_coef", z_loss_coef)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"MoE: {name} must be a number >= 0, got {v!r}")
    if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not 0 <= jitter < 1:
        raise ValueError(f"MoE: jitter must be a number in [0, 1), got {jitter!r}")
    if shared_expert_size is not None:
        positive_int("shared_expert_size", shared_expert_size)


class MoE(FastModule, nn.Module):
    """A sparse MoE MLP; see the module docstring.

    router: "topk" (scores softmax or sigmoid per `score`, the top_k largest, renormalised to sum
    to 1 when `normalize`: Mixtral), "switch" (Switch Transformer: top_k=1, weight = the softmax
    probability, not renormalised, which would make it 1 and leave the router no gradient), or
    "base" (BASE layers, Lewis et al. 2021: in training each token gets one expert by
    fastlm.ops.base_assignment, every expert exactly T/E tokens, the assignment maximising the
    total logit; at eval the token's best expert; the output is scaled by sigmoid(logit), through
    which the router learns; no auxiliary loss). normalize=None is the router's own: True for
    topk, False for switch.
    capacity_factor: GShard's token dropping: each forward lets at most
    ceil(capacity_factor * T * top_k / E) assignments reach an expert (T: the tokens of that call),
    first choices of every token first; a dropped assignment contributes 0 (the block's residual
    carries the token). None: no dropping.
    jitter: Switch's multiplicative noise on the router logits, uniform in [1 - jitter, 1 + jitter],
    in training mode only (HF Mixtral puts it on the hidden states instead).
    After each forward: `aux_loss` = aux_loss_coef * load-balancing loss + z_loss_coef * z-loss (a
    differentiable fp32 scalar; a 0 tensor when both coefficients are 0), `last_routing` (the
    RouterOutput, detached), `expert_load` and `drop_rate`.
    process_group (expert parallelism): this process holds experts r*E/P .. (r+1)*E/P - 1 of the
    group's P (rank r), so `experts` and the state_dict carry E/P experts; tokens are exchanged
    with all-to-alls (fastlm.nn.expert_parallel). The router (gate) is replicated: average its
    gradient as any data-parallel weight (DDP does).
    """

    def __init__(self, hidden_size, intermediate_size, num_experts, top_k=2, *, activation="swiglu", router="topk",
                 score="softmax", normalize=None, capacity_factor=None, aux_loss_coef=0.01, z_loss_coef=0.0,
                 jitter=0.0, shared_expert_size=None, process_group=None, backend=None, device=None, dtype=None):
        _check(hidden_size, intermediate_size, num_experts, top_k, activation, router, score, normalize,
               capacity_factor, aux_loss_coef, z_loss_coef, jitter, shared_expert_size, process_group)
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.hidden_size, self.intermediate_size, self.num_experts, self.top_k = (hidden_size, intermediate_size,
                                                                                  num_experts, top_k)
        self.activation, self.router, self.score = activation, router, score
        self.normalize = (router == "topk") if normalize is None else bool(normalize)
        self.capacity_factor, self.jitter = capacity_factor, float(jitter)
        self.aux_loss_coef, self.z_loss_coef = float(aux_loss_coef), float(z_loss_coef)
        self.backend = check_backend(backend)
        # submodule order is HF's, so state_dict keys come in its order too
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, **kw)  # only its weight is used: (E, H)
        self.process_group = process_group
        local = num_experts // process_group.size() if process_group is not None else num_experts
        self.experts = Experts(local, hidden_size, intermediate_size, activation in GATED, **kw)
        if shared_expert_size is not None:
            self.shared_expert = SharedExpert(hidden_size, shared_expert_size, activation, **kw)
            self.shared_expert_gate = Linear(hidden_size, 1, bias=False, **kw)
        self.shared_expert_size = shared_expert_size
        self.last_routing: RouterOutput | None = None
        self.aux_loss: torch.Tensor | None = None
        self._assignments = 0  # T * top_k of the last forward

    def forward(self, x, residual=None):
        flat = x.reshape(-1, self.hidden_size)  # (..., H) -> (T, H)
        tokens = flat.shape[0]
        with self._pin():
            logits = F.linear(flat, self.gate.weight)  # (T, E)
            r = self._route(logits, tokens)
            out = self._experts(flat, r)
            if self.shared_expert_size is not None:
                out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)  # gate (T, 1)
        self.last_routing = RouterOutput(*(t.detach() for t in r))
        self._assignments = tokens * self.top_k
        aux = r.aux_loss.new_zeros(())
        if self.aux_loss_coef:
            aux = aux + self.aux_loss_coef * r.aux_loss
        if self.z_loss_coef:
            aux = aux + self.z_loss_coef * r.z_loss
        self.aux_loss = aux
        out = out.view(x.shape)  # (T, H) -> (..., H)
        return out if residual is None else out + residual

    def _route(self, logits, tokens) -> RouterOutput:
        if self.router != "base":
            return ops.moe_router(logits, self.top_k, score=self.score, normalize=self.normalize,
                                  capacity=capacity_for(tokens, self.num_experts, self.top_k, self.capacity_factor),
                                  jitter=self.jitter if self.training else 0.0)
        ids = ops.base_assignment(logits.detach())[0] if self.training else logits.argmax(-1).to(torch.int32)
        wdt = torch.float64 if logits.dtype == torch.float64 else torch.float32  # the routing weights' dtype
        weights = torch.sigmoid(logits.gather(1, ids.view(-1, 1).long()).to(wdt))  # (T, 1): BASE's gate
        zero = logits.new_zeros((), dtype=wdt)
        counts = torch.bincount(ids.long(), minlength=self.num_experts).to(torch.int32)
        return RouterOutput(ids.view(-1, 1), weights, counts, zero, zero)

    def _experts(self, flat, r: RouterOutput):
        w_up, w_down = self.experts.gate_up_proj, self.experts.down_proj
        if self.process_group is None:
            return ops.moe_experts(flat, r.expert_ids, r.weights, w_up, w_down, activation=self.activation)
        return expert_parallel_experts(flat, r.expert_ids, r.weights, w_up, w_down, self.num_experts,
                                       self.process_group, activation=self.activation)

    def shard_experts_(self, process_group) -> "MoE":
        """Expert parallelism for a layer built whole: keep only this rank's E/P experts (rank r of
        P keeps experts r*E/P .. (r+1)*E/P - 1) and exchange tokens over `process_group` from now
        on. Built with the same seed on every rank, the sharded layers hold exactly the whole
        layer's experts between them (how fastlm.train --expert-parallel starts)."""
        if self.process_group is not None:
            raise RuntimeError("MoE.shard_experts_: the experts are already sharded over a process group")
        _check(self.hidden_size, self.intermediate_size, self.num_experts, self.top_k, self.activation, self.router,
               self.score, self.normalize, self.capacity_factor, self.aux_loss_coef, self.z_loss_coef, self.jitter,
               self.shared_expert_size, process_group)
        local = self.num_experts // process_group.size()
        first = process_group.rank() * local
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(self.experts, name)
            setattr(self.experts, name, nn.Parameter(w.detach()[first:first + local].clone(),
                                                     requires_grad=w.requires_grad))
        self.process_group = process_group
        return self

    def __getstate__(self):
        # the last forward's aux_loss holds its autograd graph, which can't be deep-copied or
        # pickled: a copy starts as if no forward had run
        state = super().__getstate__()
        state.update(last_routing=None, aux_loss=None, _assignments=0)
        return state

    @property
    def expert_load(self) -> torch.Tensor:
        """(E,) fp32: each expert's share of the assignments kept in the last forward (1/E each
        when balanced; zeros when nothing was kept)."""
        counts = self._last("expert_load").counts.float()
        return counts / counts.sum().clamp(min=1)

    @property
    def drop_rate(self) -> torch.Tensor:
        """() fp32: the fraction of the last forward's T * top_k assignments that capacity dropped."""
        kept = self._last("drop_rate").counts.sum()
        return (self._assignments - kept).float() / max(self._assignments, 1)  # 0 for an empty call

    def _last(self, what) -> RouterOutput:
        if self.last_routing is None:
            raise RuntimeError(f"MoE.{what}: no forward has run yet")
        return self.last_routing

    def extra_repr(self):
        opts = [f"hidden_size={self.hidden_size}", f"intermediate_size={self.intermediate_size}",
                f"num_experts={self.num_experts}", f"top_k={self.top_k}", f"activation={self.activation!r}",
                f"router={self.router!r}"]
        if self.score != "softmax":
            opts.append(f"score={self.score!r}")
        if self.capacity_factor is not None:
            opts.append(f"capacity_factor={self.capacity_factor}")
        return ", ".join(opts) + self._backend_repr()
