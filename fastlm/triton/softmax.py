"""Triton kernels for softmax / log_softmax of (scale * x + mask) over the last dim.

Rows up to ONE_TILE_MAX columns (16,384 on GPU) are read from DRAM once and held in registers
(one tile per row): max, sum of exp and the write all come from the same registers. A program
owns ROWS such rows as a 2-D (ROWS, BLOCK) tile, ROWS sized so it moves ~16 KB (fp32 128 cols:
32 rows; fp16 128 cols: 64 rows), and num_warps is sized to the tile (one warp per 1,024
elements, 1-16; Triton's blocked layout then puts BLOCK / 4 threads on a row, so a 32-col row
takes 8 threads and a warp covers 4 rows). Before, a 4-warp program per row left short rows
(<= 256 cols: 128 threads for <= 256 elements) mostly idle and launch-bound. Fewer rows a program
when the grid would leave SMs idle (down to ~4 KB moved per program).
Longer rows walk BLOCK-column tiles twice: an online (max, sum of exp), then the write; the
second read mostly hits L2 (a program re-reads the row it just read). The backward has the same
two shapes: sum(y * g) (or sum(g) for log_softmax) and grad_x from one register tile, or two
walks. Every program's tile: <= 16,384 fp32 values over >= 4 warps (<= 32 a thread at 16 warps).
NaN / +inf: whatever the max makes of a NaN, exp(z - max) is NaN at that entry (and inf - inf
is NaN at a +inf one), so the row's sum and then the whole row are NaN, as torch's softmax;
a fully masked row (max -inf, sum 0) gives 0 (-inf for log) and grads 0.
AOT (tests/test_triton_aot.py; sm_80 / sm_90, fp32 and 16-bit), every config 0 spills, shared
memory <= 4 KB (reduction scratch): 128 cols, 16-64 rows a program, 64-88 registers; 4096 cols
55-80; 16384 cols at 16 warps 58-90; 50257 cols (two walks) 64-121 (before: 64-72 at 4096 cols,
the only width compiled).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.triton import _tune


@triton.jit
def _load_z(x_rows, m_rows, offs, valid, scale, MASK: tl.constexpr):
    """(ROWS, BLOCK) of scale * x + mask, -inf past each row's valid length."""
    ok = offs[None, :] < valid
    z = tl.load(x_rows + offs[None, :], mask=ok, other=0.0).to(tl.float32) * scale
    if MASK == 1:
        keep = tl.load(m_rows + offs[None, :], mask=ok, other=0).to(tl.int32) != 0
        z = tl.where(keep, z, float("-inf"))
    if MASK == 2:
        z += tl.load(m_rows + offs[None, :], mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, z, float("-inf"))


@triton.jit
def _forward_kernel(
    x_ptr, m_ptr, y_ptr, rows, cols, x_stride, y_stride, mask_rows, causal_rows, scale,
    MASK: tl.constexpr, LOG: tl.constexpr, CAUSAL: tl.constexpr, ONE_TILE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = row < rows
    x_rows = x_ptr + row[:, None] * x_stride
    y_rows = y_ptr + row[:, None] * y_stride
    m_rows = m_ptr + (row % mask_rows)[:, None] * cols
    valid = tl.where(row_ok, cols, 0)
    if CAUSAL:
        valid = tl.minimum(valid, row % causal_rows + 1)
    valid = valid[:, None]
    if ONE_TILE:  # the row is one register tile: read once
        offs = tl.arange(0, BLOCK)
        z = _load_z(x_rows, m_rows, offs, valid, scale, MASK)
        m_i = tl.max(z, 1)
        safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        e = tl.exp(z - safe[:, None])
        s_i = tl.sum(e, 1)
    else:
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        s_i = tl.zeros([ROWS], tl.float32)
        for c0 in range(0, cols, BLOCK):
            z = _load_z(x_rows, m_rows, c0 + tl.arange(0, BLOCK), valid, scale, MASK)
            new_m = tl.maximum(m_i, tl.max(z, 1))
            safe = tl.where(new_m == float("-inf"), 0.0, new_m)
            s_i = s_i * tl.exp(m_i - safe) + tl.sum(tl.exp(z - safe[:, None]), 1)
            m_i = new_m
        safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    nonempty = s_i != 0.0  # 0: every entry masked; a NaN or +inf entry makes s_i NaN, which propagates
    lse = (safe + tl.log(tl.where(nonempty, s_i, 1.0)))[:, None]
    inv = (1.0 / tl.where(nonempty, s_i, 1.0))[:, None]
    nonempty = nonempty[:, None]
    if ONE_TILE:
        if LOG:
            y = tl.where(nonempty, z - lse, float("-inf"))
        else:
            y = tl.where(nonempty, e * inv, 0.0)
        tl.store(y_rows + offs[None, :], y.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs[None, :] < cols))
    else:
        for c0 in range(0, cols, BLOCK):
            offs = c0 + tl.arange(0, BLOCK)
            z = _load_z(x_rows, m_rows, offs, valid, scale, MASK)
            if LOG:
                y = tl.where(nonempty, z - lse, float("-inf"))
            else:
                y = tl.where(nonempty, tl.exp(z - safe[:, None]) * inv, 0.0)
            tl.store(y_rows + offs[None, :], y.to(y_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & (offs[None, :] < cols))


@triton.jit
def _load_gy(g_rows, y_rows, offs, ok):
    g = tl.load(g_rows + offs[None, :], mask=ok, other=0.0).to(tl.float32)
    y = tl.load(y_rows + offs[None, :], mask=ok, other=0.0).to(tl.float32)
    return g, y


@triton.jit
def _grad_x(g, y, dot, scale, LOG: tl.constexpr):
    if LOG:
        gx = tl.where(y > float("-inf"), scale * (g - tl.exp(y) * dot), 0.0)
    else:
        gx = scale * y * (g - dot)
    return gx


@triton.jit
def _backward_kernel(g_ptr, y_ptr, gx_ptr, rows, cols, g_stride, y_stride, gx_stride, scale,
                     LOG: tl.constexpr, ONE_TILE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = (row < rows)[:, None]
    g_rows, y_rows, gx_rows = g_ptr + row[:, None] * g_stride, y_ptr + row[:, None] * y_stride, gx_ptr + row[:, None] * gx_stride
    if ONE_TILE:
        offs = tl.arange(0, BLOCK)
        ok = row_ok & (offs[None, :] < cols)
        g, y = _load_gy(g_rows, y_rows, offs, ok)
        dot = tl.sum(tl.where(y > float("-inf"), g, 0.0) if LOG else g * y, 1)[:, None]
        tl.store(gx_rows + offs[None, :], _grad_x(g, y, dot, scale, LOG).to(gx_ptr.dtype.element_ty), mask=ok)
    else:
        acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for c0 in range(0, cols, BLOCK):
            offs = c0 + tl.arange(0, BLOCK)
            g, y = _load_gy(g_rows, y_rows, offs, row_ok & (offs[None, :] < cols))
            if LOG:
                acc += tl.where(y > float("-inf"), g, 0.0)
            else:
                acc += g * y
        dot = tl.sum(acc, 1)[:, None]
        for c0 in range(0, cols, BLOCK):
            offs = c0 + tl.arange(0, BLOCK)
            ok = row_ok & (offs[None, :] < cols)
            g, y = _load_gy(g_rows, y_rows, offs, ok)
            tl.store(gx_rows + offs[None, :], _grad_x(g, y, dot, scale, LOG).to(gx_ptr.dtype.element_ty), mask=ok)


def _rows(t: torch.Tensor) -> torch.Tensor:
    v = t.reshape(-1, t.shape[-1])
    return v if v.stride(1) == 1 or v.shape[1] <= 1 else v.contiguous()


ONE_TILE_MAX = 16384  # columns held in registers as one tile on GPU (fp32: 32 a thread at 16 warps)
PROGRAM_BYTES = 16384  # what a program of short rows moves (reads of x)
MAX_ELEMENTS = 8192  # values per program tile of short rows


def _plan(rows: int, cols: int, elem: int, device: torch.device) -> dict:
    """ONE_TILE, ROWS, BLOCK and num_warps for a (rows, cols) launch (see the header)."""
    gpu = _tune.on_gpu(device)
    block = triton.next_power_of_2(max(cols, 1))
    one_tile = block <= (ONE_TILE_MAX if gpu else 1024)  # the interpreter is slow on big tiles
    if not one_tile:
        block = 4096 if gpu else 1024
    per_prog = 1
    if one_tile:
        per_prog = max(1, min(PROGRAM_BYTES // (block * elem), MAX_ELEMENTS // block,
                              triton.next_power_of_2(rows)))
        programs_wanted = 2 * _tune.sm_count(device)
        while per_prog > 1 and triton.cdiv(rows, per_prog) < programs_wanted and per_prog * block * elem > 4096:
            per_prog //= 2
    warps = min(16, max(1, triton.next_power_of_2(per_prog * block) // 1024))
    return dict(ONE_TILE=one_tile, ROWS=per_prog, BLOCK=block, num_warps=max(warps, 4 if block >= 1024 else 1))


def forward(x, mask, scale: float, causal_rows: int, log: bool) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    x2 = _rows(x)
    rows, cols = x2.shape
    kind = 0 if mask is None else (1 if mask.dtype == torch.bool else 2)
    m = x2 if mask is None else (mask.view(torch.uint8) if kind == 1 else mask)
    plan = _plan(rows, cols, x.element_size(), x.device)
    _tune.launch(
        _forward_kernel, (triton.cdiv(rows, plan["ROWS"]),),
        x2, m, y, rows, cols, x2.stride(0), cols, 1 if mask is None else mask.shape[0], max(causal_rows, 1), scale,
        MASK=kind, LOG=log, CAUSAL=causal_rows > 0, **plan,
    )
    return y


def backward(grad_y, y, scale: float, log: bool) -> torch.Tensor:
    gx = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if y.numel() == 0:
        return gx
    g2, y2 = _rows(grad_y), _rows(y)
    rows, cols = y2.shape
    plan = _plan(rows, cols, 2 * y.element_size(), y.device)  # reads g and y
    _tune.launch(_backward_kernel, (triton.cdiv(rows, plan["ROWS"]),), g2, y2, gx, rows, cols, g2.stride(0),
                 y2.stride(0), cols, scale, LOG=log, **plan)
    return gx
