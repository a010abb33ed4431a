"""grouped_linear: one linear layer per expert over expert-contiguous rows, in one call.

    fastlm.ops.grouped_linear(x_sorted, weight, offsets, *, bias=None, activation=None, backend=None)
    fastlm.ops.grouped_swiglu(x_sorted, weight_gate_up, offsets, *, bias=None, backend=None)

x_sorted (N, K) holds the rows of expert e at offsets[e]:offsets[e+1] (moe_permute's output);
weight (E, N_w, K) and bias (E, N_w) stack the experts' nn.Linear weights (HF Mixtral's
gate_up_proj / down_proj layout). Row r of expert e: act(x_r @ weight[e]^T + bias[e]).
activation: None, "gelu", "gelu_tanh", "relu", "silu" (elementwise: out (N, N_w)), or gated
"swiglu" / "geglu": the first half of the N_w outputs is the gate, the second the up projection
(HF's concatenated gate_up_proj), out (N, N_w / 2) = act(gate) * up. Rows past offsets[E] (the
dropped tail moe_permute leaves) give 0. Experts with no rows cost nothing, and one-row experts
are fine. The weight may be any strided view; grad_weight comes back in its layout
(torch.empty_like's: the same strides where it is dense, the same order of strides otherwise), so
GPT-OSS's (E, in, out) experts passed as their (E, out, in) transpose get their gradient with no
copy: autograd's transpose hands the parameter a gradient already in its own layout.

The epilogue (bias, activation, gating) is fused: it runs on each expert's output block right
after its GEMM, while the block is cache-hot, instead of a second pass over (N, N_w) per op. The
forward keeps the pre-activation for the backward when there is an activation and a gradient is
wanted, as linear does: recomputing it would cost a whole second GEMM. Without a gradient each
expert's GEMM output lands in one reused scratch block instead (no (N, N_w) write nobody reads).

Backends: cpu (one call: torch's GEMM per expert slice, csrc/cpu/moe_grouped_linear.cpp's fused epilogue),
triton (fastlm/triton/grouped_linear.py: one launch over all experts, the tile schedule found
on the device), reference (a loop over experts in fp32), cuda (csrc/cuda/moe_grouped_linear.cu,
fp16/bf16 on the tensor-core GEMM core: one launch over all experts, each CTA finding its
(expert, m-tile) from the offsets on the device; the gated form's CTAs hold matching gate and up
columns, so act(gate) * up is formed in the epilogue; backward: grad_p once, then grouped dX and a
per-expert dW reduction).
"""
from __future__ import annotations

import torch

from fastlm import _ext
from fastlm import backend as _backend
from fastlm.ops.bias_act import ACTIVATIONS, act_grad_ref, act_ref

OP = "grouped_linear"
CPU_DTYPES = (torch.float32, torch.bfloat16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GATED = {"swiglu": "silu", "geglu": "gelu"}


# ---------------------------------------------------------------- reference (the oracle)
def _cdt(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _expert_rows(offsets):
    bounds = offsets.tolist()
    return [(e, bounds[e], bounds[e + 1]) for e in range(len(bounds) - 1) if bounds[e + 1] > bounds[e]]


def _activate(p, activation):
    if activation == "none":
        return p
    if activation in GATED:
        gate, up = p.chunk(2, dim=-1)
        return act_ref(gate, GATED[activation]) * up
    return act_ref(p, activation)


def grouped_linear_ref(x, weight, offsets, bias, activation="none", save_pre=True):
    """(out, pre): pre is the pre-activation (x's dtype) when there is an activation and save_pre,
    else empty."""
    cdt, n_w = _cdt(x), weight.shape[1]
    p = torch.zeros(x.shape[0], n_w, dtype=cdt, device=x.device)
    for e, lo, hi in _expert_rows(offsets):
        p[lo:hi] = x[lo:hi].to(cdt) @ weight[e].to(cdt).t()
        if bias is not None:
            p[lo:hi] += bias[e].to(cdt)
    out = _activate(p, activation)
    pre = p.to(x.dtype) if activation != "none" and save_pre else x.new_empty(0)
    return out.to(x.dtype), pre


def grouped_linear_backward_ref(grad_out, x, weight, offsets, pre, activation, has_bias):
    cdt = _cdt(x)
    g = grad_out.to(cdt)
    if activation in GATED:
        gate, up = pre.to(cdt).chunk(2, dim=-1)
        act = GATED[activation]
        g = torch.cat([g * up * act_grad_ref(gate, act), g * act_ref(gate, act)], dim=-1)
    elif activation != "none":
        g = g * act_grad_ref(pre.to(cdt), activation)
    grad_x = torch.zeros(x.shape, dtype=cdt, device=x.device)
    grad_w = torch.zeros_like(weight, dtype=cdt)  # weight's own layout, as every backend returns it
    grad_b = torch.zeros(weight.shape[:2], dtype=cdt, device=x.device)
    for e, lo, hi in _expert_rows(offsets):
        grad_x[lo:hi] = g[lo:hi] @ weight[e].to(cdt)
        grad_w[e] = g[lo:hi].t() @ x[lo:hi].to(cdt)
        grad_b[e] = g[lo:hi].sum(0)
    return grad_x.to(x.dtype), grad_w.to(weight.dtype), grad_b.to(weight.dtype) if has_bias else x.new_empty(0)


def _triton_forward(x, weight, offsets, bias, activation, save_pre):
    from fastlm.triton import grouped_linear as kernels  # imported late: TRITON_INTERPRET is read at import

    return kernels.forward(x, weight, offsets, bias, activation, save_pre)


def _triton_backward(grad_out, x, weight, offsets, pre, activation, has_bias):
    from fastlm.triton import grouped_linear as kernels

    return kernels.backward(grad_out, x, weight, offsets, pre, activation, has_bias)


_FORWARD = _backend.implementations(reference=grouped_linear_ref, triton=_triton_forward, ext="grouped_linear_fwd")
_BACKWARD = _backend.implementations(reference=grouped_linear_backward_ref, triton=_triton_backward,
                                     ext="grouped_linear_bwd")


# ---------------------------------------------------------------- custom ops + autograd
def _out_cols(weight, activation):
    return weight.shape[1] // 2 if activation in GATED else weight.shape[1]


@torch.library.custom_op("fastlm::grouped_linear", mutates_args=())
def _grouped_op(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None,
                activation: str, save_pre: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(_FORWARD[backend](x, weight, offsets, bias, activation, save_pre))


def _fake(x, weight, offsets, bias, activation, save_pre=True):
    pre = x.new_empty(x.shape[0], weight.shape[1]) if activation != "none" and save_pre else x.new_empty(0)
    return x.new_empty(x.shape[0], _out_cols(weight, activation)), pre


@_grouped_op.register_fake
def _(x, weight, offsets, bias, activation, save_pre, backend):
    return _fake(x, weight, offsets, bias, activation, save_pre)


@torch.library.custom_op("fastlm::grouped_linear_backward", mutates_args=())
def _grouped_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                         pre: torch.Tensor, activation: str, has_bias: bool,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_BACKWARD[backend](grad_out, x, weight, offsets, pre, activation, has_bias))


def _backward_fake(grad_out, x, weight, offsets, pre, activation, has_bias):
    return (x.new_empty(x.shape), torch.empty_like(weight),
            weight.new_empty(weight.shape[:2]) if has_bias else x.new_empty(0))


@_grouped_backward_op.register_fake
def _(grad_out, x, weight, offsets, pre, activation, has_bias, backend):
    return _backward_fake(grad_out, x, weight, offsets, pre, activation, has_bias)


def _setup_context(ctx, inputs, output):
    x, weight, offsets, bias, activation, _save_pre, backend = inputs
    ctx.save_for_backward(x, weight, offsets, output[1])
    ctx.args = (activation, bias is not None, backend)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_pre):
    x, weight, offsets, pre = ctx.saved_tensors
    activation, has_bias, backend = ctx.args
    grad_x, grad_w, grad_b = _grouped_backward_op(grad_out.contiguous(), x, weight, offsets, pre, activation,
                                                  has_bias, backend)
    return grad_x, grad_w, None, grad_b if has_bias else None, None, None, None


_grouped_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- who can serve what
def _example(device):
    x = torch.empty(16, 64, device=device)
    return (x, torch.empty(4, 32, 64, device=device), torch.tensor([0, 4, 4, 10, 16], dtype=torch.int32,
                                                                     device=device))


_backend.register_kernels(
    OP, _example, "grouped_linear_fwd",
    cpu=CPU_DTYPES,
    triton=GPU_DTYPES,
    cuda=(torch.float16, torch.bfloat16),
)


# ---------------------------------------------------------------- public entry point
def _check(x, weight, offsets, bias, activation):
    fn = "grouped_linear"
    if activation not in ("none",) + ACTIVATIONS + tuple(GATED):
        raise ValueError(f"{fn}: unknown activation {activation!r}; expected None or one of "
                         f"{', '.join(ACTIVATIONS + tuple(GATED))}")
    for name, t, dims in (("x", x, 2), ("weight", weight, 3)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims or not t.dtype.is_floating_point:
            want = "(rows, in_features)" if dims == 2 else "(experts, out_features, in_features)"
            raise ValueError(f"{fn}: {name} must be a floating-point {want} tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise TypeError(f"{fn}: weight is {weight.dtype} on {weight.device} but x is {x.dtype} on {x.device}")
    if weight.shape[2] != x.shape[1]:
        raise ValueError(f"{fn}: weight's in_features {weight.shape[2]} != x's {x.shape[1]}")
    if activation in GATED and weight.shape[1] % 2:
        raise ValueError(f"{fn}: activation {activation!r} splits weight's {weight.shape[1]} outputs into gate and "
                         "up halves: it must be even")
    e = weight.shape[0]
    if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.int32 or offsets.shape != (e + 1,):
        raise TypeError(f"{fn}: offsets must be an int32 ({e + 1},) tensor (experts + 1), got "
                        f"{offsets.dtype if isinstance(offsets, torch.Tensor) else type(offsets).__name__}"
                        f"{' ' + str(tuple(offsets.shape)) if isinstance(offsets, torch.Tensor) else ''}")
    if offsets.device != x.device:
        raise ValueError(f"{fn}: offsets is on {offsets.device} but x is on {x.device}")
    # values are checked on the host only where they live there (no device sync); the GPU kernels
    # clamp offsets into [0, N], so bad ones give wrong rows but no out-of-bounds access
    if not torch.compiler.is_compiling() and offsets.device.type == "cpu":
        host = offsets.tolist()
        if host[0] != 0 or any(b < a for a, b in zip(host, host[1:])) or host[-1] > x.shape[0]:
            raise ValueError(f"{fn}: offsets must rise from 0 and end at most at x's {x.shape[0]} rows, got {host}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:2]
                             or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"{fn}: bias must be {tuple(weight.shape[:2])} {x.dtype} on {x.device}, got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")


def grouped_linear(x_sorted: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, *,
                   bias: torch.Tensor | None = None, activation: str | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """Each expert's rows through its own linear layer (+ activation), one call; see the module docstring."""
    activation = "none" if activation is None else activation
    _check(x_sorted, weight, offsets, bias, activation)
    chosen = _backend.select(OP, x_sorted.device, x_sorted, weight, offsets, backend=backend)
    # the pre-activation is kept only when a backward will read it
    save_pre = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x_sorted, weight, bias))
    return _grouped_op(x_sorted, weight, offsets, bias, activation, save_pre, chosen)[0]


def grouped_swiglu(x_sorted: torch.Tensor, weight_gate_up: torch.Tensor, offsets: torch.Tensor, *,
                   bias: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """silu(x W_gate^T) * (x W_up^T) per expert, W_gate / W_up the two halves of weight_gate_up
    (E, 2 * I, K): Mixtral's and Qwen-MoE's expert up-projection."""
    return grouped_linear(x_sorted, weight_gate_up, offsets, bias=bias, activation="swiglu", backend=backend)


if _ext.HAS_EXTENSION and hasattr(torch.ops.fastlm, "grouped_linear_fwd"):

    @torch.library.register_fake("fastlm::grouped_linear_fwd")
    def _(x, weight, offsets, bias, activation="none", save_pre=True):
        return _fake(x, weight, offsets, bias, activation, save_pre)

    @torch.library.register_fake("fastlm::grouped_linear_bwd")
    def _(grad_out, x, weight, offsets, pre, activation, has_bias):
        return _backward_fake(grad_out, x, weight, offsets, pre, activation, has_bias)
