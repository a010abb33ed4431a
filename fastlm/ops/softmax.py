"""softmax / log_softmax of (scale * x + mask), fused, forward and backward.

    fastlm.ops.softmax(x, dim=-1, *, scale=1.0, mask=None, is_causal=False, backend=None)
    fastlm.ops.log_softmax(x, dim=-1, *, scale=1.0, mask=None, is_causal=False, backend=None)

mask: bool (True = keep) or additive in x's dtype, broadcastable to x; it gets no gradient.
is_causal: masks the upper triangle of x's last two dims (column j > row i), top-left aligned
as in torch's scaled_dot_product_attention; x needs at least two dims.
Fully masked rows give 0 (softmax) or -inf everywhere (log_softmax: log 0), never NaN, and
their gradient is 0. Only y is saved for the backward (one tensor, the size of x).

Layout: the kernels work on the last dim. For dim != -1, x is moved (movedim + one contiguous
copy) and the result moved back (a view). A mask is reduced to the (period, cols) block that
repeats over x's leading dims (no copy for a full-size or leading-broadcast mask; a mask
broadcast inside the trailing dims is materialised once at that block's size).

Backends: cuda and triton (fp32/fp16/bf16, CUDA tensors), cpu (fp32/bf16), reference (any
float dtype, computed in fp32 or fp64 and rounded once).
"""
from __future__ import annotations

import torch

from fastlm import _ext
from fastlm import backend as _backend

OP = "softmax"
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.bfloat16)
_NEG_INF = float("-inf")


# ---------------------------------------------------------------- reference (the oracle)
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _masked_z(x, mask, scale, causal_rows):
    """scale * x + mask over a (rows, cols) view, -inf where masked, in the compute dtype."""
    cols = x.shape[-1]
    z = x.to(_compute_dtype(x)).reshape(-1, cols) * scale
    rows = z.shape[0]
    if mask is not None:
        zz = z.reshape(-1, mask.shape[0], cols)
        zz = zz.masked_fill(~mask, _NEG_INF) if mask.dtype == torch.bool else zz + mask.to(z.dtype)
        z = zz.reshape(rows, cols)
    if causal_rows:
        i = torch.arange(rows, device=x.device) % causal_rows
        z = z.masked_fill(torch.arange(cols, device=x.device)[None, :] > i[:, None], _NEG_INF)
    return z


def _softmax_prepared_ref(x, mask, scale, causal_rows, log):
    if x.numel() == 0:
        return x.new_empty(x.shape)
    z = _masked_z(x, mask, scale, causal_rows)
    m = z.amax(-1, keepdim=True)
    m = torch.where(m == _NEG_INF, 0.0, m)
    e = torch.exp(z - m)
    s = e.sum(-1, keepdim=True)
    if log:
        y = torch.where(s == 0, _NEG_INF, z - m - torch.log(s))  # s NaN (a NaN or +inf in the row) propagates
    else:
        y = torch.where(s == 0, 0.0, e / s)
    return y.to(x.dtype).reshape(x.shape)


def softmax_backward_ref(grad_y, y, scale, log):
    g, yy = grad_y.to(_compute_dtype(y)), y.to(_compute_dtype(y))
    if log:
        valid = yy > _NEG_INF
        dot = torch.where(valid, g, 0.0).sum(-1, keepdim=True)
        gx = torch.where(valid, scale * (g - torch.exp(yy) * dot), 0.0)
    else:
        gx = scale * yy * (g - (yy * g).sum(-1, keepdim=True))
    return gx.to(y.dtype).contiguous()


# ---------------------------------------------------------------- per-backend kernels
def _triton_forward(x, mask, scale, causal_rows, log):
    from fastlm.triton import softmax as kernels  # imported late: TRITON_INTERPRET is read at import

    return kernels.forward(x, mask, scale, causal_rows, log)


def _triton_backward(grad_y, y, scale, log):
    from fastlm.triton import softmax as kernels

    return kernels.backward(grad_y, y, scale, log)


_FORWARD = _backend.implementations(
    reference=_softmax_prepared_ref, triton=_triton_forward, ext="softmax_fwd"
)
_BACKWARD = _backend.implementations(
    reference=softmax_backward_ref, triton=_triton_backward, ext="softmax_bwd"
)


# ---------------------------------------------------------------- custom ops + autograd
# Both take the prepared layout: softmax over x's last dim, mask (period, cols) or None.
@torch.library.custom_op("fastlm::softmax", mutates_args=())
def _softmax_op(x: torch.Tensor, mask: torch.Tensor | None, scale: float, causal_rows: int, log: bool,
                backend: str) -> torch.Tensor:
    return _FORWARD[backend](x, mask, scale, causal_rows, log)


@_softmax_op.register_fake
def _(x, mask, scale, causal_rows, log, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("fastlm::softmax_backward", mutates_args=())
def _softmax_backward_op(grad_y: torch.Tensor, y: torch.Tensor, scale: float, log: bool, backend: str) -> torch.Tensor:
    return _BACKWARD[backend](grad_y, y, scale, log)


@_softmax_backward_op.register_fake
def _(grad_y, y, scale, log, backend):
    return y.new_empty(y.shape)


def _setup_context(ctx, inputs, output):
    _, _, scale, _, log, backend = inputs
    ctx.save_for_backward(output)
    ctx.scale, ctx.log, ctx.backend = scale, log, backend


def _backward(ctx, grad_y):
    (y,) = ctx.saved_tensors
    return _softmax_backward_op(grad_y.contiguous(), y, ctx.scale, ctx.log, ctx.backend), None, None, None, None, None


_softmax_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- who can serve what
def _example(device: torch.device):
    return (torch.empty(8, 64, device=device), None, 1.0, 0, False)


_backend.register_by_dtype(OP, _example, CPU_DTYPES, GPU_DTYPES)


# ---------------------------------------------------------------- public entry points
def _check_inputs(name, x, dim, scale, mask, is_causal) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name}: x must be a floating-point tensor, got dtype {x.dtype}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"{name}: scale must be a float, got {type(scale).__name__}")
    nd = max(x.dim(), 1)
    if not isinstance(dim, int) or not -nd <= dim < nd:
        raise IndexError(f"{name}: dim {dim} is out of range for x with {x.dim()} dims")
    if is_causal and x.dim() < 2:
        raise ValueError(f"{name}: is_causal needs x with at least 2 dims, got shape {tuple(x.shape)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{name}: mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.device != x.device:
            raise ValueError(f"{name}: mask is on {mask.device} but x is on {x.device}")
        if mask.dtype != torch.bool and mask.dtype != x.dtype:
            raise TypeError(f"{name}: mask must be bool or x's dtype {x.dtype}, got {mask.dtype}")
        try:
            ok = mask.dim() <= x.dim() and torch.broadcast_shapes(mask.shape, x.shape) == x.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"{name}: mask of shape {tuple(mask.shape)} is not broadcastable to x's shape {tuple(x.shape)}")
    return dim % nd


def _prepare(x, d, mask, is_causal):
    """(x with the softmax dim last, mask as (period, cols) or None, causal_rows)."""
    nd = x.dim()
    m = None if mask is None else mask.reshape((1,) * (nd - mask.dim()) + tuple(mask.shape))
    causal_rows = x.shape[-2] if is_causal else 0
    if d != nd - 1:
        if is_causal:  # causal is defined on the last two dims of x as given: make it a mask
            keep = torch.ones(x.shape[-2], x.shape[-1], dtype=torch.bool, device=x.device).tril()
            if m is None:
                m = keep
            elif m.dtype == torch.bool:
                m = m & keep
            else:
                m = m.masked_fill(~keep, _NEG_INF)
            m = m.reshape((1,) * (nd - m.dim()) + tuple(m.shape))
            causal_rows = 0
        x = x.movedim(d, -1).contiguous()
        m = None if m is None else m.movedim(d, -1)
    if m is not None:
        k = 0
        while k < nd - 1 and m.shape[k] == 1:
            k += 1
        m = m.reshape(m.shape[k:]).expand(x.shape[k:]).reshape(-1, x.shape[-1]).contiguous()
    return x, m, causal_rows


def _softmax_any(name, log, x, dim, scale, mask, is_causal, backend):
    d = _check_inputs(name, x, dim, scale, mask, is_causal)
    if x.dim() == 0:
        return _softmax_any(name, log, x.reshape(1), 0, scale, mask, False, backend).reshape(())
    if x.numel() == 0:
        mask, is_causal = None, False
    xp, m, causal_rows = _prepare(x, d, mask, is_causal)
    chosen = _backend.select(OP, x.device, xp, m, float(scale), causal_rows, log, backend=backend)
    y = _softmax_op(xp, m, float(scale), causal_rows, log, chosen)
    return y if d == x.dim() - 1 else y.movedim(-1, d)


def softmax(x: torch.Tensor, dim: int = -1, *, scale: float = 1.0, mask: torch.Tensor | None = None,
            is_causal: bool = False, backend: str | None = None) -> torch.Tensor:
    """softmax(scale * x + mask) along dim in one fused pass; differentiable in x."""
    return _softmax_any("softmax", False, x, dim, scale, mask, is_causal, backend)


def log_softmax(x: torch.Tensor, dim: int = -1, *, scale: float = 1.0, mask: torch.Tensor | None = None,
                is_causal: bool = False, backend: str | None = None) -> torch.Tensor:
    """log_softmax(scale * x + mask) along dim; masked entries are -inf, their grads 0."""
    return _softmax_any("log_softmax", True, x, dim, scale, mask, is_causal, backend)


def softmax_ref(x, dim=-1, *, scale=1.0, mask=None, is_causal=False, log=False):
    """The reference backend through the same argument handling (plain PyTorch, no autograd op)."""
    return (log_softmax if log else softmax)(x, dim, scale=scale, mask=mask, is_causal=is_causal, backend="reference")


# Shapes of the raw extension ops, so they too trace under torch.compile and pass opcheck.
if _ext.HAS_EXTENSION:

    @torch.library.register_fake("fastlm::softmax_fwd")
    def _(x, mask, scale, causal_rows, log):
        return x.new_empty(x.shape)

    @torch.library.register_fake("fastlm::softmax_bwd")
    def _(grad_y, y, scale, log):
        return y.new_empty(y.shape)
