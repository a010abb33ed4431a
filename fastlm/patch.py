"""Swap the layers of an existing model for fastlm ones, keeping its parameters.

    report = fastlm.patch(model)          # in place; returns what was swapped and what was not
    print(report)

What is swapped (each new module shares the original Parameter and buffer objects, so the
optimizer, state_dict keys and tied weights are untouched):
- torch.nn layers with a fastlm.nn twin (exact type match: subclasses may override forward):
  Linear, LayerNorm, RMSNorm, GELU, ReLU, SiLU, Softmax, CrossEntropyLoss,
  MultiheadAttention, TransformerEncoderLayer;
- in an nn.Sequential, a Linear followed by GELU/ReLU/SiLU becomes one fastlm Linear with the
  activation fused into its GEMM (the activation's slot becomes an nn.Identity);
- HF transformers GPT-2: GPT2MLP becomes one module running c_fc + activation and c_proj as
  fused linears; GPT2Attention keeps HF's forward (KV cache, masks) with its Conv1D
  projections on fastlm linear and its attention on fastlm's, through the "fastlm" entry this
  module registers with transformers' AttentionInterface. `register_hf_attention()` does only
  the registration, after which `from_pretrained(..., attn_implementation="fastlm")` works
  for every model written against that interface (importing fastlm after transformers
  registers it too).
Everything else is left alone and listed in the report with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

import fastlm.nn as fnn
from fastlm import ops
from fastlm.nn._base import FastModule, check_backend

TWINS = {
    nn.Linear: fnn.Linear, nn.LayerNorm: fnn.LayerNorm, nn.RMSNorm: fnn.RMSNorm, nn.GELU: fnn.GELU,
    nn.ReLU: fnn.ReLU, nn.SiLU: fnn.SiLU, nn.Softmax: fnn.Softmax, nn.CrossEntropyLoss: fnn.CrossEntropyLoss,
    nn.MultiheadAttention: fnn.MultiheadAttention, nn.TransformerEncoderLayer: fnn.TransformerEncoderLayer,
}
# HF activation classes (transformers.activations) by name -> the fused activation
HF_ACTIVATIONS = {"NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
                  "FastGELUActivation": "gelu_tanh", "GELUActivation": "gelu", "SiLUActivation": "silu",
                  "ReLU": "relu", "SiLU": "silu"}


@dataclass
class PatchReport:
    swapped: list[tuple[str, str, str]] = field(default_factory=list)  # (name, old type, new type)
    left: list[tuple[str, str, str]] = field(default_factory=list)  # (name, type, why)

    def __str__(self):
        lines = [f"fastlm.patch: swapped {len(self.swapped)}, left {len(self.left)} alone"]
        lines += [f"  swapped {n or '(root)'}: {a} -> {b}" for n, a, b in self.swapped]
        lines += [f"  left    {n or '(root)'}: {t} ({why})" for n, t, why in self.left]
        return "\n".join(lines)


# ---------------------------------------------------------------- HF transformers glue
def _hf_linear(module: nn.Module, x, activation=None):
    """An HF Conv1D (weight stored (in, out)) as a fastlm linear; the transpose is a view."""
    return ops.linear(x, module.weight.t(), module.bias, activation=activation)


class Conv1D(nn.Module):
    """HF GPT-2's Conv1D on fastlm linear; holds the original module's Parameters."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.nf, self.nx = conv.nf, conv.nx
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x):
        return _hf_linear(self, x)

    def extra_repr(self):
        return f"nf={self.nf}, nx={self.nx}"


class GPT2MLP(nn.Module):
    """HF GPT2MLP as two fused linears: act(x @ c_fc + b) in one GEMM, then c_proj."""

    def __init__(self, mlp: nn.Module, activation: str):
        super().__init__()
        self.c_fc, self.c_proj, self.dropout = Conv1D(mlp.c_fc), Conv1D(mlp.c_proj), mlp.dropout
        self.activation = activation

    def forward(self, hidden_states):
        h = _hf_linear(self.c_fc, hidden_states, self.activation)
        return self.dropout(_hf_linear(self.c_proj, h))


def hf_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' AttentionInterface entry "fastlm": query (B, H, Tq, D), key/value
    (B, Hkv, Tk, D), attention_mask None or (B|1, 1|H, Tq, Tk) bool (True = attend) or additive.
    Returns ((B, Tq, H, D), None), as transformers' sdpa entry does."""
    if kwargs.get("output_attentions"):
        raise ValueError("attn_implementation='fastlm' never forms attention weights; use 'eager' for output_attentions")
    Tq, Tk = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = Tq > 1 and attention_mask is None and is_causal
    if is_causal and Tk > Tq:  # a prefill into an empty static cache: keys past Tq are unwritten
        key, value = key[:, :, :Tq], value[:, :, :Tq]  # (B, Hkv, Tq, D)
    out = ops.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                           is_causal=is_causal, scale=scaling,
                                           enable_gqa=query.shape[1] != key.shape[1])  # (B, H, Tq, D)
    return out.transpose(1, 2).contiguous(), None  # (B, H, Tq, D) -> (B, Tq, H, D)


def register_hf_attention() -> bool:
    """Register "fastlm" with transformers' attention (and mask) interfaces; False without transformers."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register("fastlm", hf_attention)
    AttentionMaskInterface.register("fastlm", sdpa_mask)  # boolean masks, skipped when plainly causal
    return True


# ---------------------------------------------------------------- the walk
def _hf_activation(act) -> str | None:
    return HF_ACTIVATIONS.get(type(act).__name__)


def _is_hf(module, name: str) -> bool:
    return type(module).__name__ == name and type(module).__module__.startswith("transformers.")


def _swap(child: nn.Module, backend) -> tuple[nn.Module | None, str]:
    """(replacement, "") or (None, why it stays)."""
    if isinstance(child, (FastModule, Conv1D, GPT2MLP)):
        return None, "already fastlm"
    kind = type(child)
    if kind in TWINS:
        if getattr(child, "inplace", False):
            return None, "inplace=True runs torch's in-place op either way"
        return TWINS[kind].from_torch(child, backend=backend), ""
    if _is_hf(child, "Conv1D"):
        return Conv1D(child), ""
    if _is_hf(child, "GPT2MLP"):
        act = _hf_activation(child.act)
        if act is None:
            return None, f"activation {type(child.act).__name__} has no fused form"
        return GPT2MLP(child, act), ""
    for sub in ("GELU", "ReLU", "Linear", "LayerNorm"):
        if isinstance(child, getattr(nn, sub)):
            return None, f"a subclass of nn.{sub} (its forward may differ)"
    return None, "no fastlm twin"


def _fuse_sequential(seq: nn.Sequential, prefix: str, report: PatchReport, backend) -> None:
    """Linear followed by GELU/ReLU/SiLU -> fastlm Linear(activation=...), Identity."""
    names = list(seq._modules)
    for a, b in zip(names, names[1:]):
        lin, act = seq._modules[a], seq._modules[b]
        fused = fnn._base.activation_name(act) if type(act) in (nn.GELU, nn.ReLU, nn.SiLU) else None
        if type(lin) is nn.Linear and fused:  # an in-place act only ever touched the Linear's fresh output
            seq._modules[a] = fnn.Linear.from_torch(lin, activation=fused, backend=backend)
            seq._modules[b] = nn.Identity()
            report.swapped.append((prefix + a, "Linear", f"fastlm Linear(activation={fused!r})"))
            report.swapped.append((prefix + b, type(act).__name__, "Identity (fused into the Linear)"))


def _walk(module: nn.Module, prefix: str, report: PatchReport, backend, hf_attention_seen: list) -> None:
    if type(module) is nn.Sequential:
        _fuse_sequential(module, prefix, report, backend)
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        full = prefix + name
        if _is_hf(child, "GPT2Attention"):
            hf_attention_seen.append(full)
        new, why = _swap(child, backend)
        if new is not None:
            module._modules[name] = new
            report.swapped.append((full, type(child).__name__, f"fastlm {type(new).__name__}"))
        elif child._modules:
            _walk(child, full + ".", report, backend, hf_attention_seen)
        elif not any(n == full for n, _, _ in report.swapped):  # not an Identity left by a fusion
            report.left.append((full, type(child).__name__, why))


def patch(model: nn.Module, *, backend: str | None = None) -> PatchReport:
    """Swap `model`'s layers for fastlm ones in place (see the module docstring); `backend`
    pins a backend on every swapped module. Returns a PatchReport."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    backend = check_backend(backend)
    report = PatchReport()
    if not model._modules:
        report.left.append(("", type(model).__name__, "the root module itself: patch its parent"))
        return report
    seen: list[str] = []
    _walk(model, "", report, backend, seen)
    if seen:
        config = getattr(model, "config", None)
        if config is None or not register_hf_attention():
            report.left += [(n, "GPT2Attention", "attention kept: patch the HF model (with its config)") for n in seen]
        else:
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation("fastlm")
            else:
                config._attn_implementation = "fastlm"
            report.swapped += [(n, "GPT2Attention", "attn_implementation='fastlm' (c_attn, c_proj: fastlm Conv1D)")
                               for n in seen]
    return report


__all__ = ["patch", "PatchReport", "register_hf_attention", "hf_attention", "TWINS"]
