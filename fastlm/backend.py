"""The one registry of backends: which exist, which can serve an input, and why not.

Selection order for every op call: the call's `backend=`, then the innermost
`fastlm.use_backend(...)`, then the FASTLM_BACKEND environment variable, then "auto".
"auto" takes the first backend in AUTO_ORDER for the input's device that can serve it.
A backend chosen explicitly that can't serve raises BackendUnavailableError listing every
backend's reasons: nothing falls back silently from an explicit choice.

"cuda-emu" is the cuda backend's kernels compiled against the SIMT emulator (fastlm._C_emu):
it serves CPU tensors, slowly and exactly as the GPU code would, for tests and development.
It answers the cuda backend's per-op reasons and is never picked by "auto".

Written so torch.compile can trace it (plain globals, os.environ, no locks or caches).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterator

import torch

from fastlm import _ext

BACKENDS = ("cuda", "triton", "cpu", "reference", "cuda-emu")
CHOICES = ("auto",) + BACKENDS
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
MIN_CUDA_CAPABILITY = (8, 0)  # the oldest arch csrc/cuda is compiled for

WhyNot = Callable[..., "list[str]"]
_OPS: dict[str, dict[str, WhyNot]] = {}
_EXAMPLES: dict[str, Callable[[torch.device], tuple]] = {}
_stack: list[str] = []


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend can't serve this call."""


def _check_name(name: str, source: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"{source} must be one of {', '.join(CHOICES)}; got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run fastlm ops inside the block on backend `name` ("auto" restores automatic choice)."""
    _stack.append(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _stack.pop()


def requested(backend: str | None = None) -> tuple[str, str]:
    """(name, where it came from) for this call, before checking it can serve."""
    if backend is not None:
        return _check_name(backend, "backend"), "backend="
    if _stack:
        return _stack[-1], "fastlm.use_backend"
    env = os.environ.get("FASTLM_BACKEND")
    if env:
        return _check_name(env, "FASTLM_BACKEND"), "FASTLM_BACKEND"
    return "auto", "auto"


def register(op: str, backend: str, example: Callable[[torch.device], tuple] | None = None):
    """Decorator: `fn(*op_inputs) -> list[str]` says why `backend` can't serve `op` (empty = can).
    The "cuda" registration also serves "cuda-emu"."""
    if backend not in BACKENDS or backend == "cuda-emu":
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")

    def deco(fn: WhyNot) -> WhyNot:
        _OPS.setdefault(op, {})[backend] = fn
        if example is not None:
            _EXAMPLES[op] = example
        return fn

    return deco


def dtype_reason(x: torch.Tensor, allowed, backend: str) -> list[str]:
    """[] when x's dtype is in `allowed`, else the one reason naming what `backend` takes."""
    if x.dtype in allowed:
        return []
    names = ", ".join(str(d).replace("torch.", "") for d in allowed)
    return [f"dtype {str(x.dtype).replace('torch.', '')} not supported by the {backend} backend ({names})"]


def register_by_dtype(op: str, example: Callable[[torch.device], tuple], cpu_dtypes, gpu_dtypes) -> None:
    """The common case: every backend serves `op` when the first input's dtype suits it (reference:
    any floating dtype; cpu: `cpu_dtypes`; triton and cuda: `gpu_dtypes`)."""
    def make(name, allowed):
        def why(x, *_):
            if allowed is None:
                return [] if x.dtype.is_floating_point else [f"dtype {x.dtype} is not floating point"]
            return dtype_reason(x, allowed, name)
        return why

    for name, allowed in (("reference", None), ("cpu", cpu_dtypes), ("triton", gpu_dtypes), ("cuda", gpu_dtypes)):
        register(op, name, example=example if name == "reference" else None)(make(name, allowed))


def implementations(*, reference: Callable, triton: Callable, cpu: Callable, cuda: Callable) -> dict[str, Callable]:
    """An op's per-backend implementations, keyed by backend name. `cuda` calls the compiled
    kernels through its `ops=torch.ops.fastlm` argument; "cuda-emu" is the same call bound to the
    emulated kernels in torch.ops.fastlm_emu."""
    emulated = functools.partial(cuda, ops=torch.ops.fastlm_emu)
    return {"reference": reference, "triton": triton, "cpu": cpu, "cuda": cuda, "cuda-emu": emulated}


def ops() -> list[str]:
    return sorted(_OPS)


def example_inputs(op: str, device: torch.device) -> tuple:
    return _EXAMPLES[op](device)


@torch.compiler.assume_constant_result
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@torch.compiler.assume_constant_result
def _cuda_smem_optin(index: int) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


def shared_memory_per_block(device: torch.device) -> int:
    """Bytes of shared memory one block may opt into on the GPU that runs kernels for `device`'s
    tensors: the CUDA device's sharedMemPerBlockOptin (99 KB on sm_86/89, 163 KB on sm_80, 227 KB
    on sm_90), or for CPU tensors the GPU the emulator models (cuda-emu)."""
    if device.type == "cuda":
        return _cuda_smem_optin(device.index if device.index is not None else torch.cuda.current_device())
    return int(torch.ops.fastlm_emu.emu_device()[3]) if _ext.HAS_EMULATOR else 0


def machine_reasons(backend: str, device: torch.device) -> list[str]:
    """Reasons that depend on this install and the device, not on the op."""
    reasons = []
    if backend == "cpu":
        if not _ext.HAS_EXTENSION:
            reasons.append(f"extension fastlm._C not built ({_ext.EXTENSION_ERROR})")
        if device.type != "cpu":
            reasons.append(f"serves CPU tensors; input is on {device}")
    elif backend == "cuda":
        if not _ext.HAS_EXTENSION:
            reasons.append(f"extension fastlm._C not built ({_ext.EXTENSION_ERROR})")
        elif not _ext.HAS_CUDA_KERNELS:
            reasons.append("extension built without CUDA kernels (torch without CUDA, or no nvcc at build time)")
        if device.type != "cuda":
            reasons.append(f"serves CUDA tensors; input is on {device}")
        elif _capability(device.index if device.index is not None else torch.cuda.current_device()) < MIN_CUDA_CAPABILITY:
            reasons.append(f"needs compute capability >= {MIN_CUDA_CAPABILITY[0]}.{MIN_CUDA_CAPABILITY[1]}")
    elif backend == "cuda-emu":
        if not _ext.HAS_EMULATOR:
            reasons.append(f"extension fastlm._C_emu not built ({_ext.EMULATOR_ERROR}); build with FASTLM_BUILD_EMU=1")
        if device.type != "cpu":
            reasons.append(f"serves CPU tensors (the CUDA kernels under the SIMT emulator); input is on {device}")
    elif backend == "triton":
        if not _ext.HAS_TRITON:
            reasons.append(f"triton not installed ({_ext.TRITON_ERROR})")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            reasons.append("CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)")
        elif device.type not in ("cpu", "cuda"):
            reasons.append(f"serves CUDA tensors; input is on {device}")
    return reasons


def why_not(op: str, backend: str, device: torch.device, *inputs) -> list[str]:
    """Every reason `backend` can't serve `op` on these inputs; [] means it can."""
    fn = _OPS.get(op, {}).get("cuda" if backend == "cuda-emu" else backend)
    if fn is None:
        return [f"no {backend} implementation of {op}"]
    return machine_reasons(backend, device) + fn(*inputs)


def report(op: str, device: torch.device, *inputs) -> dict[str, list[str]]:
    return {b: why_not(op, b, device, *inputs) for b in BACKENDS}


def select(op: str, device: torch.device, *inputs, backend: str | None = None) -> str:
    """The backend that serves this call (see module docstring for the order)."""
    name, source = requested(backend)
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("reference",)):
            if not why_not(op, candidate, device, *inputs):
                return candidate
        name, source = "reference", "auto (nothing else could serve)"
    reasons = why_not(op, name, device, *inputs)
    if not reasons:
        return name
    lines = [f"{op}: backend {name!r} (from {source}) can't serve this call on {device}. Each backend:"]
    for b, rs in report(op, device, *inputs).items():
        lines.append(f"  {b}: " + ("can serve" if not rs else "; ".join(rs)))
    raise BackendUnavailableError("\n".join(lines))
