"""The backend x dtype parametrization the MoE op tests share. reference and cpu run every case;
the slow ones (triton in its interpreter, cuda-emu in the SIMT emulator) run a few small cases
that each cover something distinct, so the suite stays inside the CI budget."""
import importlib.util

import pytest
import torch

from backends import EMU_MARKS, GPU
from fastlm import _ext

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
SLOW = ("triton", "cuda-emu")


def moe_backend_dtypes(ext_op, triton_module, gpu_dtypes=(F32, F16, BF16)):
    """(backend, device, dtype) params: reference and cpu in fp32/bf16; triton in fp32/fp16 (the
    interpreter's tl.dot is wrong for bf16; on a GPU bf16 too), skipped until fastlm/triton has
    `triton_module`; cuda (gpu-marked) and cuda-emu in `gpu_dtypes`, skipped until the extension
    has the kernel `ext_op`."""
    no_cpu = pytest.mark.skipif(not (_ext.HAS_EXTENSION and hasattr(torch.ops.fastlm, ext_op)),
                                reason=f"extension without {ext_op}")
    no_emu = pytest.mark.skipif(not (_ext.HAS_EMULATOR and hasattr(torch.ops.fastlm_emu, ext_op)),
                                reason=f"emulator without {ext_op}")
    no_triton = pytest.mark.skipif(importlib.util.find_spec(f"fastlm.triton.{triton_module}") is None,
                                   reason=f"fastlm.triton.{triton_module} not written yet")
    rows = [("reference", "cpu", (F32, BF16), ()), ("cpu", "cpu", (F32, BF16), (no_cpu,)),
            ("triton", GPU or "cpu", (F32, F16, BF16) if GPU else (F32, F16), (no_triton,)),
            ("cuda", "cuda", gpu_dtypes, (pytest.mark.gpu, no_cpu)),
            ("cuda-emu", "cpu", gpu_dtypes, EMU_MARKS + (no_emu,))]
    return [pytest.param(b, dev, dt, id=f"{b}-{str(dt)[6:]}", marks=marks)
            for b, dev, dtypes, marks in rows for dt in dtypes]


def with_cases(params, cases, slow_cases):
    """Each backend param times each case; the slow backends only take `slow_cases`."""
    return [pytest.param(*p.values, *case, id=f"{p.id}-{'-'.join(map(str, case))}", marks=p.marks)
            for p in params for case in (slow_cases if p.values[0] in SLOW else cases)]


def backends_once(params):
    """One (backend, device, dtype) param per backend, its first dtype: for opcheck, compile and
    edge-case tests."""
    seen, out = set(), []
    for p in params:
        if p.values[0] not in seen:
            seen.add(p.values[0])
            out.append(pytest.param(*p.values, id=p.values[0], marks=p.marks))
    return out
