"""Triton kernels for fused cross-entropy over (N, C) logits.

Forward: one program per row walks it in BLOCK-column tiles once, keeping the online
(max, sum of exp) and the label-smoothing sum; it writes loss[r] and lse[r] (fp32).
Backward: one program per row recomputes p = exp(x - lse) and writes the gradient. With
class weights their sum (label smoothing's W) is reduced on the device and read by every
program: no host sync (was float(weight.sum()) per backward, a stall of the CPU queue).
Targets out of range are rejected by the caller; should one reach the kernels, its row's
loss is NaN (never a plausible number) and its gradient row 0.
8 warps over a 4096-column tile (16 values an array a thread): at 4 warps the smoothing forward
held 187-202 registers and the sm_90 fp16 backward spilled 4-8 B. AOT (tests/test_triton_aot.py,
50,257 columns): forward 32 registers (90-94 with weights + smoothing), backward 40-59, 0 spills
on sm_80 and sm_90, shared memory <= 4 KB (reduction scratch).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.triton import _tune


@triton.jit
def _forward_kernel(x_ptr, t_ptr, w_ptr, loss_ptr, lse_ptr, cols, x_stride, ignore_index, eps,
                    HAS_W: tl.constexpr, SMOOTH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(t_ptr + row)
    skip = (t == ignore_index) | (t < 0) | (t >= cols)
    x_row = x_ptr + row * x_stride
    m_i = tl.full([], float("-inf"), tl.float32)
    s_i = tl.full([], 0.0, tl.float32)
    limit = tl.where(skip, 0, cols)
    smooth = tl.zeros([BLOCK], dtype=tl.float32)
    wsum = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(0, cols, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        ok = offs < limit
        x = tl.load(x_row + offs, mask=ok, other=float("-inf")).to(tl.float32)
        new_m = tl.maximum(m_i, tl.max(x, 0))
        safe = tl.where(new_m == float("-inf"), 0.0, new_m)
        s_i = s_i * tl.exp(m_i - safe) + tl.sum(tl.exp(x - safe), 0)
        m_i = new_m
        if SMOOTH:
            if HAS_W:
                w = tl.load(w_ptr + offs, mask=ok, other=0.0)
            else:
                w = tl.where(ok, 1.0, 0.0)
            smooth += w * tl.where(ok, x, 0.0)
            wsum += w
    lse = tl.where(skip, 0.0, m_i + tl.log(tl.where(s_i > 0.0, s_i, 1.0)))  # s_i is 0 only on ignored rows
    tt = tl.where(skip, 0, t)
    xt = tl.load(x_row + tt).to(tl.float32)
    wt = 1.0
    if HAS_W:
        wt = tl.load(w_ptr + tt)
    loss = (1.0 - eps) * wt * (lse - xt)
    if SMOOTH:
        loss += eps / cols * (tl.sum(wsum, 0) * lse - tl.sum(smooth, 0))
    out_of_range = skip & (t != ignore_index)
    tl.store(loss_ptr + row, tl.where(out_of_range, float("nan"), tl.where(skip, 0.0, loss)))
    tl.store(lse_ptr + row, tl.where(out_of_range, float("nan"), lse))


@triton.jit
def _backward_kernel(x_ptr, t_ptr, w_ptr, lse_ptr, g_ptr, gx_ptr, wsum_ptr, cols, x_stride, gx_stride, ignore_index,
                     eps, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(t_ptr + row)
    skip = (t == ignore_index) | (t < 0) | (t >= cols)
    out_of_range = skip & (t != ignore_index)  # flagged as the forward does: a NaN row, as the cuda kernel
    tt = tl.where(skip, 0, t)
    g = tl.where(skip, 0.0, tl.load(g_ptr + row))
    wt = 1.0
    weight_sum = cols * 1.0
    if HAS_W:
        wt = tl.load(w_ptr + tt)
        weight_sum = tl.load(wsum_ptr)
    # grad = ca (p - [c == t]) + cb (W p - w); each bracket is exactly 0 where p == 1 and C == 1
    ca = g * (1.0 - eps) * wt
    cb = g * eps / cols
    lse = tl.where(skip, 0.0, tl.load(lse_ptr + row))
    for c0 in range(0, cols, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        ok = offs < cols
        x = tl.load(x_ptr + row * x_stride + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_W:
            w = tl.load(w_ptr + offs, mask=ok, other=0.0)
        else:
            w = 1.0
        p = tl.where(skip, 0.0, tl.exp(x - lse))  # ignored rows: lse is 0
        gx = ca * (p - tl.where(offs == t, 1.0, 0.0)) + cb * (weight_sum * p - w)
        gx = tl.where(out_of_range, float("nan"), gx)
        tl.store(gx_ptr + row * gx_stride + offs, gx.to(gx_ptr.dtype.element_ty), mask=ok)


def _block(cols: int, device: torch.device) -> int:
    cap = 4096 if _tune.on_gpu(device) else 1024  # the interpreter is slow on big tiles
    return min(triton.next_power_of_2(max(cols, 1)), cap)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 or x.shape[1] <= 1 else x.contiguous()


def forward(logits, target, weight, ignore_index: int, label_smoothing: float):
    rows, cols = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss, lse
    x = _rows(logits)
    _tune.launch(
        _forward_kernel, (rows,),
        x, target.contiguous(), weight if weight is not None else x, loss, lse, cols, x.stride(0), ignore_index,
        label_smoothing, HAS_W=weight is not None, SMOOTH=label_smoothing > 0, BLOCK=_block(cols, logits.device), num_warps=8,
    )
    return loss, lse


def backward(grad_loss, logits, target, weight, lse, ignore_index: int, label_smoothing: float):
    rows, cols = logits.shape
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if logits.numel() == 0:
        return grad
    x = _rows(logits)
    weight_sum = weight.sum(dtype=torch.float32) if weight is not None else lse  # on the device: no sync
    _tune.launch(
        _backward_kernel, (rows,),
        x, target.contiguous(), weight if weight is not None else x, lse, grad_loss.contiguous(), grad, weight_sum,
        cols, x.stride(0), cols, ignore_index, label_smoothing,
        HAS_W=weight is not None, BLOCK=_block(cols, logits.device), num_warps=8,
    )
    return grad
