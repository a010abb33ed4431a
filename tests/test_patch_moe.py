"""fastlm.patch on Hugging Face sparse MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, GPT-OSS): the
experts run on experts_implementation="fastlm" (transformers' ExpertsInterface -> fastlm's MoE
ops) and the routers on fastlm.ops.moe_router, with logits, router logits, aux loss and gradients
equal to HF's eager model (fp32); the report, the state_dict, hooks, a training step, save/load,
idempotence and undoing; and what is refused, with the reason."""
import copy

import pytest
import torch
from torch import nn

import fastlm
from ops_available import needs

T = pytest.importorskip("transformers")
from fastlm.patch import moe  # noqa: E402  (after transformers is known to be there)

GQA = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, vocab_size=97,
           max_position_embeddings=64, num_key_value_heads=2)
MODELS = {  # name: (class, config); output_router_logits: the loss carries the aux loss
    "mixtral": (T.MixtralForCausalLM, dict(num_local_experts=4, num_experts_per_tok=2), T.MixtralConfig),
    "qwen2_moe": (T.Qwen2MoeForCausalLM, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                              shared_expert_intermediate_size=48), T.Qwen2MoeConfig),
    "qwen3_moe": (T.Qwen3MoeForCausalLM, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                              norm_topk_prob=True, head_dim=16), T.Qwen3MoeConfig),
    "gpt_oss": (T.GptOssForCausalLM, dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=5),
                T.GptOssConfig),
}
ROUTED = {"mixtral": ("softmax", True), "qwen2_moe": ("softmax", False), "qwen3_moe": ("softmax", True),
          "gpt_oss": ("softmax", True)}  # GPT-OSS: softmax over the top-k logits == renormalised top-k softmax


def _build(name, **extra):
    cls, kwargs, config_cls = MODELS[name]
    torch.manual_seed(0)
    config = config_cls(output_router_logits=True, router_aux_loss_coef=0.5, **kwargs, **GQA, **extra)
    model = cls(config).float()
    with torch.no_grad():  # routers ~ N(0, 1) logits: a realistic spread of routing probabilities
        for m in model.modules():
            if moe.is_router(m):
                m.weight.normal_(0.0, 1.0 / m.weight.shape[1] ** 0.5 * 3)
    model.set_attn_implementation("eager")
    model.set_experts_implementation("eager")  # the oracle: HF's own per-expert loop
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 97, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, -3:] = 0  # right padding: HF's aux loss is masked
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def _patched(ref, **switches):
    model = copy.deepcopy(ref)
    # only what this file is about: MoE (and the nn.Linear twins, always swapped)
    report = fastlm.patch(model, **{"rope": False, "norm": False, "attention": False, "loss": False, **switches})
    return model, report


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@needs("moe_router", "moe_experts", "linear")
@pytest.mark.parametrize("name", list(MODELS))
def test_moe_matches_eager(name):
    ref = _build(name)
    model, report = _patched(ref)
    assert model.config._experts_implementation == "fastlm"
    inputs = _batch()
    model.eval(), ref.eval()
    with torch.no_grad():
        out, want = model(**inputs), ref(**inputs)
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-5)
    assert len(out.router_logits) == len(want.router_logits) == 2
    for a, b in zip(out.router_logits, want.router_logits):  # recorded by HF's OutputRecorder on our routers
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.aux_loss, want.aux_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-6, atol=1e-6)

    model.train(), ref.train()
    out, want = model(**inputs), ref(**inputs)
    assert out.aux_loss.requires_grad  # the aux loss is in the loss and gets its gradient
    out.loss.backward(), want.loss.backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    for n, p in model.named_parameters():
        if grads[n] is None:
            assert p.grad is None, n
            continue
        assert p.grad is not None and _rel(p.grad, grads[n]) <= 1e-4, (n, None if p.grad is None else _rel(p.grad, grads[n]))
    routers = [n for n, m in model.named_modules() if moe.is_router(m)]
    assert routers and all(grads[f"{n}.weight"].abs().max() > 0 for n in routers)  # the routers do learn


@needs("moe_router", "moe_experts", "linear")
def test_moe_router_outputs_are_hf_s():
    """Each patched router returns what HF's returns, dtypes included: Mixtral's scores fp32, Qwen's
    in the logits' dtype, int64 indices, in bf16 too."""
    for name in MODELS:
        ref = _build(name).bfloat16()
        model, _ = _patched(ref)
        x = torch.randn(10, 64, dtype=torch.bfloat16)
        for (n, ours), theirs in zip(((n, m) for n, m in model.named_modules() if moe.is_router(m)),
                                     (m for m in ref.modules() if moe.is_router(m))):
            got, want = ours(x), theirs(x)
            assert [t.dtype for t in got] == [t.dtype for t in want], (name, n)
            assert [t.shape for t in got] == [t.shape for t in want], (name, n)
            torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)  # the same F.linear
            assert torch.equal(got[2], want[2]), (name, n)
            torch.testing.assert_close(got[1], want[1], rtol=1e-2, atol=1e-3)  # bf16 scores: rounding


@needs("moe_router", "moe_experts", "linear")
def test_moe_report_state_dict_hooks_idempotent_and_undo():
    ref = _build("qwen2_moe")
    model = copy.deepcopy(ref)
    params = dict(model.named_parameters())
    routers = [m for m in model.modules() if moe.is_router(m)]
    hooks = [dict(m._forward_hooks) for m in routers]  # HF's OutputRecorder hooks
    report = fastlm.patch(model, rope=False, attention=False, loss=False)
    assert report.kinds() == {"norm", "mlp"}
    swapped = {n: new for n, _, new in report.swapped}
    for layer in (0, 1):
        block = f"model.layers.{layer}.mlp"
        assert swapped[block] == "fastlm MoE block (moe_router + experts)"
        assert swapped[f"{block}.gate"] == "router -> fastlm.ops.moe_router (softmax top-2)"  # norm_topk_prob=False
        assert swapped[f"{block}.experts"] == ("experts_implementation='fastlm' (fastlm.ops.moe_experts, "
                                               "activation='swiglu' fused)")
        assert swapped[f"{block}.shared_expert"] == "fastlm GatedMLP"
    assert all(p is params[n] for n, p in model.named_parameters())  # the original Parameters
    assert model.state_dict().keys() == ref.state_dict().keys()
    assert all(type(m).__name__ == "Qwen2MoeTopKRouter" for m in routers)  # the class: OutputRecorder matches it
    assert [dict(m._forward_hooks) for m in routers] == hooks

    again = fastlm.patch(model, rope=False, attention=False, loss=False)  # idempotent
    assert not any("moe" in new.lower() or "experts" in new for _, _, new in again.swapped), again
    assert ("model.layers.0.mlp.gate", "Qwen2MoeTopKRouter", "already fastlm") in again.left
    assert ("model.layers.1.mlp.experts", "Qwen2MoeExperts", "already fastlm") in again.left

    inputs = _batch()
    with torch.no_grad():
        patched = model(**inputs).logits
    moe.unpatch_moe(model)  # routers get their class's forward back, experts HF's default
    assert model.config._experts_implementation == "grouped_mm"
    assert all("forward" not in m.__dict__ and "_fastlm_router" not in m.__dict__ for m in routers)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, patched, rtol=1e-5, atol=1e-5)
    swapped = {n for n, _, _ in fastlm.patch(model, rope=False, attention=False, loss=False).swapped}
    assert {"model.layers.0.mlp.gate", "model.layers.0.mlp.experts"} <= swapped  # patched again after undoing
    off = fastlm.patch(copy.deepcopy(ref), mlp=False)
    assert ("model.layers.0.mlp.experts", "Qwen2MoeExperts", "mlp=False") in off.left
    assert ("model.layers.0.mlp.gate", "Qwen2MoeTopKRouter", "mlp=False") in off.left


@needs("moe_router", "moe_experts", "linear", "rms_norm", "rope", "scaled_dot_product_attention",
       "linear_cross_entropy")
def test_moe_fully_patched_trains_and_saves(tmp_path):
    """The whole patch (fused loss with the aux loss added): three SGD steps (linear in the gradients,
    unlike Adam, whose g / sqrt(v) turns rounding noise on ~0 gradients into full-size steps) give
    the losses and parameters eager's steps give; the state_dict saves and loads into an
    unpatched model."""
    ref = _build("mixtral")
    model = copy.deepcopy(ref)
    fastlm.patch(model)
    inputs = _batch()
    opts = [torch.optim.SGD(m.parameters(), lr=0.02) for m in (model, ref)]
    losses = []
    for _ in range(3):
        for m, opt in zip((model, ref), opts):
            opt.zero_grad()
            out = m(**inputs)
            out.loss.backward()
            opt.step()
            losses.append(out.loss.item())
    assert losses[::2] == pytest.approx(losses[1::2], rel=1e-5), losses  # patched, eager: step by step
    assert len(set(losses[::2])) == 3, losses  # the steps changed the model
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n} after 2 steps: {m}")
    torch.save(model.state_dict(), tmp_path / "patched.pt")
    fresh = _build("mixtral")
    assert fresh.load_state_dict(torch.load(tmp_path / "patched.pt")) is not None
    assert fresh.state_dict().keys() == model.state_dict().keys()
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, fresh(**inputs).logits, rtol=1e-5, atol=1e-5)


@needs("moe_router", "moe_experts")
def test_build_with_fastlm_experts_and_refusals(monkeypatch):
    """experts_implementation="fastlm" at build time serves HF's experts with no patch call; a
    class whose eager forward disagrees with its layout (here an _apply_gate the eager loop never
    calls) is refused at build, and by patch with the reason, leaving HF's implementation on."""
    cls, kwargs, config_cls = MODELS["mixtral"]
    config = config_cls(**kwargs, **GQA)
    torch.manual_seed(0)
    built = cls._from_config(copy.deepcopy(config), experts_implementation="fastlm")
    assert built.config._experts_implementation == "fastlm"
    ref = cls._from_config(copy.deepcopy(config), experts_implementation="eager")
    ref.load_state_dict(built.state_dict())
    ids = _batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(built(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    calls, op = [], moe.ops.moe_experts
    monkeypatch.setattr(moe.ops, "moe_experts", lambda *a, **kw: calls.append(kw) or op(*a, **kw))
    with torch.no_grad():
        built(ids)
    assert len(calls) == 2 and all(kw["activation"] == "swiglu" for kw in calls)
    monkeypatch.undo()

    monkeypatch.setattr(T.models.mixtral.modeling_mixtral.MixtralExperts, "_apply_gate",
                        lambda self, gate_up: torch.relu(gate_up[..., ::2]) * gate_up[..., 1::2])
    with pytest.raises(ValueError, match=r"experts_implementation='fastlm': MixtralExperts \(layers.0.mlp."
                                         r"experts\) its eager forward is not what its layout flags describe"):
        cls._from_config(copy.deepcopy(config), experts_implementation="fastlm")
    model = cls._from_config(copy.deepcopy(config), experts_implementation="eager")
    report = fastlm.patch(model)
    why = "its eager forward is not what its layout flags describe (probe mismatch)"
    assert ("model.layers.1.mlp.experts", "MixtralExperts", why) in report.left
    assert model.config._experts_implementation == "eager"
    assert ("model.layers.1.mlp.gate", "MixtralTopKRouter",  # the router alone is still served
            "router -> fastlm.ops.moe_router (softmax top-2, renormalised)") in report.swapped


def test_moe_plans_and_router_refusals():
    """What the "fastlm" experts entry refuses, and routers it leaves alone, each with its reason."""
    config = T.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **GQA)
    experts = T.models.mixtral.modeling_mixtral.MixtralExperts(config)
    assert moe.experts_plan(experts)[0].activation == "swiglu"
    experts.has_post_expert_norm = True
    assert moe.experts_plan(experts) == (None, "has a post-expert norm (has_post_expert_norm): not served yet")
    experts.has_post_expert_norm, experts.is_transposed = False, True  # flags that do not fit the weights
    assert "do not fit its layout flags" in moe.experts_plan(experts)[1]

    class Overridden(T.models.mixtral.modeling_mixtral.MixtralExperts):
        def forward(self, hidden_states, top_k_index, top_k_weights):  # never reaches ExpertsInterface
            return hidden_states

    assert moe.experts_plan(Overridden(config))[1] == ("its forward does not dispatch through transformers' "
                                                       "ExpertsInterface (overridden)")

    class DoubledRouter(nn.Module):  # router-shaped, but its logits are scaled
        def __init__(self):
            super().__init__()
            self.weight, self.top_k = nn.Parameter(torch.randn(4, 8)), 2

        def forward(self, x):
            logits = 2 * torch.nn.functional.linear(x, self.weight)
            top, idx = torch.topk(torch.softmax(logits, -1), 2)
            return logits, top, idx

    class SigmoidRouter(DoubledRouter):  # DeepSeek-style sigmoid scores, renormalised: served
        def forward(self, x):
            logits = torch.nn.functional.linear(x, self.weight)
            top, idx = torch.topk(torch.sigmoid(logits), 2)
            return logits, top / top.sum(-1, keepdim=True), idx

    seq = nn.Sequential(DoubledRouter(), SigmoidRouter())
    report = fastlm.patch(seq)
    assert report.left == [("0", "DoubledRouter", "router kept: its router_logits are not x @ weight^T (+ bias) "
                                                  "(probe mismatch)")]
    assert report.swapped == [("1", "SigmoidRouter", "router -> fastlm.ops.moe_router (sigmoid top-2, renormalised)")]
    x = torch.randn(5, 8)
    want = SigmoidRouter.forward(seq[1], x)
    got = seq[1](x)
    torch.testing.assert_close(got[1], want[1])
    assert torch.equal(got[2], want[2])


def test_experts_outside_the_interface_run_on_moe_experts():
    """An experts module transformers' interface does not dispatch (no layout flags): swapped for
    GatedExperts on fastlm.ops.moe_experts, same Parameters, same output."""
    class PlainExperts(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(4, 24, 8) * 0.3)
            self.down_proj = nn.Parameter(torch.randn(4, 8, 12) * 0.3)
            self.act_fn = nn.SiLU()

        def forward(self, hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states)
            for t in range(hidden_states.shape[0]):
                for slot, e in enumerate(top_k_index[t].tolist()):
                    gate, up = (self.gate_up_proj[e] @ hidden_states[t]).chunk(2)
                    out[t] += top_k_weights[t, slot] * (self.down_proj[e] @ (self.act_fn(gate) * up))
            return out

    holder = nn.Module()
    holder.experts = PlainExperts()
    ref, weight = copy.deepcopy(holder.experts), holder.experts.gate_up_proj
    report = fastlm.patch(holder)
    assert report.swapped == [("experts", "PlainExperts", "fastlm GatedExperts")]
    assert holder.experts.gate_up_proj is weight
    assert holder.state_dict().keys() == {"experts.gate_up_proj", "experts.down_proj"}
    x, idx, w = torch.randn(9, 8), torch.stack([torch.randperm(4)[:2] for _ in range(9)]), torch.rand(9, 2)
    ref.load_state_dict(holder.experts.state_dict())
    torch.testing.assert_close(holder.experts(x, idx, w), ref(x, idx, w), rtol=1e-5, atol=1e-5)
