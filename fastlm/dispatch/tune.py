"""`python -m fastlm tune`: time every fastlm backend that can serve each op, one size per bucket,
on this GPU next to torch's own op, and write the user's dispatch cache (tables.user_path), which
`auto` then prefers over the shipped table, as cuDNN's benchmark mode does for its kernels.

A backend is checked against torch's own op before it is timed; one that disagrees, or runs out
of memory, is not measured, so it can't win. Each entry's key is the bucket select()
computes for the call (backend.record_buckets), so tune and dispatch can't disagree on it."""
from __future__ import annotations

import dataclasses
import datetime
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from fastlm import backend
from fastlm.dispatch import tables


@dataclasses.dataclass
class Case:
    op: str
    call: Callable[[str], torch.Tensor]  # backend name -> output
    torch_name: str  # torch's own op, timed for information
    torch_call: Callable[[], torch.Tensor]
    grads: tuple = ()  # inputs whose gradients fwd+bwd computes; () = forward only


def cases(device: torch.device, quick: bool) -> list[Case]:
    """bf16 sizes of a GPT-class model: 16k tokens per attention call, 8k rows per row-wise op."""
    import fastlm.ops as ops

    def rand(*shape, grad=True):
        return torch.randn(*shape, device=device, dtype=torch.bfloat16, requires_grad=grad)

    out = []
    for d in (64, 128):
        for t in (4096,) if quick else (1024, 4096, 16384):
            for causal in (True, False):
                q, k, v = (rand(max(1, 16384 // t), 2048 // d, t, d) for _ in range(3))
                out.append(Case("attention", lambda b, q=q, k=k, v=v, c=causal: ops.scaled_dot_product_attention(
                    q, k, v, is_causal=c, backend=b), "sdpa", lambda q=q, k=k, v=v, c=causal:
                    F.scaled_dot_product_attention(q, k, v, is_causal=c), (q, k, v)))
        for tk in (4096,) if quick else (4096, 32768):  # decode: one query against a KV cache
            q, k, v = rand(1, 32, 1, d, grad=False), rand(1, 32, tk, d, grad=False), rand(1, 32, tk, d, grad=False)
            out.append(Case("attention", lambda b, q=q, k=k, v=v: ops.scaled_dot_product_attention(q, k, v, backend=b),
                            "sdpa", lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)))
    for n in (1024, 4096) if quick else (1024, 4096, 16384):
        x, w, b_ = rand(8192, n), rand(n), rand(n)
        out += [
            Case("layer_norm", lambda b, x=x, w=w, c=b_, n=n: ops.layer_norm(x, (n,), w, c, backend=b), "torch eager",
                 lambda x=x, w=w, c=b_, n=n: F.layer_norm(x, (n,), w, c), (x, w, b_)),
            Case("rms_norm", lambda b, x=x, w=w, n=n: ops.rms_norm(x, (n,), w, 1e-6, backend=b), "torch eager",
                 lambda x=x, w=w, n=n: F.rms_norm(x, (n,), w, 1e-6), (x, w)),
            Case("softmax", lambda b, x=x: ops.softmax(x, backend=b), "torch eager", lambda x=x: torch.softmax(x, -1), (x,)),
            Case("bias_act", lambda b, x=x, c=b_: ops.bias_act(x, c, "gelu", backend=b), "torch eager",
                 lambda x=x, c=b_: F.gelu(x + c), (x, b_)),
        ]
    for vocab in (32768,) if quick else (32768, 131072):
        logits, target = rand(4096, vocab), torch.randint(0, vocab, (4096,), device=device)
        out.append(Case("cross_entropy", lambda b, x=logits, t=target: ops.cross_entropy(x, t, backend=b), "torch eager",
                        lambda x=logits, t=target: F.cross_entropy(x, t), (logits,)))
    for m, k, n in ((8192, 4096, 4096),) if quick else ((8192, 4096, 4096), (8192, 4096, 16384)):
        x, w, b_ = rand(m, k), rand(n, k), rand(n)
        out.append(Case("linear", lambda b, x=x, w=w, c=b_: ops.linear(x, w, c, activation="gelu", backend=b), "torch eager",
                        lambda x=x, w=w, c=b_: F.gelu(F.linear(x, w, c)), (x, w, b_)))
    return out


def _once_ms(fn, device: torch.device) -> float:
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end)


def time_round_robin(steps: dict[str, Callable], device: torch.device, seconds: float, rounds: int = 5) -> dict:
    """Median ms of each step, one call of each per round so drifting clocks hit all alike; the
    first call of each (compiling, autotuning) is not counted."""
    for fn in steps.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    start = time.perf_counter()
    while len(next(iter(samples.values()))) < rounds or time.perf_counter() - start < seconds * len(steps):
        for name, fn in steps.items():
            samples[name].append(_once_ms(fn, device))
        if len(samples[name]) >= 200:
            break
    return {name: statistics.median(ts) for name, ts in samples.items()}


def _step(call, mode: str, grads: tuple, grad_out: torch.Tensor):
    def fwd():
        with torch.no_grad():
            call()

    def train():
        torch.autograd.grad(call(), grads, grad_out)
    return fwd if mode == "fwd" else train


def _agrees(out: torch.Tensor, ref: torch.Tensor) -> bool:
    tol = 1e-3 if out.dtype == torch.float32 else 5e-2  # a sanity gate; the test suite holds the tolerances
    return bool(((out.float() - ref.float()).abs() <= tol * (1 + ref.float().abs())).all())


def measure(case_list: list[Case], device: torch.device, seconds: float = 0.2, progress=print) -> dict:
    """op -> bucket -> table entry for these cases. Correctness is checked against torch's op
    (memory-frugal, unlike the reference backend at long sequences)."""
    entries: dict[str, dict[str, dict]] = {}
    for case in case_list:
        with torch.no_grad():
            expected = case.torch_call()
        servable = []
        for name in (b for b in backend.BACKENDS if b != "cuda-emu"):
            try:
                with torch.no_grad():
                    ok = _agrees(case.call(name), expected)
            except backend.BackendUnavailableError:
                continue
            except torch.OutOfMemoryError:
                ok = False
            if ok:
                servable.append(name)
            else:
                progress(f"  {case.op}: {name} disagrees with torch's op or ran out of memory; not measured")
        grad_out = torch.randn_like(expected)
        for mode in ("fwd", "fwd+bwd") if case.grads and servable else ("fwd",) if servable else ():
            with backend.record_buckets() as seen:
                _step(lambda: case.call(servable[0]), mode, case.grads, grad_out)()
            key = next(k for op, k in seen if op == case.op)
            steps = {b: _step(lambda b=b: case.call(b), mode, case.grads, grad_out) for b in servable}
            steps[case.torch_name] = _step(case.torch_call, mode, case.grads, grad_out)
            try:
                ms = time_round_robin(steps, device, seconds)
            except torch.OutOfMemoryError:  # the fp32 reference at long sequences: measure the rest
                progress(f"  {case.op} [{key}]: out of memory with the reference backend; measured without it")
                steps.pop("reference", None)
                ms = time_round_robin(steps, device, seconds)
            torch_ms = ms.pop(case.torch_name)
            entries.setdefault(case.op, {})[key] = {
                "ms": ms, "torch": {"impl": case.torch_name, "ms": torch_ms}, "peers": {case.torch_name: torch_ms},
                "source": {"by": "python -m fastlm tune", "date": datetime.date.today().isoformat()}}
            progress(f"  {case.op} [{key}]: " + ", ".join(f"{n} {t:.3g} ms" for n, t in sorted(ms.items(), key=lambda x: x[1]))
                     + f"; {case.torch_name} {torch_ms:.3g} ms")
    return entries


def main(ops: list[str] | None, quick: bool, device_name: str, progress=print) -> int:
    device = torch.device(device_name)
    if device.type != "cuda" or not torch.cuda.is_available():
        print(f"fastlm tune: --device {device_name!r}: tune measures on a CUDA device, and none is visible "
              f"(the tables it writes are per GPU class; CPU dispatch is fixed: cpu, then reference)", file=sys.stderr)
        return 2
    chosen = [c for c in cases(device, quick) if ops is None or c.op in ops]
    cls = backend.device_class(device)
    progress(f"fastlm tune: {len(chosen)} cases on {torch.cuda.get_device_name(device)} (class {cls})")
    path = tables.user_path(cls)
    tables.write(path, cls, measure(chosen, device, progress=progress))
    progress(f"wrote {path}")
    return 0
