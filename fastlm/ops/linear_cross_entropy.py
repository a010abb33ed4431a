"""linear_cross_entropy: the language-model head (hidden @ weight.T + bias) and its
cross-entropy loss, chunk by chunk over the N rows, so the N x V logits never exist.

    fastlm.ops.linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100,
                                    reduction="mean", label_smoothing=0.0, *, backend=None)

hidden (N, D), weight (V, D), target (N,) int64, bias (V,) or None: the loss of
F.cross_entropy(F.linear(hidden, weight, bias), target, ...) with the same semantics.

Design. Rows are processed in chunks whose logits take about CHUNK_BYTES. Per chunk: one
GEMM (torch.matmul) for the logits, the fused cross-entropy kernels of the chosen backend
(fastlm/ops/cross_entropy.py) for the loss and for d(loss)/d(logits) written over a chunk-sized
buffer, then two GEMMs that add the chunk's share into grad_hidden, grad_weight and grad_bias
(fp32 accumulators for low-precision inputs).
- reduction "mean"/"sum" with gradients wanted: the gradients are computed during the forward,
  as Liger-Kernel does (each chunk's logits are made once: 3 GEMMs in all, like eager), scaled
  by 1/denominator; the backward multiplies them by the incoming scalar gradient. Cost: the
  gradient tensors are alive from the forward on, which they would be after backward anyway.
- reduction "none", or no gradient wanted during the forward: the forward keeps only a
  per-row log-sum-exp, and the backward recomputes each chunk's logits (4 GEMMs in all),
  since a per-row upstream gradient is only known then.
Peak extra memory is therefore O(chunk x V + V x D + N x D) instead of eager's several N x V.
"""
from __future__ import annotations

import torch

from fastlm import backend as _backend
from fastlm.ops.cross_entropy import _BACKWARD as CE_BACKWARD
from fastlm.ops.cross_entropy import _FORWARD as CE_FORWARD
from fastlm.ops.cross_entropy import CPU_DTYPES, GPU_DTYPES, check_inputs, check_targets, reduce_rows

OP = "linear_cross_entropy"
CHUNK_BYTES = 128 << 20  # logits bytes per chunk (fp32 accounting)


def _chunk_rows(n: int, v: int) -> int:
    return max(1, min(n, CHUNK_BYTES // max(4 * v, 1)))


def _row_scale(target, ignore_index, reduction, like):
    """Per-row gradient scale of the reduced loss: 1/#valid (mean), 1 (sum), 0 on ignored rows."""
    valid = target != ignore_index
    scale = valid.to(like.dtype)
    return scale / valid.sum() if reduction == "mean" else scale


def _chunks(hidden, weight, bias):
    n, v = hidden.shape[0], weight.shape[0]
    step = _chunk_rows(n, v)
    for s in range(0, n, step):
        e = min(n, s + step)
        logits = hidden[s:e] @ weight.t()
        if bias is not None:
            logits += bias
        yield s, e, logits


def _accumulate(grad_logits, hidden_c, weight, gh, gw, gb, s, e):
    """The chunk's share of the gradients. The first chunk writes gw and gb (no zero fill: that
    would be a full pass over V x D); fp32 chunks write gh in place and accumulate gw inside the
    GEMM (addmm_), so no V x D temporary is made per chunk."""
    first = s == 0
    if grad_logits.dtype == gh.dtype:
        torch.mm(grad_logits, weight, out=gh[s:e])
    else:
        gh[s:e] = (grad_logits @ weight).to(gh.dtype)
    if grad_logits.dtype == gw.dtype:
        if first:
            torch.mm(grad_logits.t(), hidden_c, out=gw)
        else:
            gw.addmm_(grad_logits.t(), hidden_c)
    elif first:
        gw.copy_(grad_logits.t() @ hidden_c)
    else:
        gw += (grad_logits.t() @ hidden_c).to(gw.dtype)
    if gb is not None:
        if first:
            torch.sum(grad_logits, 0, dtype=gb.dtype, out=gb)
        else:
            gb += grad_logits.sum(0, dtype=gb.dtype)


def _grad_buffers(hidden, weight, bias):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    gh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if hidden.shape[0] == 0 else \
        torch.empty(weight.shape, dtype=acc, device=weight.device)  # written by the first chunk
    gb = None if bias is None else torch.zeros(bias.shape, dtype=acc, device=bias.device)
    return gh, gw, gb


def _forward_impl(hidden, weight, target, bias, ignore_index, eps, reduction, with_grad, backend):
    n = hidden.shape[0]
    rows_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    rows = torch.empty(n, dtype=rows_dtype, device=hidden.device)
    lse = torch.empty(n, dtype=rows_dtype, device=hidden.device)
    if n:
        check_targets(target, weight.shape[0], ignore_index)
    fwd, bwd = CE_FORWARD[backend], CE_BACKWARD[backend]
    grads = _grad_buffers(hidden, weight, bias) if with_grad else None
    scale = _row_scale(target, ignore_index, reduction, rows) if with_grad else None
    for s, e, logits in _chunks(hidden, weight, bias):
        r, l = fwd(logits, target[s:e], None, ignore_index, eps)
        rows[s:e], lse[s:e] = r, l
        if with_grad:
            g = bwd(scale[s:e].to(r.dtype).contiguous(), logits, target[s:e], None, l, ignore_index, eps)
            del logits
            _accumulate(g, hidden[s:e], weight, *grads, s, e)
    loss = reduce_rows(rows, target, None, ignore_index, reduction, hidden.dtype)
    if grads is None:
        return loss, lse, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    gh, gw, gb = grads
    return loss, lse, gh, gw.to(weight.dtype), (gb.to(bias.dtype) if gb is not None else hidden.new_empty(0))


def _backward_impl(grad_rows, hidden, weight, target, bias, lse, ignore_index, eps, backend):
    bwd = CE_BACKWARD[backend]
    gh, gw, gb = _grad_buffers(hidden, weight, bias)
    for s, e, logits in _chunks(hidden, weight, bias):
        g = bwd(grad_rows[s:e].to(lse.dtype).contiguous(), logits, target[s:e], None, lse[s:e], ignore_index, eps)
        del logits
        _accumulate(g, hidden[s:e], weight, gh, gw, gb, s, e)
    return gh, gw.to(weight.dtype), (gb.to(bias.dtype) if gb is not None else hidden.new_empty(0))


# ---------------------------------------------------------------- custom ops + autograd
@torch.library.custom_op("fastlm::linear_cross_entropy", mutates_args=())
def _lce_op(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
            ignore_index: int, label_smoothing: float, reduction: str, with_grad: bool, backend: str
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward_impl(hidden, weight, target, bias, ignore_index, label_smoothing, reduction, with_grad, backend)


@_lce_op.register_fake
def _(hidden, weight, target, bias, ignore_index, label_smoothing, reduction, with_grad, backend):
    n = hidden.shape[0]
    rows_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    loss = hidden.new_empty(n if reduction == "none" else ())
    lse = hidden.new_empty(n, dtype=rows_dtype)
    if not with_grad:
        return loss, lse, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    gb = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0)
    return loss, lse, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), gb


@torch.library.custom_op("fastlm::linear_cross_entropy_backward", mutates_args=())
def _lce_backward_op(grad_rows: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                     bias: torch.Tensor | None, lse: torch.Tensor, ignore_index: int, label_smoothing: float,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(grad_rows, hidden, weight, target, bias, lse, ignore_index, label_smoothing, backend)


@_lce_backward_op.register_fake
def _(grad_rows, hidden, weight, target, bias, lse, ignore_index, label_smoothing, backend):
    gb = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0)
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), gb


def _setup_context(ctx, inputs, output):
    hidden, weight, target, bias, ignore_index, label_smoothing, reduction, with_grad, backend = inputs
    loss, lse, gh, gw, gb = output
    ctx.mark_non_differentiable(lse, gh, gw, gb)
    ctx.precomputed = with_grad and reduction != "none"
    ctx.has_bias = bias is not None
    if ctx.precomputed:
        ctx.save_for_backward(gh, gw, gb)
    else:
        ctx.save_for_backward(hidden, weight, target, bias, lse)
    ctx.args = (ignore_index, label_smoothing, reduction, backend)


def _is_one(grad: torch.Tensor) -> bool:
    """grad == 1, asked only where it costs no device sync and nothing is being traced (CPU, eager:
    a plain tensor, no dispatch mode such as fake or proxy tensors active)."""
    eager = type(grad) is torch.Tensor and torch._C._len_torch_dispatch_stack() == 0 and not torch.compiler.is_compiling()
    return eager and grad.device.type == "cpu" and grad.numel() == 1 and grad.item() == 1.0


def _backward(ctx, grad_loss, *_):
    ignore_index, label_smoothing, reduction, backend = ctx.args
    if ctx.precomputed:
        gh, gw, gb = ctx.saved_tensors
        if not _is_one(grad_loss):  # loss.backward() sends exactly 1: skip three passes over the gradients
            g = grad_loss.to(torch.float32)
            gh, gw, gb = (gh * g).to(gh.dtype), (gw * g).to(gw.dtype), (gb * g).to(gb.dtype)
    else:
        hidden, weight, target, bias, lse = ctx.saved_tensors
        grad_rows = grad_loss.to(lse.dtype).expand(target.shape[0])
        if reduction == "mean":
            grad_rows = grad_rows / (target != ignore_index).sum()
        gh, gw, gb = _lce_backward_op(grad_rows.contiguous(), hidden, weight, target, bias, lse, ignore_index,
                                      label_smoothing, backend)
    return gh, gw, None, (gb if ctx.has_bias else None), None, None, None, None, None


_lce_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- who can serve what
def _example(device: torch.device):
    return (torch.empty(8, 16, device=device), torch.empty(64, 16, device=device),
            torch.zeros(8, dtype=torch.long, device=device), None)


_backend.register_by_dtype(OP, _example, CPU_DTYPES, GPU_DTYPES)


# ---------------------------------------------------------------- public entry point
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, *, backend: str | None = None) -> torch.Tensor:
    """F.cross_entropy(F.linear(hidden, weight, bias), target, ...) without the N x V logits."""
    name = "linear_cross_entropy"
    check_inputs(name, hidden, target, None, reduction, label_smoothing, logits_name="hidden")
    for arg, t in (("weight", weight), ("bias", bias)):
        if t is None and arg == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != hidden.device:
            raise ValueError(f"{name}: {arg} is on {t.device} but hidden is on {hidden.device}")
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name}: {arg} has dtype {t.dtype} but hidden has dtype {hidden.dtype}")
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{name}: hidden must be (N, D) and weight (V, D) with the same D, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"{name}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if target.shape != hidden.shape[:1]:
        raise ValueError(f"{name}: target must have shape ({hidden.shape[0]},) to match hidden "
                         f"{tuple(hidden.shape)}, got {tuple(target.shape)}")
    chosen = _backend.select(OP, hidden.device, hidden, weight, target, bias, backend=backend)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    loss = _lce_op(hidden, weight, target, bias, int(ignore_index), float(label_smoothing), reduction,
                   needs_grad and reduction != "none", chosen)[0]
    return loss
