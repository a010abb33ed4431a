"""No op reads device values on the host in its forward or backward (DESIGN.md: a host read of a
CUDA tensor is a device sync that stalls the stream).

How, without a GPU: each op's fwd + bwd runs through its cuda backend's Python code on "meta"
tensors, which have shapes but no values: any read of a value (.item(), bool(t), int(t),
.tolist(), nonzero, ...) raises. On meta tensors a custom op normally runs only its fake (shape)
function; here each fastlm custom op's fake function is, for the test, its real implementation,
so the code that would run on a GPU (argument checks, target checks, chunking, reductions)
really runs, and takes the non-CPU branches; the compiled kernels below it answer with their
registered fake shapes. (Fake CUDA tensors would do the same, but autograd's engine wants a real
CUDA device for their backward.) The negative control puts back a host-side check and shows that it is caught. On a
GPU, the same ops also run under torch.cuda.set_sync_debug_mode("error").
"""
import contextlib
import importlib
import pkgutil
import sys

import pytest
import torch
from torch._library.custom_ops import CustomOpDef

import fastlm.ops
from fastlm import _ext
from fastlm import backend as _backend

pytestmark = pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="the extension's fake op shapes are needed")


def _custom_ops():
    for info in pkgutil.iter_modules(fastlm.ops.__path__):
        module = importlib.import_module(f"fastlm.ops.{info.name}")
        yield from (v for v in vars(module).values() if isinstance(v, CustomOpDef))


@contextlib.contextmanager
def meta_device(monkeypatch):
    """Every fastlm custom op runs its real Python body on meta tensors; the cuda backend is taken
    as present on this machine (the inputs' own reasons, dtype and shape, still apply)."""
    for op in set(_custom_ops()):
        monkeypatch.setattr(op, "_abstract_fn", op._init_fn)
    real_reasons = _backend.machine_reasons
    monkeypatch.setattr(_backend, "machine_reasons", lambda b, d: [] if b == "cuda" else real_reasons(b, d))
    yield


def _fwd_bwd(fn, *inputs):
    """fn(*inputs), then the backward of every floating output into every input needing grad."""
    out = fn(*inputs)
    outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if o.dtype.is_floating_point]
    need = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if need:  # base_assignment has no gradient
        torch.autograd.grad([o.sum() for o in outs if o.requires_grad], need, allow_unused=True)


DEVICE = "meta"


def _leaf(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_()


OPS = {
    "softmax": lambda: (lambda x: fastlm.ops.softmax(x, backend="cuda"), _leaf(6, 50257)),
    "log_softmax_masked": lambda: (
        lambda x, m: fastlm.ops.log_softmax(x, mask=m, is_causal=True, backend="cuda"),
        _leaf(2, 5, 7), torch.rand(5, 7, device=DEVICE) > 0.5),
    "cross_entropy": lambda: (
        lambda x, t, w: fastlm.ops.cross_entropy(x, t, w, label_smoothing=0.1, backend="cuda"),
        _leaf(6, 50257), torch.randint(0, 50257, (6,), device=DEVICE), torch.rand(50257, device=DEVICE).bfloat16()),
    "linear_cross_entropy_mean": lambda: (
        lambda h, w, t: fastlm.ops.linear_cross_entropy(h, w, t, backend="cuda"),
        _leaf(6, 64), _leaf(1000, 64), torch.randint(0, 1000, (6,), device=DEVICE)),
    "linear_cross_entropy_none": lambda: (
        lambda h, w, t: fastlm.ops.linear_cross_entropy(h, w, t, reduction="none", backend="cuda"),
        _leaf(6, 64), _leaf(1000, 64), torch.randint(0, 1000, (6,), device=DEVICE)),
    "layer_norm": lambda: (
        lambda x, w, b: fastlm.ops.layer_norm(x, (64,), w, b, backend="cuda"), _leaf(6, 64), _leaf(64), _leaf(64)),
    "rms_norm": lambda: (lambda x, w: fastlm.ops.rms_norm(x, (64,), w, backend="cuda"), _leaf(6, 64), _leaf(64)),
    "rope": lambda: (lambda q, k: fastlm.ops.rope(q, k, positions=torch.arange(5, device=DEVICE)[None], backend="cuda"),
                     _leaf(2, 4, 5, 64), _leaf(2, 2, 5, 64)),
    "attention": lambda: (
        lambda q, k, v: fastlm.ops.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, backend="cuda"),
        _leaf(2, 4, 5, 64), _leaf(2, 2, 5, 64), _leaf(2, 2, 5, 64)),
    "linear": lambda: (lambda x, w, b: fastlm.ops.linear(x, w, b, activation="gelu", backend="cuda"),
                       _leaf(6, 64), _leaf(32, 64), _leaf(32)),
    "bias_act": lambda: (lambda x, b: fastlm.ops.bias_act(x, b, "gelu", backend="cuda"), _leaf(6, 64), _leaf(64)),
    "base_assignment": lambda: (lambda s: fastlm.ops.base_assignment(s, capacity=[3, 1, 4], backend="cuda"),
                                torch.randn(8, 3, device=DEVICE)),
    "moe_router": lambda: (lambda logits: fastlm.ops.moe_router(logits, 2, capacity=3, backend="cuda"),
                           _leaf(8, 4, dtype=torch.float32)),
    "grouped_swiglu": lambda: (
        lambda x, w: fastlm.ops.grouped_swiglu(x, w, torch.tensor([0, 3, 3, 8], dtype=torch.int32, device=DEVICE),
                                               backend="cuda"), _leaf(10, 64), _leaf(3, 32, 64)),
    "moe_permute_unpermute": lambda: (_permute_unpermute, _leaf(8, 64), torch.zeros(8, 2, dtype=torch.int32,
                                                                                      device=DEVICE)),
}


def _permute_unpermute(x, expert_ids):
    x_sorted, rows, _ = fastlm.ops.moe_permute(x, expert_ids, 4, backend="cuda")
    weights = torch.ones(rows.shape, device=DEVICE)
    return fastlm.ops.moe_unpermute(x_sorted, rows, weights, backend="cuda")


@pytest.mark.parametrize("name", sorted(OPS))
def test_forward_backward_read_no_device_value(name, monkeypatch):
    with meta_device(monkeypatch):
        fn, *inputs = OPS[name]()
        _fwd_bwd(fn, *inputs)


def test_negative_control_a_host_check_is_caught(monkeypatch):
    """cross_entropy's old target check (bool(bad.any()) on any device) must fail here."""
    ce = importlib.import_module("fastlm.ops.cross_entropy")

    def host_check(target, classes, ignore_index):
        if bool(ce.bad_targets(target, classes, ignore_index).any()):
            raise IndexError("out of range")

    monkeypatch.setattr(ce, "check_targets", host_check)
    with meta_device(monkeypatch), pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        fn, *inputs = OPS["cross_entropy"]()
        _fwd_bwd(fn, *inputs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", sorted(OPS))
def test_gpu_sync_debug_mode_error(name, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "DEVICE", "cuda")
    fn, *inputs = OPS[name]()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _fwd_bwd(fn, *inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------- the triton launchers
# fastlm.triton's launchers run for real (on the GPU, or the interpreter here) with every host
# read of a tensor value made to raise: their argument checks that need values live in fastlm/ops.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def no_value_reads(monkeypatch):
    def refuse(name):
        def fail(self, *args, **kwargs):
            raise AssertionError(f"a triton launcher called Tensor.{name} (a host read of device values)")
        return fail
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))


def _dev(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=TRITON_DEVICE).to(dtype)


def test_cross_entropy_with_weights_and_smoothing(no_value_reads):
    from fastlm.triton import cross_entropy

    x, t, w = _dev(6, 40), torch.randint(0, 40, (6,), device=TRITON_DEVICE), torch.rand(40, device=TRITON_DEVICE)
    loss, lse = cross_entropy.forward(x, t, w, -100, 0.1)
    cross_entropy.backward(torch.ones(6, device=TRITON_DEVICE), x, t, w, lse, -100, 0.1)


def test_linear_softmax_norms_bias_act(no_value_reads):
    from fastlm.triton import bias_act, linear, norms, softmax

    x, w, b = _dev(9, 32), _dev(48, 32), _dev(48)
    y, p = linear.forward(x, w, b, None, "gelu", True)
    linear.backward(torch.randn_like(y), x, w, b, p, "gelu")
    s = softmax.forward(_dev(5, 33), None, 0.5, 0, False)
    softmax.backward(torch.randn_like(s), s, 0.5, False)
    h, nw = _dev(7, 40), _dev(40)
    out, _, mean, rstd = norms.forward(h, None, nw, nw, 1e-5, False)
    norms.backward(torch.randn_like(out), None, h, nw, mean, rstd, False, True)
    bias_act.backward(torch.randn_like(h), h, nw, "silu")


def test_moe_router_permute_grouped_linear(no_value_reads):
    from fastlm.triton import grouped_linear, moe_permute, moe_router

    logits = _dev(12, 4)
    ids, w, counts, aux, z = moe_router.forward(logits, 2, False, True, 5)
    moe_router.backward(torch.ones_like(w), aux.new_ones(()), z.new_ones(()), logits, 2, False, True, 5)
    x = _dev(12, 32)
    x_sorted, rows, offsets = moe_permute.permute(x, ids, 4)
    moe_permute.permute_backward(torch.randn_like(x_sorted), rows)
    y = moe_permute.unpermute(x_sorted, rows, w)
    moe_permute.unpermute_backward(torch.randn_like(y), x_sorted, rows, w)
    weight = _dev(4, 16, 32)
    out, pre = grouped_linear.forward(x_sorted, weight, offsets, None, "swiglu", True)
    grouped_linear.backward(torch.randn_like(out), x_sorted, weight, offsets, pre, "swiglu", False)


def test_base_assignment(no_value_reads):
    from fastlm.triton import base_assignment

    ids, prices = base_assignment.solve(_dev(10, 3), [4, 0, 6], 0.0)
    assert ids.shape == (10,) and prices.shape == (3,)
