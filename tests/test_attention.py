"""scaled_dot_product_attention on every backend against a float64 oracle (numerics.py rule)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import fastlm
from fastlm import _ext
from fastlm.ops.attention import (
    BOTTOM_RIGHT, NO_CAUSAL, TOP_LEFT, scaled_dot_product_attention as sdpa, scaled_dot_product_attention_ref,
    scaled_dot_product_attention_with_lse as sdpa_lse,
)
from backends import EMU_MARKS, cuda_params, emulated_gpu
from numerics import assert_close

pytestmark = pytest.mark.filterwarnings("ignore:Lower right causal bias will produce NaNs")
HAS_CUDA = torch.cuda.is_available()
GPU = "cuda" if HAS_CUDA else None

BACKENDS = [
    pytest.param("reference", "cpu", (torch.float32, torch.float16, torch.bfloat16), id="reference"),
    pytest.param("cpu", "cpu", (torch.float32, torch.bfloat16), id="cpu"),
    # the interpreter's tl.dot is wrong for bf16 operands: bf16 on a GPU only
    pytest.param("triton", GPU or "cpu", (torch.float32, torch.float16) + ((torch.bfloat16,) if GPU else ()), id="triton"),
]
# cuda is fp16/bf16 only, so it joins the tests that run per dtype, not the fp32 ones
BACKEND_DTYPES = [
    pytest.param(p.values[0], p.values[1], dtype, id=f"{p.id}-{str(dtype)[6:]}", marks=p.marks)
    for p in BACKENDS + cuda_params((torch.float16, torch.bfloat16))
    for dtype in p.values[2]
]
CAUSAL = {"none": NO_CAUSAL, "top_left": TOP_LEFT, "bottom_right": BOTTOM_RIGHT}
# (B, H, H_kv, Tq, Tk, D, Dv): T in {1, 17, 97, 128, 257, 1025}, Tq != Tk both ways, head dims
# 32/64/80/128, H_kv in {H, H/2, 1}
SHAPES = [
    (2, 4, 4, 17, 17, 64, 64),
    (1, 4, 2, 97, 97, 32, 32),
    (2, 2, 1, 128, 128, 80, 80),
    (1, 2, 2, 1, 257, 128, 128),
    (1, 4, 1, 257, 97, 64, 64),
    (1, 2, 1, 17, 128, 80, 48),
    (1, 1, 1, 1025, 1025, 64, 64),
]


def _with_causal(mask, causal, tq, tk):
    """Torch-style arguments (attn_mask, is_causal) for a causal code."""
    if causal == TOP_LEFT:
        return (None, True) if mask is None else (mask & torch.ones(tq, tk, dtype=torch.bool).tril(), False)
    if causal == BOTTOM_RIGHT:
        return causal_lower_right(tq, tk), False
    return mask, False


def oracle(q, k, v, mask=None, causal=NO_CAUSAL, scale=None, softcap=0.0):
    """Independent plain math with autograd: fully masked rows give 0; keys no query sees are
    dropped; softcap > 0 caps the scores to softcap * tanh(s / softcap) before the masks."""
    tq, tk = q.shape[-2], k.shape[-2]
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device)
    if causal != NO_CAUSAL:
        allowed = allowed.tril(0 if causal == TOP_LEFT else tk - tq)
    if mask is not None and mask.dtype == torch.bool:
        allowed = allowed & mask
    elif mask is not None:
        s = s + mask
        allowed = allowed & (mask != -math.inf)
    allowed = allowed.expand(s.shape)
    dead_row = ~allowed.any(-1, keepdim=True)
    s = s.masked_fill(~allowed | dead_row, -math.inf).masked_fill(dead_row, 0.0)
    p = torch.softmax(s, -1).masked_fill(dead_row, 0.0)
    seen = allowed.any(-2).unsqueeze(-1)
    out = p @ torch.where(seen, v, torch.zeros((), dtype=v.dtype))
    return out


def _run(fn, q, k, v, grad, dtype=None):
    args = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*args)
    return out, torch.autograd.grad(out, args, grad.to(out.dtype))


def check(backend, q, k, v, mask=None, causal=NO_CAUSAL, scale=None, fp32_tol=None, softcap=0.0, backward=True):
    """Output and q/k/v grads (backward=False: the output only, under no_grad) of `backend` vs the
    fp64 oracle and the oracle run in q's dtype."""
    dtype = q.dtype
    tq, tk = q.shape[-2], k.shape[-2]
    attn_mask, is_causal = _with_causal(mask, causal, tq, tk)
    grad = torch.randn(q.shape[:-1] + v.shape[-1:], dtype=dtype, device=q.device)
    gqa = q.shape[1] != k.shape[1]
    m64 = mask.double() if mask is not None and mask.dtype != torch.bool else mask
    if not backward:
        with torch.no_grad():
            out = sdpa(q, k, v, attn_mask, 0.0, is_causal, scale=scale, enable_gqa=gqa, softcap=softcap,
                       backend=backend)
            out64 = oracle(q.double(), k.double(), v.double(), m64, causal, scale, softcap)
            base = oracle(q, k, v, mask, causal, scale, softcap)
        return assert_close(f"{backend} out", out, out64, base, fp32_tol=fp32_tol)
    out, grads = _run(lambda a, b, c: sdpa(a, b, c, attn_mask, 0.0, is_causal, scale=scale, enable_gqa=gqa,
                                           softcap=softcap, backend=backend), q, k, v, grad)
    out64, grads64 = _run(lambda a, b, c: oracle(a, b, c, m64, causal, scale, softcap), q, k, v, grad, torch.float64)
    base, grads0 = _run(lambda a, b, c: oracle(a, b, c, mask, causal, scale, softcap), q, k, v, grad)
    assert out.dtype == dtype and out.shape == base.shape
    assert_close(f"{backend} out", out, out64, base, fp32_tol=fp32_tol)
    for name, g, g64, g0 in zip(("grad_q", "grad_k", "grad_v"), grads, grads64, grads0):
        assert g.dtype == dtype and g.shape == g64.shape
        # grad_q of a query that sees one key is exactly 0 while dP - delta is not: delta comes
        # from the output rounded to fp16/bf16 (as in FlashAttention), so allow a small floor
        assert_close(f"{backend} {name}", g, g64, g0, kind="grad", atol=1e-4, fp32_tol=fp32_tol)


def _qkv(b, h, hkv, tq, tk, d, dv, dtype, device="cpu", qmul=1.0, kmul=1.0):
    q = torch.randn(b, h, tq, d, dtype=dtype, device=device) * qmul
    k = torch.randn(b, hkv, tk, d, dtype=dtype, device=device) * kmul
    return q, k, torch.randn(b, hkv, tk, dv, dtype=dtype, device=device)


# the interpreter is slow: triton gets fewer, smaller shapes that still cover T in {1, 17, 97,
# 128, 257}, Tq < Tk and Tq > Tk, head dims 32/80/128 (Dv != D) and H_kv in {H, H/2, 1}
TRITON_SHAPES = [(1, 2, 2, 1, 257, 128, 128), (1, 2, 1, 17, 128, 80, 48), (1, 2, 1, 97, 40, 32, 32)]
MATCH_CASES = [
    pytest.param(*p.values, shape, id=f"{p.id}-{'x'.join(map(str, shape))}", marks=p.marks)
    for p in BACKEND_DTYPES
    for shape in (TRITON_SHAPES if p.values[0] == "triton" else SHAPES)
    if not (shape[3] == 1025 and p.values[2] != torch.float32 and p.values[0] == "reference")
]


@pytest.mark.parametrize("causal", list(CAUSAL), ids=str)
@pytest.mark.parametrize("backend,device,dtype,shape", MATCH_CASES)
def test_matches_float64(backend, device, dtype, shape, causal):
    check(backend, *_qkv(*shape, dtype, device), causal=CAUSAL[causal])


MASKS = ["bool_bh", "bool_key_padding", "bool_2d", "additive_bh", "additive_2d"]


def _mask(kind, b, h, tq, tk, dtype):
    """A mask of `kind` whose rows 0 and 3 are fully masked (row 3 only where tq > 3)."""
    shape = {"bh": (b, h, tq, tk), "key_padding": (b, 1, 1, tk), "2d": (tq, tk)}[kind.split("_", 1)[1]]
    allowed = torch.rand(shape) > 0.3
    if kind.endswith("key_padding"):
        allowed[..., -3:] = False
    else:
        allowed[..., 0, :] = False
        allowed[..., min(3, tq - 1), :] = False
    if kind.startswith("bool"):
        return allowed
    return torch.randn(shape, dtype=dtype).masked_fill(~allowed, -math.inf)


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
def test_masks_with_fully_masked_rows(backend, device, dtype, kind):
    shapes = [(2, 4, 2, 37, 70, 64), (1, 2, 1, 130, 97, 32)] if backend != "triton" else [(2, 2, 1, 21, 35, 32)]
    if device == "cuda":
        shapes = [(2, 4, 2, 37, 70, 64), (1, 2, 1, 130, 97, 32)]
    for b, h, hkv, tq, tk, d in shapes:
        q, k, v = _qkv(b, h, hkv, tq, tk, d, d, dtype, device)
        check(backend, q, k, v, mask=_mask(kind, b, h, tq, tk, dtype).to(device))


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
def test_large_magnitudes(backend, device, dtype):
    shape = (1, 4, 2, 97, 128, 64, 64) if backend != "triton" else (1, 2, 1, 33, 40, 64, 64)
    for causal in (NO_CAUSAL, BOTTOM_RIGHT):
        # scores up to ~100: fp32's own rounding of them is ~1e-5, so the fp32 bound is 1e-4
        check(backend, *_qkv(*shape, dtype, device, qmul=5.0, kmul=3.0), causal=causal,
              fp32_tol=dict(rtol=1e-4, atol=1e-4))


@pytest.mark.parametrize("softcap", [0.0, 1.0, 30.0], ids=lambda c: f"softcap{c:g}")
@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
def test_softcap_matches_float64(backend, device, dtype, softcap):
    """Soft-capped scores (softcap * tanh(s / softcap), then the masks), out and q/k/v grads, with
    scores up to ~25 so the cap matters: causal with GQA, an additive mask with fully masked rows,
    a bool mask; triton also on its split-KV decode path, cuda at D = 128 and split-KV (forward)."""
    tol = dict(rtol=1e-4, atol=1e-4)  # scores up to ~25: fp32's own rounding of them is ~1e-5
    b, h, hkv, tq, tk, d = (1, 2, 1, 21, 35, 32) if backend == "triton" else (1, 4, 2, 37, 70, 64)
    qkv = lambda *shape: _qkv(*shape, dtype, device, qmul=2.5, kmul=2.5)  # noqa: E731
    check(backend, *qkv(b, h, hkv, tq, tk, d, d), causal=TOP_LEFT, softcap=softcap, fp32_tol=tol)
    for kind in ("additive_bh", "bool_2d"):
        mask = _mask(kind, b, h, tq, tk, dtype).to(device)
        check(backend, *qkv(b, h, hkv, tq, tk, d, d), mask=mask, softcap=softcap, fp32_tol=tol)
    if backend == "triton":
        check(backend, *qkv(1, 4, 1, 3, 260, 32, 32), causal=BOTTOM_RIGHT, softcap=softcap, fp32_tol=tol)
    if backend.startswith("cuda"):
        check(backend, *qkv(1, 2, 1, 33, 70, 128, 128), causal=BOTTOM_RIGHT, softcap=softcap)
        check(backend, *qkv(1, 4, 2, 2, 1100, 64, 64), softcap=softcap, backward=False)  # split-KV


@pytest.mark.parametrize("softcap", [0.0, 5.0], ids=lambda c: f"softcap{c:g}")
@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_nan_in_hidden_values_does_not_leak(backend, device, dtypes, softcap):
    q, k, v = _qkv(2, 2, 2, 33, 75, 64, 64, torch.float32, device)
    keep = torch.ones(2, 1, 1, 75, dtype=torch.bool)
    keep[0, ..., 5] = keep[1, ..., 70:] = False
    v[0, :, 5] = float("nan")
    v[1, :, 70:] = float("nan")
    k[1, :, 72] = float("nan")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = sdpa(q, k, v, keep, softcap=softcap, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert not out.isnan().any(), f"{backend}: NaN from hidden value rows reached the output"
    for name, g in zip("qkv", grads):
        assert not g.isnan().any(), f"{backend}: NaN in grad_{name}"
    assert torch.equal(grads[2][0, :, 5], torch.zeros_like(grads[2][0, :, 5]))


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_fully_masked_rows_give_zero_not_nan(backend, device, dtypes):
    # bottom-right with Tq > Tk: the first Tq - Tk queries see nothing
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 2, 40, 25, 32, 32, torch.float32, device))
    out, lse = sdpa_lse(q, k, v, causal_lower_right(40, 25), backend=backend)
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.equal(out[:, :, :15], torch.zeros_like(out[:, :, :15]))
    assert torch.equal(gq[:, :, :15], torch.zeros_like(gq[:, :, :15]))
    assert (lse[:, :, :15] == -math.inf).all() and lse[:, :, 15:].isfinite().all()
    assert not (gk.isnan().any() or gv.isnan().any())


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_lse_matches(backend, device, dtypes):
    q, k, v = _qkv(2, 4, 1, 70, 90, 64, 64, torch.float32, device)
    out, lse = sdpa_lse(q, k, v, is_causal=True, enable_gqa=True, backend=backend)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 70)
    s = (q.double() @ k.double().repeat_interleave(4, 1).transpose(-1, -2)) / 8
    s = s.masked_fill(~torch.ones(70, 90, dtype=torch.bool).tril(), -math.inf)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_same_as_torch_sdpa(backend, device, dtypes):
    """Drop-in: torch's own SDPA in fp64 agrees, including is_causal's top-left alignment for
    Tq != Tk both ways, CausalBias objects, a float scale and non-contiguous inputs."""
    for tq, tk in ((20, 50), (50, 20)):
        base = torch.randn(2, tq, 4, 32, dtype=torch.float64)  # (B, T, H, D) transposed: non-contiguous
        q = base.transpose(1, 2)
        k = torch.randn(2, tk, 2, 32, dtype=torch.float64).transpose(1, 2)
        v = torch.randn(2, 2, 16, tk, dtype=torch.float64).transpose(-1, -2)
        for mask, is_causal in ((None, True), (causal_upper_left(tq, tk), False), (causal_lower_right(tq, tk), False)):
            if tq > tk and isinstance(mask, type(causal_lower_right(1, 1))) and mask.variant.name == "LOWER_RIGHT":
                continue  # torch gives NaN for the fully masked rows there; ours is 0 (tested above)
            want = F.scaled_dot_product_attention(q, k, v, mask, 0.0, is_causal, scale=0.3, enable_gqa=True)
            got = sdpa(q.float(), k.float(), v.float(), mask, 0.0, is_causal, scale=0.3, enable_gqa=True, backend=backend)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_is_causal_is_top_left_like_torch():
    """torch's is_causal with Tq < Tk lets query 0 see only key 0 (top-left), not Tk - Tq + 1 keys."""
    q, k, v = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(want[0, 0, 0], v[0, 0, 0])
    torch.testing.assert_close(sdpa(q, k, v, is_causal=True), want)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_repeatable_bitwise(backend, device, dtypes):
    b, tq, tk = (2, 130, 150) if backend != "triton" else (1, 40, 50)
    q, k, v = (t.requires_grad_() for t in _qkv(b, 4, 2, tq, tk, 64, 64, torch.float32, device))
    grad = torch.randn(b, 4, tq, 64, device=device)
    runs = []
    for _ in range(2):
        out = sdpa(q, k, v, is_causal=True, enable_gqa=True, backend=backend)
        runs.append((out,) + torch.autograd.grad(out, (q, k, v), grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_empty_batch_and_single_key(backend, device, dtypes):
    q, k, v = (t.requires_grad_() for t in _qkv(0, 2, 2, 5, 7, 32, 32, torch.float32, device))
    out = sdpa(q, k, v, backend=backend)
    assert out.shape == (0, 2, 5, 32)
    out.sum().backward()
    assert q.grad.shape == q.shape
    check(backend, *_qkv(1, 2, 2, 9, 1, 32, 32, torch.float32, device))


def test_dropout_reference_seeded_and_differentiable():
    q, k, v = _qkv(1, 2, 2, 5, 7, 4, 4, torch.float64)
    a = sdpa(q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(7))
    b = sdpa(q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(7))
    c = sdpa(q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(8))
    torch.manual_seed(3)
    d = sdpa(q, k, v, dropout_p=0.3)
    torch.manual_seed(3)
    e = sdpa(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b) and torch.equal(d, e) and not torch.equal(a, c)
    assert not torch.allclose(a, sdpa(q, k, v))
    # the backward regenerates the forward's mask: gradcheck through a fixed seed
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.autograd.gradcheck(
        lambda x, y, z: sdpa(x, y, z, dropout_p=0.3, is_causal=True, generator=torch.Generator().manual_seed(1)),
        inputs,
    )
    # fp64 dropout is the reference's (cpu serves fp32/bf16 only)
    assert torch.equal(a, sdpa(q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(7), backend="reference"))


@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="extension not built")
def test_dropout_auto_picks_cpu_and_cuda_says_why_not():
    """Training-mode attention on CPU fp32/bf16 stays on the cpu kernel; cuda has no dropout."""
    from fastlm import backend as registry
    from fastlm.ops.attention import OP

    q, k, v = _qkv(1, 2, 2, 5, 7, 8, 8, torch.float32)
    assert registry.select(OP, q.device, q, k, v, None, 0.3, NO_CAUSAL) == "cpu"
    assert registry.why_not(OP, "cpu", q.device, q, k, v, None, 0.3, NO_CAUSAL) == []
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    auto = sdpa(q, k, v, dropout_p=0.3, generator=gen())
    assert torch.equal(auto, sdpa(q, k, v, dropout_p=0.3, generator=gen(), backend="cpu"))
    assert not torch.equal(auto, sdpa(q, k, v, dropout_p=0.3, generator=gen(), backend="reference"))
    reasons = registry.why_not(OP, "cuda", q.device, q.half(), k.half(), v.half(), None, 0.3, NO_CAUSAL)
    assert "dropout_p > 0 not supported by the cuda backend (reference, cpu and triton only)" in reasons
    # the raw ops: dropout_p and seed last, validated
    out, lse = torch.ops.fastlm.attention_fwd(q, k, v, None, 0, 0.5, 0.0, -1, -1, None, None, 0.3, 123)
    again, lse2 = torch.ops.fastlm.attention_fwd(q, k, v, None, 0, 0.5, 0.0, -1, -1, None, None, 0.3, 123)
    plain, lse0 = torch.ops.fastlm.attention_fwd(q, k, v, None, 0, 0.5)
    assert torch.equal(out, again) and torch.equal(lse, lse0) and not torch.equal(out, plain)
    torch.library.opcheck(torch.ops.fastlm.attention_fwd.default,
                          (q, k, v, None, 0, 0.5, 0.0, -1, -1, None, None, 0.3, 123))
    torch.library.opcheck(torch.ops.fastlm.attention_bwd.default,
                          (torch.randn_like(out), q, k, v, None, out, lse, 0, 0.5, 0.0, -1, -1, None, 0.3, 123))
    with pytest.raises(ValueError, match=r"attention: dropout_p must be in \[0, 1\), got 1"):
        torch.ops.fastlm.attention_fwd(q, k, v, None, 0, 0.5, 0.0, -1, -1, None, None, 1.0, 0)
    with pytest.raises(ValueError, match=r"attention_backward: dropout_p must be in \[0, 1\), got -0.1"):
        torch.ops.fastlm.attention_bwd(out, q, k, v, None, out, lse, 0, 0.5, 0.0, -1, -1, None, -0.1, 0)


DROPOUT_RUNS = [
    pytest.param("triton", GPU or "cpu", torch.float32, id="triton"),
    pytest.param("cpu", "cpu", torch.float32, id="cpu-float32"),
    pytest.param("cpu", "cpu", torch.bfloat16, id="cpu-bfloat16"),
]


def _dropout_probe(backend, b, h, hkv, tq, tk, p, device="cpu", dtype=torch.float32, generator=None):
    """The keep-mask (B, H, Tq, Tk) a backend draws, read back through its output: q = k = 0 and
    v = I give out[..., i, j] = keep[i, j] / (1 - p) / Tk."""
    zeros = torch.zeros(b, h, tq, 16, device=device, dtype=dtype)
    keys = torch.zeros(b, hkv, tk, 16, device=device, dtype=dtype)
    eye = torch.eye(tk, device=device, dtype=dtype).expand(b, hkv, tk, tk)
    probe = sdpa(zeros, keys, eye, dropout_p=p, generator=generator, enable_gqa=hkv != h, backend=backend)
    return probe


def _triton_kernel_keep(b, h, hkv, tq, tk, p, seed):
    """The Triton kernels' keep-mask for a seed int, from fastlm/triton/attention.py's forward
    called directly (the interpreter on CPU tensors without a GPU)."""
    from fastlm.triton import attention as kernels

    device = GPU or "cpu"
    zeros = torch.zeros(b, h, tq, 16, device=device)
    keys = torch.zeros(b, hkv, tk, 16, device=device)
    eye = torch.eye(tk, device=device).expand(b, hkv, tk, tk)
    out, _ = kernels.forward(zeros, keys, eye, None, NO_CAUSAL, 1.0, p, seed)
    return (out > 0).cpu()


@pytest.mark.parametrize("backend,device,dtype", DROPOUT_RUNS)
def test_dropout_triton_matches_its_mask(backend, device, dtype):
    """The backend's Philox keep-mask, read back through the output (q = k = 0, v = I gives
    out[i, j] = keep[i, j] / (1 - p) / Tk), then out and grads against fp64 math with that mask
    (low precision: within the repo's factor of the same math run in that dtype)."""
    p, b, h, tq, tk = 0.25, 1, 2, 20, 24
    gen = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    probe = _dropout_probe(backend, b, h, h, tq, tk, p, device, dtype, gen())
    keep = probe > 0
    assert 0.6 < keep.float().mean() < 0.9
    torch.testing.assert_close(probe[keep].float(), torch.full_like(probe[keep], 1 / (1 - p) / tk).float(),
                               **({} if dtype == torch.float32 else dict(rtol=1e-2, atol=0)))
    for causal in (False, True):
        q, k, v = (t.requires_grad_() for t in _qkv(b, h, h, tq, tk, 32, 32, dtype, device))
        out = sdpa(q, k, v, dropout_p=p, is_causal=causal, generator=gen(), backend=backend)
        again = sdpa(q, k, v, dropout_p=p, is_causal=causal, generator=gen(), backend=backend)
        assert torch.equal(out, again)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad)

        def math_(q_, k_, v_):
            s_ = (q_ @ k_.transpose(-1, -2)) / math.sqrt(32)
            if causal:
                s_ = s_.masked_fill(~torch.ones(tq, tk, dtype=torch.bool, device=device).tril(), -math.inf)
            return (torch.softmax(s_, -1) * keep / (1 - p)) @ v_

        out64, grads64 = _run(math_, q, k, v, grad, torch.float64)
        base, grads0 = _run(math_, q, k, v, grad) if dtype != torch.float32 else (None, (None,) * 3)
        assert_close(f"{backend} dropout out", out, out64, base)
        for name, g, g64, g0 in zip("qkv", grads, grads64, grads0):
            assert_close(f"{backend} dropout grad_{name}", g, g64, g0, kind="grad", atol=1e-4)


# (B, H, H_kv, Tq, Tk): one score, odd sizes past a tile, GQA (the query head picks the mask), Tq != Tk
DROPOUT_MASK_SHAPES = [(1, 1, 1, 1, 1), (2, 3, 3, 20, 24), (1, 4, 2, 70, 33), (2, 2, 1, 17, 130)]


@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="extension not built")
@pytest.mark.parametrize("shape", DROPOUT_MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dropout_cpu_mask_is_tritons(shape):
    """The cpu kernel draws exactly the Triton kernels' keep-mask (csrc/cpu/philox.h is tl.rand
    bit for bit): for the same generator seed through the op, and for raw seed ints, the int32
    wrap of seed + b * H + h included (0x7FFFFFFF)."""
    from fastlm.ops.attention import _seed_int

    b, h, hkv, tq, tk = shape
    for p, gen_seed in ((0.25, 0), (0.1, 11), (0.5, 2024)):
        probe = _dropout_probe("cpu", b, h, hkv, tq, tk, p, generator=torch.Generator().manual_seed(gen_seed))
        # the seed the op draws from that generator, as it hands it to the Triton kernels
        drawn = torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(gen_seed), dtype=torch.int64)
        triton_keep = _triton_kernel_keep(b, h, hkv, tq, tk, p, _seed_int(drawn))
        assert torch.equal(probe > 0, triton_keep), f"p={p}, generator seed {gen_seed}"
        if tq * tk >= 100:
            assert abs((probe > 0).float().mean().item() - (1 - p)) < 0.1
    for seed in (0, 1, 0x7FFFFFFF - 1, 0x7FFFFFFF):
        zeros = torch.zeros(b, h, tq, 16)
        keys = torch.zeros(b, hkv, tk, 16)
        eye = torch.eye(tk).expand(b, hkv, tk, tk)
        out, _ = torch.ops.fastlm.attention_fwd(zeros, keys, eye, None, 0, 1.0, 0.0, -1, -1, None, None, 0.3, seed)
        assert torch.equal(out > 0, _triton_kernel_keep(b, h, hkv, tq, tk, 0.3, seed)), f"seed {seed}"


@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_cpu_composes_with_every_option(dtype, monkeypatch):
    """cpu dropout with GQA, bottom-right causal, a bool mask, softcap, window, ALiBi and sinks
    against the reference run in fp64 with the same keep-mask (the cpu's, read back by a probe and
    handed to the reference's dropout_keep): out, lse (undropped statistics) and q/k/v/sinks grads."""
    import fastlm.ops.attention as attention_mod

    b, h, hkv, tq, tk, d, p = 2, 4, 2, 37, 70, 32, 0.2
    keep = _dropout_probe("cpu", b, h, hkv, tq, tk, p, generator=torch.Generator().manual_seed(5)) > 0
    monkeypatch.setattr(attention_mod, "dropout_keep", lambda seed, shape, p_, device: keep.expand(shape).to(device))
    q, k, v = _qkv(b, h, hkv, tq, tk, d, d, dtype)
    mask = torch.rand(b, 1, tq, tk) > 0.2
    slopes, sinks = torch.rand(h) * 0.3, torch.randn(h)
    cases = [dict(is_causal=True), dict(attn_mask=causal_lower_right(tq, tk), softcap=5.0),
             dict(attn_mask=mask, window=(9, 4), alibi_slopes=slopes, sinks=sinks)]
    grad = torch.randn(b, h, tq, d, dtype=dtype)
    for kw in cases:
        def run(backend, cast):
            leaves = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
            extra = dict(kw)
            if "sinks" in extra:
                extra["sinks"] = extra["sinks"].to(torch.float64 if cast == torch.float64 else torch.float32) \
                    .requires_grad_()
                leaves.append(extra["sinks"])
            out, lse = sdpa_lse(*leaves[:3], dropout_p=p, enable_gqa=True, generator=torch.Generator().manual_seed(5),
                                backend=backend, **extra)
            return out, lse, torch.autograd.grad(out, leaves, grad.to(out.dtype))

        out, lse, grads = run("cpu", dtype)
        out64, lse64, grads64 = run("reference", torch.float64)
        base, _, grads0 = run("reference", dtype) if dtype != torch.float32 else (None, None, (None,) * 4)
        name = ", ".join(kw)
        assert_close(f"cpu dropout out ({name})", out, out64, base)
        torch.testing.assert_close(lse.double(), lse64.double(), rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 2e-2,
                                   msg=lambda m: f"cpu dropout lse ({name}): {m}")
        for gname, g, g64, g0 in zip(("q", "k", "v", "sinks"), grads, grads64, grads0):
            # the sinks' grad is fp32 but comes from the low-precision out and dO: judge it by q's dtype's rule
            g = g.to(dtype) if gname == "sinks" else g
            assert_close(f"cpu dropout grad_{gname} ({name})", g, g64, g0, kind="grad", atol=1e-4)


def test_reference_gradients_gradcheck():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 1, 5, 7, 4, 4, torch.float64))
    mask = torch.rand(5, 7) > 0.3
    mask[2] = False
    torch.autograd.gradcheck(lambda a, b, c: scaled_dot_product_attention_ref(a, b, c, mask, enable_gqa=True), (q, k, v))
    # softcap's explicit backward (dS times 1 - tanh^2) against numerical gradients too
    q, k = (t.detach().mul(3.0).requires_grad_() for t in (q, k))
    torch.autograd.gradcheck(
        lambda a, b, c: scaled_dot_product_attention_ref(a, b, c, mask, enable_gqa=True, softcap=2.0), (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else []), ids=str)
def test_triton_decode_split_kv(dtype):
    """Tq <= 16 against many keys: the split-KV forward (GQA rows packed per program), then the
    regular backward from its out and lse."""
    from fastlm.triton import attention_decode

    device = GPU or "cpu"
    cases = [((1, 8, 2, 3, 300, 64, 64), BOTTOM_RIGHT, None), ((2, 2, 2, 1, 290, 32, 32), NO_CAUSAL, "bool_key_padding"),
             ((1, 4, 1, 5, 260, 32, 32), NO_CAUSAL, "additive_bh")]
    for shape, causal, kind in cases:
        q, k, v = _qkv(*shape, dtype, device)
        assert attention_decode.serves(q, k)
        mask = None if kind is None else _mask(kind, shape[0], shape[1], shape[3], shape[4], dtype).to(device)
        check("triton", q, k, v, mask=mask, causal=causal)


@pytest.mark.parametrize("causal", ["none", "bottom_right"])
def test_triton_ieee_fp32_wide_heads(causal):
    """fp32 without TF32 at head dims from 128: dQ reads q and dO in 64-column chunks (not kept
    resident); D = 200 / Dv = 136 check the chunks' column masks; with a mask too."""
    from fastlm.triton import attention as triton_attention

    assert triton_attention.fp32_precision() == "ieee"
    q, k, v = _qkv(1, 2, 1, 20, 33, 256, 256, torch.float32, GPU or "cpu")
    check("triton", q, k, v, causal=CAUSAL[causal])
    check("triton", *_qkv(1, 2, 2, 20, 33, 200, 136, torch.float32, GPU or "cpu"), causal=CAUSAL[causal])
    if causal == "none":
        check("triton", q, k, v, mask=_mask("bool_bh", 1, 2, 20, 33, torch.float32).to(GPU or "cpu"))


# the cuda backend on a GPU and under the emulator: (backend, device)
CUDA_RUNS = [pytest.param(p.values[0], p.values[1], id=p.id, marks=p.marks) for p in cuda_params()]


@pytest.mark.parametrize("backend,device", CUDA_RUNS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", list(CAUSAL), ids=str)
def test_cuda_forward_matches_float64(backend, device, dtype, causal):
    """The tensor-core forward against the fp64 oracle, out and lse, up to head dim 256 (no grad);
    decode shapes with GQA/MQA packing and split-KV."""
    shapes = [(2, 4, 4, 300, 300, 96, 96), (1, 2, 2, 65, 130, 256, 256), (1, 2, 1, 33, 70, 32, 64)]
    shapes += [(1, 8, 2, 1, 4096, 128, 128), (2, 4, 4, 5, 2000, 64, 64), (1, 2, 1, 16, 1500, 256, 256)]  # split-KV
    shapes += [(2, 8, 1, 3, 130, 64, 64), (1, 12, 4, 1, 77, 80, 80)]  # packed GQA / MQA decode
    if device == "cuda":
        shapes += SHAPES
    for shape in shapes:
        q, k, v = _qkv(*shape, dtype, device)
        attn_mask, is_causal = _with_causal(None, CAUSAL[causal], shape[3], shape[4])
        with torch.no_grad():
            out, lse = sdpa_lse(q, k, v, attn_mask, is_causal=is_causal, enable_gqa=shape[1] != shape[2], backend=backend)
            out64 = oracle(q.double(), k.double(), v.double(), causal=CAUSAL[causal])
            base = oracle(q, k, v, causal=CAUSAL[causal])
            _, lse64 = sdpa_lse(q.double(), k.double(), v.double(), attn_mask, is_causal=is_causal,
                                enable_gqa=shape[1] != shape[2], backend="reference")
        assert_close(f"{backend} out {shape}", out, out64, base)
        finite = lse64.isfinite()
        assert torch.equal(finite, lse.isfinite()), f"{backend} lse {shape}: -inf rows differ"
        torch.testing.assert_close(lse[finite].double(), lse64[finite].double(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend,device", CUDA_RUNS)
def test_cuda_forward_masks_and_nan(backend, device):
    for kind in MASKS:
        q, k, v = _qkv(2, 4, 2, 37, 70, 64, 64, torch.float16, device)
        mask = _mask(kind, 2, 4, 37, 70, torch.float16).to(device)
        with torch.no_grad():
            out = sdpa(q, k, v, mask, enable_gqa=True, backend=backend)
            m64 = mask if mask.dtype == torch.bool else mask.double()
            assert_close(f"{backend} {kind}", out, oracle(q.double(), k.double(), v.double(), m64), oracle(q, k, v, mask))
    keep = torch.ones(1, 1, 1, 75, dtype=torch.bool, device=device)
    keep[..., 70:] = False
    q, k, v = _qkv(1, 2, 2, 33, 75, 64, 64, torch.bfloat16, device)
    v[:, :, 70:] = float("nan")
    with torch.no_grad():
        assert not sdpa(q, k, v, keep, backend=backend).isnan().any()


@pytest.mark.parametrize("backend,device", CUDA_RUNS)
def test_cuda_layouts_and_head_dims(backend, device):
    """Forward and backward on layouts the 16-byte loads can't take as they are (head dim 20,
    (B, T, H, D) views, a storage offset of 3 elements), on head dims 96 and 80 (96-wide tiles),
    an odd head dim and a negative scale."""
    q, k, v = _qkv(1, 4, 2, 45, 70, 20, 20, torch.float16, device)
    check(backend, q, k, v, causal=TOP_LEFT)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv(2, 4, 4, 50, 50, 64, 64, torch.float16, device))
    assert q.stride(2) == 4 * 64
    check(backend, q, k, v, causal=BOTTOM_RIGHT)
    flat = torch.randn(3 + 2 * 2 * 40 * 64, dtype=torch.bfloat16, device=device)
    q = flat[3:].view(2, 2, 40, 64)
    check(backend, q, q.clone(), q.clone())
    check(backend, *_qkv(1, 2, 1, 70, 90, 96, 96, torch.float16, device))
    check(backend, *_qkv(1, 3, 3, 33, 40, 80, 80, torch.bfloat16, device), causal=TOP_LEFT)
    # an odd head dim (the dQ sums' rows are padded to even), and a negative scale (no tile may
    # take the max of unscaled scores then)
    check(backend, *_qkv(1, 2, 1, 70, 66, 13, 13, torch.float16, device), causal=BOTTOM_RIGHT, scale=-0.3)


# (B, H, H_kv, Tq, Tk, D, Dv, dtype) for the D = 129..256 backward (32-key CTAs, dK/dV split by
# column halves): every head dim there, Dv != D, GQA and MQA, ragged Tq and Tk both ways
WIDE_SHAPES = [(1, 2, 2, 37, 45, 256, 256, torch.float16), (1, 4, 1, 20, 50, 160, 160, torch.bfloat16),
               (1, 4, 2, 45, 19, 192, 136, torch.float16)]


@pytest.mark.parametrize("backend,device", CUDA_RUNS)
@pytest.mark.parametrize("causal", ["top_left", "bottom_right"], ids=str)
def test_cuda_backward_wide_heads(backend, device, causal):
    """Head dims 160..256 forward and backward against the fp64 oracle, both causal alignments."""
    for *shape, dtype in WIDE_SHAPES:
        check(backend, *_qkv(*shape, dtype, device), causal=CAUSAL[causal])


@pytest.mark.parametrize("backend,device", CUDA_RUNS)
def test_cuda_backward_wide_heads_masks_and_nan(backend, device):
    """D = 256 backward under masks with fully masked rows (bool and additive) and non-causal, then
    NaN in K and V rows a key-padding mask hides: the grads are bit for bit those of the same inputs
    with those rows finite (nothing leaks, and the dQ sums' order is fixed)."""
    for kind in ("bool_bh", "additive_2d"):
        q, k, v = _qkv(1, 2, 1, 20, 40, 256, 256, torch.float16, device)
        check(backend, q, k, v, mask=_mask(kind, 1, 2, 20, 40, torch.float16).to(device))
    q, k, v = _qkv(1, 4, 2, 20, 40, 256, 256, torch.bfloat16, device)
    keep = _mask("bool_key_padding", 1, 4, 20, 40, None).to(device)  # the last 3 keys hidden
    grad = torch.randn(1, 4, 20, 256, dtype=torch.bfloat16, device=device)
    out, grads = _run(lambda a, b, c: sdpa(a, b, c, keep, enable_gqa=True, backend=backend), q, k, v, grad)
    k[:, :, -3:], v[:, :, -3:] = float("nan"), float("nan")
    out_nan, grads_nan = _run(lambda a, b, c: sdpa(a, b, c, keep, enable_gqa=True, backend=backend), q, k, v, grad)
    assert torch.equal(out_nan, out)
    for name, g, g_nan in zip("qkv", grads, grads_nan):
        assert torch.equal(g_nan, g), f"{backend}: grad_{name} changed by NaN behind the mask"
    for g in grads[1:]:  # hidden keys get no gradient
        assert torch.equal(g[:, :, -3:], torch.zeros_like(g[:, :, -3:]))


def test_cuda_backend_reasons():
    from fastlm import backend as registry
    from fastlm.ops.attention import OP

    q = torch.randn(1, 2, 4, 256, requires_grad=True)
    reasons = registry.why_not(OP, "cuda", torch.device("cpu"), q, q, q, None, 0.0, TOP_LEFT)
    assert "dtype float32 not supported by the cuda backend (float16, bfloat16)" in reasons
    assert not any("head dim" in r or "backward" in r for r in reasons)  # 256 has a backward too
    wide = torch.randn(1, 2, 4, 300, dtype=torch.float16, requires_grad=True)
    reasons = registry.why_not(OP, "cuda", torch.device("cpu"), wide, wide, wide, None, 0.0, TOP_LEFT)
    assert "head dim 300 > 256 not supported by the cuda backend" in reasons
    assert not any("dtype" in r or "shared memory" in r for r in reasons)


# ------------------------------------------------------------------ registration / compile
def _op_samples(device, backend):
    q, k, v = _qkv(2, 2, 1, 19, 20, 16, 16, torch.float32, device)
    mask = torch.rand(2, 1, 19, 20, device=device) > 0.2
    slopes, sinks = torch.rand(2, 2, device=device), torch.randn(2, device=device)
    # (..., causal, scale, softcap, window_left, window_right, alibi slopes, sinks, seed, backend)
    return [(q, k, v, None, 0.0, TOP_LEFT, 0.2, 0.0, -1, -1, None, None, None, backend),
            (q, k, v, mask, 0.0, NO_CAUSAL, 0.2, 5.0, 6, 3, slopes, sinks, None, backend)]  # the interpreter runs this


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_opcheck(backend, device, dtypes):
    samples = _op_samples(device, backend)
    for args in samples[1:] if backend == "triton" and device == "cpu" else samples:  # interpreter: one sample
        q, k, v = (t.requires_grad_() for t in args[:3])
        sinks = None if args[11] is None else args[11].clone().requires_grad_()  # sinks get a gradient too
        torch.library.opcheck(torch.ops.fastlm.attention.default, (q, k, v) + args[3:11] + (sinks,) + args[12:])
        out, lse = torch.ops.fastlm.attention(*args)
        bwd = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), args[3], out.detach(), lse) + args[4:]
        torch.library.opcheck(torch.ops.fastlm.attention_backward.default, bwd)


@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="extension not built")
def test_opcheck_extension_ops():
    q, k, v = _qkv(1, 2, 1, 21, 40, 48, 16, torch.float32)
    mask = torch.randn(1, 1, 21, 40)
    for m, causal, softcap in ((None, BOTTOM_RIGHT, 0.0), (mask, NO_CAUSAL, 3.0)):
        torch.library.opcheck(torch.ops.fastlm.attention_fwd.default, (q, k, v, m, causal, 0.5, softcap))
        out, lse = torch.ops.fastlm.attention_fwd(q, k, v, m, causal, 0.5, softcap)
        args = (torch.randn_like(out), q, k, v, m, out, lse, causal, 0.5, softcap)
        torch.library.opcheck(torch.ops.fastlm.attention_bwd.default, args)


@pytest.mark.parametrize("compiler,softcap", [("aot_eager", 0.0), ("aot_eager", 5.0), ("inductor", 5.0)])
def test_torch_compile_fullgraph(compiler, softcap):
    torch._dynamo.reset()

    def f(q, k, v):
        return sdpa(q * 2, k, v, is_causal=True, enable_gqa=True, softcap=softcap).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    q, k, v = (t.requires_grad_() for t in _qkv(2, 4, 2, 33, 33, 32, 32, torch.float32))
    out, out_ref = compiled(q, k, v), f(q, k, v)
    torch.testing.assert_close(out, out_ref)
    for g, g_ref in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(out_ref.sum(), (q, k, v))):
        torch.testing.assert_close(g, g_ref)


# ------------------------------------------------------------------ bad input
def test_bad_inputs_name_argument_and_value():
    q, k, v = _qkv(2, 4, 2, 8, 8, 32, 32, torch.float32)
    with pytest.raises(fastlm.BackendUnavailableError, match=r"head dim 300 > 256 not supported by the cpu backend"):
        sdpa(torch.randn(1, 1, 4, 300), torch.randn(1, 1, 4, 300), torch.randn(1, 1, 4, 300), backend="cpu")
    with pytest.raises(ValueError, match=r"key head dim 16 != query head dim 32"):
        sdpa(q, k[..., :16], v)
    with pytest.raises(ValueError, match=r"query has 4 heads and key/value 2; needs enable_gqa=True for H != H_kv"):
        sdpa(q, k, v)
    with pytest.raises(ValueError, match=r"query has 4 heads and key/value 3; needs H to be a multiple of H_kv"):
        sdpa(q, torch.randn(2, 3, 8, 32), torch.randn(2, 3, 8, 32), enable_gqa=True)
    with pytest.raises(ValueError, match=r"value shape \(2, 2, 7, 32\) does not match key shape \(2, 2, 8, 32\)"):
        sdpa(q, k, v[:, :, :7], enable_gqa=True)
    with pytest.raises(ValueError, match=r"batch sizes differ: query 2, key 1, value 2"):
        sdpa(q, k[:1], v, enable_gqa=True)
    with pytest.raises(ValueError, match=r"query must be \(..., H, T, D\) with at least 3 dims, the same number as "
                                         r"query's, got shape \(4, 8, 32\)"):
        sdpa(q[0], k, v)
    with pytest.raises(ValueError, match=r"query must be \(..., H, T, D\) with at least 3 dims.*got shape \(8, 32\)"):
        sdpa(q[0, 0], k[0, 0], v[0, 0])
    with pytest.raises(ValueError, match=r"key's leading \(batch\) dims \(3, 2\) differ from query's \(2, 2\)"):
        sdpa(q[None].expand(2, -1, -1, -1, -1), k[None].expand(3, -1, -1, -1, -1), v[None].expand(3, -1, -1, -1, -1))
    with pytest.raises(TypeError, match=r"key has dtype torch.bfloat16 but query has dtype torch.float32"):
        sdpa(q, k.bfloat16(), v, enable_gqa=True)
    with pytest.raises(ValueError, match=r"value is on meta but query is on cpu"):
        sdpa(q, k, v.to("meta"), enable_gqa=True)
    with pytest.raises(TypeError, match=r"attn_mask must be bool or query's dtype torch.float32, got torch.float64"):
        sdpa(q, k, v, torch.zeros(8, 8, dtype=torch.float64), enable_gqa=True)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(3, 8\) does not broadcast to \(2, 4, 8, 8\)"):
        sdpa(q, k, v, torch.ones(3, 8, dtype=torch.bool), enable_gqa=True)
    with pytest.raises(ValueError, match=r"attn_mask and is_causal=True can't both be given"):
        sdpa(q, k, v, torch.ones(8, 8, dtype=torch.bool), is_causal=True, enable_gqa=True)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got 1.5"):
        sdpa(q, k, v, dropout_p=1.5, enable_gqa=True)
    with pytest.raises(TypeError, match=r"query must be a floating-point tensor, got dtype torch.int64"):
        sdpa(q.long(), k.long(), v.long())
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"softcap must be a finite float >= 0 \(0 = off\), got {bad}"):
            sdpa(q, k, v, enable_gqa=True, softcap=bad)
    with pytest.raises(TypeError, match=r"softcap must be a float, got str"):
        sdpa(q, k, v, enable_gqa=True, softcap="30")


def test_explicit_backend_that_cannot_serve_lists_every_reason():
    q = torch.randn(1, 2, 8, 32, dtype=torch.float16)
    with pytest.raises(fastlm.BackendUnavailableError) as info:
        sdpa(q, q, q, backend="cpu")
    msg = str(info.value)
    assert "dtype float16 not supported by the cpu backend (float32, bfloat16)" in msg
    for name in ("cuda:", "triton:", "cpu:", "reference: can serve"):
        assert name in msg
    torch.testing.assert_close(sdpa(q, q, q), F.scaled_dot_product_attention(q.float(), q.float(), q.float()).half(),
                               rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="extension not built")
def test_extension_ops_validate_inputs():
    q, k, v = _qkv(1, 2, 1, 8, 8, 32, 32, torch.float32)
    with pytest.raises(TypeError, match=r"q must be float32 or bfloat16 on cpu, got Half"):
        torch.ops.fastlm.attention_fwd(q.half(), k.half(), v.half(), None, 0, 1.0)
    with pytest.raises(ValueError, match=r"k head dim 16 != q head dim 32"):
        torch.ops.fastlm.attention_fwd(q, k[..., :16], v, None, 0, 1.0)
    with pytest.raises(ValueError, match=r"head dims up to 256 on cpu, got q 300"):
        x = torch.randn(1, 1, 4, 300)
        torch.ops.fastlm.attention_fwd(x, x, x, None, 0, 1.0)
    with pytest.raises(ValueError, match=r"causal must be 0 \(none\), 1 \(top-left\) or 2 \(bottom-right\), got 5"):
        torch.ops.fastlm.attention_fwd(q, k, v, None, 5, 1.0)
    with pytest.raises(ValueError, match=r"mask of shape \[8, 8\] does not broadcast"):
        torch.ops.fastlm.attention_fwd(q, k, v, torch.ones(8, 8, dtype=torch.bool), 0, 1.0)
    with pytest.raises(TypeError, match=r"k has dtype BFloat16 but q has dtype Float"):
        torch.ops.fastlm.attention_fwd(q, k.bfloat16(), v, None, 0, 1.0)
    with pytest.raises(ValueError, match=r"softcap must be a finite float >= 0 \(0 = off\), got -1"):
        torch.ops.fastlm.attention_fwd(q, k, v, None, 0, 1.0, -1.0)


# (B, H, H_kv, Tq, Tk, D): prefill with ragged tiles both ways, packed GQA/MQA decode, Tq > Tk
PLAN_SHAPES = [(2, 4, 4, 130, 200, 64), (1, 8, 2, 3, 300, 128), (1, 4, 1, 1, 64, 32), (1, 2, 2, 200, 70, 128),
               (1, 6, 2, 16, 16, 256), (1, 2, 2, 64, 64, 64), (1, 8, 1, 9, 100, 80)]


@pytest.mark.emu
@pytest.mark.skipif(not _ext.HAS_EMULATOR, reason="fastlm._C_emu not built")
@pytest.mark.parametrize("causal", [NO_CAUSAL, TOP_LEFT, BOTTOM_RIGHT], ids=["none", "top_left", "bottom_right"])
def test_cuda_index_math(causal):
    """The kernels' __host__ __device__ index math against first principles: every query row
    lands in exactly one CTA that reads its KV head, every key a row may see is walked, tiles
    called full need no visibility test (and the next one does), and in the backward the first
    query tile per key tile is exact and non-decreasing (the dQ turn order relies on it)."""
    plan_op = torch.ops.fastlm_emu.attention_cuda_plan
    for b, h, hkv, tq, tk, d in PLAN_SHAPES:
        offset, group = (tk - tq if causal == BOTTOM_RIGHT else 0), h // hkv
        last_key = lambda t: tk - 1 if causal == NO_CAUSAL else min(tk - 1, t + offset)  # noqa: E731
        for mask_kind, scale in ((0, 0.125), (1, 0.125), (2, 0.125), (0, -0.5)):
            plan = plan_op(b, h, hkv, tq, tk, d, causal, mask_kind, scale, False)
            bn, per, rows_seen = plan[0], 6 + 2 * 64, []
            assert (len(plan) - 1) % per == 0
            for c in range(1, len(plan), per):
                batch, kv_head, lo, hi, full_lo, full_end = plan[c:c + 6]
                assert full_lo == lo  # no window: the full tiles come first
                rows = [(plan[c + 6 + 2 * i], plan[c + 7 + 2 * i]) for i in range(64) if plan[c + 6 + 2 * i] >= 0]
                assert rows and all(head // group == kv_head for head, _ in rows)
                assert len({head for head, _ in rows}) == 1 or tq <= 16  # only decode-like calls pack heads
                rows_seen += [(batch, head, t) for head, t in rows]
                seen = [last_key(t) for _, t in rows]
                assert lo == 0 and max(hi, 0) == max(seen + [-1]) + 1, (lo, hi, seen)  # hi <= lo: nothing
                assert lo <= full_end <= max(lo, hi) and (full_end - lo) % bn == 0
                if mask_kind or scale <= 0:
                    assert full_end == lo
                is_full = lambda j0: j0 + bn <= tk and all(j0 + bn - 1 <= last_key(t) for _, t in rows)  # noqa: E731
                assert all(is_full(j0) for j0 in range(lo, full_end, bn))
                if not mask_kind and scale > 0 and full_end < hi and len({hd for hd, _ in rows}) == 1:
                    assert not is_full(full_end), "a full tile left to the masked loop"
            expected = [(bb, hh, t) for bb in range(b) for hh in range(h) for t in range(tq)]
            assert sorted(rows_seen) == expected
        for mask_kind in (0, 1):
            bm, bn, *plan = plan_op(b, h, hkv, tq, tk, d, causal, mask_kind, 0.125, True)
            assert (bm, bn) == ((16, 32) if d > 128 else (64 if d <= 64 else 32, 64))
            firsts = plan[0::4]
            assert len(plan) == 4 * ((tk + bn - 1) // bn) and firsts == sorted(firsts)
            for n, (m_lo, m_hi, full_lo, full_hi) in enumerate(zip(plan[0::4], plan[1::4], plan[2::4], plan[3::4])):
                keys = range(bn * n, min(bn * n + bn, tk))
                sees = [t for t in range(tq) if any(j <= last_key(t) for j in keys)]
                assert not sees or (sees[0] // bm, sees[-1] // bm + 1) == (m_lo, m_hi), (n, m_lo, m_hi, sees[:1])
                full = lambda m: (not mask_kind and bn * n + bn <= tk and m * bm + bm <= tq  # noqa: E731
                                  and all(bn * n + bn - 1 <= last_key(t) for t in range(m * bm, m * bm + bm)))
                assert [m for m in range((tq + bm - 1) // bm) if full(m)] == list(range(full_lo, full_hi)), n


@pytest.mark.emu
@pytest.mark.skipif(not _ext.HAS_EMULATOR, reason="fastlm._C_emu not built")
def test_cuda_fits_99kb_and_routes_around_less(monkeypatch):
    """Every forward and backward tile fits the 99 KB per block of sm_86/89 (RTX 3090/4090, L4,
    L40S) and runs under that profile; a device with less shared memory than a kernel needs is
    refused in why_not, naming both numbers, instead of failing at launch."""
    for d in (32, 64, 80, 96, 128, 160, 256):
        fwd, bwd = torch.ops.fastlm_emu.attention_cuda_smem(d, d)
        assert fwd <= 101376 and bwd <= 101376, (d, fwd, bwd)
    q, k, v = _qkv(1, 2, 2, 70, 70, 128, 128, torch.float16)
    with emulated_gpu("8.6"):
        assert fastlm.backend.why_not("attention", "cuda-emu", q.device, q, k, v, None, 0.0, NO_CAUSAL) == []
        check("cuda-emu", q, k, v, causal=TOP_LEFT)
        check("cuda-emu", *_qkv(1, 2, 1, 17, 40, 256, 256, torch.bfloat16), causal=BOTTOM_RIGHT)  # the D = 256 tile
    monkeypatch.setattr(fastlm.backend, "shared_memory_per_block", lambda device: 48 * 1024)
    need = torch.ops.fastlm_emu.attention_cuda_smem(128, 128)[0]
    reasons = fastlm.backend.why_not("attention", "cuda-emu", q.device, q, k, v, None, 0.0, NO_CAUSAL)
    assert f"the forward kernel for head dim 128 needs {need} bytes of shared memory per block; this GPU allows 49152" in reasons
    with pytest.raises(fastlm.backend.BackendUnavailableError, match="this GPU allows 49152"):
        sdpa(q, k, v, backend="cuda-emu")


@pytest.mark.emu
@pytest.mark.skipif(not _ext.HAS_EMULATOR, reason="fastlm._C_emu not built")
def test_cuda_more_heads_than_grid_y_allows():
    """B * H = 65,536 (decode at B = 2048, H = 32) exceeds gridDim.y's 65,535: heads go on grid.x."""
    q, k, v = _qkv(2048, 32, 32, 1, 2, 32, 32, torch.float16)
    with torch.no_grad():
        out = sdpa(q, k, v, backend="cuda-emu")
    want = oracle(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("ns,dtype", [("fastlm", torch.float32),
                                      pytest.param("fastlm_emu", torch.float16, marks=EMU_MARKS)])
def test_backward_checks_lse_device(ns, dtype):
    """lse on another device than q is refused by name (the cuda binding read it as a pointer on
    q's device). A CPU-only machine has no second device: lse goes on the meta device, and the
    call is redispatched straight to the CPU kernel so the binding itself sees the mismatch."""
    q, k, v = _qkv(1, 2, 2, 8, 8, 16, 16, dtype)
    out, grad = torch.randn_like(q), torch.randn_like(q)
    lse = torch.empty(1, 2, 8, device="meta")
    op = getattr(torch.ops, ns).attention_bwd.default
    with pytest.raises(ValueError, match="attention_backward: lse is on meta but q is on cpu"):
        op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), grad, q, k, v, None, out, lse, 0, 0.25)


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
def test_trainable_additive_mask_gets_its_gradient(backend, device, dtype):
    """An additive attn_mask that requires grad (T5's relative-position bias) gets d(loss)/d(mask),
    summed over the dims it was broadcast over, with a causal cut and GQA, against float64 autograd
    of the plain math; with dropout it is refused."""
    b, h, hkv, tq, tk, d = 2, 4, 2, 13, 13, 32
    q, k, v = _qkv(b, h, hkv, tq, tk, d, d, dtype, device)
    for shape in ((1, h, tq, tk), (tq, tk), (b, 1, 1, tk)):
        bias = torch.randn(shape, device=device).mul(2).to(dtype)
        cut = torch.ones(tq, tk, dtype=torch.bool, device=device).tril()
        mask = bias.masked_fill(~cut, -math.inf) if len(shape) == 2 else bias
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, mask)]
        out = sdpa(*leaves[:3], attn_mask=leaves[3], enable_gqa=True, backend=backend)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, leaves, grad)
        ref = [t.detach().double().requires_grad_() for t in (q, k, v, mask)]
        want_out = F.scaled_dot_product_attention(*ref[:3], attn_mask=ref[3], enable_gqa=True)
        want = torch.autograd.grad(want_out, ref, grad.double())
        finite = torch.isfinite(mask)
        assert got[3].shape == mask.shape and not got[3].isnan().any()
        if dtype == torch.float32:
            torch.testing.assert_close(got[3][finite].double(), want[3][finite], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{backend} mask {shape}: {m}")
            continue
        # low precision: at most 3x the error of torch's own math in that dtype (the repo's rule)
        low = [t.detach().cpu().requires_grad_() for t in (q, k, v, mask)]
        torch_out = F.scaled_dot_product_attention(*low[:3], attn_mask=low[3], enable_gqa=True)
        torch_grad = torch.autograd.grad(torch_out, low, grad.cpu())[3]
        err = lambda g: (g.cpu().double() - want[3].cpu())[finite.cpu()].abs().max().item()  # noqa: E731
        assert err(got[3]) <= 3 * err(torch_grad) + 1e-3, f"{backend} {dtype} mask {shape}: " \
                                                          f"{err(got[3]):.3g} vs torch {err(torch_grad):.3g}"
    with pytest.raises(ValueError, match=r"attn_mask requires grad with dropout_p=0.1; fastlm computes"):
        sdpa(q, k, v, attn_mask=torch.zeros(tq, tk, dtype=dtype, device=device, requires_grad=True),
             dropout_p=0.1, enable_gqa=True, backend=backend)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_any_number_of_leading_batch_dims(backend, device, dtypes):
    """3-D (H, T, D) and 5-D (B1, B2, H, T, D) q/k/v as torch's SDPA takes them, with GQA, a causal
    cut, and masks that broadcast over the leading dims; out, lse and grads against torch."""
    for lead, mask_shape in (((), None), ((), (1, 9, 11)), ((2, 3), None), ((2, 3), (3, 1, 9, 11)), ((2, 3), (9, 11))):
        q = torch.randn(*lead, 4, 9, 32, device=device)
        k, v = (torch.randn(*lead, 2, 11, 32, device=device) for _ in range(2))
        mask = None if mask_shape is None else torch.randn(mask_shape, device=device)
        causal = mask is None
        leaves = [t.requires_grad_() for t in (q, k, v)]
        out, lse = sdpa_lse(*leaves, attn_mask=mask, is_causal=causal, enable_gqa=True, backend=backend)
        ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        kw = dict(attn_mask=None if mask is None else mask.double(), is_causal=causal, enable_gqa=True)
        want = F.scaled_dot_product_attention(*ref_leaves, **kw)
        assert out.shape == want.shape and lse.shape == want.shape[:-1], (lead, mask_shape)
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
        grad = torch.randn_like(out)
        for g, g_ref in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(want, ref_leaves, grad.double())):
            torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-5)
