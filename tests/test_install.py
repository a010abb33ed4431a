"""The package without its optional parts: no compiled extension and/or no Triton."""
import subprocess
import sys
import textwrap

# A None entry in sys.modules makes `import name` raise ImportError, as a missing module does.
BLOCK = """
import sys, warnings
for name in {blocked!r}:
    sys.modules[name] = None
warnings.simplefilter("always")
"""


def _run(blocked, body):
    code = BLOCK.format(blocked=blocked) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)


def test_without_extension_and_triton():
    out = _run(
        ["fastlm._C", "triton"],
        """
        import torch, fastlm
        x, b = torch.randn(4, 6), torch.randn(6)
        y = fastlm.ops.bias_act(x, b)  # auto: the reference serves
        assert torch.allclose(y, torch.nn.functional.gelu(x + b), atol=1e-6)
        try:
            fastlm.ops.bias_act(x, b, backend="cpu")
        except fastlm.BackendUnavailableError as e:
            print("ERR", e)
        """,
    )
    assert out.returncode == 0, out.stderr
    warning = out.stderr
    assert warning.count("RuntimeWarning") == 1, warning  # one warning, naming both parts
    assert "the compiled extension fastlm._C is not available" in warning
    assert "build it with `make build`" in warning
    assert "Triton is not installed" in warning and "`pip install triton`" in warning
    assert "cpu: extension fastlm._C not built" in out.stdout


def test_without_triton_only():
    out = _run(
        ["triton"],
        """
        import torch, fastlm
        from fastlm import backend
        print(backend.why_not("bias_act", "triton", torch.device("cpu"), torch.randn(2, 2), None, "gelu"))
        print(fastlm.ops.bias_act(torch.randn(2, 2), backend="cpu").shape)
        """,
    )
    assert out.returncode == 0, out.stderr
    assert "Triton is not installed" in out.stderr and "fastlm._C" not in out.stderr
    assert "triton not installed" in out.stdout
    assert "torch.Size([2, 2])" in out.stdout
