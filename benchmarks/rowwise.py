"""The timing loop shared by the row-wise op benchmarks (softmax, cross_entropy): check each
implementation against the float64 answer, then time fwd and fwd+bwd, in GB/s and % of the
same-run copy bandwidth, with the speed-up over torch eager."""
from __future__ import annotations

from typing import Callable

import torch

from benchmarks.common import Row, time_impls


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
    message or None. Timing is common.time_impls (round-robin across impls)."""

    def step_for(fn, mode):
        if mode == "fwd":
            def step(i):
                with torch.no_grad():
                    fn(*inputs[i % len(inputs)])
        else:
            def step(i):
                inp = inputs[i % len(inputs)]
                grad_of(fn(*inp), inp)
        return step

    def rate(mode, ms):
        gbps = bytes_by_mode[mode] / (ms * 1e-3) / 1e9
        return dict(gbps=gbps, pct_ceiling=100 * gbps / ceilings["copy_gbps"])

    modes = {impl: tuple(bytes_by_mode) for impl in impls}
    return time_impls(op, case, impls, lambda fn: check(fn(*inputs[0])), step_for, modes, device, rate)
