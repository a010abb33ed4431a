"""fastlm.patch on torch and HF GPT-2 models: same outputs and gradients, shared Parameters, a report."""
import copy

import pytest
import torch
from torch import nn

import fastlm
import fastlm.nn as fnn
from ops_available import needs

transformers = pytest.importorskip("transformers")
TOL = dict(rtol=1e-4, atol=1e-4)


def hf_gpt2(attn_implementation="sdpa"):
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=97, bos_token_id=0,
                                  eos_token_id=0)
    return transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation=attn_implementation)


@needs("linear", "layer_norm", "scaled_dot_product_attention")
def test_patch_hf_gpt2_outputs_grads_and_report():
    hf = hf_gpt2()
    ref = copy.deepcopy(hf)
    params = dict(hf.named_parameters())
    report = fastlm.patch(hf)
    assert hf.config._attn_implementation == "fastlm"
    assert all(p is params[n] for n, p in hf.named_parameters())  # the original Parameter objects
    swapped = {name: new for name, _, new in report.swapped}
    assert swapped["transformer.h.0.mlp"] == "fastlm GPT2MLP" and swapped["transformer.ln_f"] == "fastlm LayerNorm"
    assert swapped["transformer.h.1.attn"].startswith("attn_implementation='fastlm'")
    assert swapped["transformer.h.1.attn.c_attn"] == "fastlm Conv1D"
    assert ("transformer.wte", "Embedding", "no fastlm twin") in report.left
    assert swapped[""] == "loss -> fastlm linear_cross_entropy (training) / cross_entropy (eval)"
    assert "swapped 15, left 7 alone" in str(report)

    idx = torch.randint(0, 97, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the second row
    hf.train(), ref.train()  # dropout is 0.1 in GPT-2's config: turn it off, keep autograd
    for m in (hf, ref):
        for d in m.modules():
            if isinstance(d, nn.Dropout):
                d.p = 0.0
    out, expected = hf(idx, attention_mask=mask), ref(idx, attention_mask=mask)
    torch.testing.assert_close(out.logits[0], expected.logits[0], **TOL)
    torch.testing.assert_close(out.logits[1, 3:], expected.logits[1, 3:], **TOL)  # padded positions: no meaning
    out.logits[1, 3:].sum().backward()
    expected.logits[1, 3:].sum().backward()
    for (name, p), q in zip(hf.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=lambda m: f"grad of {name}: {m}")


@needs("linear", "layer_norm", "scaled_dot_product_attention")
def test_patched_hf_generate_and_attn_implementation():
    hf = hf_gpt2().eval()
    hf.generation_config.eos_token_id = None
    prompt = torch.randint(0, 97, (1, 5))
    expected = hf.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    fresh = hf_gpt2("fastlm").eval()  # registered by `import fastlm`: HF's own modules, fastlm attention
    fresh.load_state_dict(hf.state_dict())
    assert fresh.config._attn_implementation == "fastlm"
    with torch.no_grad():
        torch.testing.assert_close(fresh(prompt).logits, hf(prompt).logits, **TOL)
    fastlm.patch(hf)
    assert torch.equal(hf.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0), expected)


@needs("linear")
@pytest.mark.parametrize("act,name", [(nn.GELU(), "gelu"), (nn.ReLU(inplace=True), "relu"), (nn.SiLU(), "silu")])
def test_sequential_linear_activation_fused(act, name):
    seq = nn.Sequential(nn.Linear(8, 16), act, nn.Linear(16, 4), nn.Dropout(0.0))
    ref = copy.deepcopy(seq)
    weight = seq[0].weight
    report = fastlm.patch(seq, backend="reference")
    assert isinstance(seq[0], fnn.Linear) and seq[0].activation == name and seq[0].weight is weight
    assert isinstance(seq[1], nn.Identity) and seq[0].backend == "reference"
    assert report.swapped[:2] == [("0", "Linear", f"fastlm Linear(activation={name!r})"),
                                  ("1", type(act).__name__, "Identity (fused into the Linear)")]
    assert report.left == [("3", "Dropout", "no fastlm twin")]
    assert seq.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(5, 8)
    torch.testing.assert_close(seq(x), ref(x), **TOL)


@needs("linear", "layer_norm", "scaled_dot_product_attention")
def test_patch_torch_transformer_encoder():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2,
                                enable_nested_tensor=False)
    head = nn.Sequential(enc, nn.LayerNorm(32), nn.Linear(32, 5))
    ref = copy.deepcopy(head)
    report = fastlm.patch(head)
    assert [n for n, _, _ in report.swapped] == ["0.layers.0", "0.layers.1", "1", "2"]
    assert isinstance(head[0].layers[0].self_attn, fnn.MultiheadAttention)
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(head(x), ref(x), **TOL)
    again = fastlm.patch(head)  # idempotent: nothing left to swap
    assert again.swapped == [] and ("1", "LayerNorm", "already fastlm") in again.left


def test_patch_edge_cases():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, a model class or name, got int"):
        fastlm.patch(3)
    with pytest.raises(ValueError, match="backend must be None or one of .*; got 'gpu'"):
        fastlm.patch(nn.Sequential(nn.ReLU()), backend="gpu")
    report = fastlm.patch(nn.Linear(3, 3))
    assert report.swapped == [] and report.left == [("", "Linear", "the root module itself: patch its parent")]

    class MyLinear(nn.Linear):  # nn.Linear's forward: recognised by its probe, swapped
        pass

    class ScaledLinear(nn.Linear):  # a custom forward: the probe tells, and it is left alone
        def forward(self, x):
            return 2 * super().forward(x)

    report = fastlm.patch(nn.Sequential(MyLinear(2, 2), nn.GELU(), ScaledLinear(2, 2)))
    assert report.left == [("2", "ScaledLinear", "a subclass of nn.Linear whose forward differs from nn.Linear's "
                                                 "(probe mismatch)")]
    assert report.swapped == [("0", "MyLinear", "fastlm Linear"), ("1", "GELU", "fastlm GELU")]
