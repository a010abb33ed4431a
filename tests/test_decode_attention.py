"""decode_attention: a paged KV cache against a contiguous one and against the dense op on each
sequence (bottom-right causal), every option, in-place appends, and the inputs it refuses."""
import pytest
import torch
from torch.nn.attention.bias import causal_lower_right

import fastlm
from fastlm import _ext
from fastlm.ops import decode_attention, scaled_dot_product_attention as sdpa
from backends import EMU_MARKS
from numerics import assert_close

HAS_DECODE = _ext.HAS_EXTENSION and hasattr(torch.ops.fastlm, "attention_decode_fwd")
NO_DECODE = pytest.mark.skipif(not HAS_DECODE, reason="no decode kernel")
# CPU tensors throughout: triton in its interpreter (whose tl.dot is wrong for bf16: fp16 there),
# cuda through the SIMT emulator (tensor cores: 16-bit only)
BACKEND_DTYPES = [pytest.param(b, d, id=f"{b}-{str(d)[6:]}", marks=marks) for b, dtypes, marks in (
    ("reference", (torch.float32, torch.bfloat16), ()), ("cpu", (torch.float32, torch.bfloat16), NO_DECODE),
    ("triton", (torch.float32, torch.float16), ()), ("cuda-emu", (torch.float16, torch.bfloat16), EMU_MARKS))
    for d in dtypes]


def make_cache(lengths, hkv, d, dtype, page_size, capacity=None, shuffle=True):
    """(contiguous (B, cap, Hkv, D) k and v, the same rows paged with a shuffled block table)."""
    b, cap = len(lengths), capacity or max(lengths) + 8
    cap = -(-cap // page_size) * page_size
    k, v = (torch.randn(b, cap, hkv, d, dtype=dtype) for _ in range(2))
    pages = cap // page_size
    order = torch.randperm(b * pages) if shuffle else torch.arange(b * pages)
    table = order.view(b, pages).to(torch.int32)
    kp, vp = (torch.empty(b * pages, page_size, hkv, d, dtype=dtype).fill_(float("nan")) for _ in range(2))
    kp[table.long()] = k.view(b, pages, page_size, hkv, d)  # page table[b, p] holds rows p*ps.. of b
    vp[table.long()] = v.view(b, pages, page_size, hkv, d)
    return k, v, kp, vp, table


def dense(q, k, v, lengths, causal=True, dtype=None, **opts):
    """The dense op (reference backend) per sequence on its first L_b keys, (B, Tq, H, Dv)."""
    alibi, outs = opts.pop("alibi_slopes", None), []
    dt = dtype or q.dtype
    for b, n in enumerate(lengths):
        qb = q[b].transpose(0, 1).unsqueeze(0).to(dt)  # (Tq, H, D) -> (1, H, Tq, D)
        kb, vb = (t[b, :n].transpose(0, 1).unsqueeze(0).to(dt) for t in (k, v))
        if n == 0:
            outs.append(torch.zeros(q.shape[1], q.shape[2], v.shape[-1], dtype=dt))
            continue
        mask = causal_lower_right(q.shape[1], n) if causal else None
        a = None if alibi is None else (alibi[b] if alibi.dim() == 2 else alibi)
        outs.append(sdpa(qb, kb, vb, mask, enable_gqa=True, alibi_slopes=a, backend="reference", **opts)[0]
                    .transpose(0, 1))
    return torch.stack(outs)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_paged_equals_contiguous_and_dense(backend, dtype, page_size):
    lengths = [0, 1, 37, 200, 64, 130]
    h, hkv, d, tq = 8, 2, 32, 1
    k, v, kp, vp, table = make_cache(lengths, hkv, d, dtype, page_size)
    q = torch.randn(len(lengths), tq, h, d, dtype=dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    paged = decode_attention(q, kp, vp, seqlens, block_table=table, backend=backend)
    contiguous = decode_attention(q, k, v, seqlens, backend=backend)
    torch.testing.assert_close(paged, contiguous, rtol=0, atol=0)  # the same math, rows found through the pages
    assert_close(f"{backend} out", paged, dense(q, k, v, lengths, dtype=torch.float64), dense(q, k, v, lengths))
    assert torch.equal(paged[0], torch.zeros_like(paged[0]))  # no keys: 0


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_options_and_several_queries(backend, dtype):
    lengths = [5, 300, 77]
    h, hkv, d = 4, 1, 64
    k, v, kp, vp, table = make_cache(lengths, hkv, d, dtype, 16)
    q = torch.randn(3, 4, h, d, dtype=dtype)  # Tq = 4: speculative / chunked decode, causal bottom-right
    opts = dict(window=(50, 0), softcap=10.0, alibi_slopes=torch.rand(3, h) * 0.2, sinks=torch.randn(h))
    for causal in (True, False):
        out, lse = decode_attention(q, kp, vp, torch.tensor(lengths, dtype=torch.int32), block_table=table,
                                    is_causal=causal, return_lse=True, backend=backend, **opts)
        assert lse.shape == (3, h, 4) and lse.dtype == torch.float32
        assert_close(f"{backend} out", out, dense(q, k, v, lengths, causal, torch.float64, **opts),
                     dense(q, k, v, lengths, causal, **opts))


@pytest.mark.parametrize("backend,dtype", [("reference", torch.float32), pytest.param("cpu", torch.float32, marks=NO_DECODE),
                                           ("triton", torch.float32),
                                           pytest.param("cuda-emu", torch.float16, marks=EMU_MARKS)])
def test_append_in_place_then_attend(backend, dtype):
    """k, v given: written at cache_seqlens[b].. through the pages, then attended (FlashAttention's
    flash_attn_with_kvcache); cache_seqlens is left for the caller to advance."""
    lengths = [3, 20]
    k, v, kp, vp, table = make_cache(lengths, 2, 16, dtype, 8, capacity=40)
    q, kn, vn = (torch.randn(2, 2, h, 16, dtype=dtype) for h in (4, 2, 2))
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    out = decode_attention(q, kp, vp, seqlens, block_table=table, k=kn, v=vn, backend=backend)
    assert seqlens.tolist() == lengths
    for b, n in enumerate(lengths):
        k[b, n:n + 2], v[b, n:n + 2] = kn[b], vn[b]
    new_lengths = [n + 2 for n in lengths]
    assert_close(f"{backend} out", out, dense(q, k, v, new_lengths, dtype=torch.float64), dense(q, k, v, new_lengths))
    from fastlm.ops.decode_attention import cache_rows
    torch.testing.assert_close(cache_rows(kp, table, 1, 22), k[1, :22], rtol=0, atol=0)


def test_bad_inputs_name_argument_and_value():
    k, v, kp, vp, table = make_cache([4, 9], 2, 16, torch.float32, 8)
    q = torch.randn(2, 1, 4, 16)
    seqlens = torch.tensor([4, 9], dtype=torch.int32)
    with pytest.raises(TypeError, match=r"cache_seqlens must be an int32 tensor of shape \(B,\) with B = 2, got "
                                        r"torch.int64"):
        decode_attention(q, kp, vp, seqlens.long(), block_table=table)
    with pytest.raises(TypeError, match=r"block_table must be an int32 tensor of shape \(B, max_pages\) with B = 2, "
                                        r"got torch.float32 \(2, 3\)"):
        decode_attention(q, kp, vp, seqlens, block_table=table.float())
    with pytest.raises(ValueError, match=r"a contiguous cache \(no block_table\) has one row per sequence"):
        decode_attention(q, kp, vp, seqlens)
    with pytest.raises(ValueError, match=r"give both k and v to append, or neither"):
        decode_attention(q, kp, vp, seqlens, block_table=table, k=torch.randn(2, 1, 2, 16))
    with pytest.raises(ValueError, match=r"a sequence of 99 keys exceeds the cache's capacity of 24"):
        decode_attention(q, kp, vp, torch.tensor([4, 99], dtype=torch.int32), block_table=table)
    with pytest.raises(ValueError, match=r"q requires grad; decode attention is inference only"):
        decode_attention(q.requires_grad_(), kp, vp, seqlens, block_table=table)
    with pytest.raises(fastlm.BackendUnavailableError, match=r"dtype float32 not supported by the cuda backend"):
        decode_attention(q.detach(), kp, vp, seqlens, block_table=table, backend="cuda-emu")


def test_opcheck_and_compile():
    k, v, kp, vp, table = make_cache([5, 17], 2, 16, torch.float32, 8)
    q, seqlens = torch.randn(2, 1, 4, 16), torch.tensor([5, 17], dtype=torch.int32)
    backend = "cpu" if HAS_DECODE else "reference"
    torch.library.opcheck(torch.ops.fastlm.decode_attention.default,
                          (q, kp, vp, table, seqlens, True, 0.25, 0.0, 8, 0, None, torch.randn(4), backend))
    if HAS_DECODE:
        torch.library.opcheck(torch.ops.fastlm.attention_decode_fwd.default,
                              (q, kp, vp, table, seqlens, True, 0.25, 0.0, 8, 0, torch.rand(4), None))
    torch._dynamo.reset()
    f = lambda a: decode_attention(a * 2, kp, vp, seqlens, block_table=table, window=(6, 0))  # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(q), f(q))
