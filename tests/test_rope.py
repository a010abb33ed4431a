"""rope on every backend against a float64 oracle (tolerance rule in numerics.py), against HF's
apply_rotary_pos_emb and rope init functions, plus registration, compile and bad input."""
import importlib.util
import warnings

import pytest
import torch

from backends import backend_dtypes, backends, cuda_params
from fastlm import _ext
from fastlm.ops.rope import rope, rope_frequencies, rope_ref
from numerics import assert_close

# The triton kernel lands from another branch: until fastlm/triton/rope.py exists, its params are
# skipped as not merged yet (the tests/ops_available.py convention), never silently passed.
_TRITON_MISSING = pytest.mark.skipif(importlib.util.find_spec("fastlm.triton.rope") is None,
                                     reason="waiting on fastlm.triton.rope (not merged yet)")
BACKENDS = [pytest.param(*p.values, id=p.id, marks=list(p.marks) + ([_TRITON_MISSING] if p.id == "triton" else []))
            for p in backends()]
BACKEND_DTYPES = backend_dtypes(BACKENDS)


# ------------------------------------------------------------------ the oracle
def _rotate(x, c, s, interleaved):
    """x (B, H, T, D); c, s (Bc, T, R/2) in x's dtype: the rotation in plain torch ops."""
    c, s, half = c[:, None], s[:, None], c.shape[-1]
    if interleaved:
        x1, x2 = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
    else:
        x1, x2 = x[..., :half], x[..., half:2 * half]
    y1, y2 = x1 * c - x2 * s, x2 * c + x1 * s
    rot = torch.stack((y1, y2), -1).flatten(-2) if interleaved else torch.cat((y1, y2), -1)
    return torch.cat((rot, x[..., 2 * half:]), -1)


def _pair_tables(cos, sin, positions, rotary_dim, interleaved, scaling=None, theta=10000.0):
    """(Bc, T, R/2) fp64 c, s as the op defines them: one value per pair of the given tables, or
    cos/sin (times the attention scale) of the fp32 angle position * inv_freq."""
    if cos is not None:
        cos, sin = (cos[None], sin[None]) if cos.dim() == 2 else (cos, sin)
        pick = slice(None, None, 2) if interleaved else slice(None, cos.shape[-1] // 2)
        return cos[..., pick].double(), sin[..., pick].double()
    inv, scale = rope_frequencies(rotary_dim, theta, scaling, seq_len=int(positions.max()) + 1)
    pos = positions if positions.dim() == 2 else positions[None]
    angle = (pos.float()[..., None] * inv).double()  # fp32 product, as HF and the kernels compute it
    return angle.cos() * scale, angle.sin() * scale


def _run(fn, q, k, grads, dtype=None):
    """fn(q, k) and (grad_q, grad_k) for the given output grads, q/k cast to `dtype`."""
    q = q.detach().to(dtype or q.dtype).requires_grad_()
    k = k.detach().to(dtype or k.dtype).requires_grad_()
    outs = fn(q, k)
    gs = torch.autograd.grad(outs, (q, k), [g.to(o.dtype) for g, o in zip(grads, outs)])
    return outs, gs


def _check(backend, q, k, cos=None, sin=None, positions=None, rotary_dim=None, interleaved=False, heads_dim=1,
           scaling=None, theta=10000.0):
    """Outputs and gradients of `backend` vs the fp64 oracle and the plain low-precision rotation."""
    dtype = q.dtype
    kw = dict(positions=positions, rotary_dim=rotary_dim, interleaved=interleaved, heads_dim=heads_dim,
              scaling=scaling, theta=theta)
    D = q.shape[-1]
    R = cos.shape[-1] if cos is not None else rotary_dim or D
    c64, s64 = _pair_tables(cos, sin, positions, R, interleaved, scaling, theta)

    def plain(cd):
        def fn(a, b):
            if heads_dim == 2:
                a, b = a.transpose(1, 2), b.transpose(1, 2)
            outs = [_rotate(x, c64.to(cd), s64.to(cd), interleaved) for x in (a, b)]
            return [o.transpose(1, 2) for o in outs] if heads_dim == 2 else outs
        return fn

    grads = [torch.randn_like(q), torch.randn_like(k)]
    outs, gs = _run(lambda a, b: rope(a, b, cos, sin, backend=backend, **kw), q, k, grads)
    outs64, gs64 = _run(plain(torch.float64), q, k, grads, torch.float64)
    outs0, gs0 = _run(plain(dtype), q, k, grads)
    errs = {}
    for name, o, o64, o0, x in zip(("q", "k"), outs, outs64, outs0, (q, k)):
        assert o.dtype == dtype and o.shape == x.shape
        assert o.stride() == torch.empty_like(x).stride(), f"{name}: output layout {o.stride()}"
        assert_close(f"{backend} {name}", o, o64, o0)
        errs[name] = (o.double() - o64).abs().max().item()
    for name, g, g64, g0 in zip(("grad_q", "grad_k"), gs, gs64, gs0):
        assert g.dtype == dtype
        assert_close(f"{backend} {name}", g, g64, g0, kind="grad")
    return errs


def _qk(B, Hq, Hk, T, D, dtype, device="cpu"):
    return (torch.randn(B, Hq, T, D, device=device, dtype=dtype) * 2,
            torch.randn(B, Hk, T, D, device=device, dtype=dtype) * 2)


def _tables(Bc, T, R, interleaved, device="cpu", dtype=torch.float32, pos0=0):
    """HF-layout (Bc, T, R) tables for positions pos0.. (a per-batch offset when Bc > 1)."""
    inv, _ = rope_frequencies(R)
    pos = torch.arange(T)[None] + pos0 + 3 * torch.arange(Bc)[:, None]
    freqs = pos.float()[..., None] * inv
    emb = freqs.repeat_interleave(2, -1) if interleaved else torch.cat((freqs, freqs), -1)
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)


# (B, Hq, Hk, T, D, R, Bc): GQA, partial rotary (NeoX D=64 R=16, Phi D=80 R=32), broadcast and
# per-batch tables, odd sequence lengths
CASES = [
    (2, 4, 2, 7, 64, 64, 1),
    (1, 3, 1, 1, 64, 16, 1),
    (2, 2, 2, 97, 80, 32, 2),
    (3, 2, 1, 5, 32, 32, 3),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}Hq{}Hk{}T{}D{}R{}Bc{}".format(*c))
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
def test_tables_match_float64(backend, device, dtype, interleaved, case):
    B, Hq, Hk, T, D, R, Bc = case
    q, k = _qk(B, Hq, Hk, T, D, dtype, device)
    cos, sin = _tables(Bc, T, R, interleaved, device, dtype if dtype != torch.float64 else torch.float32)
    _check(backend, q, k, cos, sin, interleaved=interleaved)


SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("scaling", list(SCALINGS))
@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
def test_positions_match_float64(backend, device, dtype, scaling):
    q, k = _qk(2, 4, 2, 9, 64, dtype, device)
    positions = torch.randint(0, 300, (2, 9), device=device)
    _check(backend, q, k, positions=positions, scaling=SCALINGS[scaling], theta=500000.0,
           interleaved=scaling == "yarn", rotary_dim=48 if scaling == "linear" else None)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_large_positions(backend, device, dtypes):
    """Angles up to 1e5 rad: the kernels' sincosf must reduce them as accurately as torch.cos."""
    q, k = _qk(1, 2, 1, 6, 32, torch.float32, device)
    positions = torch.tensor([0, 1, 4095, 65537, 100000, 131071], device=device)
    errs = _check(backend, q, k, positions=positions)
    assert max(errs.values()) < 2e-5


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
@pytest.mark.parametrize("layout", ["hf_views", "heads_dim2", "tables_2d_strided", "strided_last_dim", "grad_expanded",
                                    "empty"])
def test_layouts(backend, device, dtypes, layout):
    B, Hq, Hk, T, D = 2, 4, 2, 7, 64
    if layout == "hf_views":  # q, k as HF's transposed views of one fused (B, T, (Hq+2Hk)*D) projection
        qkv = torch.randn(B, T, (Hq + 2 * Hk) * D, device=device)
        q, k, _ = qkv.split([Hq * D, Hk * D, Hk * D], -1)
        q, k = q.view(B, T, Hq, D).transpose(1, 2), k.view(B, T, Hk, D).transpose(1, 2)
        _check(backend, q, k, *_tables(1, T, D, False, device))
    elif layout == "heads_dim2":
        q, k = torch.randn(B, T, Hq, D, device=device), torch.randn(B, T, Hk, D, device=device)
        _check(backend, q, k, *_tables(B, T, 32, True, device), interleaved=True, heads_dim=2)
    elif layout == "tables_2d_strided":  # (T, R) tables as slices of a longer, wider cache
        cos, sin = _tables(1, T + 5, D + 16, False, device)
        q, k = _qk(B, Hq, Hk, T, D, torch.float32, device)
        _check(backend, q, k, cos[0, 5:, :D], sin[0, 5:, :D])
    elif layout == "strided_last_dim":  # every other element, and R/2 = 9: the kernels' scalar path
        q, k = torch.randn(B, Hq, T, 68, device=device)[..., ::2], torch.randn(B, Hk, T, 68, device=device)[..., ::2]
        _check(backend, q, k, *_tables(B, T, 18, False, device, torch.bfloat16))
    elif layout == "grad_expanded":  # .sum() hands the backward a stride-0 gradient
        q, k = _qk(B, Hq, Hk, T, D, torch.float32, device)
        q.requires_grad_()
        qo, ko = rope(q, k, positions=torch.arange(T, device=device), backend=backend)
        (gq,) = torch.autograd.grad(qo.sum(), q)
        (gq64,) = torch.autograd.grad(rope_ref(q.double(), k.double(), positions=torch.arange(T))[0].sum(), q)
        assert_close(f"{backend} grad_q", gq, gq64)
    else:
        q, k = torch.randn(0, Hq, T, D, device=device, requires_grad=True), torch.randn(0, Hk, T, D, device=device)
        qo, ko = rope(q, k, positions=torch.arange(T, device=device), backend=backend)
        assert qo.shape == q.shape and ko.shape == k.shape
        assert torch.autograd.grad(qo.sum(), q)[0].shape == q.shape


# Unit-stride layouts the CUDA kernel's packs path cannot take, for its staged path (csrc/cuda/rope.cu):
# (id, dtype, B, Hq, Hk, T, D, R, interleaved, how q and k are made, tables or positions).
STAGED = [
    # R/2 = 36, no multiple of 8: a pair's halves straddle packs; x and y rows in phase
    ("d72_half36", torch.bfloat16, 1, 3, 1, 3, 72, 72, False, "contiguous", "tables"),
    # base offset 1 and row stride 82: every row at another 16-byte phase, y (contiguous) out of
    # phase with x; partial rotary with 48 pass-through dims
    ("d80_r32_offset1", torch.float16, 2, 2, 1, 3, 80, 32, True, "offset1", "tables"),
    # views of a fused QKV projection at offset 3 (4-byte elements: another pack); R/2 = 9
    ("d96_r18_fused_qkv", torch.float32, 1, 2, 2, 3, 96, 18, False, "fused_qkv", "positions"),
    # 16 rows of 4 KB per token: more than 48 KB, so several passes over the heads
    ("d1002_passes", torch.float32, 1, 12, 4, 2, 1002, 998, True, "contiguous", "positions"),
    # one row of 49 KB: too long to stage, the element path takes it
    ("d12290_unstaged", torch.float32, 1, 1, 1, 1, 12290, 16, False, "contiguous", "positions"),
]


def _staged_qk(B, Hq, Hk, T, D, dtype, layout):
    if layout == "contiguous":
        return _qk(B, Hq, Hk, T, D, dtype)
    if layout == "offset1":
        return (torch.randn(B, Hq, T, D + 2, dtype=dtype)[..., 1:D + 1],
                torch.randn(B, Hk, T, D + 2, dtype=dtype)[..., 1:D + 1])
    qkv = torch.randn(B, T, 3 + (Hq + 2 * Hk) * D, dtype=dtype)[..., 3:]
    q, k, _ = qkv.split([Hq * D, Hk * D, Hk * D], -1)
    return q.view(B, T, Hq, D).transpose(1, 2), k.view(B, T, Hk, D).transpose(1, 2)


@pytest.mark.parametrize("backend,device,dtypes", cuda_params())
@pytest.mark.parametrize("dtype,B,Hq,Hk,T,D,R,interleaved,layout,mode", [pytest.param(*c[1:], id=c[0]) for c in STAGED])
def test_unaligned_unit_stride(backend, device, dtypes, dtype, B, Hq, Hk, T, D, R, interleaved, layout, mode):
    q, k = (x.to(device) for x in _staged_qk(B, Hq, Hk, T, D, dtype, layout))
    if mode == "tables":
        _check(backend, q, k, *_tables(B, T, R, interleaved, device, dtype), interleaved=interleaved)
    else:
        positions = torch.randint(0, 4096, (B, T), device=device)
        _check(backend, q, k, positions=positions, rotary_dim=R, interleaved=interleaved)


# ------------------------------------------------------------------ HF parity
def _hf_config(scaling, theta, head_dim=64):
    from transformers import LlamaConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, max_position_embeddings=2048,
                           rope_parameters=dict(scaling or {"rope_type": "default"}, rope_theta=theta))


@pytest.mark.parametrize("seq_len", [None, 5000])
@pytest.mark.parametrize("scaling", ["linear", "dynamic", "yarn", "yarn_mscale", "llama3"])
def test_frequencies_match_hf(scaling, seq_len):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {
        "linear": {"rope_type": "linear", "factor": 4.0},
        "dynamic": {"rope_type": "dynamic", "factor": 2.0},
        "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "beta_fast": 16},
        "yarn_mscale": {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 512,
                        "mscale": 0.707, "mscale_all_dim": 1.0},
        "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 256},
    }[scaling]
    config = _hf_config(params, 50000.0)
    inv_hf, scale_hf = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu", seq_len=seq_len)
    ours = dict(config.rope_parameters, max_position_embeddings=config.max_position_embeddings)
    inv, scale = rope_frequencies(64, 1.0, ours, seq_len=seq_len)  # rope_theta in the dict wins
    assert inv.dtype == torch.float32 and inv.shape == (32,)
    torch.testing.assert_close(inv, inv_hf, rtol=0, atol=0)
    assert scale == pytest.approx(scale_hf, rel=1e-12)


def test_default_frequencies_match_hf():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = _hf_config(None, 500000.0, head_dim=128)
    inv_hf, scale_hf = LlamaRotaryEmbedding.compute_default_rope_parameters(config, device="cpu")
    inv, scale = rope_frequencies(128, 500000.0)
    torch.testing.assert_close(inv, inv_hf, rtol=0, atol=0)
    assert scale == scale_hf == 1.0


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
@pytest.mark.parametrize("scaling", ["default", "yarn", "llama3", "dynamic"])
def test_llama_matches_hf(backend, device, dtypes, scaling):
    """fp32: fastlm.ops.rope == LLaMA's apply_rotary_pos_emb on HF's own rotary embedding, both
    from tables and from positions (the kernels computing cos/sin themselves)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    params = {"default": None, "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
              "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 256},
              "dynamic": {"rope_type": "dynamic", "factor": 2.0}}[scaling]
    config = _hf_config(params, 10000.0)
    q, k = _qk(2, 4, 2, 11, 64, torch.float32, device)
    positions = torch.randint(0, 4000, (2, 11), device=device)
    rotary = LlamaRotaryEmbedding(config).to(device)
    if scaling == "dynamic":
        # HF's forward passes seq_len as a tensor, which makes its dynamic NTK base fp32 math; with an
        # int seq_len (as at init, and as rope_frequencies always does) it is fp64. We follow the latter.
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        rotary.inv_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, device, seq_len=int(positions.max()) + 1)
        rotary.max_seq_len_cached = 1 << 30  # keep it: no update in forward
    cos, sin = rotary(q, positions)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    for name, (qo, ko) in {
        "tables": rope(q, k, cos, sin, backend=backend),
        "positions": rope(q, k, positions=positions, backend=backend, scaling=None if params is None else dict(
            config.rope_parameters, max_position_embeddings=config.max_position_embeddings)),
    }.items():
        tol = 1e-6 if name == "tables" else 2e-6  # positions: the kernels' sincosf vs torch.cos, 1 ulp
        torch.testing.assert_close(qo, q_hf, rtol=0, atol=tol, msg=lambda m: f"{name} q: {m}")
        torch.testing.assert_close(ko, k_hf, rtol=0, atol=tol, msg=lambda m: f"{name} k: {m}")


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_neox_and_gptj_match_hf(backend, device, dtypes):
    """Partial rotary: GPT-NeoX's rotate-half on the first R dims, GPT-J's interleaved pairs."""
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_apply
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj_apply

    B, Hq, T, D, R = 2, 3, 9, 80, 32
    q, k = _qk(B, Hq, Hq, T, D, torch.float32, device)
    cos, sin = _tables(B, T, R, False, device)
    q_hf, k_hf = neox_apply(q, k, cos, sin)
    qo, ko = rope(q, k, cos, sin, backend=backend)
    torch.testing.assert_close(qo, q_hf, rtol=0, atol=1e-6)
    torch.testing.assert_close(ko, k_hf, rtol=0, atol=1e-6)
    # GPT-J: (B, T, H, D) q, sin/cos (B, T, R/2), rotary part q[..., :R]
    qt = q.transpose(1, 2).contiguous()
    cos_i, sin_i = _tables(B, T, R, True, device)
    ref = torch.cat((gptj_apply(qt[..., :R], sin_i[..., ::2], cos_i[..., ::2]), qt[..., R:]), -1)
    qo, _ = rope(qt, qt, cos_i, sin_i, interleaved=True, heads_dim=2, backend=backend)
    torch.testing.assert_close(qo, ref, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("mode", ["tables", "positions"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_gradcheck_reference(mode, interleaved):
    q = torch.randn(2, 3, 5, 12, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, 5, 12, dtype=torch.float64, requires_grad=True)
    if mode == "tables":
        cos, sin = _tables(2, 5, 8, interleaved, dtype=torch.float64)
        kw = dict(cos=cos, sin=sin)
    else:
        kw = dict(positions=torch.arange(5), rotary_dim=8, scaling={"rope_type": "yarn", "factor": 4.0,
                                                                    "original_max_position_embeddings": 16})
    assert torch.autograd.gradcheck(lambda a, b: rope(a, b, interleaved=interleaved, backend="reference", **kw),
                                    (q, k))
    assert torch.autograd.gradgradcheck(lambda a, b: rope(a, b, interleaved=interleaved, backend="reference", **kw),
                                        (q, k))


# ------------------------------------------------------------------ registration / compile
def _op_samples(device, backend):
    q, k = _qk(2, 4, 2, 5, 32, torch.float32, device)
    q.requires_grad_()
    cos, sin = _tables(1, 5, 32, False, device)
    inv, _ = rope_frequencies(16)
    pos = torch.arange(5, device=device)[None]
    return [
        (q, k, cos[..., :16], sin[..., :16], None, None, 1.0, False, False, backend),
        (q, k.transpose(2, 3).contiguous().transpose(2, 3), None, None, pos, inv.to(device), 1.25, True, True,
         backend),
    ]


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_opcheck(backend, device, dtypes):
    for args in _op_samples(device, backend):
        torch.library.opcheck(torch.ops.fastlm.rope.default, args)


@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="extension not built")
def test_opcheck_extension_op():
    for args in _op_samples("cpu", None):
        q = args[0].detach()
        torch.library.opcheck(torch.ops.fastlm.rope_fwd.default, (q,) + args[1:-1])


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("mode", ["tables", "positions"])
def test_torch_compile_fullgraph(compiler, mode):
    _compile_case(compiler, mode, None, "cpu")


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_torch_compile_fullgraph_every_backend(backend, device, dtypes):
    for mode in ("tables", "positions"):
        _compile_case("aot_eager", mode, backend, device)


def _compile_case(compiler, mode, backend, device):
    torch._dynamo.reset()
    T = 6
    cos, sin = (t.to(device) for t in _tables(1, T, 32, False))

    def f(q, k, pos):
        if mode == "tables":
            qo, ko = rope(q * 2, k, cos, sin, backend=backend)
        else:
            qo, ko = rope(q * 2, k, positions=pos, scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                            "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 8}, backend=backend)
        return qo.sum(-1) + ko.sum((1, -1))[:, None]

    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    q, k = (t.to(device) for t in _qk(2, 4, 2, T, 32, torch.float32))
    q.requires_grad_(), k.requires_grad_()
    pos = torch.arange(T, device=device)
    out, out_ref = compiled(q, k, pos), f(q, k, pos)
    torch.testing.assert_close(out, out_ref)
    for g, g_ref in zip(torch.autograd.grad(out.sum(), (q, k)), torch.autograd.grad(out_ref.sum(), (q, k))):
        torch.testing.assert_close(g, g_ref)


def test_registered_for_info():
    from fastlm import backend

    assert "rope" in backend.ops()
    inputs = backend.example_inputs("rope", torch.device("cpu"))
    assert backend.report("rope", torch.device("cpu"), *inputs)["reference"] == []
    assert "dtype float16 not supported by the cpu backend" in "; ".join(
        backend.why_not("rope", "cpu", torch.device("cpu"), inputs[0].half(), *inputs[1:]))


# ------------------------------------------------------------------ bad input
def test_bad_inputs_name_argument_and_value():
    q, k = _qk(2, 4, 2, 5, 32, torch.float32)
    cos, sin = _tables(1, 5, 32, False)
    pos = torch.arange(5)
    cases = [
        (ValueError, r"give either cos and sin, or positions, not both", dict(cos=cos, sin=sin, positions=pos)),
        (ValueError, r"give cos and sin \(tables\), or positions \(computed tables\); got neither", {}),
        (ValueError, r"cos and sin go together; got sin=None", dict(cos=cos)),
        (ValueError, r"q must be 4-D \(B, H, T, D\), got shape \(4, 5, 32\)", dict(q=q[0], positions=pos)),
        (TypeError, r"k has dtype torch.float16 but q has dtype torch.float32", dict(k=k.half(), positions=pos)),
        (ValueError, r"k must match q in batch, sequence and head dim, got q \(2, 4, 5, 32\) and k \(2, 2, 4, 32\)",
         dict(k=k[:, :, :4], positions=pos)),
        (ValueError, r"the rotary dim R\) must be a positive even int <= the head dim 32, got 31",
         dict(cos=cos[..., :31], sin=sin[..., :31])),
        (ValueError, r"rotary_dim \(the rotary dim R\) must be a positive even int <= the head dim 32, got 64",
         dict(positions=pos, rotary_dim=64)),
        (ValueError, r"sin has shape \(1, 5, 16\) but cos has shape \(1, 5, 32\)", dict(cos=cos, sin=sin[..., :16])),
        (TypeError, r"sin has dtype torch.float16 but cos has dtype torch.float32", dict(cos=cos, sin=sin.half())),
        (ValueError, r"cos/sin of shape \(1, 4, 32\) don't fit q: expected \(1 or 2, 5, R\) or \(5, R\)",
         dict(cos=cos[:, :4], sin=sin[:, :4])),
        (ValueError, r"cos must be \(T, R\) or \(B or 1, T, R\), got shape \(32,\)", dict(cos=cos[0, 0], sin=sin[0, 0])),
        (TypeError, r"positions must be int64 or int32, got dtype torch.float32", dict(positions=pos.float())),
        (ValueError, r"positions must be \(5,\) or \(1 or 2, 5\), got shape \(3, 5\)",
         dict(positions=pos.expand(3, 5))),
        (ValueError, r"unknown rope_type 'ntk'; expected one of default, linear, dynamic, yarn, llama3",
         dict(positions=pos, scaling={"rope_type": "ntk"})),
        (ValueError, r"scaling of rope_type 'linear' needs 'factor'", dict(positions=pos, scaling={"rope_type": "linear"})),
        (ValueError, r"heads_dim must be 1 \(B, H, T, D\) or 2 \(B, T, H, D\), got 3", dict(positions=pos, heads_dim=3)),
        (ValueError, r"k is on meta but q is on cpu", dict(k=k.to("meta"), positions=pos)),
        (TypeError, r"q must be a floating-point tensor, got dtype torch.int64",
         dict(q=q.long(), k=k.long(), positions=pos)),
    ]
    for exc, match, kw in cases:
        args = dict(q=q, k=k)
        args.update(kw)
        with pytest.raises(exc, match=match):
            rope(**args)
    with pytest.raises(ValueError, match=r"rope: gradients to cos/sin are not computed, and cos requires grad"):
        rope(q, k, cos.clone().requires_grad_(), sin)
    with pytest.raises(ValueError, match=r"rotary_dim must be a positive even int, got 7"):
        rope_frequencies(7)


@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="extension not built")
def test_extension_op_validates_inputs():
    q, k = _qk(2, 4, 2, 5, 32, torch.float32)
    cos, sin = _tables(1, 5, 32, False)
    c, s = cos[..., :16], sin[..., :16]
    op = torch.ops.fastlm.rope_fwd
    with pytest.raises(TypeError, match=r"rope: q must be float32 or bfloat16 on cpu, got Half"):
        op(q.half(), k.half(), c, s, None, None, 1.0, False, False)
    with pytest.raises(ValueError, match=r"give either cos and sin, or positions and inv_freq"):
        op(q, k, c, None, None, None, 1.0, False, False)
    with pytest.raises(ValueError, match=r"cos must be \(1 or 2, 5, R/2\) with R <= 32, got \[1, 5, 17\]"):
        op(q, k, cos[..., :17], sin[..., :17], None, None, 1.0, False, False)
    with pytest.raises(TypeError, match=r"positions must be int64, got Int"):
        op(q, k, None, None, torch.arange(5, dtype=torch.int32)[None], torch.ones(16), 1.0, False, False)
