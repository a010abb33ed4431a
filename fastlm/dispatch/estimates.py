"""What `auto` does on a GPU where nothing was measured: the static estimate order.

STATIC_ORDER maps (op, device class) to the GPU backends in the order we expect them to be
fastest, each with a one-line reason; "*" matches any op or class, and the most specific key
wins ((op, class), (op, "*"), ("*", class), ("*", "*")). To change the order for one op on one
class, add a key, e.g.
    ("attention", "ada"): (("triton", "static estimate: ..."), ("cuda", "..."), REFERENCE),
Every order ends with the reference backend, which serves anything."""
from __future__ import annotations

REFERENCE = ("reference", "static estimate: plain PyTorch math in fp32 or fp64, the oracle and last resort")

STATIC_ORDER: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    ("*", "*"): (
        ("cuda", "static estimate: hand-written CUDA C++ kernels, expected fastest where they can serve"),
        ("triton", "static estimate: Triton kernels, expected behind the hand-written CUDA ones"),
        REFERENCE,
    ),
}
# Attention on Hopper: the cuda kernels are the FlashAttention-2 design on mma.sync (HMMA), which
# FA2's published H100 figures put near 35 % of the bf16 peak (~350 TF/s forward at D = 128); the
# Triton kernels' tl.dot lowers to wgmma on sm_90 (the AOT compile shows it in the forward and
# dQ), the instruction FA3 reaches 60-75 % with. No Hopper tier of the cuda backend yet.
_HOPPER_ATTENTION = (
    ("triton", "static estimate: wgmma on sm_90 (the cuda kernels use mma.sync, ~35 % of H100 peak in FA2's design)"),
    ("cuda", "static estimate: FlashAttention-2 design on mma.sync; behind wgmma on Hopper"),
    REFERENCE,
)
STATIC_ORDER.update({("attention", cls): _HOPPER_ATTENTION for cls in ("h100", "h200", "hopper")})
# Elsewhere (sm_80/86/89): both issue mma.sync; the cuda forward's main loop is 5.9 instructions
# per HMMA by SASS count with 16-byte cp.async loads, the design FA2 takes to ~70 % of A100 peak.
STATIC_ORDER[("attention", "*")] = (
    ("cuda", "static estimate: FlashAttention-2 design, 5.9 instructions per HMMA in the forward's main loop (SASS)"),
    ("triton", "static estimate: the Triton tutorial's structure, behind FA2's design before Hopper"),
    REFERENCE,
)

# Ops whose reference backend *is* torch's fast op (e.g. a reference that calls
# F.scaled_dot_product_attention), keyed to the benchmark's names for that op. Where such a
# torch op beats every fastlm kernel, `auto` picks the reference. Empty today: every reference
# upcasts to fp32 and runs plain math (attention materialises the Tq x Tk scores), which is not
# the SDPA / cuBLAS path torch's own op takes, so a faster torch op is reported, not chosen.
REFERENCE_IS_TORCH_OP: dict[str, tuple[str, ...]] = {}


def static_order(op: str, device_class: str) -> tuple[tuple[str, str], ...]:
    for key in ((op, device_class), (op, "*"), ("*", device_class), ("*", "*")):
        if key in STATIC_ORDER:
            return STATIC_ORDER[key]
    raise KeyError(f"STATIC_ORDER has no ('*', '*') default")  # the table above always has one
