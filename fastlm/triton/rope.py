"""Triton kernel for rotary position embedding applied to q and k in one pass (forward and inverse).

For each token (b, t) and frequency i < R/2 a pair (x1, x2) of every q and k head is rotated:
y1 = x1*c - x2*s, y2 = x2*c + x1*s, with (c, s) = (cos, sin) * scale read from tables
(cos/sin: (Bc, T, R/2), Bc = 1 broadcast over the batch) or computed from positions and
inv_freq (angle = float(position) * inv_freq[i] in fp32). Pairs are (i, i + R/2) in the
rotate-half layout, (2i, 2i + 1) interleaved. The inverse (the backward: a rotation's gradient is
the inverse rotation) negates s. Elements R..D-1 are copied unchanged. Math in fp32, one rounding.

Launch: one kernel for q and k, grid (cdiv(B*T, BLOCK_T),) on axis 0 only. A program owns BLOCK_T
tokens, gets their (c, s) once into registers, (BLOCK_T, 1, R/2), then walks the Hq heads of q and
the Hk heads of k in (BLOCK_T, BLOCK_H, pairs) tiles, loading and storing through the tensors'
own strides (HF's transposed (B, T, H*D) views included). Offsets are int64.

Why it is fast: the op is memory-bound; each token moves 2*(Hq+Hk)*D*elem_size bytes (read +
write, e.g. 20 KB for Hq=32, Hk=8, D=128 in bf16), while its R/2 (cos, sin) pairs are computed
(or read: R*elem_size bytes) once and reused across all Hq+Hk heads: 6 FLOP a pair, plus an
accurate fp32 sincos (some 40 instructions) a token and frequency shared by the 40 heads of that
example, stays far under the memory time. Rotate-half loads two contiguous R/2 runs; the
interleaved layout loads one contiguous run of R and splits it in registers (reshape + split, no
strided access), so both issue vector loads (no shared memory, no layout conversion in the
compiled kernel). Tiles hold about 2048 elements (8 a thread at 8 warps); BLOCK_T tokens are
taken while the grid keeps ~4 programs per SM, so a short batch (decode) gets one token a
program. (4096-element decode tiles spilled 4 B on sm_90 around the sincos slow path, so no.)
Tile sizes come from a heuristic on power-of-two-rounded sizes; no autotune, no re-tune per length.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.triton import _tune

TILE_ELEMENTS = 2048  # elements of one (BLOCK_T, BLOCK_H, head) tile: 8 per thread at 8 warps


@triton.jit
def _rotate_heads(x_ptr, y_ptr, x_tok, y_tok, tok_ok, c, s, H, sxh, sxd, syh, syd,
                  INTERLEAVED: tl.constexpr, HALF: tl.constexpr, ROT: tl.constexpr, D: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
                  BLOCK_REST: tl.constexpr):
    """Rotates the H heads of x (token offsets x_tok: (BLOCK_T, 1, 1) int64) into y with c, s:
    (BLOCK_T, 1, BLOCK_P) fp32."""
    offs_h = tl.arange(0, BLOCK_H)[None, :, None]
    offs_p = tl.arange(0, BLOCK_P)[None, None, :]
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + offs_h
        row_ok = tok_ok & (hh < H)  # (BLOCK_T, BLOCK_H, 1)
        hh64 = hh.to(tl.int64)
        x_row = x_ptr + (x_tok + hh64 * sxh)
        y_row = y_ptr + (y_tok + hh64 * syh)
        if INTERLEAVED:
            # one contiguous run of ROT elements, split into (even, odd) in registers
            offs_e = tl.arange(0, 2 * BLOCK_P)[None, None, :]
            mask = row_ok & (offs_e < ROT)
            x = tl.load(x_row + offs_e * sxd, mask=mask, other=0.0).to(tl.float32)
            x1, x2 = tl.split(tl.reshape(x, (BLOCK_T, BLOCK_H, BLOCK_P, 2)))
            y1 = x1 * c - x2 * s
            y2 = x2 * c + x1 * s
            y = tl.reshape(tl.join(y1, y2), (BLOCK_T, BLOCK_H, 2 * BLOCK_P))
            tl.store(y_row + offs_e * syd, y.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            mask = row_ok & (offs_p < HALF)
            x1 = tl.load(x_row + offs_p * sxd, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_row + (offs_p + HALF) * sxd, mask=mask, other=0.0).to(tl.float32)
            y1 = x1 * c - x2 * s
            y2 = x2 * c + x1 * s
            tl.store(y_row + offs_p * syd, y1.to(y_ptr.dtype.element_ty), mask=mask)
            tl.store(y_row + (offs_p + HALF) * syd, y2.to(y_ptr.dtype.element_ty), mask=mask)
        if BLOCK_REST > 0:  # partial rotary: the tail is copied as is
            offs_r = ROT + tl.arange(0, BLOCK_REST)[None, None, :]
            rmask = row_ok & (offs_r < D)
            v = tl.load(x_row + offs_r * sxd, mask=rmask)
            tl.store(y_row + offs_r * syd, v, mask=rmask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, pos_ptr, freq_ptr,
    n_tokens, T, Hq, Hk,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d,
    sqo_b, sqo_h, sqo_t, sqo_d, sko_b, sko_h, sko_t, sko_d,
    sc_b, sc_t, sc_p, ss_b, ss_t, ss_p, sp_b, sp_t,
    c_scale, s_scale,
    TABLES: tl.constexpr, INTERLEAVED: tl.constexpr, HALF: tl.constexpr, ROT: tl.constexpr,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_REST: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None, None]
    tok_ok = tok < n_tokens
    b = tok // T
    t = tok - b * T
    offs_p = tl.arange(0, BLOCK_P)[None, None, :]
    p_ok = tok_ok & (offs_p < HALF)
    # (c, s) for this program's tokens, once: (BLOCK_T, 1, BLOCK_P) fp32
    if TABLES:
        c = tl.load(cos_ptr + b * sc_b + t * sc_t + offs_p * sc_p, mask=p_ok, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + b * ss_b + t * ss_t + offs_p * ss_p, mask=p_ok, other=0.0).to(tl.float32)
    else:
        pos = tl.load(pos_ptr + b * sp_b + t * sp_t, mask=tok_ok, other=0).to(tl.float32)
        angle = pos * tl.load(freq_ptr + offs_p, mask=offs_p < HALF, other=0.0)
        # Accurate sin/cos (full range reduction), not the sin.approx/cos.approx intrinsics: angles
        # reach ~1e5 rad at long positions, where the approximate ones lose every digit.
        c = tl.cos(angle)
        s = tl.sin(angle)
    c = c * c_scale
    s = s * s_scale  # s_scale = -scale for the inverse rotation
    _rotate_heads(q_ptr, qo_ptr, b * sq_b + t * sq_t, b * sqo_b + t * sqo_t, tok_ok, c, s, Hq,
                  sq_h, sq_d, sqo_h, sqo_d, INTERLEAVED, HALF, ROT, D, BLOCK_T, BLOCK_HQ, BLOCK_P, BLOCK_REST)
    _rotate_heads(k_ptr, ko_ptr, b * sk_b + t * sk_t, b * sko_b + t * sko_t, tok_ok, c, s, Hk,
                  sk_h, sk_d, sko_h, sko_d, INTERLEAVED, HALF, ROT, D, BLOCK_T, BLOCK_HK, BLOCK_P, BLOCK_REST)


def _floor_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _blocks(n_tokens: int, hq: int, hk: int, rot: int, d: int, device: torch.device):
    """(BLOCK_T, BLOCK_HQ, BLOCK_HK, BLOCK_P, BLOCK_REST, num_warps) from power-of-two-rounded sizes."""
    block_p = triton.next_power_of_2(max(rot // 2, 1))
    block_rest = triton.next_power_of_2(d - rot) if d > rot else 0
    width = 2 * block_p + block_rest  # elements of one head in a tile
    heads = _floor_pow2(max(1, TILE_ELEMENTS // width))
    block_hq = min(triton.next_power_of_2(max(hq, 1)), heads)
    block_hk = min(triton.next_power_of_2(max(hk, 1)), heads)
    block_t = _floor_pow2(max(1, TILE_ELEMENTS // (width * max(block_hq, block_hk))))
    # keep ~4 programs per SM: short batches (decode) get one token a program
    target = 4 * _tune.sm_count(device)
    while block_t > 1 and triton.cdiv(n_tokens, block_t) < target:
        block_t //= 2
    elements = block_t * max(block_hq, block_hk) * width
    num_warps = _floor_pow2(max(1, min(8, elements // 256)))
    return block_t, block_hq, block_hk, block_p, block_rest, num_warps


def rope(q, k, cos, sin, positions, inv_freq, scale: float, interleaved: bool, inverse: bool,
         q_out, k_out) -> None:
    """Writes the rotated q and k into q_out and k_out (same shapes, any strides).

    q: (B, Hq, T, D), k: (B, Hk, T, D), any strides. Either cos, sin: (Bc, T, R/2) tables with
    Bc in {1, B} (positions = inv_freq = None), or positions: (Bp, T) int64 with Bp in {1, B} and
    inv_freq: (R/2,) fp32 (cos = sin = None). scale multiplies cos and sin in both modes;
    inverse=True applies the inverse rotation (negated sin)."""
    B, hq, T, D = q.shape
    hk = k.shape[1]
    n_tokens = B * T
    if n_tokens == 0 or (hq == 0 and hk == 0):
        return
    tables = cos is not None
    half = cos.shape[-1] if tables else inv_freq.shape[0]
    rot = 2 * half
    block_t, block_hq, block_hk, block_p, block_rest, num_warps = _blocks(n_tokens, hq, hk, rot, D, q.device)
    if tables:
        sc = (cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1), cos.stride(2))
        ss = (sin.stride(0) if sin.shape[0] > 1 else 0, sin.stride(1), sin.stride(2))
        sp = (0, 0)
        cos_arg, sin_arg, pos_arg, freq_arg = cos, sin, None, None
    else:
        sc = ss = (0, 0, 0)
        sp = (positions.stride(0) if positions.shape[0] > 1 else 0, positions.stride(1))
        cos_arg, sin_arg, pos_arg, freq_arg = None, None, positions, inv_freq
    grid = (triton.cdiv(n_tokens, block_t),)
    _tune.launch(
        _rope_kernel, grid,
        q, k, q_out, k_out, cos_arg, sin_arg, pos_arg, freq_arg,
        n_tokens, T, hq, hk,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), q_out.stride(3),
        k_out.stride(0), k_out.stride(1), k_out.stride(2), k_out.stride(3),
        *sc, *ss, *sp,
        float(scale), -float(scale) if inverse else float(scale),
        TABLES=tables, INTERLEAVED=bool(interleaved), HALF=half, ROT=rot, D=D,
        BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_P=block_p, BLOCK_REST=block_rest,
        num_warps=num_warps,
    )
