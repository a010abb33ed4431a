"""Transformer MLP blocks built on the fused linear (fastlm.ops.linear).

    fastlm.ops.mlp(x, w1, b1, w2, b2, *, activation="gelu", residual=None, backend=None)
        act(x @ w1^T + b1) @ w2^T + b2 (+ residual): the GPT-2 block; the activation rides in
        the first GEMM's epilogue, bias and residual in the second's.
    fastlm.ops.swiglu(x, w_gate, w_up, w_down, *, residual=None, backend=None)
    fastlm.ops.geglu(x, w_gate, w_up, w_down, *, approximate="none", residual=None, backend=None)
        (act(x @ w_gate^T) * (x @ w_up^T)) @ w_down^T (+ residual), act = silu / gelu (LLaMA /
        GEGLU; approximate="tanh" is Gemma's gelu_pytorch_tanh). The activation rides in the
        gate GEMM's epilogue, the residual in the down projection's; the gate * up product is
        one elementwise pass.
    fastlm.ops.gated_mlp(x, w_gate, w_up, w_down, *, activation="silu", b_gate=None, b_up=None,
                         b_down=None, residual=None, backend=None)
        the general form behind both, with biases (LLaMA's mlp_bias) and any fused activation.

Weights use torch.nn.Linear's layout (out_features, in_features). Every op here is a
composition of fastlm.ops.linear, so the backward is linear's (saved pre-activation, the
activation derivative fused with the bias-gradient reduction) chained by autograd, and
backend selection is linear's.
"""
from __future__ import annotations

import torch

from fastlm.ops.bias_act import ACTIVATIONS
from fastlm.ops.linear import linear


def _check_hidden(op, first, second, names):
    if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor) and first.dim() == 2 and second.dim() == 2:
        if second.shape[1] != first.shape[0]:
            raise ValueError(f"{op}: {names[1]} must have shape (out, {first.shape[0]}) to take {names[0]}'s "
                             f"{first.shape[0]} hidden features, got {tuple(second.shape)}")


def mlp(x, w1, b1, w2, b2, *, activation="gelu", residual=None, backend=None):
    """Linear -> act -> Linear (+ residual), each GEMM with its epilogue fused."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"mlp: unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
    _check_hidden("mlp", w1, w2, ("w1", "w2"))
    h = linear(x, w1, b1, activation=activation, backend=backend)
    return linear(h, w2, b2, residual=residual, backend=backend)


def _gated(op, activation, x, w_gate, w_up, w_down, biases, residual, backend):
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
    if isinstance(w_gate, torch.Tensor) and isinstance(w_up, torch.Tensor) and w_gate.shape != w_up.shape:
        raise ValueError(f"{op}: w_up must have w_gate's shape {tuple(w_gate.shape)}, got {tuple(w_up.shape)}")
    _check_hidden(op, w_gate, w_down, ("w_gate", "w_down"))
    b_gate, b_up, b_down = biases
    gate = linear(x, w_gate, b_gate, activation=activation, backend=backend)
    up = linear(x, w_up, b_up, backend=backend)
    return linear(gate * up, w_down, b_down, residual=residual, backend=backend)


def gated_mlp(x, w_gate, w_up, w_down, *, activation="silu", b_gate=None, b_up=None, b_down=None, residual=None,
              backend=None):
    """(act(x W_gate^T + b_gate) * (x W_up^T + b_up)) W_down^T + b_down (+ residual)."""
    return _gated("gated_mlp", activation, x, w_gate, w_up, w_down, (b_gate, b_up, b_down), residual, backend)


def swiglu(x, w_gate, w_up, w_down, *, residual=None, backend=None):
    """(silu(x W_gate^T) * (x W_up^T)) W_down^T (+ residual)."""
    return _gated("swiglu", "silu", x, w_gate, w_up, w_down, (None, None, None), residual, backend)


def geglu(x, w_gate, w_up, w_down, *, approximate="none", residual=None, backend=None):
    """(gelu(x W_gate^T) * (x W_up^T)) W_down^T (+ residual); approximate as torch's gelu."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"geglu: approximate must be 'none' or 'tanh', got {approximate!r}")
    act = "gelu" if approximate == "none" else "gelu_tanh"
    return _gated("geglu", act, x, w_gate, w_up, w_down, (None, None, None), residual, backend)


def mlp_ref(x, w1, b1, w2, b2, *, activation="gelu", residual=None):
    return mlp(x, w1, b1, w2, b2, activation=activation, residual=residual, backend="reference")
