"""cross_entropy over (N, C) logits and (N,) class-index targets, fused, forward and backward.

    fastlm.ops.cross_entropy(logits, target, weight=None, ignore_index=-100, reduction="mean",
                             label_smoothing=0.0, *, backend=None)

Semantics of torch.nn.functional.cross_entropy for these shapes (class weights, ignore_index,
label smoothing, "none" / "mean" / "sum"; a "mean" over only ignored rows is NaN, as in torch).
The forward reads the logits once and saves one fp32 log-sum-exp per row; the backward
recomputes the probabilities from it, so no N x C tensor is kept between the two. The
per-row losses are fp32; the reduction is a few plain torch ops over N values, through which
autograd hands each row its gradient scale. A target that is neither ignore_index nor in
[0, C): on CPU tensors IndexError naming its value (cpu: found by the kernel; other backends:
checked before launch, on the host where the target lives); on GPU tensors no check can run on
the host without a device sync, so the kernels decide on the device and give that row a NaN loss,
lse and gradient row (every backend alike), which a "mean" or "sum" carries into the loss:
visible, as torch's device-side assert is, without stopping the stream.

Backends: cuda and triton (fp32/fp16/bf16, CUDA tensors), cpu (fp32/bf16), reference (any
float dtype, computed in fp32 or fp64).
"""
from __future__ import annotations

import torch

from fastlm import _ext
from fastlm import backend as _backend

OP = "cross_entropy"
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.bfloat16)
REDUCTIONS = ("none", "mean", "sum")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def bad_targets(target: torch.Tensor, classes: int, ignore_index: int) -> torch.Tensor:
    return (target != ignore_index) & ((target < 0) | (target >= classes))


def check_targets(target: torch.Tensor, classes: int, ignore_index: int) -> None:
    """IndexError for a target out of range, on CPU tensors only: anywhere else reading the answer
    would be a device sync (the kernels flag such rows with NaN instead; see the module docstring)."""
    if target.device.type != "cpu":
        return
    bad = bad_targets(target, classes, ignore_index)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise IndexError(f"cross_entropy: target value {int(target[row])} (row {row}) is out of range for "
                         f"{classes} classes (ignore_index is {ignore_index})")


# ---------------------------------------------------------------- reference (the oracle)
def _terms(logits, target, weight, ignore_index):
    x = logits.to(_compute_dtype(logits))
    valid = target != ignore_index
    t = torch.where(valid & (target >= 0) & (target < x.shape[1]), target, 0)  # out of range: NaN rows later
    w = None if weight is None else weight.to(x.dtype)
    wt = torch.ones_like(x[:, 0]) if w is None else w[t]
    wsum = float(x.shape[1]) if w is None else w.sum()
    return x, valid, t, w, wt, wsum


def cross_entropy_rows_ref(logits, target, weight, ignore_index, label_smoothing):
    """(per-row loss, per-row lse), 0 on ignored rows; see fastlm/cross_entropy.h for the formula."""
    check_targets(target, logits.shape[1], ignore_index)
    x, valid, t, w, wt, wsum = _terms(logits, target, weight, ignore_index)
    lse = torch.logsumexp(x, -1) if x.shape[1] else torch.full_like(x[:, 0], float("-inf"))
    loss = (1 - label_smoothing) * wt * (lse - x.gather(1, t[:, None])[:, 0])
    if label_smoothing > 0:
        smooth = x.sum(-1) if w is None else x @ w
        loss = loss + label_smoothing / x.shape[1] * (wsum * lse - smooth)
    return _nan_where_bad(target, x.shape[1], ignore_index, torch.where(valid, loss, 0.0), torch.where(valid, lse, 0.0))


def _nan_where_bad(target, classes, ignore_index, *rows):
    """Rows whose target is out of range set to NaN, on the device (CPU targets were checked)."""
    if target.device.type == "cpu":
        return rows
    bad = bad_targets(target, classes, ignore_index)
    return tuple(torch.where(bad, float("nan"), r) for r in rows)


def cross_entropy_backward_ref(grad_loss, logits, target, weight, lse, ignore_index, label_smoothing):
    x, valid, t, w, wt, wsum = _terms(logits, target, weight, ignore_index)
    eps, classes = label_smoothing, x.shape[1]
    g = torch.where(valid, grad_loss.to(x.dtype), 0.0)
    p = torch.where(valid[:, None], torch.exp(x - lse.to(x.dtype)[:, None]), 0.0)  # ignored rows: lse is 0
    # (1-eps) w_t (p - onehot) + eps/C (W p - w): each bracket is exactly 0 where p == 1 and C == 1
    grad = (g * (1 - eps) * wt)[:, None] * p.scatter_add(1, t[:, None], -torch.ones_like(p[:, :1]))
    if eps > 0:
        grad = grad + (g * eps / classes)[:, None] * (wsum * p - (1.0 if w is None else w[None, :]))
    (grad,) = _nan_where_bad(target[:, None], classes, ignore_index, grad)
    return grad.to(logits.dtype).contiguous()


# ---------------------------------------------------------------- per-backend kernels
def _triton_forward(logits, target, weight, ignore_index, label_smoothing):
    from fastlm.triton import cross_entropy as kernels  # imported late: TRITON_INTERPRET is read at import

    check_targets(target, logits.shape[1], ignore_index)
    return kernels.forward(logits, target, weight, ignore_index, label_smoothing)  # flags bad rows itself


def _triton_backward(grad_loss, logits, target, weight, lse, ignore_index, label_smoothing):
    from fastlm.triton import cross_entropy as kernels

    return kernels.backward(grad_loss, logits, target, weight, lse, ignore_index, label_smoothing)


def _cpu_forward(logits, target, weight, ignore_index, label_smoothing, ops=torch.ops.fastlm):
    return ops.cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing)


def _cuda_forward(logits, target, weight, ignore_index, label_smoothing, ops=torch.ops.fastlm):
    check_targets(target, logits.shape[1], ignore_index)
    return ops.cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing)


_FORWARD = _backend.implementations(
    reference=cross_entropy_rows_ref, triton=_triton_forward, cpu=_cpu_forward, cuda=_cuda_forward
)
_BACKWARD = _backend.implementations(
    reference=cross_entropy_backward_ref, triton=_triton_backward, ext="cross_entropy_bwd"
)


# ---------------------------------------------------------------- custom ops + autograd
@torch.library.custom_op("fastlm::cross_entropy", mutates_args=())
def _cross_entropy_op(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
                      label_smoothing: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _FORWARD[backend](logits, target, weight, ignore_index, label_smoothing)


def _rows_dtype(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@_cross_entropy_op.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, backend):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=_rows_dtype(logits)), logits.new_empty(n, dtype=_rows_dtype(logits))


@torch.library.custom_op("fastlm::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward_op(grad_loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                               weight: torch.Tensor | None, lse: torch.Tensor, ignore_index: int,
                               label_smoothing: float, backend: str) -> torch.Tensor:
    return _BACKWARD[backend](grad_loss, logits, target, weight, lse, ignore_index, label_smoothing)


@_cross_entropy_backward_op.register_fake
def _(grad_loss, logits, target, weight, lse, ignore_index, label_smoothing, backend):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, target, weight, ignore_index, label_smoothing, backend = inputs
    ctx.save_for_backward(logits, target, weight, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.ignore_index, ctx.label_smoothing, ctx.backend = ignore_index, label_smoothing, backend


def _backward(ctx, grad_loss, _grad_lse):
    logits, target, weight, lse = ctx.saved_tensors
    grad = _cross_entropy_backward_op(grad_loss.contiguous(), logits, target, weight, lse, ctx.ignore_index,
                                      ctx.label_smoothing, ctx.backend)
    return grad, None, None, None, None, None


_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- who can serve what
def _example(device: torch.device):
    return (torch.empty(8, 64, device=device), torch.zeros(8, dtype=torch.long, device=device), None, -100, 0.0)


_backend.register_by_dtype(OP, _example, CPU_DTYPES, GPU_DTYPES)


# ---------------------------------------------------------------- public entry point
def check_inputs(name, logits, target, weight, reduction, label_smoothing, logits_name="logits"):
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"{name}: {logits_name} and target must be torch.Tensors, got "
                        f"{type(logits).__name__} and {type(target).__name__}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"{name}: {logits_name} must be a floating-point tensor, got dtype {logits.dtype}")
    if target.dtype != torch.int64:
        raise TypeError(f"{name}: target must hold class indices as int64, got dtype {target.dtype}")
    if target.device != logits.device:
        raise ValueError(f"{name}: target is on {target.device} but {logits_name} is on {logits.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: unknown reduction {reduction!r}; expected one of {', '.join(REDUCTIONS)}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{name}: label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{name}: weight must be a torch.Tensor or None, got {type(weight).__name__}")
        if weight.device != logits.device:
            raise ValueError(f"{name}: weight is on {weight.device} but {logits_name} is on {logits.device}")
        if weight.dtype != logits.dtype:
            raise TypeError(f"{name}: weight has dtype {weight.dtype} but {logits_name} has dtype {logits.dtype}")


def reduce_rows(rows, target, weight32, ignore_index, reduction, dtype):
    """The requested reduction of per-row losses, as torch.nn.functional.cross_entropy does it."""
    if reduction == "none":
        return rows.to(dtype)
    if reduction == "sum":
        return rows.sum().to(dtype)
    valid = target != ignore_index
    if weight32 is None:
        denom = valid.sum().to(rows.dtype)
    else:
        denom = (weight32.to(rows.dtype)[torch.where(valid, target, 0)] * valid).sum()
    return (rows.sum() / denom).to(dtype)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0, *,
                  backend: str | None = None) -> torch.Tensor:
    """F.cross_entropy for (N, C) logits and (N,) int64 targets, fused; see the module docstring."""
    check_inputs("cross_entropy", logits, target, weight, reduction, label_smoothing)
    if logits.dim() != 2:
        raise ValueError(f"cross_entropy: logits must be 2-D (N, C), got shape {tuple(logits.shape)}")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: target must have shape ({logits.shape[0]},) to match logits "
                         f"{tuple(logits.shape)}, got {tuple(target.shape)}")
    if weight is not None and weight.shape != logits.shape[1:]:
        raise ValueError(f"cross_entropy: weight must have shape ({logits.shape[1]},), got {tuple(weight.shape)}")
    w32 = None if weight is None else weight.to(_rows_dtype(logits))
    eps = float(label_smoothing)
    chosen = _backend.select(OP, logits.device, logits, target, w32, int(ignore_index), eps, backend=backend)
    rows, _ = _cross_entropy_op(logits, target, w32, int(ignore_index), eps, chosen)
    return reduce_rows(rows, target, w32, ignore_index, reduction, logits.dtype)


# Shapes of the raw extension ops, so they too trace under torch.compile and pass opcheck.
if _ext.HAS_EXTENSION:

    @torch.library.register_fake("fastlm::cross_entropy_fwd")
    def _(logits, target, weight, ignore_index, label_smoothing):
        n = logits.shape[0]
        return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)

    @torch.library.register_fake("fastlm::cross_entropy_bwd")
    def _(grad_loss, logits, target, weight, lse, ignore_index, label_smoothing):
        return logits.new_empty(logits.shape)
