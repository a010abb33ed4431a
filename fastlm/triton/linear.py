"""Triton GEMM with the linear epilogue: y = act(a @ b^T + bias) + residual, one store.

a is (M, K), b is (N, K), both with arbitrary strides, so the same kernel also computes the
backward's dX = grad_z @ W and dW = grad_z^T @ x by passing transposed strides. fp32
accumulation; fp32 operands use TF32 exactly when torch would (allow_tf32). Autotuned on GPU;
the interpreter (CPU CI) runs one small fixed config.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastlm.triton.bias_act import ACT_CODES, _act_forward

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4)]
    cfgs = []
    for bm, bn, bk, warps, stages in [
        (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (32, 64, 64, 4, 4),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                  num_warps=warps, num_stages=stages))
    return cfgs


@triton.autotune(configs=_configs(), key=["M", "N", "K", "HAS_BIAS", "HAS_RES", "ACT", "SAVE_Z", "PRECISION"])
@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, bias_ptr, res_ptr, y_ptr, z_ptr, M, N, K,
    sam, sak, sbn, sbk, srm, srn,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, SAVE_Z: tl.constexpr,
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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * sak
        b_ptrs += BLOCK_K * sbk
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    if SAVE_Z:
        tl.store(z_ptr + out, acc.to(z_ptr.dtype.element_ty), mask=mask)
        acc = acc.to(z_ptr.dtype.element_ty).to(tl.float32)  # the backward sees this rounding too
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if ACT >= 0:
        acc = _act_forward(acc, ACT)
    if HAS_RES:
        acc += tl.load(res_ptr + offs_m[:, None].to(tl.int64) * srm + offs_n[None, :] * srn, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _precision(dtype):
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def gemm(a, a_strides, b, b_strides, M, N, K, *, bias=None, residual=None, activation=None, save_z=False, out_dtype=None):
    """act(A @ B^T + bias) + residual as a new (M, N) tensor, and A @ B^T (empty unless save_z).
    A[m, k] = a[m * a_strides[0] + k * a_strides[1]], B[n, k] likewise with b_strides."""
    dtype = out_dtype or a.dtype
    y = torch.empty((M, N), dtype=dtype, device=a.device)
    z = torch.empty((M, N) if save_z else (0,), dtype=dtype, device=a.device)
    if M == 0 or N == 0:
        return y, z
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _gemm_kernel[grid](
        a, b, bias if bias is not None else y, residual if residual is not None else y, y, z if save_z else y,
        M, N, K, a_strides[0], a_strides[1], b_strides[0], b_strides[1],
        residual.stride(0) if residual is not None else 0, residual.stride(1) if residual is not None else 0,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=ACT_CODES[activation] if activation else -1,
        SAVE_Z=save_z, PRECISION=_precision(a.dtype),
    )
    return y, z


def forward(x, weight, bias, residual, activation, save_preact):
    M, K = x.shape
    N = weight.shape[0]
    return gemm(x, x.stride(), weight, weight.stride(), M, N, K, bias=bias, residual=residual,
                activation=activation, save_z=save_preact)


def backward_gemms(grad_z, x, weight):
    """dX = grad_z @ W and dW = grad_z^T @ x with the same kernel, by strides (no copies)."""
    M, N = grad_z.shape
    K = x.shape[1]
    gx, _ = gemm(grad_z, grad_z.stride(), weight, weight.stride()[::-1], M, K, N)
    gw, _ = gemm(grad_z, grad_z.stride()[::-1], x, x.stride()[::-1], N, K, M)
    return gx, gw
