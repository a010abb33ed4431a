"""Ahead-of-time compilation of every Triton kernel for real GPUs, on a machine without one.

The launchers themselves say what gets compiled: `capture(target)` runs them on small CPU
tensors while fastlm.triton._tune.launch records each launch (kernel, arguments, constexprs)
instead of running it, with the target's shared-memory limit and SM count standing in for the
device's. An autotuned launch expands to every config its pruning keeps for that target.
Each launch is then compiled with triton.compile(ASTSource(...), target=GPUTarget(...)) and
measured: shared memory (compiled metadata), registers and spills (ptxas -v), seconds.

CASES is the one list of launcher calls; `ci` marks the representative subset that
tests/test_triton_aot.py compiles, scripts/triton_aot_sweep.py compiles them all.
Run it in a process without TRITON_INTERPRET=1 (interpreted kernels cannot be compiled).

Triton versions (GPU machine: Triton 3.6; CI: Triton 3.8), what this module relies on:
- ASTSource(fn, signature, constexprs=..., attrs=...) with constexprs keyed by (index,) tuples
  (3.3+; Triton <= 3.2 called it `constants`: passed by keyword name found by inspection);
- GPUTarget from triton.backends.compiler (3.0+; older: triton.compiler);
- attrs {(index,): [["tt.divisibility", 16]]}, made by the backend's parse_attr("D") where it exists;
- compiled.metadata.shared (bytes); the ptxas log through knobs.nvidia.dump_ptxas_log (printed
  to stdout), else ptxas -v is run on compiled.asm["ptx"] with the wheel's ptxas. triton.knobs
  itself exists from 3.4; whether its nvidia.dump_ptxas_log exists there or only from 3.5 is
  not checked here (only 3.6 and 3.8 are run): the import and the attribute are both guarded;
- Autotuner.configs / .early_config_prune / .fn and Config.kwargs / num_warps / num_stages / maxnreg
  (Config.maxnreg: 3.0+; read with getattr, compiled as the option of the same name).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import torch
import triton

from fastlm.triton import _tune

# per-block shared memory (shared_memory_per_block_optin) and SM counts of the GPUs we target
TARGETS = {
    80: _tune.Target(80, 166912, 108),  # A100
    86: _tune.Target(86, 101376, 84),  # sm_86/89 (RTX 30xx/40xx, A10, L4, L40): 99 KB
    90: _tune.Target(90, 232448, 132),  # H100/H200
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# what CI compiles: fp16 and bf16 kernels differ only in conversions, so each 16-bit one on one target;
# on sm_86 (99 KB per block) only the cases with Case.ci86 (the configs closest to that limit)
CI_DTYPES = {80: ("fp32", "bf16"), 86: ("fp32", "fp16"), 90: ("fp32", "fp16")}
_TYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
               torch.uint8: "u8", torch.int8: "i8", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}


# ---------------------------------------------------------------- Triton version shims
def gpu_target(capability: int):
    try:
        from triton.backends.compiler import GPUTarget
    except ImportError:  # Triton < 3.0
        from triton.compiler import GPUTarget
    return GPUTarget("cuda", capability, 32)


def _ast_source(fn, signature, constexprs, attrs):
    from triton.compiler import ASTSource

    params = inspect.signature(ASTSource.__init__).parameters
    name = "constexprs" if "constexprs" in params else "constants"
    return ASTSource(fn, signature, **{name: constexprs, "attrs": attrs})


def _divisible_attr(capability: int):
    try:
        from triton.compiler.compiler import make_backend

        return make_backend(gpu_target(capability)).parse_attr("D")
    except (ImportError, AttributeError):
        return [["tt.divisibility", 16]]


# ---------------------------------------------------------------- launches
@dataclass
class Launch:
    kernel: str  # "<module>.<kernel function>"
    fn: object  # the JITFunction
    signature: dict
    constexprs: dict  # {name: value}
    divisible: list  # argument names specialised as multiples of 16
    options: dict  # num_warps, num_stages
    config: str = ""  # the autotune config, for tables
    grid: tuple = ()  # (x, y, z) as the launcher would launch it (_tune.grid_of)
    smem_estimate: int = -1  # the kernel file's shared-memory estimate for this config (-1: none)

    def key(self):
        return (self.kernel, tuple(sorted(self.signature.items())), tuple(sorted(self.constexprs.items())),
                tuple(self.divisible), tuple(sorted(self.options.items())))


def _specialize(value, specialize: bool):
    """(signature type, divisible by 16) as Triton's launcher specialises an argument; type
    'constexpr' for ints equal to 1 and None (Triton folds those in)."""
    if value is None:
        return "constexpr", False
    if isinstance(value, torch.Tensor):
        return "*" + _TYPE_NAMES[value.dtype], specialize and value.data_ptr() % 16 == 0
    if type(value).__name__ == "TensorDescriptor":  # a host TMA descriptor (triton.tools.tensor_descriptor)
        return f"tensordesc<{_TYPE_NAMES[value.base.dtype]}[{', '.join(map(str, value.block_shape))}]>", False
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        if specialize and value == 1:
            return "constexpr", False
        kind = "i32" if -2**31 <= value < 2**31 else "i64"
        return kind, specialize and value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"cannot specialise argument value {value!r}")


def _expand(kernel, args, meta, grid=()) -> list[Launch]:
    """A recorded launch as compile jobs: one per config an autotuned kernel can pick."""
    if isinstance(kernel, triton.runtime.Autotuner):
        jit = kernel.fn
        named = dict(zip(jit.arg_names, args))
        configs = kernel.configs
        if kernel.early_config_prune:
            configs = kernel.early_config_prune(configs, named, **meta)
        need = getattr(kernel, "fastlm_smem_need", None)
        jobs = []
        for c in configs:
            if c.pre_hook is not None:  # e.g. descriptors' block shapes follow the config
                c.pre_hook({**named, **meta, **c.kwargs})
            opts = dict(num_warps=c.num_warps, num_stages=c.num_stages)
            if getattr(c, "maxnreg", None) is not None:  # ptxas' register cap (.maxnreg), as the launch passes it
                opts["maxnreg"] = c.maxnreg
            label = ",".join(f"{k}={v}" for k, v in c.kwargs.items()) + f",w{c.num_warps},s{c.num_stages}"
            job = _launch(jit, args, {**meta, **c.kwargs}, opts, label)
            job.grid = _tune.grid_of(grid, {**meta, **c.kwargs})
            if need is not None:
                job.smem_estimate = int(need(c, {**named, **meta}))
            jobs.append(job)
        return jobs
    opts = {k: meta.pop(k) for k in ("num_warps", "num_stages") if k in meta}
    job = _launch(kernel, args, meta, opts, "")
    job.grid = _tune.grid_of(grid, meta)
    return [job]


def _launch(jit, args, meta, options, label) -> Launch:
    values = dict(zip(jit.arg_names, args))
    values.update(meta)
    no_spec = {jit.arg_names[i] if isinstance(i, int) else i for i in (jit.do_not_specialize or [])}
    signature, constexprs, divisible = {}, {}, []
    for p in jit.params:
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", v
            continue
        kind, div = _specialize(v, p.name not in no_spec)
        signature[p.name] = kind
        if kind == "constexpr":
            constexprs[p.name] = v
        elif div:
            divisible.append(p.name)
    options = {"num_warps": 4, "num_stages": 3, **options}
    return Launch(f"{jit.fn.__module__.split('.')[-1]}.{jit.fn.__name__}", jit, signature, constexprs,
                  divisible, options, label)


@contextlib.contextmanager
def capture(target: _tune.Target):
    """Within: launchers record their launches (list yielded) for `target` instead of running."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("fastlm.triton.aot needs a process without TRITON_INTERPRET=1")
    recorded = []
    saved = dict(_tune._aot)
    _tune._aot.update(target=target, record=lambda k, a, m, g=(): recorded.extend(_expand(k, a, dict(m), g)))
    env = os.environ.get("FASTLM_TRITON_AUTOTUNE")
    os.environ["FASTLM_TRITON_AUTOTUNE"] = "1"  # every config a tuned launch can pick
    try:
        yield recorded
    finally:
        _tune._aot.update(saved)
        if env is None:
            os.environ.pop("FASTLM_TRITON_AUTOTUNE")
        else:
            os.environ["FASTLM_TRITON_AUTOTUNE"] = env


# ---------------------------------------------------------------- compile and measure
@dataclass
class Result:
    smem: int = -1
    regs: int = -1
    spills: int = -1  # spill store bytes
    seconds: float = 0.0
    error: str = ""
    wgmma: bool = False  # Hopper's warpgroup MMA in the PTX (tl.dot lowered to it)
    tma: bool = False  # TMA bulk tensor copies in the PTX (cp.async.bulk.tensor)
    # the most warps any tensor-core (nvidia_mma) layout of the kernel puts side by side along N
    # (warpsPerCTA[1]); 1: every warp owns whole rows of its MMA tiles; 0: no MMA layout
    mma_warps_n: int = 0
    ttir: str = field(default="", repr=False)


_MMA_WARPS_RE = re.compile(r"nvidia_mma<\{[^}]*warpsPerCTA = \[(\d+), (\d+)\]")
_PTXAS_RE = re.compile(r"(\d+) bytes spill stores.*?Used (\d+) registers", re.S)


def _ptxas_report(log: str, ptx: str, capability: int):
    m = _PTXAS_RE.search(log)
    if m is None:  # no log from Triton (older versions): run ptxas -v ourselves
        from triton.backends.nvidia.compiler import get_ptxas

        tool = get_ptxas(capability) if "arch" in inspect.signature(get_ptxas).parameters else get_ptxas()
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "k.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
            out = subprocess.run([tool.path, "-v", f"--gpu-name={arch}", src, "-o", src + ".o"],
                                 capture_output=True, text=True, check=True)
        m = _PTXAS_RE.search(out.stderr + out.stdout)
    return int(m.group(2)), int(m.group(1))


def compile_launch(launch: Launch, capability: int, keep_ttir: bool = False) -> Result:
    attrs = {(list(launch.signature).index(n),): _divisible_attr(capability) for n in launch.divisible}
    consts = {(list(launch.signature).index(n),): v for n, v in launch.constexprs.items()}
    res = Result()
    log = io.StringIO()
    try:
        from triton import knobs  # triton.knobs: 3.4+ (dump_ptxas_log: see the header)
    except ImportError:
        knobs = None
    if knobs is not None and not hasattr(getattr(knobs, "nvidia", None), "dump_ptxas_log"):
        knobs = None  # no such knob in this version: ptxas -v is run ourselves
    t0 = time.perf_counter()
    try:
        saved = knobs.nvidia.dump_ptxas_log if knobs else None
        with contextlib.redirect_stdout(log):
            if knobs:
                knobs.nvidia.dump_ptxas_log = True
            try:
                src = _ast_source(launch.fn, launch.signature, consts, attrs)
                compiled = triton.compile(src, target=gpu_target(capability), options=dict(launch.options))
            finally:
                if knobs:
                    knobs.nvidia.dump_ptxas_log = saved
    except Exception as e:  # a compile error is a result to report, not a crash of the sweep
        res.seconds = time.perf_counter() - t0
        text = str(e).strip()
        res.error = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]
        return res
    res.seconds = time.perf_counter() - t0
    res.smem = int(compiled.metadata.shared)
    res.regs, res.spills = _ptxas_report(log.getvalue(), compiled.asm["ptx"], capability)
    res.wgmma = "wgmma.mma_async" in compiled.asm["ptx"]
    res.tma = "cp.async.bulk.tensor" in compiled.asm["ptx"]
    res.mma_warps_n = max((int(n) for _, n in _MMA_WARPS_RE.findall(compiled.asm.get("ttgir", ""))), default=0)
    if keep_ttir:
        res.ttir = compiled.asm["ttir"]
    return res


# ---------------------------------------------------------------- what the launchers launch
@dataclass
class Case:
    module: str
    label: str
    run: object  # run(dtype): calls the module's launcher on CPU tensors
    ci: bool = False  # part of the representative set compiled by tests/test_triton_aot.py
    dtypes: tuple = ("fp32", "fp16", "bf16")
    # in CI, only the first this many configs per tuned kernel (0: all), or only the configs with
    # these labels (Launch.config); the sweep compiles all
    ci_configs: int | tuple = 0
    ci86: tuple = ()  # the dtypes CI compiles this case in for sm_86 (whatever `ci` says: sm_80 / sm_90)


def _t(*shape, dtype):
    return torch.randn(*shape).to(dtype)


def _attention_case(b, h, hkv, tq, tk, d, causal=0, mask=None, dropout=0.0, backward=True, softcap=0.0,
                    window=(-1, -1), alibi=None, sinks=False):
    """alibi: None, "h" (slopes (H,)) or "bh" ((B, H))."""
    def run(dtype):
        from fastlm.triton import attention

        q, k, v = _t(b, h, tq, d, dtype=dtype), _t(b, hkv, tk, d, dtype=dtype), _t(b, hkv, tk, d, dtype=dtype)
        m = None if mask is None else (torch.ones(1, h, tq, tk, dtype=torch.bool) if mask == "bool"
                                       else torch.zeros(1, 1, tq, tk, dtype=dtype))
        options = dict(softcap=softcap, window=window, alibi=None if alibi is None else torch.rand(
            *((h,) if alibi == "h" else (b, h))))
        out, lse = attention.forward(q, k, v, m, causal, d ** -0.5, dropout, 1, sinks=torch.randn(h) if sinks else None,
                                     **options)
        if backward:
            attention.backward(torch.randn_like(out), q, k, v, m, out, lse, causal, d ** -0.5, dropout, 1, **options)
    return run


def _tf32(run):
    """A case run as with torch.backends.cuda.matmul.allow_tf32 = True: fp32 dots become TF32."""
    def tf32_run(dtype):
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            run(dtype)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
    return tf32_run


def _varlen_case(seqs, h, hkv, max_len, d, causal=0, softcap=0.0, window=(-1, -1), alibi=None, sinks=False):
    """Packed sequences of max_len rows each (varlen_forward / varlen_backward: the launchers
    read only shapes, the kernels read cu_seqlens on the device); alibi None, "h" or "bh"."""
    def run(dtype):
        from fastlm.triton import attention

        total = seqs * max_len
        q, k, v = _t(total, h, d, dtype=dtype), _t(total, hkv, d, dtype=dtype), _t(total, hkv, d, dtype=dtype)
        cu = torch.arange(0, total + 1, max_len, dtype=torch.int32)
        options = dict(softcap=softcap, window=window, alibi=None if alibi is None else torch.rand(
            *((h,) if alibi == "h" else (seqs, h))))
        out, lse = attention.varlen_forward(q, k, v, cu, cu, max_len, max_len, causal, d ** -0.5,
                                            sinks=torch.randn(h) if sinks else None, **options)
        attention.varlen_backward(torch.randn_like(out), q, k, v, cu, cu, max_len, max_len, out, lse, causal,
                                  d ** -0.5, **options)
    return run


def _paged_case(b, h, hkv, tq, pages, page, d, causal=True, softcap=0.0, window=(-1, -1), alibi=None, sinks=False):
    """Decode against a paged KV cache (attention_decode.paged_forward); alibi None, "h" or "bh"."""
    def run(dtype):
        from fastlm.triton import attention_decode

        q = _t(b, tq, h, d, dtype=dtype)
        kc, vc = _t(b * pages, page, hkv, d, dtype=dtype), _t(b * pages, page, hkv, d, dtype=dtype)
        table = torch.arange(b * pages, dtype=torch.int32).view(b, pages)
        seqlens = torch.full((b,), pages * page - 3, dtype=torch.int32)
        attention_decode.paged_forward(q, kc, vc, table, seqlens, causal, d ** -0.5, softcap=softcap, window=window,
                                       alibi=None if alibi is None else torch.rand(*((h,) if alibi == "h" else (b, h))),
                                       sinks=torch.randn(h) if sinks else None)
    return run


def _module_case(module, fn_name, *build):
    def run(dtype):
        import importlib

        getattr(importlib.import_module(f"fastlm.triton.{module}"), fn_name)(*[f(dtype) for f in build])
    return run


def _attention_cases():
    cases = []
    # One config per kernel that ptxas spilled 4-24 B, left to its own register target (128 at 8
    # warps, 168 at 4), before every attention config carried maxnreg (attention.MAX_REGS):
    # CI compiles them in 16-bit so that dropping maxnreg fails there.
    spilled = {(32, 1, None, 0.0): "BLOCK_M=128,BLOCK_N=64,w8,s3",  # forward
               (64, 1, None, 0.0): "BLOCK_M=32,BLOCK_N=32,w4,s1",  # dK/dV: 24 B
               (32, 0, None, 0.0): "BLOCK_M=64,BLOCK_N=64,w8,s2"}  # dQ
    for d in (32, 64, 128, 256):
        for causal, mask, drop in ((0, None, 0.0), (1, None, 0.0), (2, "bool", 0.0), (0, "float", 0.0),
                                   (1, None, 0.1)):
            key = (d, causal, mask, drop)
            # 16-bit D = 128 forward + backward, its two first configs per kernel, on every target:
            # on sm_86 the biggest (nearest the 99 KB limit), on sm_80 the whole-row 128-row forward (sm_90: the TMA one)
            sm86 = key == (128, 1, None, 0.0)
            ci = key in ((64, 1, None, 0.1), (256, 0, "float", 0.0)) or key in spilled or sm86
            label = f"d{d} causal{causal} mask={mask} p={drop}"
            ci_configs = (spilled[key],) if key in spilled else 2 if sm86 else 0
            cases.append(Case("attention", label, _attention_case(2, 4, 2, 1024, 1024, d, causal, mask, drop), ci,
                              ci_configs=ci_configs, ci86=("fp16",) if sm86 else ()))
        for group in (1, 8):  # decode: group * Tq rows per program
            cases.append(Case("attention_decode", f"d{d} group{group} tq1", _attention_case(
                1, group * 2, 2, 1, 4096, d, 2, None, 0.0, backward=False), ci=False))
        cases.append(Case("attention_decode", f"d{d} group8 tq8 mask", _attention_case(  # 64 rows a program
            1, 16, 2, 8, 4096, d, 2, "float", 0.0, backward=False), ci=d in (128, 256),
            ci86=("fp16",) if d == 128 else ()))
    # the options (issue #13): every one at once in CI, the heaviest kernels they make (both band
    # edges, ALiBi's per-score term, softcap's 1 - tanh^2 tile, sinks). At D = 64: IEEE fp32 dK/dV
    # at D = 128 spills with no option at all. Not fp16 (so not sm_90's 16-bit), for CI's time:
    # the sweep compiles it (its 4-warp 32x32 dK/dV, 8 B spilled at ptxas's own 168 registers,
    # is clean under maxnreg on sm_90). Gemma-2-style softcap + sliding window at D = 256 and a
    # two-sided window with (H,) slopes: sweep only.
    cases.append(Case("attention", "d64 causal2 window(255,0) alibi(B,H) sinks softcap30", _attention_case(
        2, 4, 2, 1024, 1024, 64, 2, softcap=30.0, window=(255, 0), alibi="bh", sinks=True), ci=True,
        dtypes=("fp32", "bf16")))
    cases.append(Case("attention", "d256 causal1 window(511,0) softcap50", _attention_case(
        2, 4, 2, 1024, 1024, 256, 1, softcap=50.0, window=(511, 0))))
    cases.append(Case("attention", "d128 causal0 window(128,128) alibi(H)", _attention_case(
        2, 4, 2, 1024, 1024, 128, 0, window=(128, 128), alibi="h")))
    cases.append(Case("attention_decode", "d128 group8 tq1 window(1023,0) alibi(B,H) sinks softcap30", _attention_case(
        1, 16, 2, 1, 4096, 128, 2, backward=False, softcap=30.0, window=(1023, 0), alibi="bh", sinks=True), ci=True))
    # fp32 with TF32 allowed: its own tile rules (attention._tf32_fits). CI: D = 128, where dQ's
    # 32-row tiles took all 255 registers and spilled, and a bool mask at D = 64, where its 64-row
    # 8-warp tiles did on sm_80/86.
    for d, causal, mask in ((128, 1, None), (64, 2, "bool"), (32, 0, "float"), (256, 0, "float")):
        cases.append(Case("attention", f"tf32 d{d} causal{causal} mask={mask}", _tf32(_attention_case(
            2, 4, 2, 1024, 1024, d, causal, mask)), ci=d in (64, 128), dtypes=("fp32",)))
    cases.append(Case("attention", "tf32 varlen d128 causal1", _tf32(_varlen_case(8, 4, 2, 512, 128, 1))))
    for d in (32, 64):  # decode with a mask: its TF32 register estimate counts the mask's tiles
        cases.append(Case("attention_decode", f"tf32 d{d} group8 tq8 mask", _tf32(_attention_case(
            1, 16, 2, 8, 4096, d, 2, "float", 0.0, backward=False)), ci=d == 32, dtypes=("fp32",)))
    # varlen (packed sequences): the dense kernels' VARLEN path. CI: the every-option case at
    # D = 64 (as the dense options case), 16-bit, its two biggest configs per kernel (a 64-row
    # forward for wgmma): the VARLEN additions are the same in every config (the sweep has all)
    for d in (64, 128, 256):
        cases.append(Case("attention", f"varlen d{d} causal1", _varlen_case(8, 4, 2, 512, d, 1)))
    cases.append(Case("attention", "varlen d64 causal2 window(255,0) alibi(S,H) sinks softcap30", _varlen_case(
        8, 4, 2, 512, 64, 2, softcap=30.0, window=(255, 0), alibi="bh", sinks=True), ci=True, dtypes=("fp16", "bf16"),
        ci_configs=2))
    # decode against a paged cache (the block-table gather, lengths from the device): Llama-style
    # GQA, one token; in CI a speculative 4 with every option
    for d in (64, 128, 256):
        cases.append(Case("attention_decode", f"paged d{d} group8 tq1 page16", _paged_case(4, 16, 2, 1, 64, 16, d)))
    cases.append(Case("attention_decode", "paged d128 group4 tq4 page64 window(1023,0) alibi(B,H) sinks softcap30",
                      _paged_case(4, 8, 2, 4, 16, 64, 128, softcap=30.0, window=(1023, 0), alibi="bh", sinks=True),
                      ci=True))
    return cases


def _linear_cases():
    from fastlm.triton.bias_act import ACT_CODES

    cases = []
    for act in (None, *ACT_CODES):
        def run(dtype, act=act):
            from fastlm.triton import linear

            x, w, b = _t(512, 768, dtype=dtype), _t(3072, 768, dtype=dtype), _t(3072, dtype=dtype)
            y, z = linear.forward(x, w, b, None, act, act is not None)
            linear.backward(torch.randn_like(y), x, w, b, z if act else y, act or "none")
        cases.append(Case("linear", f"act={act} fwd+bwd", run, ci=act == "gelu_tanh",  # every epilogue path
                          ci86=("fp32",) if act == "gelu_tanh" else ()))
    return cases


def _row_cases():
    cases = []
    # softmax: 128 columns go many rows to a program, 4096 and 16384 one register tile a row (16384:
    # 16 warps), 50257 and 262144 the two-walk path; enough rows that the launcher keeps its widest groups
    for cols in (128, 768, 4096, 16384, 50257, 262144):
        for log in (False, True):
            def sm(dtype, cols=cols, log=log):
                from fastlm.triton import softmax

                x = _t(max(4, 2**21 // cols), cols, dtype=dtype)
                y = softmax.forward(x, torch.zeros(1, cols, dtype=dtype), 0.5, 4, log)
                softmax.backward(torch.randn_like(y), y, 0.5, log)
            cases.append(Case("softmax", f"cols{cols} log={log}", sm, ci=cols in (128, 4096, 16384, 50257) and not log))
    # norms: one register tile a row up to 8192 columns (16 warps), the chunked walks beyond
    for cols in (768, 4096, 8192, 16384, 32768):
        def norm(dtype, cols=cols):
            from fastlm.triton import norms

            x, w = _t(64, cols, dtype=dtype), _t(cols, dtype=dtype)
            for rms in (False, True):
                y, h, mean, rstd = norms.forward(x, x, w, w, 1e-5, rms)
                norms.backward(torch.randn_like(y), y, h, w, mean, rstd, rms, not rms)
        cases.append(Case("norms", f"cols{cols}", norm, ci=cols in (4096, 32768)))
    for cols in (768, 4096, 50257, 262144):
        big = cols > 8192
        def ce(dtype, cols=cols):
            from fastlm.triton import cross_entropy

            x = _t(4, cols, dtype=dtype)
            t = torch.randint(0, cols, (4,))
            for w, smooth in ((None, 0.0), (torch.rand(cols), 0.1)):
                loss, lse = cross_entropy.forward(x, t, w, -100, smooth)
                cross_entropy.backward(torch.ones(4), x, t, w, lse, -100, smooth)
        cases.append(Case("cross_entropy", f"cols{cols}", ce, ci=cols == 50257))
        if not big:
            def ba(dtype, cols=cols):
                from fastlm.triton import bias_act

                x, b = _t(64, cols, dtype=dtype), _t(cols, dtype=dtype)
                for act in ("gelu", "gelu_tanh", "relu", "silu"):
                    bias_act.forward(x, b, act)
                    bias_act.backward(torch.randn_like(x), x, b, act)
            cases.append(Case("bias_act", f"cols{cols}", ba, ci=cols == 4096))
    return cases


def _rope_case(b, hq, hk, t, d, rot, tables, interleaved):
    def run(dtype):
        from fastlm.triton import rope

        def heads(h):  # HF's layout: the (B, T, H*D) projection viewed as (B, H, T, D)
            return _t(b, t, h * d, dtype=dtype).view(b, t, h, d).transpose(1, 2)
        q, k = heads(hq), heads(hk)
        if tables:
            cos, sin = _t(1, t, rot // 2, dtype=dtype), _t(1, t, rot // 2, dtype=dtype)
            pos = inv_freq = None
        else:
            cos = sin = None
            pos, inv_freq = torch.arange(t).expand(b, t), torch.rand(rot // 2)
        for inverse in (False, True):
            rope.rope(q, k, cos, sin, pos, inv_freq, 1.0, interleaved, inverse, torch.empty_like(q), torch.empty_like(k))
    return run


def _rope_cases():
    cases = []
    # (b, hq, hk, t, d, rot): LLaMA-style GQA prefill and decode, GPT-2-sized heads (two tokens a
    # program), NeoX/Phi partial rotary (a copied tail), Gemma's D = 256
    for b, hq, hk, t, d, rot in ((2, 32, 8, 2048, 128, 128), (8, 32, 8, 1, 128, 128), (4, 12, 12, 2048, 64, 64),
                                 (2, 32, 32, 1024, 80, 40), (2, 16, 16, 1024, 64, 16), (2, 8, 4, 1024, 256, 256)):
        for tables in (True, False):
            for interleaved in (False, True):
                ci = (d, rot) in ((128, 128), (80, 40)) and t > 1 and tables != interleaved
                label = f"b{b} hq{hq} hk{hk} t{t} d{d} r{rot} {'tables' if tables else 'positions'}" + (
                    " interleaved" if interleaved else "")
                cases.append(Case("rope", label, _rope_case(b, hq, hk, t, d, rot, tables, interleaved), ci))
    return cases


def _moe_cases():
    """Router (Mixtral's 8 experts top-2 with capacity, DeepSeek-V3-sized 256 experts top-8 sigmoid),
    permute / unpermute at a 4096-wide hidden size, and the grouped GEMMs of a Mixtral-shaped
    expert MLP (gated up-projection, then the down projection with a bias and an activation)."""
    cases = []
    # CI compiles the middle router case (all three kernels) and the gated grouped GEMM: the other
    # cases add register pressure (E = 256) or the bias and elementwise paths, in the sweep
    for t, e, k, sigmoid, capacity in ((4096, 8, 2, False, 1280), (1024, 64, 6, True, 100), (1024, 256, 8, True, -1)):
        def route(dtype, t=t, e=e, k=k, sigmoid=sigmoid, capacity=capacity):
            from fastlm.triton import moe_router

            logits = _t(t, e, dtype=dtype)
            moe_router.forward(logits, k, sigmoid, True, capacity)
            moe_router.backward(torch.randn(t, k), torch.ones(()), torch.ones(()), logits, k, sigmoid, True, capacity)
        cases.append(Case("moe_router", f"t{t} e{e} k{k} {'sigmoid' if sigmoid else 'softmax'} cap{capacity}", route,
                          ci=e == 64))

    def permute(dtype):
        from fastlm.triton import moe_permute

        t, k, e, h = 1024, 2, 8, 4096
        x = _t(t, h, dtype=dtype)
        ids = torch.randint(-1, e, (t, k), dtype=torch.int32)
        xs, rows, _ = moe_permute.permute(x, ids, e)
        moe_permute.permute_backward(torch.randn_like(xs), rows)
        out = moe_permute.unpermute(xs, rows, torch.rand(t, k))
        moe_permute.unpermute_backward(torch.randn_like(out), xs, rows, torch.rand(t, k))
    cases.append(Case("moe_permute", "t1024 k2 e8 h4096", permute, ci=True))

    for activation, n_w, bias in (("swiglu", 2 * 1792, False), ("gelu_tanh", 1024, True)):
        def grouped(dtype, activation=activation, n_w=n_w, bias=bias):
            from fastlm.triton import grouped_linear

            n, k, e = 2048, 1024, 8
            x, w = _t(n, k, dtype=dtype), _t(e, n_w, k, dtype=dtype) / 32
            b = _t(e, n_w, dtype=dtype) if bias else None
            offsets = torch.tensor([0, 100, 100, 700, 701, 1200, 1500, 1900, 2000], dtype=torch.int32)
            out, pre = grouped_linear.forward(x, w, offsets, b, activation, True)
            grouped_linear.backward(torch.randn_like(out), x, w, offsets, pre, activation, bias)
        cases.append(Case("grouped_linear", f"{activation} n2048 k1024 nw{n_w} e8 fwd+bwd", grouped,
                          ci=activation == "swiglu", ci86=("fp16",) if activation == "swiglu" else ()))

    def assign(dtype):  # BASE's balanced assignment: one program, float64 tiles (BLOCK_E = 64)
        from fastlm.triton import base_assignment

        base_assignment.solve(_t(4096, 64, dtype=dtype), [64] * 64, 0.0)
    cases.append(Case("base_assignment", "t4096 e64", assign, ci=True))
    return cases


def cases() -> list[Case]:
    return _attention_cases() + _linear_cases() + _row_cases() + _rope_cases() + _moe_cases() + _attention_tma_cases()


def _attention_tma_cases():  # the Hopper TMA forward's own cases (fastlm/triton/attention_tma.py)
    from fastlm.triton import attention_tma

    return attention_tma.aot_cases()


@dataclass
class NoConfig:
    """A case's launcher found no config that fits the target (_tune.NoConfigFits): what it says."""
    what: str
    message: str


def _in_ci(case: Case, capability: int, dtype: str) -> bool:
    return dtype in case.ci86 if capability == 86 else case.ci


def jobs(capability: int, dtype: str, ci_only: bool, modules=None) -> list[tuple[Case, Launch | NoConfig]]:
    """Every distinct launch the cases make for one target and dtype (first case that made it);
    a launcher that has no config fitting the target gives a NoConfig (after the launches it
    recorded before it), not an exception."""
    seen, out = set(), []
    for case in cases():
        if (ci_only and not _in_ci(case, capability, dtype)) or dtype not in case.dtypes or (
                modules and case.module not in modules):
            continue
        failed = None
        with capture(TARGETS[capability]) as recorded:
            try:
                case.run(DTYPES[dtype])
            except _tune.NoConfigFits as e:
                failed = NoConfig(e.what, str(e))
        if ci_only and isinstance(case.ci_configs, tuple):  # the named configs
            recorded = [launch for launch in recorded if launch.config in case.ci_configs]
        elif ci_only and case.ci_configs:  # the first configs of each kernel, in its list's order
            count, kept = {}, []
            for launch in recorded:
                count[launch.kernel] = count.get(launch.kernel, 0) + 1
                if count[launch.kernel] <= case.ci_configs:
                    kept.append(launch)
            recorded = kept
        for launch in recorded:
            if launch.key() not in seen:
                seen.add(launch.key())
                out.append((case, launch))
        if failed is not None:
            out.append((case, failed))
    return out


# ---------------------------------------------------------------- sweep
def status(res: Result, limit: int) -> str:
    if res.error:
        return "failed"
    if res.smem > limit:
        return "smem-over"
    return "spills" if res.spills > 0 else "clean"


def sweep(capabilities, dtypes, ci_only, modules=None, report=print, kernels=None):
    """Compiles every job (of `kernels` only, names as reported, e.g. attention._fwd_kernel, when
    given) and calls report(row) per compile; returns the rows (dicts). status:
    clean, spills, smem-over, failed (compile error), or no-config (the launcher found no config
    that fits the target's shared memory: nothing compiled, error holds its message)."""
    rows = []
    for cap in capabilities:
        for dtype in dtypes:
            if ci_only and dtype not in CI_DTYPES.get(cap, ()):
                continue
            for case, launch in jobs(cap, dtype, ci_only, modules):
                if isinstance(launch, NoConfig):  # nothing to compile: the launcher itself refused
                    row = dict(kernel=f"{case.module}.<{launch.what}>", target=f"sm_{cap}", dtype=dtype,
                               case=case.label, config="", smem=-1, smem_estimate=-1, limit=TARGETS[cap].smem,
                               regs=-1, spills=-1, wgmma=False, tma=False, mma_warps_n=0, grid=[], seconds=0.0, error=launch.message,
                               status="no-config")
                    rows.append(row)
                    report(row)
                    continue
                if kernels and launch.kernel not in kernels:
                    continue
                res = compile_launch(launch, cap)
                row = dict(kernel=launch.kernel, target=f"sm_{cap}", dtype=dtype, case=case.label,
                           config=launch.config or _options_label(launch), smem=res.smem,
                           smem_estimate=launch.smem_estimate, limit=TARGETS[cap].smem,
                           regs=res.regs, spills=res.spills, wgmma=res.wgmma, tma=res.tma,
                           mma_warps_n=res.mma_warps_n, grid=list(launch.grid),
                           seconds=round(res.seconds, 2), error=res.error,
                           status=status(res, TARGETS[cap].smem))
                rows.append(row)
                report(row)
    return rows


def _options_label(launch: Launch) -> str:
    blocks = ",".join(f"{k}={v}" for k, v in launch.constexprs.items() if k.startswith("BLOCK") or k == "ROWS")
    return f"{blocks},w{launch.options['num_warps']},s{launch.options['num_stages']}"


def main(argv=None):
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Compile fastlm's Triton kernels for GPUs without one.")
    ap.add_argument("--ci", action="store_true", help="only the representative set the tests compile (CI_DTYPES)")
    ap.add_argument("--targets", default="", help="compute capabilities, comma-separated (default: 80,86,90; "
                                                   "with --ci: those in CI_DTYPES)")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16")
    ap.add_argument("--modules", default="", help="fastlm.triton modules to compile (default: all)")
    ap.add_argument("--kernels", default="", help="only these kernels, comma-separated, named as the table "
                                                  "names them (e.g. attention._fwd_kernel)")
    ap.add_argument("--jsonl", default="", help="also write one JSON row per compile here")
    args = ap.parse_args(argv)
    out = open(args.jsonl, "w") if args.jsonl else None
    fmt = "{kernel:<34} {target:<6} {dtype:<5} {smem:>7} {regs:>4} {spills:>6} {seconds:>6} {status:<9} {case} | {config}"
    print(fmt.format(kernel="kernel", target="target", dtype="dtype", smem="smem", regs="regs", spills="spills",
                     seconds="sec", status="status", case="case", config="config"), flush=True)

    def report(row):
        print(fmt.format(**row) + (f"  {row['error']}" if row["error"] else ""), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()

    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: every compile really compiles
        os.environ["TRITON_CACHE_DIR"] = cache
        caps = [int(c) for c in args.targets.split(",")] if args.targets else (
            list(CI_DTYPES) if args.ci else list(TARGETS))
        rows = sweep(caps, args.dtypes.split(","), args.ci,
                     [m for m in args.modules.split(",") if m] or None, report,
                     [k for k in args.kernels.split(",") if k] or None)
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(f"{len(rows)} compiles: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), flush=True)
    return rows


if __name__ == "__main__":
    main()
