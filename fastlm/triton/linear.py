"""Triton GEMM with the linear epilogue: y = act(a @ b^T + bias) + residual, one store.

a is (M, K), b is (N, K), both with arbitrary strides, so the same kernel also computes the
backward's dX = grad_p @ W and dW = grad_p^T @ x by passing transposed strides.
Backward with an activation: grad_p = grad_y * act'(p) is written once by bias_act's backward
pass (which also gives grad_bias as deterministic per-strip column sums), then dX and dW are
plain GEMMs on it. Why not fuse act'(p) into the GEMMs' operand loads (as this file did): each
of the two GEMMs re-forms its A tile once per output column block, so every element of p went
through act' 2 * ceil(K / BLOCK_N) times (GPT-2's fc1, K = 768, 128-wide blocks: 12 times),
and GELU's derivative is an erf plus an exp, ~25 fp32 instructions and a MUFU op per element,
~0.2 clock/element/SM against the ~0.25 clock the wgmma spends on that element of a 128-wide
tile: the backward GEMMs ran at about half speed, and their pipelines held a third tile (p)
per stage. The separate pass costs one (M, N) write and one read more (M = 8192, N = 3072,
bf16: 2 x 50 MB, ~0.03 ms at 3.3 TB/s, ~0.1 ms with the pass's own reads), once.
Without an activation grad_p is grad_y itself: no pass, and the dW launch sums its A rows
(grad_y's columns) into grad_bias (programs of the first column block only; deterministic).
fp32 accumulation; fp32 operands use TF32 exactly when torch would (allow_tf32). Autotuned on
GPU per (M, N, K rounded up to powers of two, epilogue), among the configs whose shared memory
fits the device (fastlm/triton/_tune.py); the interpreter (CPU CI) runs one small fixed config.

Two kernels, one epilogue (_epilogue) and one tile order (_tile_coords, grouped by GROUP_M):
- _gemm_tma_kernel, sm_90+ with fp16/bf16 operands where Triton has host tensor descriptors
  (triton.tools.tensor_descriptor; Triton 3.6 and 3.8): persistent (one program per SM striding
  over the output tiles, so the next tile's loads overlap the last one's epilogue and no launch
  tail is left), A and B boxes by TMA (zero-filled at the edges: no masks, no address math in
  the K loop), tl.dot as wgmma. Operands of either major order: an M-major A (dW's grad_p^T) or
  an N-major B (dX's W, dW's x) is read as its contiguous (K, M) / (K, N) box, so the backward
  needs no copies either. Needs 16-byte aligned bases and leading strides; else the pointer kernel.
- _gemm_kernel (pointer loads): sm_80/86/89, fp32, and any layout TMA can't address.
AOT (scripts/triton_aot_sweep.py --modules linear, sm_80/86/90, fp32/fp16/bf16: 358 compiles, all
0 spills; before: sm_90 fp16 pointer backward with act' in the K loop, 128x128x64 4 warps, 255
registers, 144 B of spills in dW, 12 B in dX, 164,864 B shared; fp32 IEEE up to 1 KB spilled):
  TMA kernel (sm_90, 16-bit), wgmma and cp.async.bulk.tensor in every config: 128x256x64 8w/3s
  190-255 registers 147,512 B (not with the erf GELU epilogue: _epilogue_fits); 128x128x64 8w/4s
  112-234 regs 131,136 B; 128x64 / 64x128 x64 4w/4s 112-188 regs 98,368 B; 64x64x64 60-101 regs
  65,600 B. Pointer kernel fp32 (_TILES_32) 40-142 regs <= 32 KB; 16-bit on sm_80/86 <= 100 KB.
Not measured on a GPU yet: the TMA kernel's speed is an estimate (no device this session).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastlm.triton import _tune
from fastlm.triton import bias_act

from fastlm.triton.bias_act import ACT_CODES, _act_forward

try:  # host-side TMA descriptors: Triton 3.4+ (absent: the pointer kernel serves every GPU)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). 16-bit operands: tensor-core tiles.
_TILES_16 = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 4, 4),
             (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (32, 64, 64, 4, 4), (64, 64, 32, 4, 3)]
# fp32: without TF32 (torch's default) tl.dot runs on FMA units and holds K-slices of both tiles
# in registers: 64x64 tiles over 8 warps or 32x32 over 4, K steps <= 32, compile spill-free on
# sm_80/sm_90 (64x64x32 over 4 warps spilled 8-224 B, 64x64x64 up to 1 KB). All fit sm_86/89's
# 99 KB: 4 B * 3 stages * (64 + 64) * 32 = 48 KB at most.
_TILES_32 = [(64, 64, 32, 8, 3), (64, 64, 16, 8, 4), (32, 32, 32, 4, 3)]


_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # at import, as triton.jit decides: not _tune's AOT view


def _configs():
    if _INTERPRETED:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in _TILES_16 + _TILES_32]


def _smem(cfg, a):
    """Upper estimate: A and B tiles per pipeline stage, plus the epilogue tile."""
    kw = cfg.kwargs
    e = a["a_ptr"].element_size()
    rows = kw["BLOCK_M"] + kw["BLOCK_N"]
    return e * (max(cfg.num_stages, 2) * rows * kw["BLOCK_K"] + kw["BLOCK_M"] * kw["BLOCK_N"])


def _epilogue_fits(cfg, a):
    """The erf GELU epilogue next to 128 fp32 accumulators a thread (128x128 over 4 warps,
    128x256 over 8) spills 216-404 B (sm_80/86 pointer, sm_90 TMA): those tiles are left to the
    other epilogues, which compile clean."""
    acc_per_thread = cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] // (32 * cfg.num_warps)
    return a["ACT"] != ACT_CODES["gelu"] or acc_per_thread <= 64


def _allowed(cfg, a):
    """Each operand width its own tiles (_TILES_16 / _TILES_32), and _epilogue_fits (the
    interpreter's one config serves every width)."""
    if _INTERPRETED:
        return _epilogue_fits(cfg, a)
    kw = cfg.kwargs
    tile = (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], cfg.num_warps, cfg.num_stages)
    return (tile in _TILES_32) == (a["a_ptr"].element_size() == 4) and _epilogue_fits(cfg, a)


_KEY = ["M_B", "N_B", "K_B", "HAS_BIAS", "HAS_RES", "ACT", "SAVE_Z", "BIAS_GRAD", "PRECISION"]


@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M row-blocks share each column block while it is in L2."""
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (tile // width) * GROUP_M
    group = min(grid_m - first_m, GROUP_M)
    return first_m + (tile % width) % group, (tile % width) // group


@triton.jit
def _epilogue(acc, row_sum, pid_n, offs_m, offs_n, M, N, bias_ptr, res_ptr, y_ptr, z_ptr, gb_ptr, srm, srn,
              HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, SAVE_Z: tl.constexpr,
              BIAS_GRAD: tl.constexpr):
    if BIAS_GRAD:
        if pid_n == 0:  # one column block writes the row sums: no duplicates, no atomics
            tl.store(gb_ptr + offs_m, row_sum.to(gb_ptr.dtype.element_ty), mask=offs_m < M)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if SAVE_Z:  # z + bias, rounded once as eager's linear output; the backward sees the same value
        tl.store(z_ptr + out, acc.to(z_ptr.dtype.element_ty), mask=mask)
        acc = acc.to(z_ptr.dtype.element_ty).to(tl.float32)
    if ACT >= 0:
        acc = _act_forward(acc, ACT)
    if HAS_RES:
        acc += tl.load(res_ptr + offs_m[:, None].to(tl.int64) * srm + offs_n[None, :] * srn, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=mask)


@_tune.autotune(_configs(), _KEY, _smem, "triton linear GEMM", _allowed)
@triton.jit(do_not_specialize=["M_B", "N_B", "K_B"])
def _gemm_kernel(
    a_ptr, b_ptr, bias_ptr, res_ptr, y_ptr, z_ptr, gb_ptr, M, N, K, M_B, N_B, K_B,
    sam, sak, sbn, sbk, srm, srn,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, SAVE_Z: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * sam + offs_k[None, :] * sak
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * sbn + offs_k[:, None] * sbk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a_mask = (offs_m[:, None] < M) & k_ok[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        if BIAS_GRAD:
            row_sum += tl.sum(a.to(tl.float32), axis=1)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * sak
        b_ptrs += BLOCK_K * sbk
    _epilogue(acc, row_sum, pid_n, offs_m, offs_n, M, N, bias_ptr, res_ptr, y_ptr, z_ptr, gb_ptr, srm, srn,
              HAS_BIAS, HAS_RES, ACT, SAVE_Z, BIAS_GRAD)


# ---------------------------------------------------------------- persistent TMA kernel (sm_90+)
def _tma_configs():
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4,
                              pre_hook=_set_blocks)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st,
                          pre_hook=_set_blocks)
            # 128x128 over 4 warps holds 128 accumulator registers a thread and spills in the epilogue
            for bm, bn, bk, w, st in [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4),
                                      (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)]]


def _set_blocks(nargs):
    """Config pre-hook: the host descriptors' block shapes follow the config (and each operand's
    major order: an M-major A is read as (BLOCK_K, BLOCK_M) boxes, an N-major B as (BLOCK_K, BLOCK_N))."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bk, bm] if nargs["A_M_MAJOR"] else [bm, bk]
    nargs["b_desc"].block_shape = [bk, bn] if nargs["B_N_MAJOR"] else [bn, bk]


def _tma_smem(cfg, a):
    """Upper estimate: A and B boxes per stage, plus 1 KB for barriers and reduction scratch
    (the epilogue stores from registers: 131,104 B compiled for 128x128x64 in 4 stages)."""
    kw = cfg.kwargs
    e = a["a_desc"].base.element_size()
    return e * max(cfg.num_stages, 2) * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] + 1024


_TMA_KEY = ["M_B", "N_B", "K_B", "HAS_BIAS", "HAS_RES", "ACT", "SAVE_Z", "BIAS_GRAD", "A_M_MAJOR", "B_N_MAJOR"]


@_tune.autotune(_tma_configs(), _TMA_KEY, _tma_smem, "triton linear TMA GEMM", _epilogue_fits)
@triton.jit(do_not_specialize=["M_B", "N_B", "K_B"])
def _gemm_tma_kernel(
    a_desc, b_desc, bias_ptr, res_ptr, y_ptr, z_ptr, gb_ptr, M, N, K, M_B, N_B, K_B, srm, srn,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, SAVE_Z: tl.constexpr,
    BIAS_GRAD: tl.constexpr, A_M_MAJOR: tl.constexpr, B_N_MAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Persistent: one program per SM walks output tiles (grouped order), stride the grid; the
    A and B boxes arrive by TMA (zero-filled past the edges: no masks in the K loop)."""
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if A_M_MAJOR:
                a = tl.trans(a_desc.load([k0, off_m]))
            else:
                a = a_desc.load([off_m, k0])
            if B_N_MAJOR:
                b = b_desc.load([k0, off_n])
            else:
                b = tl.trans(b_desc.load([off_n, k0]))
            if BIAS_GRAD:
                row_sum += tl.sum(a.to(tl.float32), axis=1)
            acc = tl.dot(a, b, acc)
        _epilogue(acc, row_sum, pid_n, off_m + tl.arange(0, BLOCK_M), off_n + tl.arange(0, BLOCK_N), M, N,
                  bias_ptr, res_ptr, y_ptr, z_ptr, gb_ptr, srm, srn, HAS_BIAS, HAS_RES, ACT, SAVE_Z, BIAS_GRAD)


def _descriptor(t, strides, rows, cols):
    """A (rows, cols) operand (element [r, c] at r * strides[0] + c * strides[1]) as a TMA
    descriptor over its contiguous orientation: ((rows, cols), False) when strides[1] == 1,
    ((cols, rows), True) when strides[0] == 1; None when TMA can't address it (16-byte rules)."""
    e = t.element_size()
    if t.data_ptr() % 16:
        return None
    for lead, unit, shape, flipped in ((strides[0], strides[1], [rows, cols], False),
                                       (strides[1], strides[0], [cols, rows], True)):
        if unit == 1 and (lead * e) % 16 == 0 and lead >= shape[1]:
            return TensorDescriptor(t, shape, [lead, 1], [64, 64]), flipped  # block shape: set by _set_blocks
    return None


def _use_tma(a, M, N, K) -> bool:
    """Hopper (and later) with 16-bit operands, where the installed Triton has host tensor
    descriptors (triton.tools.tensor_descriptor); everything else runs the pointer kernel."""
    return (TensorDescriptor is not None and a.dtype in (torch.float16, torch.bfloat16) and min(M, N, K) > 0
            and _tune.capability(a.device) >= 90)


def gemm(a, a_strides, b, b_strides, M, N, K, *, bias=None, residual=None, activation=None, save_z=False,
         grad_bias=None):
    """act(A @ B^T + bias) + residual as a new (M, N) tensor, and A @ B^T + bias (empty unless save_z).
    A[m, k] = a[m * a_strides[0] + k * a_strides[1]], B[n, k] likewise with b_strides.
    grad_bias: an (M,) tensor that receives the row sums of A."""
    y = torch.empty((M, N), dtype=a.dtype, device=a.device)
    z = torch.empty((M, N) if save_z else (0,), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        if grad_bias is not None:
            grad_bias.zero_()
        return y, z
    descs = _use_tma(a, M, N, K) and (_descriptor(a, a_strides, M, K), _descriptor(b, b_strides, N, K))
    if descs and all(descs):
        (a_desc, a_m_major), (b_desc, b_n_major) = descs
        sms = _tune.sm_count(a.device)
        grid = lambda meta: (min(sms, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)
        _tune.launch(
            _gemm_tma_kernel, grid,
            a_desc, b_desc, bias if bias is not None else y, residual if residual is not None else y, y,
            z if save_z else y, grad_bias if grad_bias is not None else y,
            M, N, K, _tune.bucket(M), _tune.bucket(N), _tune.bucket(K),
            residual.stride(0) if residual is not None else 0, residual.stride(1) if residual is not None else 0,
            HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=ACT_CODES[activation] if activation else -1,
            SAVE_Z=save_z, BIAS_GRAD=grad_bias is not None, A_M_MAJOR=a_m_major, B_N_MAJOR=b_n_major,
        )
        return y, z
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _tune.launch(
        _gemm_kernel, grid,
        a, b, bias if bias is not None else y, residual if residual is not None else y, y, z if save_z else y,
        grad_bias if grad_bias is not None else y,
        M, N, K, _tune.bucket(M), _tune.bucket(N), _tune.bucket(K), a_strides[0], a_strides[1], b_strides[0], b_strides[1],
        residual.stride(0) if residual is not None else 0, residual.stride(1) if residual is not None else 0,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=ACT_CODES[activation] if activation else -1,
        SAVE_Z=save_z, BIAS_GRAD=grad_bias is not None, PRECISION=_precision(a.dtype),
    )
    return y, z


def _precision(dtype):
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def forward(x, weight, bias, residual, activation, save_preact):
    M, K = x.shape
    N = weight.shape[0]
    return gemm(x, x.stride(), weight, weight.stride(), M, N, K, bias=bias, residual=residual,
                activation=activation, save_z=save_preact)


def backward(grad_y, x, weight, bias, preact, activation):
    """dX = grad_p @ W and dW = grad_p^T @ x as two plain GEMMs (transposes by strides, no copies).
    With an activation grad_p = grad_y * act'(preact) and grad_bias come from one bias_act pass
    (see the header); without one grad_p is grad_y and the dW launch sums grad_bias."""
    M, N = grad_y.shape
    K = x.shape[1]
    sum_in_dw = activation == "none" and bias is not None
    if activation != "none":
        gp, gb = bias_act.backward(grad_y, preact, None, activation, sum_columns=bias is not None)
    else:
        gp, gb = grad_y, torch.empty(N if bias is not None else 0, dtype=grad_y.dtype, device=grad_y.device)
    if K == 0:  # no dW launch to sum grad_bias in
        return x.new_zeros(x.shape), weight.new_zeros(weight.shape), gp.sum(0) if sum_in_dw else gb
    gs = gp.stride()
    gx, _ = gemm(gp, gs, weight, weight.stride()[::-1], M, K, N)
    gw, _ = gemm(gp, gs[::-1], x, x.stride()[::-1], N, K, M, grad_bias=gb if sum_in_dw else None)
    return gx, gw, gb
