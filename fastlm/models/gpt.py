"""A GPT-2-class decoder built from fastlm.nn modules and fastlm.ops (nanoGPT / gpt-fast style).

    model = GPT(GPTConfig.preset("gpt2"))              # or GPT.from_hf(hf_model_or_folder)
    logits, _ = model(idx)                             # idx (B, T) int64 -> logits (B, T, V)
    _, loss = model(idx, targets)                      # fused linear + cross-entropy, no logits formed
    out = model.generate(idx, 32, temperature=0)       # greedy, with a KV cache
    with fastlm.use_backend("reference"): ...          # the whole model on the reference path

GPT-2 blocks by default (learned positions, LayerNorm, GELU MLP, tied embeddings); LLaMA-style
options: norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_head < n_head (GQA); moe=MoEConfig(...)
makes every block's MLP a sparse mixture of experts (fastlm.nn.MoE, Mixtral's layout). Module and
parameter names follow HF GPT-2 (transformer.h.0.attn.c_attn.weight, ...), with nn.Linear's
(out, in) weight layout, so loading HF weights is a rename-free transpose of the Conv1D ones.
The token embedding lookup, RoPE rotation and dropout are plain torch glue; every matmul,
norm, attention and the loss run on fastlm ops.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

import fastlm.nn as fnn
from fastlm import ops
from fastlm.backend import use_backend
from fastlm.nn._base import ACTIVATIONS, check_backend
from fastlm.nn.moe import Experts

PRESETS = {
    # GPT-2 family: (n_layer, n_head, n_embd)
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    # small sizes for tests and CPU training (byte-level vocabulary)
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=256),
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=256),
    "llama-tiny": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=128, vocab_size=256,
                       norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False),
    # llama-tiny with Mixtral's sparse MLP: 8 SwiGLU experts of hidden_size 128, top-2, dropless
    "moe-tiny": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=128, vocab_size=256,
                     norm="rmsnorm", mlp="swiglu", hidden_size=128, pos="rope", bias=False, tie_embeddings=False,
                     moe=dict(num_experts=8, top_k=2)),
}


@dataclass
class MoEConfig:
    """Every block's MLP as a fastlm.nn.MoE of num_experts experts of the config's hidden_size,
    each an MLP of the config's kind (mlp="swiglu": SwiGLU experts; "mlp": the config's activation).
    See fastlm.nn.MoE for the options; normalize=None is the router's own (topk: renormalised)."""
    num_experts: int = 8
    top_k: int = 2
    router: str = "topk"  # "topk" | "switch" (top_k=1)
    score: str = "softmax"  # "softmax" | "sigmoid"
    normalize: bool | None = None
    capacity_factor: float | None = None  # None: dropless
    aux_loss_coef: float = 0.01  # Switch load balancing, per layer, summed into the training loss
    z_loss_coef: float = 0.0  # ST-MoE router z-loss
    jitter: float = 0.0
    shared_expert_size: int | None = None  # Qwen2-MoE's gated shared expert of this width


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # longest sequence (learned positions, KV cache)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None  # None: n_head; fewer: grouped-query attention
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "mlp"  # "mlp" (Linear -> activation -> Linear) | "swiglu"
    activation: str = "gelu_tanh"  # GPT-2's "gelu_new"; "gelu", "relu", "silu"
    hidden_size: int | None = None  # MLP width; None: 4*n_embd (mlp), 8/3*n_embd rounded up to 64 (swiglu)
    pos: str = "learned"  # "learned" | "rope"
    rope_theta: float = 10000.0
    bias: bool = True
    dropout: float = 0.0
    tie_embeddings: bool = True
    moe: MoEConfig | None = None  # a dict is taken as MoEConfig's fields (presets, checkpoints' asdict)

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must divide by n_head ({self.n_head}) "
                             f"and n_head by n_kv_head ({self.n_kv_head})")
        for field, allowed in (("norm", ("layernorm", "rmsnorm")), ("mlp", ("mlp", "swiglu")),
                               ("pos", ("learned", "rope")), ("activation", ACTIVATIONS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"GPTConfig: {field} must be one of {', '.join(allowed)}; got {getattr(self, field)!r}")
        if self.hidden_size is None:
            self.hidden_size = 4 * self.n_embd if self.mlp == "mlp" else 64 * math.ceil(8 * self.n_embd / 3 / 64)

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"GPTConfig.preset: unknown name {name!r}; expected one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _norm(c: GPTConfig) -> nn.Module:
    if c.norm == "rmsnorm":
        return fnn.RMSNorm(c.n_embd, eps=c.norm_eps)
    return fnn.LayerNorm(c.n_embd, eps=c.norm_eps, bias=c.bias)


def _project(linear: fnn.Linear, h, residual, dropout: float, training: bool):
    """residual + dropout(linear(h)); the add is fused into the GEMM when dropout is off."""
    if dropout and training:
        return residual + F.dropout(linear(h), dropout, training)
    return linear(h, residual=residual)


def rope_tables(c: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (block_size, head_dim) in HF's rotate-half layout (each frequency in both
    halves), computed in fp64 and stored in fp32; ops.rope reads one value per pair."""
    inv = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim)
    angles = torch.outer(torch.arange(c.block_size, dtype=torch.float64), inv)  # (T, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, D/2) -> (T, D)
    return angles.cos().float(), angles.sin().float()


class KVCache:
    """Keys and values of every layer, preallocated: (B, n_kv_head, max_len, head_dim) each."""

    def __init__(self, c: GPTConfig, batch: int, max_len: int, device, dtype):
        shape = (c.n_layer, batch, c.n_kv_head, max_len, c.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, Hkv, T, D) at positions pos..pos+T; return the keys and values of
        positions 0..pos+T as (B, Hkv, pos+T, D) views."""
        end = pos + k.shape[2]
        self.k[layer, :, :, pos:end] = k
        self.v[layer, :, :, pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class PagedKVCache:
    """Keys and values of every layer in fixed-size pages, vLLM style: (n_layer, pages, page_size,
    Hkv, D) each; sequence b owns the pages block_table[b] and holds seqlens[b] tokens. Sequences
    of different lengths share one pool, and each decode step appends in place."""

    def __init__(self, c: GPTConfig, batch: int, max_len: int, page_size: int, device, dtype):
        per_seq = -(-max_len // page_size)  # pages per sequence, rounded up
        shape = (c.n_layer, batch * per_seq, page_size, c.n_kv_head, c.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_table = torch.arange(batch * per_seq, device=device, dtype=torch.int32).view(batch, per_seq)
        self.seqlens = torch.zeros(batch, device=device, dtype=torch.int32)

    def write(self, layer: int, seq: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store rows k, v (N, Hkv, D) of sequences seq (N,) at positions pos (N,)."""
        page_size = self.k.shape[2]
        page = self.block_table[seq, pos // page_size].long()
        self.k[layer, page, pos % page_size] = k
        self.v[layer, page, pos % page_size] = v


class CausalSelfAttention(nn.Module):
    def __init__(self, c: GPTConfig, layer: int):
        super().__init__()
        self.c, self.layer = c, layer
        self.c_attn = fnn.Linear(c.n_embd, (c.n_head + 2 * c.n_kv_head) * c.head_dim, bias=c.bias)
        self.c_proj = fnn.Linear(c.n_head * c.head_dim, c.n_embd, bias=c.bias)

    def forward(self, x, residual, pos: int = 0, cache: KVCache | None = None, rope=None, packed=None):
        c = self.c
        B, T, _ = x.shape
        H, Hkv, D = c.n_head, c.n_kv_head, c.head_dim
        q, k, v = self.c_attn(x).split([H * D, Hkv * D, Hkv * D], dim=-1)  # (B, T, (H+2Hkv)*D) -> q, k, v
        if packed is not None or isinstance(cache, PagedKVCache):
            return self._unpadded(q, k, v, residual, rope, cache, packed)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, T, H*D) -> (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)  # (B, T, Hkv*D) -> (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)  # (B, T, Hkv*D) -> (B, Hkv, T, D)
        if rope is not None:  # q and k rotated in one pass, fp32 math (LLaMA's rotate-half layout)
            q, k = ops.rope(q, k, rope[0], rope[1])  # tables (T, D)
        if cache is not None:
            k, v = cache.update(self.layer, pos, k, v)  # (B, Hkv, pos+T, D): a decode step has T = 1
        # one query (a decode step) sees every cached key: no mask, the decode path. T > 1 queries
        # after a cached prefix need causality aligned bottom-right (is_causal is top-left, as torch's)
        mask, causal = None, T > 1
        if T > 1 and k.shape[2] > T:
            mask, causal = causal_lower_right(T, k.shape[2]), False
        y = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=Hkv != H,
                                             dropout_p=c.dropout if self.training else 0.0)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, H, T, D) -> (B, T, H*D)
        return _project(self.c_proj, y, residual, c.dropout, self.training)

    def _unpadded(self, q, k, v, residual, rope, cache, packed):
        """Documents end to end (packed: varlen attention, each attends only within itself), or
        sequences each at its own length in a paged cache (decode attention). q, k, v stay in the
        (B, T, h*D) layout the projection gives them, viewed as (N, T', h, D): no transposes, no copies."""
        c, (B, T, _) = self.c, q.shape
        H, Hkv, D = c.n_head, c.n_kv_head, c.head_dim
        n, t = (1, B * T) if packed is not None else (B, T)  # packed: one stream of B*T tokens
        q, k, v = q.view(n, t, H, D), k.view(n, t, Hkv, D), v.view(n, t, Hkv, D)
        if rope is not None:  # each token at its own position: tables (B, T, D)
            q, k = ops.rope(q, k, rope[0].view(n, t, D), rope[1].view(n, t, D), heads_dim=2)
        if packed is None:  # one decode step per sequence; k, v appended to its pages in place
            y = ops.decode_attention(q, cache.k[self.layer], cache.v[self.layer], cache.seqlens,
                                     block_table=cache.block_table, k=k, v=v)  # (B, T, H, D)
        else:
            if self.training and c.dropout > 0:
                raise ValueError(f"GPT: packed (cu_seqlens) training has no attention dropout (varlen_attention "
                                 f"takes none yet), but the config has dropout={c.dropout}")
            cu, longest, seq, positions = packed
            q, k, v = q[0], k[0], v[0]  # (1, B*T, h, D) -> (B*T, h, D)
            if isinstance(cache, PagedKVCache):  # a batched prefill: every prompt's keys go to its pages
                cache.write(self.layer, seq, positions.flatten(), k, v)
            y = ops.varlen_attention(q, k, v, cu, cu, longest, longest, is_causal=True)  # (B*T, H, D)
        return _project(self.c_proj, y.reshape(B, T, H * D), residual, c.dropout, self.training)


class MLP(nn.Module):
    """GPT-2 MLP: c_fc with the activation fused into its GEMM, then c_proj with the residual fused."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.c = c
        self.c_fc = fnn.Linear(c.n_embd, c.hidden_size, bias=c.bias, activation=c.activation)
        self.c_proj = fnn.Linear(c.hidden_size, c.n_embd, bias=c.bias)

    def forward(self, x, residual):
        return _project(self.c_proj, self.c_fc(x), residual, self.c.dropout, self.training)


class SwiGLU(nn.Module):
    """LLaMA MLP: down(silu(gate(x)) * up(x)), the silu fused into the gate GEMM."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.c = c
        self.gate_proj = fnn.Linear(c.n_embd, c.hidden_size, bias=c.bias, activation="silu")
        self.up_proj = fnn.Linear(c.n_embd, c.hidden_size, bias=c.bias)
        self.down_proj = fnn.Linear(c.hidden_size, c.n_embd, bias=c.bias)

    def forward(self, x, residual):
        h = self.gate_proj(x) * self.up_proj(x)  # (B, T, hidden)
        return _project(self.down_proj, h, residual, self.c.dropout, self.training)


class MoE(fnn.MoE):
    """fastlm.nn.MoE as a block's MLP: experts shaped like the dense MLP would be, and its output
    dropped out and added to the residual as MLP's (its aux_loss is collected by GPT.forward)."""

    def __init__(self, c: GPTConfig):
        m = c.moe
        super().__init__(c.n_embd, c.hidden_size, m.num_experts, m.top_k,
                         activation="swiglu" if c.mlp == "swiglu" else c.activation, router=m.router, score=m.score,
                         normalize=m.normalize, capacity_factor=m.capacity_factor, aux_loss_coef=m.aux_loss_coef,
                         z_loss_coef=m.z_loss_coef, jitter=m.jitter, shared_expert_size=m.shared_expert_size)
        self.c = c

    def forward(self, x, residual):
        return _project(super().forward, x, residual, self.c.dropout, self.training)


class Block(nn.Module):
    def __init__(self, c: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = _norm(c)
        self.attn = CausalSelfAttention(c, layer)
        self.ln_2 = _norm(c)
        self.mlp = MoE(c) if c.moe is not None else MLP(c) if c.mlp == "mlp" else SwiGLU(c)

    def forward(self, x, pos: int = 0, cache: KVCache | None = None, rope=None, packed=None):
        x = self.attn(self.ln_1(x), residual=x, pos=pos, cache=cache, rope=rope, packed=packed)
        return self.mlp(self.ln_2(x), residual=x)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, *, backend: str | None = None):
        super().__init__()
        c = self.config = config
        self.backend = check_backend(backend)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd),
            h=nn.ModuleList(Block(c, i) for i in range(c.n_layer)),
            ln_f=_norm(c),
        ))
        if c.pos == "learned":
            self.transformer["wpe"] = nn.Embedding(c.block_size, c.n_embd)
        else:
            cos, sin = rope_tables(c)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = fnn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith(("c_proj.weight", "down_proj.weight", "experts.down_proj")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, Experts):  # stacked expert weights: each expert as a Linear
            nn.init.normal_(m.gate_up_proj, mean=0.0, std=0.02)
            nn.init.normal_(m.down_proj, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def moe_layers(self) -> list[MoE]:
        return [block.mlp for block in self.transformer.h if isinstance(block.mlp, MoE)]

    def aux_loss(self) -> torch.Tensor:
        """The MoE layers' aux losses of the last forward, summed (differentiable); 0 without MoE."""
        return sum((m.aux_loss for m in self.moe_layers()), torch.zeros((), device=self.lm_head.weight.device))

    def _pin(self):
        return use_backend(self.backend) if self.backend is not None else nullcontext()

    def hidden(self, idx: torch.Tensor, pos: int = 0, cache: KVCache | None = None,
               cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
        """The final normed hidden states (B, T, n_embd) of tokens idx (B, T) at positions pos..;
        with cu_seqlens, idx holds documents end to end (see forward)."""
        c, t = self.config, self.transformer
        B, T = idx.shape
        if pos + T > c.block_size and cu_seqlens is None:
            raise ValueError(f"GPT: sequence of {pos + T} tokens exceeds block_size {c.block_size}")
        positions, packed = torch.arange(pos, pos + T, device=idx.device), None
        if cu_seqlens is not None:
            positions, packed = self._packed_positions(idx, cu_seqlens, max_seqlen)  # (B, T)
        elif isinstance(cache, PagedKVCache):  # each sequence continues from its own length
            positions = cache.seqlens.long().view(B, 1) + torch.arange(T, device=idx.device)  # (B, T)
        x = t.wte(idx)  # (B, T) -> (B, T, C)
        rope = None
        if c.pos == "learned":
            x = x + t.wpe(positions)  # + (T, C) or (B, T, C)
        else:
            rope = (self.rope_cos[positions], self.rope_sin[positions])  # (T, D) or (B, T, D)
        x = F.dropout(x, c.dropout, self.training)
        for block in t.h:
            x = block(x, pos=pos, cache=cache, rope=rope, packed=packed)
        return t.ln_f(x)

    def _packed_positions(self, idx, cu_seqlens, max_seqlen):
        """Each token's position within its document (B, T), and the attention's (cu_seqlens,
        longest) for the B*T tokens taken as one stream."""
        B, T = idx.shape
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or int(cu_seqlens[-1]) != B * T:
            raise ValueError(f"GPT: cu_seqlens must be int32 prefix sums of document lengths ending at B*T = {B * T}, "
                             f"got {cu_seqlens.dtype} {cu_seqlens.tolist()}")
        lengths = cu_seqlens.diff()
        longest = int(lengths.max()) if max_seqlen is None else int(max_seqlen)
        if longest > self.config.block_size:
            raise ValueError(f"GPT: a document of {longest} tokens exceeds block_size {self.config.block_size}")
        seq = torch.arange(len(lengths), device=idx.device).repeat_interleave(lengths.long(), output_size=B * T)
        positions = (torch.arange(B * T, device=idx.device) - cu_seqlens[:-1].long()[seq]).view(B, T)
        return positions, (cu_seqlens, longest, seq, positions)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, ignore_index: int = -100, *,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None):
        """(logits (B, T, V), None) without targets; (None, mean loss) with targets (B, T): the
        loss comes from the fused linear + cross-entropy, which never forms the logits.
        With MoE blocks the returned loss is that LM loss plus every layer's aux_loss (the one to
        backpropagate); the LM loss alone is kept, detached, as `model.lm_loss`.
        cu_seqlens (int32 (n + 1,), FlashAttention's): the B*T tokens of idx, read row after row,
        are n documents end to end; each attends only within itself and restarts its positions at
        0 (packed training: no padding, no cross-document attention; varlen_attention)."""
        with self._pin():
            x = self.hidden(idx, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
            if targets is None:
                return self.lm_head(x), None
            B, T, C = x.shape
            loss = ops.linear_cross_entropy(x.reshape(B * T, C), self.lm_head.weight,  # (B, T, C) -> (B*T, C)
                                            targets.reshape(B * T), ignore_index=ignore_index)  # (B, T) -> (B*T,)
            self.lm_loss = loss.detach()
            return None, (loss + self.aux_loss()) if self.config.moe is not None else loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, *, use_cache: bool = True, generator: torch.Generator | None = None):
        """Append max_new_tokens sampled tokens to idx (B, T). temperature=0 is greedy (argmax).
        With use_cache (the default) the prompt is run once and each new token is one decode step
        (one query against the KV cache); without it every step reruns the whole (cropped) context."""
        if max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        was_training = self.training
        self.eval()
        try:
            with self._pin():
                if use_cache:
                    return self._generate_cached(idx, max_new_tokens, temperature, top_k, top_p, generator)
                for _ in range(max_new_tokens):
                    ctx = idx[:, -self.config.block_size:]  # (B, <= block_size)
                    logits = self.lm_head(self.hidden(ctx)[:, -1])  # (B, C) -> (B, V)
                    idx = torch.cat([idx, sample(logits, temperature, top_k, top_p, generator)], dim=1)
                return idx
        finally:
            self.train(was_training)

    @torch.no_grad()
    def generate_batch(self, prompts: list[torch.Tensor], max_new_tokens: int, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None, *, page_size: int = 16,
                       generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Prompts of different lengths generated together, with no padding anywhere: one packed
        prefill (varlen attention) writes every prompt's keys to a paged KV cache, then each step
        decodes all sequences at once, each at its own position (paged decode attention)."""
        lengths = [int(p.numel()) for p in prompts]
        if not prompts or min(lengths) < 1 or max(lengths) + max_new_tokens > self.config.block_size:
            raise ValueError(f"generate_batch: needs non-empty prompts with length + max_new_tokens <= block_size "
                             f"{self.config.block_size}, got lengths {lengths} and max_new_tokens {max_new_tokens}")
        was_training = self.training
        self.eval()
        try:
            with self._pin():
                device = prompts[0].device
                cache = PagedKVCache(self.config, len(prompts), max(lengths) + max_new_tokens, page_size, device,
                                     self.lm_head.weight.dtype)
                cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
                x = self.hidden(torch.cat([p.flatten() for p in prompts]).view(1, -1), cache=cache, cu_seqlens=cu)
                cache.seqlens += torch.tensor(lengths, device=device, dtype=torch.int32)
                logits = self.lm_head(x[0, cu[1:].long() - 1])  # each prompt's last token: (B, C) -> (B, V)
                new = []
                for step in range(max_new_tokens):
                    new.append(sample(logits, temperature, top_k, top_p, generator))  # (B, 1)
                    if step + 1 < max_new_tokens:
                        logits = self.lm_head(self.hidden(new[-1], cache=cache)[:, -1])  # (B, 1, C) -> (B, V)
                        cache.seqlens += 1
                tokens = torch.cat(new, 1) if new else torch.empty(len(prompts), 0, dtype=torch.long, device=device)
                return [torch.cat([p.flatten(), t]) for p, t in zip(prompts, tokens)]
        finally:
            self.train(was_training)

    def _generate_cached(self, idx, max_new_tokens, temperature, top_k, top_p, generator):
        B, T = idx.shape
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"generate: prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds block_size "
                             f"{self.config.block_size}; use_cache=False crops the context instead")
        cache = KVCache(self.config, B, T + max_new_tokens, idx.device, self.lm_head.weight.dtype)
        step, pos = idx, 0
        for _ in range(max_new_tokens):
            logits = self.lm_head(self.hidden(step, pos=pos, cache=cache)[:, -1])  # (B, C) -> (B, V)
            pos += step.shape[1]
            step = sample(logits, temperature, top_k, top_p, generator)  # (B, 1)
            idx = torch.cat([idx, step], dim=1)
        return idx

    @classmethod
    def from_hf(cls, source, *, config: GPTConfig | None = None, dtype: torch.dtype = torch.float32,
                backend: str | None = None) -> "GPT":
        """A GPT with HF GPT-2 weights; see fastlm.models.hf.load_gpt2 for the accepted sources."""
        from fastlm.models.hf import load_gpt2

        cfg, state = load_gpt2(source, config)
        model = cls(cfg, backend=backend)
        model.load_state_dict(state, strict=False)  # lm_head.weight is tied to wte
        missing = set(model.state_dict()) - set(state) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
        if missing:
            raise ValueError(f"GPT.from_hf: the source has no weights for {sorted(missing)}")
        return model.to(dtype)


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits (B, V) -> (B, 1): greedy at temperature 0, else softmax
    sampling restricted to the top_k tokens and to the smallest set whose mass reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V) each
        probs = ops.softmax(sorted_logits, -1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep tokens until the mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = ops.softmax(logits, -1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator)  # (B, 1)


__all__ = ["GPT", "GPTConfig", "KVCache", "MoEConfig", "PRESETS", "sample"]
