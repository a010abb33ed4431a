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
# Attention on Hopper: the cuda forward has an sm_90a tier (csrc/cuda/attention_sm90.cu: TMA +
# mbarrier ring, producer warp, ping-pong wgmma warpgroups, FlashAttention-3's design) for the
# plain forward (no mask / softcap / window / ALiBi / sinks / varlen, D 64..128): its SASS main
# loop is 16 HGMMA (m64n128k16, 64 tensor-core clocks each on an H100 SM) in 527 instructions per
# warpgroup and key tile, so issue (~1050 of ~2050 tensor clocks per tile pair) and MUFU.EX2
# (~1020) both fit under the tensor cores: an estimated 50-60 % of the bf16 peak, against ~35 %
# for FA2's design on mma.sync. Its backward (and the options above) run the FA2 design, ~30 % by
# FA2's published H100 figures; Triton's tl.dot lowers to wgmma on sm_90 but its structure is the
# tutorial's (~30-45 % forward, 15-25 % backward by the attention issue's estimate). cuda first.
_HOPPER_ATTENTION = (
    ("cuda", "static estimate: sm_90a forward tier (TMA + wgmma, FA3 design, est. 50-60 % of peak) and the "
             "FA2-design backward (~30 %)"),
    ("triton", "static estimate: wgmma through tl.dot, the Triton tutorial's structure (est. 30-45 % forward, "
               "15-25 % backward)"),
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
