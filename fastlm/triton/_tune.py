"""Config selection shared by every Triton kernel file: device facts, launch, autotune with pruning.

- Autotuned kernels key on bucketed sizes (`bucket`: the next power of two), passed as extra
  unspecialised int arguments, so a new sequence length re-benchmarks only when it crosses a
  power of two and decoding does not re-tune every token.
- Configs are pruned before anything is compiled: each kernel file states how much shared
  memory a config needs (an upper estimate: tests/test_triton_aot.py asserts it is at least the
  compiled kernel's shared memory for every config it compiles), and configs over the device's
  per-block limit (`shared_memory_per_block_optin`: 227 KB on sm_90, 163 KB on sm_80, 99 KB on sm_86/89) are
  dropped. A kernel with no config that fits raises NoConfigFits (a RuntimeError), naming the
  sizes.
- FASTLM_TRITON_AUTOTUNE=0 makes every autotuned kernel run one config, the first that
  survives pruning, with no benchmarking (read per call): a GPU correctness run tests one
  config per kernel fast.
- Launches go through `launch` so fastlm.triton.aot can record them (kernel, grid, arguments,
  meta-parameters) for a GPU it compiles for ahead of time instead of running them.
- No grid puts more than 65,535 programs on axis 1 or 2 (CUDA's caps, MAX_GRID): products that
  can pass it (batch x heads) go to axis 0 (tests/test_triton_tuning.py checks the grids the
  attention launchers record).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class Target:
    """A GPU compiled for ahead of time: what launchers would read from the device."""
    capability: int  # 80, 86, 90, ...
    smem: int  # shared_memory_per_block_optin, bytes
    sms: int  # multi_processor_count


_aot = {"target": None, "record": None}  # set only inside fastlm.triton.aot.capture()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and _aot["target"] is None


def on_gpu(device: torch.device) -> bool:
    """Whether launch sizes should be the GPU's (also true while compiling ahead of time)."""
    return device.type == "cuda" or _aot["target"] is not None


def sm_count(device: torch.device, cpu_default: int = 4) -> int:
    if _aot["target"] is not None:
        return _aot["target"].sms
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return cpu_default


def capability(device: torch.device) -> int:
    """Compute capability as 80, 90, ...; 0 for a CPU tensor outside an AOT capture."""
    if _aot["target"] is not None:
        return _aot["target"].capability
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 0


def smem_limit(device: torch.device) -> int:
    if _aot["target"] is not None:
        return _aot["target"].smem
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    return 1 << 30  # interpreter: no limit


def autotune_enabled() -> bool:
    return os.environ.get("FASTLM_TRITON_AUTOTUNE", "1") != "0"


def bucket(n: int) -> int:
    """Autotune key for a size: the next power of two (at least 1)."""
    return triton.next_power_of_2(max(int(n), 1))


MAX_GRID = (2**31 - 1, 65535, 65535)  # CUDA's limits per grid axis (x, y, z)


def grid_of(grid, meta: dict) -> tuple:
    """The (x, y, z) grid a launch with these meta-parameters (a config's included) gets."""
    g = tuple(grid(meta) if callable(grid) else grid)
    return g + (1,) * (3 - len(g))


def launch(kernel, grid, *args, **meta):
    """kernel[grid](*args, **meta), or recorded instead while fastlm.triton.aot captures:
    record(kernel, args, meta, grid), grid as given (callable for autotuned kernels)."""
    if _aot["record"] is not None:
        _aot["record"](kernel, args, meta, grid)
        return None
    return kernel[grid](*args, **meta)


def _device_of(args: dict) -> torch.device:
    return next(v.device for v in args.values() if isinstance(v, torch.Tensor))


class NoConfigFits(RuntimeError):
    """No config of a tuned kernel fits the device's shared memory (`what` names the kernel)."""

    def __init__(self, what: str, message: str):
        super().__init__(message)
        self.what = what


def fitting(configs, smem_need, args: dict, limit: int, what: str):
    """The configs whose shared-memory estimate fits `limit`, in order; raises when none does."""
    if not configs:
        raise NoConfigFits(what, f"{what}: no config is meant for {_describe(args)}")
    keep = [c for c in configs if smem_need(c, args) <= limit]
    if not keep:
        need = min(smem_need(c, args) for c in configs)
        raise NoConfigFits(what, f"{what}: no config fits {limit} B of shared memory per block "
                           f"(the smallest needs {need} B) for {_describe(args)}")
    return keep


def _describe(args: dict) -> str:
    shown = {k: (str(v.dtype).replace("torch.", "") if isinstance(v, torch.Tensor) else v)
             for k, v in args.items() if k.isupper() or isinstance(v, torch.Tensor)}
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def prune_for(smem_need, what: str, allowed=None):
    """early_config_prune for triton.autotune: drop configs over the device's limit (and those
    allowed(config, args) rejects); one config when FASTLM_TRITON_AUTOTUNE=0.
    smem_need(config, args) and allowed get every argument by name."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        if allowed is not None:
            configs = [c for c in configs if allowed(c, args)]
        keep = fitting(configs, smem_need, args, smem_limit(_device_of(args)), what)
        return keep if autotune_enabled() else keep[:1]
    return prune


def autotune(configs, key, smem_need, what: str, allowed=None):
    """triton.autotune keyed on `key` (bucketed ints, constexprs), pruned by shared memory. The
    tuner keeps the estimate as .fastlm_smem_need (fastlm.triton.aot reports it per config)."""
    prune = prune_for(smem_need, what, allowed)
    tune = triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune})

    def wrap(fn):
        tuner = tune(fn)
        tuner.fastlm_smem_need = smem_need
        return tuner
    return wrap


def dtype_bytes(t) -> int:
    return t.element_size() if isinstance(t, torch.Tensor) else 4
