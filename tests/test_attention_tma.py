"""The Hopper TMA forward (fastlm/triton/attention_tma.py) under the Triton interpreter.

No sm_90 device exists in CI, so the kernel entry is called directly on CPU tensors (the
interpreter executes host tensor descriptors: boxes, zero fill past a head's rows, clipped
stores), both variants (split: masks on edge tiles only; warp-specialised: one uniformly masked
loop), against the float64 oracle; outputs start as NaN (conftest). One test makes the device
look like sm_90 and goes through the triton backend, so the launcher's hook and the backward's
reading of this kernel's lse are checked too. Its sm_90 compiles are aot.py's (aot_cases)."""
import math

import pytest
import torch
from torch.nn.attention.bias import causal_lower_right

from fastlm.ops.attention import BOTTOM_RIGHT, NO_CAUSAL, TOP_LEFT, attention_forward_ref
from fastlm.ops.attention import scaled_dot_product_attention as sdpa
from fastlm.triton import attention_tma
from numerics import assert_close

pytestmark = [
    pytest.mark.skipif(attention_tma.TensorDescriptor is None, reason="this Triton has no host tensor descriptors"),
    pytest.mark.filterwarnings("ignore:Lower right causal bias will produce NaNs"),
]


def _qkv(b, h, hkv, tq, tk, d, dtype, transposed=False):
    """q, k, v; transposed: q in (B, T, H, D) memory seen as (B, H, T, D), as a projection's output."""
    q = torch.randn(b, tq, h, d).to(dtype).transpose(1, 2) if transposed else torch.randn(b, h, tq, d).to(dtype)
    return q, torch.randn(b, hkv, tk, d).to(dtype), torch.randn(b, hkv, tk, d).to(dtype)


# (B, H, H_kv, Tq, Tk, D, causal, dtype, warp-specialised, q transposed): ragged lengths both ways, GQA
# and MQA, D 64 / 128, both causal alignments (bottom-right with Tq > Tk: fully masked rows), both variants
CASES = [
    (1, 4, 2, 37, 53, 64, BOTTOM_RIGHT, torch.float32, False, True),
    (1, 4, 2, 37, 53, 64, BOTTOM_RIGHT, torch.float32, True, False),
    (1, 2, 1, 50, 21, 64, BOTTOM_RIGHT, torch.float16, True, True),
    (2, 2, 2, 40, 29, 128, TOP_LEFT, torch.float32, False, False),
    (1, 2, 1, 33, 47, 128, NO_CAUSAL, torch.float16, True, False),
    (1, 2, 2, 50, 21, 64, BOTTOM_RIGHT, torch.float16, False, False),
]


_CAUSAL_NAMES = {NO_CAUSAL: "dense", TOP_LEFT: "top_left", BOTTOM_RIGHT: "bottom_right"}


@pytest.mark.parametrize("b,h,hkv,tq,tk,d,causal,dtype,ws,transposed", CASES, ids=[
    f"{str(c[7])[6:]}-d{c[5]}-{_CAUSAL_NAMES[c[6]]}-{c[3]}x{c[4]}-h{c[1]}kv{c[2]}-{'ws' if c[8] else 'split'}"
    + ("-bthd" if c[9] else "") for c in CASES])
def test_forward_matches_oracle(b, h, hkv, tq, tk, d, causal, dtype, ws, transposed):
    q, k, v = _qkv(b, h, hkv, tq, tk, d, dtype, transposed)
    assert attention_tma._strides(q) is not None and attention_tma._strides(k) is not None
    scale = 1 / math.sqrt(d)
    out, lse = attention_tma.forward(q, k, v, causal, scale, warp_specialize=ws)
    ref64 = attention_forward_ref(q.double(), k.double(), v.double(), None, 0.0, causal, scale, 0)
    base = attention_forward_ref(q, k, v, None, 0.0, causal, scale, 0)
    assert out.is_contiguous() and out.dtype == dtype and lse.dtype == torch.float32
    assert_close("tma out", out, ref64[0], base[0])
    dead = ref64[1] == float("-inf")
    assert torch.equal(lse == float("-inf"), dead), "fully masked rows: lse -inf exactly there"
    if causal == BOTTOM_RIGHT and tq > tk:
        assert dead.any() and torch.equal(out[dead.expand_as(lse)], torch.zeros_like(out[dead.expand_as(lse)]))
    torch.testing.assert_close(lse[~dead], ref64[1][~dead].float(), rtol=1e-5, atol=1e-5)


def test_why_not_names_what_it_refuses(monkeypatch):
    q, k, v = _qkv(1, 2, 1, 40, 50, 64, torch.float16)
    assert attention_tma.why_not(q, k, v) == "needs an sm_90+ GPU (compute capability 0.0)"  # CPU tensors
    monkeypatch.setattr(attention_tma._tune, "capability", lambda device: 90)
    assert attention_tma.why_not(q, k, v) == attention_tma.why_not(q, k, v, causal=BOTTOM_RIGHT) == ""
    assert attention_tma.why_not(q, k, v, dropout_p=0.1, window=(8, -1)) == "options it lacks: dropout, window"
    assert attention_tma.why_not(*(t.float() for t in (q, k, v))) == "dtype torch.float32 (fp16/bf16 only)"
    assert attention_tma.why_not(*_qkv(1, 2, 1, 40, 50, 80, torch.float16)).startswith("head dims 80/80")
    assert attention_tma.why_not(q, k, v[..., :32]).startswith("head dims 64/32")
    odd = torch.randn(1, 2, 40, 68).half()[..., :64]  # row stride 68 elements, 136 B: not 16-byte aligned
    assert attention_tma.why_not(odd, k, v).startswith("q strides (5440, 2720, 68, 1)")
    assert attention_tma.why_not(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v).startswith("k strides")


def test_triton_backend_takes_it_on_sm90_with_backward(monkeypatch):
    """Through the op on the triton backend with the device made to look like sm_90: the forward
    launches the TMA kernel (and nothing else), and the backward, reading its lse, gives the grads."""
    from fastlm.triton import _tune

    monkeypatch.setattr(_tune, "capability", lambda device: 90)
    seen, real = [], _tune.launch

    def record(kernel, grid, *args, **meta):
        fn = kernel
        while hasattr(fn, "fn"):
            fn = fn.fn
        seen.append(fn.__name__)
        return real(kernel, grid, *args, **meta)
    monkeypatch.setattr(_tune, "launch", record)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 1, 24, 40, 64, torch.float16))
    out = sdpa(q, k, v, causal_lower_right(24, 40), enable_gqa=True, backend="triton")
    assert seen == ["_fwd_tma_kernel"], seen
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_forward_ref(q64, k64, v64, None, 0.0, BOTTOM_RIGHT, 1 / 8, 0)[0]
    grads64 = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    q0, k0, v0 = (t.detach().requires_grad_() for t in (q, k, v))
    ref0 = attention_forward_ref(q0, k0, v0, None, 0.0, BOTTOM_RIGHT, 1 / 8, 0)[0]
    grads0 = torch.autograd.grad(ref0, (q0, k0, v0), grad)
    assert_close("tma hook out", out, ref, ref0)
    for name, g, g64, g0 in zip("qkv", grads, grads64, grads0):
        assert_close(f"tma hook grad_{name}", g, g64, g0, kind="grad", atol=1e-4)


_WS_PROBE = """
import re, torch, triton
from fastlm.triton import aot, attention_tma
with aot.capture(aot.TARGETS[90]) as launches:
    q, k, v = (torch.randn(1, 2, 256, 64).half() for _ in range(3))
    attention_tma.forward(q, k, v, 2, 0.125)
ws = [launch for launch in launches if launch.constexprs["WARP_SPEC"]][0]
slot = {name: (list(ws.signature).index(name),) for name in ws.signature}
src = aot._ast_source(ws.fn, ws.signature, {slot[n]: x for n, x in ws.constexprs.items()},
                      {slot[n]: aot._divisible_attr(90) for n in ws.divisible})
ptx = triton.compile(src, target=aot.gpu_target(90), options=dict(ws.options)).asm["ptx"]
print(sorted(set(re.findall(r"setmaxnreg\\.(inc|dec)\\S*\\s+(\\d+)", ptx))), re.findall(r"\\.reqntid (\\d+)", ptx),
      "wgmma" if "wgmma.mma_async" in ptx else "", "tma" if "cp.async.bulk.tensor" in ptx else "")
"""


def test_warp_specialisation_is_really_applied_on_sm_90():
    """Triton's Hopper warp specialisation gives up silently on loops it can't partition (see the
    kernel's header): the warp-specialised config must compile to a producer warpgroup that gives
    its registers to the consumers (setmaxnreg), 3 warpgroups, wgmma and TMA."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, don't interpret
    proc = subprocess.run([sys.executable, "-c", _WS_PROBE], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = proc.stdout.strip().splitlines()[-1]
    assert "('dec', '40')" in report and "('inc', '232')" in report and report.endswith("['384'] wgmma tma"), report
