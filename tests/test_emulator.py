"""The SIMT emulator's own tests (csrc/emu): fragment layouts against the PTX ISA's tables, and
each class of kernel bug it must report: a race from a missing __syncthreads, an out-of-bounds
shared index, an uninitialized shared read, a lane leaving before a warp collective, a
misaligned cp.async, a launch over the grid limits, and a misread fragment layout (which
computes wrong, so the float64 comparison catches it as it would on a GPU). Then the sm_90a
primitives (mbarrier, TMA, named barriers, wgmma) against the ISA's layouts and a float64 matmul,
and the pipeline bugs their happens-before must catch; and thread-block clusters: a cluster-wide
sum through distributed shared memory, and the cluster bugs (deadlock, bad rank, out of bounds,
an exited CTA, a CTA exiting before a read of it is ordered, a race, a CTA read before it
started, a grid not a multiple of the cluster)."""
import pytest
import torch

from backends import emulated_gpu
from fastlm import _ext

pytestmark = [pytest.mark.emu, pytest.mark.skipif(not _ext.HAS_EMULATOR, reason="fastlm._C_emu not built")]


def run(name, x):
    return torch.ops.fastlm_emu.emu_selftest(name, x.contiguous())


def _inputs():
    return torch.randn(512, dtype=torch.float32)


# ---------------------------------------------------------------- fragment layouts (PTX ISA tables)
# Transcribed from the PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type" and
# "ldmatrix": groupID = lane >> 2, threadID_in_group = lane % 4.
def isa_a(lane):
    """(row, col) of a0..a7 of the A fragment (16 x 16, .f16)."""
    g, t = lane >> 2, lane % 4
    rows = [g, g, g + 8, g + 8, g, g, g + 8, g + 8]
    cols = [t * 2, t * 2 + 1, t * 2, t * 2 + 1, t * 2 + 8, t * 2 + 9, t * 2 + 8, t * 2 + 9]
    return list(zip(rows, cols))


def isa_b(lane):
    """(row = k, col = n) of b0..b3 of the B fragment (16 x 8, .f16)."""
    g, t = lane >> 2, lane % 4
    return [(t * 2, g), (t * 2 + 1, g), (t * 2 + 8, g), (t * 2 + 9, g)]


def isa_c(lane):
    """(row, col) of c0..c3 of the C/D fragment (16 x 8, .f32)."""
    g, t = lane >> 2, lane % 4
    return [(g, t * 2), (g, t * 2 + 1), (g + 8, t * 2), (g + 8, t * 2 + 1)]


def test_fragment_layouts_match_the_isa_tables():
    # A[r][c] = r * 16 + c and B[k][n] = k * 8 + n are exact in fp16, so every element a lane
    # receives names its own position
    a = torch.arange(256, dtype=torch.float32)
    b = torch.arange(128, dtype=torch.float32)
    out = run("fragments", torch.cat([a, b])).view(32, 16)
    d = a.view(16, 16).double() @ b.view(16, 8).double()
    for lane in range(32):
        got_a = [(int(v) // 16, int(v) % 16) for v in out[lane, :8]]
        got_b = [(int(v) // 8, int(v) % 8) for v in out[lane, 8:12]]
        assert got_a == isa_a(lane), f"A fragment of lane {lane}"
        assert got_b == isa_b(lane), f"B fragment of lane {lane}"
        want_d = torch.tensor([d[r, c] for r, c in isa_c(lane)])
        assert torch.equal(out[lane, 12:16].double(), want_d), f"D fragment of lane {lane}"


def test_mma_tile_matches_float64():
    x = _inputs()
    out = run("mma_tile", x)[:128].view(16, 8)
    a = x[:256].half().double().view(16, 16)
    b = x[256:384].half().double().view(16, 8)
    torch.testing.assert_close(out.double(), a @ b, rtol=1e-5, atol=1e-5)


def test_misread_fragment_layout_computes_wrong():
    """A kernel that feeds mma A rows in B's order: its result must fail the float64 comparison."""
    x = _inputs()
    out = run("mma_tile_bug", x)[:128].view(16, 8)
    want = x[:256].half().double().view(16, 16) @ x[256:384].half().double().view(16, 8)
    assert not torch.isnan(out).any()
    assert (out.double() - want).abs().max() > 0.1


# ---------------------------------------------------------------- what the checker reports
def test_block_sum_with_barrier_is_clean():
    x = _inputs()
    out = run("block_sum", x)
    torch.testing.assert_close(out[0].double(), x[:64].double().sum(), rtol=1e-5, atol=1e-5)


def test_cp_async_aligned_copy():
    x = _inputs()
    out = run("cp_async", x)[:64]
    torch.testing.assert_close(out, torch.roll(x[4:68], -4))


@pytest.mark.parametrize(
    "name, message",
    [
        ("block_sum_bug", r"shared-memory race \(read after write\) on byte \d+ of shared 'part'"),
        ("shift_oob_bug", r"out-of-bounds shared-memory write of 4 bytes at 0 bytes past the end of shared 'buf'"),
        ("uninit_bug", r"read of uninitialized shared memory: byte \d+ of shared 'buf'"),
        ("early_exit_bug", r"mask 0xffffffff names lanes that have exited|exited while its warp waits"),
        ("cp_async_bug", r"cp\.async: misaligned address"),
        ("bad_grid_bug", r"invalid configuration argument: grid \(1,70000,1\)"),
        ("turns_bug", r"wait_flag: flag 0x[0-9a-f]+ holds 0, waiting for 1, which only a later CTA could write"),
        ("cp_async_shared_source_bug", r"cp\.async: source 0x[0-9a-f]+ is shared memory, not a global address"),
        ("l2_float2_bug", r"ld\.global\.cg\.v2\.f32: misaligned address"),
    ],
)
def test_emulator_reports(name, message):
    faults = torch.ops.fastlm_emu.emu_stats()[6]
    with pytest.raises(RuntimeError, match=message):
        run(name, _inputs())
    # a launch refused up front (bad grid) runs no block; every other bug stops a running one
    assert torch.ops.fastlm_emu.emu_stats()[6] == faults + (name != "bad_grid_bug")


def test_turns_and_tickets_in_grid_order():
    """Blocks that hand a flag on in order (the attention backward's dQ turns) run clean, and
    tickets come out in start order; float2 through L2 at an 8-byte aligned address copies."""
    torch.testing.assert_close(run("turns", _inputs())[:4], torch.arange(4.0))
    x = _inputs()
    torch.testing.assert_close(run("l2_float2", x)[:64], x[2:66])


def test_stats_count_checked_accesses():
    before = torch.ops.fastlm_emu.emu_stats()
    run("block_sum", _inputs())
    after = torch.ops.fastlm_emu.emu_stats()
    launches, blocks, threads, accesses, barriers, _, faults = (a - b for a, b in zip(after, before))
    assert (launches, blocks, threads, barriers, faults) == (1, 1, 64, 1, 0)
    assert accesses == 64 + 64  # 64 writes, then thread 0 reads all 64 slots


def test_device_profile_switch():
    try:
        torch.ops.fastlm_emu.emu_set_arch("8.6")
        assert torch.ops.fastlm_emu.emu_device() == [8, 6, 84, 101376]
        with pytest.raises(ValueError, match="arch must be one of"):
            torch.ops.fastlm_emu.emu_set_arch("7.5")
    finally:
        torch.ops.fastlm_emu.emu_set_arch("8.0")
    assert torch.ops.fastlm_emu.emu_device()[:2] == [8, 0]


# ---------------------------------------------------------------- the attention kernels' new paths
def _emu_delta(fn):
    """(result, [launches, faults] the call added)."""
    before = torch.ops.fastlm_emu.emu_stats()
    out = fn()
    after = torch.ops.fastlm_emu.emu_stats()
    return out, [after[0] - before[0], after[6] - before[6]]


def test_decode_split_kv_paged_equals_contiguous():
    """Decode with keys enough to split (>= 1024 in sight): each sequence cuts its own keys, so a
    paged cache and a contiguous one of another capacity (another grid depth) give the same bits,
    and splits past a short sequence's keys merge in as nothing. Two launches (tiles, merge), no
    faults; against the float64 oracle."""
    from fastlm.ops.decode_attention import decode_forward_ref

    torch.manual_seed(0)
    lengths, h, hkv, d, tq, ps = [0, 1100, 2000, 5], 4, 1, 32, 2, 16
    cap = 2048
    k, v = (torch.randn(len(lengths), cap + 64, hkv, d, dtype=torch.float16) for _ in range(2))
    pages = cap // ps
    table = torch.randperm(len(lengths) * pages).view(len(lengths), pages).to(torch.int32)
    kp, vp = (torch.full((len(lengths) * pages, ps, hkv, d), float("nan"), dtype=torch.float16) for _ in range(2))
    kp[table.long()] = k[:, :cap].reshape(len(lengths), pages, ps, hkv, d)
    vp[table.long()] = v[:, :cap].reshape(len(lengths), pages, ps, hkv, d)
    q = torch.randn(len(lengths), tq, h, d, dtype=torch.float16)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    sinks = torch.randn(h)
    args = (seqlens, True, d ** -0.5, 0.0, -1, -1, None, sinks)
    (out_p, lse_p), stats = _emu_delta(lambda: torch.ops.fastlm_emu.attention_decode_fwd(q, kp, vp, table, *args))
    assert stats == [2, 0]
    out_c, lse_c = torch.ops.fastlm_emu.attention_decode_fwd(q, k, v, None, *args)  # capacity 2112
    assert torch.equal(out_p, out_c) and torch.equal(lse_p, lse_c)
    want, want_lse = decode_forward_ref(q.double(), k.double(), v.double(), None, seqlens, True, d ** -0.5,
                                        sinks=sinks.double())
    torch.testing.assert_close(out_p.double(), want, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(lse_p.double(), want_lse.double(), rtol=1e-3, atol=1e-3)


def test_varlen_one_launch_per_pass():
    """Varlen runs the packed batch in one launch of the forward (and delta, backward, finish
    for the gradients), with no faults; sequences without keys give 0, without queries nothing."""
    torch.manual_seed(0)
    lengths = [(5, 5), (0, 3), (70, 9), (3, 0), (1, 130)]
    cu_q, cu_k = (torch.tensor([0] + [sum(x[i] for x in lengths[:n + 1]) for n in range(len(lengths))],
                               dtype=torch.int32) for i in (0, 1))
    q = torch.randn(int(cu_q[-1]), 4, 32, dtype=torch.float16)
    k, v = (torch.randn(int(cu_k[-1]), 2, 32, dtype=torch.float16) for _ in range(2))
    args = (cu_q, cu_k, 70, 130, 2, 32 ** -0.5)
    (out, lse), stats = _emu_delta(lambda: torch.ops.fastlm_emu.attention_varlen_fwd(q, k, v, *args))
    assert stats == [1, 0]
    assert torch.equal(out[75:78], torch.zeros_like(out[75:78])) and bool(torch.isinf(lse[:, 75:78]).all())
    grad = torch.randn_like(out)
    (dq, dk, dv), stats = _emu_delta(
        lambda: torch.ops.fastlm_emu.attention_varlen_bwd(grad, q, k, v, *args[:4], out, lse, *args[4:]))
    assert stats == [3, 0]
    ref = torch.ops.fastlm.attention_varlen_bwd(grad.float(), q.float(), k.float(), v.float(), *args[:4], out.float(),
                                                lse, *args[4:])
    for got, want in zip((dq, dk, dv), ref):
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- sm_90a: mbarrier, TMA, named barriers, wgmma
@pytest.fixture
def sm90():
    with emulated_gpu():
        yield


# Transcribed from the PTX ISA, "Register Fragments and Shared Memory Matrix Layouts" for
# wgmma .m64nNk16: thread t of the warpgroup, w = t // 32, gid = (t % 32) // 4, tig = t % 4.
def isa_wgmma_d(n):
    """(row, col) of d0..d(N/2-1): per 8-column block j, d4j..d4j+3 at (r, c), (r, c+1), (r+8, c), (r+8, c+1)."""
    table = []
    for t in range(128):
        r, c = 16 * (t // 32) + (t % 32) // 4, 2 * (t % 4)
        table.append([(r + 8 * (i % 4 >= 2), 8 * (i // 4) + c + i % 2) for i in range(n // 2)])
    return torch.tensor(table)  # (128, N/2, 2)


def isa_wgmma_a():
    """(row, col) of a0..a7 (four .b32 registers): each warp's 16 rows as mma.m16n8k16's A."""
    return torch.tensor([[(16 * (t // 32) + r, c) for r, c in isa_a(t % 32)] for t in range(128)])  # (128, 8, 2)


def _wgmma_inputs(a, b):
    """The wgmma_* test kernels' input: A (64 x 64), B (64 x N), then A's register fragments for
    the four k16 steps laid out by the ISA table."""
    t = isa_wgmma_a()
    afrag = torch.stack([a[t[..., 0], t[..., 1] + 16 * ks] for ks in range(4)])
    return torch.cat([a.flatten(), b.flatten(), afrag.flatten()])


def _gather_d(out, n, rows=64):
    """The 64 x N matrix from the 128 threads' accumulators, placed by the ISA table."""
    t = isa_wgmma_d(n)
    d = torch.full((rows, n), float("nan"), dtype=torch.float64)
    d[t[..., 0], t[..., 1]] = out[: 128 * n // 2].view(128, n // 2).double()
    return d


def test_wgmma_d_fragment_matches_the_isa_table(sm90):
    # D = A B with A[m][0] = m, A[m][1] = 64, B[0][n] = 1, B[1][n] = n (all exact in bf16): every
    # accumulator names its own (m, n) as m + 64 n
    a, b = torch.zeros(64, 64), torch.zeros(64, 256)
    a[:, 0], a[:, 1] = torch.arange(64.0), 64.0
    b[0], b[1] = 1.0, torch.arange(256.0)
    out = run("wgmma_ss_n256", _wgmma_inputs(a, b))
    t = isa_wgmma_d(256)
    assert torch.equal(out[: 128 * 128].view(128, 128), (t[..., 0] + 64 * t[..., 1]).float())


@pytest.mark.parametrize(
    "name, n",
    [("wgmma_ss_n64", 64), ("wgmma_ss_n128_mn", 128), ("wgmma_ss_n24", 24), ("wgmma_rs_n128", 128),
     ("wgmma_rs_n64_mn", 64)],
)
def test_wgmma_matches_float64(sm90, name, n):
    """One warpgroup, K = 64 in four k16 steps (K-major operands step the descriptor's start by 32
    bytes inside the 128B swizzle atom, MN-major B by 2 KB), bf16 operands staged where TMA's 128B
    swizzle puts them; _rs takes A from registers laid out by the ISA's A-fragment table, one
    commit group per k16 step chained on the group in flight (wgmma_wait<1>)."""
    a, b = torch.randn(64, 64), torch.randn(64, n)
    out = run(name, _wgmma_inputs(a, b))
    want = a.bfloat16().double() @ b.bfloat16().double()
    torch.testing.assert_close(_gather_d(out, n), want, rtol=1e-5, atol=1e-4)


def test_wgmma_accumulators_are_undefined_before_the_wait(sm90):
    """A kernel that stores its accumulators between wgmma_commit and wgmma_wait gets NaN (a GPU:
    whatever the registers hold), so the float64 comparison fails as it would on a GPU."""
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    out = run("wgmma_read_before_wait_bug", _wgmma_inputs(a, b))
    assert bool(out[: 128 * 32].isnan().all())


def test_tma_boxes_zero_fill_and_swizzle_byte_for_byte(sm90):
    """Two 64 x 32 boxes of 16-bit elements from a 72 x 40 tensor at (-8, 20) and (40, 0), 128B
    swizzle: the shared bytes equal the ISA's model (out-of-bounds elements 0; byte b of the box
    at b ^ ((b >> 7) % 8) << 4)."""
    x = torch.randn(2048)
    out = run("tma_boxes", x)[:2048]
    src = x[:1440].view(torch.int16).view(40, 72)
    want = torch.zeros(2, 32, 64, dtype=torch.int16)
    for box, (c0, c1) in enumerate([(-8, 20), (40, 0)]):
        rows, cols = torch.arange(c1, c1 + 32)[:, None], torch.arange(c0, c0 + 64)[None, :]
        inside = (rows >= 0) & (rows < 40) & (cols >= 0) & (cols < 72)
        want[box] = torch.where(inside, src[rows.clamp(0, 39), cols.clamp(0, 71)], 0)
    linear = torch.arange(4096)
    swizzled = linear ^ (((linear >> 7) & 7) << 4)
    want_bytes = torch.zeros(2, 4096, dtype=torch.uint8)
    want_bytes[:, swizzled] = want.view(2, -1).view(torch.uint8)
    assert torch.equal(out.view(torch.uint8), want_bytes.flatten())


def test_tma_box_3d_zero_fill(sm90):
    """A 64 x 8 x 2 box at (0, 4, 1) of a 64 x 10 x 3 tensor of 16-bit elements whose rows are 80
    elements apart and slices 12 rows apart, no swizzle: rows 10 and 11 come back 0."""
    x = torch.randn(2048)
    out = run("tma_box_3d", x)[:512]
    src = x.view(torch.int16)[: 3 * 12 * 80].view(3, 12, 80)[:, :10, :64]
    want = torch.zeros(2, 8, 64, dtype=torch.int16)
    want[:, :6] = src[1:3, 4:10]
    assert torch.equal(out.view(torch.int16), want.flatten())


def test_tma_wgmma_pipeline_matches_float64(sm90):
    """384 threads: a producer thread feeds two stages through full/empty mbarriers with TMA,
    two consumer warpgroups run wgmma on them (the warp-specialized Hopper GEMM's shape)."""
    a, b = torch.randn(128, 256), torch.randn(256, 64)
    out = run("pipeline", torch.cat([a.flatten(), b.flatten()]))
    d = torch.cat([_gather_d(out[g * 128 * 32:], 64) for g in range(2)])
    torch.testing.assert_close(d, a.half().double() @ b.half().double(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(run("named_handoff", a.flatten())[:128], 2 * a.flatten()[:128].flip(0))


@pytest.mark.parametrize(
    "name, message",
    [
        ("pipeline_early_read_bug",
         r"race \(read after write\) on byte \d+ of shared 'dynamic shared memory'.*thread \(256,0,0\).*and the wgmma "
         r"shared-memory reads of warpgroup"),
        ("pipeline_overwrite_bug",
         r"race \(write after read\) on byte \d+ of shared 'dynamic shared memory'.*the wgmma shared-memory reads of "
         r"warpgroup \d .*and thread \(256,0,0\)"),
        ("pipeline_deadlock_bug",
         r"deadlock in block \(0,0,0\): 256 threads wait on the mbarrier at byte 0 of shared 'bars' \(32 bytes\) for the "
         r"phase of parity 0 to complete \(it has completed 0 phases; the current one still expects 0 arrivals and 16 "
         r"transaction bytes\)"),
        ("pipeline_early_release_bug",
         r"race \(write after read\) on byte \d+ of shared 'dynamic shared memory'.*the wgmma shared-memory reads of "
         r"warpgroup \d .*and thread \(256,0,0\)"),
        ("named_handoff_bug", r"race \(read after write\) on byte \d+ of shared 'buf'"),
    ],
)
def test_emulator_reports_sm90(sm90, name, message):
    with pytest.raises(RuntimeError, match=message):
        run(name, torch.randn(128 * 256 + 256 * 64))


@pytest.mark.parametrize(
    "misuse, message",
    [
        (0, r"mbarrier\.init: the mbarrier at byte 0 of shared 'bar' \(16 bytes\) is initialized twice"),
        (1, r"mbarrier\.arrive on the uninitialized mbarrier at byte 8 of shared 'bar'"),
        (2, r"mbarrier\.arrive: more arrivals than the 1 the mbarrier at byte 0 of shared 'bar' \(16 bytes\) expects "
            r"in its phase 0"),
        (3, r"wgmma\.mma_async without a wgmma_fence\(\)"),
        (4, r"cp\.async\.bulk\.tensor\.2d: misaligned address: the destination at byte \d+ of shared 'dynamic "
            r"shared memory' \(9216 bytes\) is not 1024-byte aligned"),
    ],
)
def test_sm90_misuse_is_reported(sm90, misuse, message):
    with pytest.raises(RuntimeError, match=message):
        run(f"sm90_misuse_{misuse}", torch.randn(2048))


def test_sm90_instructions_need_the_sm90_profile():
    with pytest.raises(RuntimeError, match=r"mbarrier\.init needs sm_90a; the emulated device is sm_80"):
        run("pipeline", torch.randn(128 * 256 + 256 * 64))


# ---------------------------------------------------------------- sm_90a: thread-block clusters and DSMEM
# cluster size -> (grid, cluster shape) of the selftest launches: two clusters each, x-fastest
CLUSTER_LAUNCHES = {1: ((2, 1), (1, 1)), 2: ((4, 1), (2, 1)), 4: ((2, 4), (2, 2)), 8: ((16, 1), (8, 1))}


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_cluster_sum_through_dsmem(sm90, size):
    (gx, gy), (cx, cy) = CLUSTER_LAUNCHES[size]
    blocks = gx * gy
    x = torch.randint(-1000, 1001, (1024,)).float()  # integers: every fp32 sum here is exact, in any order
    out = run(f"cluster_sum_{size}", x)
    per_block = x[: 64 * blocks].double().view(blocks, 64).sum(1)
    for b in range(blocks):
        bx, by = b % gx, b // gx  # CUDA's rule: a block's cluster is blockIdx // cluster shape
        members = [(bx // cx * cx + i) + (by // cy * cy + j) * gx for j in range(cy) for i in range(cx)]
        want = per_block[members].sum().item()
        assert out[4 * b: 4 * b + 3].double().tolist() == [want] * 3  # 32-, 64-, 128-bit DSMEM loads
        assert out[4 * b + 3].item() == bx % cx + by % cy * cx  # %cluster_ctarank
        if bx % cx == 0 and by % cy == 0:  # rank 0: the inbox (st.shared::cluster) and the pulled sums
            cluster = bx // cx + by // cy * (gx // cx)
            assert out[4 * blocks + 2 * cluster: 4 * blocks + 2 * cluster + 2].double().tolist() == [want] * 2
    assert out[4 * blocks + blocks // size * 2:].isnan().all()


@pytest.mark.parametrize(
    "name, message",
    [
        ("cluster_deadlock_bug",
         r"deadlock in the cluster of blocks \(0,0,0\)\.\.\(3,0,0\): barrier\.cluster phase 0: 193 of the cluster's 256 "
         r"live threads arrived; rank 0 \(block \(0,0,0\)\): 64 wait at barrier\.cluster\.wait, 0 have not arrived; "
         r"rank 1 \(block \(1,0,0\)\): 1 wait at barrier\.cluster\.wait, 63 have not arrived;.* rank 1 \(block "
         r"\(1,0,0\)\): 63 of 64 live threads wait at __syncthreads"),
        ("cluster_bad_rank_bug", r"mapa\.shared::cluster: rank 2 outside the cluster of 2 CTAs \(ranks 0\.\.1\)"),
        ("cluster_oob_bug",
         r"out-of-bounds shared-memory read of 16 bytes at 0 bytes past the end of shared 'stage' \(256 bytes\) by "
         r"thread \(15,0,0\) of block \(1,0,0\) \[warp 0 lane 15, cluster rank 1\] through DSMEM into block "
         r"\(0,0,0\) \(cluster rank 0\)"),
        ("cluster_exited_bug",
         r"ld\.shared::cluster by thread \(0,0,0\) of block \(0,0,0\) .*: cluster rank 1 \(block \(1,0,0\)\) has "
         r"exited, its shared memory is gone"),
        ("cluster_race_bug",
         r"race \(read after write\) on byte 4 of shared 'inbox' \(32 bytes\): thread \(0,0,0\) of block \(1,0,0\) "
         r".*through DSMEM into block \(0,0,0\) \(cluster rank 0\) and thread \(0,0,0\) of block \(0,0,0\)"),
        ("cluster_unstarted_bug",
         r"ld\.shared::cluster by thread \(63,0,0\) of block \(1,0,0\) .*: shared offset \d+ lies outside everything "
         r"cluster rank 0 \(block \(0,0,0\)\) has declared so far, and no cluster barrier has completed yet"),
        ("cluster_no_wait_bug",
         r"cluster rank 1 \(block \(1,0,0\)\) exits while its shared memory may still be in use: thread \(0,0,0\) of "
         r"block \(0,0,0\) .*through DSMEM into block \(1,0,0\) \(cluster rank 1\) accessed byte 0 of shared 'mine'"),
        ("cluster_shape_bug",
         r"invalid cluster size: grid \(3,1,1\), cluster \(2,1,1\) on sm_90: the grid must be a multiple of the "
         r"cluster shape in every dimension"),
    ],
)
def test_emulator_reports_cluster_bugs(sm90, name, message):
    with pytest.raises(RuntimeError, match=message):
        run(name, torch.randint(-1000, 1001, (1024,)).float())


def test_clusters_need_the_sm90_profile():
    with pytest.raises(RuntimeError, match=r"invalid cluster size: .* on sm_80: thread-block clusters need sm_90"):
        run("cluster_sum_2", torch.randn(1024))
