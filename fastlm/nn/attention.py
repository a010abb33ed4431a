"""MultiheadAttention and TransformerEncoderLayer twins on fastlm attention, linear and norms.

The fused path runs when attention weights aren't asked for. torch's own path (the
reference) serves, unchanged: need_weights=True (torch's default: pass need_weights=False to
get the fused path), kdim/vdim different from embed_dim, add_bias_kv and add_zero_attn.
One deliberate difference: a query row whose keys are all masked gives 0 here (torch gives NaN).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastlm import ops
from fastlm.nn._base import FastModule, activation_name, check_backend
from fastlm.nn.modules import LayerNorm, Linear


class MultiheadAttention(FastModule, nn.MultiheadAttention):
    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *, backend=None):
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device, dtype)
        self.backend = check_backend(backend)

    def reference_reasons(self, need_weights: bool) -> list[str]:
        """Why a call takes torch's path instead of the fused one ([] = fused)."""
        reasons = []
        if need_weights:
            reasons.append("need_weights=True (the fused kernel never forms the attention matrix)")
        if not self._qkv_same_embed_dim:
            reasons.append("kdim/vdim differ from embed_dim")
        if self.bias_k is not None:
            reasons.append("add_bias_kv=True")
        if self.add_zero_attn:
            reasons.append("add_zero_attn=True")
        return reasons

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if self.reference_reasons(need_weights):
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        with self._pin():
            return self._fused(query, key, value, key_padding_mask, attn_mask, is_causal), None

    def _fused(self, query, key, value, key_padding_mask, attn_mask, is_causal):
        same = query is key and key is value
        batched = query.dim() == 3
        if not batched:  # (L, E) -> (1, L, E); key_padding_mask (S,) -> (1, S)
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, L, E = query.shape
        S, H = key.shape[1], self.num_heads
        D = E // H
        w, b = self.in_proj_weight, self.in_proj_bias
        if same:  # self-attention: one GEMM for q, k, v
            q, k, v = ops.linear(query, w, b).split(E, dim=-1)  # (B, L, 3E) -> 3 x (B, L, E)
        else:
            wq, wk, wv = w.chunk(3)
            bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
            q, k, v = ops.linear(query, wq, bq), ops.linear(key, wk, bk), ops.linear(value, wv, bv)
        q = q.unflatten(-1, (H, D)).transpose(1, 2)  # (B, L, E) -> (B, H, L, D)
        k = k.unflatten(-1, (H, D)).transpose(1, 2)  # (B, S, E) -> (B, H, S, D)
        v = v.unflatten(-1, (H, D)).transpose(1, 2)  # (B, S, E) -> (B, H, S, D)
        mask, causal = self._merge_masks(attn_mask, key_padding_mask, is_causal, B, L, S, q.dtype)
        o = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        o = o.transpose(1, 2).reshape(B, L, E)  # (B, H, L, D) -> (B, L, E)
        out = ops.linear(o, self.out_proj.weight, self.out_proj.bias)  # (B, L, E)
        if not batched:
            return out.squeeze(0)  # (1, L, E) -> (L, E)
        return out if self.batch_first else out.transpose(0, 1)  # (B, L, E) -> (L, B, E)

    def _merge_masks(self, attn_mask, key_padding_mask, is_causal, B, L, S, dtype):
        """torch's MHA masks (True = masked out, or additive) as one additive (B|1, H|1, L, S)
        mask, or is_causal, as F.multi_head_attention_forward does for its SDPA call."""
        if is_causal and attn_mask is None:
            raise RuntimeError("MultiheadAttention: is_causal=True needs attn_mask (a hint that it is causal)")
        if is_causal and key_padding_mask is None:
            return None, True
        mask = None
        if attn_mask is not None:
            mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                     target_type=dtype, check_other=False)
            # (L, S) -> (1, 1, L, S); (B*H, L, S) -> (B, H, L, S)
            mask = mask.view(1, 1, L, S) if mask.dim() == 2 else mask.view(B, self.num_heads, L, S)
        if key_padding_mask is not None:
            kpm = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask", other_type=None,
                                    other_name="", target_type=dtype, check_other=False)
            kpm = kpm.view(B, 1, 1, S)  # (B, S) -> (B, 1, 1, S)
            mask = kpm if mask is None else mask + kpm
        return mask, False

    def extra_repr(self):
        return self._backend_repr().lstrip(", ")


class TransformerEncoderLayer(FastModule, nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer with fastlm attention, linear (activation fused into linear1
    when it is relu or gelu) and layer norms (residual add fused in the post-norm form).
    torch's nested-tensor fast path is never taken: every call runs on fastlm ops."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation=F.relu, layer_norm_eps=1e-5,
                 batch_first=False, norm_first=False, bias=True, device=None, dtype=None, *, backend=None):
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first,
                         norm_first, bias, device, dtype)
        self.backend = check_backend(backend)
        self._fastlm_adopt()

    def _fastlm_adopt(self):
        """Swap the torch sublayers for fastlm twins sharing their parameters (same keys)."""
        kw = dict(backend=self.backend)
        self.self_attn = MultiheadAttention.from_torch(self.self_attn, **kw)
        act = activation_name(self.activation)
        self.linear1 = Linear.from_torch(self.linear1, activation=act, **kw)
        self.linear2 = Linear.from_torch(self.linear2, **kw)
        self.norm1 = LayerNorm.from_torch(self.norm1, **kw)
        self.norm2 = LayerNorm.from_torch(self.norm2, **kw)

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        x = src
        if self.norm_first:
            a = self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            h, x = self.norm2(a, residual=x)  # h = norm2(x + a), x = x + a: one pass
            return self._ff_block(h, residual=x)
        x, _ = self.norm1(self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal), residual=x)
        x, _ = self.norm2(self._ff_block(x), residual=x)
        return x

    def _ff_block(self, x, residual=None):
        h = self.linear1(x)  # activation fused when linear1.activation is set
        if self.linear1.activation is None:
            h = self.activation(h)
        h = self.dropout(h)
        if residual is not None and not (self.training and self.dropout2.p > 0):
            return self.linear2(h, residual=residual)  # residual + linear2(h), one pass
        out = self.dropout2(self.linear2(h))
        return out if residual is None else residual + out
