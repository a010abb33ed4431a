"""cross_entropy forward and forward+backward: every fastlm backend vs F.cross_entropy eager,
torch.compile of it and Liger-Kernel's cross entropy (when importable), in GB/s and % of copy
bandwidth; then linear_cross_entropy's peak memory and time against F.linear +
F.cross_entropy (benchmarks/lce_memory.py: one fresh subprocess per implementation)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks import lce_memory
from benchmarks.common import Row, copies_for, headline, smoke
from benchmarks.rowwise import liger, run_case
from fastlm import backend as registry
from fastlm.ops.cross_entropy import cross_entropy

OP = "cross_entropy"


def shapes(device: torch.device, quick: bool):
    if smoke():
        return [(64, 512)]
    if headline():
        return [(32768, 65536)] if device.type == "cuda" else [(4096, 32768)]
    if device.type == "cuda":
        full = [(32768, c) for c in (256, 1024, 4096, 16384, 65536)] + [(8192, 262144)]
        return full[1:4] if quick else full
    return [(4096, 32768)] if quick else [(4096, 4096), (4096, 32768), (256, 262144)]


def lce_cases(device: torch.device, quick: bool):
    """(N, V, D) for the linear_cross_entropy memory/time comparison (not a headline case)."""
    if headline():
        return []
    if device.type == "cuda":
        return [(8192, 50257, 4096)] if quick else [(8192, 50257, 4096), (8192, 131072, 4096)]
    return [(2048, 50257, 768)] if quick else [(8192, 50257, 768), (4096, 131072, 768)]


def dtypes(device: torch.device):
    if headline():
        return [torch.bfloat16 if device.type == "cuda" else torch.float32]
    return [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32, torch.bfloat16]


def run(device: torch.device, quick: bool, ceilings: dict, progress=print):
    rows = []
    compiled = torch.compile(F.cross_entropy, fullgraph=True)
    for dtype in dtypes(device):
        for m, n in shapes(device, quick):
            case = f"{m}x{n} {str(dtype)[6:]}"
            progress(f"  {OP} {case}")
            elt = torch.finfo(dtype).bits // 8
            copies = copies_for(m * n * elt, device)
            target = torch.randint(0, n, (m,), device=device)
            inputs = [(torch.randn(m, n, device=device, dtype=dtype, requires_grad=True), target) for _ in range(copies)]
            impls = {f"fastlm:{b}": (lambda x, t, _b=b: cross_entropy(x, t, backend=_b))
                     for b in registry.BACKENDS
                     if not (b == "triton" and device.type == "cpu")  # the interpreter is a correctness tool
                     and not registry.why_not(OP, b, device, inputs[0][0], target, None, -100, 0.0)}
            impls["torch eager"] = F.cross_entropy
            impls["torch.compile"] = compiled
            lig = liger("liger_cross_entropy")
            if lig is not None and device.type == "cuda":
                impls["liger"] = lambda x, t: lig(x, t)
            ref = F.cross_entropy(inputs[0][0].detach().double(), target).item()
            tol = 1e-5 if dtype == torch.float32 else 2e-2

            def check(loss, ref=ref, tol=tol):
                err = abs(float(loss.detach()) - ref)
                return None if err <= tol * max(1.0, abs(ref)) else f"loss err {err:.3g}"

            # fwd reads the logits; bwd reads them again and writes the gradient
            rows += run_case(OP, case, impls, inputs, lambda loss, inp: torch.autograd.grad(loss, inp[0]),
                             check, {"fwd": m * n * elt, "fwd+bwd": 3 * m * n * elt}, ceilings, device)
    for n, v, d in lce_cases(device, quick):
        case = f"N={n} V={v} D={d} float32" if device.type == "cpu" else f"N={n} V={v} D={d} bfloat16"
        progress(f"  linear_cross_entropy {case} (subprocesses)")
        res = lce_memory.measure(n, v, d, "float32" if device.type == "cpu" else "bfloat16", device.type)
        base = res.get("torch", {})
        for impl, r in res.items():
            label = "torch eager (F.linear + F.cross_entropy)" if impl == "torch" else "fastlm:linear_cross_entropy"
            if "error" in r:
                rows.append(Row("linear_cross_entropy", case, label, "fwd+bwd", None, note=f"failed: {r['error']}"[:200]))
                continue
            ratio = r["peak_bytes"] / base["peak_bytes"] if "peak_bytes" in base else None
            note = f"peak +{r['peak_bytes'] / 2**20:.0f} MiB" + (f" ({ratio:.3f} of torch)" if ratio else "")
            rows.append(Row("linear_cross_entropy", case, label, "fwd+bwd", r["ms"],
                            vs_eager=(base["ms"] / r["ms"]) if "ms" in base else None, note=note))
    return rows
