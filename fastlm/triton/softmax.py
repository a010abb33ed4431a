"""Triton kernels for softmax / log_softmax of (scale * x + mask) over the last dim.

One program per row walks it in BLOCK-column tiles twice: first an online (max, sum of exp)
across tiles, then the write. Rows of any length (262,144 columns and more) take the same path;
short rows are a single tile. The backward reduces sum(y * g) (or sum(g) for log_softmax) in
one walk and writes grad_x in the second.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.triton import _tune


@triton.jit
def _load_z(x_row, m_row, offs, valid, scale, MASK: tl.constexpr):
    ok = offs < valid
    z = tl.load(x_row + offs, mask=ok, other=0.0).to(tl.float32) * scale
    if MASK == 1:
        keep = tl.load(m_row + offs, mask=ok, other=0).to(tl.int32) != 0
        z = tl.where(keep, z, float("-inf"))
    if MASK == 2:
        z += tl.load(m_row + offs, mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, z, float("-inf"))


@triton.jit
def _forward_kernel(
    x_ptr, m_ptr, y_ptr, cols, x_stride, y_stride, mask_rows, causal_rows, scale,
    MASK: tl.constexpr, LOG: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    m_row = m_ptr + (row % mask_rows) * cols
    valid = cols
    if CAUSAL:
        valid = tl.minimum(cols, row % causal_rows + 1)
    m_i = tl.full([], float("-inf"), tl.float32)
    s_i = tl.full([], 0.0, tl.float32)
    for c0 in range(0, cols, BLOCK):
        z = _load_z(x_row, m_row, c0 + tl.arange(0, BLOCK), valid, scale, MASK)
        new_m = tl.maximum(m_i, tl.max(z, 0))
        safe = tl.where(new_m == float("-inf"), 0.0, new_m)
        s_i = s_i * tl.exp(m_i - safe) + tl.sum(tl.exp(z - safe), 0)
        m_i = new_m
    safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    nonempty = s_i != 0.0  # 0: every entry masked; a NaN or +inf entry makes s_i NaN, which propagates
    lse = safe + tl.log(tl.where(nonempty, s_i, 1.0))
    inv = 1.0 / tl.where(nonempty, s_i, 1.0)
    for c0 in range(0, cols, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        z = _load_z(x_row, m_row, offs, valid, scale, MASK)
        if LOG:
            y = tl.where(nonempty, z - lse, float("-inf"))
        else:
            y = tl.where(nonempty, tl.exp(z - safe) * inv, 0.0)
        tl.store(y_ptr + row * y_stride + offs, y.to(y_ptr.dtype.element_ty), mask=offs < cols)


@triton.jit
def _load_gy(g_row, y_row, offs, cols):
    ok = offs < cols
    g = tl.load(g_row + offs, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(y_row + offs, mask=ok, other=0.0).to(tl.float32)
    return g, y


@triton.jit
def _backward_kernel(g_ptr, y_ptr, gx_ptr, cols, g_stride, y_stride, gx_stride, scale,
                     LOG: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(0, cols, BLOCK):
        g, y = _load_gy(g_ptr + row * g_stride, y_ptr + row * y_stride, c0 + tl.arange(0, BLOCK), cols)
        if LOG:
            acc += tl.where(y > float("-inf"), g, 0.0)
        else:
            acc += g * y
    dot = tl.sum(acc, 0)
    for c0 in range(0, cols, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        g, y = _load_gy(g_ptr + row * g_stride, y_ptr + row * y_stride, offs, cols)
        if LOG:
            gx = tl.where(y > float("-inf"), scale * (g - tl.exp(y) * dot), 0.0)
        else:
            gx = scale * y * (g - dot)
        tl.store(gx_ptr + row * gx_stride + offs, gx.to(gx_ptr.dtype.element_ty), mask=offs < cols)


def _rows(t: torch.Tensor) -> torch.Tensor:
    v = t.reshape(-1, t.shape[-1])
    return v if v.stride(1) == 1 or v.shape[1] <= 1 else v.contiguous()


def _block(cols: int, device: torch.device) -> int:
    cap = 4096 if _tune.on_gpu(device) else 1024  # the interpreter is slow on big tiles
    return min(triton.next_power_of_2(max(cols, 1)), cap)


def forward(x, mask, scale: float, causal_rows: int, log: bool) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    x2 = _rows(x)
    rows, cols = x2.shape
    kind = 0 if mask is None else (1 if mask.dtype == torch.bool else 2)
    m = x2 if mask is None else (mask.view(torch.uint8) if kind == 1 else mask)
    _tune.launch(
        _forward_kernel, (rows,),
        x2, m, y, cols, x2.stride(0), cols, 1 if mask is None else mask.shape[0], max(causal_rows, 1), scale,
        MASK=kind, LOG=log, CAUSAL=causal_rows > 0, BLOCK=_block(cols, x.device),
    )
    return y


def backward(grad_y, y, scale: float, log: bool) -> torch.Tensor:
    gx = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if y.numel() == 0:
        return gx
    g2, y2 = _rows(grad_y), _rows(y)
    rows, cols = y2.shape
    _tune.launch(_backward_kernel, (rows,), g2, y2, gx, cols, g2.stride(0), y2.stride(0), cols, scale,
                              LOG=log, BLOCK=_block(cols, y.device))
    return gx
