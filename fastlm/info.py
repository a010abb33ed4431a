"""`python -m fastlm info`: versions, device, and for every op which backends can serve."""
from __future__ import annotations

import os
import platform

import torch

from fastlm import _ext, backend


def lines() -> list[str]:
    out = [
        f"python   {platform.python_version()} ({platform.machine()})",
        f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton   {_ext.TRITON_VERSION or 'not installed'}"
        + ("  [TRITON_INTERPRET=1]" if os.environ.get("TRITON_INTERPRET") == "1" else ""),
    ]
    if _ext.HAS_EXTENSION:
        cuda = f"CUDA kernels for {_ext.CUDA_ARCHS}" if _ext.HAS_CUDA_KERNELS else "no CUDA kernels"
        out.append(f"fastlm._C built ({cuda}; CPU flags {_ext.CPU_FLAGS})")
    else:
        out.append(f"fastlm._C missing: {_ext.EXTENSION_ERROR}")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            out.append(f"device   cuda:{i} {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
        devices.append(torch.device("cuda", 0))
    else:
        out.append("device   cpu only (no CUDA device visible)")
    choice, source = backend.requested()
    out.append(f"backend  {choice} (from {source})")
    for op in backend.ops():
        for device in devices:
            inputs = backend.example_inputs(op, device)
            desc = ", ".join(_describe(a) for a in inputs)
            out.append(f"\n{op} on {device} [{desc}]:")
            for name, reasons in backend.report(op, device, *inputs).items():
                out.append(f"  {name:<10} " + ("yes" if not reasons else "no: " + "; ".join(reasons)))
    return out


def _describe(a) -> str:
    if isinstance(a, torch.Tensor):
        return f"{str(a.dtype).replace('torch.', '')}{list(a.shape)}"
    return repr(a)


def main() -> None:
    print("\n".join(lines()))
