"""`python -m fastlm info`: versions, device, for every op which backends can serve and which one
auto picks (and why), and what auto would pick for attention on the GPUs in
fastlm.dispatch.SIMULATED, computed from their capability and shared memory on any machine."""
from __future__ import annotations

import os
import platform

import torch

from fastlm import _ext, backend, dispatch

# Attention inputs shown for the simulated GPUs: bf16 training, causal, T = 4096; head dims 64
# and 128 (128 needs more shared memory per block than sm_86/89 allow for the cuda kernels).
SIMULATED_ATTENTION = [(1, 16, 4096, d) for d in (64, 128)]


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
            out += _backends(op, device, inputs)
    out += simulated()
    return out


def _backends(op, device, inputs, only=backend.BACKENDS) -> list[str]:
    choice, why = backend.auto_choice(op, device, *inputs)
    out = [f"  auto -> {choice}: {why}"]
    for name, reasons in backend.report(op, device, *inputs).items():
        if name in only:
                out.append(f"  {name:<10} " + ("yes" if not reasons else "no: " + "; ".join(reasons)))
    return out


def simulated() -> list[str]:
    """What auto picks for attention on each simulated GPU, with this install's kernels."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # shapes and devices without memory or a GPU

    out = []
    for shape in SIMULATED_ATTENTION:
        with FakeTensorMode():
            q = torch.empty(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        inputs = (q, q, q, None, 0.0, 1)  # 1: causal (top-left), as is_causal=True gives
        out.append(f"\nattention on simulated GPUs [{_describe(q)} x3, causal, training; this install's kernels]:")
        for spec in dispatch.SIMULATED:
            out.append(f" {spec.device_class}: {spec.describe()}")
            with backend.simulate(spec):
                gpu_backends = [b for b, _ in dispatch.static_order("attention", spec.device_class)]
                out += [" " + line for line in _backends("attention", q.device, inputs, gpu_backends)]
    return out


def _describe(a) -> str:
    if isinstance(a, torch.Tensor):
        return f"{str(a.dtype).replace('torch.', '')}{list(a.shape)}"
    return repr(a)


def main() -> None:
    print("\n".join(lines()))
