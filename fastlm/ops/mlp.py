"""Transformer MLP blocks built on the fused linear (fastlm.ops.linear).

    fastlm.ops.mlp(x, w1, b1, w2, b2, *, activation="gelu", residual=None, backend=None)
        act(x @ w1^T + b1) @ w2^T + b2 (+ residual): the GPT-2 block; the activation rides in
        the first GEMM's epilogue, bias and residual in the second's.
    fastlm.ops.swiglu(x, w_gate, w_up, w_down, *, residual=None, backend=None)
    fastlm.ops.geglu(x, w_gate, w_up, w_down, *, residual=None, backend=None)
        (act(x @ w_gate^T) * (x @ w_up^T)) @ w_down^T (+ residual), act = silu / gelu (LLaMA /
        GEGLU). The activation rides in the gate GEMM's epilogue, the residual in the down
        projection's; the gate * up product is one elementwise pass.

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


def _gated(op, activation, x, w_gate, w_up, w_down, residual, backend):
    if isinstance(w_gate, torch.Tensor) and isinstance(w_up, torch.Tensor) and w_gate.shape != w_up.shape:
        raise ValueError(f"{op}: w_up must have w_gate's shape {tuple(w_gate.shape)}, got {tuple(w_up.shape)}")
    _check_hidden(op, w_gate, w_down, ("w_gate", "w_down"))
    gate = linear(x, w_gate, activation=activation, backend=backend)
    up = linear(x, w_up, backend=backend)
    return linear(gate * up, w_down, residual=residual, backend=backend)


def swiglu(x, w_gate, w_up, w_down, *, residual=None, backend=None):
    """(silu(x W_gate^T) * (x W_up^T)) W_down^T (+ residual)."""
    return _gated("swiglu", "silu", x, w_gate, w_up, w_down, residual, backend)


def geglu(x, w_gate, w_up, w_down, *, residual=None, backend=None):
    """(gelu(x W_gate^T) * (x W_up^T)) W_down^T (+ residual)."""
    return _gated("geglu", "gelu", x, w_gate, w_up, w_down, residual, backend)


def mlp_ref(x, w1, b1, w2, b2, *, activation="gelu", residual=None):
    return mlp(x, w1, b1, w2, b2, activation=activation, residual=residual, backend="reference")
