"""bias_act: y = act(x + bias) over the last dimension, fused, forward and backward.

    fastlm.ops.bias_act(x, bias=None, activation="gelu", *, backend=None)

activation: "gelu" (erf form, torch's default), "gelu_tanh" (approximate="tanh"), "relu",
"silu". x has any leading shape; bias is (x.shape[-1],) or None. The backward recomputes
x + bias rather than saving it (one fewer tensor kept alive) and reduces grad_bias in the
same pass over the gradient.

Backends: cuda and triton (fp32/fp16/bf16, CUDA tensors), cpu (fp32/bf16), reference
(plain PyTorch, any float dtype, computed in fp32 or fp64 and rounded once).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastlm import _ext
from fastlm import backend as _backend

OP = "bias_act"
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.bfloat16)


# ---------------------------------------------------------------- reference (the oracle)
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def act_ref(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "relu":
        return F.relu(z)
    return F.silu(z)


def act_grad_ref(z: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(z)/dz, written out so the reference backward needs no autograd graph."""
    if activation == "gelu":
        cdf = 0.5 * torch.erfc(-z * math.sqrt(0.5))
        return cdf + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    if activation == "gelu_tanh":
        k, c = math.sqrt(2 / math.pi), 0.044715
        t = torch.tanh(k * (z + c * z**3))
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * c * z * z)
    if activation == "relu":
        return torch.where(z <= 0, 0.0, 1.0).to(z.dtype)
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def bias_act_ref(x: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "gelu") -> torch.Tensor:
    z = x.to(_compute_dtype(x))
    if bias is not None:
        z = z + bias.to(z.dtype)
    return act_ref(z, activation).to(x.dtype).contiguous()


def bias_act_backward_ref(grad_out, x, bias, activation):
    z = x.to(_compute_dtype(x))
    if bias is not None:
        z = z + bias.to(z.dtype)
    g = grad_out.to(z.dtype) * act_grad_ref(z, activation)
    if bias is None:
        grad_bias = x.new_empty(0)
    else:  # sum over every leading dim; a 1-D x has none
        grad_bias = g.flatten(0, -2).sum(0) if g.dim() > 1 else g.clone()
    return g.to(x.dtype).contiguous(), grad_bias.to(x.dtype)


# ---------------------------------------------------------------- per-backend kernels
def _triton_forward(x, bias, activation):
    from fastlm.triton import bias_act as kernels  # imported late: TRITON_INTERPRET is read at import

    return kernels.forward(x, bias, activation)


def _triton_backward(grad_out, x, bias, activation):
    from fastlm.triton import bias_act as kernels

    return kernels.backward(grad_out, x, bias, activation)


_FORWARD = _backend.implementations(
    reference=bias_act_ref, triton=_triton_forward, ext="bias_act_fwd"
)
_BACKWARD = _backend.implementations(
    reference=bias_act_backward_ref, triton=_triton_backward, ext="bias_act_bwd"
)


# ---------------------------------------------------------------- custom ops + autograd
@torch.library.custom_op("fastlm::bias_act", mutates_args=())
def _bias_act_op(x: torch.Tensor, bias: torch.Tensor | None, activation: str, backend: str) -> torch.Tensor:
    return _FORWARD[backend](x, bias, activation)


@_bias_act_op.register_fake
def _(x, bias, activation, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("fastlm::bias_act_backward", mutates_args=())
def _bias_act_backward_op(
    grad_out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, activation: str, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return _BACKWARD[backend](grad_out, x, bias, activation)


@_bias_act_backward_op.register_fake
def _(grad_out, x, bias, activation, backend):
    cols = x.shape[-1] if (bias is not None and x.dim()) else 0
    return x.new_empty(x.shape), x.new_empty(cols)


def _setup_context(ctx, inputs, output):
    x, bias, activation, backend = inputs
    ctx.save_for_backward(x, bias)
    ctx.activation, ctx.backend = activation, backend


def _backward(ctx, grad_out):
    x, bias = ctx.saved_tensors
    grad_x, grad_bias = _bias_act_backward_op(grad_out, x, bias, ctx.activation, ctx.backend)
    return grad_x, (grad_bias if bias is not None else None), None, None


_bias_act_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- who can serve what
def _example(device: torch.device):
    return (torch.empty(8, 64, device=device), torch.empty(64, device=device), "gelu")


_backend.register_by_dtype(OP, _example, CPU_DTYPES, GPU_DTYPES)


# ---------------------------------------------------------------- public entry point
def _check_inputs(x, bias, activation):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"bias_act: x must be a torch.Tensor, got {type(x).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"bias_act: unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"bias_act: x must be a floating-point tensor, got dtype {x.dtype}")
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias_act: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if x.dim() == 0:
        raise ValueError("bias_act: bias given but x is 0-dimensional")
    if bias.device != x.device:
        raise ValueError(f"bias_act: bias is on {bias.device} but x is on {x.device}")
    if bias.dtype != x.dtype:
        raise TypeError(f"bias_act: bias has dtype {bias.dtype} but x has dtype {x.dtype}")
    if bias.dim() != 1 or bias.shape[0] != x.shape[-1]:
        raise ValueError(
            f"bias_act: bias must have shape ({x.shape[-1]},) to match the last dim of x {tuple(x.shape)}, "
            f"got {tuple(bias.shape)}"
        )


def bias_act(
    x: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "gelu", *, backend: str | None = None
) -> torch.Tensor:
    """act(x + bias) in one pass; differentiable in x and bias. See the module docstring."""
    _check_inputs(x, bias, activation)
    chosen = _backend.select(OP, x.device, x, bias, activation, backend=backend)
    return _bias_act_op(x, bias, activation, chosen)


# Shapes of the raw extension ops, so they too trace under torch.compile and pass opcheck.
if _ext.HAS_EXTENSION:

    @torch.library.register_fake("fastlm::bias_act_fwd")
    def _(x, bias, activation):
        return x.new_empty(x.shape)

    @torch.library.register_fake("fastlm::bias_act_bwd")
    def _(grad_out, x, bias, activation):
        return x.new_empty(x.shape), x.new_empty(x.shape[-1] if (bias is not None and x.dim()) else 0)
