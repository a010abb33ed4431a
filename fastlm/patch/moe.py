"""Hugging Face mixture-of-experts blocks on fastlm's MoE ops, through HF's own extension points.

Experts. transformers' experts classes (MixtralExperts, Qwen2MoeExperts, Qwen3MoeExperts,
GptOssExperts, ... everything decorated with `use_experts_implementation`) dispatch their forward
on `config._experts_implementation` through `ExpertsInterface`. fastlm registers an entry
"fastlm" there (`experts_forward`): tokens permuted into expert-contiguous rows
(fastlm.ops.moe_permute), one grouped GEMM per projection for all experts
(fastlm.ops.grouped_linear, the gated activation fused into its epilogue where fastlm has it:
silu -> "swiglu", gelu -> "geglu"), and the routing-weighted gather back (moe_unpermute) -- the
whole of fastlm.ops.moe_experts. It runs on the module's own Parameters, honouring the layout
flags the decorator sets (has_gate, has_bias, is_transposed, is_concatenated). A gate fastlm does
not fuse (GPT-OSS's clamped, interleaved SwiGLU with alpha, a custom `_apply_gate`, an activation
other than SiLU / GELU) runs as the class's own `_apply_gate` / `act_fn` between the two grouped
GEMMs, as HF's grouped_mm entry does. Every layout is first checked by a probe against the class's
eager forward (random small weights), so a class whose eager code disagrees with its flags is
refused with the reason. `fastlm.patch` switches a model to it with HF's
`set_experts_implementation("fastlm")`; a model built with experts_implementation="fastlm" is
checked at build time (post_init) and refused there if some experts module can't be served.

Routers. A top-k router module (MixtralTopKRouter, Qwen2MoeTopKRouter, Qwen3MoeTopKRouter,
GptOssTopKRouter) gets, as an instance attribute, a forward that computes its logits with the same
F.linear and the routing with fastlm.ops.moe_router, returning exactly what HF's returns
(router_logits, scores, indices, with HF's shapes and dtypes). What HF's computes (softmax then
top-k, renormalised or not, or GPT-OSS's top-k then softmax, which is the same thing) is found by a
probe. The module keeps its class (OutputRecorder, which records router_logits for HF's aux loss,
matches it by isinstance), its Parameters, state_dict and hooks; `unpatch_moe` restores both.
HF's block (jitter noise, the shared expert, the reshapes) runs unchanged around the two.
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fastlm import ops
from fastlm.ops.grouped_linear import GATED
from fastlm.patch.recognise import on_cpu, recognise_activation

ENTRY = "fastlm"
LAYOUT_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm")
PROBE_TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- experts
@dataclass(frozen=True)
class ExpertsPlan:
    up: str  # "gate_up_proj" (gated) or "up_proj"
    gated: bool
    transposed: bool  # weights stored (E, in, out): passed to the ops as (E, out, in) views
    bias: bool
    activation: str | None  # fused into the first grouped GEMM; None: the class's own gate / act between

    def describe(self, kind: str) -> str:
        if self.activation is not None:
            how = f"fastlm.ops.moe_experts, activation={self.activation!r} fused"
        else:
            gate = f"{kind}._apply_gate" if self.gated else f"{kind}.act_fn"
            how = f"moe_permute, grouped_linear, {gate} unfused, grouped_linear, moe_unpermute"
        extras = (", biases" if self.bias else "") + (", transposed weights read in place" if self.transposed else "")
        return f"experts_implementation='fastlm' ({how}{extras})"


def is_hf_experts(module) -> bool:
    """An experts module of transformers' kind: the layout flags use_experts_implementation sets,
    a config to dispatch on, a 3-D down_proj."""
    return (all(hasattr(module, f) for f in LAYOUT_FLAGS) and hasattr(module, "config")
            and isinstance(getattr(module, "down_proj", None), torch.Tensor))


def _default_gate():
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        return None
    return _default_apply_gate


def _eager_forward(module):
    """The class's own (eager) forward under use_experts_implementation's dispatching wrapper."""
    forward = type(module).forward
    return getattr(forward, "__wrapped__", forward)


def _layout(module):
    """(plan, "") or (None, why) from the decorator's flags and the Parameters' shapes."""
    if not hasattr(type(module).forward, "__wrapped__"):
        return None, "its forward does not dispatch through transformers' ExpertsInterface (overridden)"
    if module.has_post_expert_norm:
        return None, "has a post-expert norm (has_post_expert_norm): not served yet"
    up_name = "gate_up_proj" if module.has_gate else "up_proj"
    up, down = getattr(module, up_name, None), getattr(module, "down_proj", None)
    if not (isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.dim() == 3 and down.dim() == 3):
        return None, f"expects 3-D {up_name} and down_proj Parameters"
    if module.has_bias and not all(isinstance(getattr(module, f"{n}_bias", None), torch.Tensor)
                                   for n in (up_name, "down_proj")):
        return None, f"has_bias=True but no {up_name}_bias / down_proj_bias"
    e, n_up, hidden = up.shape if not module.is_transposed else (up.shape[0], up.shape[2], up.shape[1])
    inner = down.shape[2] if not module.is_transposed else down.shape[1]
    want_down = (e, hidden, inner) if not module.is_transposed else (e, inner, hidden)
    if tuple(down.shape) != want_down or n_up != (2 * inner if module.has_gate else inner):
        return None, f"{up_name} {tuple(up.shape)} and down_proj {tuple(down.shape)} do not fit its layout flags"
    activation = None
    act = recognise_activation(getattr(module, "act_fn", None))
    if module.has_gate:
        default = _default_gate()
        own_gate = getattr(type(module), "_apply_gate", None)
        if module.is_concatenated and default is not None and own_gate is default and act in ("silu", "gelu"):
            activation = {"silu": "swiglu", "gelu": "geglu"}[act]
        elif own_gate is None:
            return None, "gated experts without an _apply_gate"
    elif act is not None:
        activation = act
    elif not isinstance(getattr(module, "act_fn", None), nn.Module) and not callable(getattr(module, "act_fn", None)):
        return None, "no act_fn"
    return ExpertsPlan(up_name, bool(module.has_gate), bool(module.is_transposed), bool(module.has_bias),
                       activation), ""


class _Call(nn.Module):
    """Runs fn(inner, *args): a way to substitute `inner`'s Parameters with functional_call
    without touching the module itself."""

    def __init__(self, inner, fn):
        super().__init__()
        self.inner, self.fn = inner, fn

    def forward(self, *args):
        return self.fn(self.inner, *args)


_EXPERTS_PROBES: dict = {}  # (class, flags, act class, experts) -> the probe's verdict


@on_cpu
def _probe_experts(module, plan) -> bool:
    """The plan against the class's eager forward at hidden 8, intermediate 6 (the math, not the size)."""
    g = torch.Generator().manual_seed(6)
    e, hidden, inner, tokens = getattr(module, plan.up).shape[0], 8, 6, 7
    n_up = 2 * inner if plan.gated else inner
    shapes = {plan.up: (e, n_up, hidden), "down_proj": (e, hidden, inner)}
    if plan.transposed:
        shapes = {k: (s[0], s[2], s[1]) for k, s in shapes.items()}
    state = {f"inner.{k}": torch.randn(s, generator=g) * s[-1] ** -0.5 for k, s in shapes.items()}
    if plan.bias:
        state[f"inner.{plan.up}_bias"] = torch.randn(e, n_up, generator=g)
        state["inner.down_proj_bias"] = torch.randn(e, hidden, generator=g)
    extra = {n for n, _ in module.named_parameters()} - {k[len("inner."):] for k in state}
    if extra:
        return False  # parameters the plan does not know of
    x = torch.randn(tokens, hidden, generator=g) * 2
    k = min(2, e)
    index = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)])  # (tokens, k) distinct
    weights = torch.rand(tokens, k, generator=g)
    try:
        with torch.no_grad():
            want = functional_call(_Call(module, _eager_forward(module)), state, (x, index, weights))
            got = functional_call(_Call(module, lambda m, *a: run_experts(m, plan, *a, backend="reference")), state,
                                  (x, index, weights))
    except Exception:
        return False
    return isinstance(want, torch.Tensor) and want.shape == got.shape and torch.allclose(got, want, **PROBE_TOL)


def experts_plan(module):
    """(ExpertsPlan, "") when the "fastlm" entry computes exactly what `module`'s eager forward
    does, else (None, why)."""
    if not is_hf_experts(module):
        return None, "not a transformers experts module (no use_experts_implementation layout flags)"
    plan, why = _layout(module)
    if plan is None:
        return None, why
    act = getattr(module, "act_fn", None)
    key = (type(module), plan, tuple(getattr(module, f) for f in LAYOUT_FLAGS), type(act),
           getattr(module, plan.up).shape[0])
    if key not in _EXPERTS_PROBES:
        _EXPERTS_PROBES[key] = _probe_experts(module, plan)
    if not _EXPERTS_PROBES[key]:
        return None, "its eager forward is not what its layout flags describe (probe mismatch)"
    return plan, ""


def _weights(module, plan):
    up, down = getattr(module, plan.up), module.down_proj
    # (E, in, out) seen as (E, out, in): every backend reads either orientation, and returns
    # grad_weight in it, so the parameter gets its gradient with no copy
    if plan.transposed:
        up, down = up.transpose(1, 2), down.transpose(1, 2)  # in place (cuda: unless K or width isn't 8-aligned)
    bias_up = getattr(module, f"{plan.up}_bias") if plan.bias else None
    bias_down = module.down_proj_bias if plan.bias else None
    return up, down, bias_up, bias_down


def run_experts(module, plan: ExpertsPlan, hidden_states, top_k_index, top_k_weights, backend=None):
    """hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k) -> (T, H) on fastlm's MoE ops."""
    up, down, bias_up, bias_down = _weights(module, plan)
    x = hidden_states.to(up.dtype)  # as HF's grouped_mm entry (autocast may hand fp32 to bf16 weights)
    experts = up.shape[0]
    ids = top_k_index.to(torch.int32)
    weights = top_k_weights.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if getattr(module, "_is_expert_parallel", False):  # EP sentinels (ids >= E): dropped slots, weight 0
        ids = ids.masked_fill(ids >= experts, -1)
    if plan.activation is not None:
        out = ops.moe_experts(x, ids, weights, up, down, b_gate_up=bias_up, b_down=bias_down,
                              activation=plan.activation, backend=backend)
    else:
        x_sorted, rows, offsets = ops.moe_permute(x, ids, experts, backend=backend)
        h = ops.grouped_linear(x_sorted, up, offsets, bias=bias_up, backend=backend)
        h = module._apply_gate(h) if plan.gated else module.act_fn(h)
        y = ops.grouped_linear(h, down, offsets, bias=bias_down, backend=backend)
        out = ops.moe_unpermute(y, rows, weights, backend=backend)
    return out.to(hidden_states.dtype)


def experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' ExpertsInterface entry "fastlm"."""
    plan = self.__dict__.get("_fastlm_experts")
    if plan is None:  # a model built with experts_implementation="fastlm" is checked at build; a stray module here
        plan, why = experts_plan(self)
        if plan is None:
            raise ValueError(f"experts_implementation='fastlm': {type(self).__name__} {why}; use 'grouped_mm' or "
                             "'eager' for this model")
        self._fastlm_experts = plan
    return run_experts(self, plan, hidden_states, top_k_index, top_k_weights,
                       backend=self.__dict__.get("_fastlm_backend"))


def register_hf_experts() -> bool:
    """Register "fastlm" with transformers' ExpertsInterface; False where transformers has none."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register(ENTRY, experts_forward)
    return True


def serve_experts_modules(model) -> None:
    """At build time (post_init) of a model whose experts implementation is "fastlm": plan every
    experts module, or refuse with a ValueError that names the class and why."""
    for name, m in model.named_modules():
        if not is_hf_experts(m) or getattr(m.config, "_experts_implementation", None) != ENTRY:
            continue
        plan, why = experts_plan(m)
        if plan is None:
            raise ValueError(f"experts_implementation='fastlm': {type(m).__name__} ({name}) {why}; build the model "
                             "with experts_implementation='grouped_mm' or 'eager'")
        m._fastlm_experts = plan


def switch_experts(model, experts: list, backend) -> tuple[list, list]:
    """Plan every experts module of `model`, and switch the model to the "fastlm" entry if all can
    be served (it is one switch per config). Returns (swapped, left) report rows."""
    plans = {name: experts_plan(m) for name, m in experts}
    blocked = {type(m).__name__: plans[n][1] for n, m in experts if plans[n][0] is None}
    if not blocked and not (hasattr(model, "set_experts_implementation") and register_hf_experts()):
        blocked = {type(m).__name__: "experts kept: patch the HF model (its experts implementation is a model setting)"
                   for _, m in experts}
    if blocked:
        return [], [(n, type(m).__name__, blocked.get(type(m).__name__) or
                     f"experts kept: {'; '.join(sorted(set(blocked.values())))}") for n, m in experts]
    for name, m in experts:
        m._fastlm_experts, m._fastlm_backend = plans[name][0], backend
    model.set_experts_implementation(ENTRY)
    not_set = [(n, m) for n, m in experts if getattr(m.config, "_experts_implementation", None) != ENTRY]
    left = [(n, type(m).__name__, f"experts kept: {type(model).__name__} does not let its experts implementation be "
                                  "set") for n, m in not_set]
    swapped = [(n, type(m).__name__, plans[n][0].describe(type(m).__name__)) for n, m in experts
               if (n, m) not in not_set]
    return swapped, left


# ---------------------------------------------------------------- routers
@dataclass(frozen=True)
class RouterSpec:
    score: str  # "softmax" | "sigmoid"
    normalize: bool
    flatten: bool  # HF reshapes its input to (-1, hidden) first
    scores_dtype: torch.dtype | None  # None: the logits' dtype
    index_dtype: torch.dtype
    backend: str | None = None

    def describe(self, top_k: int) -> str:
        return (f"router -> fastlm.ops.moe_router ({self.score} top-{top_k}"
                f"{', renormalised' if self.normalize else ''})")


def is_router(module) -> bool:
    """Router-shaped: a 2-D (experts, hidden) weight (+ an (experts,) bias), an int top_k, no children."""
    params = dict(module.named_parameters(recurse=False))
    w = params.get("weight")
    return (not module._modules and isinstance(w, torch.Tensor) and w.dim() == 2 and set(params) <= {"weight", "bias"}
            and isinstance(getattr(module, "top_k", None), int) and not isinstance(module.top_k, bool)
            and 1 <= module.top_k <= w.shape[0])


def _router_forward(self, hidden_states):
    """A top-k router's forward on fastlm.ops.moe_router, returning what the HF class returns."""
    spec = self._fastlm_router
    if spec.flatten:
        hidden_states = hidden_states.reshape(-1, self.weight.shape[1])
    logits = F.linear(hidden_states, self.weight, getattr(self, "bias", None))  # HF's own: router_logits equal
    routing = ops.moe_router(logits.reshape(-1, logits.shape[-1]), self.top_k, score=spec.score,
                             normalize=spec.normalize, backend=spec.backend)
    shape = logits.shape[:-1] + (self.top_k,)
    scores = routing.weights.view(shape).to(spec.scores_dtype or logits.dtype)
    return logits, scores, routing.expert_ids.view(shape).to(spec.index_dtype)


@on_cpu
def recognise_router(module, backend=None):
    """(RouterSpec, "") when `module`'s forward is softmax (or sigmoid) top-k routing that
    fastlm.ops.moe_router computes, else (None, why). Probed at the module's sizes with random
    weights, in fp32 (values) and bf16 (output dtypes)."""
    if not is_router(module):
        return None, "not a top-k router (a 2-D weight, an int top_k, no children)"
    e, hidden = module.weight.shape
    has_bias = isinstance(getattr(module, "bias", None), torch.Tensor)
    g = torch.Generator().manual_seed(7)
    state = {"weight": torch.randn(e, hidden, generator=g) * 3 * hidden ** -0.5}  # logits ~ N(0, 9): no near-ties
    if has_bias:
        state["bias"] = torch.randn(e, generator=g)
    x = torch.randn(6, hidden, generator=g)  # (tokens, hidden), as the MoE blocks call their routers
    try:
        with torch.no_grad():
            got = functional_call(module, state, (x,))
            low = functional_call(module, {k: v.bfloat16() for k, v in state.items()}, (x.bfloat16(),))
            nd = functional_call(module, state, (x.view(2, 3, hidden),))  # does it flatten (batch, seq, hidden)?
    except Exception:
        return None, "its forward does not run on (tokens, hidden) input (probe failed)"
    if not all(isinstance(o, tuple) and len(o) == 3 and all(isinstance(t, torch.Tensor) for t in o)
               for o in (got, low, nd)):
        return None, "its forward does not return (router_logits, scores, indices)"
    logits = F.linear(x, state["weight"], state.get("bias"))
    if got[0].shape != logits.shape or not torch.allclose(got[0], logits, **PROBE_TOL):
        return None, "its router_logits are not x @ weight^T (+ bias) (probe mismatch)"
    shape = (x.shape[0], module.top_k)
    for score in ("softmax", "sigmoid"):
        for normalize in (True, False):
            r = ops.moe_router(logits, module.top_k, score=score, normalize=normalize, backend="reference")
            if (got[1].shape == shape and got[2].shape == shape and not got[2].is_floating_point()
                    and torch.equal(got[2].long(), r.expert_ids.long())
                    and torch.allclose(got[1].float(), r.weights, **PROBE_TOL)):
                scores_dtype = None if low[1].dtype == low[0].dtype else low[1].dtype
                return RouterSpec(score, normalize, nd[0].dim() == 2, scores_dtype, got[2].dtype, backend), ""
    return None, "its forward is not softmax / sigmoid top-k routing (probe mismatch)"


def patch_router(module, backend=None) -> str | None:
    """Route `module` (a router) through fastlm.ops.moe_router; returns why not, or None."""
    if "forward" in module.__dict__:
        return "its forward is already replaced on the instance"
    spec, why = recognise_router(module, backend)
    if spec is None:
        return why
    module._fastlm_router = spec
    module.forward = types.MethodType(_router_forward, module)
    return None


def unpatch_moe(model: nn.Module) -> None:
    """Undo what fastlm.patch did to `model`'s MoE blocks: routers get their class's forward back,
    and the experts implementation goes back to HF's default ("grouped_mm", or "eager" where
    that can't dispatch)."""
    for m in model.modules():
        if "_fastlm_router" in m.__dict__:
            del m._fastlm_router
            m.__dict__.pop("forward", None)
        for attr in ("_fastlm_experts", "_fastlm_backend"):
            m.__dict__.pop(attr, None)
    if getattr(getattr(model, "config", None), "_experts_implementation", None) == ENTRY:
        model.set_experts_implementation("grouped_mm" if model._can_set_experts_implementation() else "eager")
