"""The op benchmarks as a pytest-benchmark suite: one case per op family, fastlm (auto backend)
against torch eager, each checked against the other before it is timed.

    pytest benchmarks/test_pytest_suite.py --benchmark-only        # times
    pytest benchmarks/test_pytest_suite.py --benchmark-disable     # correctness only, one run each
The full sweep with ceilings and plots is `python -m fastlm.bench`."""
import pytest
import torch
import torch.nn.functional as F

from fastlm import ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
TOL = dict(rtol=2e-2, atol=2e-2) if DTYPE != torch.float32 else dict(rtol=1e-4, atol=1e-4)
SCALE = 4 if DEVICE.type == "cuda" else 1  # bigger problems on a GPU


def _randn(*shape, grad=False):
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE, requires_grad=grad)


def _fwd_bwd(fn, inputs):
    def step():
        out = fn(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        grads = torch.autograd.grad(out.float().sum(), [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad])
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out, grads
    return step


def _case(name):
    m, n = 1024 * SCALE, 2048
    if name == "bias_act":
        x, b = _randn(m, n, grad=True), _randn(n, grad=True)
        return (x, b), lambda x, b: ops.bias_act(x, b, "gelu"), lambda x, b: F.gelu(x + b)
    if name == "softmax":
        x, mask = _randn(m, n, grad=True), torch.rand(m, n, device=DEVICE) > 0.1
        return ((x,), lambda x: ops.softmax(x, scale=0.5, mask=mask),
                lambda x: torch.softmax((x * 0.5).masked_fill(~mask, float("-inf")), -1))
    if name == "cross_entropy":
        x, t = _randn(m, 8192, grad=True), torch.randint(0, 8192, (m,), device=DEVICE)
        return (x,), lambda x: ops.cross_entropy(x, t), lambda x: F.cross_entropy(x, t)
    if name == "layer_norm":
        x, r, w, b = _randn(4 * m, 768, grad=True), _randn(4 * m, 768, grad=True), _randn(768, grad=True), _randn(768, grad=True)
        return ((x, r, w, b), lambda x, r, w, b: ops.layer_norm(x, (768,), w, b, residual=r)[0],
                lambda x, r, w, b: F.layer_norm(x + r, (768,), w, b))
    if name == "linear_gelu":
        x, w, b = _randn(m, 768, grad=True), _randn(3072, 768, grad=True) * 0.03, _randn(3072, grad=True)
        return (x, w, b), lambda x, w, b: ops.linear(x, w, b, activation="gelu"), lambda x, w, b: F.gelu(F.linear(x, w, b))
    if name == "attention":
        q, k, v = (_randn(2, 8, 256 * SCALE, 64, grad=True) for _ in range(3))
        return ((q, k, v), lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, is_causal=True),
                lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    raise KeyError(name)


CASES = ["bias_act", "softmax", "cross_entropy", "layer_norm", "linear_gelu", "attention"]


@pytest.mark.parametrize("impl", ["fastlm", "torch eager"])
@pytest.mark.parametrize("name", CASES)
def test_fwd_bwd(benchmark, name, impl):
    inputs, fastlm_fn, eager_fn = _case(name)
    ours, theirs = _fwd_bwd(fastlm_fn, inputs)(), _fwd_bwd(eager_fn, inputs)()
    torch.testing.assert_close(ours[0].float(), theirs[0].float(), **TOL)
    for g, g_ref in zip(ours[1], theirs[1]):
        torch.testing.assert_close(g.float(), g_ref.float(), **TOL)
    benchmark.group = name
    benchmark(_fwd_bwd(fastlm_fn if impl == "fastlm" else eager_fn, inputs))
