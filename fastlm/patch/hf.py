"""Hugging Face transformers glue: GPT-2's Conv1D MLP, the "fastlm" attention entry, rotary
embeddings onto fastlm.ops.rope, and a causal LM's loss onto linear_cross_entropy.

Rotary embeddings. HF attention modules call their modeling file's module-level
`apply_rotary_pos_emb(q, k, cos, sin, ...)`. The patched module gets, as an instance attribute,
a copy of its class's forward whose globals bind that name to fastlm's rope (the decorator chain
is copied too). So only patched instances change, nothing global is mutated, and torch.compile
traces a plain function. The layout (rotate-half or interleaved) is found by probing HF's
function against fastlm's on random tensors.

Loss. A causal LM's forward is wrapped (per instance): with labels in training mode, the LM head
records its input instead of forming the (B*T, V) logits, and the loss is fastlm's
linear_cross_entropy over the hidden states with HF's shift, ignore_index, num_items_in_batch
and shift_labels semantics (logits=None in the output, as Liger-Kernel's fused loss does). In
eval mode, or where the forward post-processes its logits (Gemma-2's final softcap), the logits
are formed and the loss is fastlm's cross_entropy over them.
"""
from __future__ import annotations

import ast
import functools
import inspect
import math
import sys
import textwrap
import types

import torch
from torch import nn

from fastlm import ops
from fastlm.patch import moe
from fastlm.patch.recognise import on_cpu

# kwargs transformers may pass to an attention function that change its math; refused unless None
MATH_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "head_mask", "alibi",
               "attention_chunk_size")


# ---------------------------------------------------------------- GPT-2
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


# ---------------------------------------------------------------- attention
def hf_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' AttentionInterface entry "fastlm": query (B, H, Tq, D), key/value
    (B, Hkv, Tk, D), attention_mask None or (B|1, 1|H, Tq, Tk) bool (True = attend) or additive.
    Returns ((B, Tq, H, D), None), as transformers' sdpa entry does. softcap (None or a float,
    Gemma-2's attn_logit_softcapping) goes to the op; position_bias (T5's relative-position
    bias, (B|1, H, Tq, Tk), trainable) joins the mask as an additive term and gets its gradient;
    s_aux (GPT-OSS's per-head sink logits) become the op's sinks, with their gradient;
    sliding_window W (Mistral, Qwen2, Gemma-2, GPT-OSS: key j seen by query i when
    i - W < j <= i) runs as the kernels' window=(W - 1, 0), skipping the key tiles outside it,
    whenever the mask HF built is exactly that band (no padding), else through the mask.
    A kwarg that would change the math and that fastlm does not implement (packed sequences,
    ...) raises instead of being dropped."""
    if kwargs.get("output_attentions"):
        raise ValueError("attn_implementation='fastlm' never forms attention weights; use 'eager' for output_attentions")
    for name in MATH_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"attn_implementation='fastlm' ({type(module).__name__}): {name} is not "
                                      f"supported yet; use attn_implementation='eager' or 'sdpa' for this model")
    Tq, Tk = query.shape[2], key.shape[2]
    window = None
    if kwargs.get("sliding_window") is not None and kwargs["sliding_window"] < Tk:
        window = (int(kwargs["sliding_window"]) - 1, 0)  # bottom-right aligned: also right for a KV cache
        if attention_mask is not None:
            if _is_band(attention_mask, Tq, Tk, window[0]):
                attention_mask = None  # the kernels apply the window themselves, skipping whole tiles
            else:
                window = None  # padding, or a pattern of the model's own: the mask carries the window
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = Tq > 1 and attention_mask is None and is_causal and window is None
    bias = kwargs.get("position_bias")
    if is_causal and Tk > Tq:  # a prefill into an empty static cache: keys past Tq are unwritten
        key, value = key[:, :, :Tq], value[:, :, :Tq]  # (B, Hkv, Tq, D)
        bias = None if bias is None else bias[..., :Tq]
    if bias is not None:  # one additive mask: bias, -inf where the mask (or the causal cut) hides a key
        if attention_mask is not None:
            hidden = ~attention_mask if attention_mask.dtype == torch.bool else None
            bias = bias.masked_fill(hidden, -math.inf) if hidden is not None else bias + attention_mask
        elif is_causal:
            keep = torch.ones(Tq, key.shape[2], dtype=torch.bool, device=query.device).tril()  # top-left, as is_causal
            bias, is_causal = bias.masked_fill(~keep, -math.inf), False
        attention_mask = bias.to(query.dtype)
    out = ops.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                           is_causal=is_causal, scale=scaling,
                                           enable_gqa=query.shape[1] != key.shape[1],
                                           softcap=kwargs.get("softcap") or 0.0, window=window,
                                           sinks=kwargs.get("s_aux", kwargs.get("sinks")))  # (B, H, Tq, D)
    return out.transpose(1, 2).contiguous(), None  # (B, H, Tq, D) -> (B, Tq, H, D)


def _is_band(mask: torch.Tensor, tq: int, tk: int, left: int) -> bool:
    """Whether a (B|1, 1, Tq, Tk) bool mask is exactly the causal band i + Tk - Tq - left <= j <=
    i + Tk - Tq in every batch row (HF's sliding-window mask without padding). One pass over
    the mask, once per forward: every layer gets the same mask tensor, which remembers the answer
    (until it is written to)."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (tq, tk):
        return False
    key = (left, mask._version)
    memo = getattr(mask, "_fastlm_band", None)
    if memo is None or memo[0] != key:
        dist = torch.arange(tk, device=mask.device) - torch.arange(tq, device=mask.device).unsqueeze(-1) - (tk - tq)
        memo = (key, bool(((dist <= 0) & (dist >= -left)).eq(mask).all()))
        mask._fastlm_band = memo
    return memo[1]


def register_hf_attention() -> bool:
    """Register "fastlm" with transformers' attention (and mask) and experts interfaces; False
    without transformers."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register("fastlm", hf_attention)
    moe.register_hf_experts()  # experts_implementation="fastlm" (transformers' ExpertsInterface)
    AttentionMaskInterface.register("fastlm", sdpa_mask)  # boolean masks, skipped when plainly causal
    from transformers import PreTrainedModel
    from transformers.models.falcon import modeling_falcon

    # Falcon looks its attention class up by implementation name before post_init could say why not
    modeling_falcon.FALCON_ATTENTION_CLASSES.setdefault("fastlm", modeling_falcon.FalconAttention)
    if not getattr(PreTrainedModel.post_init, "_fastlm", False):  # once: serve or refuse at build time
        original = PreTrainedModel.post_init

        def post_init(self, *args, **kwargs):
            original(self, *args, **kwargs)
            serve_attention_modules(self)
            moe.serve_experts_modules(self)
        post_init._fastlm = True
        PreTrainedModel.post_init = post_init
    return True


def serve_attention_modules(model) -> None:
    """A model built with attn_implementation="fastlm" whose attention modules run their own code
    (never the AttentionInterface) would silently compute without fastlm, or wrongly: BLOOM's
    eager code gets the mask the "fastlm" entry builds (None when plainly causal) and loses
    causality. So at build time each such module is served (ALiBi attention: BLOOM) or refused
    with a ValueError that names the class and what is missing."""
    if getattr(getattr(model, "config", None), "_attn_implementation", None) != "fastlm":
        return
    for name, m in model.named_modules():
        if not (type(m).__module__.startswith("transformers.") and type(m).__name__.endswith("Attention")
                and any(isinstance(c, nn.Linear) for c in m._modules.values())):
            continue
        if getattr(m, "_fastlm_sdpa", False) or attention_blocker(m) != "direct":
            continue
        why = patch_alibi_attention(m) if "alibi.baddbmm(" in _forward_source(m) else \
            "runs its own attention code instead of transformers' AttentionInterface"
        if why is not None:
            raise ValueError(f"attn_implementation='fastlm': {type(m).__name__} ({name}) {why}; build the model with "
                             f"attn_implementation='sdpa' and call fastlm.patch(model)")
        m._fastlm_sdpa = True


def _forward_source(module) -> str:
    try:
        return inspect.getsource(inspect.unwrap(type(module).forward))
    except (OSError, TypeError):
        return ""


def attention_blocker(module) -> str | None:
    """Why `module` (an HF attention class) can't run on the "fastlm" entry, or None if it can."""
    source = _forward_source(module)
    if "ALL_ATTENTION_FUNCTIONS" not in source:
        return "direct"  # handled per module by patch_direct_sdpa
    return None


class _Namespace:
    """A stand-in for a module (torch, torch.nn, torch.nn.functional) with some names replaced."""

    def __init__(self, target, **overrides):
        self._target, self._overrides = target, overrides

    def __getattr__(self, name):
        return self._overrides[name] if name in self._overrides else getattr(self._target, name)


def _current_forward(module):
    """The forward to copy: an earlier patch's instance copy (rope) if there is one, else the class's."""
    bound = module.__dict__.get("forward")
    return bound.__func__ if isinstance(bound, types.MethodType) else type(module).forward


def patch_direct_sdpa(module) -> str | None:
    """An attention module that calls torch's scaled_dot_product_attention itself (Falcon): its
    forward gets a copy whose `torch` / `F` / `nn` global resolves that one function to fastlm's
    drop-in. Returns why not, or None."""
    source = _forward_source(module)
    if "alibi.baddbmm(" in source:  # BLOOM's eager-only attention: rebuilt on the op with in-kernel ALiBi
        return patch_alibi_attention(module)
    if "scaled_dot_product_attention(" not in source:
        return "calls neither transformers' AttentionInterface nor scaled_dot_product_attention"
    config = getattr(module, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return f"its direct attention path runs only under attn_implementation='sdpa' (the model uses " \
               f"{getattr(config, '_attn_implementation', None)!r})"
    functional = _Namespace(torch.nn.functional, scaled_dot_product_attention=ops.scaled_dot_product_attention)
    for spelled, name, value in (("torch.nn.functional.scaled_dot_product_attention", "torch",
                                  _Namespace(torch, nn=_Namespace(torch.nn, functional=functional))),
                                 ("nn.functional.scaled_dot_product_attention", "nn",
                                  _Namespace(torch.nn, functional=functional)),
                                 ("F.scaled_dot_product_attention", "F", functional)):
        if spelled in source:
            new = _rebind(_current_forward(module), name, value)
            if new is not None:
                module.forward = types.MethodType(new, module)
                return None
    return "calls scaled_dot_product_attention under a name fastlm does not recognise"


def alibi_slopes(heads: int, device=None) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al.; BLOOM's and FlashAttention's): a geometric series
    2^(-8 i / n) over the nearest power of two n <= heads, the rest interleaved from 2n."""
    n = 2 ** math.floor(math.log2(heads))
    # as fp32 powers of an fp32 base, so that the slopes are BLOOM's bit for bit
    powers = [(2.0 ** (-8.0 / n), torch.arange(1, n + 1)),
              (2.0 ** (-4.0 / n), torch.arange(1, 1 + 2 * (heads - n), 2))]
    return torch.cat([torch.pow(torch.tensor(base, dtype=torch.float32), p.to(torch.int32)) for base, p in powers]).to(
        device)


def _alibi_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                   output_attentions=False, **kwargs):
    """BloomAttention.forward on fastlm's op. BLOOM adds slope * (position of key j) to the scores;
    under the softmax that equals the op's -slope * (i - j) (a per-row constant apart), also with
    left padding, whose pads shift every position of a row alike. The alibi tensor HF built is
    not read: the kernels compute the bias from the slopes."""
    if output_attentions:
        raise ValueError("fastlm attention never forms attention weights; use the eager model for output_attentions")
    batch, tq, _ = hidden_states.shape
    q, k, v = self._reshape(self.query_key_value(hidden_states))  # 3 x (B, H, T, D) views
    if layer_past is not None:
        k, v = layer_past.update(k, v, self.layer_idx)
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask.to(q.dtype)
    out = ops.scaled_dot_product_attention(
        q, k, v, attn_mask=attention_mask, dropout_p=self.attention_dropout.p if self.training else 0.0,
        is_causal=attention_mask is None and tq > 1, scale=self.inv_norm_factor,
        alibi_slopes=self._fastlm_alibi_slopes)  # (B, H, Tq, D); no mask: bottom-right for decode
    context = out.transpose(1, 2).reshape(batch, tq, self.hidden_size)  # (B, Tq, H * D)
    if self.pretraining_tp > 1 and self.slow_but_exact:
        raise ValueError("fastlm attention does not reproduce BLOOM's slow_but_exact tensor-parallel slicing")
    out = torch.nn.functional.dropout(self.dense(context), self.hidden_dropout, self.training)
    return residual + out, None


def patch_alibi_attention(module) -> str | None:
    """BLOOM's attention (eager-only HF code that adds a precomputed alibi tensor) served by the op
    with alibi_slopes. Returns why not, or None."""
    needed = ("query_key_value", "dense", "_reshape", "inv_norm_factor", "num_heads", "hidden_size")
    missing = [a for a in needed if not hasattr(module, a)]
    if missing:
        return f"an ALiBi attention fastlm does not know (no {', '.join(missing)})"
    if getattr(module, "beta", 1.0) != 1.0:
        return f"ALiBi scaled by beta={module.beta}"
    # a non-persistent buffer: follows the module's .to(device), stays out of its state_dict
    module.register_buffer("_fastlm_alibi_slopes", alibi_slopes(module.num_heads,
                                                                module.query_key_value.weight.device), persistent=False)
    module.forward = types.MethodType(_alibi_forward, module)
    return None


# ---------------------------------------------------------------- rotary embeddings
ROPE_SIGNATURES = (("q", "k", "cos", "sin", "unsqueeze_dim"), ("q", "k", "cos", "sin", "position_ids", "unsqueeze_dim"))


def _rope_function(interleaved: bool, backend):
    def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        return ops.rope(q, k, cos, sin, interleaved=interleaved, heads_dim=unsqueeze_dim, backend=backend)
    return apply_rotary_pos_emb


def _hf_tables(b, t, rotary, interleaved, g):
    freqs = torch.rand(b, t, rotary // 2, generator=g) * 6  # angles up to 6 rad
    full = freqs.repeat_interleave(2, -1) if interleaved else torch.cat([freqs, freqs], -1)  # (B, T, R)
    return full.cos(), full.sin()


@on_cpu
def rope_layout(original, head_dim: int) -> bool | None:
    """Which fastlm layout `original` (an HF apply_rotary_pos_emb) computes: False rotate-half,
    True interleaved, None neither (probed on random tensors, full and half rotary width)."""
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 4, 5, head_dim, generator=g), torch.randn(2, 2, 5, head_dim, generator=g)
    for interleaved in (False, True):
        cos, sin = _hf_tables(2, 5, head_dim, interleaved, g)
        try:
            with torch.no_grad():
                want = original(q, k, cos, sin)
                got = ops.rope(q, k, cos, sin, interleaved=interleaved, backend="reference")
        except Exception:
            continue
        if all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(want, got)):
            return interleaved
    return None


def _rebind(fn, name: str, value):
    """A copy of `fn` (and of the functools.wraps chain under it) in which the global `name` is
    `value`; `fn` itself is untouched. None when no function in the chain reads that global."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is not None and fn.__closure__:
        new_inner = _rebind(inner, name, value)
        if new_inner is None:
            return None
        cells = []
        for cell in fn.__closure__:
            try:
                cells.append(types.CellType(new_inner) if cell.cell_contents is inner else cell)
            except ValueError:  # an empty cell
                cells.append(cell)
        new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, tuple(cells))
        new.__dict__.update(fn.__dict__)
        new.__wrapped__ = new_inner
    elif name in fn.__code__.co_names:
        new = types.FunctionType(fn.__code__, {**fn.__globals__, name: value}, fn.__name__, fn.__defaults__,
                                 fn.__closure__)
        new.__dict__.update(fn.__dict__)
    else:
        return None
    new.__kwdefaults__, new.__qualname__, new.__doc__ = fn.__kwdefaults__, fn.__qualname__, fn.__doc__
    return new


def patch_rope(module: nn.Module, backend) -> str | None:
    """Route `module`'s rotary embedding through fastlm.ops.rope; returns why not, or None."""
    forward = _current_forward(module)
    original = sys.modules[type(module).__module__].__dict__.get("apply_rotary_pos_emb")
    if original is None or "apply_rotary_pos_emb" not in _forward_source(module):
        return "no apply_rotary_pos_emb in its forward"
    params = tuple(inspect.signature(original).parameters)
    if params not in ROPE_SIGNATURES:
        return f"apply_rotary_pos_emb{params} has an unknown signature"
    head_dim = getattr(module, "head_dim", None) or 16
    interleaved = rope_layout(original, head_dim)
    if interleaved is None:
        return "apply_rotary_pos_emb computes neither the rotate-half nor the interleaved rotation (probe mismatch)"
    new = _rebind(forward, "apply_rotary_pos_emb", _rope_function(interleaved, backend))
    if new is None:
        return "its forward reads apply_rotary_pos_emb from somewhere other than its module"
    module.forward = types.MethodType(new, module)
    module._fastlm_rope = "interleaved" if interleaved else "rotate-half"
    return None


# ---------------------------------------------------------------- the causal-LM loss
class LMHead(nn.Module):
    """The LM head on fastlm linear, sharing the original weight (ties stay tied). While
    `capture` is a list, forward records its input there and returns empty logits instead."""

    def __init__(self, head: nn.Module, backend=None):
        super().__init__()
        self.weight, self.bias, self.backend, self.capture = head.weight, head.bias, backend, None
        self.in_features, self.out_features = head.weight.shape[1], head.weight.shape[0]

    def forward(self, x):
        if self.capture is not None:
            self.capture.append(x)
            return x.new_empty(*x.shape[:-1], 0)  # never read: the wrapper replaces the logits
        return ops.linear(x, self.weight, self.bias, backend=self.backend)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _post_processes_logits(model) -> bool:
    """Does the forward change `logits` after the LM head (Gemma-2's final softcap, a cast)?"""
    try:
        tree = ast.parse(textwrap.dedent(_forward_source(model)))
    except SyntaxError:
        return True
    stores = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.ctx.__class__ is ast.Store
              and n.id in ("logits", "lm_logits")]
    return len(stores) > 1


def _shifted_targets(labels, kwargs, ignore_index):
    shift = kwargs.get("shift_labels")
    if shift is None:
        shift = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # (B, T): token t predicts t+1
    return shift.reshape(-1)


def _reduce(loss_sum_or_mean, kwargs):
    n = kwargs.get("num_items_in_batch")
    if n is None:
        return loss_sum_or_mean
    return loss_sum_or_mean / (n.to(loss_sum_or_mean.device) if torch.is_tensor(n) else n)


def _loss_forward(self, *args, labels=None, **kwargs):
    spec = self._fastlm_loss
    if labels is None:
        return type(self).forward(self, *args, **kwargs)
    head = getattr(self, spec["head"])
    ignore = kwargs.get("ignore_index", -100)
    reduction = "sum" if kwargs.get("num_items_in_batch") is not None else "mean"
    fuse = spec["fusable"] and self.training
    as_tuple = kwargs.pop("return_dict", None) is False
    if fuse:
        head.capture = []
    try:
        out = type(self).forward(self, *args, labels=None, return_dict=True, **kwargs)
    finally:
        captured, head.capture = head.capture, None
    target = _shifted_targets(labels, kwargs, ignore).to(out.logits.device)
    if fuse:
        hidden = captured[-1]  # (B, T, D), the LM head's input
        loss = ops.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, target, head.bias,
                                        ignore_index=ignore, reduction=reduction, backend=spec["backend"])
    else:
        logits = out.logits.float()  # as HF's ForCausalLMLoss
        loss = ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), target, ignore_index=ignore,
                                 reduction=reduction, backend=spec["backend"])
    loss = _reduce(loss.float(), kwargs)
    aux = getattr(out, "aux_loss", None)
    if aux is not None and getattr(self, "router_aux_loss_coef", None) is not None:
        loss = loss + self.router_aux_loss_coef * aux.to(loss.device)  # Mixtral / Qwen-MoE router balance
    fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}  # a ModelOutput lists its non-None fields
    out = type(out)(loss=loss, logits=None if fuse else out.logits, **fields)
    return out.to_tuple() if as_tuple else out


def patch_loss(model: nn.Module, backend) -> str | None:
    """Route a causal LM's loss through fastlm; returns why not, or None."""
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING
    except ImportError:
        return "transformers' loss functions are not importable"
    if getattr(model, "loss_function", None) is not LOSS_MAPPING.get("ForCausalLM"):
        return "not a causal LM loss (ForCausalLMLoss)"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    name = next((n for n, m in model._modules.items() if m is head), None)
    if name is None or not isinstance(getattr(head, "weight", None), torch.Tensor) or head.weight.dim() != 2:
        return "no LM head Linear among the model's direct children"
    if type(head) not in (nn.Linear, LMHead) and not (isinstance(head, nn.Linear) and hasattr(head, "backend")):
        return f"LM head {type(head).__name__} is not a plain Linear"
    if not isinstance(head, LMHead):
        setattr(model, name, LMHead(head, backend))
    model._fastlm_loss = dict(head=name, fusable=not _post_processes_logits(model), backend=backend)
    model.forward = types.MethodType(_wrapped_loss_forward(type(model).forward), model)
    return None


def _wrapped_loss_forward(forward):
    @functools.wraps(forward)
    def wrapper(self, *args, labels=None, **kwargs):
        return _loss_forward(self, *args, labels=labels, **kwargs)
    return wrapper
