"""grouped_linear against a float64 loop of per-expert F.linear: every activation (gated too),
bias or not, empty and one-row experts, the dropped tail, and gradients to x, weight and bias."""
import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import _ext
from fastlm.ops import grouped_linear, grouped_swiglu
from moe_backends import BF16, F16, SLOW, backends_once, moe_backend_dtypes, with_cases
from numerics import assert_close

HAS_KERNEL = _ext.HAS_EXTENSION and hasattr(torch.ops.fastlm, "grouped_linear_fwd")
# the CUDA grouped GEMM is tensor-core only: fp16 and bf16
BACKEND_DTYPES = moe_backend_dtypes("grouped_linear_fwd", "grouped_linear", gpu_dtypes=(F16, BF16))
BACKENDS = backends_once(BACKEND_DTYPES)
ACTS = {"gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "relu": F.relu, "silu": F.silu}


def loop(x, weight, counts, bias, activation):
    """Expert e's rows through F.linear and the activation; rows past the last expert give 0."""
    outs, lo = [], 0
    for e, n in enumerate(counts):
        p = F.linear(x[lo:lo + n], weight[e], None if bias is None else bias[e])
        if activation in ("swiglu", "geglu"):
            gate, up = p.chunk(2, -1)
            p = (F.silu(gate) if activation == "swiglu" else F.gelu(gate)) * up
        elif activation is not None:
            p = ACTS[activation](p)
        outs.append(p)
        lo += n
    width = weight.shape[1] // (2 if activation in ("swiglu", "geglu") else 1)
    outs.append(x.new_zeros(x.shape[0] - lo, width) + 0 * x[lo:, :1])  # the tail: 0, still in the graph
    return torch.cat(outs)


def check(backend, device, dtype, counts, tail, k, n_w, activation, with_bias, transposed=False):
    e = len(counts)
    x = torch.randn(sum(counts) + tail, k, dtype=dtype)
    weight = torch.randn(e, n_w, k, dtype=dtype) / k ** 0.5
    if transposed:  # an (E, K, Nw) buffer seen as (E, Nw, K), as GPT-OSS's experts store theirs
        weight = weight.transpose(1, 2).contiguous().transpose(1, 2)
    bias = torch.randn(e, n_w, dtype=dtype) if with_bias else None
    offsets = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32)

    def run(fn, dt):
        args = [t.detach().to(dt).requires_grad_() if t is not None else None for t in (x, weight, bias)]
        if transposed:  # keep the transposed strides through the dtype change
            args[1] = weight.detach().transpose(1, 2).to(dt).transpose(1, 2).requires_grad_()
        out = fn(*args)
        grads = torch.autograd.grad(out, [a for a in args if a is not None], grad.to(out.device, out.dtype))
        return out.cpu(), grads

    width = n_w // (2 if activation in ("swiglu", "geglu") else 1)
    grad = torch.randn(x.shape[0], width, dtype=dtype)
    got = run(lambda a, w, b: grouped_linear(a.to(device), w.to(device), offsets.to(device),
                                             bias=None if b is None else b.to(device), activation=activation,
                                             backend=backend), dtype)
    want = run(lambda a, w, b: loop(a, w, counts, b, activation), torch.float64)
    base = run(lambda a, w, b: loop(a, w, counts, b, activation), dtype)
    tag = f"{backend} {activation} bias={with_bias}"
    assert got[0].shape == (x.shape[0], width) and got[0].dtype == dtype
    assert_close(f"{tag} out", got[0], want[0], base[0], atol=1e-6)
    assert got[1][1].stride() == torch.empty_like(weight).stride(), f"{tag}: grad_weight not in weight's layout"
    for name, g, g64, g0 in zip(("grad_x", "grad_weight", "grad_bias"), got[1], want[1], base[1]):
        assert_close(f"{tag} {name}", g, g64, g0, kind="grad", atol=1e-5)


# the slow backends: no activation, one elementwise and one gated epilogue
@pytest.mark.parametrize("backend,device,dtype,activation", with_cases(
    BACKEND_DTYPES, [(a,) for a in (None, "gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu")],
    [(None,), ("gelu_tanh",), ("swiglu",)]))
def test_matches_per_expert_loop(backend, device, dtype, activation):
    check(backend, device, dtype, [5, 0, 1, 17, 0, 3], tail=4, k=40, n_w=40, activation=activation, with_bias=True)
    check(backend, device, dtype, [33, 1], tail=0, k=7, n_w=6, activation=activation, with_bias=False)


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
def test_edge_shapes(backend, device, dtype):
    check(backend, device, dtype, [0, 0, 0], tail=5, k=8, n_w=8, activation="swiglu", with_bias=True)  # all dropped
    check(backend, device, dtype, [1], tail=0, k=1, n_w=2, activation="swiglu", with_bias=False)
    # GPT-OSS's (E, in, out) experts seen as (E, out, in): the cuda kernels read them in place when K
    # and the width are multiples of 8 (gated: gate and up are column ranges; two column tiles, the
    # second partial), from a padded copy otherwise; ragged experts, an empty one, two m-tiles
    check(backend, device, dtype, [3, 0, 6], tail=2, k=24, n_w=144, activation="swiglu", with_bias=True,
          transposed=True)
    check(backend, device, dtype, [9, 0, 130], tail=1, k=16, n_w=24, activation=None, with_bias=True, transposed=True)
    check(backend, device, dtype, [5, 2], tail=0, k=16, n_w=16, activation="gelu", with_bias=False, transposed=True)
    check(backend, device, dtype, [5, 0, 2], tail=1, k=12, n_w=20, activation="geglu", with_bias=False,
          transposed=True)
    like = dict(dtype=dtype, device=device)
    out = grouped_linear(torch.randn(0, 8, **like), torch.randn(2, 4, 8, **like),
                         torch.zeros(3, dtype=torch.int32, device=device), backend=backend)
    assert out.shape == (0, 4)


@pytest.mark.parametrize("backend,device,dtype", [p for p in BACKENDS if p.values[0] != "reference"])
def test_transposed_parameter_gets_its_grad_without_a_copy(backend, device, dtype):
    """GPT-OSS stores its experts (E, in, out) and fastlm.patch passes their (E, out, in) transpose:
    grad_weight comes back in that view's layout, so the transpose's backward hands the parameter a
    gradient in its own layout and AccumulateGrad keeps it. No expert- or weight-sized copy in the
    whole backward (the profiler records every aten op, nested ones too), and the gradient matches
    float64. (Before: a contiguous (E, out, in) grad, copied once more into the parameter.)"""
    e, k, n_w = 3, 16, 48  # K and each gated half multiples of 8: the cuda kernels' in-place case
    w0 = (torch.randn(e, k, n_w, dtype=torch.float64) / k ** 0.5).to(dtype)
    param = torch.nn.Parameter(w0.to(device))
    x = torch.randn(20, k, dtype=dtype)
    offsets = torch.tensor([0, 7, 7, 18], dtype=torch.int32)
    grad = torch.randn(20, n_w // 2, dtype=dtype)
    out = grouped_linear(x.to(device), param.transpose(1, 2), offsets.to(device), activation="swiglu",
                         backend=backend)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        out.backward(grad.to(device))
    sizes = {k * n_w, e * k * n_w}  # an expert's slice, the whole weight (x, out and pre differ)
    copies = [(ev.name, ev.input_shapes) for ev in prof.events()
              if ev.name in ("aten::copy_", "aten::clone", "aten::_to_copy", "aten::contiguous")
              and any(torch.Size(s).numel() in sizes for s in ev.input_shapes if s)]
    assert copies == [], f"{backend}: the weight's gradient was copied: {copies}"
    assert param.grad.shape == param.shape and param.grad.is_contiguous()
    p64 = w0.double().requires_grad_()
    loop(x.double(), p64.transpose(1, 2), [7, 0, 11], None, "swiglu").backward(grad.double())
    base = w0.clone().requires_grad_()
    loop(x, base.transpose(1, 2), [7, 0, 11], None, "swiglu").backward(grad)
    assert_close(f"{backend} transposed grad_weight", param.grad.cpu(), p64.grad, base.grad, kind="grad", atol=1e-5)


def test_swiglu_is_mixtral_expert():
    """grouped_swiglu on HF's (E, 2I, H) gate_up_proj: silu(x Wg^T) * (x Wu^T), gate first."""
    x, w = torch.randn(6, 8), torch.randn(2, 10, 8)
    offsets = torch.tensor([0, 4, 6], dtype=torch.int32)
    gate, up = F.linear(x[:4], w[0]).chunk(2, -1)
    torch.testing.assert_close(grouped_swiglu(x, w, offsets, backend="reference")[:4], F.silu(gate) * up)


@pytest.mark.parametrize("backend,device,dtype", BACKENDS)
def test_inference_keeps_no_pre_activation(backend, device, dtype):
    """Without a gradient the pre-activation is not kept (the op returns it empty) and the output is
    the training forward's, bit for bit."""
    x, w = torch.randn(30, 16, device=device, dtype=dtype), torch.randn(3, 24, 16, device=device, dtype=dtype)
    b = torch.randn(3, 24, device=device, dtype=dtype)
    offsets = torch.tensor([0, 9, 9, 26], dtype=torch.int32, device=device)
    for act in ("swiglu", "gelu", "none"):
        out, pre = torch.ops.fastlm.grouped_linear(x, w, offsets, b, act, False, backend)
        want, want_pre = torch.ops.fastlm.grouped_linear(x, w, offsets, b, act, True, backend)
        assert pre.numel() == 0 and torch.equal(out, want)
        assert want_pre.numel() == (0 if act == "none" else 30 * 24)
    with torch.no_grad():
        torch.testing.assert_close(grouped_linear(x, w, offsets, bias=b, activation="geglu", backend=backend),
                                   torch.ops.fastlm.grouped_linear(x, w, offsets, b, "geglu", True, backend)[0],
                                   rtol=0, atol=0)


def test_bad_inputs_name_argument_and_value():
    x, w = torch.randn(6, 8), torch.randn(2, 10, 8)
    with pytest.raises(TypeError, match=r"offsets must be an int32 \(3,\) tensor \(experts \+ 1\), got torch.int64"):
        grouped_linear(x, w, torch.tensor([0, 3, 6]))
    with pytest.raises(ValueError, match=r"offsets must rise from 0 and end at most at x's 6 rows, got \[0, 4, 3\]"):
        grouped_linear(x, w, torch.tensor([0, 4, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"offsets must rise from 0 .*got \[0, 4, 7\]"):
        grouped_linear(x, w, torch.tensor([0, 4, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"weight's in_features 8 != x's 5"):
        grouped_linear(torch.randn(6, 5), w, torch.tensor([0, 3, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"activation 'swiglu' splits weight's 9 outputs .* must be even"):
        grouped_linear(x, torch.randn(2, 9, 8), torch.tensor([0, 3, 6], dtype=torch.int32), activation="swiglu")
    with pytest.raises(ValueError, match=r"unknown activation 'tanh'"):
        grouped_linear(x, w, torch.tensor([0, 3, 6], dtype=torch.int32), activation="tanh")
    with pytest.raises(ValueError, match=r"bias must be \(2, 10\) torch.float32 on cpu, got \(10,\)"):
        grouped_linear(x, w, torch.tensor([0, 3, 6], dtype=torch.int32), bias=torch.randn(10))
    with pytest.raises(fastlm.BackendUnavailableError, match=r"dtype float64 not supported by the triton backend"):
        grouped_linear(x.double(), w.double(), torch.tensor([0, 3, 6], dtype=torch.int32), backend="triton")


@pytest.mark.parametrize("backend,device,dtype", BACKENDS)
def test_opcheck_and_compile(backend, device, dtype):
    new = dict(device=device, dtype=dtype, requires_grad=True)
    x, w, b = torch.randn(10, 8, **new), torch.randn(3, 12, 8, **new), torch.randn(3, 12, **new)
    offsets = torch.tensor([0, 4, 4, 9], dtype=torch.int32, device=device)
    for act in ("swiglu",) if backend in SLOW else ("none", "swiglu", "relu"):  # interpreted / emulated: slow
        torch.library.opcheck(torch.ops.fastlm.grouped_linear.default, (x, w, offsets, b, act, True, backend))
    if HAS_KERNEL and backend == "cpu":
        torch.library.opcheck(torch.ops.fastlm.grouped_linear_fwd.default, (x.detach(), w.detach(), offsets, None,
                                                                            "geglu"))
    torch._dynamo.reset()
    f = lambda a: grouped_swiglu(a * 2, w, offsets, bias=b, backend=backend).float().sum()  # noqa: E731
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))
    for g, g_ref in zip(torch.autograd.grad(compiled(x), (x, w, b)), torch.autograd.grad(f(x), (x, w, b))):
        torch.testing.assert_close(g, g_ref)
