"""moe_permute / moe_unpermute: tokens into expert-contiguous order and back, one pass each.

    x_sorted, row_index, offsets = fastlm.ops.moe_permute(x, expert_ids, num_experts, *, backend=None)
    out = fastlm.ops.moe_unpermute(y_sorted, row_index, weights, *, backend=None)

moe_permute: x (T, H) and the router's expert_ids (T, k) int32 (-1: dropped by capacity) give
x_sorted (T*k, H), each token's row copied once per assignment, grouped by expert in ascending
order and, inside an expert, by token then slot (stable: the order is deterministic). offsets
(E+1,) int32: expert e owns rows offsets[e]:offsets[e+1], what grouped_linear takes. Dropped
assignments own no row: the tail offsets[E]: is zeros, so shapes never depend on the routing
(static shapes for torch.compile and CUDA graphs, as HF's grouped_mm path does). row_index
(T, k) int32 is the x_sorted row of each assignment, -1 when dropped.

moe_unpermute: out[t] = sum over slots of weights[t, slot] * y_sorted[row_index[t, slot]], the
routing weights (fp32; fp64 with fp64 rows) applied while gathering back, accumulated in fp32 (a token's k expert outputs
summed in one place: deterministic, unlike an index_add with atomics).

Gradients: moe_permute to x (the k rows of a token summed back); moe_unpermute to y_sorted and
to weights (dot(y_row, grad_out[t]), which is how the router learns).

Backends: cpu (csrc/cpu/moe_permute.cpp: counting sort, rows copied in parallel), triton
(fastlm/triton/moe_permute.py: a device-side counting sort, each row copied where it is
placed; gathers with fp32 accumulation), cuda (csrc/cuda/moe_permute.cu: counting sort with a
device scan, 16-byte row copies, a warp per token for the gathers), reference. Values of
expert_ids / row_index are checked on the host only for CPU tensors; on a GPU the kernels treat
ids outside [-1, E) as dropped and skip rows outside y_sorted (memory-safe, no host sync).
"""
from __future__ import annotations

import torch

from fastlm import _ext
from fastlm import backend as _backend

CPU_DTYPES = (torch.float32, torch.bfloat16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------- reference (the oracle)
def moe_permute_ref(x, expert_ids, num_experts):
    t, k = expert_ids.shape
    flat = expert_ids.reshape(-1).long()
    kept = flat >= 0
    order = torch.sort(torch.where(kept, flat, num_experts), stable=True).indices  # sorted row -> t*k + slot
    x_sorted = torch.where(kept[order].view(-1, 1), x[order // k], 0).to(x.dtype)
    row_index = torch.empty(t * k, dtype=torch.int32, device=x.device)
    row_index[order] = torch.arange(t * k, dtype=torch.int32, device=x.device)
    row_index = torch.where(kept, row_index, -1).view(t, k)
    counts = torch.bincount(flat[kept], minlength=num_experts)[:num_experts]
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    return x_sorted.contiguous(), row_index, offsets


def _token_rows(y, row_index, cdt):
    """(T, k, H) in cdt: each assignment's row of y, zeros where dropped."""
    t, k = row_index.shape
    rows = row_index.reshape(-1).long()
    picked = torch.where((rows >= 0).view(-1, 1), y[rows.clamp(min=0)].to(cdt), 0.0) if rows.numel() else \
        y.new_zeros(0, y.shape[1], dtype=cdt)
    return picked.view(t, k, y.shape[1])


def moe_permute_backward_ref(grad_sorted, row_index):
    cdt = torch.float64 if grad_sorted.dtype == torch.float64 else torch.float32
    return _token_rows(grad_sorted, row_index, cdt).sum(1).to(grad_sorted.dtype)


def moe_unpermute_ref(y_sorted, row_index, weights):
    cdt = torch.float64 if y_sorted.dtype == torch.float64 else torch.float32
    return (_token_rows(y_sorted, row_index, cdt) * weights.to(cdt).unsqueeze(-1)).sum(1).to(y_sorted.dtype)


def moe_unpermute_backward_ref(grad_out, y_sorted, row_index, weights):
    t, k = row_index.shape
    cdt = torch.float64 if y_sorted.dtype == torch.float64 else torch.float32
    rows = row_index.reshape(-1).long()
    kept = rows >= 0
    g = grad_out.to(cdt).repeat_interleave(k, 0)  # (T*k, H): grad_out of each assignment's token
    grad_y = torch.zeros(y_sorted.shape, dtype=cdt, device=y_sorted.device)
    grad_y[rows[kept]] = (g * weights.reshape(-1, 1).to(cdt))[kept]
    y_rows = torch.where(kept.view(-1, 1), y_sorted[rows.clamp(min=0)].to(cdt), 0.0) if rows.numel() else g
    grad_w = (y_rows * g).sum(-1).view(t, k)
    return grad_y.to(y_sorted.dtype), grad_w.to(weights.dtype)


def _triton(name):
    """The fastlm.triton.moe_permute launcher `name`, imported at the first call (TRITON_INTERPRET
    is read at import)."""
    def call(*args):
        from fastlm.triton import moe_permute as kernels

        return getattr(kernels, name)(*args)
    return call


_PERMUTE = _backend.implementations(reference=moe_permute_ref, triton=_triton("permute"), ext="moe_permute_fwd")
_PERMUTE_BWD = _backend.implementations(reference=moe_permute_backward_ref, triton=_triton("permute_backward"),
                                        ext="moe_permute_bwd")
_UNPERMUTE = _backend.implementations(reference=moe_unpermute_ref, triton=_triton("unpermute"),
                                      ext="moe_unpermute_fwd")
_UNPERMUTE_BWD = _backend.implementations(reference=moe_unpermute_backward_ref, triton=_triton("unpermute_backward"),
                                          ext="moe_unpermute_bwd")


# ---------------------------------------------------------------- custom ops + autograd
@torch.library.custom_op("fastlm::moe_permute", mutates_args=())
def _permute_op(x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int,
                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_PERMUTE[backend](x, expert_ids, num_experts))


def _permute_fake(x, expert_ids, num_experts):
    t, k = expert_ids.shape
    return (x.new_empty(t * k, x.shape[1]), expert_ids.new_empty(t, k, dtype=torch.int32),
            expert_ids.new_empty(num_experts + 1, dtype=torch.int32))


@_permute_op.register_fake
def _(x, expert_ids, num_experts, backend):
    return _permute_fake(x, expert_ids, num_experts)


@torch.library.custom_op("fastlm::moe_permute_backward", mutates_args=())
def _permute_backward_op(grad_sorted: torch.Tensor, row_index: torch.Tensor, backend: str) -> torch.Tensor:
    return _PERMUTE_BWD[backend](grad_sorted, row_index)


@_permute_backward_op.register_fake
def _(grad_sorted, row_index, backend):
    return grad_sorted.new_empty(row_index.shape[0], grad_sorted.shape[1])


def _permute_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.backend = inputs[-1]
    ctx.mark_non_differentiable(output[1], output[2])


def _permute_backward(ctx, grad_sorted, _rows, _offsets):
    (row_index,) = ctx.saved_tensors
    return _permute_backward_op(grad_sorted.contiguous(), row_index, ctx.backend), None, None, None


_permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)


@torch.library.custom_op("fastlm::moe_unpermute", mutates_args=())
def _unpermute_op(y_sorted: torch.Tensor, row_index: torch.Tensor, weights: torch.Tensor,
                  backend: str) -> torch.Tensor:
    return _UNPERMUTE[backend](y_sorted, row_index, weights)


@_unpermute_op.register_fake
def _(y_sorted, row_index, weights, backend):
    return y_sorted.new_empty(row_index.shape[0], y_sorted.shape[1])


@torch.library.custom_op("fastlm::moe_unpermute_backward", mutates_args=())
def _unpermute_backward_op(grad_out: torch.Tensor, y_sorted: torch.Tensor, row_index: torch.Tensor,
                           weights: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(_UNPERMUTE_BWD[backend](grad_out, y_sorted, row_index, weights))


@_unpermute_backward_op.register_fake
def _(grad_out, y_sorted, row_index, weights, backend):
    return y_sorted.new_empty(y_sorted.shape), weights.new_empty(row_index.shape)


def _unpermute_setup(ctx, inputs, output):
    y_sorted, row_index, weights, backend = inputs
    ctx.save_for_backward(y_sorted, row_index, weights)
    ctx.backend = backend


def _unpermute_backward(ctx, grad_out):
    y_sorted, row_index, weights = ctx.saved_tensors
    grad_y, grad_w = _unpermute_backward_op(grad_out.contiguous(), y_sorted, row_index, weights, ctx.backend)
    return grad_y, None, grad_w if ctx.needs_input_grad[2] else None, None


_unpermute_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


# ---------------------------------------------------------------- who can serve what
_backend.register_kernels(
    "moe_permute", lambda device: (torch.empty(16, 64, device=device), torch.zeros(16, 2, dtype=torch.int32,
                                                                                   device=device), 8),
    "moe_permute_fwd",
    cpu=CPU_DTYPES,
    triton=GPU_DTYPES,
    cuda=GPU_DTYPES,
)
_backend.register_kernels(
    "moe_unpermute", lambda device: (torch.empty(32, 64, device=device), torch.zeros(16, 2, dtype=torch.int32,
                                                                                     device=device)),
    "moe_unpermute_fwd",
    cpu=CPU_DTYPES,
    triton=GPU_DTYPES,
    cuda=GPU_DTYPES,
)


# ---------------------------------------------------------------- public entry points
def _check_rows(fn, name, ids, device):
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int32 or ids.dim() != 2:
        raise TypeError(f"{fn}: {name} must be an int32 (tokens, top_k) tensor, got "
                        f"{ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__}"
                        f"{' ' + str(tuple(ids.shape)) if isinstance(ids, torch.Tensor) else ''}")
    if ids.device != device:
        raise ValueError(f"{fn}: {name} is on {ids.device} but the rows are on {device}")


def _check_float_2d(fn, name, t):
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.dtype.is_floating_point:
        raise ValueError(f"{fn}: {name} must be a floating-point 2-D tensor, got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")


def moe_permute(x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, *, backend: str | None = None):
    """(x_sorted (T*k, H), row_index (T, k) int32, offsets (E+1,) int32); see the module docstring."""
    fn = "moe_permute"
    _check_float_2d(fn, "x", x)
    _check_rows(fn, "expert_ids", expert_ids, x.device)
    if expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"{fn}: expert_ids has {expert_ids.shape[0]} rows but x has {x.shape[0]} tokens")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"{fn}: num_experts must be an int >= 1, got {num_experts!r}")
    # values are checked where they live on the host; the GPU kernels treat ids outside [0, E) as dropped
    if not torch.compiler.is_compiling() and expert_ids.device.type == "cpu" and expert_ids.numel():
        lo, hi = int(expert_ids.min()), int(expert_ids.max())
        if lo < -1 or hi >= num_experts:
            raise ValueError(f"{fn}: expert_ids must be in [-1, {num_experts}) (-1: dropped), got values in "
                             f"[{lo}, {hi}]")
    chosen = _backend.select("moe_permute", x.device, x, expert_ids, num_experts, backend=backend)
    return _permute_op(x, expert_ids, num_experts, chosen)


def moe_unpermute(y_sorted: torch.Tensor, row_index: torch.Tensor, weights: torch.Tensor, *,
                  backend: str | None = None) -> torch.Tensor:
    """out (T, H) = routing-weighted sum of each token's expert rows; see the module docstring."""
    fn = "moe_unpermute"
    _check_float_2d(fn, "y_sorted", y_sorted)
    _check_rows(fn, "row_index", row_index, y_sorted.device)
    want = torch.float64 if y_sorted.dtype == torch.float64 else torch.float32
    if not isinstance(weights, torch.Tensor) or weights.shape != row_index.shape or weights.dtype != want:
        raise ValueError(f"{fn}: weights must be {want} of row_index's shape {tuple(row_index.shape)}, got "
                         f"{tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__}"
                         f"{' ' + str(weights.dtype) if isinstance(weights, torch.Tensor) else ''}")
    if weights.device != y_sorted.device:
        raise ValueError(f"{fn}: weights is on {weights.device} but y_sorted is on {y_sorted.device}")
    # (on the host only: the GPU kernels skip rows outside y_sorted)
    if (not torch.compiler.is_compiling() and row_index.device.type == "cpu" and row_index.numel()
            and int(row_index.max()) >= y_sorted.shape[0]):
        raise ValueError(f"{fn}: row_index holds row {int(row_index.max())} but y_sorted has "
                         f"{y_sorted.shape[0]} rows")
    chosen = _backend.select("moe_unpermute", y_sorted.device, y_sorted, row_index, backend=backend)
    return _unpermute_op(y_sorted, row_index, weights, chosen)


if _ext.HAS_EXTENSION and hasattr(torch.ops.fastlm, "moe_permute_fwd"):

    @torch.library.register_fake("fastlm::moe_permute_fwd")
    def _(x, expert_ids, num_experts):
        return _permute_fake(x, expert_ids, num_experts)

    @torch.library.register_fake("fastlm::moe_permute_bwd")
    def _(grad_sorted, row_index):
        return grad_sorted.new_empty(row_index.shape[0], grad_sorted.shape[1])

    @torch.library.register_fake("fastlm::moe_unpermute_fwd")
    def _(y_sorted, row_index, weights):
        return y_sorted.new_empty(row_index.shape[0], y_sorted.shape[1])

    @torch.library.register_fake("fastlm::moe_unpermute_bwd")
    def _(grad_out, y_sorted, row_index, weights):
        return y_sorted.new_empty(y_sorted.shape), weights.new_empty(row_index.shape)
