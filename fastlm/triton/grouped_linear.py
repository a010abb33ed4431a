"""Triton grouped GEMM for grouped_linear: every expert's rows through its own weight, one launch.

Forward, `_grouped_gemm_kernel`: out[r] = act(x[r] @ W[e]^T + b[e]) for the rows r of expert e
(offsets[e] <= r < offsets[e+1]), the dropped tail (rows >= offsets[E]) written as 0. The grid
is static, (cdiv(N, BLOCK_M) + E + 1) row tiles x column tiles, whatever the routing: every
bucket (E experts and the tail) of n_b rows needs cdiv(n_b, BLOCK_M) <= n_b / BLOCK_M + 1 tiles.
Each program reads the E + 1 offsets, forms the per-bucket tile counts and their prefix sum in
registers (tl.cumsum over E + 2 lanes: a few instructions for E <= 256) and finds its bucket
there: no host sync, no tile table in memory, programs past the last tile do nothing. The fused
epilogue is linear's (bias, activation) plus the gated form: for swiglu / geglu a program owns
columns n of the gate half AND n + I of the up half, two accumulators over the same x tile, so
act(gate) * up is formed in registers and the (N, 2I) pre-activation is written only when a
backward needs it. Offsets are clamped to [0, N] on the device: bad ones can give wrong rows
but never an out-of-bounds access.

Backward: grad_p = grad_out * act'(pre) (bias_act's backward kernel; gated: [g * up * act'(gate),
g * act(gate)] by `_gated_grad_kernel`) written once in the operands' dtype (not recomputed per
column block of two GEMMs);
dX by the same grouped kernel with W[e] read transposed through strides; dW[e] = grad_p_e^T @ x_e
by `_weight_grad_kernel`, a grid over (expert, Nw block, K block), each program reducing over its
expert's rows (empty experts write 0), and grad_bias[e] = the column sums of grad_p_e, summed in
the same loop by the K-block-0 programs: deterministic, no atomics.

Why it is fast: one launch per GEMM however many experts (no per-expert launch or Python loop,
no padding of experts to a common size), tensor-core tl.dot on 16-bit operands with fp32
accumulation (TF32 for fp32 exactly when torch allows it, as fastlm.triton.linear decides).
Tiles: 16-bit 64 x 128 x 64 (gated 64 x 64 x 64 with two accumulators), 3 stages: 72 KB of
shared memory, within sm_86's 99 KB; fp32 64 x 64 x 32 (gated 64 x 32 x 32): 48 KB. A row tile
of an expert with few rows wastes the masked rest of its BLOCK_M = 64 rows; tiles are fixed
(no autotune), the interpreter runs 32 x 32 x 32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.triton import _tune, bias_act
from fastlm.triton.bias_act import ACT_CODES, _act_derivative, _act_forward
from fastlm.triton.linear import _precision

GATED_ACT = {"swiglu": "silu", "geglu": "gelu"}


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, bias_ptr, out_ptr, pre_ptr, offsets_ptr,
    N, E, KD, NC, sam, sak, sbe, sbn, sbk, sbias_e,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, SAVE_PRE: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[r, n] (N, NC) = act(A[r] . B[e, n] + bias[e, n]) for the rows r of expert e, A[r, kd] at
    a + r * sam + kd * sak, B[e, n, kd] at b + e * sbe + n * sbn + kd * sbk. GATED: columns n and
    n + NC of B and bias are the gate and up halves; pre (N, NC or 2 NC) gets the pre-activation."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(NC, BLOCK_N)
    pid_m = pid // tiles_n
    pid_n = pid - pid_m * tiles_n
    # the tile schedule: buckets 0..E-1 are the experts, E the dropped tail [offsets[E], N)
    b = tl.arange(0, BLOCK_B)
    start = tl.minimum(tl.maximum(tl.load(offsets_ptr + b, mask=b <= E, other=0), 0), N)
    end = tl.minimum(tl.maximum(tl.load(offsets_ptr + b + 1, mask=b < E, other=N), 0), N)
    rows = tl.where(b <= E, tl.maximum(end - start, 0), 0)
    tiles = (rows + BLOCK_M - 1) // BLOCK_M
    last = tl.cumsum(tiles, 0)  # tiles of buckets 0..b
    bucket = tl.sum((last <= pid_m).to(tl.int32), 0)  # the first bucket whose tiles reach past pid_m
    mine = b == bucket
    first_tile = tl.sum(tl.where(mine, last - tiles, 0), 0)
    row0 = tl.sum(tl.where(mine, start, 0), 0) + (pid_m - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(mine, end, 0), 0)  # 0 past the last bucket: no rows
    has_gemm = bucket < E
    expert = tl.minimum(bucket, E - 1).to(tl.int64)

    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = (offs_m >= row0) & (offs_m < row_end)
    n_ok = offs_n < NC
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * sam + offs_k[None, :] * sak
    b_ptrs = b_ptr + expert * sbe + offs_n[None, :].to(tl.int64) * sbn + offs_k[:, None] * sbk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.where(has_gemm, KD, 0)  # the tail (and programs with no tile) skip the GEMM: 0
    for k0 in range(0, k_end, BLOCK_K):
        k_ok = offs_k < KD - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if GATED:
            w_up = tl.load(b_ptrs + NC * sbn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc_up = tl.dot(a, w_up, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K * sak
        b_ptrs += BLOCK_K * sbk
    if HAS_BIAS:
        bias_row = bias_ptr + expert * sbias_e
        acc += tl.load(bias_row + offs_n, mask=n_ok & has_gemm, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(bias_row + NC + offs_n, mask=n_ok & has_gemm, other=0.0).to(tl.float32)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    row = offs_m[:, None].to(tl.int64)
    if SAVE_PRE:
        width = 2 * NC if GATED else NC
        tl.store(pre_ptr + row * width + offs_n[None, :], acc.to(pre_ptr.dtype.element_ty), mask=mask)
        if GATED:
            tl.store(pre_ptr + row * width + NC + offs_n[None, :], acc_up.to(pre_ptr.dtype.element_ty), mask=mask)
    if ACT >= 0:
        acc = _act_forward(acc, ACT)
    if GATED:
        acc = acc * acc_up
    tl.store(out_ptr + row * NC + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_grad_kernel(
    g_ptr, pre_ptr, gp_ptr, N, NC, sg, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """grad_p (N, 2 NC) = [g * up * act'(gate), g * act(gate)] from pre = [gate, up]."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    mask = (offs_m[:, None] < N) & (offs_n < NC)
    row = offs_m[:, None].to(tl.int64)
    g = tl.load(g_ptr + row * sg + offs_n, mask=mask, other=0.0).to(tl.float32)
    gate_at, up_at = row * 2 * NC + offs_n, row * 2 * NC + NC + offs_n
    gate = tl.load(pre_ptr + gate_at, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(pre_ptr + up_at, mask=mask, other=0.0).to(tl.float32)
    tl.store(gp_ptr + gate_at, (g * up * _act_derivative(gate, ACT)).to(gp_ptr.dtype.element_ty), mask=mask)
    tl.store(gp_ptr + up_at, (g * _act_forward(gate, ACT)).to(gp_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _weight_grad_kernel(
    gp_ptr, x_ptr, offsets_ptr, gw_ptr, gb_ptr, N, NW, K, sgm, sxm, sxk, swe, swn, swk,
    BIAS_GRAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """gw[e] (NW, K) = gp[rows of e]^T @ x[rows of e], stored through gw's strides (swe, swn, swk:
    the weight's own layout); gb[e] = column sums of gp over those rows."""
    e = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    lo = tl.minimum(tl.maximum(tl.load(offsets_ptr + e), 0), N)
    hi = tl.minimum(tl.maximum(tl.load(offsets_ptr + e + 1), lo), N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = offs_n < NW
    k_ok = offs_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    col_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < hi
        rows = offs_m.to(tl.int64)
        gp = tl.load(gp_ptr + rows[None, :] * sgm + offs_n[:, None], mask=n_ok[:, None] & m_ok[None, :], other=0.0)
        x = tl.load(x_ptr + rows[:, None] * sxm + offs_k[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc = tl.dot(gp, x, acc, input_precision=PRECISION)
        if BIAS_GRAD:
            col_sum += tl.sum(gp.to(tl.float32), axis=1)
    out = e.to(tl.int64) * swe + offs_n[:, None].to(tl.int64) * swn + offs_k[None, :].to(tl.int64) * swk
    tl.store(gw_ptr + out, acc.to(gw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])
    if BIAS_GRAD:  # one K block writes the sums: no duplicates
        tl.store(gb_ptr + e.to(tl.int64) * NW + offs_n, col_sum.to(gb_ptr.dtype.element_ty), mask=n_ok & (pid_k == 0))


def _tiles(dtype, gated=False):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the grouped GEMM; see the header.
    fp32 without TF32 runs its dots on FMA units, whose operands sit in registers: 64 x 64 tiles
    spilled 8-32 B on sm_80, 64 x 32 (gated: two of them) compile clean."""
    if _tune.interpreting():
        return 32, 32, 32, 4, 1
    if dtype == torch.float32:
        return 64, 32, 32, 4, 3
    return 64, 64 if gated else 128, 64, 4, 3


def _weight_grad_tiles(dtype):
    """(BLOCK_M rows reduced, BLOCK_N, BLOCK_K, num_warps, num_stages) of the dW kernel: 64 x 64
    outputs (fp32 FMA dots: 32 x 32 reducing 32 rows a step; 64 x 64 spilled 816 B on sm_80)."""
    if _tune.interpreting():
        return 32, 32, 32, 4, 1
    if dtype == torch.float32:
        return 32, 32, 32, 4, 3
    return 64, 64, 64, 4, 3


def _grouped_gemm(a, b, b_strides, offsets, n_cols, *, bias=None, activation="none", save_pre=False):
    """(out (N, n_cols), pre): the grouped kernel's launch over a (N, KD); b_strides (expert,
    output column, reduction), so W[e] read transposed is just other strides."""
    n, kd = a.shape
    gated = activation in GATED_ACT
    act = GATED_ACT.get(activation, activation)
    out = torch.empty(n, n_cols, dtype=a.dtype, device=a.device)
    pre = torch.empty((n, 2 * n_cols if gated else n_cols) if save_pre else (0,), dtype=a.dtype, device=a.device)
    e = b.shape[0]
    if n == 0 or n_cols == 0:
        return out, pre
    if e == 0:  # every row is the dropped tail
        out.zero_()
        pre.zero_()
        return out, pre
    bm, bn, bk, warps, stages = _tiles(a.dtype, gated)
    grid = ((triton.cdiv(n, bm) + e + 1) * triton.cdiv(n_cols, bn),)
    _tune.launch(
        _grouped_gemm_kernel, grid,
        a, b, bias if bias is not None else out, out, pre if save_pre else out, offsets,
        n, e, kd, n_cols, a.stride(0), a.stride(1), *b_strides, bias.stride(0) if bias is not None else 0,
        HAS_BIAS=bias is not None, ACT=ACT_CODES[act] if act != "none" else -1, GATED=gated, SAVE_PRE=save_pre,
        PRECISION=_precision(a.dtype), BLOCK_B=triton.next_power_of_2(e + 2),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )
    return out, pre


def forward(x, weight, offsets, bias, activation="none", save_pre=True):
    """(out, pre), grouped_linear_fwd's schema: pre is kept only with an activation and save_pre."""
    n_cols = weight.shape[1] // 2 if activation in GATED_ACT else weight.shape[1]
    if bias is not None and bias.stride(1) != 1:
        bias = bias.contiguous()
    return _grouped_gemm(x, weight, weight.stride(), offsets, n_cols, bias=bias,
                         activation=activation, save_pre=save_pre and activation != "none")


def backward(grad_out, x, weight, offsets, pre, activation, has_bias):
    """(grad_x, grad_weight, grad_bias), grouped_linear_bwd's schema."""
    n, k = x.shape
    e, nw = weight.shape[:2]
    dev = x.device
    if activation == "none":
        gp = grad_out.contiguous()
    elif activation not in GATED_ACT:  # elementwise: bias_act's backward kernel, grad_out * act'(pre)
        gp, _ = bias_act.backward(grad_out, pre, None, activation)
    else:
        gp = torch.empty(n, nw, dtype=x.dtype, device=dev)
        if n and nw:
            bm, bn = 16, min(triton.next_power_of_2(nw // 2), 128)  # 16 elements a thread (32: spills on sm_86)
            _tune.launch(_gated_grad_kernel, (triton.cdiv(n, bm), triton.cdiv(nw // 2, bn)), grad_out,
                         pre.contiguous(), gp, n, nw // 2, grad_out.stride(0), ACT=ACT_CODES[GATED_ACT[activation]],
                         BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    w_t = (weight.stride(0), weight.stride(2), weight.stride(1))  # B[e, k, nw] = W[e, nw, k]
    grad_x, _ = _grouped_gemm(gp, weight, w_t, offsets, k)
    grad_w = torch.empty_like(weight)  # the weight's own layout (see fastlm.ops.grouped_linear)
    grad_b = torch.empty((e, nw) if has_bias else (0,), dtype=weight.dtype, device=dev)
    if e and nw and (k or has_bias):
        bm, bn, bk, warps, stages = _weight_grad_tiles(x.dtype)
        grid = (e, triton.cdiv(nw, bn), max(triton.cdiv(k, bk), 1))
        _tune.launch(_weight_grad_kernel, grid, gp, x, offsets, grad_w, grad_b if has_bias else grad_w, n, nw, k,
                     gp.stride(0), x.stride(0), x.stride(1), *grad_w.stride(), BIAS_GRAD=has_bias, PRECISION=_precision(x.dtype),
                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return grad_x, grad_w, grad_b
