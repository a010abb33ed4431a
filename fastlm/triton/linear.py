"""Triton GEMM with the linear epilogue: y = act(a @ b^T + bias) + residual, one store.

a is (M, K), b is (N, K), both with arbitrary strides, so the same kernel also computes the
backward's dX = grad_p @ W and dW = grad_p^T @ x by passing transposed strides. In the
backward the activation derivative is fused into the A-operand load: A = grad_y * act'(p) is
formed per tile from grad_y and the saved pre-activation p (never stored), and the dW launch
also sums its A rows into grad_bias (programs of the first column block only; deterministic).
fp32 accumulation; fp32 operands use TF32 exactly when torch would (allow_tf32). Autotuned on
GPU per (M, N, K rounded up to powers of two, epilogue), among the configs whose shared memory
fits the device (fastlm/triton/_tune.py); the interpreter (CPU CI) runs one small fixed config.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastlm.triton import _tune
from fastlm.triton.bias_act import ACT_CODES, _act_derivative, _act_forward


def _configs():
    if os.environ.get("TRITON_INTERPRET") == "1":  # at import, as triton.jit decides: not _tune's AOT view
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=4)]
    cfgs = []
    for bm, bn, bk, warps, stages in [
        (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (32, 64, 64, 4, 4),
        # fp32 within the 99 KB of sm_86/89 (RTX 3090/4090, A10, L4, L40S): 64x64 tiles, K steps of
        # 32, 3 stages = 4 B * (3 * (64 + 64 + 64 pre-activation rows) * 32 + 64 * 64) = 90 KB at most
        (64, 64, 32, 4, 3),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                  num_warps=warps, num_stages=stages))
    return cfgs


def _smem(cfg, a):
    """Upper estimate: A and B tiles (and the pre-activation tile of a backward) per pipeline
    stage; the epilogue reuses that memory."""
    kw = cfg.kwargs
    e = a["a_ptr"].element_size()
    rows = kw["BLOCK_M"] * (2 if a["PRO_ACT"] >= 0 else 1) + kw["BLOCK_N"]
    return e * (max(cfg.num_stages, 2) * rows * kw["BLOCK_K"] + kw["BLOCK_M"] * kw["BLOCK_N"])  # + epilogue tile


def _allowed(cfg, a):
    """fp32 tiles over 64x64 spill (1.5-3 KB) and outgrow the estimate above (278528 B measured
    for 128x64x64 on sm_90): they are left to 16-bit operands."""
    return a["a_ptr"].element_size() < 4 or cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] <= 64 * 64


_KEY = ["M_B", "N_B", "K_B", "HAS_BIAS", "HAS_RES", "ACT", "SAVE_Z", "PRO_ACT", "BIAS_GRAD", "PRECISION"]


@_tune.autotune(_configs(), _KEY, _smem, "triton linear GEMM", _allowed)
@triton.jit(do_not_specialize=["M_B", "N_B", "K_B"])
def _gemm_kernel(
    a_ptr, b_ptr, bias_ptr, res_ptr, y_ptr, z_ptr, p_ptr, gb_ptr, M, N, K, M_B, N_B, K_B,
    sam, sak, sbn, sbk, srm, srn, spm, spk,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, SAVE_Z: tl.constexpr,
    PRO_ACT: tl.constexpr, BIAS_GRAD: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped launch order: GROUP_M row-blocks share each column block while it is in L2
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    group = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group
    pid_n = (pid % width) // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * sam + offs_k[None, :] * sak
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * sbn + offs_k[:, None] * sbk
    p_ptrs = p_ptr + offs_m[:, None].to(tl.int64) * spm + offs_k[None, :] * spk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a_mask = (offs_m[:, None] < M) & k_ok[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        if PRO_ACT >= 0:  # A = grad_y * act'(p), rounded to the operand dtype like a stored grad
            p = tl.load(p_ptrs, mask=a_mask, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * _act_derivative(p, PRO_ACT)).to(a_ptr.dtype.element_ty)
            p_ptrs += BLOCK_K * spk
        if BIAS_GRAD:
            row_sum += tl.sum(a.to(tl.float32), axis=1)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * sak
        b_ptrs += BLOCK_K * sbk
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


def gemm(a, a_strides, b, b_strides, M, N, K, *, bias=None, residual=None, activation=None, save_z=False,
         prologue=None, grad_bias=None):
    """act(A @ B^T + bias) + residual as a new (M, N) tensor, and A @ B^T + bias (empty unless save_z).
    A[m, k] = a[m * a_strides[0] + k * a_strides[1]], B[n, k] likewise with b_strides.
    prologue=(p, p_strides, activation): A becomes a * act'(p) tile by tile (activation None: a).
    grad_bias: an (M,) tensor that receives the row sums of A."""
    y = torch.empty((M, N), dtype=a.dtype, device=a.device)
    z = torch.empty((M, N) if save_z else (0,), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        if grad_bias is not None:
            grad_bias.zero_()
        return y, z
    p, p_strides, pro_act = prologue if prologue is not None else (a, (0, 0), None)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _tune.launch(
        _gemm_kernel, grid,
        a, b, bias if bias is not None else y, residual if residual is not None else y, y, z if save_z else y,
        p, grad_bias if grad_bias is not None else y,
        M, N, K, _tune.bucket(M), _tune.bucket(N), _tune.bucket(K), a_strides[0], a_strides[1], b_strides[0], b_strides[1],
        residual.stride(0) if residual is not None else 0, residual.stride(1) if residual is not None else 0,
        p_strides[0], p_strides[1],
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=ACT_CODES[activation] if activation else -1,
        SAVE_Z=save_z, PRO_ACT=ACT_CODES[pro_act] if pro_act else -1, BIAS_GRAD=grad_bias is not None,
        PRECISION=_precision(a.dtype),
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
    """dX = grad_p @ W and dW = grad_p^T @ x, grad_p = grad_y * act'(preact) formed in both GEMMs'
    operand loads (never stored); grad_bias summed inside the dW launch. No copies: strides."""
    M, N = grad_y.shape
    K = x.shape[1]
    act = None if activation == "none" else activation
    if K == 0:  # no dW launch to sum grad_bias in; the bias_act kernel does it
        from fastlm.triton import bias_act as ba

        gp, gb = ba.backward(grad_y, preact, torch.zeros_like(bias), act) if act and bias is not None else (grad_y, None)
        gb = gb if gb is not None else (gp.sum(0) if bias is not None else grad_y.new_empty(0))
        return x.new_zeros(x.shape), weight.new_zeros(weight.shape), gb
    gs, ps = grad_y.stride(), preact.stride() if act else (0, 0)
    p = preact if act else grad_y
    gx, _ = gemm(grad_y, gs, weight, weight.stride()[::-1], M, K, N, prologue=(p, ps, act))
    gb = torch.empty(N if bias is not None else 0, dtype=grad_y.dtype, device=grad_y.device)
    gw, _ = gemm(grad_y, gs[::-1], x, x.stride()[::-1], N, K, M, prologue=(p, ps[::-1], act),
                 grad_bias=gb if bias is not None else None)
    return gx, gw, gb
