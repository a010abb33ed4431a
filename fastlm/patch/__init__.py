"""Swap the layers of an existing model for fastlm ones, keeping its parameters.

    report = fastlm.patch(model)          # in place; returns what was swapped and what was not
    print(report)
    fastlm.patch(model, rope=True, norm=True, mlp=True, attention=True, loss=True, backend=None)
    fastlm.patch(LlamaForCausalLM)        # or "LlamaForCausalLM", or a model type such as "llama":
                                          # every model of that class built afterwards (from_pretrained
                                          # included) is patched as it is built, before weights load

Modules are recognised by what they compute (fastlm/patch/recognise.py: structure checks, then a
probe of the module's own forward against the replacement on random inputs and random
parameters), so an unknown subclass with a custom forward is left alone, with the reason. Each
new module shares the original Parameter objects, so the optimizer, state_dict keys and tied
weights are untouched.
- torch.nn layers with a fastlm.nn twin (exact type): Linear, LayerNorm, RMSNorm, GELU, ReLU,
  SiLU, Softmax, CrossEntropyLoss, MultiheadAttention, TransformerEncoderLayer; nn.Linear
  subclasses whose forward is nn.Linear's (Falcon's FalconLinear);            [always]
- RMS norms of any library: LlamaRMSNorm and its siblings, Gemma's (1 + weight) form, T5LayerNorm,
  OLMo2/Qwen3's q/k norms -> fastlm.ops.rms_norm;                             [norm]
- gated MLPs (gate/up/down or Phi-3's fused gate_up, SiLU or GELU) -> fastlm.ops.gated_mlp;
  sparse MoE blocks (fastlm/patch/moe.py): HF experts modules (Mixtral, Qwen2-MoE, Qwen3-MoE,
  GPT-OSS, ...) -> experts_implementation="fastlm" (transformers' ExpertsInterface: moe_permute,
  grouped_linear, moe_unpermute), their top-k routers -> fastlm.ops.moe_router (same outputs, so
  HF's router-logit recording and aux loss are untouched); experts modules outside transformers'
  interface -> fastlm.ops.moe_experts; a Linear followed by an
  activation, in an nn.Sequential or in any forward that calls the two back to back (BERT,
  ViT, OPT, BART, GPT-NeoX, Falcon, T5) -> one fastlm Linear with the activation fused;
  GPT-2's Conv1D MLP;                                                         [mlp]
- HF rotary embeddings (apply_rotary_pos_emb) -> fastlm.ops.rope;            [rope]
- HF attention -> attn_implementation="fastlm" (fastlm/patch/hf.py), where every attention
  module of the model goes through transformers' AttentionInterface and needs nothing fastlm
  attention lacks (the report says what);                                    [attention]
- a causal LM's loss -> fastlm linear_cross_entropy in training, cross_entropy otherwise.  [loss]
Everything else that holds parameters is listed in the report with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

import fastlm.nn as fnn
from fastlm.nn._base import FastModule, check_backend
from fastlm.patch import hf, moe
from fastlm.patch.hf import Conv1D, GPT2MLP, LMHead, hf_attention, register_hf_attention
from fastlm.patch.recognise import (GatedExperts, GatedMLP, RMSNorm, fusable_pairs, recognise_activation,
                                    recognise_experts, recognise_gated_mlp, recognise_linear_subclass,
                                    recognise_rms_norm)

TWINS = {
    nn.Linear: fnn.Linear, nn.LayerNorm: fnn.LayerNorm, nn.RMSNorm: fnn.RMSNorm, nn.GELU: fnn.GELU,
    nn.ReLU: fnn.ReLU, nn.SiLU: fnn.SiLU, nn.Softmax: fnn.Softmax, nn.CrossEntropyLoss: fnn.CrossEntropyLoss,
    nn.MultiheadAttention: fnn.MultiheadAttention, nn.TransformerEncoderLayer: fnn.TransformerEncoderLayer,
}
NORM_TWINS = (nn.LayerNorm, nn.RMSNorm)
OURS = (FastModule, Conv1D, GPT2MLP, RMSNorm, GatedMLP, GatedExperts, LMHead)
SWITCHES = ("rope", "norm", "mlp", "attention", "loss")


@dataclass
class PatchReport:
    swapped: list[tuple[str, str, str]] = field(default_factory=list)  # (name, old type, new type)
    left: list[tuple[str, str, str]] = field(default_factory=list)  # (name, type, why)

    def __str__(self):
        lines = [f"fastlm.patch: swapped {len(self.swapped)}, left {len(self.left)} alone"]
        lines += [f"  swapped {n or '(root)'}: {a} -> {b}" for n, a, b in self.swapped]
        lines += [f"  left    {n or '(root)'}: {t} ({why})" for n, t, why in self.left]
        return "\n".join(lines)

    def kinds(self) -> set[str]:
        """The kinds of fusion that were applied: a subset of SWITCHES."""
        found = set()
        for _, _, new in self.swapped:
            for kind, marks in (("norm", ("Norm",)), ("mlp", ("MLP", "Experts", "activation=", "experts_implementation",
                                                              "moe_router", "MoE")),
                                ("rope", ("rope",)), ("attention", ("attn_implementation", "scaled_dot_product_attention")),
                                ("loss", ("cross_entropy",))):
                if any(m in new for m in marks):
                    found.add(kind)
        return found


@dataclass
class _Context:
    backend: str | None
    switches: dict
    report: PatchReport
    attentions: list = field(default_factory=list)  # (name, module) of HF attention modules seen
    experts: list = field(default_factory=list)  # (name, module) of HF experts modules seen
    routers: set = field(default_factory=set)  # names of the routers served


# ---------------------------------------------------------------- per-module decisions
def _is_hf(module, name: str | None = None) -> bool:
    kind = type(module)
    return kind.__module__.startswith("transformers.") and (name is None or kind.__name__ == name)


def _swap(child: nn.Module, ctx: _Context) -> tuple[nn.Module | None, str]:
    """(replacement, "") or (None, why it stays)."""
    on, backend = ctx.switches, ctx.backend
    if isinstance(child, OURS):
        return None, "already fastlm"
    kind = type(child)
    if kind in TWINS:
        if kind in NORM_TWINS and not on["norm"]:
            return None, "norm=False"
        if getattr(child, "inplace", False):
            return None, "inplace=True runs torch's in-place op either way"
        return TWINS[kind].from_torch(child, backend=backend), ""
    if _is_hf(child, "Conv1D"):
        return Conv1D(child), ""
    if _is_hf(child, "GPT2MLP"):
        act = recognise_activation(child.act)
        if act is None:
            return None, f"activation {type(child.act).__name__} has no fused form"
        return (GPT2MLP(child, act), "") if on["mlp"] else (None, "mlp=False")
    if isinstance(child, nn.Linear):
        return recognise_linear_subclass(child, backend)
    params = dict(child.named_parameters(recurse=False))
    if set(params) == {"weight"} and params["weight"].dim() == 1 and not child._modules:
        new, why = recognise_rms_norm(child, backend)
        return (new, why) if new is None or on["norm"] else (None, "norm=False")
    if set(params) == {"gate_up_proj", "down_proj"}:
        new, why = recognise_experts(child, backend)
        return (new, why) if new is None or on["mlp"] else (None, "mlp=False")
    if child._modules and not params and any(isinstance(c, nn.Linear) for c in child._modules.values()):
        new, why = recognise_gated_mlp(child, backend)
        if new is not None:
            return (new, "") if on["mlp"] else (None, "mlp=False")
        return None, why
    for sub in ("GELU", "ReLU", "LayerNorm"):
        if isinstance(child, getattr(nn, sub)):
            return None, f"a subclass of nn.{sub} (its forward may differ)"
    return None, "no fastlm twin"


def _fuse_pair(module, lin: str, act: str, prefix: str, ctx: _Context) -> None:
    """Linear `lin` then activation `act` (children of `module`) -> fastlm Linear(activation=...), Identity."""
    linear, activation = module._modules[lin], module._modules[act]
    fused = recognise_activation(activation)
    if fused is None or not ctx.switches["mlp"]:
        return
    if type(linear) is not nn.Linear and recognise_linear_subclass(linear)[0] is None:
        return
    module._modules[lin] = fnn.Linear.from_torch(linear, activation=fused, backend=ctx.backend)
    module._modules[act] = nn.Identity()
    ctx.report.swapped.append((prefix + lin, type(linear).__name__, f"fastlm Linear(activation={fused!r})"))
    ctx.report.swapped.append((prefix + act, type(activation).__name__, "Identity (fused into the Linear)"))


def _fuse_sequential(seq: nn.Sequential, prefix: str, ctx: _Context) -> None:
    names = list(seq._modules)
    for a, b in zip(names, names[1:]):
        if type(seq._modules[a]) is nn.Linear and type(seq._modules[b]) in (nn.GELU, nn.ReLU, nn.SiLU):
            _fuse_pair(seq, a, b, prefix, ctx)  # an in-place act only ever touched the Linear's fresh output


def _is_attention(module) -> bool:
    return _is_hf(module) and type(module).__name__.endswith("Attention") and any(
        isinstance(c, nn.Linear) or _is_hf(c, "Conv1D") for c in module._modules.values())


def _walk(module: nn.Module, prefix: str, ctx: _Context) -> None:
    report = ctx.report
    if type(module) is nn.Sequential:
        _fuse_sequential(module, prefix, ctx)
    else:
        for lin, act in fusable_pairs(module):
            _fuse_pair(module, lin, act, prefix, ctx)
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        full = prefix + name
        if moe.is_hf_experts(child) or moe.is_router(child):
            _moe_part(full, child, ctx)
            continue
        if _is_attention(child):
            ctx.attentions.append((full, child))
            if ctx.switches["rope"] and getattr(child, "_fastlm_rope", None) is None:
                why = hf.patch_rope(child, ctx.backend)
                if why is None:
                    report.swapped.append((full, type(child).__name__,
                                           f"apply_rotary_pos_emb -> fastlm.ops.rope ({child._fastlm_rope})"))
                elif "no apply_rotary_pos_emb" not in why:
                    report.left.append((full, type(child).__name__, f"rope kept: {why}"))
        new, why = _swap(child, ctx)
        if new is not None:
            module._modules[name] = new
            report.swapped.append((full, type(child).__name__, f"fastlm {type(new).__name__}"))
            continue
        own = [n for n, p in child._parameters.items() if p is not None]
        if _is_attention(child):  # attention sinks (GPT-OSS) are read by the attention op itself
            own = [n for n in own if n != "sinks"]
        if child._modules and why != "already fastlm":
            if own:
                report.left.append((full, type(child).__name__, f"holds parameters {', '.join(own)} beside its "
                                                                f"children: {why}"))
            _walk(child, full + ".", ctx)
        elif not any(n == full for n, _, _ in report.swapped):  # not an Identity left by a fusion
            report.left.append((full, type(child).__name__, why))


def _moe_part(name: str, module: nn.Module, ctx: _Context) -> None:
    """An HF experts module (collected: one experts implementation per model) or a top-k router
    (served in place: its forward on fastlm.ops.moe_router)."""
    kind = type(module).__name__
    if "_fastlm_router" in module.__dict__ or (
            "_fastlm_experts" in module.__dict__
            and getattr(getattr(module, "config", None), "_experts_implementation", None) == moe.ENTRY):
        ctx.report.left.append((name, kind, "already fastlm"))
    elif not ctx.switches["mlp"]:
        ctx.report.left.append((name, kind, "mlp=False"))
    elif moe.is_hf_experts(module):
        ctx.experts.append((name, module))
    else:
        why = moe.patch_router(module, ctx.backend)
        if why is None:
            ctx.routers.add(name)
            ctx.report.swapped.append((name, kind, module._fastlm_router.describe(module.top_k)))
        else:
            ctx.report.left.append((name, kind, f"router kept: {why}"))


def _switch_experts(model: nn.Module, ctx: _Context) -> None:
    if not ctx.experts:
        return
    swapped, left = moe.switch_experts(model, ctx.experts, ctx.backend)
    ctx.report.swapped += swapped
    ctx.report.left += left
    served = {n.rpartition(".")[0] for n, _, _ in swapped}
    blocks = {n.rpartition(".")[0] for n in ctx.routers} & served
    for name, block in model.named_modules():  # a block whose router and experts both run on fastlm
        if name in blocks:
            ctx.report.swapped.append((name, type(block).__name__, "fastlm MoE block (moe_router + experts)"))


def _switch_attention(model: nn.Module, ctx: _Context) -> None:
    if not ctx.attentions:
        return
    kinds = {type(m).__name__: m for _, m in ctx.attentions}
    config = getattr(model, "config", None)
    if not ctx.switches["attention"]:
        why = {k: "attention=False" for k in kinds}
    elif config is None or not hasattr(config, "_attn_implementation") or not register_hf_attention():
        why = {k: "attention kept: patch the HF model (with its config)" for k in kinds}
    else:
        why = {k: hf.attention_blocker(m) for k, m in kinds.items()}
    direct = [(n, m) for n, m in ctx.attentions if why.get(type(m).__name__) == "direct"]
    for name, m in direct:  # attention modules that call torch's SDPA themselves (Falcon)
        reason = hf.patch_direct_sdpa(m) if getattr(m, "_fastlm_sdpa", False) is False else None
        if reason is None:
            m._fastlm_sdpa = True
            ctx.report.swapped.append((name, type(m).__name__, "scaled_dot_product_attention -> fastlm (its own call)"))
        else:
            ctx.report.left.append((name, type(m).__name__, reason))
    ctx.attentions = [(n, m) for n, m in ctx.attentions if (n, m) not in direct]
    why = {k: w for k, w in why.items() if w != "direct"}
    if not ctx.attentions:
        return
    blocked = {k: w for k, w in why.items() if w}
    if blocked:  # the attention implementation is one switch for the whole model
        for name, m in ctx.attentions:
            reason = blocked.get(type(m).__name__) or f"attention kept: {'; '.join(sorted(set(blocked.values())))}"
            ctx.report.left.append((name, type(m).__name__, reason))
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("fastlm")
    else:
        config._attn_implementation = "fastlm"
    ctx.report.swapped += [(n, type(m).__name__, "attn_implementation='fastlm'") for n, m in ctx.attentions]


def _is_causal_lm(model) -> bool:
    """An HF decoder-only model with an LM head that generates (GPT2LMHeadModel, *ForCausalLM)."""
    try:
        return (_is_hf(model) and not getattr(model.config, "is_encoder_decoder", False) and model.can_generate()
                and model.get_output_embeddings() is not None)
    except (AttributeError, NotImplementedError):
        return False


def _patch_module(model: nn.Module, backend, switches) -> PatchReport:
    ctx = _Context(backend, switches, PatchReport())
    if not model._modules:
        ctx.report.left.append(("", type(model).__name__, "the root module itself: patch its parent"))
        return ctx.report
    _walk(model, "", ctx)
    _switch_attention(model, ctx)
    _switch_experts(model, ctx)
    if _is_causal_lm(model):
        why = hf.patch_loss(model, backend) if switches["loss"] else "loss=False"
        if why is None:
            ctx.report.swapped.append(("", type(model).__name__, "loss -> fastlm linear_cross_entropy (training) / "
                                                                 "cross_entropy (eval)"))
        else:
            ctx.report.left.append(("", type(model).__name__, f"loss kept: {why}"))
    model._fastlm_report = ctx.report
    return ctx.report


# ---------------------------------------------------------------- patching a class before it is built
def _resolve(target):
    """A model class, a transformers class name, or a model type ("llama") -> the classes to hook."""
    if isinstance(target, type):
        return [target]
    import transformers

    if hasattr(transformers, target) and isinstance(getattr(transformers, target), type):
        return [getattr(transformers, target)]
    try:
        import importlib

        module = importlib.import_module(f"transformers.models.{target}.modeling_{target}")
    except ImportError:
        raise ValueError(f"patch: {target!r} is neither a transformers class name nor a model type") from None
    bases = [c for c in vars(module).values() if isinstance(c, type) and c.__name__.endswith("PreTrainedModel")
             and c.__module__ == module.__name__]
    if not bases:
        raise ValueError(f"patch: no PreTrainedModel class in transformers.models.{target}")
    return bases


def _hook_class(cls, backend, switches) -> None:
    """Patch every instance of `cls` at the end of its construction (HF's post_init)."""
    original = cls.post_init if hasattr(cls, "post_init") else None

    def post_init(self, *args, **kwargs):
        if original is not None:
            original(self, *args, **kwargs)
        _patch_module(self, backend, switches)

    if original is None:
        init = cls.__init__

        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)
            _patch_module(self, backend, switches)
        cls.__init__ = __init__
    else:
        cls.post_init = post_init


def patch(model, *, backend: str | None = None, rope: bool = True, norm: bool = True, mlp: bool = True,
          attention: bool = True, loss: bool = True):
    """Swap `model`'s layers for fastlm ones in place (see the module docstring); `backend`
    pins a backend on every swapped module. Returns a PatchReport. Given a model class, a
    transformers class name or a model type instead, patches every such model built from now on
    (its report is then `model._fastlm_report`) and returns None."""
    backend = check_backend(backend)
    switches = dict(rope=rope, norm=norm, mlp=mlp, attention=attention, loss=loss)
    for name, value in switches.items():
        if not isinstance(value, bool):
            raise TypeError(f"patch: {name} must be True or False, got {value!r}")
    if isinstance(model, (type, str)):
        if isinstance(model, type) and not issubclass(model, nn.Module):
            raise TypeError(f"patch: a class to patch must be a torch.nn.Module subclass, got {model.__name__}")
        for cls in _resolve(model):
            _hook_class(cls, backend, switches)
        return None
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, a model class or name, got {type(model).__name__}")
    return _patch_module(model, backend, switches)


unpatch_moe = moe.unpatch_moe

__all__ = ["patch", "PatchReport", "register_hf_attention", "hf_attention", "TWINS", "unpatch_moe"]
