"""The backend parametrization the op tests share: (backend, device, dtypes it serves)."""
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
GPU = "cuda" if HAS_CUDA else None
ALL = (torch.float32, torch.float16, torch.bfloat16)


def backends(cpu_dtypes=(torch.float32, torch.bfloat16), triton_dtypes=ALL):
    """Without a GPU, triton runs in its interpreter on CPU tensors; cuda tests are gpu-marked."""
    return [
        pytest.param("reference", "cpu", ALL, id="reference"),
        pytest.param("cpu", "cpu", cpu_dtypes, id="cpu"),
        pytest.param("triton", GPU or "cpu", triton_dtypes, id="triton"),
        pytest.param("cuda", "cuda", ALL, id="cuda", marks=pytest.mark.gpu),
    ]


def backend_dtypes(params):
    """Every (backend, device, dtype) a backend serves, one param each."""
    return [
        pytest.param(p.values[0], p.values[1], dtype, id=f"{p.id}-{str(dtype)[6:]}", marks=p.marks)
        for p in params
        for dtype in p.values[2]
    ]
