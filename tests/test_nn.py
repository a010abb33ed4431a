"""fastlm.nn modules against their torch.nn twins: state_dict both ways, outputs and gradients."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlm.nn as fnn
from ops_available import needs

TOL = dict(rtol=1e-4, atol=1e-5)
BACKENDS = [None, "reference"]  # None: the usual selection (the cpu backend where it serves)


def check_twin(fast: nn.Module, ref: nn.Module, *inputs, call=lambda m, *x: m(*x)):
    """Load each module's state_dict into the other, then match outputs and all gradients."""
    assert list(fast.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(fast.state_dict())
    with torch.no_grad():  # and back, with values the fast module doesn't have yet
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fast.load_state_dict(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(fast.state_dict()[k], v), k
    xs_f = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    xs_r = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out_f, out_r = call(fast, *xs_f), call(ref, *xs_r)
    assert not torch.isnan(out_f).any()
    torch.testing.assert_close(out_f, out_r, **TOL)
    w = torch.randn_like(out_r)
    (out_f * w).sum().backward()
    (out_r * w).sum().backward()
    for (name, pf), pr in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(pf.grad, pr.grad, **TOL, msg=lambda m: f"grad of {name}: {m}")
    for i, (xf, xr) in enumerate(zip(xs_f, xs_r)):
        if xr.grad is not None:
            torch.testing.assert_close(xf.grad, xr.grad, **TOL, msg=lambda m: f"grad of input {i}: {m}")


# ---------------------------------------------------------------- activations (bias_act, on main)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [
    lambda b: (fnn.GELU(backend=b), nn.GELU()),
    lambda b: (fnn.GELU("tanh", backend=b), nn.GELU("tanh")),
    lambda b: (fnn.ReLU(backend=b), nn.ReLU()),
    lambda b: (fnn.SiLU(backend=b), nn.SiLU()),
], ids=["gelu", "gelu_tanh", "relu", "silu"])
def test_activations(make, backend):
    fast, ref = make(backend)
    assert isinstance(fast, type(ref)) and repr(fast).startswith(type(ref).__name__)
    check_twin(fast, ref, torch.randn(3, 7, 33))


def test_inplace_activation_takes_torch_path():
    x = torch.randn(4, 9)
    y = x.clone()
    out = fnn.ReLU(inplace=True)(y)
    assert out is y and torch.equal(y, F.relu(x))


# ---------------------------------------------------------------- linear and MLP
@needs("linear")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear(bias, backend):
    check_twin(fnn.Linear(24, 40, bias, backend=backend), nn.Linear(24, 40, bias), torch.randn(2, 7, 24))


@needs("linear")
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu"])
def test_linear_activation_and_residual(activation):
    fast = fnn.Linear(16, 32, activation=activation)
    ref = nn.Sequential(nn.Linear(16, 32), {"gelu": nn.GELU(), "gelu_tanh": nn.GELU("tanh"), "relu": nn.ReLU(),
                                             "silu": nn.SiLU()}[activation])
    ref[0].load_state_dict(fast.state_dict())
    x, r = torch.randn(5, 16), torch.randn(5, 32)
    torch.testing.assert_close(fast(x), ref(x), **TOL)
    torch.testing.assert_close(fast(x, residual=r), ref(x) + r, **TOL)
    assert "activation=" in repr(fast)


@needs("mlp")
@pytest.mark.parametrize("activation,act", [("gelu", nn.GELU()), ("relu", nn.ReLU())])
def test_mlp_matches_sequential(activation, act):
    fast = fnn.MLP(16, 48, 8, activation=activation)
    ref = nn.Sequential(nn.Linear(16, 48), act, nn.Linear(48, 8))
    check_twin(fast, ref, torch.randn(3, 5, 16))


# ---------------------------------------------------------------- norms
@needs("layer_norm")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [{}, dict(bias=False), dict(elementwise_affine=False), dict(eps=1e-3)])
def test_layer_norm(kw, backend):
    check_twin(fnn.LayerNorm(48, **kw, backend=backend), nn.LayerNorm(48, **kw), torch.randn(3, 5, 48) * 3 + 1)


@needs("rms_norm")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [{}, dict(eps=1e-6), dict(elementwise_affine=False)])
def test_rms_norm(kw, backend):
    check_twin(fnn.RMSNorm(48, **kw, backend=backend), nn.RMSNorm(48, **kw), torch.randn(3, 5, 48) * 3 + 1)


@needs("layer_norm", "rms_norm")
@pytest.mark.parametrize("cls", ["LayerNorm", "RMSNorm"])
def test_norm_residual(cls):
    fast, ref = getattr(fnn, cls)(32), getattr(nn, cls)(32)
    x, r = torch.randn(4, 32), torch.randn(4, 32)
    normed, total = fast(x, residual=r)
    torch.testing.assert_close(total, x + r, **TOL)
    torch.testing.assert_close(normed, ref(x + r), **TOL)


# ---------------------------------------------------------------- softmax and loss
@needs("softmax")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim,shape", [(-1, (4, 37)), (1, (2, 5, 7)), (None, (3, 11)), (None, (2, 3, 9))])
def test_softmax(dim, shape, backend):
    check_twin(fnn.Softmax(dim, backend=backend), nn.Softmax(dim), torch.randn(shape) * 3)


@needs("cross_entropy")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [{}, dict(reduction="sum"), dict(reduction="none"), dict(label_smoothing=0.1),
                                dict(ignore_index=2), "weight"])
def test_cross_entropy(kw, backend):
    kw = dict(weight=torch.rand(13) + 0.5) if kw == "weight" else kw
    logits, target = torch.randn(17, 13) * 2, torch.randint(0, 13, (17,))
    target[3] = 2  # something for ignore_index to ignore
    check_twin(fnn.CrossEntropyLoss(**kw, backend=backend), nn.CrossEntropyLoss(**kw), logits, target)


@needs("cross_entropy")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_spatial_and_unbatched(reduction):
    fast, ref = fnn.CrossEntropyLoss(reduction=reduction), nn.CrossEntropyLoss(reduction=reduction)
    check_twin(fast, ref, torch.randn(2, 5, 3, 4), torch.randint(0, 5, (2, 3, 4)))
    check_twin(fast, ref, torch.randn(5), torch.tensor(3))


def test_cross_entropy_probability_targets_take_torch_path():
    x, p = torch.randn(6, 5), torch.rand(6, 5).softmax(-1)
    torch.testing.assert_close(fnn.CrossEntropyLoss()(x, p), F.cross_entropy(x, p))


# ---------------------------------------------------------------- attention
MHA_CASES = {
    "self": dict(), "batch_first": dict(batch_first=True), "no_bias": dict(bias=False),
}


@needs("linear", "scaled_dot_product_attention")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multihead_attention_self(case, backend):
    kw = MHA_CASES[case]
    fast, ref = fnn.MultiheadAttention(32, 4, **kw, backend=backend), nn.MultiheadAttention(32, 4, **kw)
    x = torch.randn(6, 3, 32)  # (L, B, E) or, batch_first, (B=6, L=3, E)
    check_twin(fast, ref, x, call=lambda m, x: m(x, x, x, need_weights=False)[0])


@needs("linear", "scaled_dot_product_attention")
@pytest.mark.parametrize("mask", ["bool", "float", "causal", "padding", "both", "per_head"])
def test_multihead_attention_masks(mask):
    L, B, H = 7, 2, 4
    fast, ref = fnn.MultiheadAttention(32, H, batch_first=True), nn.MultiheadAttention(32, H, batch_first=True)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)  # True = masked out
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[0, -2:] = True
    kw = {"bool": dict(attn_mask=causal), "float": dict(attn_mask=torch.randn(L, L)),
          "causal": dict(attn_mask=causal, is_causal=True), "padding": dict(key_padding_mask=kpm),
          "both": dict(attn_mask=causal.float().masked_fill(causal, float("-inf")), key_padding_mask=kpm.float().masked_fill(kpm, float("-inf"))),
          "per_head": dict(attn_mask=torch.randn(B * H, L, L))}[mask]
    check_twin(fast, ref, torch.randn(B, L, 32), call=lambda m, x: m(x, x, x, need_weights=False, **kw)[0])


@needs("linear", "scaled_dot_product_attention")
def test_multihead_attention_cross_and_unbatched():
    fast, ref = fnn.MultiheadAttention(16, 2, batch_first=True), nn.MultiheadAttention(16, 2, batch_first=True)
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    check_twin(fast, ref, q, kv, call=lambda m, q, kv: m(q, kv, kv, need_weights=False)[0])
    check_twin(fast, ref, q[0], call=lambda m, x: m(x, x, x, need_weights=False)[0])


def test_multihead_attention_reference_path():
    """need_weights=True (torch's default) and kdim/vdim run torch's own path: identical results."""
    fast, ref = fnn.MultiheadAttention(16, 2), nn.MultiheadAttention(16, 2)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(5, 2, 16)
    assert fast.reference_reasons(True) == ["need_weights=True (the fused kernel never forms the attention matrix)"]
    (of, wf), (orf, wr) = fast(x, x, x), ref(x, x, x)
    assert torch.equal(of, orf) and torch.equal(wf, wr)
    kd = fnn.MultiheadAttention(16, 2, kdim=8, vdim=12)
    assert kd.reference_reasons(False) == ["kdim/vdim differ from embed_dim"]
    out, w = kd(x, torch.randn(7, 2, 8), torch.randn(7, 2, 12), need_weights=False)
    assert out.shape == (5, 2, 16) and w is None


@needs("linear", "layer_norm", "scaled_dot_product_attention")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [dict(), dict(norm_first=True), dict(activation="gelu", batch_first=True),
                                dict(activation=nn.SiLU())], ids=["post", "pre", "gelu", "silu"])
def test_transformer_encoder_layer(kw, backend):
    torch.manual_seed(0)
    fast = fnn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, **kw, backend=backend)
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, **kw)
    assert all(torch.equal(a, b) for a, b in zip(fast.parameters(), ref.parameters()))  # same init, same RNG
    mask = nn.Transformer.generate_square_subsequent_mask(6)
    check_twin(fast, ref, torch.randn(6, 3, 32), call=lambda m, x: m(x, src_mask=mask, is_causal=True))


# ---------------------------------------------------------------- plumbing
def test_from_torch_shares_parameters():
    lin = nn.Linear(8, 4)
    fast = fnn.Linear.from_torch(lin, activation="relu", backend="reference")
    assert fast.weight is lin.weight and fast.bias is lin.bias and type(lin) is nn.Linear
    assert fast.activation == "relu" and fast.backend == "reference"
    with pytest.raises(TypeError, match="expects a LayerNorm, got Linear"):
        fnn.LayerNorm.from_torch(lin)


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend must be None or one of .*; got 'fast'"):
        fnn.GELU(backend="fast")
    with pytest.raises(ValueError, match="activation must be None or one of .*; got 'tanh'"):
        fnn.Linear(4, 4, activation="tanh")
    with pytest.raises(ValueError, match="activation must be one of .*; got None"):
        fnn.MLP(4, 8, activation=None)
