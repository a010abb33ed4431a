"""The Hopper tier of the cuda attention forward (csrc/cuda/attention_sm90.cu).

The tier decision (attention_sm90_why_not, through the attention_cuda_tier op) is tested on the
host for every option it refuses; the kernel itself runs under the emulator's sm_90 profile
("9.0") through the cuda-emu backend against the float64 oracle, and each run asserts that the
Hopper kernel really launched (attention_sm90_launches). Small shapes: every CTA is 384 emulated
threads."""
import math

import pytest
import torch
from torch.nn.attention.bias import causal_lower_right

from fastlm import _ext
from fastlm.ops.attention import scaled_dot_product_attention_with_lse as sdpa_lse
from backends import EMU_MARKS, emulated_gpu
from numerics import assert_close

pytestmark = [*EMU_MARKS, pytest.mark.filterwarnings("ignore:Lower right causal bias will produce NaNs")]


def ops():
    return torch.ops.fastlm_emu


def tier(q, k, v, mask=None, causal=0, softcap=0.0, window=(-1, -1), alibi=None, sinks=None, arch=(9, 0)):
    return ops().attention_cuda_tier(q, k, v, mask, causal, 1 / math.sqrt(q.shape[-1]), softcap, *window, alibi,
                                     sinks, *arch)


def qkv(b, h, hkv, tq, tk, d, dtype=torch.float16, dv=None):
    return (torch.randn(b, h, tq, d, dtype=dtype), torch.randn(b, hkv, tk, d, dtype=dtype),
            torch.randn(b, hkv, tk, dv or d, dtype=dtype))


def test_tier_takes_the_plain_forward_on_sm90_only():
    q, k, v = qkv(2, 4, 2, 130, 77, 128)
    assert tier(q, k, v, causal=2) == "sm90"
    assert tier(*qkv(1, 2, 1, 40, 300, 64, torch.bfloat16)) == "sm90"
    for arch in ((8, 0), (8, 9), (10, 0)):
        assert tier(q, k, v, arch=arch) == "sm80: the Hopper tier needs an sm_90 GPU (compute capability 9.0)"


def test_tier_refuses_every_option_it_does_not_implement():
    q, k, v = qkv(1, 2, 2, 40, 50, 64)
    refusals = {
        "a user mask (the sm_80 kernel's)": dict(mask=torch.ones(1, 1, 40, 50, dtype=torch.bool)),
        "softcap (the sm_80 kernel's)": dict(softcap=30.0),
        "a sliding window (the sm_80 kernel's)": dict(window=(16, -1)),
        "ALiBi (the sm_80 kernel's)": dict(alibi=torch.rand(2)),
        "sinks (the sm_80 kernel's)": dict(sinks=torch.randn(2)),
    }
    for why, kwargs in refusals.items():
        assert tier(q, k, v, **kwargs) == "sm80: " + why, kwargs
    assert tier(*qkv(1, 2, 2, 40, 50, 64, dv=32)) == "sm80: value_dim != head_dim (the sm_80 kernel's)"
    for d in (32, 60, 256):
        assert tier(*qkv(1, 2, 2, 40, 50, d)) == "sm80: the Hopper tier takes head dims 64..128 in steps of 8", d
    assert tier(*qkv(1, 2, 2, 40, 50, 64, torch.float32)) == "sm80: the Hopper tier takes fp16/bf16 only"
    assert tier(*qkv(1, 8, 2, 16, 500, 64)).startswith("sm80: decode-like calls (Tq <= 16)")
    # (B, T, H, D) memory seen as (B, H, T, D) (a projection's output transposed): 4-D maps take it
    q, k, v = (t.transpose(1, 2) for t in qkv(2, 40, 40, 4, 4, 64))  # B 2, H 4, T 40
    assert tier(q, k, v) == "sm90"
    # a row stride that is not 16 bytes (68 halves): the binding realigns the rows first (as it
    # does for the sm_80 kernel's cp.async), so the tensor maps still take it
    q = torch.randn(1, 2, 40, 68, dtype=torch.float16)[..., :64]
    assert tier(q, k[:1, :2], v[:1, :2]) == "sm90"


def _oracle(q, k, v, causal, tq, tk):
    """fp64 (and q's dtype) plain math: fully masked rows 0, lse -inf."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    allowed = torch.ones(tq, tk, dtype=torch.bool)
    if causal:
        allowed = allowed.tril(0 if causal == 1 else tk - tq)
    s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, -1)
    dead = ~allowed.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
    return p @ v, lse


# (B, H, H_kv, Tq, Tk, D, dtype, causal): 0 none, 1 top-left, 2 bottom-right. Each covers
# something: ragged Tq/Tk with the Tk tail masked and zero-filled; GQA with a full (maskless) key
# tile before the diagonal one; MQA with Tq > Tk bottom-right (fully masked rows); three key
# tiles (the ring's stages reused: empty-barrier waits and phase flips); two batches (the flat
# batch*head index of the tensor maps) at D = 96 (the 128-column tile, TMA zero-filling columns
# 96..127), bottom-right with Tq < Tk; the last two in (B, T, H, D) memory seen through a
# transpose (the maps' head and batch strides out of order, as a projection's output gives them).
CASES = [
    (1, 2, 2, 130, 77, 64, torch.float16, 0, False),
    (1, 4, 2, 256, 256, 128, torch.bfloat16, 1, False),
    (1, 2, 1, 150, 100, 128, torch.float16, 2, False),
    (1, 1, 1, 40, 300, 64, torch.bfloat16, 0, True),
    (2, 2, 1, 70, 200, 96, torch.float16, 2, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[3]}x{c[4]}-d{c[5]}-"
                                                        f"{str(c[6])[6:]}-causal{c[7]}" + ("-bthd" if c[8] else ""))
def test_hopper_forward_under_the_emulator(case):
    b, h, hkv, tq, tk, d, dtype, causal, bthd = case
    q, k, v = qkv(b, h, hkv, tq, tk, d, dtype)
    # K/V rows past Tk hold NaN in memory (views of longer tensors): TMA's box must stop at Tk
    pad = 13
    if bthd:  # (B, T, H, D) memory: the rows past Tk interleave with the other heads' rows
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        k_mem, v_mem = (torch.full((b, tk + pad, hkv, d), math.nan, dtype=dtype) for _ in range(2))
        k_mem[:, :tk], v_mem[:, :tk] = k.transpose(1, 2), v.transpose(1, 2)
        k, v = k_mem[:, :tk].transpose(1, 2), v_mem[:, :tk].transpose(1, 2)
    else:
        k_mem, v_mem = (torch.full((b, hkv, tk + pad, d), math.nan, dtype=dtype) for _ in range(2))
        k_mem[:, :, :tk], v_mem[:, :, :tk] = k, v
        k, v = k_mem[:, :, :tk], v_mem[:, :, :tk]
    mask, is_causal = (None, causal == 1) if causal != 2 else (causal_lower_right(tq, tk), False)
    before = ops().attention_sm90_launches()
    with emulated_gpu():
        out, lse = sdpa_lse(q, k, v, mask, is_causal=is_causal, enable_gqa=h != hkv, backend="cuda-emu")
    assert ops().attention_sm90_launches() == before + 1, "the Hopper kernel did not run"
    out64, lse64 = _oracle(q.double(), k.double(), v.double(), causal, tq, tk)
    base, _ = _oracle(q, k, v, causal, tq, tk)
    assert_close(f"sm90 out {case}", out, out64, base)
    finite = lse64.isfinite()
    assert torch.equal(finite, lse.isfinite()), "-inf lse rows differ"
    assert (lse[~finite] == -math.inf).all()
    torch.testing.assert_close(lse[finite].double(), lse64[finite], rtol=1e-3, atol=1e-3)
    if causal == 2 and tq > tk:  # rows that see no key: exactly 0
        assert torch.equal(out[:, :, : tq - tk], torch.zeros_like(out[:, :, : tq - tk]))
