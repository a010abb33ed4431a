"""scaled_dot_product_attention's FlashAttention-style options on every backend: sliding window,
ALiBi and attention sinks, alone and combined with softcap, masks, GQA and causal alignments,
out and grads (sinks' too) against an independent float64 oracle (numerics.py's rule)."""
import math

import pytest
import torch
from torch.nn.attention.bias import causal_lower_right

from fastlm import _ext
from fastlm.ops.attention import scaled_dot_product_attention as sdpa
from backends import cuda_params
from numerics import assert_close

GPU = "cuda" if torch.cuda.is_available() else None
BACKENDS = [
    pytest.param("reference", "cpu", (torch.float32, torch.bfloat16), id="reference"),
    pytest.param("cpu", "cpu", (torch.float32, torch.bfloat16), id="cpu"),
    # the interpreter's tl.dot is wrong for bf16 operands: bf16 on a GPU only
    pytest.param("triton", GPU or "cpu", (torch.float32, torch.float16) + ((torch.bfloat16,) if GPU else ()),
                 id="triton"),
]
BACKEND_DTYPES = [
    pytest.param(p.values[0], p.values[1], dtype, id=f"{p.id}-{str(dtype)[6:]}", marks=p.marks)
    for p in BACKENDS + cuda_params((torch.float16, torch.bfloat16))
    for dtype in p.values[2]
]
NONE, TOP_LEFT, BOTTOM_RIGHT = "none", "top_left", "bottom_right"


def oracle(q, k, v, mask=None, causal=NONE, scale=None, softcap=0.0, window=(-1, -1), alibi=None, sinks=None):
    """Plain math with autograd, written from the documented rules: scores, softcap, ALiBi
    (-slope * |j - (i + offset)|), the additive mask, then causal / window / bool masks, a softmax
    whose denominator also holds exp(sink); fully masked rows give 0, unseen keys are dropped."""
    tq, tk = q.shape[-2], k.shape[-2]
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    offset = 0 if causal == TOP_LEFT else tk - tq
    dist = torch.arange(tk).view(1, tk) - torch.arange(tq).view(tq, 1) - offset  # (Tq, Tk)
    if alibi is not None:
        slopes = alibi.view(-1, q.shape[1], 1, 1) if alibi.dim() == 2 else alibi.view(1, -1, 1, 1)
        s = s - slopes.to(s.dtype) * dist.abs().to(s.dtype)
    allowed = torch.ones(tq, tk, dtype=torch.bool)
    if causal != NONE:
        allowed &= dist <= 0
    if window[0] >= 0:
        allowed &= dist >= -window[0]
    if window[1] >= 0:
        allowed &= dist <= window[1]
    if mask is not None and mask.dtype == torch.bool:
        allowed = allowed & mask
    elif mask is not None:
        s = s + mask
    allowed = allowed.expand(s.shape)
    s = s.masked_fill(~allowed, -math.inf)
    if sinks is not None:  # one more logit per row, the head's sink, that points at no value
        col = sinks.to(s.dtype).view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
        p = torch.softmax(torch.cat([s, col], -1), -1)[..., :-1]
    else:
        dead_row = ~allowed.any(-1, keepdim=True)
        p = torch.softmax(s.masked_fill(dead_row, 0.0), -1).masked_fill(dead_row | ~allowed, 0.0)
    seen = allowed.any(-2).unsqueeze(-1)
    return p @ torch.where(seen, v, torch.zeros((), dtype=v.dtype))


def _qkv(b, h, hkv, tq, tk, d, dv, dtype, device="cpu"):
    return (torch.randn(b, h, tq, d, dtype=dtype, device=device), torch.randn(b, hkv, tk, d, dtype=dtype, device=device),
            torch.randn(b, hkv, tk, dv, dtype=dtype, device=device))


def check(backend, q, k, v, mask=None, causal=NONE, backward=True, fp32_tol=None, **opts):
    """out and q/k/v grads (and sinks' grad) of `backend` vs the fp64 oracle and the oracle run in
    q's dtype (the low-precision baseline)."""
    tq, tk = q.shape[-2], k.shape[-2]
    attn_mask, is_causal = mask, causal == TOP_LEFT
    if causal == BOTTOM_RIGHT:
        attn_mask = causal_lower_right(tq, tk)
    gqa = q.shape[1] != k.shape[1]
    sinks = opts.pop("sinks", None)
    m64 = mask.double() if mask is not None and mask.dtype != torch.bool else mask
    grad = torch.randn(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)

    def run(fn, dtype):
        args = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        sk = None if sinks is None else sinks.detach().to(torch.float64 if dtype == torch.float64 else
                                                          torch.float32).requires_grad_()
        with torch.set_grad_enabled(backward):
            out = fn(*args, sk)
        if not backward:
            return out, ()
        return out, torch.autograd.grad(out, args + ([sk] if sk is not None else []), grad.to(out.dtype))

    ours = lambda a, b, c, s: sdpa(a, b, c, attn_mask, 0.0, is_causal, enable_gqa=gqa, sinks=s,  # noqa: E731
                                   backend=backend, **opts)
    alibi64 = opts.get("alibi_slopes")
    plain = {k_: v_ for k_, v_ in opts.items() if k_ != "alibi_slopes"}
    out, grads = run(ours, q.dtype)
    out64, grads64 = run(lambda a, b, c, s: oracle(a, b, c, m64, causal, sinks=s, alibi=alibi64, **plain), torch.float64)
    base, grads0 = run(lambda a, b, c, s: oracle(a, b, c, mask, causal, sinks=s, alibi=alibi64, **plain), q.dtype)
    assert out.dtype == q.dtype
    assert_close(f"{backend} out", out, out64, base, fp32_tol=fp32_tol)
    for name, g, g64, g0 in zip(("grad_q", "grad_k", "grad_v", "grad_sinks"), grads, grads64, grads0):
        # grads near 0 next to fp16/bf16-rounded outputs (delta = dO . O) get a small floor, as in test_attention
        if name == "grad_sinks":  # fp32 like the sinks, but built from q's precision: judged in it
            g, g0 = g.to(q.dtype), g0.to(q.dtype)
        assert_close(f"{backend} {name}", g, g64, g0, kind="grad", atol=1e-4, fp32_tol=fp32_tol)


# (left, right) windows and causal alignments; Tq != Tk both ways puts whole rows outside the window
WINDOWS = [((-1, 0), NONE), ((3, 0), TOP_LEFT), ((0, 0), NONE), ((5, 2), NONE), ((-1, 4), BOTTOM_RIGHT),
           ((2, -1), NONE), ((40, 0), BOTTOM_RIGHT)]


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
def test_window_matches_float64(backend, device, dtype):
    small = backend == "triton" and device == "cpu" or backend == "cuda-emu"
    shapes = [(1, 4, 2, 37, 70, 32, 32), (1, 2, 1, 70, 37, 64, 48)] if small else \
        [(2, 4, 2, 37, 150, 64, 64), (1, 2, 1, 150, 37, 40, 48), (1, 2, 2, 200, 200, 64, 64)]
    for shape in shapes:
        for window, causal in WINDOWS:
            check(backend, *_qkv(*shape, dtype, device), causal=causal, window=window)


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
def test_alibi_matches_float64(backend, device, dtype):
    b, h, hkv, tq, tk, d = 2, 4, 2, 33, 70, 32
    per_head = torch.rand(h, device=device) * 0.5  # slopes ~ 2^-k of a few heads, scores then move by ~10
    per_batch = torch.rand(b, h, device=device) * 0.5
    check(backend, *_qkv(b, h, hkv, tq, tk, d, d, dtype, device), alibi_slopes=per_head)
    check(backend, *_qkv(b, h, hkv, tq, tk, d, d, dtype, device), causal=BOTTOM_RIGHT, alibi_slopes=per_batch)
    mask = torch.randn(b, 1, tq, tk, dtype=dtype, device=device)  # additive, next to the in-kernel bias
    check(backend, *_qkv(b, h, hkv, tq, tk, d, d, dtype, device), mask=mask, alibi_slopes=per_head, softcap=5.0,
          window=(20, 3))


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
def test_sinks_match_float64(backend, device, dtype):
    """Sinks, with rows fully masked (by a bool mask, and by a window past Tk): those give output 0,
    and the sink's gradient sums -p_sink * dO . O over every row of its head."""
    b, h, hkv, tq, tk, d = 2, 4, 2, 33, 70, 32
    sinks = torch.randn(h, device=device) * 2
    check(backend, *_qkv(b, h, hkv, tq, tk, d, d, dtype, device), sinks=sinks)
    mask = torch.rand(b, 1, tq, tk, device=device) > 0.3
    mask[:, :, 5] = False
    check(backend, *_qkv(b, h, hkv, tq, tk, d, d, dtype, device), mask=mask, sinks=sinks, softcap=3.0)
    check(backend, *_qkv(b, h, hkv, 70, 33, d, d, dtype, device), causal=TOP_LEFT, sinks=sinks, window=(4, 0),
          alibi_slopes=torch.rand(h, device=device))


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
def test_decode_with_options(backend, device, dtype):
    """Tq of 1 and 3 against a long cache: the decode / split-KV paths, every option at once."""
    h, hkv, tk, d = 4, 1, 700 if backend == "cuda-emu" else 1100, 64
    opts = dict(window=(300, 0), alibi_slopes=torch.rand(h, device=device) * 0.1, sinks=torch.randn(h, device=device),
                softcap=20.0)
    for tq in (1, 3):
        check(backend, *_qkv(2, h, hkv, tq, tk, d, d, dtype, device), causal=BOTTOM_RIGHT, backward=False, **opts)
    check(backend, *_qkv(1, h, hkv, 3, 300, d, d, dtype, device), causal=BOTTOM_RIGHT, **opts)


@pytest.mark.parametrize("backend,device", [pytest.param(*p.values[:2], id=p.id, marks=p.marks) for p in cuda_params()])
def test_cuda_wide_heads_with_options(backend, device):
    """The cuda backward at head dims 129..256: its score-mod kernel (softcap and ALiBi) under a
    window with sinks and GQA, and a two-sided window (edges in the middle of a key tile)."""
    h = 4
    check(backend, *_qkv(1, h, 2, 30, 45, 256, 256, torch.float16, device), causal=BOTTOM_RIGHT, window=(10, 0),
          alibi_slopes=torch.rand(h, device=device) * 0.5, softcap=5.0, sinks=torch.randn(h, device=device))
    check(backend, *_qkv(1, h, 1, 45, 30, 192, 192, torch.bfloat16, device), window=(5, 7))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_leading_dims_fold_alibi(backend):
    """5-D q/k/v with (B1, B2, H) slopes: folded to (B1*B2, H) with the batch dims."""
    q, k, v = (torch.randn(2, 3, 4, 9, 16) for _ in range(3))
    slopes = torch.rand(2, 3, 4)
    out = sdpa(q, k, v, alibi_slopes=slopes, window=(3, 1), backend=backend)
    want = oracle(q.double().flatten(0, 1), k.double().flatten(0, 1), v.double().flatten(0, 1),
                  alibi=slopes.double().flatten(0, 1), window=(3, 1))
    torch.testing.assert_close(out.double(), want.view(2, 3, 4, 9, 16), rtol=1e-5, atol=1e-5)


def test_window_equals_dense_mask_and_none_means_unbounded():
    """window=(left, right) is the band mask torch users would build; None / -1 leave a side open."""
    q, k, v = _qkv(1, 2, 2, 50, 50, 16, 16, torch.float64)
    i, j = torch.arange(50).view(-1, 1), torch.arange(50)
    band = (j >= i - 7) & (j <= i + 2)
    torch.testing.assert_close(sdpa(q, k, v, window=(7, 2), backend="reference"),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v, band))
    torch.testing.assert_close(sdpa(q, k, v, window=(None, 0)), sdpa(q, k, v, is_causal=True))
    torch.testing.assert_close(sdpa(q, k, v, window=(-1, -1)), sdpa(q, k, v))


def test_bad_options_name_argument_and_value():
    q, k, v = _qkv(2, 4, 2, 8, 8, 32, 32, torch.float32)
    with pytest.raises(TypeError, match=r"window must be a \(left, right\) pair of ints .*got 5"):
        sdpa(q, k, v, enable_gqa=True, window=5)
    with pytest.raises(ValueError, match=r"window left must be an int >= 0, or -1 / None for unbounded, got -2"):
        sdpa(q, k, v, enable_gqa=True, window=(-2, 0))
    with pytest.raises(ValueError, match=r"window right must be .* got 1.5"):
        sdpa(q, k, v, enable_gqa=True, window=(0, 1.5))
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(4,\) or \(2, 4\) .*got \(2,\)"):
        sdpa(q, k, v, enable_gqa=True, alibi_slopes=torch.ones(2))
    with pytest.raises(ValueError, match=r"alibi_slopes requires grad"):
        sdpa(q, k, v, enable_gqa=True, alibi_slopes=torch.ones(4, requires_grad=True))
    with pytest.raises(TypeError, match=r"sinks must be a floating-point tensor, got dtype torch.int64"):
        sdpa(q, k, v, enable_gqa=True, sinks=torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"sinks must have shape \(4,\) \(per head\), got \(2, 4\)"):
        sdpa(q, k, v, enable_gqa=True, sinks=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"sinks is on meta but query is on cpu"):
        sdpa(q, k, v, enable_gqa=True, sinks=torch.ones(4, device="meta"))


@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="extension not built")
def test_extension_ops_check_options():
    q, k, v = _qkv(1, 2, 1, 5, 6, 16, 16, torch.float32)
    with pytest.raises(ValueError, match=r"window_left and window_right must be >= 0, or -1 for unbounded, got -3"):
        torch.ops.fastlm.attention_fwd(q, k, v, None, 0, 1.0, 0.0, -3, 0)
    with pytest.raises(ValueError, match=r"alibi_slopes must be \(H,\) = \(2,\) or \(B, H\) = \(1, 2\), got \[3\]"):
        torch.ops.fastlm.attention_fwd(q, k, v, None, 0, 1.0, 0.0, -1, -1, torch.ones(3))
    with pytest.raises(TypeError, match=r"sinks must be float32, got Double"):
        torch.ops.fastlm.attention_fwd(q, k, v, None, 0, 1.0, 0.0, -1, -1, None, torch.ones(2, dtype=torch.double))
    slopes, sinks = torch.rand(1, 2), torch.randn(2)
    torch.library.opcheck(torch.ops.fastlm.attention_fwd.default, (q, k, v, None, 2, 0.5, 0.0, 3, 1, slopes, sinks))
    out, lse = torch.ops.fastlm.attention_fwd(q, k, v, None, 2, 0.5, 0.0, 3, 1, slopes, sinks)
    args = (torch.randn_like(out), q, k, v, None, out, lse, 2, 0.5, 0.0, 3, 1, slopes)
    torch.library.opcheck(torch.ops.fastlm.attention_bwd.default, args)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    torch._dynamo.reset()
    slopes = torch.rand(4)

    def f(q, k, v, sinks):
        return sdpa(q * 2, k, v, enable_gqa=True, window=(8, 0), alibi_slopes=slopes, sinks=sinks).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    q, k, v = (t.requires_grad_() for t in _qkv(2, 4, 2, 33, 33, 32, 32, torch.float32))
    sinks = torch.randn(4, requires_grad=True)
    out, out_ref = compiled(q, k, v, sinks), f(q, k, v, sinks)
    torch.testing.assert_close(out, out_ref)
    for g, g_ref in zip(torch.autograd.grad(out.sum(), (q, k, v, sinks)),
                        torch.autograd.grad(out_ref.sum(), (q, k, v, sinks))):
        torch.testing.assert_close(g, g_ref)


def test_sinks_gradient_numerically():
    """The sinks' closed-form gradient against finite differences (fp64, reference)."""
    q, k, v = _qkv(1, 2, 1, 6, 9, 8, 8, torch.float64)
    mask = torch.rand(6, 9) > 0.4
    mask[2] = False
    sinks, slopes = torch.randn(2, dtype=torch.float64, requires_grad=True), torch.rand(2, dtype=torch.float64)
    torch.autograd.gradcheck(
        lambda s: sdpa(q, k, v, mask, enable_gqa=True, sinks=s, alibi_slopes=slopes, backend="reference"), (sinks,))

