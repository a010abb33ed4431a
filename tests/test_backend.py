"""The registry: selection order, auto choice, reasons, and `python -m fastlm info`."""
import importlib
import os
import subprocess
import sys

import pytest
import torch

import fastlm
from fastlm import backend
from fastlm.ops.bias_act import bias_act

bias_act_module = importlib.import_module("fastlm.ops.bias_act")  # the package re-exports the function under the same name


@pytest.fixture
def served(monkeypatch):
    """Records which backend each bias_act forward ran on."""
    calls = []
    for name, fn in list(bias_act_module._FORWARD.items()):
        def spy(*args, _name=name, _fn=fn):
            calls.append(_name)
            return _fn(*args)
        monkeypatch.setitem(bias_act_module._FORWARD, name, spy)
    return calls


def test_auto_on_cpu_prefers_cpu_then_reference(served, monkeypatch):
    monkeypatch.delenv("FASTLM_BACKEND", raising=False)
    bias_act(torch.randn(3, 5))
    bias_act(torch.randn(3, 5, dtype=torch.float16))  # the cpu kernels take fp32/bf16 only
    assert served == ["cpu", "reference"]


def test_selection_order(served, monkeypatch):
    x = torch.randn(3, 5)
    monkeypatch.setenv("FASTLM_BACKEND", "reference")
    bias_act(x)  # env
    with fastlm.use_backend("cpu"):
        bias_act(x)  # context beats env
        bias_act(x, backend="triton")  # call beats context
        with fastlm.use_backend("auto"):
            bias_act(x)  # inner auto: back to the automatic choice
        bias_act(x)  # inner context popped
    bias_act(x)  # outer context popped: env again
    assert served == ["reference", "cpu", "triton", "cpu", "cpu", "reference"]


def test_bad_backend_names(monkeypatch):
    x = torch.randn(2, 2)
    with pytest.raises(ValueError, match=r"backend must be one of auto, cuda, triton, cpu, reference, cuda-emu; got 'cudnn'"):
        bias_act(x, backend="cudnn")
    with pytest.raises(ValueError, match=r"use_backend\(name\) must be one of .*; got 'gpu'"):
        with fastlm.use_backend("gpu"):
            pass
    monkeypatch.setenv("FASTLM_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"FASTLM_BACKEND must be one of .*; got 'fast'"):
        bias_act(x)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(fastlm.BackendUnavailableError, match=r"triton: .*CPU tensors need TRITON_INTERPRET=1"):
        bias_act(torch.randn(2, 2), backend="triton")


def test_cuda_backend_reasons_on_cpu_tensors():
    reasons = backend.why_not("bias_act", "cuda", torch.device("cpu"), torch.randn(2, 2), None, "gelu")
    assert "serves CUDA tensors; input is on cpu" in reasons


def test_unknown_op_has_no_implementation():
    assert backend.why_not("no_such_op", "cpu", torch.device("cpu")) == ["no cpu implementation of no_such_op"]


def test_info_lists_every_backend_for_bias_act():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "fastlm", "info"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"torch    {torch.__version__}" in text
    assert "bias_act on cpu" in text
    section = text[text.index("bias_act on cpu"):]
    for name in backend.BACKENDS:
        assert f"\n  {name:<10} " in section, f"{name} missing from:\n{section}"
    assert "cuda       no: " in section and "serves CUDA tensors" in section
    assert "triton     no: CPU tensors need TRITON_INTERPRET=1" in section
    assert "reference  yes" in section
    assert "\n  auto -> cpu: static order on cpu: cpu, reference\n" in section


def test_auto_on_cuda_takes_the_static_order_where_nothing_is_measured(tmp_path, monkeypatch):
    """No GPU needed: fake CUDA tensors on a simulated A100, and no dispatch table anywhere."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastlm import dispatch
    from fastlm.dispatch import tables

    monkeypatch.setattr(tables, "SHIPPED_DIR", str(tmp_path))
    monkeypatch.setenv("FASTLM_CACHE_DIR", str(tmp_path))
    tables.clear_cache()
    with FakeTensorMode():
        x = torch.empty(4, 64, device="cuda", dtype=torch.float64)
    with backend.simulate(dispatch.SIMULATED[1]):
        choice, why = backend.auto_choice("bias_act", x.device, x, None, "gelu")
        assert backend.select("bias_act", x.device, x, None, "gelu") == choice
    # no GPU kernel takes fp64: the reference, last in the static order, serves
    assert choice == "reference" and why.startswith("unmeasured (no measured bias_act entries for a100)")
    assert why.endswith("static estimate: plain PyTorch math in fp32 or fp64, the oracle and last resort; "
                        "cuda, triton can't serve this call")
    tables.clear_cache()
