"""bias_act on every backend against a float64 oracle (tolerance rule in numerics.py)."""
import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import _ext
from fastlm.ops.bias_act import ACTIVATIONS, bias_act, bias_act_backward_ref, bias_act_ref
from numerics import assert_close
from row_cases import BACKEND_DTYPES, BACKENDS

SHAPES = [(1,), (3, 7), (2, 3, 97), (5, 1025), (4, 1)]


def _gelu(z):
    """erf GELU; in fp64 as z * erfc(-z / sqrt 2) / 2, exact in the far negative tail, where
    F.gelu's 1 + erf(z / sqrt 2) cancels to 0 (below z ~ -8.3) while an fp32 kernel still gives
    ~1e-20 and would be charged with that as error."""
    return 0.5 * z * torch.special.erfc(-z * 0.7071067811865476) if z.dtype == torch.float64 else F.gelu(z)


def _act(z, activation):
    return {
        "gelu": _gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "relu": F.relu,
        "silu": F.silu,
    }[activation](z)


def _run(fn, x, bias, grad, dtype=None):
    """fn's output and (grad_x, grad_bias), with x and bias cast to `dtype` (default: as given)."""
    x = x.detach().to(dtype or x.dtype).requires_grad_()
    b = None if bias is None else bias.detach().to(x.dtype).requires_grad_()
    y = fn(x, b)
    grads = torch.autograd.grad(y, [x] + ([b] if b is not None else []), grad.to(y.dtype))
    return y, grads


def _check(backend, device, dtype, activation, x, bias):
    """Forward and both gradients of `backend` vs the fp64 oracle and plain low-precision torch."""
    grad = torch.randn(x.shape, device=device, dtype=dtype)
    y, grads = _run(lambda a, b: bias_act(a, b, activation, backend=backend), x, bias, grad)
    y64, grads64 = _run(lambda a, b: _act(a if b is None else a + b, activation), x, bias, grad, torch.float64)
    y0, grads0 = _run(lambda a, b: _act(a if b is None else a + b, activation), x, bias, grad)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    assert_close(f"{backend} y", y, y64, y0)
    for name, g, g64, g0 in zip(("grad_x", "grad_bias"), grads, grads64, grads0):
        assert g.dtype == dtype
        assert_close(f"{backend} {name}", g, g64, g0, kind="grad")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
def test_matches_float64(backend, device, dtype, activation, shape):
    x = torch.randn(shape, device=device, dtype=dtype) * 3
    bias = torch.randn(shape[-1], device=device, dtype=dtype)
    _check(backend, device, dtype, activation, x, bias)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
@pytest.mark.parametrize("layout", ["strided_cols", "transposed", "row_padded", "broadcast_rows", "no_bias", "3d"])
def test_layouts(backend, device, dtypes, layout):
    dtype = torch.float32
    if layout == "strided_cols":
        x = torch.randn(9, 34, device=device)[:, ::2]
    elif layout == "transposed":
        x = torch.randn(13, 6, device=device).t()
    elif layout == "row_padded":
        x = torch.randn(11, 40, device=device)[:, 3:20]
    elif layout == "broadcast_rows":
        x = torch.randn(1, 19, device=device).expand(5, 19)
    elif layout == "3d":
        x = torch.randn(2, 3, 4, 7, device=device)
    else:
        x = torch.randn(6, 21, device=device)
    bias = None if layout == "no_bias" else torch.randn(x.shape[-1], device=device, dtype=dtype)
    _check(backend, device, dtype, "gelu", x, bias)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 16), (4, 0), (0,)], ids=str)
def test_empty(backend, device, dtypes, shape):
    x = torch.randn(shape, device=device, requires_grad=True)
    b = torch.randn(shape[-1], device=device, requires_grad=True)
    y = bias_act(x, b, backend=backend)
    assert y.shape == x.shape
    gx, gb = torch.autograd.grad(y.sum(), (x, b))
    assert gx.shape == x.shape and torch.equal(gb, torch.zeros_like(b))


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_repeatable_bitwise(backend, device, dtypes):
    x = torch.randn(67, 129, device=device, requires_grad=True)
    b = torch.randn(129, device=device, requires_grad=True)
    grad = torch.randn(67, 129, device=device)
    runs = [torch.autograd.grad(bias_act(x, b, "silu", backend=backend), (x, b), grad) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_backward_formula(activation, dtype):
    """The reference's hand-written derivative against fp64 autograd of torch's activation."""
    x = torch.randn(31, 45, dtype=torch.float64) * 4
    b = torch.randn(45, dtype=torch.float64)
    grad = torch.randn(31, 45, dtype=torch.float64)
    y64, (gx64, gb64) = _run(lambda a, c: _act(a + c, activation), x, b, grad)
    gx, gb = bias_act_backward_ref(grad.to(dtype), x.to(dtype), b.to(dtype), activation)
    assert_close("ref y", bias_act_ref(x.to(dtype), b.to(dtype), activation), y64)
    assert_close("ref grad_x", gx, gx64)
    assert_close("ref grad_bias", gb, gb64)


def test_large_magnitudes_and_nan():
    x = torch.tensor([[-1e4, -30.0, -5.0, 0.0, 5.0, 30.0, 1e4, float("nan")]])
    b = torch.zeros(8)
    for backend in ("reference", "cpu"):
        for activation in ACTIVATIONS:
            y = bias_act(x, b, activation, backend=backend)
            y64 = _act(x.double(), activation)
            assert torch.isnan(y[0, -1]), f"{backend} {activation}: NaN input must give NaN"
            torch.testing.assert_close(y[0, :-1].double(), y64[0, :-1], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ registration / compile
def _op_samples(device, backend):
    x = torch.randn(5, 33, device=device, requires_grad=True)
    b = torch.randn(33, device=device, requires_grad=True)
    return [(x, b, "gelu", backend), (x.detach()[:, :20], None, "relu", backend)]


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_opcheck(backend, device, dtypes):
    for args in _op_samples(device, backend):
        torch.library.opcheck(torch.ops.fastlm.bias_act.default, args)
        x, b = args[0].detach(), args[1]
        bwd_args = (torch.randn_like(x), x, None if b is None else b.detach(), args[2], backend)
        torch.library.opcheck(torch.ops.fastlm.bias_act_backward.default, bwd_args)


@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="extension not built")
def test_opcheck_extension_ops():
    x, b = torch.randn(6, 17), torch.randn(17)
    torch.library.opcheck(torch.ops.fastlm.bias_act_fwd.default, (x, b, "gelu_tanh"))
    torch.library.opcheck(torch.ops.fastlm.bias_act_bwd.default, (torch.randn(6, 17), x, b, "silu"))
    torch.library.opcheck(torch.ops.fastlm.bias_act_bwd.default, (torch.randn(6, 17), x, None, "relu"))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    torch._dynamo.reset()

    def f(x, b):
        return bias_act(x * 2, b, "gelu").sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    x = torch.randn(8, 48, requires_grad=True)
    b = torch.randn(48, requires_grad=True)
    out, out_ref = compiled(x, b), f(x, b)
    torch.testing.assert_close(out, out_ref)
    grads = torch.autograd.grad(out.sum(), (x, b))
    grads_ref = torch.autograd.grad(out_ref.sum(), (x, b))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


def test_compile_honours_use_backend():
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: bias_act(x, None, "relu"), fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 8)
    with fastlm.use_backend("reference"):
        torch.testing.assert_close(compiled(x), F.relu(x))
    # under fullgraph dynamo re-raises our error wrapped; the message must still say why
    with fastlm.use_backend("cuda"), pytest.raises(Exception, match=r"backend 'cuda' \(from fastlm.use_backend\) can't serve"):
        compiled(x)


# ------------------------------------------------------------------ bad input
def test_bad_inputs_name_argument_and_value():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match=r"bias_act: x must be a floating-point tensor, got dtype torch.int64"):
        bias_act(torch.ones(4, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"unknown activation 'tanhh'; expected one of gelu, gelu_tanh, relu, silu"):
        bias_act(x, None, "tanhh")
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\) to match the last dim of x \(4, 8\), got \(7,\)"):
        bias_act(x, torch.randn(7))
    with pytest.raises(ValueError, match=r"got \(1, 8\)"):
        bias_act(x, torch.randn(1, 8))
    with pytest.raises(TypeError, match=r"bias has dtype torch.float16 but x has dtype torch.float32"):
        bias_act(x, torch.randn(8, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"bias is on meta but x is on cpu"):
        bias_act(x, torch.randn(8, device="meta"))
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got list"):
        bias_act([1.0, 2.0])
    with pytest.raises(ValueError, match=r"bias given but x is 0-dimensional"):
        bias_act(torch.tensor(1.0), torch.randn(1))


def test_explicit_backend_that_cannot_serve_lists_every_reason():
    x = torch.randn(4, 8, dtype=torch.float16)
    with pytest.raises(fastlm.BackendUnavailableError) as info:
        bias_act(x, backend="cpu")
    msg = str(info.value)
    assert "backend 'cpu' (from backend=) can't serve" in msg
    assert "dtype float16 not supported by the cpu backend (float32, bfloat16)" in msg
    for name in ("cuda:", "triton:", "cpu:", "reference: can serve"):
        assert name in msg
    # auto routes fp16 on the CPU to the reference instead of failing
    torch.testing.assert_close(bias_act(x), F.gelu(x.float()).half(), rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="extension not built")
def test_extension_ops_validate_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match=r"x must be float32 or bfloat16 on cpu, got Half"):
        torch.ops.fastlm.bias_act_fwd(x.half(), None, "gelu")
    with pytest.raises(ValueError, match=r"unknown activation 'elu'"):
        torch.ops.fastlm.bias_act_fwd(x, None, "elu")
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\) to match the last dim of x, got \[9\]"):
        torch.ops.fastlm.bias_act_fwd(x, torch.randn(9), "gelu")
    with pytest.raises(TypeError, match=r"bias has dtype BFloat16 but x has dtype Float"):
        torch.ops.fastlm.bias_act_fwd(x, torch.randn(8, dtype=torch.bfloat16), "gelu")
    with pytest.raises(ValueError, match=r"grad_out has shape \[4, 7\] but x has shape \[4, 8\]"):
        torch.ops.fastlm.bias_act_bwd(torch.randn(4, 7), x, None, "gelu")


# ------------------------------------------------------------------ cuda kernels under the emulator
# Aligned rows (one phase: every row split walks all rows), a thread's
# 4 rows in flight with a partial group (rows not a multiple of 4 x the row step), several
# column blocks with a partly idle last one, and grad_bias from per-row-split partials through
# column_sum (NaN-prefilled scratch: an unwritten partial shows up in grad_bias).
@pytest.mark.emu
@pytest.mark.skipif(not _ext.HAS_EMULATOR, reason="fastlm._C_emu not built")
@pytest.mark.parametrize("shape,dtype,activation", [
    ((1800, 256), torch.bfloat16, "gelu"),  # 32 threads x 8 rows a block, 216 row splits: rows 0..1727 + a partial 4-row group
    ((23, 2056), torch.float16, "silu"),    # 257 packs: two column blocks, the second with one live thread
    ((41, 516), torch.float32, "gelu_tanh"),
], ids=["many-rows", "two-col-blocks", "fp32"])
def test_cuda_emu_vector_path(shape, dtype, activation):
    x = torch.randn(shape, dtype=dtype) * 3
    bias = torch.randn(shape[-1], dtype=dtype)
    _check("cuda-emu", "cpu", dtype, activation, x, bias)


# row_io.cuh's head / 16-byte body / tail on every row, whatever the width, row stride and offset:
# the widths of the memory-bound kernels' contract (1, 7, 1000, 1023, 50257, 131072), x sliced at
# an odd offset out of a wider tensor (odd strides: 8 alignment phases for 2-byte types, 4 for
# fp32, each walked by its own row splits), a bias one element off x's phase (element-wise bias
# loads), no bias, and rows with NaNs (which must stay NaN in y and grad_x, and only there).
@pytest.mark.emu
@pytest.mark.skipif(not _ext.HAS_EMULATOR, reason="fastlm._C_emu not built")
@pytest.mark.parametrize("rows,cols,offset,pad,dtype,activation,bias,nan", [
    (3, 1, 0, 0, torch.bfloat16, "gelu", True, False),
    (9, 7, 3, 6, torch.float16, "silu", True, True),
    (11, 1000, 1, 4, torch.float32, "gelu_tanh", True, True),   # stride 1004 floats: 4 phases
    (17, 1023, 0, 0, torch.bfloat16, "relu", False, False),     # contiguous odd width: 8 phases
    (3, 50257, 5, 8, torch.float16, "gelu", True, False),       # GPT-2's vocabulary, odd stride
    (2, 131072, 1, 2, torch.bfloat16, "silu", True, False),     # one odd-offset row per phase
], ids=["w1", "w7-nan", "w1000-fp32-nan", "w1023-nobias", "w50257", "w131072"])
def test_cuda_emu_any_width_stride_offset(rows, cols, offset, pad, dtype, activation, bias, nan):
    x = (torch.randn(rows, cols + pad, dtype=dtype) * 3)[:, offset:offset + cols]
    if nan:
        x[1, ::3] = float("nan")
    b = torch.randn(cols + 1, dtype=dtype)[1:] if bias else None
    _check("cuda-emu", "cpu", dtype, activation, x, b)
    if not nan:
        return
    grad = torch.randn(x.shape, dtype=dtype)
    y, grads = _run(lambda a, c: bias_act(a, c, activation, backend="cuda-emu"), x, b, grad)
    y64, grads64 = _run(lambda a, c: _act(a if c is None else a + c, activation), x, b, grad, torch.float64)
    for name, got, want in [("y", y, y64), ("grad_x", grads[0], grads64[0])]:
        assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{name}: NaNs where the oracle has none, or missing"
