"""layer_norm / rms_norm (+ fused residual add) on every backend against a float64 oracle."""

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import _ext
from fastlm.ops.norms import layer_norm, norm_backward_ref, norm_ref, rms_norm
from backends import EMU_MARKS, GPU, backend_dtypes, backends, emulated_gpu
from numerics import assert_close

BACKENDS = backends()
BACKEND_DTYPES = backend_dtypes(BACKENDS)
SHAPES = [(1, 64), (7, 768), (2, 3, 97)]


def _torch_norm(kind, x, r, w, b, eps):
    h = x if r is None else x + r
    n = x.shape[-1]
    y = F.layer_norm(h, (n,), w, b, eps) if kind == "layer" else F.rms_norm(h, (n,), w, eps)
    return y if r is None else (y, h)


def _ours(kind, backend):
    def f(x, r, w, b, eps):
        n = x.shape[-1]
        if kind == "layer":
            return layer_norm(x, n, w, b, eps, residual=r, backend=backend)
        return rms_norm(x, n, w, eps, residual=r, backend=backend)
    return f


def _run(fn, inputs, grads, eps, dtype=None):
    """Outputs and the gradients of every tensor input (x, residual, weight, bias) that is given."""
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    out = fn(*leaves, eps)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o * g.to(o.dtype)).sum() for o, g in zip(outs, grads))
    given = [t for t in leaves if t is not None]
    return outs, torch.autograd.grad(loss, given)


def _check(backend, device, dtype, kind, shape, residual=True, weight=True, bias=True, eps=1e-5):
    n = shape[-1]
    x = torch.randn(shape, device=device, dtype=dtype) * 2 + 0.5
    r = torch.randn(shape, device=device, dtype=dtype) if residual else None
    w = torch.randn(n, device=device, dtype=dtype) if weight else None
    b = torch.randn(n, device=device, dtype=dtype) if (bias and kind == "layer") else None
    _compare(backend, kind, [x, r, w, b], eps)


def _compare(backend, kind, inputs, eps=1e-5):
    """Outputs and gradients of `backend` on these (x, residual, weight, bias) against fp64."""
    x, dtype = inputs[0], inputs[0].dtype
    grads = [torch.randn(x.shape, device=x.device, dtype=dtype) for _ in range(2)]
    ref = lambda *a: _torch_norm(kind, *a)
    outs, gs = _run(_ours(kind, backend), inputs, grads, eps)
    outs64, gs64 = _run(ref, inputs, grads, eps, torch.float64)
    outs0, gs0 = _run(ref, inputs, grads, eps)
    for name, o, o64, o0 in zip(("y", "h"), outs, outs64, outs0):
        assert o.dtype == dtype and o.shape == x.shape
        assert_close(f"{backend} {kind} {name}", o, o64, o0)
    names = [nm for nm, t in zip(("grad_x", "grad_residual", "grad_weight", "grad_bias"), inputs) if t is not None]
    for name, g, g64, g0 in zip(names, gs, gs64, gs0):
        assert g.dtype == dtype
        assert_close(f"{backend} {kind} {name}", g, g64, g0, kind="grad")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
def test_matches_float64(backend, device, dtype, kind, residual, shape):
    _check(backend, device, dtype, kind, shape, residual=residual)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_wide_rows_and_affine_options(backend, device, dtypes, kind):
    _check(backend, device, torch.float32, kind, (129, 3072))
    _check(backend, device, torch.float32, kind, (5, 100), weight=False, bias=False)
    _check(backend, device, torch.float32, kind, (5, 100), weight=True, bias=False, eps=0.1)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_layouts_and_multidim_normalized_shape(backend, device, dtypes):
    x = torch.randn(6, 40, device=device)[:, 3:35]  # row-padded
    r = torch.randn(32, 6, device=device).t()  # transposed
    w, b = torch.randn(32, device=device), torch.randn(32, device=device)
    y, h = layer_norm(x, 32, w, b, residual=r, backend=backend)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, F.layer_norm(x + r, (32,), w, b), rtol=1e-5, atol=1e-5)
    x3 = torch.randn(3, 4, 5, device=device)
    w3 = torch.randn(4, 5, device=device)
    torch.testing.assert_close(rms_norm(x3, (4, 5), w3, backend=backend), F.rms_norm(x3, (4, 5), w3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_empty_batch(backend, device, dtypes):
    x = torch.randn(0, 16, device=device, requires_grad=True)
    w = torch.randn(16, device=device, requires_grad=True)
    b = torch.randn(16, device=device, requires_grad=True)
    y, h = layer_norm(x, 16, w, b, residual=x.detach().clone(), backend=backend)
    assert y.shape == (0, 16) and h.shape == (0, 16)
    gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b))
    assert gx.shape == (0, 16) and torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_repeatable_bitwise(backend, device, dtypes):
    x = torch.randn(67, 129, device=device, requires_grad=True)
    r = torch.randn(67, 129, device=device)
    w = torch.randn(129, device=device, requires_grad=True)
    b = torch.randn(129, device=device, requires_grad=True)
    g = torch.randn(67, 129, device=device)
    runs = [torch.autograd.grad(layer_norm(x, 129, w, b, residual=r, backend=backend)[0], (x, w, b), g) for _ in range(2)]
    assert all(torch.equal(a, c) for a, c in zip(*runs))


@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="extension not built")
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_cpu_large_rows_take_the_streaming_path(kind):
    """>= 8 MiB of fp32 output with 16-aligned rows into mapped pages (the NaN prefill of the
    test's deterministic mode maps them): the cpu kernel builds h in a scratch row and streams h
    and y to memory; results must match the fp64 oracle and h must be exact."""
    x, r, w, b = torch.randn(2816, 768), torch.randn(2816, 768), torch.randn(768), torch.randn(768)
    if kind == "layer":
        y, h = layer_norm(x, (768,), w, b, residual=r, backend="cpu")
        y64 = F.layer_norm(x.double() + r.double(), (768,), w.double(), b.double())
    else:
        y, h = rms_norm(x, (768,), w, residual=r, backend="cpu")
        y64 = F.rms_norm(x.double() + r.double(), (768,), w.double(), eps=torch.finfo(torch.float32).eps)
    assert torch.equal(h, x + r)
    assert_close("cpu streamed y", y, y64)


def test_rms_norm_default_eps_is_torch_default():
    x = torch.randn(4, 8) * 1e-4
    torch.testing.assert_close(rms_norm(x, 8, backend="cpu"), F.rms_norm(x, (8,)))
    torch.testing.assert_close(rms_norm(x, 8), F.rms_norm(x, (8,), eps=torch.finfo(torch.float32).eps))


def test_statistics_are_fp32_and_saved():
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    for backend in ("reference", "cpu"):
        y, h, mean, rstd = torch.ops.fastlm.norm(x, None, None, None, 1e-5, False, backend)
        assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (5,) and h.numel() == 0
        torch.testing.assert_close(mean, x.float().mean(-1))
        torch.testing.assert_close(rstd, torch.rsqrt(x.float().var(-1, unbiased=False) + 1e-5))


@pytest.mark.parametrize("rms", [False, True])
def test_reference_backward_formula(rms):
    h = torch.randn(9, 33, dtype=torch.float64, requires_grad=True)
    w = torch.randn(33, dtype=torch.float64, requires_grad=True)
    b = None if rms else torch.randn(33, dtype=torch.float64, requires_grad=True)
    gy, gs = torch.randn(9, 33, dtype=torch.float64), torch.randn(9, 33, dtype=torch.float64)
    y = F.rms_norm(h, (33,), w, 1e-6) if rms else F.layer_norm(h, (33,), w, b, 1e-6)
    want = torch.autograd.grad((y * gy).sum() + (h * gs).sum(), [t for t in (h, w, b) if t is not None])
    _, _, mean, rstd = norm_ref(h.detach(), None, w.detach(), None if b is None else b.detach(), 1e-6, rms)
    got = norm_backward_ref(gy, gs, h.detach(), w.detach(), mean, rstd, rms, not rms)
    for g, wnt in zip(got, want):
        assert_close("ref grad", g, wnt)


# ------------------------------------------------------------------ registration / compile
@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_opcheck(backend, device, dtypes):
    x = torch.randn(5, 33, device=device, requires_grad=True)
    r = torch.randn(5, 33, device=device, requires_grad=True)
    w = torch.randn(33, device=device, requires_grad=True)
    b = torch.randn(33, device=device, requires_grad=True)
    for args in [(x, r, w, b, 1e-5, False, backend), (x, None, w, None, 1e-6, True, backend), (x, r, None, None, 0.0, True, backend)]:
        torch.library.opcheck(torch.ops.fastlm.norm.default, args)
        _, h, mean, rstd = torch.ops.fastlm.norm(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
        hh = h if args[1] is not None else x.detach()
        bwd = (torch.randn(5, 33, device=device), torch.randn(5, 33, device=device) if args[1] is not None else None,
               hh, None if args[2] is None else w.detach(), mean, rstd, args[5], args[3] is not None, backend)
        torch.library.opcheck(torch.ops.fastlm.norm_backward.default, bwd)


@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="extension not built")
def test_opcheck_extension_ops():
    x, r, w, b = torch.randn(6, 17), torch.randn(6, 17), torch.randn(17), torch.randn(17)
    torch.library.opcheck(torch.ops.fastlm.norm_fwd.default, (x, r, w, b, 1e-5, False))
    torch.library.opcheck(torch.ops.fastlm.norm_fwd.default, (x, None, w, None, 1e-5, True))
    y, h, mean, rstd = torch.ops.fastlm.norm_fwd(x, r, w, b, 1e-5, False)
    torch.library.opcheck(torch.ops.fastlm.norm_bwd.default, (torch.randn(6, 17), torch.randn(6, 17), h, w, mean, rstd, False, True))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    torch._dynamo.reset()

    def f(x, r, w, b):
        y, h = layer_norm(x * 2, 48, w, b, residual=r)
        return rms_norm(y, 48, w, residual=h)[0].sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    args = [torch.randn(8, 48, requires_grad=True) for _ in range(2)] + [torch.randn(48, requires_grad=True) for _ in range(2)]
    out, out_ref = compiled(*args), f(*args)
    torch.testing.assert_close(out, out_ref)
    for g, g_ref in zip(torch.autograd.grad(out.sum(), args), torch.autograd.grad(out_ref.sum(), args)):
        torch.testing.assert_close(g, g_ref)


# ------------------------------------------------------------------ bad input
def test_bad_inputs_name_argument_and_value():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match=r"layer_norm: x must be a floating-point tensor, got dtype torch.int64"):
        layer_norm(torch.ones(4, 8, dtype=torch.long), 8)
    with pytest.raises(ValueError, match=r"normalized_shape \[7\] does not match the trailing dims of x \(4, 8\)"):
        layer_norm(x, 7)
    with pytest.raises(ValueError, match=r"rms_norm: weight must have shape \(8,\), got \(7,\)"):
        rms_norm(x, 8, torch.randn(7))
    with pytest.raises(TypeError, match=r"bias has dtype torch.float16 but x has dtype torch.float32"):
        layer_norm(x, 8, None, torch.randn(8, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"residual must have shape \(4, 8\), got \(4, 7\)"):
        layer_norm(x, 8, residual=torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"residual is on meta but x is on cpu"):
        rms_norm(x, 8, residual=torch.randn(4, 8, device="meta"))
    with pytest.raises(ValueError, match=r"eps must be a non-negative number, got -1.0"):
        layer_norm(x, 8, eps=-1.0)
    with pytest.raises(TypeError, match=r"normalized_shape must be an int or a non-empty sequence of ints, got 'a'"):
        layer_norm(x, "a")
    with pytest.raises(fastlm.BackendUnavailableError, match=r"dtype float16 not supported by the cpu backend"):
        layer_norm(x.half(), 8, backend="cpu")


@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="extension not built")
def test_extension_ops_validate_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match=r"norm_fwd: x must be float32 or bfloat16 on cpu, got Half"):
        torch.ops.fastlm.norm_fwd(x.half(), None, None, None, 1e-5, False)
    with pytest.raises(ValueError, match=r"norm_fwd: x must be 2-D \(rows, cols\), got shape \[32\]"):
        torch.ops.fastlm.norm_fwd(x.flatten(), None, None, None, 1e-5, False)
    with pytest.raises(ValueError, match=r"residual has shape \[4, 7\] but x has shape \[4, 8\]"):
        torch.ops.fastlm.norm_fwd(x, torch.randn(4, 7), None, None, 1e-5, False)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\) to match the columns of x, got \[9\]"):
        torch.ops.fastlm.norm_fwd(x, None, torch.randn(9), None, 1e-5, False)
    with pytest.raises(ValueError, match=r"rms norm takes no bias"):
        torch.ops.fastlm.norm_fwd(x, None, None, torch.randn(8), 1e-5, True)
    with pytest.raises(ValueError, match=r"rstd must have shape \(4,\), got \[3\]"):
        torch.ops.fastlm.norm_bwd(x, None, x, None, torch.zeros(4), torch.zeros(3), False, False)


# ------------------------------------------------------------------ triton: wide rows in chunks
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_triton_wide_rows_walk_in_chunks(kind):
    """Rows wider than one register tile (fastlm.triton.norms._widths: 1,024 columns under the
    interpreter, 8,192 on GPU) take the chunked forward (Chan-merged mean / M2) and the
    row-sums + column-block backward: a ragged last chunk, a mean 1000x the spread (no
    E[z^2] - mean^2 cancellation), no weight, and a residual, against float64."""
    from fastlm.triton import norms as kernels

    device = GPU or "cpu"
    cols = kernels._widths(torch.device(device))[0] + 77
    x = torch.randn(3, cols, device=device) * 0.05 + 50.0
    _check("triton", device, torch.float32, kind, (3, cols), residual=True)
    # large offset: layer_norm's variance must not come from E[z^2] - mean^2
    outs, _ = _run(_ours(kind, "triton"), [x, None, None, None], [torch.randn_like(x)], 1e-5)
    want = _torch_norm(kind, x.double(), None, None, None, 1e-5)
    torch.testing.assert_close(outs[0].double(), want, rtol=1e-4, atol=1e-4)
    _check("triton", device, torch.float16, kind, (2, cols), residual=False, weight=False, bias=False)


# ------------------------------------------------------------------ cuda kernels under the emulator
# Each case reaches a distinct path of csrc/cuda/norms.cu: the thread count per row (1, 4, 32,
# 256: shuffles within sub-warp groups, across warps through shared memory), the backward's
# register accumulators (weight and bias, weight only, bias only, none: no partials at all),
# their fold over the row groups of a block, the persistent grid looping when there are more row
# blocks than SMs, and the split pair (row sums, column tiles) of odd widths. The partials are NaN-prefilled scratch, so
# an element a block failed to write shows up in grad_weight / grad_bias.
@pytest.mark.emu
@pytest.mark.skipif(not _ext.HAS_EMULATOR, reason="fastlm._C_emu not built")
@pytest.mark.parametrize("kind,shape,dtype,weight,bias", [
    ("layer", (300, 24), torch.bfloat16, True, True),    # 1 thread a row; 300 row groups fold in one block
    ("rms", (61, 100), torch.float16, True, False),      # 4 threads a row; weight grad only
    ("layer", (270, 4104), torch.bfloat16, True, True),  # 256 threads, 2 rows a block: 135 row blocks > SMs
    ("layer", (45, 1025), torch.float32, False, True),   # odd width (split pair); bias grad only
    ("layer", (33, 200), torch.float32, False, False),   # no gradient summed over rows
], ids=["narrow", "rms-weight", "persistent", "odd-bias", "no-affine"])
def test_cuda_emu_backward_partials(kind, shape, dtype, weight, bias):
    _check("cuda-emu", "cpu", dtype, kind, shape, weight=weight, bias=bias)


# row_io.cuh's head / 16-byte body / tail, forward and backward: odd widths (each row of a
# contiguous tensor starts at another 16-byte phase), x sliced at an odd offset, a residual and
# weight in other phases than x, and rows past 16384 columns (the streamed forward, the split
# backward), against the float64 oracle.
@pytest.mark.emu
@pytest.mark.skipif(not _ext.HAS_EMULATOR, reason="fastlm._C_emu not built")
@pytest.mark.parametrize("rows,cols,offset", [(5, 1, 0), (5, 7, 3), (5, 1000, 5), (5, 1023, 1), (2, 50257, 3), (2, 131072, 0)])
def test_cuda_emu_any_width_and_offset(rows, cols, offset):
    dtype = torch.bfloat16
    x = (torch.randn(rows, cols + 9, dtype=dtype) * 2 + 0.5)[:, offset:offset + cols]
    r = torch.randn(rows, cols + 2, dtype=dtype)[:, 2:]
    w = torch.randn(cols + 1, dtype=dtype)[1:]
    b = torch.randn(cols, dtype=dtype)
    _compare("cuda-emu", "layer", [x, r, w, b])
    _compare("cuda-emu", "rms", [x, None, w, None])


# The split backward called directly, every operand at its own odd offset and row stride (fp16:
# rows repeat their 16-byte phases only every 8 rows, so column tiles walk rows q + 8 i), a
# grad_sum, and one width past 16384 (fp32), against norm_backward_ref in float64.
@pytest.mark.emu
@pytest.mark.skipif(not _ext.HAS_EMULATOR, reason="fastlm._C_emu not built")
@pytest.mark.parametrize("dtype,cols", [(torch.float16, 1000), (torch.float32, 20001)], ids=str)
def test_cuda_emu_backward_any_layout(dtype, cols):
    rows = 19

    def strided(pad, offset):
        return torch.randn(rows, cols + pad, dtype=dtype)[:, offset:offset + cols]

    h, gy, gs = strided(3, 1) * 2 + 0.5, strided(5, 2), strided(1, 0)
    w = torch.randn(cols + 1, dtype=dtype)[1:]
    for rms in (False, True):
        _, _, mean, rstd = norm_ref(h, None, w, None, 1e-5, rms)  # fp32 statistics, as the forward saves them
        got = torch.ops.fastlm_emu.norm_bwd(gy, gs, h, w, mean, rstd, rms, not rms)
        want = norm_backward_ref(gy.double(), gs.double(), h.double(), w.double(), mean.double(), rstd.double(), rms, not rms)
        base = norm_backward_ref(gy, gs, h, w, mean, rstd, rms, not rms)
        for name, g, g64, g0 in zip(("grad_h", "grad_weight", "grad_bias"), got, want, base):
            assert_close(f"cuda-emu {'rms' if rms else 'layer'} {name}", g, g64, g0, kind="grad")


# A NaN in one row stays in that row (y, grad_x), and grad_weight turns NaN in every column, as
# torch's does (grad_bias doesn't see xhat and stays finite): the register kernels (1000 fp32
# columns) and the streamed forward with the split backward (20000 bf16 columns).
@pytest.mark.emu
@pytest.mark.skipif(not _ext.HAS_EMULATOR, reason="fastlm._C_emu not built")
@pytest.mark.parametrize("dtype,cols", [(torch.float32, 1000), (torch.bfloat16, 20000)], ids=str)
def test_cuda_emu_nan_row_stays_in_its_row(dtype, cols):
    x, r = torch.randn(3, cols, dtype=dtype), torch.randn(3, cols, dtype=dtype)
    x[1, cols // 3] = float("nan")
    w, b = torch.randn(cols, dtype=dtype), torch.randn(cols, dtype=dtype)
    grads = [torch.randn(3, cols, dtype=dtype) for _ in range(2)]
    outs, gs = _run(_ours("layer", "cuda-emu"), [x, r, w, b], grads, 1e-5)
    ref = lambda *a: _torch_norm("layer", *a)
    outs64, gs64 = _run(ref, [x, r, w, b], grads, 1e-5, torch.float64)
    outs0, gs0 = _run(ref, [x, r, w, b], grads, 1e-5)
    assert torch.isnan(gs64[2]).all() and not torch.isnan(gs64[3]).any()  # the oracle's own pattern
    for name, o, o64, o0, kind in zip(("y", "h", "grad_x", "grad_residual", "grad_weight", "grad_bias"),
                                      outs + gs, outs64 + gs64, outs0 + gs0, ["out"] * 2 + ["grad"] * 4):
        assert torch.equal(torch.isnan(o), torch.isnan(o64)), f"{name}: NaNs not where the oracle has them"
        assert_close(f"cuda-emu nan-row {name}", o, o64, o0, kind=kind)


# The streamed forward's statistics are sums shifted by the row's first element: a mean 1000x the
# spread must not cancel (E[v^2] - mean^2 would lose ~1e6 ulps), against float64.
@pytest.mark.emu
@pytest.mark.skipif(not _ext.HAS_EMULATOR, reason="fastlm._C_emu not built")
def test_cuda_emu_long_rows_large_mean():
    x = torch.randn(2, 20000) * 0.05 + 50.0
    y = layer_norm(x, 20000, backend="cuda-emu")
    torch.testing.assert_close(y.double(), F.layer_norm(x.double(), (20000,)), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- sm_90a: long rows on a thread-block cluster (emulator)
def _emu_counts():
    """(launches, blocks) the emulator has run so far."""
    stats = torch.ops.fastlm_emu.emu_stats()
    return stats[0], stats[1]


def _emu_fwd_check(x, r, w, b, rms):
    """norm_fwd under the emulator against the float64 oracle of the same h = x + r (in x's dtype, as
    eager rounds it; h itself must equal that sum exactly): y, mean, rstd."""
    y, h, mean, rstd = torch.ops.fastlm_emu.norm_fwd(x, r, w, b, 1e-5, rms)
    hd = x if r is None else x + r
    if r is not None:
        assert torch.equal(h, hd), "h = x + residual, rounded once to the dtype"
    d = lambda t: None if t is None else t.double()
    y64, _, mean64, rstd64 = norm_ref(hd.double(), None, d(w), d(b), 1e-5, rms)
    y0 = norm_ref(hd, None, w, b, 1e-5, rms)[0]
    assert_close(f"cluster {x.dtype} y", y, y64, y0)
    if not rms:
        assert_close("cluster mean", mean, mean64.reshape(mean.shape))
    assert_close("cluster rstd", rstd, rstd64.reshape(rstd.shape))


# (dtype, cols, x's row pad and storage offset, residual, rms, weight, bias, cluster size): fp32
# 131072 dense (4 x 128 KB, 16-byte loads and stores of every operand); bf16 131072 at offset 3, row
# stride cols + 5 (head and tail scalars on the first and last rank, a residual, h, y, weight out
# of x's 16-byte phase: element accesses at x's pack positions); fp16 70001 rms without residual
# (odd width: every row another phase); fp32 40000 layer without residual, weight or bias.
CLUSTER_FORWARD = [pytest.param(*case, id=f"{str(case[0])[6:]}-{case[1]}", marks=EMU_MARKS) for case in (
    (torch.float32, 131072, 0, 0, True, False, True, True, 4),
    (torch.bfloat16, 131072, 5, 3, True, False, True, True, 2),
    (torch.float16, 70001, 4, 1, False, True, True, False, 2),
    (torch.float32, 40000, 0, 0, False, False, False, False, 2))]


@pytest.mark.parametrize("dtype,cols,pad,offset,residual,rms,weight,bias,size", CLUSTER_FORWARD)
def test_cuda_emu_cluster_forward_long_rows(dtype, cols, pad, offset, residual, rms, weight, bias, size):
    """Rows past 16384 columns on sm_90a run forward_cluster: the row's h held in the shared memory
    of a cluster of `size` CTAs (x and residual read once), the sum and then the centered squares
    crossing the cluster through DSMEM, y written from shared memory; a mean 5x the spread."""
    rows = 3 if pad else 2
    trend = torch.linspace(3.0, 7.0, cols + pad, dtype=torch.float64)  # unlike sums on every rank's slice
    x = (torch.randn(rows, cols + pad, dtype=torch.float64) * 0.5 + trend).to(dtype)[:, offset:offset + cols]
    r = None
    if residual:  # dense with x, else 2 elements into rows of cols + 2 (out of x's phase)
        r = torch.randn(rows, cols + 2 * bool(pad), dtype=torch.float64).to(dtype)[:, 2 * bool(pad):]
    w = torch.randn(cols + 1, dtype=torch.float64).to(dtype)[1:] if weight else None
    b = torch.randn(cols, dtype=torch.float64).to(dtype) if bias else None
    with emulated_gpu():
        launches, blocks = _emu_counts()
        _emu_fwd_check(x, r, w, b, rms)
        assert _emu_counts() == (launches + 1, blocks + rows * size), "one cluster of `size` CTAs per row"


def _emu_bwd_check(gy, gs, h, w, rms, bias_grad):
    """norm_bwd under the emulator against norm_backward_ref in float64 (grad_h, grad_weight,
    grad_bias), with the fp32 statistics the forward saves."""
    _, _, mean, rstd = norm_ref(h, None, w, None, 1e-5, rms)
    got = torch.ops.fastlm_emu.norm_bwd(gy, gs, h, w, mean, rstd, rms, bias_grad)
    d = lambda t: None if t is None else t.double()
    want = norm_backward_ref(d(gy), d(gs), d(h), d(w), d(mean), d(rstd), rms, bias_grad)
    base = norm_backward_ref(gy, gs, h, w, mean, rstd, rms, bias_grad)
    for name, g, g64, g0 in zip(("grad_h", "grad_weight", "grad_bias"), got, want, base):
        assert_close(f"cluster {h.dtype} {'rms' if rms else 'layer'} {name}", g, g64, g0, kind="grad")


# (dtype, cols, rms, grad_sum, weight, bias grad, cluster size): every operand 16-byte aligned in
# pointer and row stride (the cluster backward's layouts). fp32 131072 in 8 CTAs of 16384 columns
# (2 x 64 KB held, 32 columns a thread in registers), layer with grad_sum and both gradients; bf16
# 131072 rms, weight gradient only; fp16 40000 in 3 CTAs, no weight (bias gradient only).
CLUSTER_BACKWARD = [pytest.param(*case, id=f"{str(case[0])[6:]}-{case[1]}", marks=EMU_MARKS) for case in (
    (torch.float32, 131072, False, True, True, True, 8),
    (torch.bfloat16, 131072, True, False, True, False, 8),
    (torch.float16, 40000, False, False, False, True, 3))]


@pytest.mark.parametrize("dtype,cols,rms,grad_sum,weight,bias_grad,size", CLUSTER_BACKWARD)
def test_cuda_emu_cluster_backward_long_rows(dtype, cols, rms, grad_sum, weight, bias_grad, size):
    """Aligned rows past 16384 columns on sm_90a run backward_cluster (one launch, a cluster per
    row here) and column_sum (a launch per gradient): grad_y and h held in shared memory, (c1, c2)
    crossing the cluster through DSMEM, grad_weight / grad_bias in registers, one partial row a
    cluster. The partials are NaN-prefilled scratch: a column no CTA wrote shows up."""
    rows = 2
    h64 = torch.randn(rows, cols, dtype=torch.float64) * 2 + torch.linspace(-2, 3, cols, dtype=torch.float64)
    w64 = torch.randn(cols, dtype=torch.float64)
    # grad_y along h w (+ an offset), h with a trend across the columns: c1 = mean(xhat gw) and
    # c2 = mean(gw) of order 1 and unlike on every rank's slice, so a cluster that merges its
    # (c1, c2) wrongly shows in every precision
    gy = torch.randn(rows, cols, dtype=torch.float64) + (0.5 * h64 + 0.3) * (w64 if weight else 1)
    h, gy, w = h64.to(dtype), gy.to(dtype), w64.to(dtype) if weight else None
    gs = torch.randn(rows, cols, dtype=torch.float64).to(dtype) if grad_sum else None
    grads = int(weight) + int(bias_grad)
    with emulated_gpu():
        launches, blocks = _emu_counts()
        _emu_bwd_check(gy, gs, h, w, rms, bias_grad)
        sums = grads * -(-cols // 128)  # column_sum: 128 columns a block
        assert _emu_counts() == (launches + 1 + grads, blocks + rows * size + sums), "one cluster a row, then the sums"


@pytest.mark.emu
@pytest.mark.skipif(not _ext.HAS_EMULATOR, reason="fastlm._C_emu not built")
def test_cuda_emu_cluster_backward_persistent():
    """With 2 SMs of each GPC free for clusters, 8 clusters of 2 CTAs (128 KB each) fit at once:
    10 fp32 rows of 32768 columns take 8 persistent clusters, two of them a second row (the
    (c1, c2) slot alternating by row parity), and 8 partial rows are summed."""
    rows, cols = 10, 32768
    h = torch.randn(rows, cols, dtype=torch.float64).float() * 2 + 0.5
    gy, gs = torch.randn(rows, cols), torch.randn(rows, cols)
    w = torch.randn(cols)
    with emulated_gpu(gpc_sms=2):
        launches, blocks = _emu_counts()
        _emu_bwd_check(gy, gs, h, w, False, True)
        assert _emu_counts() == (launches + 3, blocks + 8 * 2 + 2 * cols // 128), "8 clusters of 2, then 2 sums"


@pytest.mark.emu
@pytest.mark.skipif(not _ext.HAS_EMULATOR, reason="fastlm._C_emu not built")
def test_cuda_emu_cluster_falls_back():
    """With 2 SMs of each GPC free for clusters, cudaOccupancyMaxActiveClusters says 0 for 4 or 8
    CTAs of 128 KB: 131072-wide fp32 rows then take long_forward_kernel (one block a row) and the
    split backward (row sums, column tiles, 2 sums), and are still right; a 40000-wide bf16 row's
    cluster of 2 still fits. A backward out of 16-byte alignment takes the split pair anyway."""
    with emulated_gpu(gpc_sms=2):
        for dtype, cols, blocks_per_row in ((torch.float32, 131072, 1), (torch.bfloat16, 40000, 2)):
            x = (torch.randn(2, cols, dtype=torch.float64) * 2).to(dtype)
            w, b = torch.randn(cols).to(dtype), torch.randn(cols).to(dtype)
            launches, blocks = _emu_counts()
            _emu_fwd_check(x, None, w, b, False)
            assert _emu_counts() == (launches + 1, blocks + 2 * blocks_per_row), f"{dtype}: forward blocks a row"
        gy, h = torch.randn(2, 131072), torch.randn(2, 131072) * 2 + 0.5
        launches, _ = _emu_counts()
        _emu_bwd_check(gy, None, h, torch.randn(131072), False, True)
        assert _emu_counts()[0] == launches + 4, "split pair: row sums, column tiles, 2 column sums"
    with emulated_gpu():  # all SMs: 70001 bf16 columns aren't 16-byte rows, so no cluster backward
        h = torch.randn(2, 70001, dtype=torch.float64).to(torch.bfloat16)
        launches, _ = _emu_counts()
        _emu_bwd_check(torch.randn(2, 70001).to(torch.bfloat16), None, h, torch.randn(70001).to(torch.bfloat16), False, True)
        assert _emu_counts()[0] == launches + 4, "split pair: row sums, column tiles, 2 column sums"
