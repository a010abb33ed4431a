"""The backend parametrization the op tests share: (backend, device, dtypes it serves), and the
emulator's device profile for a test's duration."""
import contextlib

import pytest
import torch

from fastlm import _ext

HAS_CUDA = torch.cuda.is_available()
GPU = "cuda" if HAS_CUDA else None
ALL = (torch.float32, torch.float16, torch.bfloat16)


# "cuda-emu": the cuda backend's kernels under the SIMT emulator, on CPU tensors (csrc/emu).
EMU_MARKS = (pytest.mark.emu, pytest.mark.skipif(not _ext.HAS_EMULATOR, reason="fastlm._C_emu not built"))


@contextlib.contextmanager
def emulated_gpu(arch="9.0", gpc_sms=0):
    """The emulator as an sm_`arch` device ("8.0" A100, "8.6" RTX 3090-class, "9.0" H100 / H200),
    with `gpc_sms` SMs of each GPC free for clusters (0: all); back to its default A100 after."""
    ops = torch.ops.fastlm_emu
    ops.emu_set_arch(arch)
    ops.emu_set_gpc_sms(gpc_sms)
    try:
        yield ops
    finally:
        ops.emu_set_gpc_sms(0)
        ops.emu_set_arch("8.0")


def cuda_params(dtypes=ALL):
    """The cuda backend twice: on a GPU (gpu-marked) and under the emulator on CPU tensors."""
    return [
        pytest.param("cuda", "cuda", dtypes, id="cuda", marks=pytest.mark.gpu),
        pytest.param("cuda-emu", "cpu", dtypes, id="cuda-emu", marks=EMU_MARKS),
    ]


def backends(cpu_dtypes=(torch.float32, torch.bfloat16), triton_dtypes=ALL):
    """Without a GPU, triton runs in its interpreter on CPU tensors; cuda tests are gpu-marked,
    and run on CPU tensors through the emulator as cuda-emu."""
    return [
        pytest.param("reference", "cpu", ALL, id="reference"),
        pytest.param("cpu", "cpu", cpu_dtypes, id="cpu"),
        pytest.param("triton", GPU or "cpu", triton_dtypes, id="triton"),
    ] + cuda_params()


def backend_dtypes(params):
    """Every (backend, device, dtype) a backend serves, one param each."""
    return [
        pytest.param(p.values[0], p.values[1], dtype, id=f"{p.id}-{str(dtype)[6:]}", marks=p.marks)
        for p in params
        for dtype in p.values[2]
    ]
