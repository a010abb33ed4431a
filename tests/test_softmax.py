"""softmax / log_softmax on every backend against a float64 oracle (tolerance rule in numerics.py)."""
import pytest
import torch

import fastlm
from fastlm import _ext
from fastlm.ops import log_softmax, softmax
from fastlm.ops.softmax import softmax_backward_ref
from backends import EMU_MARKS, emulated_gpu
from numerics import assert_close
from row_cases import BACKEND_DTYPES, BACKENDS, GPU, cols_for

NEG_INF = float("-inf")


def _oracle(x, scale, mask, is_causal, log, dtype):
    """Plain PyTorch in `dtype`: mul, masked_fill (or add), softmax; fully masked rows -> 0 / -inf."""
    z = x.to(dtype) * scale
    if mask is not None:
        z = z.masked_fill(~mask, NEG_INF) if mask.dtype == torch.bool else z + mask.to(dtype)
    if is_causal:
        keep = torch.ones(z.shape[-2], z.shape[-1], dtype=torch.bool, device=z.device).tril()
        z = z.masked_fill(~keep, NEG_INF)
    dead = (z == NEG_INF).all(-1, keepdim=True)
    z = z.masked_fill(dead, 0.0)
    if log:
        return torch.log_softmax(z, -1).masked_fill(dead, NEG_INF)
    return torch.softmax(z, -1).masked_fill(dead, 0.0)


def _run(fn, x, grad):
    x = x.detach().requires_grad_()
    y = fn(x)
    (gx,) = torch.autograd.grad(y, x, grad.to(y.dtype))
    return y, gx


def _check(backend, x, log, scale=1.0, mask=None, is_causal=False, dim=-1, grad_fp32_tol=None, fp32_tol=None):
    dtype = x.dtype
    fn = log_softmax if log else softmax
    out = lambda t: fn(t, dim, scale=scale, mask=mask, is_causal=is_causal, backend=backend)  # noqa: E731
    ref = lambda dt: lambda t: _oracle(t.movedim(dim, -1), scale,  # noqa: E731
                                       None if mask is None else torch.broadcast_to(mask, t.shape).movedim(dim, -1),
                                       is_causal and dim in (-1, x.dim() - 1), log, dt).movedim(-1, dim)
    y64_plain = ref(torch.float64)(x.double())
    # log_softmax: upstream grads at masked (-inf) outputs are zeroed; see the module docstring
    grad = torch.randn(x.shape, device=x.device, dtype=torch.float64).masked_fill(y64_plain == NEG_INF, 0.0)
    y, gx = _run(out, x, grad)
    y64, gx64 = _run(ref(torch.float64), x.double(), grad)
    y0, gx0 = _run(ref(dtype), x, grad)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(f"{backend} y", y, y64, y0, fp32_tol=fp32_tol)
    assert_close(f"{backend} grad_x", gx, gx64, gx0, kind="grad", fp32_tol=grad_fp32_tol)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
def test_matches_float64(backend, device, dtype, log):
    for cols in cols_for(backend):
        rows = 3 if cols > 2000 else 5
        x = (torch.randn(rows, cols, device=device) * 3).to(dtype)
        mask = torch.rand(rows, cols, device=device) > 0.2
        mask[:, 0] = True
        mask[1] = False  # a fully masked row
        _check(backend, x, log, scale=0.7, mask=mask)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
@pytest.mark.parametrize("case", ["plain", "additive", "bcast_rows", "bcast_cols", "attn", "causal",
                                  "causal_mask", "dim0", "dim_causal", "huge", "tiny", "scale_neg"])
def test_masks_layouts_magnitudes(backend, device, dtypes, case):
    x = torch.randn(2, 3, 5, 9, device=device)
    kw = {}
    if case == "additive":
        kw["mask"] = torch.randn(2, 3, 5, 9, device=device).masked_fill(torch.rand(2, 3, 5, 9, device=device) > 0.7, NEG_INF)
    elif case == "bcast_rows":
        kw["mask"] = torch.rand(9, device=device) > 0.4
    elif case == "bcast_cols":
        kw["mask"] = torch.rand(2, 1, 5, 1, device=device) > 0.3  # some whole rows masked
    elif case == "attn":
        kw["mask"] = torch.rand(2, 1, 5, 9, device=device) > 0.5
    elif case == "causal":
        kw["is_causal"] = True
    elif case == "causal_mask":
        kw.update(is_causal=True, mask=torch.rand(5, 9, device=device) > 0.3)
    elif case == "dim0":
        kw.update(dim=0, mask=torch.rand(2, 1, 1, 9, device=device) > 0.3)
    elif case == "dim_causal":
        kw.update(dim=-2, is_causal=True)
    elif case == "huge":
        x = x * 1e4
        # log_softmax of ~4e4-sized scores: the kernels' base-2 fold scales them before the max is
        # subtracted, so fp32 rounds at ~ulp(4e4) = 4e-3 absolute, and an output near 0 (two
        # near-equal maxima) was 2.5e-4 off in a fresh-clone run: allow one ulp of the largest score
        # The same rounding moves each exponent by up to that much, so p, and the grads built from it,
        # carry a relative error of eps * max|x| (~5e-3): softmax's condition number at this scale.
        # (Fresh-clone runs saw grads 1.6e-5 and then 6.5e-4 relative off; a fixed 1e-4 cannot hold.)
        eps_x = torch.finfo(torch.float32).eps * x.abs().max().item()
        kw["fp32_tol"] = dict(rtol=1e-5, atol=eps_x)
        kw["grad_fp32_tol"] = dict(rtol=eps_x, atol=eps_x)
    elif case == "tiny":
        x = x * 1e-6
    elif case == "scale_neg":
        kw["scale"] = -2.5
    for log in (False, True):
        if case == "dim_causal":  # causal on the last two dims, softmax over dim -2: check by hand below
            continue
        _check(backend, x, log, **kw)
    if case == "dim_causal":
        keep = torch.ones(5, 9, dtype=torch.bool, device=device).tril()
        y = softmax(x, -2, is_causal=True, backend=backend)
        y64 = torch.softmax(x.double().masked_fill(~keep, NEG_INF).masked_fill(~keep.any(0), 0.0), -2)
        y64 = y64.masked_fill(~keep.any(0), 0.0)  # columns 5..8 are fully masked along dim -2
        torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_rising_rows_rescale_online_stats(backend, device, dtypes):
    """The max grows in every chunk/tile, so the running sum is rescaled again and again."""
    ramp = torch.linspace(-60.0, 60.0, 3000, device=device)
    x = torch.stack([ramp, ramp.flip(0), ramp * 0.01 + torch.randn(3000, device=device)])
    # grad_x = g - p * sum(g) (log) or p * (g - sum(p g)): an fp32 sum of 3000 unit-size terms is
    # off by up to ~3000 * 6e-8 = 2e-4 times p, so fp32 gets atol 1e-4 here (it failed at 1.4e-5)
    for log in (False, True):
        _check(backend, x, log, scale=1.3, grad_fp32_tol=dict(rtol=1e-5, atol=1e-4))


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_log_softmax_masked_grads_are_zero(backend, device, dtypes):
    x = torch.randn(4, 33, device=device, requires_grad=True)
    mask = torch.rand(4, 33, device=device) > 0.5
    mask[2] = False
    y = log_softmax(x, mask=mask, backend=backend)
    assert torch.isinf(y[~mask]).all() and not torch.isnan(y).any()
    (gx,) = torch.autograd.grad(y, x, torch.randn(4, 33, device=device))
    assert torch.equal(gx[~mask], torch.zeros_like(gx[~mask]))
    assert torch.equal(gx[2], torch.zeros_like(gx[2]))


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 16), (4, 0), (), (1,)], ids=str)
def test_empty_and_scalar(backend, device, dtypes, shape):
    x = torch.randn(shape, device=device, requires_grad=True)
    y = softmax(x, backend=backend)
    assert y.shape == x.shape
    if x.numel():
        torch.testing.assert_close(y, torch.softmax(x, -1))
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert gx.shape == x.shape


# ------------------------------------------------------------------ registration / compile
@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_opcheck(backend, device, dtypes):
    x = torch.randn(6, 33, device=device, requires_grad=True)
    mask = torch.rand(3, 33, device=device) > 0.3
    for args in [(x, None, 1.0, 0, False, backend), (x, mask, 0.5, 3, True, backend),
                 (x, torch.randn(1, 33, device=device), 2.0, 0, False, backend)]:
        torch.library.opcheck(torch.ops.fastlm.softmax.default, args)
    y = softmax(x, backend=backend).detach()
    torch.library.opcheck(torch.ops.fastlm.softmax_backward.default, (torch.randn_like(y), y, 0.5, False, backend))
    torch.library.opcheck(torch.ops.fastlm.softmax_backward.default, (torch.randn_like(y), y.log(), 1.0, True, backend))


@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="extension not built")
def test_opcheck_extension_ops():
    x = torch.randn(6, 17)
    torch.library.opcheck(torch.ops.fastlm.softmax_fwd.default, (x, None, 1.0, 0, False))
    torch.library.opcheck(torch.ops.fastlm.softmax_fwd.default, (x, torch.rand(2, 17) > 0.5, 0.3, 6, True))
    torch.library.opcheck(torch.ops.fastlm.softmax_bwd.default, (torch.randn(6, 17), torch.softmax(x, -1), 2.0, False))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    torch._dynamo.reset()

    def f(x, m):
        return softmax(x * 2, scale=0.5, mask=m, is_causal=True).sum(-1) + log_softmax(x, 0).sum(0)

    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    x = torch.randn(8, 8, requires_grad=True)
    m = torch.rand(8, 8) > 0.3
    out, out_ref = compiled(x, m), f(x, m)
    torch.testing.assert_close(out, out_ref)
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_ref,) = torch.autograd.grad(out_ref.sum(), x)
    torch.testing.assert_close(g, g_ref)


# ------------------------------------------------------------------ bad input
def test_bad_inputs_name_argument_and_value():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match=r"softmax: x must be a floating-point tensor, got dtype torch.int64"):
        softmax(torch.ones(4, 8, dtype=torch.long))
    with pytest.raises(TypeError, match=r"mask must be bool or x's dtype torch.float32, got torch.float16"):
        softmax(x, mask=torch.randn(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"log_softmax: mask is on meta but x is on cpu"):
        log_softmax(x, mask=torch.ones(4, 8, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match=r"mask of shape \(4, 7\) is not broadcastable to x's shape \(4, 8\)"):
        softmax(x, mask=torch.ones(4, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask of shape \(2, 4, 8\) is not broadcastable"):
        softmax(x, mask=torch.ones(2, 4, 8, dtype=torch.bool))
    with pytest.raises(IndexError, match=r"dim 2 is out of range for x with 2 dims"):
        softmax(x, 2)
    with pytest.raises(ValueError, match=r"is_causal needs x with at least 2 dims, got shape \(8,\)"):
        softmax(torch.randn(8), is_causal=True)
    with pytest.raises(TypeError, match=r"scale must be a float, got str"):
        softmax(x, scale="2")


def test_explicit_backend_that_cannot_serve_lists_every_reason():
    x = torch.randn(4, 8, dtype=torch.float16)
    with pytest.raises(fastlm.BackendUnavailableError, match=r"dtype float16 not supported by the cpu backend"):
        softmax(x, backend="cpu")
    torch.testing.assert_close(softmax(x), torch.softmax(x.float(), -1).half(), rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="extension not built")
def test_extension_ops_validate_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match=r"softmax: x must be float32 or bfloat16 on cpu, got Half"):
        torch.ops.fastlm.softmax_fwd(x.half(), None, 1.0, 0, False)
    with pytest.raises(ValueError, match=r"mask_rows dividing the 4 rows of x, got \[3, 8\]"):
        torch.ops.fastlm.softmax_fwd(x, torch.ones(3, 8, dtype=torch.bool), 1.0, 0, False)
    with pytest.raises(TypeError, match=r"mask must be bool or x's dtype Float, got Half"):
        torch.ops.fastlm.softmax_fwd(x, torch.ones(1, 8, dtype=torch.half), 1.0, 0, False)
    with pytest.raises(ValueError, match=r"grad_y has shape \[4, 7\] but y has shape \[4, 8\]"):
        torch.ops.fastlm.softmax_bwd(torch.randn(4, 7), x, 1.0, False)


def test_reference_backward_formula():
    x = torch.randn(5, 13, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 13, dtype=torch.float64)
    for log, fn in ((False, torch.softmax), (True, torch.log_softmax)):
        y = fn(x * 1.5, -1)
        (gx,) = torch.autograd.grad(y, x, g)
        torch.testing.assert_close(softmax_backward_ref(g, y.detach(), 1.5, log), gx)


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
def test_nan_and_inf_propagate(backend, device, dtype):
    """Only fully masked rows give 0 (-inf for log); a NaN or +inf anywhere in a row makes the
    whole row NaN, as torch's softmax does, so AMP's GradScaler sees the overflow. 1500 columns
    put the NaN past the first CPU chunk and onto the CUDA kernels' block-per-row path."""
    for cols in (40, 1500):
        x = torch.randn(4, cols, device=device, dtype=dtype)
        x[0, cols - 3], x[1, 7] = float("nan"), float("inf")
        mask = torch.ones(4, cols, dtype=torch.bool, device=device)
        mask[2] = False
        for log in (False, True):
            fn = fastlm.ops.log_softmax if log else fastlm.ops.softmax
            y = fn(x, mask=mask, backend=backend)
            want = torch.log_softmax(x.float(), -1) if log else torch.softmax(x.float(), -1)
            assert torch.isnan(want[:2]).all() and torch.isnan(y[:2]).all(), f"cols={cols} log={log}"
            assert (y[2] == (float("-inf") if log else 0.0)).all(), f"cols={cols} log={log}"
            torch.testing.assert_close(y[3].float(), want[3], rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------ triton: rows per program
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_row_groups(dtype):
    """Narrow rows go several to a program (fastlm.triton.softmax._plan): a row count that is no
    multiple of the group, groups spanning mask periods and causal blocks, a fully masked row and
    a NaN row inside a group, against the float64 oracle."""
    from fastlm.triton import softmax as kernels

    device = GPU or "cpu"
    x = (torch.randn(3, 43, 40, device=device) * 2).to(dtype)
    mask = torch.rand(43, 40, device=device) > 0.3
    mask[:, 0], mask[5] = True, False
    plan = kernels._plan(3 * 43, 40, x.element_size(), x.device)
    assert plan["ONE_TILE"] and 1 < plan["ROWS"] and (3 * 43) % plan["ROWS"], plan
    for log in (False, True):
        _check("triton", x, log, scale=0.8, mask=mask, is_causal=True)
    x[1, 7, 0] = float("nan")  # column 0 is never masked
    y = softmax(x, mask=mask, backend="triton")
    assert torch.isnan(y[1, 7]).all() and not torch.isnan(y[1, 6]).any() and not torch.isnan(y[1, 8]).any()


# ---------------------------------------------------------------- cuda kernels' row walk (emulator)
# (dtype, cols): every row layout once; the long widths in one dtype only (the emulator is slow)
ROW_WALK = [pytest.param(d, c, id=f"{str(d)[6:]}-{c}", marks=EMU_MARKS) for d, c in (
    (torch.float16, 1), (torch.float32, 7), (torch.bfloat16, 1000), (torch.float16, 1023),
    (torch.float32, 50257), (torch.bfloat16, 131072))]


@pytest.mark.parametrize("dtype,cols", ROW_WALK)
def test_cuda_emu_any_width_stride_offset(dtype, cols):
    """The cuda kernels (row_io.cuh) under the emulator, each width on its own layout (8 threads,
    warp, 128, 512 held; 50257 fp32 and 131072 bf16 stream, the latter past the shared-memory
    stash): x is a slice with storage offset 3 and row stride cols + 5, so its rows start at every
    16-byte phase and y (dense) is out of phase with x; grad_y is another slice, out of phase with
    y. Row 0 holds a NaN (the whole row is NaN), the last row is fully masked (0 / -inf)."""
    from fastlm.ops.softmax import _softmax_prepared_ref
    ops = torch.ops.fastlm_emu
    rows = 2 if cols > 2000 else 5
    x = (torch.randn(rows, cols + 5, dtype=torch.float64) * 3).to(dtype)[:, 3:3 + cols]
    g = torch.randn(rows, cols + 2, dtype=torch.float64).to(dtype)[:, 1:1 + cols]
    x[0, cols // 2] = float("nan")
    mask = torch.rand(rows, cols) > 0.2
    mask[:, 0] = mask[0, cols // 2] = True
    mask[-1] = False
    for log in (False, True):
        y = ops.softmax_fwd(x, mask, 0.7, 0, log)
        y64 = _softmax_prepared_ref(x.double(), mask, 0.7, 0, log)
        y0 = _softmax_prepared_ref(x, mask, 0.7, 0, log)
        assert torch.isnan(y[0]).all(), f"log={log}: a NaN must spread over its row"
        assert (y[-1] == (NEG_INF if log else 0.0)).all(), f"log={log}: fully masked row"
        assert_close(f"y log={log}", y[1:], y64[1:], y0[1:])
        gx = ops.softmax_bwd(g, y, 0.7, log)
        gx64 = softmax_backward_ref(g[1:].double(), y[1:].double(), 0.7, log)
        gx0 = softmax_backward_ref(g[1:], y[1:], 0.7, log)
        assert_close(f"grad_x log={log}", gx[1:], gx64, gx0, kind="grad")


# ---------------------------------------------------------------- sm_90a: long rows on a thread-block cluster (emulator)
@pytest.mark.parametrize("dtype,size", [pytest.param(torch.float32, 4, id="float32", marks=EMU_MARKS),
                                        pytest.param(torch.bfloat16, 2, id="bfloat16", marks=EMU_MARKS)])
def test_cuda_emu_cluster_forward_long_rows(dtype, size):
    """131072-wide rows on sm_90a run forward_cluster: the row held in the shared memory of a
    cluster of `size` CTAs (fp32 4 x 128 KB, bf16 2 x 128 KB), read from global memory once, the
    (max, sum) pairs crossing the cluster through DSMEM. softmax on a slice (storage offset 3, row
    stride cols + 5: head and tail scalars on the first and last rank, y out of phase with x),
    log_softmax on a dense copy (16-byte stores); a bool mask, and row 1 fully masked."""
    from fastlm.ops.softmax import _softmax_prepared_ref
    ops = torch.ops.fastlm_emu
    cols, rows = 131072, 2
    x = (torch.randn(rows, cols + 5, dtype=torch.float64) * 3).to(dtype)[:, 3:3 + cols]
    mask = torch.rand(rows, cols) > 0.2
    mask[-1] = False
    with emulated_gpu():
        for log, xin in ((False, x), (True, x.contiguous())):
            blocks = ops.emu_stats()[1]
            y = ops.softmax_fwd(xin, mask, 0.7, 0, log)
            assert ops.emu_stats()[1] - blocks == rows * size, "one cluster of `size` CTAs per row"
            y64 = _softmax_prepared_ref(xin.double(), mask, 0.7, 0, log)
            y0 = _softmax_prepared_ref(xin, mask, 0.7, 0, log)
            assert (y[-1] == (NEG_INF if log else 0.0)).all(), f"log={log}: fully masked row"
            assert_close(f"y log={log}", y[:1], y64[:1], y0[:1])


# (dtype, cols, y's row stride, grad_y out of y's 16-byte phase, cluster size): fp32 131072 in 8
# CTAs of 2 x 64 KB, in phase (16-byte staging of both operands); bf16 131072 in 4 CTAs, grad_y out
# of phase (staged element by element); fp16 70001 in 3 CTAs with y's row stride 70004 (8-byte
# steps: odd rows start mid-pack, so rank 0's head and the last rank's tail scalars differ by row)
CLUSTER_BACKWARD = [pytest.param(*case, id=f"{str(case[0])[6:]}-{case[1]}", marks=EMU_MARKS) for case in (
    (torch.float32, 131072, 131072, False, 8), (torch.bfloat16, 131072, 131072, True, 4),
    (torch.float16, 70001, 70004, True, 3))]


@pytest.mark.parametrize("dtype,cols,stride,g_out_of_phase,size", CLUSTER_BACKWARD)
def test_cuda_emu_cluster_backward_long_rows(dtype, cols, stride, g_out_of_phase, size):
    """Rows past 2048 packs on sm_90a run backward_cluster: y and grad_y of the row held in the
    shared memory of a cluster of `size` CTAs (read from global memory once), the partial dots
    added in rank order through DSMEM, grad_x written from shared memory. softmax and log_softmax
    of a bool-masked x (y 0 / -inf where masked, grad 0 there); the last row fully masked."""
    from fastlm.ops.softmax import _softmax_prepared_ref
    ops = torch.ops.fastlm_emu
    rows = 3 if stride != cols else 2
    x = torch.randn(rows, cols, dtype=torch.float64) * 3
    mask = torch.rand(rows, cols) > 0.2
    mask[-1] = False
    shift = 1 if g_out_of_phase else 0
    with emulated_gpu():
        for log in (False, True):
            y = torch.empty(rows, stride, dtype=dtype)[:, :cols]
            y.copy_(_softmax_prepared_ref(x, mask, 0.7, 0, log))
            g = torch.randn(rows, cols + shift, dtype=torch.float64).to(dtype)[:, shift:]
            blocks = ops.emu_stats()[1]
            gx = ops.softmax_bwd(g, y, 0.7, log)
            assert ops.emu_stats()[1] - blocks == rows * size, "one cluster of `size` CTAs per row"
            gx64 = softmax_backward_ref(g.double(), y.double(), 0.7, log)
            gx0 = softmax_backward_ref(g, y, 0.7, log)
            assert (gx[-1] == 0).all(), f"log={log}: fully masked row"
            assert_close(f"grad_x log={log}", gx, gx64, gx0, kind="grad")


@pytest.mark.emu
@pytest.mark.skipif(not _ext.HAS_EMULATOR, reason="fastlm._C_emu not built")
def test_cuda_emu_cluster_falls_back_when_no_cluster_fits():
    """With 2 SMs of each GPC free for clusters (emu_set_gpc_sms), cudaOccupancyMaxActiveClusters
    says 0 for 4 or 8 CTAs of 128 KB: 131072-wide fp32 rows then take the single-CTA kernels
    (forward_long, backward_kernel: one CTA per row) and are still right, while a 40000-wide bf16
    row's cluster of 2 still fits."""
    from fastlm.ops.softmax import _softmax_prepared_ref
    ops = torch.ops.fastlm_emu
    with emulated_gpu(gpc_sms=2):
        for dtype, cols, ctas_per_row in ((torch.float32, 131072, 1), (torch.bfloat16, 40000, 2)):
            x = (torch.randn(2, cols, dtype=torch.float64) * 3).to(dtype)
            g = torch.randn(2, cols, dtype=torch.float64).to(dtype)
            blocks = ops.emu_stats()[1]
            y = ops.softmax_fwd(x, None, 0.7, 0, False)
            assert ops.emu_stats()[1] - blocks == 2 * ctas_per_row, f"{dtype}: forward CTAs per row"
            assert_close(f"{dtype} y", y, _softmax_prepared_ref(x.double(), None, 0.7, 0, False),
                         _softmax_prepared_ref(x, None, 0.7, 0, False))
            if dtype == torch.float32:
                blocks = ops.emu_stats()[1]
                gx = ops.softmax_bwd(g, y, 0.7, False)
                assert ops.emu_stats()[1] - blocks == 2, "backward_kernel: one CTA per row"
                assert_close("grad_x", gx, softmax_backward_ref(g.double(), y.double(), 0.7, False))
