"""linear (GEMM + fused bias/activation/residual epilogue) on every backend vs a float64 oracle."""
import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import _ext
from fastlm.ops.bias_act import ACTIVATIONS, act_ref
from fastlm.ops.linear import linear
from backends import cuda_params, GPU, backend_dtypes, backends
from numerics import assert_close

# The interpreter's tl.dot is wrong for bf16 operands: triton is tested with fp32/fp16 here.
BACKENDS = backends(triton_dtypes=(torch.float32, torch.float16) if GPU is None else (torch.float32, torch.float16, torch.bfloat16))
BACKENDS = BACKENDS[:-2] + cuda_params((torch.float16, torch.bfloat16))  # the tensor-core GEMM: 16-bit only
BACKEND_DTYPES = backend_dtypes(BACKENDS)
# (M, K, N): M in {1, 7, 129}, K and N in {64, 768, 3072}
SHAPES = [(1, 64, 64), (7, 768, 64), (129, 64, 768), (7, 64, 3072), (1, 3072, 64), (129, 768, 768)]
ACTS = (None,) + ACTIVATIONS
INTERPRETER_SHAPES = [(1, 64, 64), (7, 64, 128), (129, 64, 64), (7, 128, 64)]
# The emulator runs a 128x128x64 tile in tens of milliseconds, forward and both backward GEMMs:
# shapes that still cross every tile edge (M, N past 128, K past a 64-deep tile) but stay small.
EMULATOR_SHAPES = [(1, 64, 64), (7, 200, 64), (129, 64, 136), (7, 64, 264), (1, 136, 64), (130, 136, 136)]
GEMM_TOL = dict(rtol=1e-4, atol=1e-4)  # fp32 sums over up to 3072 terms


def _torch_linear(x, w, b, r, activation):
    y = F.linear(x, w, b)
    y = act_ref(y, activation) if activation else y
    return y + r if r is not None else y


def _run(fn, inputs, grad, dtype=None):
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    y = fn(*leaves)
    return y, torch.autograd.grad(y, [t for t in leaves if t is not None], grad.to(y.dtype))


def _check(backend, device, dtype, activation, M, K, N, bias=True, residual=True, lead=(), fp32_tol=GEMM_TOL):
    x = torch.randn(*lead, M, K, device=device, dtype=dtype)
    w = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, device=device, dtype=dtype) if bias else None
    if activation == "relu" and bias:
        # relu's kink: a pre-activation within fp32 rounding of 0 can fall on opposite sides in the
        # op and the float64 oracle, and a whole grad_x row differs (a CI flake at 7x64x3072 fp32).
        # On a grid (x in halves, w in 1/32s, b an odd multiple of 1/128 under 1, all exact in
        # fp16 / bf16) every pre-activation is an exact odd multiple of 1/128 in any summation
        # order: never 0, the same sign in every backend.
        x = ((x.float() * 2).round() / 2).to(dtype)
        w = ((w.float() * 32).round() / 32).to(dtype)
        b = (((torch.randn(N, device=device) * 32).floor().clamp(-64, 63) * 2 + 1) / 128).to(dtype)
    r = torch.randn(*lead, M, N, device=device, dtype=dtype) if residual else None
    grad = torch.randn(*lead, M, N, device=device, dtype=dtype)
    inputs = [x, w, b, r]
    ours = lambda x_, w_, b_, r_: linear(x_, w_, b_, activation=activation, residual=r_, backend=backend)
    ref = lambda x_, w_, b_, r_: _torch_linear(x_, w_, b_, r_, activation)
    y, gs = _run(ours, inputs, grad)
    y64, gs64 = _run(ref, inputs, grad, torch.float64)
    y0, gs0 = _run(ref, inputs, grad)
    assert y.dtype == dtype and y.shape == (*lead, M, N)
    assert_close(f"{backend} y", y, y64, y0, fp32_tol=fp32_tol)
    names = [n for n, t in zip(("grad_x", "grad_weight", "grad_bias", "grad_residual"), inputs) if t is not None]
    for name, g, g64, g0 in zip(names, gs, gs64, gs0):
        assert g.dtype == dtype
        assert_close(f"{backend} {name}", g, g64, g0, kind="grad", fp32_tol=fp32_tol)


@pytest.mark.parametrize("index", range(len(SHAPES)), ids=lambda i: "x".join(map(str, SHAPES[i])))
@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
def test_matches_float64(backend, device, dtype, index):
    shape = SHAPES[index]
    if backend == "triton" and device == "cpu" and shape not in INTERPRETER_SHAPES:
        shape = INTERPRETER_SHAPES[index % len(INTERPRETER_SHAPES)]  # the interpreter is slow: small shapes
    if backend == "cuda-emu":
        shape = EMULATOR_SHAPES[index]
    acts = [ACTS[index % len(ACTS)]] + ([ACTS[(index + 3) % len(ACTS)]] if dtype == torch.float32 else [])
    for act in acts:  # every activation shows up across the shapes
        _check(backend, device, dtype, act, *shape)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_optional_bias_residual_and_leading_dims(backend, device, dtypes):
    dtype = dtypes[0]
    _check(backend, device, dtype, "gelu", 7, 64, 64, bias=False, residual=False)
    _check(backend, device, dtype, None, 7, 64, 64, bias=False, residual=True)
    _check(backend, device, dtype, "silu", 5, 64, 128, lead=(2,))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_vocab_width(backend):
    # grad_x sums 50304 terms of size ~28 in fp32: about sqrt(50304 / 3072) = 4x GEMM_TOL's error
    _check(backend, "cpu", torch.float32, None, 7, 64, 50304, residual=False, fp32_tol=dict(rtol=1e-4, atol=5e-4))


def test_cpu_output_past_32_mib_on_huge_pages():
    """(192, 50304) fp32 z and y are >= 32 MiB each: the cpu binding advises huge pages for them
    (csrc/bindings/cpu_output.h) before the GEMM and the epilogue write them."""
    _check("cpu", "cpu", torch.float32, "gelu", 192, 64, 50304, residual=True)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_non_contiguous_inputs(backend, device, dtypes):
    dtype = dtypes[0]
    x = torch.randn(64, 9, device=device, dtype=dtype).t()  # (9, 64), column-major
    w = torch.randn(48, 64, device=device, dtype=dtype)[::2]  # (24, 64) row stride 128 (the GEMM takes N % 8 == 0)
    r = torch.randn(9, 48, device=device, dtype=dtype)[:, ::2]
    y = linear(x, w, None, activation="relu", residual=r, backend=backend)
    want = (F.relu(x.double() @ w.double().t()) + r.double()).to(dtype)
    torch.testing.assert_close(y, want, rtol=2e-3 if dtype != torch.float32 else 1e-5, atol=2e-3 if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_misaligned_storage_offset(backend, device, dtypes):
    """Contiguous views whose data starts off a 16-byte boundary (the cuda GEMM's cp.async copies
    16-byte chunks: such operands must be realigned, not fed to it)."""
    dtype = dtypes[-1]
    x = torch.randn(33 * 64 + 3, device=device, dtype=dtype)[3:].view(33, 64)
    w = torch.randn(24 * 64 + 1, device=device, dtype=dtype)[1:].view(24, 64)
    r = torch.randn(33 * 24 + 5, device=device, dtype=dtype)[5:].view(33, 24)
    y = linear(x, w, None, activation="gelu", residual=r, backend=backend)
    want = (F.gelu(x.double() @ w.double().t()) + r.double()).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend,device,dtypes", cuda_params((torch.float16, torch.bfloat16)))
def test_gemm_core_raster_and_operand_layouts(backend, device, dtypes):
    """The GEMM core (csrc/cuda/gemm_core.cuh) on the edges its tiles and grouped raster order
    have: 9 x 2 output tiles (more M tiles than one raster group of 8, so the last group is
    partial), a K that ends mid-tile, and the backward's transposed (MN-major) operand reads of
    grad_p, x and weight, here from strided views: weight with a row stride past its width (read
    in place), grad_y a column slice and x the transpose of a row-major tensor (the binding
    copies those two to 16-byte aligned rows first)."""
    dtype = dtypes[-1]
    M, K, N = 1100, 72, 136
    _check(backend, device, dtype, "gelu_tanh", M, K, N)
    x = torch.randn(K, M, device=device, dtype=dtype).t()  # (M, K), M-contiguous
    w = torch.randn(N, K + 8, device=device, dtype=dtype)[:, :K]  # row stride K + 8
    g = torch.randn(M, 2 * N, device=device, dtype=dtype)[:, ::2]  # column stride 2
    xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
    gx, gw = torch.autograd.grad(linear(xs, ws, backend=backend), (xs, ws), g)
    x64, w64, g64 = x.double(), w.double(), g.double()
    assert_close(f"{backend} strided grad_x", gx, g64 @ w64, g @ w, kind="grad")
    assert_close(f"{backend} strided grad_weight", gw, g64.t() @ x64, g.t() @ x, kind="grad")


@pytest.mark.skipif(not _ext.HAS_EMULATOR, reason="the emulator extension is not built")
@pytest.mark.parametrize("M,K,N", [(1, 1032, 64), (64, 520, 136)])
def test_small_m_split_k(M, K, N):
    """M <= 64 (decode): the cuda forward splits K over CTAs into a fp32 workspace and a second
    launch sums the slices and applies the epilogue (5 and 3 slices here, each ending in a ragged
    one); checked against the oracle with every epilogue input, and that it did split."""
    dtype = torch.float16
    x, w = torch.randn(M, K, dtype=dtype), (torch.randn(N, K) / K**0.5).to(dtype)
    b, r = torch.randn(N, dtype=dtype), torch.randn(M, N, dtype=dtype)
    before = torch.ops.fastlm_emu.emu_stats()[0]
    y, pre = torch.ops.fastlm_emu.linear_fwd(x, w, b, r, "silu", True)
    assert torch.ops.fastlm_emu.emu_stats()[0] - before == 2, "expected the split GEMM and its epilogue launch"
    z64 = x.double() @ w.double().t() + b.double()
    z = (x.float() @ w.float().t() + b.float()).to(dtype)
    assert_close("split-K preact", pre, z64, z)
    y64 = F.silu(z64.to(dtype).double()) + r.double()
    assert_close("split-K y", y, y64, (F.silu(z.float()) + r.float()).to(dtype))
    _check("cuda-emu", "cpu", dtype, "gelu", M, K, N)  # the backward too


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_empty_batch(backend, device, dtypes):
    x = torch.randn(0, 64, device=device, dtype=dtypes[0], requires_grad=True)
    w = torch.randn(32, 64, device=device, dtype=dtypes[0], requires_grad=True)
    b = torch.randn(32, device=device, dtype=dtypes[0], requires_grad=True)
    y = linear(x, w, b, activation="gelu", backend=backend)
    assert y.shape == (0, 32)
    gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b))
    assert gx.shape == (0, 64) and torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))


def test_inference_saves_no_preactivation():
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    with torch.no_grad():
        y, z = torch.ops.fastlm.linear(x, w, None, None, "gelu", False, "cpu")
    assert z.numel() == 0
    y2, z2 = torch.ops.fastlm.linear(x, w, None, None, "gelu", True, "cpu")
    torch.testing.assert_close(z2, x @ w.t())
    torch.testing.assert_close(y, y2)


# ------------------------------------------------------------------ registration / compile
@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_opcheck(backend, device, dtypes):
    dt = dtypes[0]
    x = torch.randn(5, 32, device=device, dtype=dt, requires_grad=True)
    w = torch.randn(16, 32, device=device, dtype=dt, requires_grad=True)
    b = torch.randn(16, device=device, dtype=dt, requires_grad=True)
    r = torch.randn(5, 16, device=device, dtype=dt, requires_grad=True)
    for args in [(x, w, b, r, "gelu", True, backend), (x, w, None, None, "none", False, backend)]:
        torch.library.opcheck(torch.ops.fastlm.linear.default, args)
    _, z = torch.ops.fastlm.linear(x.detach(), w.detach(), b.detach(), None, "silu", True, backend)
    g = torch.randn(5, 16, device=device, dtype=dt)
    torch.library.opcheck(torch.ops.fastlm.linear_backward.default, (g, x.detach(), w.detach(), b.detach(), z, "silu", backend))


@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="extension not built")
def test_opcheck_extension_ops():
    x, w, b, r = torch.randn(6, 16), torch.randn(8, 16), torch.randn(8), torch.randn(6, 8)
    torch.library.opcheck(torch.ops.fastlm.linear_fwd.default, (x, w, b, r, "gelu_tanh", True))
    torch.library.opcheck(torch.ops.fastlm.linear_fwd.default, (x, w, None, None, "none", False))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    torch._dynamo.reset()

    def f(x, w, b, r):
        return linear(x * 2, w, b, activation="gelu", residual=r).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    args = [torch.randn(8, 48, requires_grad=True), torch.randn(24, 48, requires_grad=True),
            torch.randn(24, requires_grad=True), torch.randn(8, 24, requires_grad=True)]
    out, out_ref = compiled(*args), f(*args)
    torch.testing.assert_close(out, out_ref)
    for g, g_ref in zip(torch.autograd.grad(out.sum(), args), torch.autograd.grad(out_ref.sum(), args)):
        torch.testing.assert_close(g, g_ref)


# ------------------------------------------------------------------ bad input
def test_bad_inputs_name_argument_and_value():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(TypeError, match=r"linear: x must be a floating-point tensor, got dtype torch.int64"):
        linear(torch.ones(4, 8, dtype=torch.long), w)
    with pytest.raises(ValueError, match=r"unknown activation 'tanh'; expected None or one of gelu, gelu_tanh, relu, silu"):
        linear(x, w, activation="tanh")
    with pytest.raises(ValueError, match=r"weight must have shape \(N, 8\) to match the last dim of x \(4, 8\), got \(6, 7\)"):
        linear(x, torch.randn(6, 7))
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\), got \(8,\)"):
        linear(x, w, torch.randn(8))
    with pytest.raises(ValueError, match=r"residual must have shape \(4, 6\), got \(4, 8\)"):
        linear(x, w, residual=torch.randn(4, 8))
    with pytest.raises(TypeError, match=r"weight has dtype torch.float16 but x has dtype torch.float32"):
        linear(x, w.half())
    with pytest.raises(ValueError, match=r"bias is on meta but x is on cpu"):
        linear(x, w, torch.randn(6, device="meta"))
    with pytest.raises(fastlm.BackendUnavailableError, match=r"tensor-core GEMM needs N and K multiples of 8, got N=6, K=9"):
        linear(torch.randn(4, 9, dtype=torch.float16), torch.randn(6, 9, dtype=torch.float16), backend="cuda")


@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="extension not built")
def test_extension_ops_validate_inputs():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(TypeError, match=r"linear: x must be float32 or bfloat16 on cpu, got Half"):
        torch.ops.fastlm.linear_fwd(x.half(), w.half(), None, None, "none", False)
    with pytest.raises(ValueError, match=r"unknown activation 'elu'; expected one of none, gelu"):
        torch.ops.fastlm.linear_fwd(x, w, None, None, "elu", False)
    with pytest.raises(ValueError, match=r"weight must have shape \(N, 8\) to match x's K, got \[6, 7\]"):
        torch.ops.fastlm.linear_fwd(x, torch.randn(6, 7), None, None, "none", False)
    with pytest.raises(ValueError, match=r"residual must have shape \(4, 6\), got \[4, 7\]"):
        torch.ops.fastlm.linear_fwd(x, w, None, torch.randn(4, 7), "none", False)


@pytest.mark.skipif(not _ext.HAS_EMULATOR, reason="the emulator extension is not built")
def test_cuda_backward_op_validates_inputs():
    ops = torch.ops.fastlm_emu
    x, w, g = torch.randn(4, 16).half(), torch.randn(8, 16).half(), torch.randn(4, 8).half()
    with pytest.raises(TypeError, match=r"linear_bwd: x must be float16 or bfloat16 for the CUDA tensor-core GEMM, got Float"):
        ops.linear_bwd(g.float(), x.float(), w.float())
    with pytest.raises(ValueError, match=r"linear_bwd: grad_p must have shape \(4, 8\), got \[4, 9\]"):
        ops.linear_bwd(torch.randn(4, 9).half(), x, w)
    with pytest.raises(TypeError, match=r"linear_bwd: grad_p and weight must have x's dtype Half, got BFloat16"):
        ops.linear_bwd(g, x, w.bfloat16())
    with pytest.raises(ValueError, match=r"linear_bwd: the CUDA GEMM needs N and K multiples of 8, got N=6, K=16"):
        ops.linear_bwd(torch.randn(4, 6).half(), x, torch.randn(6, 16).half())


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_zero_inner_dim(backend, device, dtypes):
    x = torch.randn(5, 0, device=device, dtype=dtypes[0], requires_grad=True)
    w = torch.randn(16, 0, device=device, dtype=dtypes[0], requires_grad=True)
    b = torch.randn(16, device=device, dtype=dtypes[0], requires_grad=True)
    y = linear(x, w, b, activation="silu", backend=backend)  # the cuda GEMM runs only its epilogue
    tol = 1e-4 if dtypes[0] == torch.float32 else 1e-2
    torch.testing.assert_close(y, F.silu(b).expand(5, 16), rtol=tol, atol=tol)
    g = torch.randn(5, 16, device=device, dtype=dtypes[0])
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), g)
    want = (g.double() * torch.autograd.functional.jacobian(F.silu, b.detach().double()).diagonal()).sum(0)
    torch.testing.assert_close(gb.double(), want, rtol=tol, atol=tol)
    assert gx.shape == (5, 0) and gw.shape == (16, 0)
