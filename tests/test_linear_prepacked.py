"""linear with a prepacked weight (CPU fp32 inference) against the fp64 oracle, its staleness
rules, the fallbacks, and fastlm.nn's prepack switches."""
import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import _ext
from fastlm.ops.bias_act import act_ref
from fastlm.ops.linear_prepacked import PackedWeight, applies, linear_prepacked, prepack_available
from numerics import assert_close

pytestmark = pytest.mark.skipif(not (_ext.HAS_EXTENSION and prepack_available()),
                                reason="needs the extension and a torch build exporting MKL's packed GEMM")
GEMM_TOL = dict(rtol=1e-4, atol=1e-4)


def _oracle(x, w, b, r, activation):
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    y = act_ref(y, activation) if activation else y
    return y + r.double() if r is not None else y


@pytest.mark.parametrize("M,K,N", [(1, 64, 64), (7, 768, 64), (129, 64, 768), (7, 64, 3072), (129, 768, 768)])
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh", "relu", "silu"])
def test_matches_float64(M, K, N, activation):
    x, w = torch.randn(2, M, K), torch.randn(N, K) / K**0.5
    b, r = torch.randn(N), torch.randn(2, M, N)
    packed = PackedWeight()
    with torch.no_grad():
        for bias, res in ((b, r), (None, None), (b, None)):
            y = linear_prepacked(x, packed, w, bias, activation=activation, residual=res)
            assert y.shape == (2, M, N)
            assert_close(f"prepacked {activation} bias={bias is not None}", y, _oracle(x, w, bias, res, activation),
                         fp32_tol=GEMM_TOL)


def test_strided_and_empty_inputs():
    w, packed = torch.randn(96, 64), PackedWeight()
    x = torch.randn(64, 10)[:, ::2].t()  # (5, 64), stride (1, 10): not row-contiguous
    with torch.no_grad():
        assert_close("strided x", linear_prepacked(x, packed, w), _oracle(x, w, None, None, None), fp32_tol=GEMM_TOL)
        assert linear_prepacked(torch.randn(0, 64), packed, w).shape == (0, 96)
        y = linear_prepacked(torch.randn(3, 0), PackedWeight(), torch.randn(5, 0), torch.ones(5))
        assert torch.equal(y, torch.ones(3, 5))


def test_repacks_when_the_weight_changes():
    lin = fastlm.nn.Linear(64, 128)
    assert lin.prepack()
    x = torch.randn(4, 64)
    with torch.no_grad():
        lin(x)
        lin.weight.mul_(2.0)  # in place: bumps the version
        assert_close("after mul_", lin(x), _oracle(x, lin.weight, lin.bias, None, None), fp32_tol=GEMM_TOL)
        lin.load_state_dict({"weight": torch.randn(128, 64), "bias": torch.randn(128)})
        assert_close("after load_state_dict", lin(x), _oracle(x, lin.weight, lin.bias, None, None), fp32_tol=GEMM_TOL)
        lin.weight.data.add_(1.0)  # .data hides the write from the version counter: refresh() is the documented fix
        lin._packed.refresh()
        assert_close("after .data + refresh", lin(x), _oracle(x, lin.weight, lin.bias, None, None), fp32_tol=GEMM_TOL)


def test_grad_mode_takes_the_differentiable_path():
    lin, twin = fastlm.nn.Linear(64, 32, activation="gelu"), torch.nn.Linear(64, 32)
    twin.load_state_dict(lin.state_dict())
    lin.prepack()
    x = torch.randn(5, 64, requires_grad=True)
    assert not applies(x, lin.weight)  # grad mode is on
    y = lin(x)
    y.sum().backward()
    assert lin.weight.grad is not None and x.grad is not None
    assert_close("grad-mode y", y, F.gelu(twin(x.detach()).double()), fp32_tol=GEMM_TOL)


def test_falls_back_where_it_does_not_apply():
    w = torch.randn(32, 64)
    with torch.no_grad():
        assert applies(torch.randn(2, 64), w)
        assert not applies(torch.randn(2, 64, dtype=torch.float64), w.double())
        with fastlm.use_backend("reference"):
            assert not applies(torch.randn(2, 64), w)  # the reference-path switch must reach every op
        assert not applies(torch.randn(2, 64), w, backend="reference")
        xd = torch.randn(3, 64, dtype=torch.float64)
        y = linear_prepacked(xd, PackedWeight(), w.double())  # served by fastlm.ops.linear instead
        assert y.dtype == torch.float64 and torch.allclose(y, xd @ w.double().t())


def test_model_switch_skips_small_weights_and_turns_off():
    model = torch.nn.Sequential(fastlm.nn.Linear(512, 256), fastlm.nn.Linear(256, 8))
    assert fastlm.nn.prepack(model) == ["0"]  # 8 x 256 is below min_elements
    assert fastlm.nn.prepack(model, enabled=False) == [] and model[0]._packed is None


def test_opcheck():
    """opcheck's schema, fake-tensor and aot_dispatch checks all run the kernel on copies of the
    inputs, and a copy of `packed` is refused (MKL's pack is bound to its address, see
    test_copied_pack_is_refused); so opcheck runs the autograd-registration check, and the rest
    is checked here by hand: no input is written, the output aliases none, and the fake kernel
    gives the real output's shape and dtype."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, b = torch.randn(7, 64), torch.randn(96, 64), torch.randn(96)
    packed = torch.ops.fastlm.linear_prepack(w)
    op = torch.ops.fastlm.linear_prepacked.default
    torch.library.opcheck(op, (x, packed, w, b, None, "gelu"), test_utils=("test_autograd_registration",))
    before = [t.clone() for t in (x, packed, w, b)]
    y = op(x, packed, w, b, None, "gelu")
    assert all(torch.equal(t, c) for t, c in zip((x, packed, w, b), before))
    assert all(y.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in (x, packed, w, b))
    with FakeTensorMode() as mode:
        fake = op(*(mode.from_tensor(t) for t in (x, packed, w, b)), None, "gelu")
    assert fake.shape == y.shape and fake.dtype == y.dtype


def test_copied_pack_is_refused():
    """A copy of MKL's pack computed wrong results without any error when tried: it must raise."""
    w = torch.randn(96, 64)
    packed = torch.ops.fastlm.linear_prepack(w)
    with pytest.raises(ValueError, match="packed was copied or moved since linear_prepack made it"):
        torch.ops.fastlm.linear_prepacked(torch.randn(2, 64), packed.clone(), w, None, None, "none")


def test_bad_inputs_name_argument_and_value():
    w = torch.randn(96, 64)
    packed = torch.ops.fastlm.linear_prepack(w)
    op = torch.ops.fastlm.linear_prepacked
    with pytest.raises(ValueError, match=r"packed was made for a \(96, 64\) weight, but weight has shape \[32, 64\]"):
        op(torch.randn(2, 64), packed, torch.randn(32, 64), None, None, "none")
    with pytest.raises(ValueError, match="header does not check"):
        op(torch.randn(2, 64), torch.zeros_like(packed), w, None, None, "none")
    with pytest.raises(ValueError, match="packed must be the uint8 tensor linear_prepack.weight. returned, got Float"):
        op(torch.randn(2, 64), torch.randn(100), w, None, None, "none")
    with pytest.raises(ValueError, match="x must be a float32 CPU tensor, got BFloat16"):
        op(torch.randn(2, 64, dtype=torch.bfloat16), packed, w, None, None, "none")
    with pytest.raises(ValueError, match=r"weight must have shape \(N, 32\) to match x's K"):
        op(torch.randn(2, 32), packed, w, None, None, "none")
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        op(torch.randn(2, 64), packed, w, None, None, "tanh")
    with pytest.raises(ValueError, match="weight must be a float32 CPU tensor, got Double"):
        torch.ops.fastlm.linear_prepack(w.double())
