"""The triton linear backward's structure (values: tests/test_linear.py): with an activation,
grad_p = grad_y * act'(p) is formed once by bias_act's pass (which also sums grad_bias) and the
two GEMMs are plain; without one there is no such pass and the dW launch sums grad_bias."""
import pytest
import torch

from fastlm.ops.linear import linear_bwd_ref
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
