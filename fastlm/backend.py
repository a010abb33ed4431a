"""The one registry of backends: which exist, which can serve an input, and why not.

Selection order for every op call: the call's `backend=`, then the innermost
`fastlm.use_backend(...)`, then the FASTLM_BACKEND environment variable, then "auto".
"auto" on CPU takes the first backend in AUTO_ORDER["cpu"] that can serve. On a GPU it takes,
among the backends that can serve, the one measured fastest for the op and its size bucket
(BUCKETS) on the GPU's device class (fastlm/dispatch: shipped tables, overridden by the
user's `python -m fastlm tune` cache); where no measurement decides, the first that can serve
in the static estimate order (fastlm/dispatch/estimates.py). auto_choice() says which and why.
A backend chosen explicitly that can't serve raises BackendUnavailableError listing every
backend's reasons: nothing falls back silently from an explicit choice.

"cuda-emu" is the cuda backend's kernels compiled against the SIMT emulator (fastlm._C_emu):
it serves CPU tensors, slowly and exactly as the GPU code would, for tests and development.
It answers the cuda backend's per-op reasons and is never picked by "auto".

Written so torch.compile can trace it (plain globals, os.environ, no locks); reading the device
and the measured tables happens in assume_constant_result functions, once per compile.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterator

import torch

from fastlm import _ext, dispatch
from fastlm.dispatch import tables

BACKENDS = ("cuda", "triton", "cpu", "reference", "cuda-emu")
CHOICES = ("auto",) + BACKENDS
# CUDA's entry is the default static estimate order, for reading; auto uses dispatch.static_order
AUTO_ORDER = {"cuda": tuple(b for b, _ in dispatch.static_order("*", "*")), "cpu": ("cpu", "reference")}
MIN_CUDA_CAPABILITY = (8, 0)  # the oldest arch csrc/cuda is compiled for

WhyNot = Callable[..., "list[str]"]
_OPS: dict[str, dict[str, WhyNot]] = {}
_EXAMPLES: dict[str, Callable[[torch.device], tuple]] = {}
_stack: list[str] = []
_simulated: list[dispatch.DeviceSpec] = []  # see simulate()
_recording: list[list[tuple[str, str]]] = []  # see record_buckets()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend can't serve this call."""


def _check_name(name: str, source: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"{source} must be one of {', '.join(CHOICES)}; got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run fastlm ops inside the block on backend `name` ("auto" restores automatic choice)."""
    _stack.append(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _stack.pop()


def requested(backend: str | None = None) -> tuple[str, str]:
    """(name, where it came from) for this call, before checking it can serve."""
    if backend is not None:
        return _check_name(backend, "backend"), "backend="
    if _stack:
        return _stack[-1], "fastlm.use_backend"
    env = os.environ.get("FASTLM_BACKEND")
    if env:
        return _check_name(env, "FASTLM_BACKEND"), "FASTLM_BACKEND"
    return "auto", "auto"


def register(op: str, backend: str, example: Callable[[torch.device], tuple] | None = None):
    """Decorator: `fn(*op_inputs) -> list[str]` says why `backend` can't serve `op` (empty = can).
    The "cuda" registration also serves "cuda-emu"."""
    if backend not in BACKENDS or backend == "cuda-emu":
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")

    def deco(fn: WhyNot) -> WhyNot:
        _OPS.setdefault(op, {})[backend] = fn
        if example is not None:
            _EXAMPLES[op] = example
        return fn

    return deco


def dtype_reason(x: torch.Tensor, allowed, backend: str) -> list[str]:
    """[] when x's dtype is in `allowed`, else the one reason naming what `backend` takes."""
    if x.dtype in allowed:
        return []
    names = ", ".join(str(d).replace("torch.", "") for d in allowed)
    return [f"dtype {str(x.dtype).replace('torch.', '')} not supported by the {backend} backend ({names})"]


def register_by_dtype(op: str, example: Callable[[torch.device], tuple], cpu_dtypes, gpu_dtypes) -> None:
    """The common case: every backend serves `op` when the first input's dtype suits it (reference:
    any floating dtype; cpu: `cpu_dtypes`; triton and cuda: `gpu_dtypes`)."""
    def make(name, allowed):
        def why(x, *_):
            if allowed is None:
                return [] if x.dtype.is_floating_point else [f"dtype {x.dtype} is not floating point"]
            return dtype_reason(x, allowed, name)
        return why

    for name, allowed in (("reference", None), ("cpu", cpu_dtypes), ("triton", gpu_dtypes), ("cuda", gpu_dtypes)):
        register(op, name, example=example if name == "reference" else None)(make(name, allowed))


def register_kernels(op: str, example: Callable[[torch.device], tuple], ext_op: str, *, cpu, triton, cuda,
                     missing: str = "") -> None:
    """An op whose kernels serve a dtype list per backend: reference any floating dtype; cpu and
    cuda the given dtypes when the extension has `ext_op`; triton the given dtypes. A backend given
    None has no kernel yet and refuses, saying `missing`."""
    def make(name, allowed):
        def why(x, *_):
            if allowed is None:
                return [f"no {name} kernel for {op} yet: {missing}"]
            reasons = dtype_reason(x, allowed, name)
            if name != "triton" and not hasattr(torch.ops.fastlm, ext_op):
                reasons.append(f"the extension has no {ext_op} (rebuild fastlm)")
            return reasons
        return why

    register(op, "reference", example=example)(
        lambda x, *_: [] if x.dtype.is_floating_point else [f"dtype {x.dtype} is not floating point"])
    for name, allowed in (("cpu", cpu), ("triton", triton), ("cuda", cuda)):
        register(op, name)(make(name, allowed))


def _extension_call(name: str) -> Callable:
    def call(*args, ops=torch.ops.fastlm):
        return getattr(ops, name)(*args)
    call.__name__ = name
    return call


def implementations(*, reference: Callable, triton: Callable, cpu: Callable | None = None,
                    cuda: Callable | None = None, ext: str | None = None) -> dict[str, Callable]:
    """An op's per-backend implementations, keyed by backend name. `cuda` calls the compiled
    kernels through its `ops=torch.ops.fastlm` argument; "cuda-emu" is the same call bound to the
    emulated kernels in torch.ops.fastlm_emu. ext: the name of an extension op taking exactly the
    implementation's arguments, which then serves as both cpu and cuda (the extension dispatches
    on the device)."""
    if ext is not None:
        cpu = cuda = _extension_call(ext)
    if cpu is None or cuda is None:
        raise TypeError("implementations: give cpu and cuda, or ext")
    emulated = functools.partial(cuda, ops=torch.ops.fastlm_emu)
    return {"reference": reference, "triton": triton, "cpu": cpu, "cuda": cuda, "cuda-emu": emulated}


def ops() -> list[str]:
    return sorted(_OPS)


def example_inputs(op: str, device: torch.device) -> tuple:
    return _EXAMPLES[op](device)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@torch.compiler.assume_constant_result
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@torch.compiler.assume_constant_result
def _cuda_smem_optin(index: int) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


@torch.compiler.assume_constant_result
def _device_class(index: int) -> str:
    return dispatch.device_class(torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)))


@contextlib.contextmanager
def simulate(spec: dispatch.DeviceSpec) -> Iterator[None]:
    """Inside the block, CUDA tensors are taken to live on `spec` (its capability, shared memory
    and device class): how `info` shows, on any machine, what auto would pick on that GPU.
    Feed it fake CUDA tensors (torch._subclasses.FakeTensorMode); nothing runs on them."""
    if not isinstance(spec, dispatch.DeviceSpec):
        raise TypeError(f"simulate(spec) takes a fastlm.dispatch.DeviceSpec, got {type(spec).__name__}")
    _simulated.append(spec)
    try:
        yield
    finally:
        _simulated.pop()


def capability(device: torch.device) -> tuple[int, int]:
    return _simulated[-1].capability if _simulated else _capability(_index(device))


def device_class(device: torch.device) -> str:
    """The dispatch-table class of a CUDA device, e.g. "h100" (fastlm.dispatch.device_class)."""
    return _simulated[-1].device_class if _simulated else _device_class(_index(device))


def shared_memory_per_block(device: torch.device) -> int:
    """Bytes of shared memory one block may opt into on the GPU that runs kernels for `device`'s
    tensors: the CUDA device's sharedMemPerBlockOptin (99 KB on sm_86/89, 163 KB on sm_80, 227 KB
    on sm_90), or for CPU tensors the GPU the emulator models (cuda-emu)."""
    if device.type == "cuda":
        return _simulated[-1].smem_per_block_optin if _simulated else _cuda_smem_optin(_index(device))
    return int(torch.ops.fastlm_emu.emu_device()[3]) if _ext.HAS_EMULATOR else 0


def machine_reasons(backend: str, device: torch.device) -> list[str]:
    """Reasons that depend on this install and the device, not on the op."""
    reasons = []
    if backend == "cpu":
        if not _ext.HAS_EXTENSION:
            reasons.append(f"extension fastlm._C not built ({_ext.EXTENSION_ERROR})")
        if device.type != "cpu":
            reasons.append(f"serves CPU tensors; input is on {device}")
    elif backend == "cuda":
        if not _ext.HAS_EXTENSION:
            reasons.append(f"extension fastlm._C not built ({_ext.EXTENSION_ERROR})")
        elif not _ext.HAS_CUDA_KERNELS:
            reasons.append("extension built without CUDA kernels (torch without CUDA, or no nvcc at build time)")
        if device.type != "cuda":
            reasons.append(f"serves CUDA tensors; input is on {device}")
        elif capability(device) < MIN_CUDA_CAPABILITY:
            reasons.append(f"needs compute capability >= {MIN_CUDA_CAPABILITY[0]}.{MIN_CUDA_CAPABILITY[1]}")
    elif backend == "cuda-emu":
        if not _ext.HAS_EMULATOR:
            reasons.append(f"extension fastlm._C_emu not built ({_ext.EMULATOR_ERROR}); build with FASTLM_BUILD_EMU=1")
        if device.type != "cpu":
            reasons.append(f"serves CPU tensors (the CUDA kernels under the SIMT emulator); input is on {device}")
    elif backend == "triton":
        if not _ext.HAS_TRITON:
            reasons.append(f"triton not installed ({_ext.TRITON_ERROR})")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            reasons.append("CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)")
        elif device.type not in ("cpu", "cuda"):
            reasons.append(f"serves CUDA tensors; input is on {device}")
    return reasons


def why_not(op: str, backend: str, device: torch.device, *inputs) -> list[str]:
    """Every reason `backend` can't serve `op` on these inputs; [] means it can."""
    fn = _OPS.get(op, {}).get("cuda" if backend == "cuda-emu" else backend)
    if fn is None:
        return [f"no {backend} implementation of {op}"]
    return machine_reasons(backend, device) + fn(*inputs)


def report(op: str, device: torch.device, *inputs) -> dict[str, list[str]]:
    return {b: why_not(op, b, device, *inputs) for b in BACKENDS}


# ---------------------------------------------------------------- size buckets
def _train(*inputs) -> bool:
    """Whether the call records a backward (then the forward+backward time is what matters)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)


def _rowwise_bucket(x, *rest) -> str:
    return dispatch.rowwise_bucket(x.dtype, x.shape[-1] if x.dim() else 1, _train(x, *rest))


def _attention_bucket(q, k, v, mask, dropout_p, causal, *rest) -> str:
    kind = "masked" if mask is not None else "causal" if causal else "full"
    return dispatch.attention_bucket(q.dtype, q.shape[-1], v.shape[-1], kind, q.shape[2], k.shape[2], _train(q, k, v))


def _matmul_bucket(x, weight, *rest) -> str:
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return dispatch.matmul_bucket(x.dtype, m, x.shape[-1], weight.shape[0], _train(x, weight, *rest))


# op -> fn(*select's inputs) -> bucket key; ops not listed are row-wise over the first input's last dim
BUCKETS: dict[str, Callable[..., str]] = {
    "attention": _attention_bucket, "linear": _matmul_bucket, "linear_cross_entropy": _matmul_bucket,
}


def bucket(op: str, *inputs) -> str:
    """The size bucket of a call: the key of its entry in a measured dispatch table."""
    return BUCKETS.get(op, _rowwise_bucket)(*inputs)


@contextlib.contextmanager
def record_buckets() -> Iterator[list[tuple[str, str]]]:
    """Collects (op, bucket) of every select() inside the block (how `tune` keys what it times)."""
    _recording.append([])
    try:
        yield _recording[-1]
    finally:
        _recording.pop()


# ---------------------------------------------------------------- auto
@torch.compiler.assume_constant_result
def _measured_ops(device_class: str) -> tuple[str, ...]:
    return tuple(tables.entries(device_class))


@torch.compiler.assume_constant_result
def _table_choice(device_class: str, op: str, key: str, candidates: tuple[str, ...]) -> tuple[str, str]:
    entry = tables.entries(device_class).get(op, {}).get(key)
    if entry is None:
        return "", f"no entry for [{key}] in the {device_class} table"
    choice, reason = dispatch.choose(entry, candidates, dispatch.REFERENCE_IS_TORCH_OP.get(op, ()))
    return choice or "", f"{reason} [{key}; {entry['origin']}]"


def auto_choice(op: str, device: torch.device, *inputs) -> tuple[str, str]:
    """(backend, why) that "auto" picks for this call; "reference" when nothing else can serve."""
    if device.type != "cuda":  # plain loops: torch.compile traces this on every call
        order = AUTO_ORDER.get(device.type, ("reference",))
        for name in order:
            if not why_not(op, name, device, *inputs):
                return name, "static order on " + device.type + ": " + ", ".join(order)
        return "reference", "nothing in the static order (" + ", ".join(order) + ") can serve"
    cls = device_class(device)
    order = dispatch.static_order(op, cls)
    measured = op in _measured_ops(cls)
    candidates = []
    for name, _ in order:  # without a table, the first that can serve is enough
        if not why_not(op, name, device, *inputs):
            candidates.append(name)
            if not measured:
                break
    if not candidates:
        return "reference", f"nothing in the static order ({', '.join(b for b, _ in order)}) can serve"
    if measured:
        choice, why = _table_choice(cls, op, bucket(op, *inputs), tuple(candidates))
        if choice:
            return choice, why
    else:
        why = f"no measured {op} entries for {cls}"
    names = [b for b, _ in order]
    skipped = names[: names.index(candidates[0])]
    return candidates[0], (f"unmeasured ({why}), so the first that can serve in the static order "
                           f"{', '.join(names)}; {dict(order)[candidates[0]]}"
                           + (f"; {', '.join(skipped)} can't serve this call" if skipped else ""))


def select(op: str, device: torch.device, *inputs, backend: str | None = None) -> str:
    """The backend that serves this call (see module docstring for the order)."""
    name, source = requested(backend)
    if _recording:
        _recording[-1].append((op, bucket(op, *inputs)))
    if name == "auto":
        name, _ = auto_choice(op, device, *inputs)
        source = "auto"
    reasons = why_not(op, name, device, *inputs)
    if not reasons:
        return name
    lines = [f"{op}: backend {name!r} (from {source}) can't serve this call on {device}. Each backend:"]
    for b, rs in report(op, device, *inputs).items():
        lines.append(f"  {b}: " + ("can serve" if not rs else "; ".join(rs)))
    raise BackendUnavailableError("\n".join(lines))
