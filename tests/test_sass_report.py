"""scripts/sass_report.py: its SASS parsing on small hand-written listings (cuobjdump's text
format), and the report on the built extension's SASS for sm_80 and sm_90a (no GPU needed)."""
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sass_report", ROOT / "scripts" / "sass_report.py")
sr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sr)

ARCHS = ("sm_80", "sm_90a")
# (module, kernel name) pairs allowed to use local memory (spills or stack arrays): none today.
KNOWN_SPILLS = set()


def listing(body, name="_Z1kPf", module="k"):
    """cuobjdump -sass text of one function; `body` lines are `addr  instruction`."""
    lines = [(module, f"\t\tFunction : {name}\n")]
    for row in body.strip().splitlines():
        addr, insn = row.split(None, 1)
        lines.append((module, f"        /*{int(addr, 16):04x}*/                   {insn} ;"
                              f"   /* 0x000fe20000000f00 */\n"))
    return sr.parse_sass(lines)[(module, name)]


# An outer loop 0x20..0xc0 holding two HMMAs and an MMA-free inner loop 0x50..0x70; the
# LDG.E.128 at 0x10 is outside every loop; the trailing `BRA self` is no loop.
NESTED = """
0000 MOV R1, c[0x0][0x28]
0010 LDG.E.128 R4, [R2.64]
0020 LDGSTS.E.BYPASS.LTC128B.128 [R0], [R2.64]
0030 HMMA.16816.F32 R8, R4, R6, R8
0040 LDSM.16.M88.4 R4, [R0]
0050 IADD3 R2, R2, 0x2, RZ
0060 LDG.E.U16 R3, [R2.64]
0070 @P0 BRA 0x50
0080 HMMA.16816.F32.BF16 R8, R4, R6, R8
0090 MUFU.EX2 R3, R3
00a0 SHFL.BFLY PT, R3, R3, 0x1, 0x1f
00b0 BAR.SYNC.DEFER_BLOCKING 0x0
00c0 @!P1 BRA 0x20
00d0 EXIT
00e0 BRA 0xe0
"""

# Warp-divergence fallback: BRA.DIV jumps to out-of-line code that calls a shuffle subroutine
# and branches back into straight-line code. Backward, but not a loop.
DIVERGENT = """
0000 MOV R0, RZ
0010 BRA.DIV ~URZ, 0x60
0020 SHFL.BFLY PT, R2, R0, 0x1, 0x1f
0030 FADD R0, R0, R2
0040 EXIT
0050 BRA 0x50
0060 CALL.REL.NOINC 0x90
0070 BRA 0x30
0080 BRA 0x80
0090 WARPSYNC R3
00a0 SHFL.BFLY PT, R2, R0, 0x1, 0x1f
00b0 RET.REL.NODEC R4 0x0
00c0 BRA 0xc0
"""

# Two sibling loops: a while loop 0x10..0x30 (guarded exit at its top, unconditional back
# branch) with one HMMA, then 0x50..0x90 with two HMMAs and a BRA P4 (predicate operand) exit.
SIBLINGS = """
0000 MOV R0, RZ
0010 @P0 BRA 0x40
0020 HMMA.16816.F32 R8, R4, R6, R8
0030 BRA 0x10
0040 MOV R1, RZ
0050 HMMA.16816.F32 R8, R4, R6, R8
0060 @P1 BRA P4, 0xa0
0070 HMMA.16816.F32 R8, R4, R6, R8
0080 LDG.E.64 R2, [R4.64]
0090 @!P2 BRA 0x50
00a0 EXIT
"""


def test_nested_loops_and_their_mix():
    loops = sr.find_loops(listing(NESTED))
    assert [(lp["start"], lp["end"], lp["depth"]) for lp in loops] == \
        [(0x20, 0xc0, 0), (0x50, 0x70, 1)]
    outer, inner = loops
    assert inner["parent"] == 0x20 and outer["parent"] is None
    assert (outer["insts"], outer["mma"], outer["insts_per_mma"]) == (11, 2, 5.5)
    # LTC128B is a cache hint: the LDGSTS is 16 bytes wide; the LDG.E.128 is before the loop
    assert outer["gld_bytes"] == {16: 1, 2: 1}
    assert (outer["ldsm"], outer["lds"], outer["shfl"], outer["bar"]) == (1, 0, 1, 1)
    assert outer["ex2"] == 1
    assert (inner["insts"], inner["mma"], inner["gld_bytes"]) == (3, 0, {2: 1})
    assert inner["insts_per_mma"] is None


def test_main_loop_and_its_mma_free_inner_loop():
    main = sr.main_loop(sr.find_loops(listing(NESTED)))
    assert (main["start"], main["insts_per_mma"], main["gld_bytes"]) == (0x20, 5.5, {16: 1, 2: 1})
    assert [lp["start"] for lp in main["mma_free_inner_loops"]] == [0x50]


def test_divergence_fallback_and_spin_are_not_loops():
    assert sr.find_loops(listing(DIVERGENT)) == []


def test_sibling_loops_main_is_the_one_with_most_mma():
    loops = sr.find_loops(listing(SIBLINGS))
    assert [(lp["start"], lp["end"], lp["depth"], lp["mma"]) for lp in loops] == \
        [(0x10, 0x30, 0, 1), (0x50, 0x90, 0, 2)]
    main = sr.main_loop(loops)
    assert (main["start"], main["insts"], main["insts_per_mma"]) == (0x50, 5, 2.5)
    assert main["gld_bytes"] == {8: 1} and main["mma_free_inner_loops"] == []


# The tile step compiled twice, as the attention kernels do: an outer loop (0x10..0xe0) holding a
# maskless copy (0x20..0x50: two HMMAs, 4 instructions) and a masked copy (0x70..0xc0: two HMMAs,
# 6 instructions). The main loop is the innermost MMA loop; of equals, the one with fewer
# instructions (the maskless copy, which runs on all but the edge tiles).
TWO_COPIES = """
0000 MOV R0, RZ
0010 MOV R1, RZ
0020 HMMA.16816.F32 R8, R4, R6, R8
0030 HMMA.16816.F32 R8, R4, R6, R8
0040 IADD3 R1, R1, 0x1, RZ
0050 @P0 BRA 0x20
0060 MOV R2, RZ
0070 HMMA.16816.F32 R8, R4, R6, R8
0080 FSEL R9, R9, -INF, P3
0090 LDG.E.U8 R3, [R4.64]
00a0 HMMA.16816.F32 R8, R4, R6, R8
00b0 IADD3 R2, R2, 0x1, RZ
00c0 @P1 BRA 0x70
00d0 IADD3 R0, R0, 0x1, RZ
00e0 @P2 BRA 0x10
00f0 EXIT
"""


def test_main_loop_is_the_innermost_and_of_equals_the_shortest():
    loops = sr.find_loops(listing(TWO_COPIES))
    assert [(lp["start"], lp["depth"], lp["mma"]) for lp in loops] == [(0x10, 0, 4), (0x20, 1, 2), (0x70, 1, 2)]
    main = sr.main_loop(loops)
    assert (main["start"], main["insts"], main["insts_per_mma"], main["gld_bytes"]) == (0x20, 4, 2.0, {})
    assert main["mma_free_inner_loops"] == []


def test_no_mma_no_main_loop():
    loops = sr.find_loops(listing("0000 IADD3 R0, R0, 0x1, RZ\n0010 @P0 BRA 0x0\n0020 EXIT"))
    assert [(lp["start"], lp["insts"]) for lp in loops] == [(0, 2)]
    assert sr.main_loop(loops) is None


def test_always_true_guard_is_an_unconditional_branch():
    # @PT BRA never falls through: the HMMA after it is dead code, so the loop holds no MMA
    body = "0000 MOV R0, RZ\n0010 @PT BRA 0x30\n0020 HMMA.16816.F32 R8, R4, R6, R8\n" \
           "0030 @P0 BRA 0x0\n0040 EXIT"
    loops = sr.find_loops(listing(body))
    assert [(lp["start"], lp["insts"], lp["mma"]) for lp in loops] == [(0, 3, 0)]


def test_short_names():
    assert sr.short("void fastlm::cuda::attn::(anonymous namespace)::forward_kernel<__nv_bfloat16, "
                    "128, 64>(fastlm::cuda::attn::Params)") == "forward_kernel<bfloat16, 128, 64>"
    assert sr.short("void fastlm::cuda::(anonymous namespace)::f(float const*, long)") == "f"


def test_instruction_mix_widths_and_classes():
    ops = ["LDG.E", "LDG.E.64.CONSTANT", "LDG.E.128.CONSTANT", "LDG.E.U8", "LDG.E.S16",
           "LDGSTS.E.BYPASS.LTC128B.128", "LDGSTS.E.64", "LDGSTS.E", "UTMALDG.2D", "LDS.128",
           "LDSM.16.MT88.4", "SHFL.IDX", "BAR.ARV", "DEPBAR.LE", "MUFU.EX2", "MUFU.RCP",
           "HGMMA.64x128x16.F32.BF16", "IMMA.16832.S8.S8", "STL.64", "LDL"]
    mix = sr.insn_mix([(16 * i, False, op, "") for i, op in enumerate(ops)])
    assert mix["gld_bytes"] == {4: 2, 8: 2, 16: 2, 1: 1, 2: 1, "tma": 1}
    assert (mix["lds"], mix["ldsm"], mix["shfl"], mix["bar"], mix["ex2"]) == (1, 1, 1, 1, 1)
    assert (mix["mma"], mix["stl"], mix["ldl"], mix["insts"]) == (2, 1, 1, 20)
    assert mix["mma_ops"] == {"HGMMA": 1, "IMMA": 1}
    assert mix["insts_per_mma"] == 10.0


def test_loads_in_flight_end_at_the_first_use():
    """Loads issued before the first instruction that reads what one of them loaded are in flight
    together; a store's registers are all sources; a new basic block starts a new batch."""
    insns = listing("""
0000 LDG.E.128 R4, desc[UR4][R2.64]
0010 LDG.E.128 R8, desc[UR4][R2.64+0x200]
0020 LDG.E.U16 R12, desc[UR4][R14.64]
0030 IADD3 R2, R2, 0x400, RZ
0040 FADD R13, R7, R5
0050 LDG.E.128 R4, desc[UR4][R2.64]
0060 STG.E.128 desc[UR4][R2.64], R4
0070 EXIT
""")
    assert sr.loads_in_flight(insns) == {"bytes": 34, "loads16": 2}
    k = {"in_flight": {"bytes": 64}, "occupancy": {"warps_per_sm": 8}}  # 64 B x 256 threads = 16 KB
    assert sr.memory_estimate(k) == {"in_flight_per_sm": 16384, "bw_share": 1.0}
    k["occupancy"]["warps_per_sm"] = 2
    assert sr.memory_estimate(k)["bw_share"] == round(4096 / sr.NEEDED_IN_FLIGHT_PER_SM, 3)


def test_resource_and_block_size_parsing():
    res = sr.parse_res_usage([("m", " Function _Z1kPf:\n"),
                              ("m", "  REG:71 STACK:8 SHARED:3072 LOCAL:16 CONSTANT[0]:664\n")])
    assert res == {("m", "_Z1kPf"): {"reg": 71, "stack": 8, "shared": 3072, "local": 16}}
    elf = [".nv.info._Z1aPf\n", "\tAttribute:\tEIATTR_MAX_THREADS\n", "\tValue:\t0x80 0x1 0x1 \n",
           ".nv.info._Z1bPf\n", "\tAttribute:\tEIATTR_REQNTID\n", "\tValue:\t0x20 0x4 0x1 \n",
           "\tAttribute:\tEIATTR_MAX_THREADS\n", "\tValue:\t0x100 0x1 0x1 \n",
           ".text._Z1bPf\n", "\tAttribute:\tEIATTR_MAX_THREADS\n", "\tValue:\t0x200 0x1 0x1 \n"]
    # REQNTID (exact block size) wins over MAX_THREADS; attributes outside .nv.info don't count
    sizes = sr.parse_block_sizes([("m", line) for line in elf])
    assert sizes == {("m", "_Z1aPf"): 128, ("m", "_Z1bPf"): 128}


def test_occupancy_limits():
    # 71 regs -> 2304 per warp -> 7 warps per sub-partition = 28 warps = 7 CTAs of 4 warps,
    # but 110.25 KB of shared memory + the 1 KB reservation fit once in sm_80's 164 KB
    occ = sr.occupancy("sm_80", 71, 112896, 128)
    assert (occ["ctas_per_sm"], occ["warps_per_sm"], occ["limited_by"]) == (1, 4, ["smem"])
    assert sr.occupancy("sm_80", 71, 0, 128)["ctas_per_sm"] == 7
    # sm_90: the static size already includes the reservation; 2 x (110.25 + 1) KB fit in 228 KB
    assert sr.occupancy("sm_90a", 71, 112896 + 1024, 128, smem_static=1024)["ctas_per_sm"] == 2
    assert sr.occupancy("sm_90a", 24, 1024, 128, smem_static=1024)["limited_by"] == ["warps"]
    assert sr.occupancy("sm_80", 255, 0, 256)["warps_per_sm"] == 8
    assert sr.occupancy("sm_80", 256, 0, 32)["ctas_per_sm"] == 0
    assert sr.occupancy("sm_80", 32, 164 * 1024, 32)["ctas_per_sm"] == 0  # over the per-CTA limit
    assert sr.occupancy("sm_80", 32, 0, None) is None


# ---------------------------------------------------------------- the built extension
def _source_kernels():
    """{(module, kernel base name)} from the __global__ definitions in csrc/cuda/*.cu."""
    found = set()
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        for name in re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(",
                               cu.read_text()):
            found.add((cu.stem, name))
    return found


@pytest.fixture(scope="module")
def kernels():
    so, tool = sr.default_extension(), sr.find_tool()
    if not so:
        pytest.skip("the fastlm._C extension is not built")
    if not tool:
        pytest.skip("cuobjdump not found (PATH, the Triton wheel, CUDA_HOME or FASTLM_CUOBJDUMP)")
    if not set(ARCHS) <= set(sr.sass_archs(so, tool)):
        pytest.skip(f"the extension was built without SASS for {ARCHS}")
    return sr.report(so, ARCHS)


def _base(name):  # "void ns::forward_kernel<...>(...)" -> "forward_kernel"
    return re.search(r"(\w+)(?:<.*>)?\(", name.split(" ", 1)[-1])[1]


def test_every_kernel_is_compiled_for_both_archs(kernels):
    per_arch = {a: {(k["module"], k["mangled"]) for k in kernels if k["arch"] == a} for a in ARCHS}
    assert per_arch["sm_80"] and per_arch["sm_80"] == per_arch["sm_90a"]
    expected = _source_kernels()
    if not expected:
        pytest.skip("no csrc/cuda sources next to the tests")
    for arch in ARCHS:
        built = {(k["module"], _base(k["name"])) for k in kernels if k["arch"] == arch}
        assert expected <= built, f"{arch}: not in the binary: {sorted(expected - built)}"


def test_no_spills_and_sane_registers(kernels):
    spilling = sorted({(k["module"], k["name"]) for k in kernels
                       if k["stl"] or k["ldl"] or k["local_bytes"] or k["stack_bytes"]})
    assert set(spilling) <= KNOWN_SPILLS, f"local memory (spills) in: {spilling}"
    bad = [(k["arch"], k["name"], k["regs"]) for k in kernels if not 1 <= (k["regs"] or 0) <= 255]
    assert not bad


def test_launch_bounds_give_occupancy(kernels):
    bounded = [k for k in kernels if k["launch_bound_threads"]]
    assert bounded
    for k in bounded:
        assert k["occupancy"]["ctas_per_sm"] >= 1, (k["arch"], k["name"], k["occupancy"])


# The HMMA kernels judged by their main loop (sr.main_loop_figures): (id, kernel regex, the kernels
# it must match, at most this many instructions per HMMA, the main loop's global load widths, why).
# Every such main loop also has no inner loop without tensor-core work. The arithmetic is in each
# file's header.
MAIN_LOOPS = [
    ("attention_forward", r"attn::.*forward_kernel<[^,]+, 128\b", 2, 6.0, [16],
     "the fp16 and bf16 FlashAttention-2 forward at D = 128 (csrc/cuda/attention.cu): its maskless "
     "tiles load global memory only as 16-byte cp.async"),
    ("attention_decode", r"attn::.*decode_kernel<[^,]+, 128\b", 2, 15.0, [4, 16],
     "the fp16 and bf16 KV-cache decode at D = 128 (attention.cu's decode_kernel): K and V as 16-byte "
     "cp.async besides one 4-byte block-table entry per row and tile, the page lookup straight-line "
     "code per row; 14.2 per HMMA on both archs (the gather's page index and 32-bit division, the "
     "score-mod code), bounded so the gather cannot quietly grow"),
    ("gemm_core", r"gemm::gemm_kernel<", 6, 2.5, [16],
     "the GEMM core behind linear and its backward (csrc/cuda/gemm_core.cuh): fp16/bf16 x the "
     "forward's K-major operands and the backward's two transposed layouts (the old 2-stage BK=32 "
     "kernel: 4.75 per HMMA on sm_80, 4.88 on sm_90a)"),
    ("grouped_gemm", r"gemm::grouped_(rows|reduce)_kernel<", 8, 2.5, [16],
     "grouped_linear on the same core (csrc/cuda/moe_grouped_linear.cu), fp16/bf16 x the row-grouped "
     "forward (plain and gated: gate and up halves in one tile), its dX and the per-expert dW "
     "reduction; 2.30-2.41 on sm_80 (the gated loader's one extra pointer step per K tile), the "
     "expert search before the main loop"),
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pattern,count,per_mma_limit,load_widths,why", [pytest.param(*row[1:], id=row[0])
                                                                         for row in MAIN_LOOPS])
def test_hmma_main_loop_figures(kernels, arch, pattern, count, per_mma_limit, load_widths, why):
    figures = sr.main_loop_figures(pattern, arch)
    assert len(figures) == count, f"expected {count} kernels ({why}), got {list(figures)}"
    for name, (per_mma, widths, mma_free) in figures.items():
        assert 0 < per_mma <= per_mma_limit, f"{name}: {per_mma} instructions per HMMA in the main loop"
        assert widths == load_widths, f"{name}: global load widths {widths} in the main loop"
        assert mma_free == 0, f"{name}: {mma_free} inner loops without tensor-core instructions"


def test_attention_sm90_forward_main_loop_figures(kernels):
    """The Hopper tier of the forward at D = 128 (csrc/cuda/attention_sm90.cu's header has the
    arithmetic): on sm_90a its main loop (a consumer warpgroup's maskless key tile) issues wgmma,
    16 HGMMA (8 S = Q K^T, 8 O += P V) with at most 40 instructions per HGMMA (32.9 when written: the
    softmax's ~22 per HGMMA plus descriptor and barrier bookkeeping; one HGMMA m64n128k16 is 16
    HMMA.16816 of work per warp), loads nothing itself (TMA runs in the producer's loop) and its
    only MMA-free inner loops are the two mbarrier waits (K and V full). The sm_80 pass holds no
    tensor-core code for it (the kernel is never launched there)."""
    pattern = r"attn90::forward_kernel<[^,]+, 128\b"
    ops = sr.main_loop_mma_ops(pattern, "sm_90a")
    assert len(ops) == 2, f"expected the fp16 and bf16 Hopper forward at D = 128, got {list(ops)}"
    for name, kinds in ops.items():
        assert kinds == {"HGMMA": 16}, f"{name}: main-loop tensor-core instructions {kinds}"
    for name, (per_mma, widths, mma_free) in sr.main_loop_figures(pattern, "sm_90a").items():
        assert 0 < per_mma <= 40.0, f"{name}: {per_mma} instructions per HGMMA in the main loop"
        assert widths == [], f"{name}: global loads {widths} in the consumers' main loop"
        assert mma_free == 2, f"{name}: {mma_free} inner loops without tensor-core instructions"
    sm80 = sr.main_loop_figures(pattern, "sm_80")
    assert len(sm80) == 2 and all(f is None for f in sm80.values()), sm80


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_backward_main_loop_figures(kernels, arch):
    """The backward at D = 128: its maskless query-tile loop issues at most 6 instructions per
    HMMA (7.5 at D = 256, whose 32-key tiles do 112 HMMA per query tile against 160); its loads
    are 16-byte cp.async (Q, dO), the dQ sums' float2 and lse/delta (4 bytes), and its only inner
    loop without tensor-core work is the wait for the dQ turn."""
    figures = {d: sr.main_loop_figures(rf"attn::.*backward_kernel<[^,]+, {d}\b", arch) for d in (128, 256)}
    assert [len(f) for f in figures.values()] == [2, 2], f"expected fp16 and bf16 at D = 128 and 256, got {figures}"
    for name, (per_mma, widths, mma_free) in {**figures[128], **figures[256]}.items():
        assert 0 < per_mma <= (6.0 if ", 128," in name else 7.5), f"{name}: {per_mma} instructions per HMMA"
        assert widths == [4, 8, 16], f"{name}: global load widths {widths} in the main loop"
        assert mma_free == 1, f"{name}: {mma_free} inner loops without tensor-core instructions"


def test_gemm_sm90_main_loop_figures(kernels):
    """The Hopper tier (csrc/cuda/gemm_sm90.cuh): six kernels (fp16/bf16 x the forward's and the
    backward's two operand layouts). On sm_90a each consumer main loop issues 4 HGMMA per K tile
    (wgmma m64n128k16) and nothing else on the tensor cores, at most 20 instructions per HGMMA
    (15.25 when written: the full-barrier wait, descriptor steps, the previous tile's wait_group
    and release), no global loads (the producer's TMA runs in its own loop), and its only inner
    loop without tensor-core work is the full-barrier wait's retry. On sm_80 they are compiled to a
    trap (never launched there): no MMA at all."""
    hopper = [k for k in kernels if re.search(r"gemm::hopper_gemm_kernel<", k["name"])]
    for arch in ARCHS:
        assert len([k for k in hopper if k["arch"] == arch]) == 6, f"{arch}: expected 2 dtypes x 3 layouts"
    for k in hopper:
        if k["arch"] == "sm_80":
            assert k["mma"] == 0, f"{k['name']}: tensor-core instructions in the sm_80 trap"
            continue
        m = k["main_loop"]
        assert m and m["mma_ops"] == {"HGMMA": 4}, f"{k['name']}: main loop {m and m['mma_ops']}"
        assert 0 < m["insts_per_mma"] <= 20, f"{k['name']}: {m['insts_per_mma']} instructions per HGMMA"
        assert m["gld_bytes"] == {}, f"{k['name']}: global loads {m['gld_bytes']} in the main loop"
        assert len(m["mma_free_inner_loops"]) == 1, f"{k['name']}: {m['mma_free_inner_loops']}"
        assert k["gld_bytes"].get("tma"), f"{k['name']}: no TMA loads"


@pytest.mark.parametrize("arch", ARCHS)
def test_memory_bound_kernels_figures(kernels, arch):
    """softmax and cross_entropy (row_io.cuh: scalar head, 16-byte body, scalar tail for any
    width, stride and offset): every kernel reads rows with 16-byte loads (its 1-, 2- and 4-byte
    loads are the head and tail elements, masks, targets and class weights), issues at least 2
    of them per thread before the first use (4-8 outside the 8-thread layout for <= 16 packs), uses no local memory,
    and by Little's law has enough bytes in flight per SM for >= 85 % of copy bandwidth."""
    figures = sr.memory_figures(r"^(softmax|cross_entropy)$", arch)
    assert len(figures) >= 40, f"expected the softmax and cross_entropy kernels, got {len(figures)}"
    for name, f in figures.items():
        assert 16 in f["load_widths"], f"{name}: no 16-byte loads ({f['load_widths']})"
        narrow = "RowLayout<8," in name
        assert f["loads16_in_flight"] >= (2 if narrow else 4), f"{name}: {f}"
        assert f["spills"] == 0, f"{name}: {f}"
        assert f["bw_share"] >= 0.85, f"{name}: {f}"


# Kernels whose sm_90a SASS must hold given instructions: (module, kernel regex, how many kernels,
# the instructions, why). The thread-block cluster kernels of softmax (rows past 4096 packs
# forward, 2048 backward: csrc/cuda/softmax.cu) wait on the cluster barrier (barrier.cluster
# arrive / wait: UCGABAR_ARV, UCGABAR_WAIT) around their DSMEM exchange and stage their slices with
# 16-byte loads, 4 in flight per thread (the memory test above judges them with the rest).
SM90_INSTRUCTIONS = [
    ("softmax", r"::(forward|backward)_cluster<", 6, {"UCGABAR_ARV", "UCGABAR_WAIT", "LDG.E.128"},
     "forward_cluster and backward_cluster, fp32/fp16/bf16"),
    ("norms", r"::(forward|backward)_cluster<", 12, {"UCGABAR_ARV", "UCGABAR_WAIT", "LDG.E.128"},
     "forward_cluster x fp32/fp16/bf16, backward_cluster x fp32/fp16/bf16 x 0/1/2 summed gradients"),
]


@pytest.mark.parametrize("module,pattern,count,instructions,why",
                         [pytest.param(*row, id=row[0]) for row in SM90_INSTRUCTIONS])
def test_sm90_kernels_hold_their_instructions(kernels, module, pattern, count, instructions, why):
    found = [k for k in kernels if k["arch"] == "sm_90a" and k["module"] == module and re.search(pattern, k["name"])]
    assert len(found) == count, f"expected {count} kernels ({why}), got {[k['name'] for k in found]}"
    lines = sr.tool_lines(sr.find_tool(), "-sass", "-arch", "sm_90a", "-fun", ",".join(k["mangled"] for k in found),
                          sr.default_extension())
    sass = sr.parse_sass(lines)
    for k in found:
        opcodes = {op for _, _, op, _ in sass[(module, k["mangled"])]}
        assert instructions <= opcodes, f"{k['name']}: missing {sorted(instructions - opcodes)}"
        assert k["in_flight"]["loads16"] >= 4, f"{k['name']}: {k['in_flight']}"


# The rest of the memory-bound kernels, by file: (kernel regex, 16-byte loads the thread has in flight
# at least, as the file headers give them). Every kernel reads rows with 16-byte loads, uses no local
# memory, and by Little's law has >= 85 % of copy bandwidth in flight per SM.
MEMORY_BOUND = {
    "norms": [(r"(?<!long_)forward_kernel<", 4),  # 4 packs of x (bf16) / 8 (fp32) before the first add
              (r"long_forward_kernel<", 2),      # rows past 16384: 2 packs of x a chunk (16-bit; 4 fp32)
              (r"backward_kernel<[^,]+, [48],", 4),  # grad_y and h, 2 packs each at least
              (r"row_sums_kernel<", 4),          # split backward: 4 packs of h before grad_y's
              (r"column_tile_backward_kernel<", 2),  # 2 packs of h, then grad_y's, one 16-byte phase
              (r"(forward|backward)_cluster<", 4),  # sm_90a clusters: 4 x 16 B staged a thread
              (r"column_sum_kernel<", 4)],       # 4 partial rows x 16 B
    "bias_act": [(r"forward_kernel<", 4),        # 4 rows' packs of x
                 (r"backward_kernel<", 3),       # 4 rows' packs of grad_y and x: 8 (3-5 bf16 sm_90a)
                 (r"column_sum_kernel<", 4)],
    "rope": [(r"rope_kernel<[^,]+, [48],", 1),  # one pack per unit, the table from shared memory
             (r"rope_staged_kernel<", 2)],       # two packs of a row per item into the stage
}
# Kernels still without 16-byte loads, and why (each file's header says the same):
# - rope_kernel<T, 1, *>: q / k with a last-dim stride != 1 (no two elements adjacent: every other
#   element, a stride-0 gradient), and rows too long to stage one head in 48 KB of shared memory;
#   every unit-stride layout takes rope_kernel<T, VEC, *> or rope_staged_kernel.
SCALAR_PATHS = [("rope", r"rope_kernel<[^,]+, 1,")]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("module", sorted(MEMORY_BOUND))
def test_every_memory_bound_kernel_figures(kernels, arch, module):
    figures = sr.memory_figures(rf"^{module}$", arch)
    assert figures, f"no {module} kernels in the binary"
    scalar = [name for name in figures for m, pat in SCALAR_PATHS if m == module and re.search(pat, name)]
    seen = set(scalar)
    for pattern, loads16 in MEMORY_BOUND[module]:
        matched = [name for name in figures if re.search(pattern, name) and name not in scalar]
        assert matched, f"{module}: no kernel matches {pattern}"
        for name in matched:
            f = figures[name]
            assert 16 in f["load_widths"], f"{name}: no 16-byte loads ({f['load_widths']})"
            assert f["loads16_in_flight"] >= loads16, f"{name}: {f}"
            assert f["spills"] == 0, f"{name}: {f}"
            assert f["bw_share"] >= 0.85, f"{name}: {f}"
        seen.update(matched)
    assert seen == set(figures), f"{module}: kernels not judged: {sorted(set(figures) - seen)}"


# ---------------------------------------------------------------- csrc/cuda/ptx_sm90.cuh on both targets
SM90_PROBE = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "ptx_sm90.cuh"
using namespace fastlm::cuda::sm90;
__global__ void __launch_bounds__(384, 1) probe(const __grid_constant__ TmaDesc desc, float* out) {
  extern __shared__ __align__(1024) unsigned char smem[];
  __shared__ uint64_t bar;
  if (threadIdx.x == 0) { mbar_init(&bar, 1); fence_barrier_init(); }
  __syncthreads();
  if (threadIdx.x == 256) {
    setmaxnreg_dec<40>();
    tma_prefetch_desc(&desc);
    mbar_arrive_expect_tx(&bar, 3 * 8192);
    tma_load_2d(smem, &desc, 0, 0, &bar);
    tma_load_3d(smem + 16384, &desc, 0, 0, 1, &bar);
    return;
  }
  setmaxnreg_inc<232>();
  mbar_wait(&bar, 0);
  float d[128];
  const uint32_t a[4] = {threadIdx.x, 1u, 2u, 3u};
  wgmma_fence_operand(d);
  wgmma_fence();
  wgmma_ss<__nv_bfloat16, 256, false, true>(d, smem_desc(smem, TmaSwizzle::k128B, 16, 1024),
                                            smem_desc(smem + 8192, TmaSwizzle::k128B, 8192, 1024), false);
  wgmma_rs<__half, 256, false>(d, a, smem_desc(smem + 8192, TmaSwizzle::k128B, 16, 1024), true);
  wgmma_commit();
  wgmma_wait<0>();
  wgmma_fence_operand(d);
  named_barrier_sync(1, 256);
  named_barrier_arrive(2, 256);
  fence_proxy_async_shared();
  mbar_arrive(&bar);
  for (int i = 0; i < 128; ++i) out[i * 256 + threadIdx.x] = d[i];
}
"""


def test_sm90_primitives_compile_to_hopper_instructions(tmp_path):
    """The real-GPU side of ptx_sm90.cuh, which CI cannot execute: for sm_90a every helper is its
    Hopper instruction; for sm_80 (the other pass of the same .cu) the calls become traps."""
    import os
    import shutil
    import subprocess

    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    tool = sr.find_tool()
    if not os.access(nvcc, os.X_OK) or not tool:
        pytest.skip("needs nvcc and cuobjdump")
    (tmp_path / "probe.cu").write_text(SM90_PROBE)
    obj = tmp_path / "probe.o"
    subprocess.run([nvcc, "-std=c++17", "-I", str(ROOT / "csrc" / "cuda"), "-c", str(tmp_path / "probe.cu"), "-o",
                    str(obj), "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80"],
                   check=True, capture_output=True)
    sass = {arch: subprocess.run([tool, "-sass", "-arch", arch, str(obj)], check=True, capture_output=True,
                                 text=True).stdout for arch in ARCHS}
    for insn in ("UTMALDG.2D", "UTMALDG.3D", "UTMACCTL.PF", "SYNCS.EXCH.64", "SYNCS.ARRIVE.TRANS64",
                 "SYNCS.PHASECHK.TRANS64.TRYWAIT", "HGMMA.64x256x16.F32.BF16", "gdesc[UR", ".tnspB", "WARPGROUP.ARRIVE",
                 "WARPGROUP.DEPBAR.LE", "BAR.SYNC", "BAR.ARV", "FENCE.VIEW.ASYNC.S", "USETMAXREG"):
        assert insn in sass["sm_90a"], insn
    assert re.search(r"HGMMA\.64x256x16\.F32 R\d+, R\d+, gdesc", sass["sm_90a"])  # A from registers, f16
    assert "BPT.TRAP" in sass["sm_80"] and not re.search(r"HGMMA|UTMA|SYNCS", sass["sm_80"])
