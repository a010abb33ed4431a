"""The triton linear backward's structure (values: tests/test_linear.py): with an activation,
grad_p = grad_y * act'(p) is formed once by bias_act's pass (which also sums grad_bias) and the
two GEMMs are plain; without one there is no such pass and the dW launch sums grad_bias."""
import pytest
import torch

from fastlm.ops.linear import linear_bwd_ref, linear_fwd_ref
from backends import GPU
from numerics import assert_close

DEVICE = GPU or "cpu"


def _launches(monkeypatch):
    from fastlm.triton import _tune

    seen, real = [], _tune.launch

    def record(kernel, grid, *args, **meta):
        fn = kernel
        while hasattr(fn, "fn"):  # Autotuner -> JITFunction -> the Python function
            fn = fn.fn
        seen.append((f"{fn.__module__.split('.')[-1]}.{fn.__name__}", meta))
        return real(kernel, grid, *args, **meta)
    monkeypatch.setattr(_tune, "launch", record)
    return seen


@pytest.mark.parametrize("activation", ["gelu", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_forms_grad_p_once(monkeypatch, activation, dtype):
    from fastlm.triton import linear

    M, K, N = 33, 48, 80
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    w = (torch.randn(N, K, device=DEVICE) / K**0.5).to(dtype)
    b = torch.randn(N, device=DEVICE).to(dtype)
    p = (x.float() @ w.float().t() + b.float()).to(dtype)
    gy = torch.randn(M, N, device=DEVICE).to(dtype)
    seen = _launches(monkeypatch)
    got = linear.backward(gy, x, w, b, p, activation)
    kinds = [k for k, _ in seen]
    gemms = [m for k, m in seen if "gemm" in k]
    assert len(gemms) == 2 and all(m["ACT"] == -1 for m in gemms), kinds
    if activation == "none":
        assert len(seen) == 2 and [m["BIAS_GRAD"] for m in gemms] == [False, True], kinds
    else:
        assert kinds[0] == "bias_act._backward_kernel" and seen[0][1]["SUM_COLS"] and len(seen) == 3, kinds
        assert not any(m["BIAS_GRAD"] for m in gemms), kinds
    want64 = linear_bwd_ref(gy.double(), x.double(), w.double(), b.double(), p.double(), activation)
    want = linear_bwd_ref(gy, x, w, b, p, activation)
    for name, g, g64, g0 in zip(("grad_x", "grad_weight", "grad_bias"), got, want64, want):
        assert g.dtype == dtype
        assert_close(f"triton {name}", g, g64, g0, kind="grad", fp32_tol=dict(rtol=1e-4, atol=1e-4))


@pytest.mark.parametrize("activation", ["gelu_tanh", "none"])
def test_persistent_tma_kernel(monkeypatch, activation):
    """The persistent TMA kernel (chosen on sm_90+ for 16-bit operands) on every operand
    orientation the forward and both backward GEMMs give it, ragged edges (TMA zero fill), bias,
    residual, saved pre-activation and grad_bias; run here by making the device look like sm_90
    (the interpreter executes host tensor descriptors)."""
    from fastlm.triton import _tune, linear

    if linear.TensorDescriptor is None:
        pytest.skip("this Triton has no host tensor descriptors (the pointer kernel serves)")
    monkeypatch.setattr(_tune, "capability", lambda device: 90)
    seen = _launches(monkeypatch)
    M, K, N = 33, 48, 80
    dtype = torch.float16
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    w = (torch.randn(N, K, device=DEVICE) / K**0.5).to(dtype)
    b, r = torch.randn(N, device=DEVICE).to(dtype), torch.randn(M, N, device=DEVICE).to(dtype)
    act = None if activation == "none" else activation
    y, p = linear.forward(x, w, b, r, act, act is not None)
    ref = linear_fwd_ref(x, w, b, r, activation, act is not None)
    ref64 = linear_fwd_ref(x.double(), w.double(), b.double(), r.double(), activation, act is not None)
    assert_close("tma y", y, ref64[0], ref[0])
    gy = torch.randn(M, N, device=DEVICE).to(dtype)
    got = linear.backward(gy, x, w, b, p if act else y, activation)
    gemms = [(k, m) for k, m in seen if "gemm" in k]
    assert [k for k, _ in gemms] == ["linear._gemm_tma_kernel"] * 3, seen
    assert [(m["A_M_MAJOR"], m["B_N_MAJOR"]) for _, m in gemms] == [(False, False), (False, True), (True, True)]
    pre = p.double() if act else None
    want64 = linear_bwd_ref(gy.double(), x.double(), w.double(), b.double(), pre, activation)
    want = linear_bwd_ref(gy, x, w, b, p if act else None, activation)
    for name, g, g64, g0 in zip(("grad_x", "grad_weight", "grad_bias"), got, want64, want):
        assert_close(f"tma {name}", g, g64, g0, kind="grad")
