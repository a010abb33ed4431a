"""Triton flash attention forward for Hopper (sm_90+): Q, K, V and O move by TMA.

What it serves (why_not says why anything else stays on attention.py's pointer kernel): fp16 /
bf16, head dims 64, 128 and 256 (value dim equal), dense or causal in either alignment, GQA /
MQA, ragged lengths, operands of any strides whose last dimension is contiguous and whose other
strides and base are 16-byte aligned (TMA's rules), e.g. a (B, T, H, D) projection seen through
a transpose. No mask, dropout, softcap, window, ALiBi or sinks. Same contract as the pointer
forward: out (B, H, Tq, D) in the input dtype, lse (B, H, Tq) fp32 in natural log (what the
backward reads), fully masked rows out 0 and lse -inf.

A program owns BLOCK_M queries of one (batch, head). Q, K, V and O are 4-D host tensor
descriptors (triton.tools.tensor_descriptor: Triton 3.4+, checked in the 3.6 and 3.8 sources)
over (batch, head, row, dim) with the operand's own strides, so one TMA box is one head's tile
and rows past its length arrive as zeros and are clipped on store: no bounds masks and no
address arithmetic in the key loop. Scores stay in log2 units, scale * log2(e) folded in. Two
variants; the autotuner picks per shape (_TILES):
- split: 128-row tiles over 2 warpgroups. Key tiles every query of the block sees (all of a
  dense call, all but the diagonal's of a causal one) run unmasked, qk * scale - m one FFMA a
  score into MUFU.EX2, row max from the raw products; the rest (the diagonal, the ragged end)
  follow in a second loop that masks, as attention.py's edge tiles do (attention._online_step;
  keys past the block's last visible one zeroed in V, so a NaN there stays out).
- warp-specialised: tl.range(..., warp_specialize=True). Triton's Hopper pass (3.6 and 3.8
  alike, compiled both) only takes a kernel whose one loop is all there is: with a second loop
  it fails, with a tile unrolled next to it or a branch inside it it leaves the loop alone (no
  specialisation, no error); with 8 warps it
  does nothing, and 128-row tiles over 4 warps fail in it (it splits the K box but not its
  copy). So: 64-row tiles over 4 warps, one loop over every visible key tile, each tile masked
  by its rows' last visible key (a compare and a select a score more than the split variant's
  full tiles). The pass adds a producer warpgroup for the TMA loads (384 threads, setmaxnreg:
  the producer drops to 40 registers, the two MMA / softmax warpgroups rise to 232), so the
  loads of the next tiles run while this one's softmax does, in 3 to 4 buffers. Unlike the
  split variant a NaN in V at a key inside the block's last tile that no row of the block sees
  reaches those rows (0 * NaN in the MMA), as in FlashAttention's kernels.

Why it should be fast (static arithmetic; no GPU has timed it): a split 128 x 128 tile at D =
128 is 2 GEMMs of 128 x 128 x 128 per 64 KB of K and V boxes (4.2 MFLOP, 64 FLOP per shared
byte, a head's K / V re-read from L2 by its query blocks): tensor-core bound. Per warpgroup (64
rows) and key tile, S = Q K^T is D / 16 = 8 HGMMA.64x128x16 and O += P V BLOCK_N / 16 = 8 more.
The compiled loop (sm_90 SASS, Triton 3.8) is 492 instructions a thread for those 16 HGMMA, 64
scores a thread: 66 MUFU, 66 FFMA (the folded scale), 68 FMNMX, 68 FADD, 66 FMUL (the
accumulator's rescale), 32 F2FP, about 31 instructions per HGMMA. The warp-specialised 64 x 64
loop at D = 128: 405 instructions per consumer for 12 HGMMA (8 of 64x64x16, 4 of 64x128x16),
32 scores a thread, no FFMA (the mask's select sits between the scale and the subtraction:
FMUL, ISETP, FSEL, FADD), ~34 per HGMMA. Shared memory and registers of every config
(fastlm.triton.aot, sm_90, Triton 3.8; 3.6 within 100 B and 7 registers), all 0 spills:
  split 128 x 128 / 8 warps / 2 stages: 82,944 B 188 regs (D 64), 164,864 B 217 (D 128)
  split 128 x 64 / 8 warps / 3 stages: 66,560 B 110 (D 64), 132,096 B 147 (D 128)
  split 64 x 64 / 8 warps, D 256: 164,864 B 183 (over 4 warps: 255 registers and 28 B spilled)
  ws 64 x 64: 57,584 B (D 64), 114,928 B (D 128); ws 64 x 128, D 64: 90,352 B; ws 64 x 32, D 256:
  164,080 B (168 registers a thread at launch, setmaxnreg moving them as above)
"""
from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from fastlm.triton import _tune
from fastlm.triton.attention import LOG2E, MAX_GRID_YZ, _dot, _finish, _masked, _online_step, _ranges, fp32_precision

try:  # host-side TMA descriptors: Triton 3.4+ (absent: the pointer kernel serves every GPU)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

HAS_WARP_SPECIALIZE = "warp_specialize" in inspect.signature(tl.range.__init__).parameters
HEAD_DIMS = (64, 128, 256)

# (BLOCK_M, BLOCK_N, warps, stages, warp-specialised), for head dims <= 128 and for 256; the autotuner
# picks per shape between the split kernel (128-row tiles over 2 warpgroups, masks on edge tiles only) and
# the warp-specialised one. Triton's Hopper warp specialisation (3.6 and 3.8 alike) takes 4-warp 64-row
# tiles: with 8 warps it leaves the loop as it is, and 128-row tiles over 4 warps fail its pass (it splits
# the K box but not the TMA copy). D = 256: 64-row tiles (a 128-row accumulator alone would be 128 fp32
# registers a thread; the split one over 8 warps, as over 4 it spills).
_TILES = {128: ((128, 128, 8, 2, False), (64, 64, 4, 2, True), (128, 64, 8, 3, False), (64, 128, 4, 2, True)),
          256: ((64, 64, 8, 2, False), (64, 32, 4, 2, True))}
_KEY = ["D", "TQ_B", "TK_B", "CAUSAL", "PREC"]


def why_not(q, k, v, mask=None, causal=0, dropout_p=0.0, softcap=0.0, window=(-1, -1), alibi=None,
            sinks=None) -> str:
    """'' when the TMA forward serves this call, else why not (the pointer kernel then does)."""
    if TensorDescriptor is None:
        return f"Triton {triton.__version__} has no host tensor descriptors (triton.tools.tensor_descriptor)"
    cap = _tune.capability(q.device)
    if cap < 90:
        return f"needs an sm_90+ GPU (compute capability {cap / 10:.1f})"
    options = dict(mask=mask is not None, dropout=dropout_p > 0, softcap=softcap > 0,
                   window=tuple(window) != (-1, -1), alibi=alibi is not None, sinks=sinks is not None)
    taken = [name for name, on in options.items() if on]
    if taken:
        return f"options it lacks: {', '.join(taken)}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (fp16/bf16 only)"
    if q.shape[-1] not in HEAD_DIMS or v.shape[-1] != q.shape[-1]:
        return f"head dims {q.shape[-1]}/{v.shape[-1]} (64, 128 or 256, value dim equal)"
    if q.numel() == 0 or k.numel() == 0:
        return "empty operands"
    if q.shape[0] * q.shape[1] > MAX_GRID_YZ:
        return f"B * H = {q.shape[0] * q.shape[1]} past the grid's axis-1 cap {MAX_GRID_YZ}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if _strides(t) is None:
            return (f"{name} strides {tuple(t.stride())} / base not TMA-addressable (16-byte aligned, "
                    "last dim contiguous)")
    return ""


def _strides(t):
    """t's (batch, head, row, dim) strides as TMA takes them, or None: the last 1, the others
    positive and 16-byte aligned, the base too. A size-1 dimension's stride is never stepped: it
    gets the extent of the dimensions below it, so a view with an odd stride there still qualifies."""
    if t.stride(3) != 1 or t.data_ptr() % 16:
        return None
    strides = [1, 1, 1, 1]
    for i in (2, 1, 0):
        strides[i] = t.stride(i) if t.shape[i] != 1 else strides[i + 1] * t.shape[i + 1]
    if any(s <= 0 or s * t.element_size() % 16 for s in strides[:3]):
        return None
    return strides


def _descriptor(t):
    return TensorDescriptor(t, list(t.shape), _strides(t), [1, 1, 16, t.shape[3]])  # boxes: set by _set_blocks


def _set_blocks(nargs):
    """Config pre-hook: the descriptors' boxes follow the config (one head's BLOCK rows x D)."""
    bm, bn = nargs["BLOCK_M"], nargs["BLOCK_N"]
    for name, rows in (("q_desc", bm), ("k_desc", bn), ("v_desc", bn), ("o_desc", bm)):
        nargs[name].block_shape = [1, 1, rows, nargs[name].shape[3]]


def _configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "WARP_SPEC": ws}, num_warps=w, num_stages=st,
                          pre_hook=_set_blocks)
            for tiles in _TILES.values() for bm, bn, w, st, ws in tiles]


def _smem(cfg, a):
    """Upper estimate: Q resident, K and V boxes per stage (at least 2) and P in the input dtype (the
    second GEMM's shared operand), 1 KB of barriers; warp-specialised: Q and up to four K and V
    buffers each (the pass picks the depth: 3 in the compiled 64 x 64 tiles, 4 at D = 256 x 32)."""
    e, d = a["q_desc"].base.element_size(), a["D"]
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    if cfg.kwargs["WARP_SPEC"]:
        return e * (bm * d + 4 * 2 * bn * d) + 1024
    return e * (bm * d + max(cfg.num_stages, 2) * 2 * bn * d + bm * bn) + 1024


def _allowed(cfg, a):
    """The head dim's own tiles (_TILES); warp-specialised ones where Triton has warp_specialize."""
    kw = cfg.kwargs
    tile = (kw["BLOCK_M"], kw["BLOCK_N"], cfg.num_warps, cfg.num_stages, kw["WARP_SPEC"])
    return tile in _TILES[128 if a["D"] <= 128 else 256] and (HAS_WARP_SPECIALIZE or not kw["WARP_SPEC"])


@triton.jit
def _full_tiles(acc, m_i, l_i, q, k_desc, v_desc, b, hk, hi, qk_scale, PREC: tl.constexpr, D: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Key tiles [0, hi), seen by every query of the block: no mask; qk * scale - m is one FFMA a score."""
    for start_n in range(0, hi, BLOCK_N):
        k = k_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, D)
        qk = _dot(q, tl.trans(k), PREC)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = v_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, D)
        if PREC == "":
            p = p.to(v.dtype)
        acc = acc * alpha[:, None] + _dot(p, v, PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _edge_tiles(acc, m_i, l_i, q, k_desc, v_desc, lse_ptr, b, hk, offs_m, lo, hi, TQ, TK, upper, qk_scale,
                CAUSAL: tl.constexpr, PREC: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The causal diagonal's tiles and the ragged end, [lo, hi): scores masked (-inf), rows that saw
    nothing yet kept finite (_online_step), and V's keys past hi, which no query here sees, zeroed
    so a NaN there can't reach the output (keys past Tk arrive as TMA's zeros)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = k_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, D)
        _, s = _masked(_dot(q, tl.trans(k), PREC) * qk_scale, offs_m[:, None], offs_n[None, :], TQ, TK, 0, upper,
                       lse_ptr, 0, 0, False, CAUSAL, 0)
        v = v_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, D)
        v = tl.where((offs_n < hi)[:, None], v, 0.0).to(v.dtype)
        m_i, l_i, acc = _online_step(s, v, m_i, l_i, acc, 1.0, PREC, False)
    return acc, m_i, l_i


@triton.jit
def _all_tiles_ws(acc, m_i, l_i, q, k_desc, v_desc, b, hk, offs_m, hi, TK, upper, qk_scale, CAUSAL: tl.constexpr,
                  PREC: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles [0, hi) in one warp-specialised loop, each masked by its rows' last visible key."""
    last = TK - 1 + 0 * offs_m
    if CAUSAL:
        last = tl.minimum(offs_m + upper, TK - 1)
    for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=True):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = k_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, D)
        s = tl.where(offs_n[None, :] <= last[:, None], _dot(q, tl.trans(k), PREC) * qk_scale, float("-inf"))
        v = v_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, D)
        m_i, l_i, acc = _online_step(s, v, m_i, l_i, acc, 1.0, PREC, False)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["TQ_B", "TK_B"])
def _fwd_tma_kernel(q_desc, k_desc, v_desc, o_desc, lse_ptr, H, GROUP, TQ, TK, TQ_B, TK_B, qk_scale, upper,
                    D: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr, WARP_SPEC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (query blocks, B * H). upper: key j is visible to query i when j <= i + upper (CAUSAL)."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = q_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, D)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    _, _, full_hi, hi = _ranges(start_m, TK, TK // BLOCK_N * BLOCK_N, 0, upper, False, CAUSAL, BLOCK_M, BLOCK_N)
    if WARP_SPEC:
        acc, m_i, l_i = _all_tiles_ws(acc, m_i, l_i, q, k_desc, v_desc, b, hk, offs_m, hi, TK, upper, qk_scale, CAUSAL,
                                      PREC, D, BLOCK_N)
    else:
        acc, m_i, l_i = _full_tiles(acc, m_i, l_i, q, k_desc, v_desc, b, hk, full_hi, qk_scale, PREC, D, BLOCK_N)
        acc, m_i, l_i = _edge_tiles(acc, m_i, l_i, q, k_desc, v_desc, lse_ptr, b, hk, offs_m, full_hi, hi, TQ, TK,
                                    upper, qk_scale, CAUSAL, PREC, D, BLOCK_N)
    inv, lse = _finish(m_i, l_i, 0.0, False)
    out = (acc * inv[:, None]).to(o_desc.dtype)
    o_desc.store([b, h, start_m, 0], out.reshape(1, 1, BLOCK_M, D))  # rows past Tq are clipped by TMA
    tl.store(lse_ptr + bh.to(tl.int64) * TQ + offs_m, lse, mask=offs_m < TQ)


_fwd_tma_tuned = _tune.autotune(_configs(), _KEY, _smem, "triton attention forward (TMA)", _allowed)(_fwd_tma_kernel)


def forward(q, k, v, causal, scale, warp_specialize=None):
    """(out (B, H, Tq, D) contiguous, lse (B, H, Tq) fp32) as attention.forward returns them, for a
    call why_not accepts. On a GPU the autotuner picks the tile and the variant; under the
    interpreter (CPU tensors: the tests) one small tile, the variant warp_specialize says (it only
    changes the loop's shape there), and fp32 operands too (the interpreter's bf16 dots are wrong)."""
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    out = torch.empty(b, h, tq, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, tq, device=q.device, dtype=torch.float32)
    upper = 0 if causal == 1 else tk - tq  # top-left (torch's is_causal) or bottom-right
    args = (_descriptor(q), _descriptor(k), _descriptor(v), _descriptor(out), lse, h, h // hkv, tq, tk,
            _tune.bucket(tq), _tune.bucket(tk), scale * LOG2E, upper)
    meta = dict(D=d, CAUSAL=causal != 0, PREC=fp32_precision() if q.dtype == torch.float32 else "")
    grid = lambda m: (triton.cdiv(tq, m["BLOCK_M"]), b * h)
    if _tune.interpreting():  # fixed small blocks: the interpreter is slow and autotuning it pointless
        blocks = dict(BLOCK_M=16, BLOCK_N=16, WARP_SPEC=bool(warp_specialize))
        _set_blocks(dict(zip(("q_desc", "k_desc", "v_desc", "o_desc"), args), **blocks))
        _tune.launch(_fwd_tma_kernel, grid(blocks), *args, **meta, **blocks)
    else:
        _tune.launch(_fwd_tma_tuned, grid, *args, **meta)
    return out, lse


def aot_cases():
    """fastlm.triton.aot's cases for this kernel (aot.cases() adds them): what the forward launcher
    sends here on sm_90, 16-bit, no mask. CI: fp16, the first split and the first warp-specialised
    config per head-dim class (fp16 only: CI's sm_80 dtypes would add pointer-kernel compiles); the
    sweep: every config, and bf16 with GQA in a (B, T, H, D) layout."""
    from fastlm.triton.aot import Case

    def run(b, h, hkv, t, d, causal, transposed=False):
        def launch(dtype):
            from fastlm.triton import attention

            q = torch.randn(b, t, h, d).to(dtype).transpose(1, 2) if transposed else torch.randn(b, h, t, d).to(dtype)
            k, v = torch.randn(b, hkv, t, d).to(dtype), torch.randn(b, hkv, t, d).to(dtype)
            attention.forward(q, k, v, None, causal, d ** -0.5)
        return launch
    cases = [Case("attention_tma", f"tma d{d} causal{causal}", run(2, 4, 2, 1024, d, causal), ci=True,
                  dtypes=("fp16",), ci_configs=2) for d, causal in ((64, 2), (128, 1), (256, 0))]
    cases.append(Case("attention_tma", "tma d128 causal0 bthd", run(2, 8, 2, 1000, 128, 0, True),
                      dtypes=("fp16", "bf16")))
    return cases

