"""cross_entropy on every backend against float64 F.cross_entropy (tolerance rule in numerics.py)."""
import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import _ext
from fastlm.ops import cross_entropy
from backends import EMU_MARKS
from numerics import assert_close
from row_cases import BACKEND_DTYPES, BACKENDS, GPU, cols_for

def _run(fn, logits, weight, grad_dtype=None):
    x = logits.detach().requires_grad_()
    w = None if weight is None else weight.to(x.dtype)
    loss = fn(x, w)
    g = torch.randn(loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(loss.dtype)
    (gx,) = torch.autograd.grad(loss, x, g.to(loss.device))
    return loss, gx


def _check(backend, logits, target, weight=None, **kw):
    ours = lambda x, w: cross_entropy(x, target, w, backend=backend, **kw)  # noqa: E731
    plain = lambda x, w: F.cross_entropy(x, target, w, **kw)  # noqa: E731
    loss, gx = _run(ours, logits, weight)
    loss64, gx64 = _run(plain, logits.double(), weight)
    loss0, gx0 = _run(plain, logits, weight)
    assert loss.dtype == logits.dtype and loss.shape == loss64.shape
    # fp32 can't do better than rounding the log-sum-exp, whose size is the logits' size: with
    # logits ~1e5, exp(x - lse) is off by ~eps32 * 1e5 in the exponent. Scale atol with it.
    atol = max(1e-5, 2 * torch.finfo(torch.float32).eps * logits.abs().max().item())
    tol = dict(rtol=1e-5, atol=atol)
    assert_close(f"{backend} loss", loss, loss64, loss0, fp32_tol=tol)
    assert_close(f"{backend} grad", gx, gx64, gx0, kind="grad", fp32_tol=tol)


def _targets(rows, cols, device, ignore_index=-100, ignored=(1,)):
    t = torch.randint(0, cols, (rows,), device=device)
    for r in ignored:
        if r < rows:
            t[r] = ignore_index
    return t


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
def test_matches_float64(backend, device, dtype):
    for cols in cols_for(backend):
        rows = 3 if cols > 2000 else 6
        x = (torch.randn(rows, cols, device=device) * 4).to(dtype)
        w = torch.rand(cols, device=device) + 0.5
        _check(backend, x, _targets(rows, cols, device), w, label_smoothing=0.1)
        _check(backend, x, _targets(rows, cols, device), reduction="sum")


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("case", ["plain", "weight", "smooth", "weight_smooth", "ignore_in_range", "huge", "tiny"])
def test_semantics(backend, device, dtypes, reduction, case):
    rows, cols = 9, 37
    x = torch.randn(rows, cols, device=device) * 3
    kw = dict(reduction=reduction)
    w = torch.rand(cols, device=device) + 0.1 if "weight" in case else None
    if "smooth" in case:
        kw["label_smoothing"] = 0.25
    target = _targets(rows, cols, device, ignored=(0, 4))
    if case == "ignore_in_range":
        kw["ignore_index"] = 3
        target = _targets(rows, cols, device, ignore_index=3, ignored=(2, 5))
    if case == "huge":
        x = x * 1e4
    if case == "tiny":
        x = x * 1e-6
    _check(backend, x, target, w, **kw)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_non_contiguous_and_empty(backend, device, dtypes):
    x = torch.randn(40, 12, device=device)[::3, ::2]  # (14, 6), strided columns
    _check(backend, x, _targets(14, 6, device))
    x = torch.randn(12, 40, device=device).t()  # transposed
    _check(backend, x, _targets(40, 12, device), label_smoothing=0.3)
    empty = torch.randn(0, 5, device=device, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long, device=device)
    out = cross_entropy(empty, t, reduction="sum", backend=backend)
    assert out.item() == 0.0
    (g,) = torch.autograd.grad(out, empty)
    assert g.shape == (0, 5)


# ------------------------------------------------------------------ registration / compile
@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_opcheck(backend, device, dtypes):
    x = torch.randn(6, 33, device=device, requires_grad=True)
    t = _targets(6, 33, device)
    w = torch.rand(33, device=device)
    for args in [(x, t, None, -100, 0.0, backend), (x, t, w, -100, 0.2, backend)]:
        torch.library.opcheck(torch.ops.fastlm.cross_entropy.default, args)
    lse = torch.logsumexp(x.detach(), -1)
    torch.library.opcheck(torch.ops.fastlm.cross_entropy_backward.default,
                          (torch.randn(6, device=device), x.detach(), t, w, lse, -100, 0.2, backend))


@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="extension not built")
def test_opcheck_extension_ops():
    x, t, w = torch.randn(6, 17), torch.randint(0, 17, (6,)), torch.rand(17)
    torch.library.opcheck(torch.ops.fastlm.cross_entropy_fwd.default, (x, t, w, -100, 0.1))
    torch.library.opcheck(torch.ops.fastlm.cross_entropy_bwd.default,
                          (torch.randn(6), x, t, None, torch.logsumexp(x, -1), -100, 0.0))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    torch._dynamo.reset()

    def f(x, t, w):
        return cross_entropy(x * 2, t, w, label_smoothing=0.1) + cross_entropy(x, t, reduction="none").sum()

    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    x = torch.randn(8, 24, requires_grad=True)
    t, w = _targets(8, 24, "cpu"), torch.rand(24)
    out, out_ref = compiled(x, t, w), f(x, t, w)
    torch.testing.assert_close(out, out_ref)
    (g,) = torch.autograd.grad(out, x)
    (g_ref,) = torch.autograd.grad(out_ref, x)
    torch.testing.assert_close(g, g_ref)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_target_out_of_range_names_value(backend, device, dtypes):
    """CPU tensors: IndexError naming the value. GPU tensors: no host sync, so the row's loss is NaN."""
    x = torch.randn(5, 10, device=device)
    for bad in (10, -3):
        t = torch.tensor([1, 2, bad, 4, -100], device=device)
        if device != "cpu":
            loss = cross_entropy(x, t, reduction="none", backend=backend).cpu()
            assert torch.isnan(loss[2]) and not torch.isnan(loss[[0, 1, 3, 4]]).any()
            continue
        with pytest.raises(IndexError, match=rf"target value {bad} \(row 2\) is out of range for 10 classes"):
            cross_entropy(x, t, backend=backend)


def test_bad_inputs_name_argument_and_value():
    x, t = torch.randn(4, 8), torch.randint(0, 8, (4,))
    with pytest.raises(TypeError, match=r"weight has dtype torch.float16 but logits has dtype torch.float32"):
        cross_entropy(x, t, torch.rand(8, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"target is on meta but logits is on cpu"):
        cross_entropy(x, t.to("meta"))
    with pytest.raises(ValueError, match=r"weight is on meta but logits is on cpu"):
        cross_entropy(x, t, torch.rand(8, device="meta"))
    with pytest.raises(ValueError, match=r"target must have shape \(4,\) to match logits \(4, 8\), got \(5,\)"):
        cross_entropy(x, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\), got \(7,\)"):
        cross_entropy(x, t, torch.rand(7))
    with pytest.raises(ValueError, match=r"logits must be 2-D \(N, C\), got shape \(2, 4, 8\)"):
        cross_entropy(torch.randn(2, 4, 8), t)
    with pytest.raises(TypeError, match=r"target must hold class indices as int64, got dtype torch.float32"):
        cross_entropy(x, torch.rand(4, 8))
    with pytest.raises(ValueError, match=r"unknown reduction 'avg'"):
        cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(fastlm.BackendUnavailableError, match=r"dtype float16 not supported by the cpu backend"):
        cross_entropy(x.half(), t, backend="cpu")


@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="extension not built")
def test_extension_ops_validate_inputs():
    x, t = torch.randn(4, 8), torch.randint(0, 8, (4,))
    with pytest.raises(IndexError, match=r"target value 8 \(row 0\) is out of range for 8 classes"):
        torch.ops.fastlm.cross_entropy_fwd(x, torch.tensor([8, 0, 0, 0]), None, -100, 0.0)
    with pytest.raises(TypeError, match=r"weight must be float32, got Double"):
        torch.ops.fastlm.cross_entropy_fwd(x, t, torch.rand(8, dtype=torch.float64), -100, 0.0)
    with pytest.raises(ValueError, match=r"target must have shape \(4,\) to match logits, got \[3\]"):
        torch.ops.fastlm.cross_entropy_fwd(x, t[:3], None, -100, 0.0)
    with pytest.raises(ValueError, match=r"lse must have shape \(4,\), got \[5\]"):
        torch.ops.fastlm.cross_entropy_bwd(torch.randn(4), x, t, None, torch.randn(5), -100, 0.0)


# ------------------------------------------------------------------ triton kernels (no host sync)
def test_triton_kernel_out_of_range_target_gives_nan_row():
    """The GPU path can't check targets on the host without a sync: a bad target that reaches
    the kernel gives its row a NaN loss, lse and gradient (as the cuda kernels do); ignored rows stay 0."""
    from fastlm.triton import cross_entropy as kernels

    x = torch.randn(4, 10, device=GPU or "cpu")
    t = torch.tensor([3, 10, -100, -2], device=GPU or "cpu")
    loss, lse = kernels.forward(x, t, None, -100, 0.0)
    assert torch.isnan(loss[[1, 3]]).all() and torch.isnan(lse[[1, 3]]).all() and loss[2] == 0
    grad = kernels.backward(torch.ones(4, device=x.device), x, t, None, lse, -100, 0.0)
    assert torch.isnan(grad[[1, 3]]).all() and (grad[2] == 0).all() and not grad[0].isnan().any()
    assert_close("triton loss row 0", loss[:1], F.cross_entropy(x[:1].double(), t[:1], reduction="none"))


# ---------------------------------------------------------------- cuda kernels' row walk (emulator)
# (dtype, cols): every row layout once; the long widths in one dtype only (the emulator is slow)
ROW_WALK = [pytest.param(d, c, id=f"{str(d)[6:]}-{c}", marks=EMU_MARKS) for d, c in (
    (torch.float16, 1), (torch.float32, 7), (torch.bfloat16, 1000), (torch.float16, 1023),
    (torch.bfloat16, 50257), (torch.float32, 131072))]


@pytest.mark.parametrize("dtype,cols", ROW_WALK)
def test_cuda_emu_any_width_stride_offset(dtype, cols):
    """The cuda kernels (row_io.cuh) under the emulator, on every layout: the logits are a slice
    with storage offset 3 and row stride cols + 5 (rows start at every 16-byte phase; the dense
    gradient is out of phase with them), with class weights and label smoothing. Row 1 is
    ignored (0 loss, 0 gradient); row 0's target is out of range: the kernels flag it on the
    device with NaN loss, lse and gradient row (what GPU tensors get, with no host sync)."""
    from fastlm.ops.cross_entropy import cross_entropy_backward_ref, cross_entropy_rows_ref
    ops = torch.ops.fastlm_emu
    rows = 3 if cols > 2000 else 5
    x = (torch.randn(rows, cols + 5, dtype=torch.float64) * 3).to(dtype)[:, 3:3 + cols]
    t = torch.randint(0, cols, (rows,))
    t[0], t[1] = cols + 2, -100
    w = torch.rand(cols) + 0.5
    gl = torch.randn(rows)
    for weight, eps in ((None, 0.0), (w, 0.1)):
        loss, lse = ops.cross_entropy_fwd(x, t, weight, -100, eps)
        gx = ops.cross_entropy_bwd(gl, x, t, weight, lse, -100, eps)
        assert torch.isnan(loss[0]) and torch.isnan(lse[0]) and torch.isnan(gx[0]).all()
        assert loss[1] == 0 and lse[1] == 0 and (gx[1] == 0).all()
        ok = slice(1, rows)
        loss64, lse64 = cross_entropy_rows_ref(x[ok].double(), t[ok], weight, -100, eps)
        torch.testing.assert_close(loss[ok].double(), loss64, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[ok].double(), lse64, rtol=1e-5, atol=1e-5)
        gx64 = cross_entropy_backward_ref(gl[ok].double(), x[ok].double(), t[ok], weight, lse64, -100, eps)
        gx0 = cross_entropy_backward_ref(gl[ok], x[ok], t[ok], weight, lse[ok], -100, eps)
        assert_close(f"grad weight={weight is not None} eps={eps}", gx[ok], gx64, gx0, kind="grad")
