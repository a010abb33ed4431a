"""linear: y = act(x @ weight^T + bias) + residual, the epilogue fused into the GEMM's store.

    fastlm.ops.linear(x, weight, bias=None, *, activation=None, residual=None, backend=None)

activation: None, "gelu", "gelu_tanh", "relu", "silu". x is (..., K), weight (N, K), bias (N,),
residual (..., N).

Backward, and what is saved: the forward keeps the pre-activation p = x @ weight^T + bias
(rounded once to the dtype, as eager's linear output is) when an activation is applied and a
gradient may be needed. Recomputing it instead would cost a whole second GEMM (2·M·N·K
flops) to save one (M, N) store. p is exactly what bias_act's backward consumes:
grad_p = grad_y · act'(p), with grad_bias = Σ_rows grad_p reduced in the same pass (a zero
bias vector of N elements is passed so that pass does the reduction); then
dX = grad_p @ weight and dW = grad_pᵀ @ x (every backend). grad_residual is grad_y. Without an activation
nothing extra is saved and grad_p is grad_y itself.

Backends:
- cpu (fp32, bf16): torch's CPU GEMM (MKL / oneDNN) into the output, then one fused
  epilogue pass over it, in place (csrc/cpu/linear.cpp). Backward GEMMs: torch.mm.
- triton (fp32/fp16/bf16 on GPU; fp32/fp16 in the interpreter, whose bf16 tl.dot is wrong):
  one tl.dot GEMM with the epilogue before its store, autotuned. Backward: bias_act's pass for
  grad_p (with an activation), then the same kernel by strides for dX and dW; without an
  activation grad_bias is summed inside the dW launch.
- cuda (fp16/bf16, N and K multiples of 8): hand-written mma.sync tensor-core GEMM with the
  epilogue (csrc/cuda/gemm_core.cuh, csrc/cuda/linear.cu: 128x128x64 tiles, 3-stage cp.async,
  swizzled shared memory, epilogue staged through shared memory with 16-byte stores; split-K
  over a fp32 workspace for M <= 64).
  Backward: grad_p written once by bias_act's backward, then dX and dW on the same GEMM core,
  reading grad_p, x and weight in place through its transposed (ldmatrix.trans) layouts.
- reference: plain PyTorch in fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import math

import torch

from fastlm import _ext
from fastlm import backend as _backend
from fastlm.ops.bias_act import ACTIVATIONS, act_ref, bias_act_backward_ref

OP = "linear"
CPU_DTYPES = (torch.float32, torch.bfloat16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA_DTYPES = (torch.float16, torch.bfloat16)


def _cdt(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _act_name(activation):
    return "none" if activation is None else activation


# ---------------------------------------------------------------- reference (the oracle)
def linear_fwd_ref(x, weight, bias, residual, activation: str, save_preact: bool):
    z = x.to(_cdt(x)) @ weight.to(_cdt(x)).t()
    if bias is not None:
        z = z + bias.to(z.dtype)
    p = z.to(x.dtype)  # rounded once, like eager's linear output
    y = act_ref(p.to(z.dtype), activation) if activation != "none" else z
    if residual is not None:
        y = y + residual.to(y.dtype)
    return y.to(x.dtype).contiguous(), (p.contiguous() if save_preact else x.new_empty(0))


def _grad_p(grad_y, preact, bias, activation, bias_act_backward):
    """grad_p = grad_y * act'(preact) and grad_bias = its column sums, one bias_act backward pass."""
    if activation == "none":
        return grad_y, (grad_y.sum(0) if bias is not None else grad_y.new_empty(0))
    zero_bias = preact.new_zeros(preact.shape[1]) if bias is not None else None
    return bias_act_backward(grad_y, preact, zero_bias, activation)


def linear_bwd_ref(grad_y, x, weight, bias, preact, activation: str):
    gz, gb = _grad_p(grad_y, preact, bias, activation, bias_act_backward_ref)
    cdt = _cdt(x)
    gx = (gz.to(cdt) @ weight.to(cdt)).to(x.dtype)
    gw = (gz.to(cdt).t() @ x.to(cdt)).to(x.dtype)
    return gx, gw, gb


# ---------------------------------------------------------------- per-backend kernels
def _triton_forward(x, weight, bias, residual, activation, save_preact):
    from fastlm.triton import linear as kernels  # imported late: TRITON_INTERPRET is read at import

    return kernels.forward(x, weight, bias, residual, None if activation == "none" else activation, save_preact)


def _ext_forward(x, weight, bias, residual, activation, save_preact, ops=torch.ops.fastlm):
    return ops.linear_fwd(x, weight, bias, residual, activation, save_preact)


def _triton_backward(grad_y, x, weight, bias, preact, activation):
    from fastlm.triton import linear as kernels

    return kernels.backward(grad_y, x, weight, bias, preact, activation)


def _cpu_backward(grad_y, x, weight, bias, preact, activation):
    gz, gb = _grad_p(grad_y, preact, bias, activation, torch.ops.fastlm.bias_act_bwd)
    return gz @ weight, gz.t() @ x, gb


def _cuda_backward(grad_y, x, weight, bias, preact, activation, ops=torch.ops.fastlm):
    gz, gb = _grad_p(grad_y, preact, bias, activation, ops.bias_act_bwd)
    gx, gw = ops.linear_bwd(gz, x, weight)
    return gx, gw, gb


_FORWARD = _backend.implementations(
    reference=linear_fwd_ref, triton=_triton_forward, cpu=_ext_forward, cuda=_ext_forward
)
_BACKWARD = _backend.implementations(
    reference=linear_bwd_ref, triton=_triton_backward, cpu=_cpu_backward, cuda=_cuda_backward
)


# ---------------------------------------------------------------- custom ops + autograd
@torch.library.custom_op("fastlm::linear", mutates_args=())
def _linear_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
    activation: str, save_preact: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _FORWARD[backend](x, weight, bias, residual, activation, save_preact)


def _fake_forward(x, weight, bias, residual, activation, save_preact, *rest):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if save_preact else (0,))


_linear_op.register_fake(_fake_forward)


@torch.library.custom_op("fastlm::linear_backward", mutates_args=())
def _linear_backward_op(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    preact: torch.Tensor, activation: str, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gx, gw, gb = _BACKWARD[backend](grad_y, x, weight, bias, preact, activation)
    return gx.contiguous(), gw.contiguous(), gb.contiguous()


@_linear_backward_op.register_fake
def _(grad_y, x, weight, bias, preact, activation, backend):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), x.new_empty(weight.shape[0] if bias is not None else 0)


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, activation, save_preact, backend = inputs
    ctx.save_for_backward(x, weight, bias, output[1])
    ctx.activation, ctx.backend, ctx.has_residual, ctx.saved_preact = activation, backend, residual is not None, save_preact


def _backward(ctx, grad_y, grad_preact):
    x, weight, bias, preact = ctx.saved_tensors
    if ctx.activation != "none" and not ctx.saved_preact:
        raise RuntimeError("fastlm.linear: backward needs the pre-activation, which was not saved "
                           "(the forward ran with gradients disabled)")
    gx, gw, gb = _linear_backward_op(grad_y, x, weight, bias, preact, ctx.activation, ctx.backend)
    return gx, gw, (gb if bias is not None else None), (grad_y if ctx.has_residual else None), None, None, None


_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- who can serve what
def _example(device):
    return (torch.empty(8, 64, device=device), torch.empty(32, 64, device=device))


@_backend.register(OP, "reference", example=_example)
def _(x, weight):
    return [] if x.dtype.is_floating_point else [f"dtype {x.dtype} is not floating point"]


@_backend.register(OP, "cpu")
def _(x, weight):
    return _backend.dtype_reason(x, CPU_DTYPES, "cpu")


@_backend.register(OP, "triton")
def _(x, weight):
    reasons = _backend.dtype_reason(x, GPU_DTYPES, "triton")
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        reasons.append("the Triton interpreter computes tl.dot wrongly for bfloat16 operands (bf16 runs on GPU only)")
    return reasons


@_backend.register(OP, "cuda")
def _(x, weight):
    reasons = _backend.dtype_reason(x, CUDA_DTYPES, "cuda")
    n, k = weight.shape
    if n % 8 or k % 8:
        reasons.append(f"the tensor-core GEMM needs N and K multiples of 8, got N={n}, K={k}")
    return reasons


# ---------------------------------------------------------------- public entry point
def _check(x, weight, bias, residual, activation):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"linear: x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"linear: weight must be a torch.Tensor, got {type(weight).__name__}")
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"linear: unknown activation {activation!r}; expected None or one of {', '.join(ACTIVATIONS)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"linear: x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError("linear: x must have at least 1 dimension, got a 0-dimensional tensor")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"linear: weight must have shape (N, {x.shape[-1]}) to match the last dim of x "
                         f"{tuple(x.shape)}, got {tuple(weight.shape)}")
    n = weight.shape[0]
    for name, t, want in (("weight", weight, None), ("bias", bias, (n,)), ("residual", residual, tuple(x.shape[:-1]) + (n,))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"linear: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"linear: {name} is on {t.device} but x is on {x.device}")
        if t.dtype != x.dtype:
            raise TypeError(f"linear: {name} has dtype {t.dtype} but x has dtype {x.dtype}")
        if want is not None and tuple(t.shape) != want:
            raise ValueError(f"linear: {name} must have shape {want}, got {tuple(t.shape)}")


def linear(x, weight, bias=None, *, activation=None, residual=None, backend=None):
    """act(x @ weight^T + bias) + residual; differentiable in all four tensors. See the module docstring."""
    _check(x, weight, bias, residual, activation)
    n, k = weight.shape
    rows = math.prod(x.shape[:-1])  # not -1: K may be 0
    x2 = x.reshape(rows, k)
    r2 = residual.reshape(rows, n) if residual is not None else None
    chosen = _backend.select(OP, x.device, x2, weight, backend=backend)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual))
    save_preact = activation is not None and needs_grad
    y, _ = _linear_op(x2, weight, bias, r2, _act_name(activation), save_preact, chosen)
    return y.view(*x.shape[:-1], n)


def linear_ref(x, weight, bias=None, *, activation=None, residual=None):
    return linear(x, weight, bias, activation=activation, residual=residual, backend="reference")


if _ext.HAS_EXTENSION:
    torch.library.register_fake("fastlm::linear_fwd")(_fake_forward)
    if hasattr(torch.ops.fastlm, "linear_bwd"):  # the cuda build's backward GEMMs (dX, dW)

        @torch.library.register_fake("fastlm::linear_bwd")
        def _(grad_p, x, weight):
            return x.new_empty(x.shape), weight.new_empty(weight.shape)
