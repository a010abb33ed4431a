"""softmax(scale * x + mask) forward and forward+backward: every fastlm backend vs torch eager
(mul, masked_fill, softmax), torch.compile of the same and Liger-Kernel's softmax (after eager
mul+masked_fill, when importable), in GB/s and % of copy bandwidth."""
from __future__ import annotations

import torch

from benchmarks.common import copies_for, headline, smoke
from benchmarks.rowwise import liger, run_case
from fastlm import backend as registry
from fastlm.ops.softmax import softmax

OP = "softmax"
SCALE = 0.125


def shapes(device: torch.device, quick: bool):
    if smoke():
        return [(64, 256)]
    if headline():
        return [(32768, 4096)] if device.type == "cuda" else [(4096, 4096)]
    if device.type == "cuda":
        full = [(32768, c) for c in (256, 1024, 4096, 16384, 65536)] + [(8192, 262144)]
        return full[1:4] if quick else full
    return [(4096, 4096)] if quick else [(4096, 1024), (4096, 4096), (1024, 32768), (64, 262144)]


def dtypes(device: torch.device):
    if headline():
        return [torch.bfloat16 if device.type == "cuda" else torch.float32]
    return [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32, torch.bfloat16]


def _eager(x, mask):
    return torch.softmax(x.mul(SCALE).masked_fill(~mask, float("-inf")), -1)


def run(device: torch.device, quick: bool, ceilings: dict, progress=print):
    rows = []
    compiled = torch.compile(_eager, fullgraph=True)
    for dtype in dtypes(device):
        for m, n in shapes(device, quick):
            case = f"{m}x{n} {str(dtype)[6:]} scale+mask"
            progress(f"  {OP} {case}")
            elt = torch.finfo(dtype).bits // 8
            copies = copies_for(m * n * elt, device)
            mask = torch.rand(m, n, device=device) > 0.1
            inputs = [(torch.randn(m, n, device=device, dtype=dtype, requires_grad=True), mask) for _ in range(copies)]
            gy = torch.randn(m, n, device=device, dtype=dtype)
            impls = {f"fastlm:{b}": (lambda x, mk, _b=b: softmax(x, scale=SCALE, mask=mk, backend=_b))
                     for b in registry.BACKENDS
                     if not (b == "triton" and device.type == "cpu")  # the interpreter is a correctness tool
                     and not registry.why_not(OP, b, device, inputs[0][0], mask, SCALE, 0, False)}
            impls["torch eager"] = _eager
            impls["torch.compile"] = compiled
            lig = liger("liger_softmax")
            if lig is not None and device.type == "cuda":
                impls["liger (eager mul+mask)"] = lambda x, mk: lig(x.mul(SCALE).masked_fill(~mk, float("-inf")))
            ref = _eager(inputs[0][0].detach().double(), mask)
            tol = 1e-5 if dtype == torch.float32 else 1e-2

            def check(y, ref=ref, tol=tol):
                err = (y.double() - ref).abs().max().item()
                return None if err <= tol else f"max err {err:.3g} > {tol}"

            nbytes = m * n * (2 * elt + 1)  # read x and the bool mask, write y
            rows += run_case(OP, case, impls, inputs, lambda y, inp: torch.autograd.grad(y, inp[0], gy),
                             check, {"fwd": nbytes, "fwd+bwd": nbytes + 3 * m * n * elt}, ceilings, device)
    return rows
