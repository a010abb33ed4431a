"""fastlm.patch on 20 Hugging Face families built from tiny configs: the patched model's logits,
loss and gradients equal the unpatched eager model's (fp32), and the profiler shows which fastlm
ops ran: norm, MLP (a fused activation), rope, attention and, for causal LMs given labels, the
loss. The known gaps are listed in GAPS with the reason the report must give."""
import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fastlm
from ops_available import needs

T = pytest.importorskip("transformers")

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, vocab_size=97,
             max_position_embeddings=64)
GQA = dict(SMALL, num_key_value_heads=2)
FAMILIES = {  # name: (model class, config, has rope, causal LM)
    "gpt2": (T.GPT2LMHeadModel, T.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=97,
                                             bos_token_id=0, eos_token_id=0), False, True),
    "llama": (T.LlamaForCausalLM, T.LlamaConfig(**GQA), True, True),
    "mistral": (T.MistralForCausalLM, T.MistralConfig(sliding_window=5, **GQA), True, True),  # window < T = 12
    "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config(**GQA), True, True),
    "qwen3": (T.Qwen3ForCausalLM, T.Qwen3Config(head_dim=16, **GQA), True, True),
    "gemma": (T.GemmaForCausalLM, T.GemmaConfig(head_dim=16, **GQA), True, True),
    "gemma2": (T.Gemma2ForCausalLM, T.Gemma2Config(head_dim=16, **GQA), True, True),
    "phi3": (T.Phi3ForCausalLM, T.Phi3Config(pad_token_id=0, partial_rotary_factor=0.5, **GQA), True, True),
    "olmo2": (T.Olmo2ForCausalLM, T.Olmo2Config(**GQA), True, True),
    # MoE: output_router_logits=True, so the loss carries HF's load-balancing aux loss (and its gradient)
    "mixtral": (T.MixtralForCausalLM, T.MixtralConfig(num_local_experts=4, num_experts_per_tok=2,
                                                      output_router_logits=True, **GQA), True, True),
    "qwen2_moe": (T.Qwen2MoeForCausalLM, T.Qwen2MoeConfig(  # a shared expert behind a sigmoid gate, no renormalising
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        output_router_logits=True, **GQA), True, True),
    "qwen3_moe": (T.Qwen3MoeForCausalLM, T.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                         norm_topk_prob=True, head_dim=16, output_router_logits=True,
                                                         **GQA), True, True),
    "bert": (T.BertForMaskedLM, T.BertConfig(**SMALL), False, False),
    "roberta": (T.RobertaForMaskedLM, T.RobertaConfig(**SMALL, pad_token_id=1), False, False),
    "bart": (T.BartForConditionalGeneration, T.BartConfig(
        d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=97, max_position_embeddings=64), False, False),
    "t5": (T.T5ForConditionalGeneration, T.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16,
                                                    vocab_size=97), False, False),
    "opt": (T.OPTForCausalLM, T.OPTConfig(hidden_size=64, ffn_dim=128, num_attention_heads=4, num_hidden_layers=2,
                                          vocab_size=97, max_position_embeddings=64, word_embed_proj_dim=64), False, True),
    "gpt_neox": (T.GPTNeoXForCausalLM, T.GPTNeoXConfig(rotary_pct=0.25, **SMALL), True, True),
    "falcon": (T.FalconForCausalLM, T.FalconConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                                   vocab_size=97), True, True),
    "bloom": (T.BloomForCausalLM, T.BloomConfig(hidden_size=64, n_head=4, n_layer=2, vocab_size=97), False, True),
    "gpt_oss": (T.GptOssForCausalLM, T.GptOssConfig(
        head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=5, output_router_logits=True, **GQA),
                True, True),
    "vit": (T.ViTForImageClassification, T.ViTConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                                     num_hidden_layers=2, image_size=32, patch_size=8), False, False),
}
# kinds that do not run on fastlm, with the reason the report must give ({name: {kind: reason}}).
# GPT-OSS: its rotary (cos/sin of half width) is not recognised by the probe. (Its experts run on
# the MoE ops, their clamped interleaved SwiGLU unfused between the grouped GEMMs.)
GAPS: dict = {"gpt_oss": {"rope": "probe mismatch"}}
MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss"}  # every MoE block: router and experts on fastlm's MoE ops
MOE_OPS = {"fastlm::moe_router", "fastlm::moe_router_backward", "fastlm::moe_permute", "fastlm::grouped_linear",
           "fastlm::grouped_linear_backward", "fastlm::moe_unpermute", "fastlm::moe_unpermute_backward"}
EVIDENCE = {  # kind -> profiler op names, any of which shows it ran on fastlm
    "norm": ("fastlm::norm",), "mlp": ("fastlm::bias_act_bwd", "fastlm::grouped_linear_backward"),
    "rope": ("fastlm::rope",),
    "attention": ("fastlm::attention",), "loss": ("fastlm::linear_cross_entropy", "fastlm::cross_entropy"),
}


def _build(name):
    cls, config, _, _ = FAMILIES[name]
    torch.manual_seed(0)
    model = cls(copy.deepcopy(config)).float()
    scaled = set()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):  # GPT-OSS's start at ~0
                module.sinks.normal_(0.0, 2.0)
            # realistic attention scores: HF's init (std 0.02) leaves q.k / sqrt(d) ~ 0.01, where a
            # wrong scale, cap or bias hardly shows; 5x every projection of attention gives ~ +-10
            if type(module).__name__.endswith("Attention"):
                for lin in module.modules():  # once each (BERT nests one *Attention in another)
                    w = getattr(lin, "weight", None)
                    if isinstance(w, torch.Tensor) and w.dim() == 2 and id(w) not in scaled:
                        scaled.add(id(w))
                        w.mul_(5.0)
    for module in model.modules():  # dropout off everywhere (modules and the floats forwards read)
        for attr, value in list(vars(module).items()):
            if "drop" in attr.lower() and isinstance(value, float):
                setattr(module, attr, 0.0)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _inputs(name, left_padding=False):
    g = torch.Generator().manual_seed(1)
    if name == "vit":
        return dict(pixel_values=torch.randn(2, 3, 32, 32, generator=g))
    ids = torch.randint(2, 97, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    # 3 pads in the second row; right padding by default, so that no query row is fully masked:
    # eager attention in fp64 (the oracle) turns such a row into NaN, which its additive masks
    # then spread to every row
    if left_padding:
        mask[1, :3] = 0
    else:
        mask[1, -3:] = 0
    if name in ("bart", "t5"):
        return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.randint(2, 97, (2, 7), generator=g))
    return dict(input_ids=ids, attention_mask=mask)


def _close_grads(model, ref):
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    scale = max(g.abs().max().item() for g in grads.values())
    for n, p in model.named_parameters():
        if n in grads:  # atol: gradients that are exactly 0 in math (a key bias) are rounding noise
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6 * scale, msg=lambda m: f"{n}: {m}")


def _as_fp64(inputs):
    return {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}


def _no_worse_than_eager(what, ours, eager, oracle, factor, floor=1e-7):
    """fp32 against the fp64 model: at most `factor` x eager fp32's own error, or 1e-5 of the
    largest magnitude (the scores here reach ~10, where fp32 softmax rounding is visible)."""
    ours, eager, oracle = (t.detach().double() for t in (ours, eager, oracle))
    err, base = (ours - oracle).abs().max().item(), (eager - oracle).abs().max().item()
    limit = max(factor * base, 1e-5 * oracle.abs().max().item(), floor)
    assert err <= limit, f"{what}: error {err:.3g} vs fp64 > {factor}x eager fp32's {base:.3g} (limit {limit:.3g})"


@needs("linear", "layer_norm", "rms_norm", "scaled_dot_product_attention", "rope", "cross_entropy")
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_patched_matches_eager_and_runs_fastlm(name):
    _, _, has_rope, causal = FAMILIES[name]
    ref = _build(name)
    model = copy.deepcopy(ref)
    report = fastlm.patch(model)
    ref.set_attn_implementation("eager")  # the oracle: HF's eager attention
    inputs = _inputs(name)
    mask = inputs.get("attention_mask")
    keep = (slice(None),) if mask is None or "decoder_input_ids" in inputs else mask.bool()  # real tokens

    ref64 = copy.deepcopy(ref).double()  # the oracle: eager attention in fp64
    if hasattr(ref64, "set_experts_implementation") and ref64._can_set_experts_implementation():
        ref64.set_experts_implementation("eager")  # MoE: torch's grouped_mm has no fp64
    model.eval(), ref.eval(), ref64.eval()
    with torch.no_grad():  # logits in eval mode (padded positions have no meaning)
        _no_worse_than_eager(f"{name} logits", model(**inputs).logits[keep], ref(**inputs).logits[keep],
                             ref64(**_as_fp64(inputs)).logits[keep], 2.0)

    model.train(), ref.train()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        if causal:  # labels: the loss path (fused linear cross-entropy in training)
            labels = inputs["input_ids"].masked_fill(mask == 0, -100)
            out = model(**inputs, labels=labels)
            # never formed, unless the forward post-processes them (Gemma-2's final softcap)
            assert (out.logits is None) == model._fastlm_loss["fusable"]
            out.loss.backward()
        else:
            logits = model(**inputs).logits
            weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
            (logits * weights).sum().backward()
    ref.train(), ref64.train()
    if causal:
        expected, oracle = ref(**inputs, labels=labels).loss, ref64(**inputs, labels=labels).loss
        _no_worse_than_eager(f"{name} loss", out.loss, expected, oracle, 2.0)
        expected.backward(), oracle.backward()
    else:
        (ref(**inputs).logits * weights).sum().backward()
        (ref64(**_as_fp64(inputs)).logits * weights.double()).sum().backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.grad is not None} for m in (model, ref, ref64)]
    assert grads[0].keys() == grads[1].keys(), set(grads[0]) ^ set(grads[1])
    scale = max(g.abs().max().item() for g in grads[2].values())
    for n in grads[0]:  # floor: gradients that are exactly 0 in math (a key bias) are rounding noise
        _no_worse_than_eager(f"{name} grad {n}", grads[0][n], grads[1][n], grads[2][n], 3.0, floor=1e-6 * scale)

    ran = {e.name for e in prof.events() if e.name.startswith("fastlm::")}
    if name in MOE:
        assert MOE_OPS <= ran, f"{name}: MoE ops that did not run: {sorted(MOE_OPS - ran)}\n{report}"
        blocks = {n for n, m in model.named_modules() if hasattr(m, "experts")}
        assert blocks and blocks <= {n for n, _, new in report.swapped if new.startswith("fastlm MoE block")}, report
    kinds = ["norm", "mlp", "attention"] + (["rope"] if has_rope else []) + (["loss"] if causal else [])
    gaps = GAPS.get(name, {})
    for kind in kinds:
        if kind in gaps:
            assert not any(op in ran for op in EVIDENCE[kind]), f"{name}: {kind} now runs on fastlm; update GAPS"
            assert any(gaps[kind] in why for _, _, why in report.left), f"{name}: the report must say why\n{report}"
        else:
            assert any(op in ran for op in EVIDENCE[kind]), f"{name}: no fastlm {kind} op ran: {sorted(ran)}\n{report}"
            assert kind in report.kinds(), f"{name}: the report does not list {kind}\n{report}"


@needs("linear", "rms_norm", "scaled_dot_product_attention", "rope", "linear_cross_entropy")
def test_patch_a_class_before_weights_load(tmp_path):
    class PatchedLlama(T.LlamaForCausalLM):  # a subclass, so the hook stays out of other tests
        pass

    assert fastlm.patch(PatchedLlama, loss=False) is None
    ref = _build("llama")
    ref.save_pretrained(tmp_path)
    model = PatchedLlama.from_pretrained(tmp_path, attn_implementation="sdpa")
    kinds = model._fastlm_report.kinds()
    assert kinds == {"norm", "mlp", "rope", "attention"} and model.config._attn_implementation == "fastlm"
    ids = _inputs("llama")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    assert fastlm.patch.__module__ == "fastlm.patch"
    from fastlm.patch import _resolve

    assert [c.__name__ for c in _resolve("llama")] == ["LlamaPreTrainedModel"]
    assert _resolve("MistralForCausalLM") == [T.MistralForCausalLM]
    with pytest.raises(ValueError, match="'no_such_model' is neither a transformers class name nor a model type"):
        fastlm.patch("no_such_model")


@needs("linear", "rms_norm", "rope")
def test_switches_and_report():
    model = _build("llama")
    report = fastlm.patch(model, rope=False, attention=False, loss=False)
    assert report.kinds() == {"norm", "mlp"} and model.config._attn_implementation != "fastlm"
    assert ("model.layers.0.self_attn", "LlamaAttention", "attention=False") in report.left
    assert ("", "LlamaForCausalLM", "loss kept: loss=False") in report.left
    fastlm.patch(model.eval())  # loss on: return_dict=False gets a tuple that starts with the loss, as HF's does
    ids = _inputs("llama")["input_ids"]
    loss, logits = model(ids, labels=ids, return_dict=False)[:2]
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="patch: rope must be True or False, got 'yes'"):
        fastlm.patch(model, rope="yes")
    bert = fastlm.patch(_build("bert"))  # a module holding parameters beside its children is listed
    assert ("cls.predictions", "BertLMPredictionHead", "holds parameters bias beside its children: no fastlm twin") \
        in bert.left


def test_custom_forwards_are_left_alone():
    class ScaledRMSNorm(torch.nn.Module):  # norm-shaped, but its forward computes something else
        def __init__(self):
            super().__init__()
            self.weight, self.eps = torch.nn.Parameter(torch.ones(8)), 1e-6

        def forward(self, x):
            return 2 * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    class OddMLP(torch.nn.Module):  # gate/up/down names, but up is applied before the activation
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = (torch.nn.Linear(8, 12), torch.nn.Linear(8, 12),
                                                            torch.nn.Linear(12, 8))
            self.act_fn = torch.nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x) * self.up_proj(x)))

    report = fastlm.patch(torch.nn.Sequential(ScaledRMSNorm(), OddMLP()))
    assert ("0", "ScaledRMSNorm", "forward is not x * rsqrt(mean(x^2) + eps) * (weight or 1 + weight) "
                                  "(probe mismatch)") in report.left
    assert not any(name == "1" for name, _, _ in report.swapped)
    assert ("1.act_fn", "SiLU", "fastlm SiLU") in report.swapped  # its parts are still swapped one by one


def test_hf_attention_refuses_what_it_does_not_compute():
    from fastlm.patch.hf import hf_attention

    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    module = torch.nn.Module()
    for kwarg in ({"cu_seq_lens_q": torch.tensor([0, 4])}, {"head_mask": torch.ones(2)}):
        with pytest.raises(NotImplementedError, match=f"{next(iter(kwarg))} is not supported yet"):
            hf_attention(module, q, k, k, None, **kwarg)
    # sliding_window W with no mask: key j seen by query i when i - W < j <= i, on the kernels' window
    band = torch.ones(4, 4, dtype=torch.bool).tril() & ~torch.ones(4, 4, dtype=torch.bool).tril(-2)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, k, band).transpose(1, 2)
    torch.testing.assert_close(hf_attention(module, q, k, k, None, sliding_window=2)[0], want, rtol=1e-5, atol=1e-6)
    # s_aux (GPT-OSS's sinks): one more logit per row in the softmax, pointing at no value
    sinks = torch.randn(2)
    s = (q @ k.transpose(-1, -2)).masked_fill(~torch.ones(4, 4, dtype=torch.bool).tril(), -float("inf")) * 0.5
    p = torch.softmax(torch.cat([s, sinks.view(1, 2, 1, 1).expand(1, 2, 4, 1)], -1), -1)[..., :-1]
    torch.testing.assert_close(hf_attention(module, q, k, k, None, scaling=0.5, s_aux=sinks)[0],
                               (p @ k).transpose(1, 2), rtol=1e-5, atol=1e-6)
    out, _ = hf_attention(module, q, k, k, None, softcap=None, sliding_window=8)  # None / a window past Tk: exact
    want = torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    # softcap (Gemma-2's attn_logit_softcapping) is computed, as eager does it: tanh-capped scores
    q, k = q * 4, k * 4  # scores up to ~30: the cap matters
    out, _ = hf_attention(module, q, k, k, None, scaling=0.5, softcap=5.0)
    s = 5.0 * torch.tanh((q @ k.transpose(-1, -2)) * 0.5 / 5.0)
    s = s.masked_fill(~torch.ones(4, 4, dtype=torch.bool).tril(), -float("inf"))
    want = (torch.softmax(s, -1) @ k).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, hf_attention(module, q, k, k, None, scaling=0.5)[0], atol=1e-3)


@needs("linear", "rms_norm", "rope", "linear_cross_entropy")
def test_fused_loss_honours_hf_loss_kwargs():
    """num_items_in_batch (sum / count, as HF's trainer passes it for gradient accumulation) and
    shift_labels (pre-shifted targets) give HF's loss, fused in training."""
    ref = _build("qwen2")
    model = copy.deepcopy(ref)
    fastlm.patch(model, attention=False)
    ids = _inputs("qwen2")["input_ids"]
    labels = ids.clone()
    labels[0, :5] = -100
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    for kwargs in ({"num_items_in_batch": torch.tensor(7)}, {"shift_labels": shifted}, {"num_items_in_batch": 5}):
        out, want = model(ids, labels=labels, **kwargs), ref(ids, labels=labels, **kwargs)
        assert out.logits is None
        torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6, msg=lambda m: f"{kwargs}: {m}")


@needs("linear", "layer_norm", "scaled_dot_product_attention", "rms_norm", "rope")
def test_sliding_window_runs_natively_without_padding(monkeypatch):
    """Mistral with a window of 5 over 12 tokens and no padding: the mask HF builds is exactly the
    band, so the op gets window=(4, 0) and no mask; logits equal eager's."""
    from fastlm.patch import hf

    ref = _build("mistral")
    model = copy.deepcopy(ref)
    fastlm.patch(model)
    ref.set_attn_implementation("eager")
    calls = []
    op = hf.ops.scaled_dot_product_attention
    monkeypatch.setattr(hf.ops, "scaled_dot_product_attention", lambda *a, **kw: calls.append(kw) or op(*a, **kw))
    ids = torch.randint(2, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert calls and all(kw["window"] == (4, 0) and kw["attn_mask"] is None for kw in calls), calls


@needs("linear", "layer_norm", "scaled_dot_product_attention")
def test_build_with_fastlm_attention_serves_bloom_and_refuses_falcon():
    """attn_implementation="fastlm" at build: BLOOM's own attention code is served by the op with
    in-kernel ALiBi (logits and grads equal eager's, left padding included); Falcon's, which calls
    torch's SDPA only under "sdpa", is refused with a ValueError that names the class."""
    cls, config, _, _ = FAMILIES["bloom"]
    torch.manual_seed(0)
    model = cls._from_config(copy.deepcopy(config), attn_implementation="fastlm")
    ref = cls._from_config(copy.deepcopy(config), attn_implementation="eager")
    ref.load_state_dict(model.state_dict())
    inputs = _inputs("bloom", left_padding=True)  # BLOOM's positions skip pads: ALiBi must not care
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = model(**inputs).logits
    assert any(e.name == "fastlm::attention" for e in prof.events())
    want = ref(**inputs).logits
    torch.testing.assert_close(out[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, 3:], want[1, 3:], rtol=1e-5, atol=1e-5)  # row 1: 3 left pads
    out[1, 3:].sum().backward(), want[1, 3:].sum().backward()
    _close_grads(model, ref)
    cls, config, _, _ = FAMILIES["falcon"]
    with pytest.raises(ValueError, match=r"attn_implementation='fastlm': FalconAttention \(h.0.self_attention\) "
                                         r"runs its own attention code"):
        cls._from_config(copy.deepcopy(config), attn_implementation="fastlm")
