"""varlen_attention over packed sequences against a per-sequence loop of the dense op (and the
float64 math through it), with every option, GQA, empty and one-token sequences, and gradients."""
import pytest
import torch

import fastlm
from fastlm import _ext
from fastlm.ops import scaled_dot_product_attention as sdpa, varlen_attention
from backends import EMU_MARKS
from numerics import assert_close

HAS_VARLEN = _ext.HAS_EXTENSION and hasattr(torch.ops.fastlm, "attention_varlen_fwd")
# CPU tensors throughout: triton in its interpreter (whose tl.dot is wrong for bf16: fp16 there),
# cuda through the SIMT emulator (tensor cores: 16-bit only)
BACKENDS = [
    pytest.param("reference", (torch.float32, torch.bfloat16), id="reference"),
    pytest.param("cpu", (torch.float32, torch.bfloat16), id="cpu",
                 marks=pytest.mark.skipif(not HAS_VARLEN, reason="extension without varlen attention")),
    pytest.param("triton", (torch.float32, torch.float16), id="triton"),
    pytest.param("cuda-emu", (torch.float16, torch.bfloat16), id="cuda-emu", marks=EMU_MARKS),
]
BACKEND_DTYPES = [pytest.param(p.values[0], d, id=f"{p.id}-{str(d)[6:]}", marks=p.marks)
                  for p in BACKENDS for d in p.values[1]]
# per-sequence (query, key) lengths: empty, one token, tile edges (64), Tq != Tk both ways
LENGTHS = [(5, 5), (0, 3), (1, 1), (64, 64), (65, 130), (3, 0), (100, 37), (17, 17)]


def _pack(lengths, h, hkv, d, dv, dtype):
    tq, tk = sum(a for a, _ in lengths), sum(b for _, b in lengths)
    cu = [torch.tensor([0] + [sum(x[i] for x in lengths[:n + 1]) for n in range(len(lengths))], dtype=torch.int32)
          for i in (0, 1)]
    return (torch.randn(tq, h, d, dtype=dtype), torch.randn(tk, hkv, d, dtype=dtype), torch.randn(tk, hkv, dv, dtype=dtype),
            *cu)


def loop(q, k, v, cu_q, cu_k, dtype=None, **opts):
    """The dense op (reference backend: fp32 math, fp64 for fp64) once per sequence, rows
    concatenated: what varlen must equal. Sequences without keys give 0."""
    alibi, outs = opts.pop("alibi_slopes", None), []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        qb, kb, vb = (t[s:e].transpose(0, 1).unsqueeze(0) for t, s, e in
                      ((q, cq[b], cq[b + 1]), (k, ck[b], ck[b + 1]), (v, ck[b], ck[b + 1])))
        if kb.shape[2] == 0:
            outs.append(q.new_zeros(qb.shape[2], q.shape[1], v.shape[-1]))
            continue
        a = None if alibi is None else (alibi[b] if alibi.dim() == 2 else alibi)
        out = sdpa(qb, kb, vb, enable_gqa=True, alibi_slopes=a, backend="reference", **opts)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


def check(backend, dtype, lengths, h=4, hkv=2, d=32, dv=32, **opts):
    q, k, v, cu_q, cu_k = _pack(lengths, h, hkv, d, dv, dtype)
    mq, mk = max(a for a, _ in lengths), max(b for _, b in lengths)
    sinks = opts.pop("sinks", None)
    grad = torch.randn(q.shape[0], h, dv, dtype=dtype)

    def run(fn, dt):
        args = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        s = None if sinks is None else sinks.to(torch.float64 if dt == torch.float64 else torch.float32).requires_grad_()
        out = fn(*args, s)
        return out, torch.autograd.grad(out, args + ([s] if s is not None else []), grad.to(out.dtype))

    out, grads = run(lambda a, b, c, s: varlen_attention(a, b, c, cu_q, cu_k, mq, mk, sinks=s, backend=backend,
                                                         **opts), dtype)
    out64, grads64 = run(lambda a, b, c, s: loop(a, b, c, cu_q, cu_k, sinks=s, **dict(opts)), torch.float64)
    base, grads0 = run(lambda a, b, c, s: loop(a, b, c, cu_q, cu_k, sinks=s, **dict(opts)), dtype)
    assert out.shape == (q.shape[0], h, dv) and out.dtype == dtype
    assert_close(f"{backend} out", out, out64, base)
    for name, g, g64, g0 in zip(("grad_q", "grad_k", "grad_v", "grad_sinks"), grads, grads64, grads0):
        if name == "grad_sinks":
            g, g0 = g.to(dtype), g0.to(dtype)
        assert_close(f"{backend} {name}", g, g64, g0, kind="grad", atol=1e-4)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_matches_per_sequence_loop(backend, dtype):
    check(backend, dtype, LENGTHS)
    check(backend, dtype, LENGTHS, is_causal=True)
    check(backend, dtype, LENGTHS, window=(-1, 0))  # bottom-right causal, per sequence


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_options_per_sequence(backend, dtype):
    n = len(LENGTHS)
    check(backend, dtype, LENGTHS, window=(6, 0), softcap=5.0, alibi_slopes=torch.rand(n, 4) * 0.3,
          sinks=torch.randn(4))
    check(backend, dtype, LENGTHS, h=2, hkv=2, d=40, dv=24, is_causal=True, window=(9, 2),
          alibi_slopes=torch.rand(2) * 0.3)


@pytest.mark.emu
@pytest.mark.skipif(not _ext.HAS_EMULATOR, reason="fastlm._C_emu not built")
def test_cuda_wide_heads():
    """Head dims 129..256 (the cuda backward's 32-key tiles): sequences empty, of one token and
    ragged around the 32-key and 16-query tile edges, causal, MQA; Dv != D."""
    lengths = [(0, 3), (1, 1), (17, 33), (33, 20)]
    check("cuda-emu", torch.float16, lengths, h=2, hkv=1, d=256, dv=256, is_causal=True)
    check("cuda-emu", torch.bfloat16, lengths, h=2, hkv=2, d=192, dv=160, window=(7, 0), softcap=5.0)


@pytest.mark.parametrize("backend,dtype", [pytest.param(p.values[0], p.values[1][-1], id=p.id, marks=p.marks)
                                           for p in BACKENDS])
def test_lse_layout_and_empty_rows(backend, dtype):
    q, k, v, cu_q, cu_k = _pack([(3, 0), (4, 6)], 2, 2, 16, 16, dtype)
    sinks = torch.tensor([0.5, -1.0])
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, 4, 6, sinks=sinks, return_lse=True, backend=backend)
    assert lse.shape == (2, 7) and lse.dtype == torch.float32  # (H, total_q), FlashAttention's layout
    assert torch.equal(out[:3], torch.zeros_like(out[:3]))  # no keys: output 0, lse = the sink
    torch.testing.assert_close(lse[:, :3], sinks.view(2, 1).expand(2, 3))
    s = torch.einsum("qhd,khd->hqk", q[3:].double(), k.double()) / 4.0
    want = torch.logaddexp(torch.logsumexp(s, -1), sinks.double().view(2, 1)).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-3  # 16-bit q.k products, fp32 accumulation
    torch.testing.assert_close(lse[:, 3:], want, rtol=tol, atol=tol)


def test_bad_inputs_name_argument_and_value():
    q, k, v, cu_q, cu_k = _pack([(3, 3), (4, 4)], 2, 2, 16, 16, torch.float32)
    with pytest.raises(ValueError, match=r"q must be packed \(total, heads, head_dim\), got shape \(1, 7, 2, 16\)"):
        varlen_attention(q[None], k, v, cu_q, cu_k, 4, 4)
    with pytest.raises(TypeError, match=r"cu_seqlens_q must be a 1-D int32 tensor .*got torch.int64"):
        varlen_attention(q, k, v, cu_q.long(), cu_k, 4, 4)
    with pytest.raises(ValueError, match=r"cu_seqlens_k must rise from 0 to 7 \(the packed length\), got \[0, 3, 6\]"):
        varlen_attention(q, k, v, cu_q, torch.tensor([0, 3, 6], dtype=torch.int32), 4, 4)
    with pytest.raises(ValueError, match=r"max_seqlen_q=3 is below the longest sequence \(4\)"):
        varlen_attention(q, k, v, cu_q, cu_k, 3, 4)
    with pytest.raises(ValueError, match=r"cu_seqlens_q has 2 sequences but cu_seqlens_k 1"):
        varlen_attention(q, k, v, cu_q, torch.tensor([0, 7], dtype=torch.int32), 4, 7)
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(2,\) or \(2, 2\)"):
        varlen_attention(q, k, v, cu_q, cu_k, 4, 4, alibi_slopes=torch.ones(3))
    with pytest.raises(fastlm.BackendUnavailableError, match=r"dtype float32 not supported by the cuda backend"):
        varlen_attention(q, k, v, cu_q, cu_k, 4, 4, backend="cuda-emu")


def test_opcheck_and_compile():
    q, k, v, cu_q, cu_k = _pack([(5, 5), (0, 2), (9, 9)], 4, 2, 16, 16, torch.float32)
    backend = "cpu" if HAS_VARLEN else "reference"
    sinks = torch.randn(4, requires_grad=True)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu_q, cu_k, 9, 9, 1, 0.25, 0.0, 4, 0,
            torch.rand(3, 4), sinks, backend)
    torch.library.opcheck(torch.ops.fastlm.varlen_attention.default, args)
    torch._dynamo.reset()
    f = lambda a, b, c: varlen_attention(a * 2, b, c, cu_q, cu_k, 9, 9, is_causal=True, sinks=sinks).sum()  # noqa
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))
    for g, g_ref in zip(torch.autograd.grad(compiled(q, k, v), (q, k, v, sinks)),
                        torch.autograd.grad(f(q, k, v), (q, k, v, sinks))):
        torch.testing.assert_close(g, g_ref)
    if HAS_VARLEN:
        out, lse = torch.ops.fastlm.attention_varlen_fwd(q.detach(), k.detach(), v.detach(), cu_q, cu_k, 9, 9, 1,
                                                         0.25, 0.0, 3, 0, None, None)
        torch.library.opcheck(torch.ops.fastlm.attention_varlen_fwd.default,
                              (q.detach(), k.detach(), v.detach(), cu_q, cu_k, 9, 9, 1, 0.25, 0.0, 3, 0, None, None))
        torch.library.opcheck(torch.ops.fastlm.attention_varlen_bwd.default,
                              (torch.randn_like(out), q.detach(), k.detach(), v.detach(), cu_q, cu_k, 9, 9, out, lse,
                               1, 0.25, 0.0, 3, 0, None))
