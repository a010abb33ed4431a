"""linear with a prepacked weight: CPU float32 inference.

Every GEMM call re-packs its weight into the BLAS kernel's panel layout, a read and a write of
the whole weight; at GPT-2's 512 tokens on a 2-core CPU that is 12-15% of each layer's GEMM.
`PackedWeight` keeps the packed copy (MKL's packed-GEMM format, about twice the weight's bytes)
and `linear_prepacked` runs the GEMM on it, then fastlm's fused epilogue pass, like the cpu
backend of `fastlm.ops.linear`. `fastlm.nn.Linear.prepack()` wires the two together; this is
the same idea as IPEX's `ipex.optimize` or inductor's CPU freezing, opt-in for the same reason:

The pack goes stale when the weight changes. It is rebuilt when the weight's storage or its
version counter changes: optimizer steps, `load_state_dict`, `copy_` under `no_grad`, `.to()`.
Writes through `weight.data` do not bump the version (that is what `.data` is for), so after
them call `PackedWeight.refresh()` (or `Linear.prepack()` again).

Forward only: calls that need gradients (grad mode on), torch.compile tracing, other devices or
dtypes, or a backend other than auto/cpu take `fastlm.ops.linear` instead.
"""
from __future__ import annotations

import functools
import math

import torch

from fastlm import _ext
from fastlm import backend as _backend
from fastlm.ops.linear import _act_name, _check, linear


@functools.cache
def prepack_available() -> bool:
    """Whether this torch build exports MKL's packed GEMM (x86 builds do); fixed per process."""
    return _ext.HAS_EXTENSION and bool(torch.ops.fastlm.linear_prepack_available())


class PackedWeight:
    """The packed copy of one Linear weight, rebuilt when the weight changes (see the module docstring)."""

    def __init__(self):
        self._key = None
        self._packed = None

    def refresh(self) -> None:
        """Forget the pack; the next call packs the weight again (after writes through .data)."""
        self._key = self._packed = None

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.stride())
        if key != self._key:
            self._packed = torch.ops.fastlm.linear_prepack(weight.detach())
            self._key = key
        return self._packed

    def __getstate__(self):  # copies and pickles start empty: the pack is bound to its address
        return {"_key": None, "_packed": None}

    @property
    def nbytes(self) -> int:
        return 0 if self._packed is None else self._packed.nbytes


def applies(x: torch.Tensor, weight: torch.Tensor, backend: str | None = None) -> bool:
    """Whether linear_prepacked can serve this call; otherwise use fastlm.ops.linear."""
    return (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.device.type == "cpu" and not weight.is_inference()
            and _backend.requested(backend)[0] in ("auto", "cpu") and prepack_available())


def linear_prepacked(x, packed: PackedWeight, weight, bias=None, *, activation=None, residual=None):
    """act(x @ weight^T + bias) + residual from `packed`'s copy of weight; forward only. Falls back
    to fastlm.ops.linear where `applies` is False, so it is always safe to call."""
    if not applies(x, weight):
        return linear(x, weight, bias, activation=activation, residual=residual)
    return prepacked_forward(x, packed, weight, bias, activation, residual)


def prepacked_forward(x, packed: PackedWeight, weight, bias, activation, residual):
    """linear_prepacked for a caller that has checked `applies` already (fastlm.nn.Linear)."""
    _check(x, weight, bias, residual, activation)
    n, k = weight.shape
    rows = math.prod(x.shape[:-1])
    x2 = x.reshape(rows, k)  # (..., K) -> (M, K)
    r2 = residual.reshape(rows, n) if residual is not None else None  # (..., N) -> (M, N)
    y = torch.ops.fastlm.linear_prepacked(x2, packed.get(weight), weight, bias, r2, _act_name(activation))
    return y.view(*x.shape[:-1], n)  # (M, N) -> (..., N)


if _ext.HAS_EXTENSION:
    @torch.library.register_fake("fastlm::linear_prepacked")
    def _(x, packed, weight, bias, residual, activation):
        return x.new_empty(x.shape[0], weight.shape[0])
