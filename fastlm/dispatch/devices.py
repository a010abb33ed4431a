"""Device classes: which measured dispatch table a GPU uses, and the GPUs `info` simulates.

A class groups GPUs whose kernels rank the same way (same architecture and a similar balance of
SMs, bandwidth and shared memory), so one measurement serves every card in it."""
from __future__ import annotations

import dataclasses
import re

# Model tokens of torch.cuda.get_device_name (lower case, split on non-alphanumerics) -> class.
# Whole tokens, not substrings: "a10" must not match "a100", nor "h20" "h200".
MODEL_CLASSES = {
    "h100": "h100", "h800": "h100",  # H800: an H100 with less NVLink bandwidth
    "h200": "h200", "gh200": "h200",
    "h20": "h20",  # Hopper with 78 SMs: ranks unlike an H100
    "a100": "a100", "a800": "a100",
    "4090": "ada", "4080": "ada", "4070": "ada", "l40": "ada", "l40s": "ada", "l4": "ada", "ada": "ada",
    "3090": "ampere-consumer", "3080": "ampere-consumer", "3070": "ampere-consumer", "a10": "ampere-consumer",
    "a10g": "ampere-consumer", "a40": "ampere-consumer", "a6000": "ampere-consumer", "a5000": "ampere-consumer",
    "b200": "b200", "gb200": "b200", "b100": "b200",
}
# A GPU none of whose tokens is known falls back to its compute capability.
CAPABILITY_CLASSES = {(9, 0): "hopper", (8, 6): "ampere-consumer", (8, 9): "ada", (10, 0): "blackwell"}


def device_class(name: str, capability) -> str:
    """The dispatch-table class of a GPU from its name and (major, minor) compute capability,
    e.g. ("NVIDIA H100 80GB HBM3", (9, 0)) -> "h100"; an unknown sm_80 card -> "sm80"."""
    if not isinstance(name, str):
        raise TypeError(f"device_class: name must be a str, got {type(name).__name__} {name!r}")
    if (not isinstance(capability, (tuple, list)) or len(capability) != 2
            or not all(isinstance(c, int) and c >= 0 for c in capability)):
        raise ValueError(f"device_class: capability must be (major, minor) non-negative ints, got {capability!r}")
    for token in re.findall(r"[a-z0-9]+", name.lower()):
        if token in MODEL_CLASSES:
            return MODEL_CLASSES[token]
    major, minor = capability
    return CAPABILITY_CLASSES.get((major, minor), f"sm{major}{minor}")


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """The facts about a GPU that backend choice depends on, so a CPU machine can show what
    `auto` would do on it."""
    name: str
    capability: tuple[int, int]
    sms: int
    smem_per_block_optin: int  # bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin

    @property
    def device_class(self) -> str:
        return device_class(self.name, self.capability)

    def describe(self) -> str:
        major, minor = self.capability
        return (f"{self.name} (sm_{major}{minor}, {self.sms} SMs, "
                f"{self.smem_per_block_optin // 1024} KB shared memory per block)")


# From each card's cudaDeviceProp (sharedMemPerBlockOptin: 227, 163 and 99 KB).
SIMULATED = (
    DeviceSpec("NVIDIA H100 80GB HBM3", (9, 0), 132, 227 * 1024),
    DeviceSpec("NVIDIA A100-SXM4-80GB", (8, 0), 108, 163 * 1024),
    DeviceSpec("NVIDIA GeForce RTX 4090", (8, 9), 128, 99 * 1024),
)
