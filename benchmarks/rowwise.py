"""The timing loop shared by the row-wise op benchmarks (softmax, cross_entropy): check each
implementation against the float64 answer, then time fwd and fwd+bwd, in GB/s and % of the
same-run copy bandwidth, with the speed-up over torch eager."""
from __future__ import annotations

from typing import Callable

import torch

from benchmarks.common import Row, time_ms


def liger(name: str):
    """A function from liger_kernel.transformers.functional, or None when not importable."""
    try:
        from liger_kernel.transformers import functional
    except Exception:  # not installed, or no GPU/Triton it can use
        return None
    return getattr(functional, name, None)


def run_case(op: str, case: str, impls: dict[str, Callable], inputs: list[tuple], grad_of: Callable,
             check: Callable, bytes_by_mode: dict[str, int], ceilings: dict, device: torch.device) -> list[Row]:
    """impls: name -> fn(*inputs[i]); grad_of(out, inp) runs the backward; check(out) -> error
    message or None."""
    rows, eager_ms = [], {}
    for impl, fn in impls.items():
        try:
            out = fn(*inputs[0])
            wrong = check(out)
        except Exception as exc:  # e.g. torch.compile without a working toolchain
            rows.append(Row(op, case, impl, "fwd", None, note=f"failed: {type(exc).__name__}: {exc}"[:200]))
            continue
        if wrong:
            rows.append(Row(op, case, impl, "fwd", None, note=f"WRONG: {wrong}"))
            continue
        for mode, nbytes in bytes_by_mode.items():
            if mode == "fwd":
                def step(i, fn=fn):
                    with torch.no_grad():
                        fn(*inputs[i % len(inputs)])
            else:
                def step(i, fn=fn):
                    inp = inputs[i % len(inputs)]
                    grad_of(fn(*inp), inp)
            try:
                ms = time_ms(step, device)
            except torch.OutOfMemoryError as exc:  # big shapes x eager temporaries; keep the rest of the run
                rows.append(Row(op, case, impl, mode, None, note=f"failed: out of memory ({exc})"[:120]))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if impl == "torch eager":
                eager_ms[mode] = ms
            gbps = nbytes / (ms * 1e-3) / 1e9
            rows.append(Row(op, case, impl, mode, ms, gbps=gbps, pct_ceiling=100 * gbps / ceilings["copy_gbps"]))
    for r in rows:
        if r.ms and r.mode in eager_ms:
            r.vs_eager = eager_ms[r.mode] / r.ms
    return rows
