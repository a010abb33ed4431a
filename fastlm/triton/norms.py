"""Triton kernels for layer_norm / rms_norm with the optional pre-norm residual add.

Forward: a program normalizes BLOCK_M rows, each held whole in registers (BLOCK_N = the
next power of two >= cols), so h = x + residual is read once, written once and normalized
from registers; fp32 mean/rstd per row. Backward: a program walks a run of rows, writing
grad_h and summing grad_weight / grad_bias for its rows in registers; the per-program
partials (programs, cols) are added in a fixed order afterwards (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.triton import _tune


@triton.jit
def _forward_kernel(
    x_ptr, r_ptr, w_ptr, b_ptr, h_ptr, y_ptr, mean_ptr, rstd_ptr, rows, cols, x_stride, r_stride, eps,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, RMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    col_ok = offs_n < cols
    mask = (offs_m[:, None] < rows) & col_ok[None, :]
    row = offs_m[:, None].to(tl.int64)
    h = tl.load(x_ptr + row * x_stride + offs_n[None, :], mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + row * r_stride + offs_n[None, :], mask=mask, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)  # rounded once, as eager's add
        tl.store(h_ptr + row * cols + offs_n[None, :], h, mask=mask)
    z = h.to(tl.float32)
    if RMS:
        centered = z
    else:
        mean = tl.sum(z, axis=1) / cols
        centered = tl.where(mask, z - mean[:, None], 0.0)
        tl.store(mean_ptr + offs_m, mean, mask=offs_m < rows)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / cols + eps)
    tl.store(rstd_ptr + offs_m, rstd, mask=offs_m < rows)
    y = centered * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + row * cols + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    gy_ptr, gs_ptr, h_ptr, w_ptr, mean_ptr, rstd_ptr, gh_ptr, pw_ptr, pb_ptr,
    rows, cols, gy_stride, gs_stride, h_stride, rows_per_prog,
    HAS_GS: tl.constexpr, HAS_W: tl.constexpr, WANT_B: tl.constexpr, RMS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = tl.arange(0, BLOCK_N)
    col_ok = offs_n < cols
    if HAS_W:
        w = tl.load(w_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)
    acc_w = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    start = pid * rows_per_prog
    for i in range(0, rows_per_prog):
        r = start + i
        ok = col_ok & (r < rows)
        r64 = r.to(tl.int64)
        g = tl.load(gy_ptr + r64 * gy_stride + offs_n, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(h_ptr + r64 * h_stride + offs_n, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + r, mask=r < rows, other=0.0)
        if RMS:
            xhat = z * rstd
        else:
            xhat = (z - tl.load(mean_ptr + r, mask=r < rows, other=0.0)) * rstd
        acc_w += g * xhat
        acc_b += g
        gw = g * w if HAS_W else g
        d = gw - xhat * (tl.sum(xhat * gw, axis=0) / cols)
        if not RMS:
            d = d - tl.sum(gw, axis=0) / cols
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


def _programs(device, rows):
    sms = _tune.sm_count(device, cpu_default=2)
    return max(1, min(rows, 4 * sms))


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
    block_n = triton.next_power_of_2(cols)
    block_m = max(1, min(16, 4096 // block_n))
    _tune.launch(
        _forward_kernel, (triton.cdiv(rows, block_m),),
        x2, r2, weight if weight is not None else x2, bias if bias is not None else x2, h if residual is not None else y,
        y, mean if not rms else rstd, rstd, rows, cols, x2.stride(0), r2.stride(0), eps,
        HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, RMS=rms,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4 if block_n <= 4096 else 8,
    )
    return y, h, mean, rstd


def backward(grad_y, grad_sum, h, weight, mean, rstd, rms, bias_grad):
    rows, cols = h.shape
    grad_h = torch.empty((rows, cols), dtype=h.dtype, device=h.device)
    if rows == 0 or cols == 0:
        return (grad_h, h.new_zeros(cols if weight is not None else 0), h.new_zeros(cols if bias_grad else 0))
    g2, h2 = _rows(grad_y), _rows(h)
    gs = _rows(grad_sum) if grad_sum is not None else g2
    progs = _programs(h.device, rows)
    rows_per_prog = triton.cdiv(rows, progs)
    progs = triton.cdiv(rows, rows_per_prog)
    pw = torch.empty((progs, cols) if weight is not None else (1,), dtype=torch.float32, device=h.device)
    pb = torch.empty((progs, cols) if bias_grad else (1,), dtype=torch.float32, device=h.device)
    _tune.launch(
        _backward_kernel, (progs,),
        g2, gs, h2, weight if weight is not None else h2, rstd if rms else mean, rstd, grad_h, pw, pb,
        rows, cols, g2.stride(0), gs.stride(0), h2.stride(0), rows_per_prog,
        HAS_GS=grad_sum is not None, HAS_W=weight is not None, WANT_B=bias_grad, RMS=rms,
        BLOCK_N=triton.next_power_of_2(cols), num_warps=4 if cols <= 4096 else 8,
    )
    gw = pw.sum(0).to(h.dtype) if weight is not None else h.new_empty(0)
    gb = pb.sum(0).to(h.dtype) if bias_grad else h.new_empty(0)
    return grad_h, gw, gb
