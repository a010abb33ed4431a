"""layer_norm and rms_norm with torch's semantics, optionally fused with the pre-norm residual add.

    fastlm.ops.layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, residual=None, backend=None)
    fastlm.ops.rms_norm(x, normalized_shape, weight=None, eps=None, *, residual=None, backend=None)

Without residual: the normalized tensor, as F.layer_norm / F.rms_norm return it. With residual:
(normed, h) where h = x + residual, both from one pass (the pre-norm transformer block:
h feeds the next residual branch, normed feeds attention/MLP). eps=None for rms_norm means
torch's default, torch.finfo(x.dtype).eps. Statistics (mean, rstd) are fp32 and saved for
the backward, which recomputes xhat from h rather than saving it; grad_x and grad_residual
are the same tensor (d h / d x = d h / d residual = 1), computed in the same pass that
applies the norm's backward and adds the gradient reaching h directly.

Backends: cuda and triton (fp32/fp16/bf16, CUDA tensors), cpu (fp32/bf16), reference (any
float dtype; fp32 math, or fp64 for fp64 inputs).
"""
from __future__ import annotations

import math

import torch

from fastlm import _ext
from fastlm import backend as _backend

LAYER_NORM, RMS_NORM = "layer_norm", "rms_norm"
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.bfloat16)
TRITON_MAX_COLS = 32768  # the Triton kernels hold a whole row in registers


# ---------------------------------------------------------------- reference (the oracle)
def _cdt(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def norm_ref(x, residual, weight, bias, eps: float, rms: bool):
    """The op contract on a (rows, cols) x: (y, h or empty, mean or empty, rstd)."""
    h = x + residual if residual is not None else x
    z = h.to(_cdt(x))
    mean = None if rms else z.mean(-1, keepdim=True)
    centered = z if rms else z - mean
    rstd = torch.rsqrt(centered.square().mean(-1, keepdim=True) + eps)
    y = centered * rstd
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    sdt = _cdt(x)
    return (
        y.to(x.dtype).contiguous(),
        h.contiguous() if residual is not None else x.new_empty(0),
        x.new_empty(0, dtype=sdt) if rms else mean.squeeze(-1).to(sdt),
        rstd.squeeze(-1).to(sdt),
    )


def norm_backward_ref(grad_y, grad_sum, h, weight, mean, rstd, rms: bool, bias_grad: bool):
    """(grad_h, grad_weight or empty, grad_bias or empty), written out (no autograd graph)."""
    cdt = _cdt(h)
    g, z = grad_y.to(cdt), h.to(cdt)
    r = rstd.to(cdt)[:, None]
    xhat = (z if rms else z - mean.to(cdt)[:, None]) * r
    gw = g * weight.to(cdt) if weight is not None else g
    d = gw - xhat * (xhat * gw).mean(-1, keepdim=True)
    if not rms:
        d = d - gw.mean(-1, keepdim=True)
    d = d * r
    if grad_sum is not None:
        d = d + grad_sum.to(cdt)
    grad_weight = (g * xhat).sum(0).to(h.dtype) if weight is not None else h.new_empty(0)
    grad_bias = g.sum(0).to(h.dtype) if bias_grad else h.new_empty(0)
    return d.to(h.dtype).contiguous(), grad_weight, grad_bias


# ---------------------------------------------------------------- per-backend kernels
def _triton_forward(*args):
    from fastlm.triton import norms as kernels  # imported late: TRITON_INTERPRET is read at import

    return kernels.forward(*args)


def _triton_backward(*args):
    from fastlm.triton import norms as kernels

    return kernels.backward(*args)


_FORWARD = _backend.implementations(
    reference=norm_ref, triton=_triton_forward, ext="norm_fwd"
)
_BACKWARD = _backend.implementations(
    reference=norm_backward_ref, triton=_triton_backward, ext="norm_bwd"
)


# ---------------------------------------------------------------- custom ops + autograd
@torch.library.custom_op("fastlm::norm", mutates_args=())
def _norm_op(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
    eps: float, rms: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(t.clone() if t is x else t for t in _FORWARD[backend](x, residual, weight, bias, eps, rms))


def _fake_forward(x, residual, weight, bias, eps, rms, *rest):
    rows = x.shape[0]
    sdt = _cdt(x)
    return (
        x.new_empty(x.shape),
        x.new_empty(x.shape) if residual is not None else x.new_empty(0),
        x.new_empty(0 if rms else rows, dtype=sdt),
        x.new_empty(rows, dtype=sdt),
    )


_norm_op.register_fake(_fake_forward)


@torch.library.custom_op("fastlm::norm_backward", mutates_args=())
def _norm_backward_op(
    grad_y: torch.Tensor, grad_sum: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor | None,
    mean: torch.Tensor, rstd: torch.Tensor, rms: bool, bias_grad: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _BACKWARD[backend](grad_y, grad_sum, h, weight, mean, rstd, rms, bias_grad)


def _fake_backward(grad_y, grad_sum, h, weight, mean, rstd, rms, bias_grad, *rest):
    cols = h.shape[1]
    return h.new_empty(h.shape), h.new_empty(cols if weight is not None else 0), h.new_empty(cols if bias_grad else 0)


_norm_backward_op.register_fake(_fake_backward)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, rms, backend = inputs
    _, h, mean, rstd = output
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)
    ctx.rms, ctx.backend = rms, backend
    ctx.has_residual, ctx.has_bias = residual is not None, bias is not None


def _backward(ctx, grad_y, grad_h, grad_mean, grad_rstd):
    h, weight, mean, rstd = ctx.saved_tensors
    grad_sum = grad_h if ctx.has_residual else None
    gx, gw, gb = _norm_backward_op(
        grad_y, grad_sum, h, weight, mean, rstd, ctx.rms, ctx.has_bias, ctx.backend
    )
    return (gx, gx if ctx.has_residual else None, gw if weight is not None else None,
            gb if ctx.has_bias else None, None, None, None)


_norm_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- who can serve what
def _register(op):
    def example(device):
        return (torch.empty(8, 64, device=device), torch.empty(8, 64, device=device), torch.empty(64, device=device))

    @_backend.register(op, "reference", example=example)
    def _(x, residual, weight):
        return [] if x.dtype.is_floating_point else [f"dtype {x.dtype} is not floating point"]

    @_backend.register(op, "cpu")
    def _(x, residual, weight):
        return _backend.dtype_reason(x, CPU_DTYPES, "cpu")

    @_backend.register(op, "triton")
    def _(x, residual, weight):
        cols = x.shape[-1]
        wide = [f"rows of {cols} elements exceed the triton kernels' limit of {TRITON_MAX_COLS}"] if cols > TRITON_MAX_COLS else []
        return _backend.dtype_reason(x, GPU_DTYPES, "triton") + wide

    @_backend.register(op, "cuda")
    def _(x, residual, weight):  # any width: rows past 16384 columns stream (csrc/cuda/norms.cu)
        return _backend.dtype_reason(x, GPU_DTYPES, "cuda")


_register(LAYER_NORM)
_register(RMS_NORM)


# ---------------------------------------------------------------- public entry points
def _check(op, x, normalized_shape, residual, tensors, eps):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{op}: x must be a floating-point tensor, got dtype {x.dtype}")
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not all(isinstance(s, int) for s in shape) or len(shape) == 0:
        raise TypeError(f"{op}: normalized_shape must be an int or a non-empty sequence of ints, got {normalized_shape!r}")
    if tuple(x.shape[x.dim() - len(shape):]) != shape or x.dim() < len(shape):
        raise ValueError(f"{op}: normalized_shape {list(shape)} does not match the trailing dims of x {tuple(x.shape)}")
    if residual is not None:
        tensors = [("residual", residual, tuple(x.shape))] + tensors
    for name, t, want in tensors:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but x has dtype {x.dtype}")
        if tuple(t.shape) != (want if want is not None else shape):
            raise ValueError(f"{op}: {name} must have shape {want if want is not None else shape}, got {tuple(t.shape)}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"{op}: eps must be a non-negative number, got {eps!r}")
    return shape


def _run(op, x, shape, residual, weight, bias, eps, rms, backend):
    cols = math.prod(shape)
    x2 = x.reshape(-1, cols)
    r2 = residual.reshape(-1, cols) if residual is not None else None
    w = weight.reshape(cols) if weight is not None else None
    b = bias.reshape(cols) if bias is not None else None
    chosen = _backend.select(op, x.device, x2, r2, w, backend=backend)
    y, h, _, _ = _norm_op(x2, r2, w, b, float(eps), rms, chosen)
    y = y.view(x.shape)
    return (y, h.view(x.shape)) if residual is not None else y


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, residual=None, backend=None):
    """F.layer_norm(x [+ residual], ...); with residual: (normed, x + residual) from one pass."""
    shape = _check(LAYER_NORM, x, normalized_shape, residual, [("weight", weight, None), ("bias", bias, None)], eps)
    return _run(LAYER_NORM, x, shape, residual, weight, bias, eps, False, backend)


def rms_norm(x, normalized_shape, weight=None, eps=None, *, residual=None, backend=None):
    """F.rms_norm(x [+ residual], ...); eps=None is torch.finfo(x.dtype).eps; with residual: (normed, x + residual)."""
    shape = _check(RMS_NORM, x, normalized_shape, residual, [("weight", weight, None)], 0.0 if eps is None else eps)
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    return _run(RMS_NORM, x, shape, residual, weight, None, eps, True, backend)


def layer_norm_ref(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, residual=None):
    return layer_norm(x, normalized_shape, weight, bias, eps, residual=residual, backend="reference")


def rms_norm_ref(x, normalized_shape, weight=None, eps=None, *, residual=None):
    return rms_norm(x, normalized_shape, weight, eps, residual=residual, backend="reference")


if _ext.HAS_EXTENSION:
    torch.library.register_fake("fastlm::norm_fwd")(lambda x, residual, weight, bias, eps, rms: _fake_forward(x, residual, weight, bias, eps, rms))
    torch.library.register_fake("fastlm::norm_bwd")(_fake_backward)
