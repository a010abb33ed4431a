"""What this install has: the compiled extension (cpu/cuda kernels) and Triton.

Both are optional. Without them the matching backends report why they can't serve and the
package runs on the rest; fastlm/__init__.py issues the one warning that says so.
"""
from __future__ import annotations

import torch

try:
    from fastlm import _C  # registers torch.ops.fastlm.* (TORCH_LIBRARY in csrc/bindings.cpp)

    EXTENSION_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"

try:  # the CUDA kernels compiled against the SIMT emulator (csrc/emu): the "cuda-emu" backend
    from fastlm import _C_emu  # noqa: F401  (registers torch.ops.fastlm_emu.*)

    EMULATOR_ERROR: str | None = None
except ImportError as exc:
    _C_emu = None
    EMULATOR_ERROR = f"{type(exc).__name__}: {exc}"

try:
    import triton

    TRITON_VERSION: str | None = triton.__version__
    TRITON_ERROR: str | None = None
except ImportError as exc:
    TRITON_VERSION = None
    TRITON_ERROR = f"{type(exc).__name__}: {exc}"

HAS_EXTENSION = _C is not None
HAS_CUDA_KERNELS = HAS_EXTENSION and bool(getattr(_C, "with_cuda", 0))
HAS_EMULATOR = _C_emu is not None
HAS_TRITON = TRITON_VERSION is not None
CUDA_ARCHS = getattr(_C, "cuda_archs", "") if HAS_EXTENSION else ""
CPU_FLAGS = getattr(_C, "cpu_flags", "") if HAS_EXTENSION else ""


def missing_message() -> str | None:
    """One sentence per missing piece, with how to get it; None when nothing is missing."""
    parts = []
    if not HAS_EXTENSION:
        parts.append(
            "the compiled extension fastlm._C is not available, so the 'cpu' and 'cuda' "
            f"backends are off ({EXTENSION_ERROR}); build it with `make build` or "
            "`pip install --no-build-isolation -e .` in the source tree"
        )
    if not HAS_TRITON:
        parts.append(
            f"Triton is not installed, so the 'triton' backend is off ({TRITON_ERROR}); "
            "`pip install triton` (Linux)"
        )
    if not parts:
        return None
    return "fastlm: " + "; ".join(parts) + ". Falling back to the remaining backends (reference always works)."


def torch_has_cuda_device() -> bool:
    return torch.cuda.is_available()
