"""Attention over a packed batch of variable-length sequences (FlashAttention's varlen API).

    fastlm.ops.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
        is_causal=False, scale=None, softcap=0.0, window=None, alibi_slopes=None, sinks=None,
        return_lse=False, backend=None) -> out (total_q, H, Dv)  [, lse (H, total_q) fp32]

q (total_q, H, D), k (total_k, H_kv, D), v (total_k, H_kv, Dv): the sequences laid end to end.
cu_seqlens_q / cu_seqlens_k are int32 (num_seqs + 1,) prefix sums of the lengths: sequence b
owns queries cu_seqlens_q[b]:cu_seqlens_q[b+1] and keys cu_seqlens_k[b]:cu_seqlens_k[b+1];
max_seqlen_q / max_seqlen_k bound the lengths (the kernels size their grids by them, as in
FlashAttention). Each sequence is its own attention problem: no query sees another sequence's
keys, and no padding is computed anywhere (the kernels' work items are real rows only).

Options are scaled_dot_product_attention's, per sequence: is_causal is top-left as torch's (key j
<= query i); window=(-1, 0) is the bottom-right causal cut (j <= i + Tk - Tq, FlashAttention's
causal), and windows/ALiBi are measured from that diagonal. alibi_slopes (H,) or (num_seqs, H);
sinks (H,), with a gradient. H_kv may divide H (GQA). No attn_mask, no dropout (refused).

Backends: reference (a loop over sequences of the dense oracle), cpu (csrc/cpu, one OpenMP
work item per (sequence, head, query tile)), and triton and cuda: the dense kernels' programs /
CTAs indexed by (sequence, head, query tile), each reading its sequence's bounds from
cu_seqlens on the device and returning at once when its tile lies past the sequence's end.
"""
from __future__ import annotations

import math

import torch

from fastlm import _ext
from fastlm import backend as _backend
from fastlm.ops.attention import (
    NO_CAUSAL, TOP_LEFT, _per_head, _softcap, _window, attention_backward_ref, attention_forward_ref,
    attention_sinks_grad, cuda_reasons, packed_cpu_reasons, triton_reasons,
)

OP = "varlen_attention"


# ---------------------------------------------------------------- reference (the oracle)
def _sequences(cu_q, cu_k):
    """[(q rows slice, k rows slice, b)] from the prefix sums (host ints: the oracle loops)."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return [(slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1]), b) for b in range(len(cq) - 1)]


def _dense(t, rows):
    return t[rows].transpose(0, 1).unsqueeze(0)  # (T_b, H, D) -> (1, H, T_b, D)


def _alibi_row(alibi, b):
    return None if alibi is None else (alibi[b] if alibi.dim() == 2 else alibi)


def varlen_forward_ref(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, softcap=0.0, window=(-1, -1), alibi=None,
                       sinks=None):
    """(out (total_q, H, Dv), lse (H, total_q) fp32): the dense oracle on each sequence."""
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    lse = torch.full((q.shape[1], q.shape[0]), -math.inf, dtype=torch.float32, device=q.device)
    if sinks is not None:
        lse.copy_(sinks.float().view(-1, 1).expand_as(lse))
    for rq, rk, b in _sequences(cu_q, cu_k):
        if rq.stop == rq.start or rk.stop == rk.start:
            continue  # nothing to attend: out 0, lse -inf (or the sink)
        o, l = attention_forward_ref(_dense(q, rq), _dense(k, rk), _dense(v, rk), None, 0.0, causal, scale, None,
                                     softcap, window, _alibi_row(alibi, b), sinks)
        out[rq] = o[0].transpose(0, 1)
        lse[:, rq] = l[0]
    return out, lse


def varlen_backward_ref(grad_out, q, k, v, cu_q, cu_k, max_q, max_k, out, lse, causal, scale, softcap=0.0,
                        window=(-1, -1), alibi=None, sinks=None):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for rq, rk, b in _sequences(cu_q, cu_k):
        if rq.stop == rq.start or rk.stop == rk.start:
            continue
        g = attention_backward_ref(_dense(grad_out, rq), _dense(q, rq), _dense(k, rk), _dense(v, rk), None,
                                   _dense(out, rq), lse[:, rq].unsqueeze(0), 0.0, causal, scale, None, softcap,
                                   window, _alibi_row(alibi, b), sinks)
        for full, part, rows in zip((dq, dk, dv), g, (rq, rk, rk)):
            full[rows] = part[0].transpose(0, 1)
    return dq, dk, dv


# ---------------------------------------------------------------- per-backend kernels
def _ext_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, softcap=0.0, window=(-1, -1), alibi=None,
                 sinks=None, ops=torch.ops.fastlm):
    return ops.attention_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, softcap, window[0], window[1],
                                    alibi, sinks)


def _ext_backward(grad_out, q, k, v, cu_q, cu_k, max_q, max_k, out, lse, causal, scale, softcap=0.0,
                  window=(-1, -1), alibi=None, sinks=None, ops=torch.ops.fastlm):
    return ops.attention_varlen_bwd(grad_out, q, k, v, cu_q, cu_k, max_q, max_k, out, lse, causal, scale, softcap,
                                    window[0], window[1], alibi)


def _triton_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, softcap=0.0, window=(-1, -1), alibi=None,
                    sinks=None):
    from fastlm.triton import attention as kernels  # imported late: TRITON_INTERPRET is read at import

    return kernels.varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, softcap=softcap, window=window,
                                  alibi=alibi, sinks=sinks)


def _triton_backward(grad_out, q, k, v, cu_q, cu_k, max_q, max_k, out, lse, causal, scale, softcap=0.0,
                     window=(-1, -1), alibi=None, sinks=None):
    from fastlm.triton import attention as kernels

    return kernels.varlen_backward(grad_out, q, k, v, cu_q, cu_k, max_q, max_k, out, lse, causal, scale,
                                   softcap=softcap, window=window, alibi=alibi)


_FORWARD = _backend.implementations(reference=varlen_forward_ref, triton=_triton_forward, cpu=_ext_forward,
                                    cuda=_ext_forward)
_BACKWARD = _backend.implementations(reference=varlen_backward_ref, triton=_triton_backward, cpu=_ext_backward,
                                     cuda=_ext_backward)


# ---------------------------------------------------------------- custom ops + autograd
@torch.library.custom_op("fastlm::varlen_attention", mutates_args=())
def _varlen_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int,
    causal: int, scale: float, softcap: float, window_left: int, window_right: int, alibi: torch.Tensor | None,
    sinks: torch.Tensor | None, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _FORWARD[backend](q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, softcap, (window_left, window_right),
                             alibi, sinks)


@_varlen_op.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, softcap, window_left, window_right, alibi, sinks, backend):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1]), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op("fastlm::varlen_attention_backward", mutates_args=())
def _varlen_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
    cu_k: torch.Tensor, max_q: int, max_k: int, out: torch.Tensor, lse: torch.Tensor, causal: int, scale: float,
    softcap: float, window_left: int, window_right: int, alibi: torch.Tensor | None, sinks: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _BACKWARD[backend](grad_out, q, k, v, cu_q, cu_k, max_q, max_k, out, lse, causal, scale, softcap,
                              (window_left, window_right), alibi, sinks)


@_varlen_backward_op.register_fake
def _(grad_out, q, k, v, cu_q, cu_k, max_q, max_k, out, lse, causal, scale, softcap, window_left, window_right,
      alibi, sinks, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, softcap, wl, wr, alibi, sinks, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, cu_q, cu_k, out, lse, alibi, sinks)
    ctx.args = (max_q, max_k, causal, scale, softcap, wl, wr, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, cu_q, cu_k, out, lse, alibi, sinks = ctx.saved_tensors
    max_q, max_k, causal, scale, softcap, wl, wr, backend = ctx.args
    dq, dk, dv = _varlen_backward_op(grad_out, q, k, v, cu_q, cu_k, max_q, max_k, out, lse, causal, scale, softcap,
                                     wl, wr, alibi, sinks, backend)
    dsinks = None
    if ctx.needs_input_grad[13]:  # (total, H, Dv) rows as one batch of H heads: (1, H, total, Dv)
        dsinks = attention_sinks_grad(grad_out.transpose(0, 1).unsqueeze(0), out.transpose(0, 1).unsqueeze(0),
                                      lse.unsqueeze(0), sinks)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, dsinks, None


_varlen_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- who can serve what
def _example(device: torch.device):
    q = torch.empty(16, 2, 64, device=device)
    cu = torch.tensor([0, 16], dtype=torch.int32, device=device)
    return (q, q, q, cu)


@_backend.register(OP, "reference", example=_example)
def _(q, k, v, cu_q):
    return [] if q.dtype.is_floating_point else [f"dtype {q.dtype} is not floating point"]


@_backend.register(OP, "cpu")
def _(q, k, v, cu_q):
    return packed_cpu_reasons(q, (q.shape[-1], v.shape[-1]), "attention_varlen_fwd")


@_backend.register(OP, "triton")
def _(q, k, v, cu_q):
    return triton_reasons(q, v)


@_backend.register(OP, "cuda")
def _(q, k, v, cu_q):
    return cuda_reasons(q, k, v, ext_op="attention_varlen_fwd")


# ---------------------------------------------------------------- public entry point
def _check(q, k, v, cu_q, cu_k, max_q, max_k):
    fn = "varlen_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{fn}: {name} must be packed (total, heads, head_dim), got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point or t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"{fn}: {name} must be a floating-point tensor with q's dtype and device, got "
                            f"{t.dtype} on {t.device} (q: {q.dtype} on {q.device})")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{fn}: k head dim {k.shape[-1]} != q head dim {q.shape[-1]}")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"{fn}: v shape {tuple(v.shape)} does not match k shape {tuple(k.shape)} in (total, heads)")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"{fn}: q has {q.shape[1]} heads, not a multiple of k's {k.shape[1]}")
    for name, cu, total, mx in (("cu_seqlens_q", cu_q, q.shape[0], max_q), ("cu_seqlens_k", cu_k, k.shape[0], max_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
            raise TypeError(f"{fn}: {name} must be a 1-D int32 tensor of num_seqs + 1 prefix sums, got "
                            f"{cu.dtype if isinstance(cu, torch.Tensor) else type(cu).__name__}"
                            f"{' of shape ' + str(tuple(cu.shape)) if isinstance(cu, torch.Tensor) else ''}")
        if cu.device != q.device:
            raise ValueError(f"{fn}: {name} is on {cu.device} but q is on {q.device}")
        if torch.compiler.is_compiling():  # the values are data: the kernels' bindings check them at run time
            continue
        host = cu.tolist()
        lengths = [b - a for a, b in zip(host, host[1:])]
        if host[0] != 0 or host[-1] != total or min(lengths, default=0) < 0:
            raise ValueError(f"{fn}: {name} must rise from 0 to {total} (the packed length), got {host}")
        if not isinstance(mx, int) or isinstance(mx, bool) or mx < max(lengths, default=0):
            raise ValueError(f"{fn}: max_seqlen_{name[-1]}={mx!r} is below the longest sequence "
                             f"({max(lengths, default=0)})")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"{fn}: cu_seqlens_q has {cu_q.numel() - 1} sequences but cu_seqlens_k "
                         f"{cu_k.numel() - 1}")


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, is_causal=False,
                     scale=None, softcap: float = 0.0, window=None, alibi_slopes=None, sinks=None,
                     return_lse: bool = False, backend: str | None = None):
    """Attention over packed variable-length sequences; see the module docstring."""
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    fn, seqs_heads = "varlen_attention", (cu_seqlens_q.numel() - 1, q.shape[1])  # ALiBi: per sequence and head
    alibi = None if alibi_slopes is None else _per_head("alibi_slopes", alibi_slopes, q, True, fn, seqs_heads)
    if sinks is not None:
        sinks = _per_head("sinks", sinks, q, False, fn, seqs_heads, grad_ok=True)
    chosen = _backend.select(OP, q.device, q, k, v, cu_seqlens_q, backend=backend)
    out, lse = _varlen_op(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                          TOP_LEFT if is_causal else NO_CAUSAL,
                          1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale), _softcap(softcap, fn),
                          *_window(window, fn), alibi, sinks, chosen)
    return (out, lse) if return_lse else out


if _ext.HAS_EXTENSION and hasattr(torch.ops.fastlm, "attention_varlen_fwd"):

    @torch.library.register_fake("fastlm::attention_varlen_fwd")
    def _(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, softcap=0.0, window_left=-1, window_right=-1,
          alibi_slopes=None, sinks=None):
        return q.new_empty(q.shape[0], q.shape[1], v.shape[-1]), q.new_empty(q.shape[1], q.shape[0],
                                                                             dtype=torch.float32)

    @torch.library.register_fake("fastlm::attention_varlen_bwd")
    def _(grad_out, q, k, v, cu_q, cu_k, max_q, max_k, out, lse, causal, scale, softcap=0.0, window_left=-1,
          window_right=-1, alibi_slopes=None):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
