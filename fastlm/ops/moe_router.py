"""moe_router: top-k expert routing with its losses in one fused pass per direction.

    fastlm.ops.moe_router(logits, top_k, *, score="softmax", normalize=True, capacity=None,
        jitter=0.0, backend=None) -> RouterOutput(expert_ids, weights, counts, aux_loss, z_loss)

logits (T, E): one row of router logits per token. Per row: scores s = softmax(logits) (Mixtral,
Qwen-MoE, Switch) or sigmoid(logits) (score="sigmoid", DeepSeek-V3); the top_k largest, in
descending order (ties to the lower expert id); weights = their scores, divided by their sum when
normalize (Mixtral's renormalisation).

capacity (GShard's token dropping): at most `capacity` assignments per expert, granted slot-major
(every token's first choice before any second choice, tokens in order). A dropped assignment gets
expert id -1 and weight 0: its token passes through that slot as zeros (the residual carries it),
and `counts` says how many were kept: T * top_k - counts.sum() were dropped. Weights are
normalised before dropping, as GShard does.

Losses, both fp32 scalars, differentiable:
- aux_loss = E * sum_e f_e * P_e, f_e the share of tokens that picked expert e among their top_k
  (before dropping), P_e the mean routing probability of e (softmax; for sigmoid scores, the
  scores normalised per token): Switch Transformer's load-balancing loss, equal to HF's
  load_balancing_loss_func for one layer.
- z_loss = mean over tokens of logsumexp(logits)^2 (ST-MoE's router z-loss).
The caller scales them by its coefficients. jitter > 0 multiplies the logits by uniform noise in
[1 - jitter, 1 + jitter] first (Switch Transformer's exploration noise; pass 0 at eval).

Gradients flow to logits from weights, aux_loss and z_loss; expert_ids and counts are integers.
The backward recomputes scores and selection from the logits (a row of E numbers) rather than
saving them.

Backends: cpu (csrc/cpu/moe_router.cpp: one pass per row, fp32 math, T*k serial capacity scan),
triton (fastlm/triton/moe_router.py: row blocks, capacity by a device-side slot-major prefix),
cuda (csrc/cuda/moe_router.cu: a warp per row, top-k by warp argmax rounds, capacity ranks by a
device scan, fixed-order loss sums; up to 1024 experts), reference (plain PyTorch, fp32 or fp64).
On GPU tensors nothing is read on the host: the kernels are memory-safe for any logits.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fastlm import _ext
from fastlm import backend as _backend

OP = "moe_router"
CPU_DTYPES = (torch.float32, torch.bfloat16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCORES = ("softmax", "sigmoid")


class RouterOutput(NamedTuple):
    expert_ids: torch.Tensor  # (T, top_k) int32, -1 where capacity dropped the assignment
    weights: torch.Tensor  # (T, top_k) fp32 (fp64 for fp64 logits), 0 where dropped
    counts: torch.Tensor  # (E,) int32 assignments kept per expert
    aux_loss: torch.Tensor  # () fp32
    z_loss: torch.Tensor  # () fp32


# ---------------------------------------------------------------- reference (the oracle)
def _route(lg, top_k, sigmoid, capacity):
    """(scores s, chosen experts (T, k), kept (T, k)) for fp32/fp64 logits: shared by both directions."""
    t, e = lg.shape
    s = torch.sigmoid(lg) if sigmoid else torch.softmax(lg, -1)
    chosen = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, :top_k]  # ties: lower id first
    keep = torch.ones_like(chosen, dtype=torch.bool)
    if capacity >= 0:  # slot-major priority: rank of each assignment among its expert's, in that order
        slot_major = chosen.t().reshape(-1)
        rank = torch.nn.functional.one_hot(slot_major, e).cumsum(0).gather(1, slot_major.view(-1, 1)).view(-1) - 1
        keep = (rank < capacity).view(top_k, t).t()
    return s, chosen, keep


def _picked_share(chosen, e, dtype):
    """f_e: the share of tokens that picked expert e among their top_k (before capacity)."""
    return torch.bincount(chosen.reshape(-1), minlength=e).to(dtype) / chosen.shape[0]


def moe_router_ref(logits, top_k, sigmoid=False, normalize=True, capacity=-1):
    """Weights and losses fp32 (fp64 for fp64 logits, so the oracle keeps its precision)."""
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lg = logits.detach().to(cdt)
    t, e = lg.shape
    s, chosen, keep = _route(lg, top_k, sigmoid, capacity)
    w = s.gather(1, chosen)
    if normalize:
        w = w / w.sum(-1, keepdim=True)
    ids = torch.where(keep, chosen, -1).to(torch.int32).contiguous()
    w = torch.where(keep, w, 0.0).contiguous()
    counts = torch.bincount(chosen[keep], minlength=e).to(torch.int32)
    if t == 0:
        return ids, w, counts, lg.new_zeros(()), lg.new_zeros(())
    p = s / s.sum(-1, keepdim=True) if sigmoid else s
    aux = e * (_picked_share(chosen, e, cdt) * p.mean(0)).sum()
    z = torch.logsumexp(lg, -1).square().mean()
    return ids, w, counts, aux, z


def moe_router_backward_ref(grad_weights, grad_aux, grad_z, logits, top_k, sigmoid=False, normalize=True,
                            capacity=-1):
    """The chain rule written out (the custom op's implementation runs below autograd)."""
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lg = logits.to(cdt)
    t, e = lg.shape
    s, chosen, keep = _route(lg, top_k, sigmoid, capacity)
    g = torch.where(keep, grad_weights.to(cdt), 0.0)  # dropped slots: constant 0 weights
    sel = s.gather(1, chosen)
    if normalize:
        total = sel.sum(-1, keepdim=True)
        g = (g - (g * sel / total).sum(-1, keepdim=True)) / total
    ds = torch.zeros_like(s).scatter_add_(1, chosen, g)
    dp = torch.zeros_like(s)
    if t:
        dp = (grad_aux.to(cdt) * e / t * _picked_share(chosen, e, cdt)).expand(t, e)
    if sigmoid:
        total, p = s.sum(-1, keepdim=True), s / s.sum(-1, keepdim=True)
        ds = ds + (dp - (dp * p).sum(-1, keepdim=True)) / total
        dl = ds * s * (1 - s)
    else:
        d = ds + dp
        dl = s * (d - (s * d).sum(-1, keepdim=True))
    if t:
        dl = dl + grad_z.to(cdt) * 2 / t * torch.logsumexp(lg, -1, keepdim=True) * torch.softmax(lg, -1)
    return dl.to(logits.dtype)


def _triton_forward(logits, top_k, sigmoid, normalize, capacity):
    from fastlm.triton import moe_router as kernels  # imported late: TRITON_INTERPRET is read at import

    return kernels.forward(logits, top_k, sigmoid, normalize, capacity)


def _triton_backward(grad_weights, grad_aux, grad_z, logits, top_k, sigmoid, normalize, capacity):
    from fastlm.triton import moe_router as kernels

    return kernels.backward(grad_weights, grad_aux, grad_z, logits, top_k, sigmoid, normalize, capacity)


_FORWARD = _backend.implementations(reference=moe_router_ref, triton=_triton_forward, ext="moe_router_fwd")
_BACKWARD = _backend.implementations(reference=moe_router_backward_ref, triton=_triton_backward,
                                     ext="moe_router_bwd")


# ---------------------------------------------------------------- custom ops + autograd
# The custom op returns (weights, aux_loss, z_loss, expert_ids, counts): differentiable outputs
# first (opcheck's autograd test sums the outputs in order, and an int first would make that sum
# an int); the kernels' and RouterOutput's order is (expert_ids, weights, counts, aux, z).
@torch.library.custom_op("fastlm::moe_router", mutates_args=())
def _router_op(logits: torch.Tensor, top_k: int, sigmoid: bool, normalize: bool, capacity: int,
               backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, w, counts, aux, z = _FORWARD[backend](logits, top_k, sigmoid, normalize, capacity)
    return w, aux, z, ids, counts


def _fake_outputs(logits, top_k):
    t, e = logits.shape
    f32 = dict(dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
    return (logits.new_empty(t, top_k, dtype=torch.int32), logits.new_empty(t, top_k, **f32),
            logits.new_empty(e, dtype=torch.int32), logits.new_empty((), **f32), logits.new_empty((), **f32))


@_router_op.register_fake
def _(logits, top_k, sigmoid, normalize, capacity, backend):
    ids, w, counts, aux, z = _fake_outputs(logits, top_k)
    return w, aux, z, ids, counts


@torch.library.custom_op("fastlm::moe_router_backward", mutates_args=())
def _router_backward_op(grad_weights: torch.Tensor, grad_aux: torch.Tensor, grad_z: torch.Tensor,
                        logits: torch.Tensor, top_k: int, sigmoid: bool, normalize: bool, capacity: int,
                        backend: str) -> torch.Tensor:
    return _BACKWARD[backend](grad_weights, grad_aux, grad_z, logits, top_k, sigmoid, normalize, capacity)


@_router_backward_op.register_fake
def _(grad_weights, grad_aux, grad_z, logits, top_k, sigmoid, normalize, capacity, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, top_k, sigmoid, normalize, capacity, backend = inputs
    ctx.save_for_backward(logits)
    ctx.args = (top_k, sigmoid, normalize, capacity, backend)
    ctx.mark_non_differentiable(output[3], output[4])


def _backward(ctx, grad_weights, grad_aux, grad_z, _ids, _counts):
    (logits,) = ctx.saved_tensors
    f32 = torch.float64 if logits.dtype == torch.float64 else torch.float32
    zero = logits.new_zeros((), dtype=f32)
    grad_weights = grad_weights if grad_weights is not None else logits.new_zeros(logits.shape[0], ctx.args[0],
                                                                                  dtype=f32)
    grad = _router_backward_op(grad_weights.to(f32).contiguous(), zero if grad_aux is None else grad_aux.to(f32),
                               zero if grad_z is None else grad_z.to(f32), logits, *ctx.args)
    return grad, None, None, None, None, None


_router_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- who can serve what
_backend.register_kernels(
    OP, lambda device: (torch.empty(16, 8, device=device),), "moe_router_fwd",
    cpu=CPU_DTYPES,
    triton=GPU_DTYPES,
    cuda=GPU_DTYPES,
)


# ---------------------------------------------------------------- public entry point
def _check(logits, top_k, score, capacity, jitter):
    fn = "moe_router"
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.dtype.is_floating_point:
        raise ValueError(f"{fn}: logits must be a floating-point (tokens, experts) tensor, got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}"
                         f"{' ' + str(logits.dtype) if isinstance(logits, torch.Tensor) else ''}")
    e = logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= e:
        raise ValueError(f"{fn}: top_k must be an int in [1, {e}] (the number of experts), got {top_k!r}")
    if score not in SCORES:
        raise ValueError(f"{fn}: score must be one of {', '.join(SCORES)}, got {score!r}")
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0):
        raise ValueError(f"{fn}: capacity must be None or an int >= 0 (assignments per expert), got {capacity!r}")
    if not isinstance(jitter, (int, float)) or not 0.0 <= jitter < 1.0:
        raise ValueError(f"{fn}: jitter must be a float in [0, 1), got {jitter!r}")


def moe_router(logits: torch.Tensor, top_k: int, *, score: str = "softmax", normalize: bool = True,
               capacity: int | None = None, jitter: float = 0.0, backend: str | None = None) -> RouterOutput:
    """Top-k routing, capacity dropping and the router losses; see the module docstring."""
    _check(logits, top_k, score, capacity, jitter)
    if jitter > 0:
        logits = logits * torch.empty_like(logits).uniform_(1.0 - jitter, 1.0 + jitter)
    chosen = _backend.select(OP, logits.device, logits, backend=backend)
    w, aux, z, ids, counts = _router_op(logits, top_k, score == "sigmoid", bool(normalize),
                                        -1 if capacity is None else capacity, chosen)
    return RouterOutput(ids, w, counts, aux, z)


def capacity_for(tokens: int, experts: int, top_k: int, capacity_factor: float | None) -> int | None:
    """GShard's expert capacity: ceil(capacity_factor * tokens * top_k / experts), None without a factor."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * tokens * top_k / experts) if experts else 0


if _ext.HAS_EXTENSION and hasattr(torch.ops.fastlm, "moe_router_fwd"):

    @torch.library.register_fake("fastlm::moe_router_fwd")
    def _(logits, top_k, sigmoid=False, normalize=True, capacity=-1):
        return _fake_outputs(logits, top_k)

    @torch.library.register_fake("fastlm::moe_router_bwd")
    def _(grad_weights, grad_aux, grad_z, logits, top_k, sigmoid, normalize, capacity):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)
