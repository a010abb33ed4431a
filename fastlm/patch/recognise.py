"""Recognising modules by what they compute, not by their type name.

Each recogniser checks a module's structure (its parameters, children and attributes) and then
runs a probe: the module's own forward and the fastlm replacement on the same random input,
with random parameters substituted through torch.func.functional_call, on the CPU in fp32.
So a probe works on a model still on the meta device, never touches the real weights, and an
unknown subclass with a custom forward fails it and is left alone with the reason.

    recognise_activation(module)      -> "gelu" | "gelu_tanh" | "relu" | "silu" | None
    recognise_rms_norm(module)        -> RMSNorm replacement or (None, why)
    recognise_gated_mlp(module)       -> GatedMLP replacement or (None, why)
    recognise_linear_subclass(module) -> fastlm Linear or (None, why)
    recognise_experts(module)         -> GatedExperts replacement or (None, why)
    fusable_pairs(container)          -> [(linear_name, activation_name)] called back to back
"""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fastlm import ops
from fastlm.nn._base import ACTIVATIONS

PROBE_TOL = dict(rtol=1e-5, atol=1e-5)
EPS_NAMES = ("variance_epsilon", "eps", "epsilon")
GATE_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"), ("gate", "up", "down"))
ACT_NAMES = ("act_fn", "activation_fn", "act", "activation")


def _act_ref(x, name):
    return {"gelu": F.gelu, "relu": F.relu, "silu": F.silu,
            "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[name](x)


def _close(a, b) -> bool:
    return isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, **PROBE_TOL)


def _random_state(module: nn.Module, generator) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, redrawn on the CPU in fp32 (meta tensors included)."""
    state = {}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        scale = t.shape[-1] ** -0.5 if t.dim() >= 2 else 1.0
        state[name] = torch.randn(tuple(t.shape), generator=generator) * scale
    return state


def _probe(module, state, *args):
    """The module's forward under substituted parameters; None when it raises."""
    try:
        with torch.no_grad():
            return functional_call(module, state, args)
    except Exception:  # a forward that can't run on the probe is simply not recognised
        return None


def on_cpu(fn):
    """Run a probe on the CPU even inside a `with torch.device("meta")` block (from_pretrained)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.device("cpu"):
            return fn(*args, **kwargs)
    return wrapper


@on_cpu
def recognise_activation(module) -> str | None:
    """The fused-activation name whose math `module` computes, found by probing all four."""
    if module is None or not isinstance(module, nn.Module) or module._modules or any(True for _ in module.parameters()):
        return None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 33, generator=g) * 3
    try:
        with torch.no_grad():
            y = module(x.clone())  # a clone: an in-place activation may write its input
    except Exception:
        return None
    return next((name for name in ACTIVATIONS if _close(y, _act_ref(x, name))), None)


# ---------------------------------------------------------------- RMS norms
class RMSNorm(nn.Module):
    """An RMS norm module of any library on fastlm.ops.rms_norm; keeps the original `weight`.
    offset 1.0 is Gemma's (1 + weight) form; the weight is cast to the input's dtype when they
    differ (HF computes the norm in fp32 and rounds once, as the fused kernel does)."""

    def __init__(self, weight: nn.Parameter, eps: float, offset: float, kind: str, backend=None):
        super().__init__()
        self.weight, self.eps, self.offset, self.kind, self.backend = weight, float(eps), float(offset), kind, backend

    def forward(self, x):
        w = self.weight
        if self.offset or w.dtype != x.dtype:
            w = (w.float() + self.offset).to(x.dtype)
        return ops.rms_norm(x, (x.shape[-1],), w, self.eps, backend=self.backend)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}, offset={self.offset}, from={self.kind}"


@on_cpu
def recognise_rms_norm(module, backend=None):
    params = dict(module.named_parameters())
    if module._modules or set(params) != {"weight"} or params["weight"].dim() != 1 or any(True for _ in module.buffers()):
        return None, "not an RMS norm: expects exactly one 1-D weight and no children or buffers"
    eps = next((getattr(module, n) for n in EPS_NAMES if isinstance(getattr(module, n, None), float)), None)
    if eps is None:
        return None, "norm-shaped, but no float eps attribute (variance_epsilon / eps / epsilon)"
    g = torch.Generator().manual_seed(1)
    hidden = params["weight"].shape[0]
    state = {"weight": torch.randn(hidden, generator=g)}
    x = torch.randn(3, 5, hidden, generator=g)
    got = _probe(module, state, x)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    for offset in (0.0, 1.0):
        if _close(got, normed * (state["weight"] + offset)):
            return RMSNorm(params["weight"], eps, offset, type(module).__name__, backend), ""
    return None, "forward is not x * rsqrt(mean(x^2) + eps) * (weight or 1 + weight) (probe mismatch)"


# ---------------------------------------------------------------- gated MLPs
def _activation_child(module):
    for name in ACT_NAMES:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return name, recognise_activation(child)
    return None, None


def _is_plain_linear(m) -> bool:
    return isinstance(m, nn.Linear) and (type(m) is nn.Linear or type(m).forward is nn.Linear.forward)


class GatedMLP(nn.Module):
    """A gate/up/down MLP on fastlm.ops.gated_mlp: act(x Wg^T + bg) * (x Wu^T + bu), then down.
    Keeps the original child modules (and so the state_dict keys); `fused` names a single
    gate_up projection (Phi-3), whose weight is split as [gate; up] by views."""

    def __init__(self, children: dict[str, nn.Module], activation: str, kind: str, fused: str | None = None,
                 backend=None):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)
        self.names, self.activation, self.kind, self.fused, self.backend = tuple(children), activation, kind, fused, backend

    def _weights(self):
        if self.fused:
            gate_up, down = (getattr(self, n) for n in self.names)
            half = gate_up.weight.shape[0] // 2
            bias = gate_up.bias
            return (gate_up.weight[:half], gate_up.weight[half:], down.weight,
                    None if bias is None else bias[:half], None if bias is None else bias[half:], down.bias)
        gate, up, down = (getattr(self, n) for n in self.names)
        return gate.weight, up.weight, down.weight, gate.bias, up.bias, down.bias

    def forward(self, x):
        wg, wu, wd, bg, bu, bd = self._weights()
        return ops.gated_mlp(x, wg, wu, wd, activation=self.activation, b_gate=bg, b_up=bu, b_down=bd,
                             backend=self.backend)

    def extra_repr(self):
        return f"activation={self.activation!r}, from={self.kind}"


def recognise_gated_mlp(module, backend=None):
    act_name, activation = _activation_child(module)
    if act_name is None:
        return None, "no activation child"
    if activation is None:
        return None, f"activation {type(getattr(module, act_name)).__name__} has no fused form"
    others = {n: c for n, c in module._modules.items() if n != act_name}
    if not all(_is_plain_linear(c) for c in others.values()) or any(True for _ in module._parameters):
        return None, "a gated MLP holds only Linear projections and its activation"
    names = next((t for t in GATE_NAMES if set(t) == set(others)), None)
    fused = None
    if names is None and len(others) == 2 and "down_proj" in others:
        fused = next(n for n in others if n != "down_proj")
        names = (fused, "down_proj")
    if names is None:
        return None, f"projections {sorted(others)} are not gate/up/down"
    children = {n: others[n] for n in names}
    key = (type(module), names, type(getattr(module, act_name)), tuple(c.bias is not None for c in children.values()))
    if key not in _MLP_PROBES:
        _MLP_PROBES[key] = _probe_gated(module, children, fused, activation)
    if not _MLP_PROBES[key]:
        return None, "forward is not down(act(gate(x)) * up(x)) (probe mismatch)"
    return GatedMLP(children, activation, type(module).__name__, fused, backend), ""


_MLP_PROBES: dict = {}  # (class, names, activation class, biases) -> the probe's verdict


@on_cpu
def _probe_gated(module, children, fused, activation) -> bool:
    """Probe at hidden 8, intermediate 12: the math, not the size, is what is checked."""
    g = torch.Generator().manual_seed(2)
    hidden, inner = 8, 12
    shapes = ([(2 * inner, hidden), (hidden, inner)] if fused else [(inner, hidden), (inner, hidden), (hidden, inner)])
    state = {}
    for (name, child), shape in zip(children.items(), shapes):
        state[f"{name}.weight"] = torch.randn(shape, generator=g) * shape[1] ** -0.5
        if child.bias is not None:
            state[f"{name}.bias"] = torch.randn(shape[0], generator=g)
    candidate = GatedMLP(children, activation, type(module).__name__, fused, backend="reference")
    x = torch.randn(2, 3, hidden, generator=g)
    want = _probe(candidate, state, x)
    return want is not None and _close(_probe(module, state, x), want)



# ---------------------------------------------------------------- MoE experts
class GatedExperts(nn.Module):
    """Mixture-of-experts expert weights (E, 2I, H) gate_up and (E, H, I) down, as Mixtral and
    Qwen-MoE store them, on fastlm.ops.moe_experts (permute, two grouped GEMMs with the gated
    activation fused, weighted unpermute). For experts modules outside transformers'
    ExpertsInterface (which fastlm/patch/moe.py serves without replacing the module); the routing
    is the caller's."""

    GATED = {"silu": "swiglu", "gelu": "geglu"}

    def __init__(self, module: nn.Module, activation: str, backend=None):
        super().__init__()
        self.gate_up_proj, self.down_proj = module.gate_up_proj, module.down_proj
        self.num_experts, self.activation, self.backend = module.gate_up_proj.shape[0], activation, backend
        self.kind = type(module).__name__

    def forward(self, hidden_states, top_k_index, top_k_weights):
        weights = top_k_weights.to(torch.float64 if hidden_states.dtype == torch.float64 else torch.float32)
        out = ops.moe_experts(hidden_states, top_k_index.to(torch.int32), weights, self.gate_up_proj, self.down_proj,
                              activation=self.GATED[self.activation], backend=self.backend)
        return out.to(hidden_states.dtype)

    def extra_repr(self):
        return f"experts={self.num_experts}, activation={self.activation!r}, from={self.kind}"


@on_cpu
def recognise_experts(module, backend=None):
    params = dict(module.named_parameters(recurse=False))
    if set(params) != {"gate_up_proj", "down_proj"} or params["gate_up_proj"].dim() != 3:
        return None, "not an experts block"
    act_name, activation = _activation_child(module)
    if activation not in GatedExperts.GATED:
        return None, f"experts' gated activation {activation or type(getattr(module, act_name, None)).__name__} has no " \
                     "fused grouped form (swiglu, geglu)"
    E, H, inner = params["gate_up_proj"].shape[0], 8, 12  # probe at hidden 8, intermediate 12
    g = torch.Generator().manual_seed(3)
    state = {"gate_up_proj": torch.randn(E, 2 * inner, H, generator=g) * H ** -0.5,
             "down_proj": torch.randn(E, H, inner, generator=g) * inner ** -0.5}
    x = torch.randn(6, H, generator=g)
    index = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(6)])  # (6, 2) distinct experts
    weights = torch.rand(6, 2, generator=g)
    candidate = GatedExperts(module, activation, backend="reference")
    want = _probe(candidate, state, x, index, weights)
    if want is None or not _close(_probe(module, state, x, index, weights), want):
        return None, "forward is not a top-k weighted sum of gated experts (probe mismatch)"
    return GatedExperts(module, activation, backend), ""


# ---------------------------------------------------------------- nn.Linear subclasses
@on_cpu
def recognise_linear_subclass(module, backend=None):
    import fastlm.nn as fnn

    if module._modules or set(dict(module.named_parameters())) - {"weight", "bias"}:
        return None, "a subclass of nn.Linear with extra parameters or children"
    g = torch.Generator().manual_seed(4)
    state = _random_state(module, g)
    x = torch.randn(3, module.in_features, generator=g)
    if not _close(_probe(module, state, x), F.linear(x, state["weight"], state.get("bias"))):
        return None, "a subclass of nn.Linear whose forward differs from nn.Linear's (probe mismatch)"
    return fnn.Linear.from_torch(module, backend=backend), ""


# ---------------------------------------------------------------- Linear then activation, in a forward
def _self_attr(node) -> str | None:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr
    return None


def _called(node) -> str | None:
    return _self_attr(node.func) if isinstance(node, ast.Call) else None


def fusable_pairs(container: nn.Module) -> list[tuple[str, str]]:
    """(linear, activation) child names that `container`'s forward calls back to back on one
    value, each used exactly once: `h = self.fc(x); h = self.act(h)` or `self.act(self.fc(x))`.
    Read from the forward's source; anything else (an extra use, a statement between) is not
    fused, because the activation's slot is about to become an Identity."""
    try:
        source = textwrap.dedent(inspect.getsource(inspect.unwrap(type(container).forward)))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return []
    uses: dict[str, int] = {}
    for node in ast.walk(tree):
        name = _self_attr(node)
        if name:
            uses[name] = uses.get(name, 0) + 1
    pairs = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and len(node.args) == 1 and _called(node.args[0]):  # self.act(self.fc(x))
            pairs.append((_called(node.args[0]), _called(node)))
        body = getattr(node, "body", None)
        if isinstance(body, list):
            for first, second in zip(body, body[1:]):  # h = self.fc(x); h = self.act(h)
                if (isinstance(first, ast.Assign) and isinstance(second, ast.Assign) and len(first.targets) == 1
                        and isinstance(first.targets[0], ast.Name) and _called(first.value) and _called(second.value)
                        and len(second.value.args) == 1 and isinstance(second.value.args[0], ast.Name)
                        and second.value.args[0].id == first.targets[0].id):
                    pairs.append((_called(first.value), _called(second.value)))
    return [(lin, act) for lin, act in pairs if uses.get(lin) == 1 and uses.get(act) == 1
            and isinstance(container._modules.get(lin), nn.Linear) and container._modules.get(act) is not None]
