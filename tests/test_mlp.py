"""mlp / swiglu / geglu (compositions of the fused linear) against float64 torch, every backend."""
import pytest
import torch
import torch.nn.functional as F

from fastlm.ops.bias_act import ACTIVATIONS, act_ref
from fastlm.ops.mlp import gated_mlp, geglu, mlp, swiglu
from backends import cuda_params, GPU, backends
from numerics import assert_close

BACKENDS = backends(triton_dtypes=(torch.float32, torch.float16) if GPU is None else (torch.float32, torch.float16, torch.bfloat16))
BACKENDS = BACKENDS[:-2] + cuda_params((torch.float16, torch.bfloat16))  # the tensor-core GEMM: 16-bit only
TOL = dict(rtol=1e-4, atol=1e-4)


def _grads(fn, tensors, grad, dtype=None):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]
    y = fn(*leaves)
    return [y] + list(torch.autograd.grad(y, leaves, grad.to(y.dtype)))


def _compare(name, ours, ref, tensors, grad):
    got = _grads(ours, tensors, grad)
    want64 = _grads(ref, tensors, grad, torch.float64)
    base = _grads(ref, tensors, grad)
    for i, (g, w, b) in enumerate(zip(got, want64, base)):
        assert_close(f"{name} #{i}", g, w, b, kind="out" if i == 0 else "grad", fp32_tol=TOL)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_mlp(backend, device, dtypes, activation):
    dt = dtypes[-1] if activation == "gelu" else dtypes[0]
    M, D, H = 7, 64, 128
    x = torch.randn(2, M, D, device=device, dtype=dt)
    w1, w2 = (torch.randn(H, D, device=device) / D**0.5).to(dt), (torch.randn(D, H, device=device) / H**0.5).to(dt)
    b1, b2 = torch.randn(H, device=device, dtype=dt), torch.randn(D, device=device, dtype=dt)
    r = torch.randn(2, M, D, device=device, dtype=dt)
    grad = torch.randn(2, M, D, device=device, dtype=dt)
    ours = lambda *t: mlp(*t[:5], activation=activation, residual=t[5], backend=backend)
    ref = lambda x_, w1_, b1_, w2_, b2_, r_: F.linear(act_ref(F.linear(x_, w1_, b1_), activation), w2_, b2_) + r_
    _compare(f"{backend} mlp {activation}", ours, ref, [x, w1, b1, w2, b2, r], grad)


@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_gated(backend, device, dtypes, kind):
    fn, act = (swiglu, F.silu) if kind == "swiglu" else (geglu, F.gelu)
    for dt in dtypes:
        M, D, H = 5, 64, 96
        x = torch.randn(M, D, device=device, dtype=dt)
        wg, wu = [(torch.randn(H, D, device=device) / D**0.5).to(dt) for _ in range(2)]
        wd = (torch.randn(D, H, device=device) / H**0.5).to(dt)
        grad = torch.randn(M, D, device=device, dtype=dt)
        ours = lambda x_, g_, u_, d_: fn(x_, g_, u_, d_, backend=backend)
        ref = lambda x_, g_, u_, d_: F.linear(act(F.linear(x_, g_)) * F.linear(x_, u_), d_)
        _compare(f"{backend} {kind} {dt}", ours, ref, [x, wg, wu, wd], grad)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_gated_mlp_biases(backend, device, dtypes, activation):
    """The general gated form: biases on all three projections (LLaMA's mlp_bias), any activation."""
    for dt in dtypes:
        M, D, H = 7, 32, 80
        x = torch.randn(M, D, device=device, dtype=dt)
        wg, wu = [(torch.randn(H, D, device=device) / D**0.5).to(dt) for _ in range(2)]
        wd = (torch.randn(D, H, device=device) / H**0.5).to(dt)
        bg, bu, bd = [torch.randn(n, device=device, dtype=dt) for n in (H, H, D)]
        grad = torch.randn(M, D, device=device, dtype=dt)
        ours = lambda x_, g_, u_, d_, bg_, bu_, bd_: gated_mlp(x_, g_, u_, d_, activation=activation, b_gate=bg_,
                                                               b_up=bu_, b_down=bd_, backend=backend)
        ref = lambda x_, g_, u_, d_, bg_, bu_, bd_: F.linear(
            act_ref(F.linear(x_, g_, bg_), activation) * F.linear(x_, u_, bu_), d_, bd_)
        _compare(f"{backend} gated_mlp {activation} {dt}", ours, ref, [x, wg, wu, wd, bg, bu, bd], grad)


def test_geglu_tanh_is_gemmas_gelu():
    x, wg, wu, wd = torch.randn(4, 16), torch.randn(24, 16), torch.randn(24, 16), torch.randn(16, 24)
    want = F.linear(F.gelu(F.linear(x, wg), approximate="tanh") * F.linear(x, wu), wd)
    torch.testing.assert_close(geglu(x, wg, wu, wd, approximate="tanh"), want, **TOL)
    with pytest.raises(ValueError, match=r"geglu: approximate must be 'none' or 'tanh', got 'erf'"):
        geglu(x, wg, wu, wd, approximate="erf")
    with pytest.raises(ValueError, match=r"gated_mlp: unknown activation 'tanh'"):
        gated_mlp(x, wg, wu, wd, activation="tanh")


def test_gated_residual_and_compile():
    torch._dynamo.reset()
    x, r = torch.randn(4, 32), torch.randn(4, 32)
    wg, wu, wd = torch.randn(48, 32), torch.randn(48, 32), torch.randn(32, 48)
    want = F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd) + r
    torch.testing.assert_close(swiglu(x, wg, wu, wd, residual=r), want, **TOL)
    compiled = torch.compile(lambda *a: swiglu(*a, residual=r), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, wg, wu, wd), want, **TOL)


def test_bad_inputs_name_argument_and_value():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"mlp: unknown activation 'tanh'; expected one of gelu, gelu_tanh, relu, silu"):
        mlp(x, torch.randn(16, 8), None, torch.randn(8, 16), None, activation="tanh")
    with pytest.raises(ValueError, match=r"mlp: w2 must have shape \(out, 16\) to take w1's 16 hidden features, got \(8, 12\)"):
        mlp(x, torch.randn(16, 8), None, torch.randn(8, 12), None)
    with pytest.raises(ValueError, match=r"swiglu: w_up must have w_gate's shape \(16, 8\), got \(12, 8\)"):
        swiglu(x, torch.randn(16, 8), torch.randn(12, 8), torch.randn(8, 16))
    with pytest.raises(ValueError, match=r"linear: weight must have shape \(N, 8\) to match the last dim of x \(4, 8\), got \(16, 7\)"):
        geglu(x, torch.randn(16, 7), torch.randn(16, 7), torch.randn(8, 16))
