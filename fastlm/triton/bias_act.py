"""Triton kernels for bias_act: y = act(x + bias), grad_x = grad_y * act'(x + bias), grad_bias.

Memory-bound: a program owns a (BLOCK_M, BLOCK_N) tile, loads the bias slice once, and keeps
the math in fp32 registers. The backward walks a column strip down a run of rows, summing
grad_bias in registers; per-strip partials (splits, cols) are then added in a fixed order,
so the result is deterministic without atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.triton import _tune

ACT_CODES = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3}


@triton.jit
def _tanh(u):
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def _act_forward(z, ACT: tl.constexpr):
    if ACT == 0:
        y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 1:
        y = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACT == 2:
        y = tl.where(z < 0.0, 0.0, z)
    else:
        y = z * tl.sigmoid(z)
    return y


@triton.jit
def _act_derivative(z, ACT: tl.constexpr):
    if ACT == 0:
        d = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 1:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        d = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif ACT == 2:
        d = tl.where(z <= 0.0, 0.0, 1.0)
    else:
        s = tl.sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    return d


@triton.jit
def _forward_kernel(
    x_ptr, b_ptr, y_ptr, rows, cols, x_stride, y_stride,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < rows) & (offs_n[None, :] < cols)
    row = offs_m[:, None].to(tl.int64)
    z = tl.load(x_ptr + row * x_stride + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + offs_n, mask=offs_n < cols, other=0.0).to(tl.float32)[None, :]
    y = _act_forward(z, ACT)
    tl.store(y_ptr + row * y_stride + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    gy_ptr, x_ptr, b_ptr, gx_ptr, partial_ptr, rows, cols, gy_stride, x_stride, gx_stride, rows_per_split,
    HAS_BIAS: tl.constexpr, SUM_COLS: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    split = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < cols
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m0 in range(0, rows_per_split, BLOCK_M):
        offs_m = split * rows_per_split + m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m[:, None] < rows) & col_ok[None, :]
        row = offs_m[:, None].to(tl.int64)
        z = tl.load(x_ptr + row * x_stride + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += b[None, :]
        gy = tl.load(gy_ptr + row * gy_stride + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        g = gy * _act_derivative(z, ACT)
        tl.store(gx_ptr + row * gx_stride + offs_n[None, :], g.to(gx_ptr.dtype.element_ty), mask=mask)
        if SUM_COLS:
            acc += tl.sum(tl.where(mask, g, 0.0), axis=0)
    if SUM_COLS:
        tl.store(partial_ptr + split * cols + offs_n, acc, mask=col_ok)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(rows, cols) view with unit column stride; copies only when no such view exists."""
    v = t.reshape(-1, t.shape[-1] if t.dim() else 1)
    return v if v.stride(1) == 1 or v.shape[1] <= 1 else v.contiguous()


def _blocks(cols: int) -> tuple[int, int]:
    block_n = min(triton.next_power_of_2(max(cols, 1)), 1024)
    return max(1, 4096 // block_n), block_n


def forward(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    x2 = _rows(x)
    rows, cols = x2.shape
    block_m, block_n = _blocks(cols)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))
    _tune.launch(
        _forward_kernel, grid,
        x2, bias if bias is not None else x2, y, rows, cols, x2.stride(0), cols,
        HAS_BIAS=bias is not None, ACT=ACT_CODES[activation], BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return y


def backward(grad_out, x, bias, activation, sum_columns=None):
    """(grad_x, grad_bias): grad_bias holds grad_x's column sums when sum_columns (default: when
    there is a bias; linear's backward asks for them without one: its pre-activation has the
    bias added already)."""
    sum_columns = bias is not None if sum_columns is None else sum_columns
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    cols = x.shape[-1] if x.dim() else 1
    grad_bias = x.new_zeros(cols if sum_columns else 0)
    if x.numel() == 0:
        return grad_x, grad_bias
    g2, x2 = _rows(grad_out), _rows(x)
    rows = x2.shape[0]
    block_m, block_n = _blocks(cols)
    col_blocks = triton.cdiv(cols, block_n)
    # Enough (split, strip) programs for ~4 per SM; each split covers whole BLOCK_M runs.
    splits = max(1, min(triton.cdiv(rows, block_m), triton.cdiv(4 * _tune.sm_count(x.device), col_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), block_m) * block_m
    splits = triton.cdiv(rows, rows_per_split)
    partial = torch.empty((splits, cols) if sum_columns else (1,), dtype=torch.float32, device=x.device)
    _tune.launch(
        _backward_kernel, (splits, col_blocks),
        g2, x2, bias if bias is not None else x2, grad_x, partial, rows, cols,
        g2.stride(0), x2.stride(0), cols, rows_per_split,
        HAS_BIAS=bias is not None, SUM_COLS=sum_columns, ACT=ACT_CODES[activation], BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
    if sum_columns:
        grad_bias = partial.sum(0).to(x.dtype)
    return grad_x, grad_bias
