"""Backends, dtypes and row lengths shared by the op tests (bias_act, softmax, cross-entropy, ...)."""
import pytest
import torch

from backends import cuda_params

HAS_CUDA = torch.cuda.is_available()
GPU = "cuda" if HAS_CUDA else None
ALL = (torch.float32, torch.float16, torch.bfloat16)
# (backend, device, dtypes). Without a GPU, triton runs in its interpreter on CPU tensors.
BACKENDS = [
    pytest.param("reference", "cpu", ALL, id="reference"),
    pytest.param("cpu", "cpu", (torch.float32, torch.bfloat16), id="cpu"),
    pytest.param("triton", GPU or "cpu", ALL, id="triton"),
] + cuda_params()
BACKEND_DTYPES = [
    pytest.param(p.values[0], p.values[1], dtype, id=f"{p.id}-{str(dtype)[6:]}", marks=p.marks)
    for p in BACKENDS
    for dtype in p.values[2]
]


def cols_for(backend):
    """Row lengths to test: the interpreter gets the short ones; 131072 on cpu/reference and
    compiled GPU backends; 262144 on a GPU only; the emulator up to 50257 (GPT-2's vocabulary)."""
    cols = [1, 7, 1000, 1025]
    if backend == "cuda-emu" or backend != "triton" or HAS_CUDA:
        cols.append(50257)
    if backend in ("cpu", "reference") or (HAS_CUDA and backend != "reference"):
        cols.append(131072)
    if HAS_CUDA and backend in ("cuda", "triton"):
        cols.append(262144)
    return cols
