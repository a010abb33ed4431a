"""Fused attention, a drop-in for torch.nn.functional.scaled_dot_product_attention.

    fastlm.ops.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
        is_causal=False, *, scale=None, enable_gqa=False, softcap=0.0, generator=None, backend=None)
    fastlm.ops.scaled_dot_product_attention_with_lse(...same...) -> (out, lse)

Shapes (B, H, Tq, D) for query, (B, H_kv, Tk, D) for key, (B, H_kv, Tk, Dv) for value; the
output is (B, H, Tq, Dv) and lse (B, H, Tq) fp32 (natural log of each row's softmax
denominator, -inf for a fully masked row). H_kv != H needs enable_gqa=True (query head h
reads key/value head h // (H // H_kv), as torch does). As in torch, B may be any number of
leading batch dims, or none (3-D (H, T, D)); they are folded into one, views, no copies.

Causal alignment: `is_causal=True` is exactly torch's: top-left aligned, query i sees keys
j <= i (torch builds tril(ones(Tq, Tk))). Bottom-right alignment (query i sees j <= i + Tk - Tq,
what decoding with a KV cache needs) is asked for the torch way, by passing
torch.nn.attention.bias.causal_lower_right(Tq, Tk) as attn_mask (causal_upper_left works too).

attn_mask: bool (True = attend) or additive with query's dtype, broadcastable from
(B|1, H|1, Tq, Tk). A row that attends to nothing gives output 0, lse -inf and gradient 0
(torch gives NaN there); keys hidden from every query never touch the output, even if NaN.
attn_mask gets no gradient (an attn_mask that requires grad is refused).

softcap (FlashAttention's, as Gemma-2 and Grok use it): when > 0, each score s = scale * q.k
becomes softcap * tanh(s / softcap) before the mask and the softmax; 0 (the default) is off and
costs nothing (the kernels branch at compile time). The backward multiplies dS by
1 - tanh^2, recomputing the capped scores as it recomputes S. Every backend implements it.

Dropout (reference, cpu and triton; cuda says so and auto-dispatch routes around it): the
keep-mask comes from a seed drawn from `generator` (default: torch's global one), so
torch.manual_seed makes runs reproducible and the backward regenerates the same mask. cpu and
triton draw the same mask (Triton's Philox, tl.rand(seed + b * H + h, i * Tk + j) >= p, which
csrc/cpu/philox.h reproduces bit for bit), so the same seed drops the same entries on both; the
reference draws from a torch.Generator, a different mask for the same seed.

Backends: cpu (fp32/bf16, csrc/cpu/attention*.cpp), triton (fp32/fp16/bf16,
fastlm/triton/attention.py; CUDA tensors, or CPU ones under TRITON_INTERPRET=1), cuda (fp16/bf16 on
tensor cores, csrc/cuda/attention*.cu; head dims to 256, forward and backward), reference (plain PyTorch in fp32, or fp64
for fp64 inputs; the oracle).
"""
from __future__ import annotations

import math

import torch

from fastlm import _ext
from fastlm import backend as _backend

OP = "attention"
CPU_DTYPES = (torch.float32, torch.bfloat16)
CPU_MAX_HEAD_DIM = 256
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_MAX_HEAD_DIM = 256
CUDA_DTYPES = (torch.float16, torch.bfloat16)  # tensor cores only
CUDA_MAX_HEAD_DIM = 256
NO_CAUSAL, TOP_LEFT, BOTTOM_RIGHT = 0, 1, 2


# ---------------------------------------------------------------- reference (the oracle)
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def diagonal_offset(tq: int, tk: int, causal: int) -> int:
    """The diagonal (key j = query i + offset) that causal masks, windows and ALiBi are measured
    from: top-left for torch's is_causal, else bottom-right (FlashAttention's convention)."""
    return 0 if causal == TOP_LEFT else tk - tq


def _distance(tq: int, tk: int, causal: int, device) -> torch.Tensor:
    """(Tq, Tk) int64: j - (i + offset), how far key j is right of query i's diagonal."""
    i = torch.arange(tq, device=device).unsqueeze(-1)
    return torch.arange(tk, device=device) - (i + diagonal_offset(tq, tk, causal))


def allowed_mask(tq: int, tk: int, causal: int, attn_mask: torch.Tensor | None, device,
                 window: tuple[int, int] = (-1, -1)) -> torch.Tensor | None:
    """Bool (.., Tq, Tk) mask of what each query may see (None = everything), masks combined."""
    allowed = None
    left, right = window
    if causal != NO_CAUSAL or left >= 0 or right >= 0:
        dist = _distance(tq, tk, causal, device)
        allowed = torch.ones(tq, tk, dtype=torch.bool, device=device)
        if causal != NO_CAUSAL:
            allowed &= dist <= 0
        if left >= 0:
            allowed &= dist >= -left
        if right >= 0:
            allowed &= dist <= right
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = attn_mask if allowed is None else allowed & attn_mask
    return allowed


def dropout_keep(seed: torch.Tensor, shape, p: float, device) -> torch.Tensor:
    """The keep-mask for dropout, a pure function of the seed (forward and backward agree)."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed.item()))
    return (torch.rand(shape, generator=gen, dtype=torch.float32) >= p).to(device)


def _ref_probs(q, k, mask, causal, scale, softcap=0.0, window=(-1, -1), alibi=None, sinks=None):
    """Probabilities P (0 on masked entries and fully masked rows), lse (-inf there, or the sink)
    and, with softcap > 0, d(capped score)/d(raw score) = 1 - tanh^2 (else None)."""
    cdt = _compute_dtype(q)
    groups = q.shape[1] // k.shape[1]
    qf = q.to(cdt)
    kf = k.to(cdt).repeat_interleave(groups, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * scale
    dcap = None
    if softcap > 0:
        t = torch.tanh(s / softcap)
        s, dcap = t * softcap, 1 - t * t
    if alibi is not None:  # -slope * |distance from the diagonal|, slopes (H,) or (B, H)
        slopes = alibi.to(cdt).reshape(-1 if alibi.dim() == 2 else 1, alibi.shape[-1], 1, 1)
        s = s - slopes * _distance(q.shape[2], k.shape[2], causal, q.device).abs().to(cdt)
    if mask is not None and mask.dtype != torch.bool:
        s = s + mask.to(cdt)
    allowed = allowed_mask(q.shape[2], k.shape[2], causal, mask, q.device, window)
    if allowed is not None:
        s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    if sinks is not None:  # each row's denominator also holds exp(sink of its head)
        lse = torch.logaddexp(lse, sinks.to(cdt).view(1, -1, 1).expand_as(lse))
    p = torch.exp(s - lse.unsqueeze(-1).masked_fill(lse.unsqueeze(-1) == -math.inf, 0.0))
    p = p.masked_fill(s == -math.inf, 0.0)
    return p, lse, dcap


def attention_forward_ref(q, k, v, mask, dropout_p, causal, scale, seed, softcap=0.0, window=(-1, -1), alibi=None,
                          sinks=None):
    """(out, lse fp32): the op's forward on plain PyTorch, computed in fp32 (fp64 for fp64)."""
    cdt = _compute_dtype(q)
    groups = q.shape[1] // k.shape[1]
    p, lse, _ = _ref_probs(q, k, mask, causal, scale, softcap, window, alibi, sinks)
    if dropout_p > 0:
        p = p * dropout_keep(seed, p.shape, dropout_p, p.device) / (1 - dropout_p)
    vf = v.to(cdt).repeat_interleave(groups, dim=1)
    # keys hidden from every query contribute nothing, even where value is NaN (0 * NaN)
    vf = vf.masked_fill((p == 0).all(dim=2).unsqueeze(-1), 0.0)
    out = p @ vf
    return out.to(q.dtype).contiguous(), lse.float().contiguous()


def attention_backward_ref(grad_out, q, k, v, mask, out, lse, dropout_p, causal, scale, seed, softcap=0.0,
                           window=(-1, -1), alibi=None, sinks=None):
    """(grad_q, grad_k, grad_v) by the explicit formulas (no autograd graph)."""
    cdt = _compute_dtype(q)
    b, h, tq, _ = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    groups = h // hkv
    p, _, dcap = _ref_probs(q, k, mask, causal, scale, softcap, window, alibi, sinks)
    dead = (p == 0).all(dim=2).unsqueeze(-1)  # keys no query sees: their rows stay out of the math
    kf = k.to(cdt).repeat_interleave(groups, dim=1).masked_fill(dead, 0.0)
    vf = v.to(cdt).repeat_interleave(groups, dim=1).masked_fill(dead, 0.0)
    go = grad_out.to(cdt)
    pd = p
    if dropout_p > 0:
        keep = dropout_keep(seed, p.shape, dropout_p, p.device) / (1 - dropout_p)
        pd = p * keep
    dv = pd.transpose(-1, -2) @ go
    dp = go @ vf.transpose(-1, -2)
    if dropout_p > 0:
        dp = dp * keep
    delta = (go * (pd @ vf)).sum(-1, keepdim=True)
    ds = p * (dp - delta) if dcap is None else p * (dp - delta) * dcap
    ds = torch.where(p == 0, 0.0, ds)  # hidden: exactly 0, even where a hidden NaN key made dcap NaN
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ q.to(cdt)) * scale
    dk = dk.view(b, hkv, groups, tk, k.shape[-1]).sum(2)
    dv = dv.view(b, hkv, groups, tk, v.shape[-1]).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ---------------------------------------------------------------- per-backend kernels
def _ext_forward(q, k, v, mask, dropout_p, causal, scale, seed, softcap=0.0, window=(-1, -1), alibi=None,
                 sinks=None, ops=torch.ops.fastlm):
    # dropout (cpu kernels only; cuda's why_not routes it away): Triton's Philox keep-mask from the same seed int
    return ops.attention_fwd(q, k, v, mask, causal, scale, softcap, window[0], window[1], alibi, sinks,
                             float(dropout_p), _seed_int(seed))


def _ext_backward(grad_out, q, k, v, mask, out, lse, dropout_p, causal, scale, seed, softcap=0.0, window=(-1, -1),
                  alibi=None, sinks=None, ops=torch.ops.fastlm):
    # sinks need no kernel work here: the forward's lse already holds them
    return ops.attention_bwd(grad_out, q, k, v, mask, out, lse, causal, scale, softcap, window[0], window[1], alibi,
                             float(dropout_p), _seed_int(seed))


def _triton_forward(q, k, v, mask, dropout_p, causal, scale, seed, softcap=0.0, window=(-1, -1), alibi=None,
                    sinks=None):
    from fastlm.triton import attention as kernels  # imported late: TRITON_INTERPRET is read at import

    return kernels.forward(q, k, v, mask, causal, scale, dropout_p, _seed_int(seed), softcap=softcap, window=window,
                           alibi=alibi, sinks=sinks)


def _triton_backward(grad_out, q, k, v, mask, out, lse, dropout_p, causal, scale, seed, softcap=0.0,
                     window=(-1, -1), alibi=None, sinks=None):
    from fastlm.triton import attention as kernels

    return kernels.backward(grad_out, q, k, v, mask, out, lse, causal, scale, dropout_p, _seed_int(seed),
                            softcap=softcap, window=window, alibi=alibi)


def _seed_int(seed: torch.Tensor | None) -> int:
    return 0 if seed is None else int(seed.item()) & 0x7FFFFFFF


_FORWARD = _backend.implementations(
    reference=attention_forward_ref, triton=_triton_forward, cpu=_ext_forward, cuda=_ext_forward
)
_BACKWARD = _backend.implementations(
    reference=attention_backward_ref, triton=_triton_backward, cpu=_ext_backward, cuda=_ext_backward
)


def attention_mask_grad(grad_out, q, k, v, mask, causal, scale, softcap=0.0, window=(-1, -1), alibi=None, sinks=None):
    """d(loss)/d(additive attn_mask) = dS = P (dP - delta), summed over the dims the mask was
    broadcast over (T5's trainable relative-position bias). The kernels never form dS; this
    recomputes P in one plain-PyTorch pass over (B, H, Tq, Tk) in fp32, memory of the size the
    bias itself already has."""
    cdt = _compute_dtype(q)
    groups = q.shape[1] // k.shape[1]
    p, _, _ = _ref_probs(q, k, mask, causal, scale, softcap, window, alibi, sinks)
    dead = (p == 0).all(dim=2).unsqueeze(-1)  # keys no query sees (their values may be NaN)
    vf = v.to(cdt).repeat_interleave(groups, dim=1).masked_fill(dead, 0.0)
    dp = grad_out.to(cdt) @ vf.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))  # delta = P . dP: exact, where dO . O carries O's rounding
    return torch.where(p == 0, 0.0, ds).sum_to_size(mask.shape).to(mask.dtype)


# ---------------------------------------------------------------- custom ops + autograd
@torch.library.custom_op("fastlm::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float,
    causal: int, scale: float, softcap: float, window_left: int, window_right: int, alibi: torch.Tensor | None,
    sinks: torch.Tensor | None, seed: torch.Tensor | None, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _FORWARD[backend](q, k, v, mask, dropout_p, causal, scale, seed, softcap, (window_left, window_right),
                             alibi, sinks)


@_attention_op.register_fake
def _(q, k, v, mask, dropout_p, causal, scale, softcap, window_left, window_right, alibi, sinks, seed, backend):
    b, h, tq, _ = q.shape
    return q.new_empty(b, h, tq, v.shape[-1]), q.new_empty(b, h, tq, dtype=torch.float32)


@torch.library.custom_op("fastlm::attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    out: torch.Tensor, lse: torch.Tensor, dropout_p: float, causal: int, scale: float, softcap: float,
    window_left: int, window_right: int, alibi: torch.Tensor | None, sinks: torch.Tensor | None,
    seed: torch.Tensor | None, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _BACKWARD[backend](grad_out, q, k, v, mask, out, lse, dropout_p, causal, scale, seed, softcap,
                              (window_left, window_right), alibi, sinks)


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, mask, out, lse, dropout_p, causal, scale, softcap, window_left, window_right, alibi, sinks,
      seed, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def attention_sinks_grad(grad_out, out, lse, sinks):
    """d(loss)/d(sinks): a sink only grows row i's denominator, so with its probability
    p_sink = exp(sink - lse_i) and delta_i = dO_i . O_i, d(loss)/d(sink) = -sum_i p_sink * delta_i
    over the batch and query rows of its head. One pass over O and dO, (B, H, Tq) memory."""
    cdt = _compute_dtype(out)
    delta = (grad_out.to(cdt) * out.to(cdt)).sum(-1)  # (B, H, Tq)
    p_sink = torch.exp(sinks.to(cdt).view(1, -1, 1) - lse.to(cdt))
    p_sink = torch.where(lse == -math.inf, 0.0, p_sink)  # a -inf sink on a fully masked row: no mass
    return -(p_sink * delta).sum((0, 2)).to(sinks.dtype)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, dropout_p, causal, scale, softcap, wl, wr, alibi, sinks, seed, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, out, lse, alibi, sinks, seed)
    ctx.args = (dropout_p, causal, scale, softcap, wl, wr, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, mask, out, lse, alibi, sinks, seed = ctx.saved_tensors
    dropout_p, causal, scale, softcap, wl, wr, backend = ctx.args
    dq, dk, dv = _attention_backward_op(grad_out, q, k, v, mask, out, lse, dropout_p, causal, scale, softcap, wl, wr,
                                        alibi, sinks, seed, backend)
    dmask = attention_mask_grad(grad_out, q, k, v, mask, causal, scale, softcap, (wl, wr), alibi, sinks) \
        if ctx.needs_input_grad[3] else None
    dsinks = attention_sinks_grad(grad_out, out, lse, sinks) if ctx.needs_input_grad[11] else None
    return dq, dk, dv, dmask, None, None, None, None, None, None, None, dsinks, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- who can serve what
def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _example(device: torch.device):
    q = torch.empty(1, 2, 16, 64, device=device)
    return (q, q, q, None, 0.0, TOP_LEFT)


@_backend.register(OP, "reference", example=_example)
def _(q, k, v, mask, dropout_p, causal):
    return [] if q.dtype.is_floating_point else [f"dtype {q.dtype} is not floating point"]


def _kernel_reasons(backend, dtypes, max_head_dim, q, v, dropout_p) -> list[str]:
    reasons = []
    if q.dtype not in dtypes:
        names = ", ".join(_name(d) for d in dtypes)
        reasons.append(f"dtype {_name(q.dtype)} not supported by the {backend} backend ({names})")
    for name, d in (("head dim", q.shape[-1]), ("value head dim", v.shape[-1])):
        if d > max_head_dim:
            reasons.append(f"{name} {d} > {max_head_dim} not supported by the {backend} backend")
    if dropout_p > 0:
        reasons.append(f"dropout_p > 0 not supported by the {backend} backend (reference, cpu and triton only)")
    return reasons


def packed_cpu_reasons(q, head_dims, ext_op: str) -> list[str]:
    """Why the cpu kernels of the packed ops (varlen_attention, decode_attention) can't serve."""
    reasons = []
    if q.dtype not in CPU_DTYPES:
        reasons.append(f"dtype {_name(q.dtype)} not supported by the cpu backend (float32, bfloat16)")
    if max(head_dims) > CPU_MAX_HEAD_DIM:
        reasons.append(f"head dims up to {CPU_MAX_HEAD_DIM} on the cpu backend, got {', '.join(map(str, head_dims))}")
    if not hasattr(torch.ops.fastlm, ext_op):
        reasons.append(f"the extension has no {ext_op} (rebuild fastlm)")
    return reasons


@_backend.register(OP, "cpu")
def _(q, k, v, mask, dropout_p, causal):
    return _kernel_reasons("cpu", CPU_DTYPES, CPU_MAX_HEAD_DIM, q, v, 0.0)  # cpu has dropout (triton's mask)


def triton_reasons(q, v) -> list[str]:
    """Why the triton attention kernels (dense, varlen and decode alike) can't serve q/v."""
    reasons = _kernel_reasons("triton", GPU_DTYPES, TRITON_MAX_HEAD_DIM, q, v, 0.0)  # triton has dropout
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:  # the decode path too: same dots
        reasons.append("the Triton interpreter computes tl.dot wrongly for bfloat16 operands (bf16 runs on GPU only)")
    return reasons


@_backend.register(OP, "triton")
def _(q, k, v, mask, dropout_p, causal):
    return triton_reasons(q, v)


@torch.compiler.assume_constant_result
def _cuda_smem(device_type: str, head_dim: int, value_dim: int) -> list[int] | None:
    """[forward, backward] shared-memory bytes per block of the cuda kernels for these head dims
    (None when the kernels aren't built: the machine reasons say so)."""
    ns = torch.ops.fastlm_emu if device_type == "cpu" else torch.ops.fastlm
    if not hasattr(ns, "attention_cuda_smem"):
        return None
    return list(ns.attention_cuda_smem(head_dim, value_dim))


def cuda_reasons(q, k, v, dropout_p=0.0, ext_op: str | None = None) -> list[str]:
    """Why the cuda attention kernels (dense, varlen and decode alike) can't serve these inputs:
    dtype, head dims (one limit for forward and backward), shared memory against this device's
    opt-in limit (the backward's only when a gradient is wanted), and (ext_op) an extension built
    without that op."""
    reasons = _kernel_reasons("cuda", CUDA_DTYPES, CUDA_MAX_HEAD_DIM, q, v, dropout_p)
    if ext_op is not None:
        ns = torch.ops.fastlm_emu if q.device.type == "cpu" else torch.ops.fastlm
        if not hasattr(ns, ext_op):
            reasons.append(f"the cuda kernels were built without {ext_op} (rebuild fastlm)")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    dims = (q.shape[-1], v.shape[-1])
    if 0 < min(dims) and max(dims) <= CUDA_MAX_HEAD_DIM and q.device.type in ("cpu", "cuda"):
        need = _cuda_smem(q.device.type, q.shape[-1], v.shape[-1])
        limit = _backend.shared_memory_per_block(q.device) if need else 0
        for kind, bytes_ in zip(("forward", "backward"), need or ()):
            if kind == "backward" and not needs_grad:
                continue
            if bytes_ > limit:
                reasons.append(f"the {kind} kernel for head dim {max(q.shape[-1], v.shape[-1])} needs {bytes_} bytes "
                               f"of shared memory per block; this GPU allows {limit}")
    return reasons


@_backend.register(OP, "cuda")
def _(q, k, v, mask, dropout_p, causal):
    return cuda_reasons(q, k, v, dropout_p)


# ---------------------------------------------------------------- public entry point
def _causal_bias(attn_mask):
    """(causal code, tq, tk) if attn_mask is one of torch's CausalBias objects, else None."""
    try:
        from torch.nn.attention.bias import CausalBias, CausalVariant
    except ImportError:  # older torch
        return None
    if not isinstance(attn_mask, CausalBias):
        return None
    code = TOP_LEFT if attn_mask.variant == CausalVariant.UPPER_LEFT else BOTTOM_RIGHT
    return code, attn_mask.seq_len_q, attn_mask.seq_len_kv


def _check_inputs(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
    """Validates the call torch's way; returns (mask as 4-D view or None, causal code)."""
    fn = "scaled_dot_product_attention"
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be (..., H, T, D) with at least 3 dims, the same number as "
                             f"query's, got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    for name, t in (("key", key), ("value", value)):
        if t.device != query.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but query is on {query.device}")
        if t.dtype != query.dtype:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype} but query has dtype {query.dtype}")
    b, h, tq, d = query.shape
    if key.shape[0] != b or value.shape[0] != b:
        raise ValueError(f"{fn}: batch sizes differ: query {b}, key {key.shape[0]}, value {value.shape[0]}")
    if key.shape[-1] != d:
        raise ValueError(f"{fn}: key head dim {key.shape[-1]} != query head dim {d}")
    if value.shape[1:3] != key.shape[1:3]:
        raise ValueError(f"{fn}: value shape {tuple(value.shape)} does not match key shape {tuple(key.shape)} in (H_kv, Tk)")
    hkv = key.shape[1]
    # one K/V head broadcasts over the query heads as in torch (Falcon's multi-query calls rely on it)
    if hkv != h and not ((enable_gqa or hkv == 1) and hkv > 0 and h % hkv == 0):
        need = "H to be a multiple of H_kv" if enable_gqa else "enable_gqa=True for H != H_kv"
        raise ValueError(f"{fn}: query has {h} heads and key/value {hkv}; needs {need}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be in [0, 1), got {dropout_p}")
    causal = TOP_LEFT if is_causal else NO_CAUSAL
    if attn_mask is None:
        return None, causal
    bias = _causal_bias(attn_mask)
    if bias is not None:
        code, sq, sk = bias
        if is_causal:
            raise ValueError(f"{fn}: a CausalBias attn_mask and is_causal=True can't both be given")
        if (sq, sk) != (tq, key.shape[2]):
            raise ValueError(f"{fn}: CausalBias is for ({sq}, {sk}) but (Tq, Tk) is ({tq}, {key.shape[2]})")
        return None, code
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"{fn}: attn_mask must be a torch.Tensor, a CausalBias or None, got {type(attn_mask).__name__}")
    if is_causal:
        raise ValueError(f"{fn}: attn_mask and is_causal=True can't both be given (as in torch)")
    if attn_mask.device != query.device:
        raise ValueError(f"{fn}: attn_mask is on {attn_mask.device} but query is on {query.device}")
    if attn_mask.dtype not in (torch.bool, query.dtype):
        raise TypeError(f"{fn}: attn_mask must be bool or query's dtype {query.dtype}, got {attn_mask.dtype}")
    if attn_mask.requires_grad and dropout_p > 0:
        raise ValueError(f"{fn}: attn_mask requires grad with dropout_p={dropout_p}; fastlm computes the mask's "
                         "gradient only without dropout")
    full = (b, h, tq, key.shape[2])
    if attn_mask.dim() > 4 or any(s not in (1, f) for s, f in zip(attn_mask.shape[::-1], full[::-1])):
        raise ValueError(f"{fn}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {full}")
    return attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)), causal


def _scale(query, scale):
    return 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)


def _softcap(softcap, fn="scaled_dot_product_attention") -> float:
    """softcap as a float, validated: finite and >= 0 (0 = off)."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"{fn}: softcap must be a float, got {type(softcap).__name__}")
    softcap = float(softcap)
    if not (math.isfinite(softcap) and softcap >= 0.0):
        raise ValueError(f"{fn}: softcap must be a finite float >= 0 (0 = off), got {softcap}")
    return softcap


def _window(window, fn="scaled_dot_product_attention") -> tuple[int, int]:
    """window as (left, right) ints, -1 for an unbounded side (None, or window=None: no window)."""
    if window is None:
        return -1, -1
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"{fn}: window must be a (left, right) pair of ints (-1 or None = unbounded), got {window!r}")
    sides = []
    for name, w in zip(("left", "right"), window):
        w = -1 if w is None else w
        if isinstance(w, bool) or not isinstance(w, int) or w < -1:
            raise ValueError(f"{fn}: window {name} must be an int >= 0, or -1 / None for unbounded, got {w!r}")
        sides.append(int(w))
    return sides[0], sides[1]


def _per_head(name, t, query, batch_ok, fn="scaled_dot_product_attention", batch_heads=None, grad_ok=False):
    """alibi_slopes / sinks checked against query: a float tensor of shape (H,), or (B, H) where
    batch_ok, (B, H) = batch_heads or query.shape[:2], that requires grad only where grad_ok;
    returned fp32 and contiguous (the kernels read fp32; fp64 stays fp64 for fp64 queries, which
    only the reference serves)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.requires_grad and not grad_ok and torch.is_grad_enabled():
        raise ValueError(f"{fn}: {name} requires grad, and gets no gradient here (ALiBi slopes, as in "
                         f"FlashAttention; nothing in inference-only decode): pass {name}.detach()")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.device != query.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but query is on {query.device}")
    b, h = batch_heads or query.shape[:2]
    shapes = [(h,)] + ([(b, h)] if batch_ok else [])
    if tuple(t.shape) not in shapes:
        want = " or ".join(str(x) for x in shapes)
        raise ValueError(f"{fn}: {name} must have shape {want} (per head{', or per batch and head' if batch_ok else ''}"
                         f"), got {tuple(t.shape)}")
    return t.to(torch.float64 if query.dtype == torch.float64 else torch.float32).contiguous()


def _fold(query, key, value, attn_mask):
    """Torch's SDPA takes (..., H, T, D): any number of leading batch dims, or none (3-D: the first
    dim is the heads). The kernels take (B, H, T, D). Returns (the leading shape or None when
    nothing needs folding, the 4-D views and the mask expanded over the leading dims)."""
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) for t in tensors) or query.dim() == 4 or query.dim() < 3 \
            or key.dim() != query.dim() or value.dim() != query.dim():
        return None, (query, key, value, attn_mask)  # 4-D already, or _check_inputs names the problem
    lead = tuple(query.shape[:-3])
    for name, t in (("key", key), ("value", value)):
        if tuple(t.shape[:-3]) != lead:
            raise ValueError(f"scaled_dot_product_attention: {name}'s leading (batch) dims {tuple(t.shape[:-3])} "
                             f"differ from query's {lead}")
    folded = [t.reshape(-1, *t.shape[-3:]) for t in tensors]  # (prod(lead) or 1, H, T, D)
    if isinstance(attn_mask, torch.Tensor) and attn_mask.dim() > 3:
        m = attn_mask.reshape((1,) * (query.dim() - attn_mask.dim()) + tuple(attn_mask.shape))
        attn_mask = m.expand(*lead, *m.shape[-3:]).reshape(-1, *m.shape[-3:])
    return lead, (*folded, attn_mask)


def scaled_dot_product_attention_with_lse(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False,
    softcap: float = 0.0, window: tuple[int | None, int | None] | None = None,
    alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
    generator: torch.Generator | None = None, backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): attention as torch's SDPA plus the fp32 log-sum-exp per query row (..., H, Tq)."""
    lead, (query, key, value, attn_mask) = _fold(query, key, value, attn_mask)
    if lead is not None:
        if isinstance(alibi_slopes, torch.Tensor) and alibi_slopes.dim() > 1:  # (*lead, H) -> (B, H)
            alibi_slopes = alibi_slopes.expand(*lead, alibi_slopes.shape[-1]).reshape(-1, alibi_slopes.shape[-1])
        out, lse = scaled_dot_product_attention_with_lse(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa, softcap=softcap,
            window=window, alibi_slopes=alibi_slopes, sinks=sinks, generator=generator, backend=backend)
        return out.reshape(*lead, *out.shape[1:]), lse.reshape(*lead, *lse.shape[1:])
    mask, causal = _check_inputs(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    softcap = _softcap(softcap)
    window_left, window_right = _window(window)
    alibi = None if alibi_slopes is None else _per_head("alibi_slopes", alibi_slopes, query, batch_ok=True)
    if sinks is not None:
        sinks = _per_head("sinks", sinks, query, batch_ok=False, grad_ok=True)
    seed = None
    if dropout_p > 0:
        seed = torch.randint(0, 2**62, (), generator=generator, dtype=torch.int64)
    chosen = _backend.select(OP, query.device, query, key, value, mask, dropout_p, causal, backend=backend)
    return _attention_op(query, key, value, mask, float(dropout_p), causal, _scale(query, scale), softcap,
                         window_left, window_right, alibi, sinks, seed, chosen)


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False,
    softcap: float = 0.0, window: tuple[int | None, int | None] | None = None,
    alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
    generator: torch.Generator | None = None, backend: str | None = None,
) -> torch.Tensor:
    """Drop-in for torch.nn.functional.scaled_dot_product_attention; see the module docstring."""
    return scaled_dot_product_attention_with_lse(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa, softcap=softcap,
        window=window, alibi_slopes=alibi_slopes, sinks=sinks, generator=generator, backend=backend,
    )[0]


def scaled_dot_product_attention_ref(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False,
    softcap: float = 0.0, window: tuple[int | None, int | None] | None = None,
    alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The oracle: plain PyTorch math in fp32 (fp64 for fp64 inputs), differentiable."""
    return scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa, softcap=softcap,
        window=window, alibi_slopes=alibi_slopes, sinks=sinks, generator=generator, backend="reference",
    )


# Shapes of the raw extension ops, so they too trace under torch.compile and pass opcheck.
if _ext.HAS_EXTENSION and hasattr(torch.ops.fastlm, "attention_fwd"):

    @torch.library.register_fake("fastlm::attention_fwd")
    def _(q, k, v, mask, causal, scale, softcap=0.0, window_left=-1, window_right=-1, alibi_slopes=None, sinks=None,
          dropout_p=0.0, seed=0):
        b, h, tq, _ = q.shape
        return q.new_empty(b, h, tq, v.shape[-1]), q.new_empty(b, h, tq, dtype=torch.float32)

    @torch.library.register_fake("fastlm::attention_bwd")
    def _(grad_out, q, k, v, mask, out, lse, causal, scale, softcap=0.0, window_left=-1, window_right=-1,
          alibi_slopes=None, dropout_p=0.0, seed=0):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
