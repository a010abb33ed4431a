"""linear_cross_entropy on every backend against float64 F.linear + F.cross_entropy."""
import sys

import pytest
import torch
import torch.nn.functional as F

from fastlm.ops import linear_cross_entropy
from numerics import assert_close
from row_cases import BACKEND_DTYPES, BACKENDS, HAS_CUDA

LCE = sys.modules["fastlm.ops.linear_cross_entropy"]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few rows, so every test crosses chunk boundaries (and a ragged last chunk)."""
    monkeypatch.setattr(LCE, "CHUNK_BYTES", 4 * 1025 * 3)


def _run(fn, h, w, b, dtype, grad_seed=3):
    h = h.detach().to(dtype).requires_grad_()
    w = w.detach().to(dtype).requires_grad_()
    b = None if b is None else b.detach().to(dtype).requires_grad_()
    loss = fn(h, w, b)
    g = torch.randn(loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(grad_seed))
    grads = torch.autograd.grad(loss, [h, w] + ([b] if b is not None else []), g.to(loss.dtype).to(loss.device))
    return loss, grads


def _check(backend, h, w, t, b=None, dtype=torch.float32, fp32_tol=None, **kw):
    ours = lambda h_, w_, b_: linear_cross_entropy(h_, w_, t, b_, backend=backend, **kw)  # noqa: E731
    plain = lambda h_, w_, b_: F.cross_entropy(F.linear(h_, w_, b_), t, **kw)  # noqa: E731
    loss, grads = _run(ours, h, w, b, dtype)
    loss64, grads64 = _run(plain, h, w, b, torch.float64)
    loss0, grads0 = _run(plain, h, w, b, dtype)
    assert loss.dtype == dtype and loss.shape == loss64.shape
    assert_close(f"{backend} loss", loss, loss64, loss0)
    for name, g, g64, g0 in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, grads64, grads0):
        assert g.dtype == dtype
        assert_close(f"{backend} {name}", g, g64, g0, kind="grad", fp32_tol=fp32_tol)


def _targets(n, v, device, ignored=(1,), ignore_index=-100):
    t = torch.randint(0, v, (n,), device=device)
    for r in ignored:
        t[r] = ignore_index
    return t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
def test_matches_float64(backend, device, dtype, reduction, small_chunks):
    for n, d, v in [(7, 16, 1025), (11, 8, 1000), (3, 4, 1)]:
        h, w, b = torch.randn(n, d, device=device), torch.randn(v, d, device=device) / 4, torch.randn(v, device=device)
        _check(backend, h, w, _targets(n, v, device), b, dtype, reduction=reduction, label_smoothing=0.1)
        _check(backend, h, w, _targets(n, v, device, ignored=(0, 2), ignore_index=0), None, dtype,
               reduction=reduction, ignore_index=0)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_large_vocab(backend, device, dtypes):
    if backend == "triton" and not HAS_CUDA:
        pytest.skip("50257 columns are too slow for the Triton interpreter")
    n, d, v = 5, 8, 50257
    h, w = torch.randn(n, d, device=device) * 4, torch.randn(v, d, device=device)
    # grad_hidden sums 50257 fp32 terms: a fresh-clone run saw 1.5e-5 against the default 1e-5
    _check(backend, h, w, _targets(n, v, device), None, torch.float32, fp32_tol=dict(rtol=1e-4, atol=1e-4))


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_no_grad_forward_and_magnitudes(backend, device, dtypes, small_chunks):
    h, w = torch.randn(9, 8, device=device) * 300, torch.randn(40, 8, device=device)
    t = _targets(9, 40, device)
    with torch.no_grad():
        out = linear_cross_entropy(h, w, t, backend=backend)
    torch.testing.assert_close(out.double(), F.cross_entropy(F.linear(h.double(), w.double()), t), rtol=1e-5, atol=1e-3)
    _check(backend, h / 1e6, w, t)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_opcheck(backend, device, dtypes, small_chunks):
    h = torch.randn(6, 8, device=device, requires_grad=True)
    w = torch.randn(33, 8, device=device, requires_grad=True)
    b = torch.randn(33, device=device, requires_grad=True)
    t = _targets(6, 33, device)
    for args in [(h, w, t, b, -100, 0.1, "mean", True, backend), (h, w, t, None, -100, 0.0, "none", False, backend),
                 (h, w, t, b, -100, 0.0, "sum", False, backend)]:
        torch.library.opcheck(torch.ops.fastlm.linear_cross_entropy.default, args)
    lse = torch.logsumexp(F.linear(h, w, b), -1).detach()
    torch.library.opcheck(torch.ops.fastlm.linear_cross_entropy_backward.default,
                          (torch.randn(6, device=device), h.detach(), w.detach(), t, b.detach(), lse, -100, 0.0, backend))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    torch._dynamo.reset()

    def f(h, w, b, t):
        return linear_cross_entropy(h * 2, w, t, b) + linear_cross_entropy(h, w, t, reduction="none").sum()

    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    h, w, b = (torch.randn(8, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True),
               torch.randn(40, requires_grad=True))
    t = _targets(8, 40, "cpu")
    out, out_ref = compiled(h, w, b, t), f(h, w, b, t)
    torch.testing.assert_close(out, out_ref)
    for g, g_ref in zip(torch.autograd.grad(out, (h, w, b)), torch.autograd.grad(out_ref, (h, w, b))):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_target_out_of_range_names_value(backend, device, dtypes):
    """CPU tensors: IndexError naming the value. GPU tensors: no host sync, so the row's loss is NaN."""
    h, w = torch.randn(4, 8, device=device), torch.randn(10, 8, device=device)
    t = torch.tensor([0, 1, 2, 12], device=device)
    if device != "cpu":
        loss = linear_cross_entropy(h, w, t, reduction="none", backend=backend).cpu()
        assert torch.isnan(loss[3]) and not torch.isnan(loss[:3]).any()
        return
    with pytest.raises(IndexError, match=r"target value 12 \(row 3\) is out of range for 10 classes"):
        linear_cross_entropy(h, w, t, backend=backend)


def test_bad_inputs_name_argument_and_value():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(TypeError, match=r"weight has dtype torch.float16 but hidden has dtype torch.float32"):
        linear_cross_entropy(h, w.half(), t)
    with pytest.raises(ValueError, match=r"weight is on meta but hidden is on cpu"):
        linear_cross_entropy(h, w.to("meta"), t)
    with pytest.raises(ValueError, match=r"target is on meta but hidden is on cpu"):
        linear_cross_entropy(h, w, t.to("meta"))
    with pytest.raises(ValueError, match=r"hidden must be \(N, D\) and weight \(V, D\) with the same D, got \(4, 8\) and \(10, 7\)"):
        linear_cross_entropy(h, torch.randn(10, 7), t)
    with pytest.raises(ValueError, match=r"bias must have shape \(10,\), got \(9,\)"):
        linear_cross_entropy(h, w, t, torch.randn(9))
    with pytest.raises(ValueError, match=r"target must have shape \(4,\) to match hidden \(4, 8\), got \(3,\)"):
        linear_cross_entropy(h, w, t[:3])
    with pytest.raises(TypeError, match=r"hidden must be a floating-point tensor, got dtype torch.int64"):
        linear_cross_entropy(t[:, None].expand(4, 8).contiguous(), w, t)
