"""Triton kernels for layer_norm / rms_norm with the optional pre-norm residual add.

Rows up to ONE_TILE_MAX (8,192) columns sit whole in registers, warps sized to the tile (one
per 256 elements, 4-16: at most 16 values of each row-sized array a thread).
Forward: a program normalizes BLOCK_M such rows, so h = x + residual is read once, written
once and normalized from registers; fp32 mean/rstd per row. Wider rows: one program per row
walks CHUNK-column tiles twice, merging (mean, M2) chunk by chunk (Chan's update: no
E[z^2] - mean^2 cancellation); h is stored in the first walk and re-read (from L2) in the second.
Backward: a program walks a run of rows, writing grad_h and summing grad_weight / grad_bias for
its rows in registers; the per-program partials (programs, cols) fp32 are then added in a fixed
order (deterministic, no atomics). They are allocated only when wanted and never zero-filled
(every program writes its whole slice). Wider rows: _row_sums_kernel first reduces each row's
sum(xhat * g * w) and sum(g * w) over CHUNK tiles, then the backward runs on a (row runs,
column blocks) grid, each program holding only its CHUNK of the partials: nothing row-sized
lives in registers, at the price of one more read of g and h (5 row-sized transfers, not 3).
Why: the old backward held five row-sized arrays (g, h, w, both partials) over 4-8 warps: 128-155
registers at 4 K columns, 255 and 16-60 B of spills at 16 K, 5-6 KB at 32 K (sm_90, ptxas).
AOT, sm_90 (fp32/fp16/bf16; scripts/triton_aot_sweep.py --modules norms): every config 0 spills;
registers: forward 30-54, backward 40-54 at 4 K, 74-85 at 8 K (16 warps), 32-40 in the chunked
(16 K / 32 K) backward, 40-50 in _row_sums_kernel; shared memory <= 16 KB (reduction scratch).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.triton import _tune


@triton.jit
def _forward_kernel(
    x_ptr, r_ptr, w_ptr, b_ptr, h_ptr, y_ptr, mean_ptr, rstd_ptr, rows, cols, x_stride, r_stride, eps,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, RMS: tl.constexpr, ONE_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row = offs_m[:, None].to(tl.int64)
    row_ok = offs_m[:, None] < rows
    if ONE_TILE:
        offs_n = tl.arange(0, BLOCK_N)
        col_ok = offs_n < cols
        mask = row_ok & col_ok[None, :]
        z = _load_h(x_ptr, r_ptr, h_ptr, row, offs_n, mask, x_stride, r_stride, cols, HAS_RES)
        if RMS:
            centered = z
        else:
            mean = tl.sum(z, axis=1) / cols
            centered = tl.where(mask, z - mean[:, None], 0.0)
            tl.store(mean_ptr + offs_m, mean, mask=offs_m < rows)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / cols + eps)
        tl.store(rstd_ptr + offs_m, rstd, mask=offs_m < rows)
        _store_y(centered * rstd[:, None], w_ptr, b_ptr, y_ptr, row, offs_n, mask, cols, HAS_W, HAS_B)
    else:  # BLOCK_M == 1: walk the row in BLOCK_N chunks twice
        mean = tl.zeros([BLOCK_M], tl.float32)
        m2 = tl.zeros([BLOCK_M], tl.float32)
        for c0 in range(0, cols, BLOCK_N):
            offs_n = c0 + tl.arange(0, BLOCK_N)
            mask = row_ok & (offs_n[None, :] < cols)
            z = _load_h(x_ptr, r_ptr, h_ptr, row, offs_n, mask, x_stride, r_stride, cols, HAS_RES)
            if RMS:
                m2 += tl.sum(z * z, axis=1)
            else:  # Chan: merge this chunk's (count, mean, M2) into the running ones
                n_c = tl.minimum(cols - c0, BLOCK_N).to(tl.float32)
                mean_c = tl.sum(z, axis=1) / n_c
                d_c = tl.where(mask, z - mean_c[:, None], 0.0)
                delta = mean_c - mean
                n_new = c0 + n_c
                mean += delta * (n_c / n_new)
                m2 += tl.sum(d_c * d_c, axis=1) + delta * delta * (c0 * n_c / n_new)
        rstd = 1.0 / tl.sqrt(m2 / cols + eps)
        tl.store(rstd_ptr + offs_m, rstd, mask=offs_m < rows)
        if not RMS:
            tl.store(mean_ptr + offs_m, mean, mask=offs_m < rows)
        if HAS_RES:
            tl.debug_barrier()  # h written above by other threads of this program is read below
        for c0 in range(0, cols, BLOCK_N):
            offs_n = c0 + tl.arange(0, BLOCK_N)
            mask = row_ok & (offs_n[None, :] < cols)
            if HAS_RES:
                z = tl.load(h_ptr + row * cols + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
            else:
                z = tl.load(x_ptr + row * x_stride + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
            if not RMS:
                z = z - mean[:, None]
            _store_y(z * rstd[:, None], w_ptr, b_ptr, y_ptr, row, offs_n, mask, cols, HAS_W, HAS_B)


@triton.jit
def _load_h(x_ptr, r_ptr, h_ptr, row, offs_n, mask, x_stride, r_stride, cols, HAS_RES: tl.constexpr):
    """h = x (+ residual, rounded once as eager's add, and stored) as fp32, 0 outside mask."""
    h = tl.load(x_ptr + row * x_stride + offs_n[None, :], mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + row * r_stride + offs_n[None, :], mask=mask, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * cols + offs_n[None, :], h, mask=mask)
    return h.to(tl.float32)


@triton.jit
def _store_y(y, w_ptr, b_ptr, y_ptr, row, offs_n, mask, cols, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    col_ok = offs_n < cols
    if HAS_W:
        y = y * tl.load(w_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + row * cols + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _xhat(z, r64, ok_row, mean_ptr, rstd_ptr, RMS: tl.constexpr):
    r = r64.to(tl.int32)
    rstd = tl.load(rstd_ptr + r, mask=ok_row, other=0.0)
    if RMS:
        return z * rstd, rstd
    return (z - tl.load(mean_ptr + r, mask=ok_row, other=0.0)) * rstd, rstd


@triton.jit
def _row_sums_kernel(gy_ptr, h_ptr, w_ptr, mean_ptr, rstd_ptr, sums_ptr, cols, gy_stride, h_stride,
                     HAS_W: tl.constexpr, RMS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Wide rows: sum(xhat * g * w) / cols and sum(g * w) / cols of one row, over BLOCK_N chunks."""
    r64 = tl.program_id(0).to(tl.int64)
    acc_xg = tl.zeros([BLOCK_N], tl.float32)
    acc_g = tl.zeros([BLOCK_N], tl.float32)
    for c0 in range(0, cols, BLOCK_N):
        offs_n = c0 + tl.arange(0, BLOCK_N)
        ok = offs_n < cols
        g = tl.load(gy_ptr + r64 * gy_stride + offs_n, mask=ok, other=0.0).to(tl.float32)
        if HAS_W:
            g = g * tl.load(w_ptr + offs_n, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(h_ptr + r64 * h_stride + offs_n, mask=ok, other=0.0).to(tl.float32)
        xhat, _ = _xhat(z, r64, True, mean_ptr, rstd_ptr, RMS)
        acc_xg += tl.where(ok, xhat * g, 0.0)
        acc_g += g
    tl.store(sums_ptr + 2 * r64, tl.sum(acc_xg, axis=0) / cols)
    tl.store(sums_ptr + 2 * r64 + 1, tl.sum(acc_g, axis=0) / cols)


@triton.jit
def _backward_kernel(
    gy_ptr, gs_ptr, h_ptr, w_ptr, mean_ptr, rstd_ptr, sums_ptr, gh_ptr, pw_ptr, pb_ptr,
    rows, cols, gy_stride, gs_stride, h_stride, rows_per_prog,
    HAS_GS: tl.constexpr, HAS_W: tl.constexpr, WANT_B: tl.constexpr, RMS: tl.constexpr,
    SUMS_GIVEN: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """A run of rows over one BLOCK_N column block (the whole row unless SUMS_GIVEN, when the
    row sums come from _row_sums_kernel): grad_h, and this block's dgamma/dbeta partials."""
    pid = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < cols
    acc_w = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    start = pid * rows_per_prog
    for i in range(0, rows_per_prog):
        r = start + i
        ok_row = r < rows
        ok = col_ok & ok_row
        r64 = r.to(tl.int64)
        g = tl.load(gy_ptr + r64 * gy_stride + offs_n, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(h_ptr + r64 * h_stride + offs_n, mask=ok, other=0.0).to(tl.float32)
        xhat, rstd = _xhat(z, r64, ok_row, mean_ptr, rstd_ptr, RMS)
        acc_w += g * xhat
        acc_b += g
        gw = g
        if HAS_W:  # re-read per row (an L1 hit) rather than held: one row-sized array fewer live
            gw = g * tl.load(w_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)
        if SUMS_GIVEN:
            xg = tl.load(sums_ptr + 2 * r64, mask=ok_row, other=0.0)
            gsum = tl.load(sums_ptr + 2 * r64 + 1, mask=ok_row, other=0.0)
        else:
            xg = tl.sum(xhat * gw, axis=0) / cols
            gsum = tl.sum(gw, axis=0) / cols
        d = gw - xhat * xg
        if not RMS:
            d = d - gsum
        d = d * rstd
        if HAS_GS:
            d += tl.load(gs_ptr + r64 * gs_stride + offs_n, mask=ok, other=0.0).to(tl.float32)
        tl.store(gh_ptr + r64 * cols + offs_n, d.to(gh_ptr.dtype.element_ty), mask=ok)
    if HAS_W:
        tl.store(pw_ptr + pid * cols + offs_n, acc_w, mask=col_ok)
    if WANT_B:
        tl.store(pb_ptr + pid * cols + offs_n, acc_b, mask=col_ok)


def _rows(t):
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


ONE_TILE_MAX = 8192  # columns a row may have and still sit whole in registers (16 warps: 16 a thread)
CHUNK = 4096  # column tile of the wide paths


def _widths(device) -> tuple[int, int]:
    """(ONE_TILE_MAX, CHUNK); the interpreter takes the wide paths from 1,025 columns, so CI's
    small shapes run them."""
    return (ONE_TILE_MAX, CHUNK) if _tune.on_gpu(device) else (1024, 256)


def _warps(elements: int) -> int:
    """One warp per 256 elements of a tile, 4 to 16: <= 16 values an array a thread up to 8 K."""
    return min(16, max(4, triton.next_power_of_2(elements) // 256))


def _programs(device, rows, col_blocks):
    sms = _tune.sm_count(device, cpu_default=2)
    return max(1, min(rows, triton.cdiv(4 * sms, col_blocks)))


def forward(x, residual, weight, bias, eps, rms):
    rows, cols = x.shape
    y = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    h = torch.empty((rows, cols) if residual is not None else (0,), dtype=x.dtype, device=x.device)
    mean = torch.empty(0 if rms else rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0 or cols == 0:
        return y, h, mean.fill_(float("nan")), rstd.fill_(float("nan"))
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else x2
    one_tile_max, chunk = _widths(x.device)
    block_n = triton.next_power_of_2(cols)
    one_tile = block_n <= one_tile_max
    block_m = max(1, min(16, 4096 // block_n)) if one_tile else 1
    block_n = block_n if one_tile else chunk
    _tune.launch(
        _forward_kernel, (triton.cdiv(rows, block_m),),
        x2, r2, weight if weight is not None else x2, bias if bias is not None else x2, h if residual is not None else y,
        y, mean if not rms else rstd, rstd, rows, cols, x2.stride(0), r2.stride(0), eps,
        HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, RMS=rms,
        ONE_TILE=one_tile, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_warps(block_m * block_n),
    )
    return y, h, mean, rstd


def backward(grad_y, grad_sum, h, weight, mean, rstd, rms, bias_grad):
    rows, cols = h.shape
    grad_h = torch.empty((rows, cols), dtype=h.dtype, device=h.device)
    if rows == 0 or cols == 0:
        return (grad_h, h.new_zeros(cols if weight is not None else 0), h.new_zeros(cols if bias_grad else 0))
    g2, h2 = _rows(grad_y), _rows(h)
    gs = _rows(grad_sum) if grad_sum is not None else g2
    one_tile_max, chunk = _widths(h.device)
    block_n = triton.next_power_of_2(cols)
    wide = block_n > one_tile_max
    mean_arg = rstd if rms else mean
    sums = rstd  # unused unless wide
    if wide:
        block_n = chunk
        sums = torch.empty((rows, 2), dtype=torch.float32, device=h.device)
        _tune.launch(_row_sums_kernel, (rows,), g2, h2, weight if weight is not None else h2, mean_arg, rstd, sums,
                     cols, g2.stride(0), h2.stride(0), HAS_W=weight is not None, RMS=rms, BLOCK_N=chunk,
                     num_warps=_warps(chunk))
    col_blocks = triton.cdiv(cols, block_n)
    progs = _programs(h.device, rows, col_blocks)
    rows_per_prog = triton.cdiv(rows, progs)
    progs = triton.cdiv(rows, rows_per_prog)
    # per-program partials, only when wanted; every (program, column) is written: no zero fill
    pw = torch.empty((progs, cols) if weight is not None else (1,), dtype=torch.float32, device=h.device)
    pb = torch.empty((progs, cols) if bias_grad else (1,), dtype=torch.float32, device=h.device)
    _tune.launch(
        _backward_kernel, (progs, col_blocks),
        g2, gs, h2, weight if weight is not None else h2, mean_arg, rstd, sums, grad_h, pw, pb,
        rows, cols, g2.stride(0), gs.stride(0), h2.stride(0), rows_per_prog,
        HAS_GS=grad_sum is not None, HAS_W=weight is not None, WANT_B=bias_grad, RMS=rms, SUMS_GIVEN=wide,
        BLOCK_N=block_n, num_warps=_warps(block_n),
    )
    gw = pw.sum(0).to(h.dtype) if weight is not None else h.new_empty(0)
    gb = pb.sum(0).to(h.dtype) if bias_grad else h.new_empty(0)
    return grad_h, gw, gb
