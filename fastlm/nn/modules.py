"""Drop-in twins of torch.nn layers that run on fastlm ops.

Same constructor arguments, parameter/buffer names and state_dict keys as the torch.nn
namesake (each class subclasses it), so `load_state_dict` works both ways. Extra keyword
arguments only add: `backend=` everywhere, `activation=` on Linear, `residual=` on the norms'
forward. Cases the fused ops don't cover take torch's own path (the reference), as noted on
each class.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastlm import ops
from fastlm.nn._base import FastModule, check_activation, check_backend
from fastlm.ops.linear_prepacked import PackedWeight, applies, prepack_available, prepacked_forward


class Linear(FastModule, nn.Linear):
    """nn.Linear; `activation=` ("gelu", "gelu_tanh", "relu", "silu") is fused into the GEMM
    epilogue, and `forward(x, residual=None)` adds a residual in the same pass."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, activation=None, backend=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.activation = check_activation(activation)
        self.backend = check_backend(backend)

    def _fastlm_adopt(self, activation=None):
        self.activation = check_activation(activation)

    def prepack(self, enabled: bool = True) -> bool:
        """CPU float32 inference: keep the weight packed in the GEMM's layout instead of re-packing
        it on every call (fastlm/ops/linear_prepacked.py: about 2x the weight's memory; repacked
        when the weight's version changes; call again after writes through `weight.data`).
        Returns whether prepacking is on; it is unavailable where torch exports no MKL."""
        on = enabled and prepack_available()
        self._packed = PackedWeight() if on else None
        return on

    def forward(self, input, residual=None):
        packed = getattr(self, "_packed", None)
        if packed is not None and applies(input, self.weight, self.backend):
            return prepacked_forward(input, packed, self.weight, self.bias, self.activation, residual)
        return self._run(ops.linear, input, self.weight, self.bias, activation=self.activation, residual=residual)

    def extra_repr(self):
        act = "" if self.activation is None else f", activation={self.activation!r}"
        return super().extra_repr() + act + self._backend_repr()


class LayerNorm(FastModule, nn.LayerNorm):
    """nn.LayerNorm; `forward(x, residual)` returns (norm(x + residual), x + residual) in one pass."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None, dtype=None, *, backend=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.backend = check_backend(backend)

    def forward(self, input, residual=None):
        return self._run(ops.layer_norm, input, self.normalized_shape, self.weight, self.bias, self.eps, residual=residual)

    def extra_repr(self):
        return super().extra_repr() + self._backend_repr()


class RMSNorm(FastModule, nn.RMSNorm):
    """nn.RMSNorm; `forward(x, residual)` returns (norm(x + residual), x + residual) in one pass."""

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None, *, backend=None):
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.backend = check_backend(backend)

    def forward(self, input, residual=None):
        return self._run(ops.rms_norm, input, self.normalized_shape, self.weight, self.eps, residual=residual)

    def extra_repr(self):
        return super().extra_repr() + self._backend_repr()


class _Activation(FastModule):
    """Elementwise activation through fastlm.ops.bias_act (each subclass names it in `_act`).
    `inplace=True` (ReLU, SiLU) takes torch's own in-place path: the fused op writes a new tensor."""

    def forward(self, input):
        if getattr(self, "inplace", False):
            return super().forward(input)
        return self._run(ops.bias_act, input, None, self._act())


class GELU(_Activation, nn.GELU):
    def __init__(self, approximate="none", *, backend=None):
        super().__init__(approximate)
        self.backend = check_backend(backend)

    def _act(self):
        return "gelu" if self.approximate == "none" else "gelu_tanh"


class ReLU(_Activation, nn.ReLU):
    def __init__(self, inplace=False, *, backend=None):
        super().__init__(inplace)
        self.backend = check_backend(backend)

    def _act(self):
        return "relu"


class SiLU(_Activation, nn.SiLU):
    def __init__(self, inplace=False, *, backend=None):
        super().__init__(inplace)
        self.backend = check_backend(backend)

    def _act(self):
        return "silu"


ACTIVATION_MODULES = {"gelu": GELU, "gelu_tanh": lambda **kw: GELU("tanh", **kw), "relu": ReLU, "silu": SiLU}


class Softmax(FastModule, nn.Softmax):
    """nn.Softmax; dim=None picks torch's legacy implicit dim, as nn.Softmax does."""

    def __init__(self, dim=None, *, backend=None):
        super().__init__(dim)
        self.backend = check_backend(backend)

    def forward(self, input):
        dim = self.dim if self.dim is not None else F._get_softmax_dim("softmax", input.dim(), 3)
        return self._run(ops.softmax, input, dim)


class CrossEntropyLoss(FastModule, nn.CrossEntropyLoss):
    """nn.CrossEntropyLoss over class-index targets, fused. Class-probability targets (a
    floating-point target) take torch's path. (N, C, d1, ...) inputs are moved to (N*d1*..., C)."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                 label_smoothing=0.0, *, backend=None):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.backend = check_backend(backend)

    def forward(self, input, target):
        if target.is_floating_point():
            return super().forward(input, target)
        shape = target.shape  # (N,), (N, d1, ...) or () unbatched
        if input.dim() == 1:  # unbatched: (C,), target ()
            input, target = input.unsqueeze(0), target.unsqueeze(0)  # (1, C), (1,)
        if input.dim() > 2:
            input = input.movedim(1, -1).reshape(-1, input.shape[1])  # (N, C, d...) -> (N*d..., C)
            target = target.reshape(-1)  # (N, d...) -> (N*d...,)
        loss = self._run(ops.cross_entropy, input, target, self.weight, self.ignore_index, self.reduction,
                         self.label_smoothing)
        if self.reduction == "none":
            loss = loss.reshape(shape)  # (N*d...,) -> (N, d...), or () for an unbatched input
        return loss


class MLP(FastModule, nn.Sequential):
    """Linear -> activation -> Linear as one fused op (fastlm.ops.mlp).

    An nn.Sequential of (Linear, activation, Linear), so its state_dict keys are those of
    `nn.Sequential(nn.Linear(i, h), nn.GELU(), nn.Linear(h, o))`: 0.weight, 0.bias, 2.weight,
    2.bias, and it loads that module's state_dict both ways. activation: "gelu", "gelu_tanh",
    "relu" or "silu".
    """

    def __init__(self, in_features, hidden_features, out_features=None, bias=True, activation="gelu",
                 device=None, dtype=None, *, backend=None):
        act = check_activation(activation, allow_none=False)
        kw = dict(device=device, dtype=dtype, backend=backend)
        super().__init__(
            Linear(in_features, hidden_features, bias, **kw),
            ACTIVATION_MODULES[act](backend=backend),
            Linear(hidden_features, out_features or in_features, bias, **kw),
        )
        self.activation = act
        self.backend = check_backend(backend)

    def forward(self, input):
        fc1, fc2 = self[0], self[2]
        return self._run(ops.mlp, input, fc1.weight, fc1.bias, fc2.weight, fc2.bias, activation=self.activation)

    def extra_repr(self):
        return f"activation={self.activation!r}" + self._backend_repr()
