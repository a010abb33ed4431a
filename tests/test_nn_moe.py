"""fastlm.nn.MoE: against a float64 eager MoE (every router kind, capacity drops, shared expert),
against fastlm.ops.moe_mlp, and against HF transformers' Mixtral and Qwen2-MoE sparse blocks
(state_dict both ways, outputs, gradients, the load-balancing loss); errors; torch.compile."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastlm.nn as fnn
from fastlm import ops
from fastlm.ops.moe_router import capacity_for

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 against fp64 (DESIGN.md's fp32 rule)


def randomize(module, std=0.3):
    """Fresh draws for every parameter (HF's experts are torch.empty until a model initialises them)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * std)
    return module


def tokens_away_from_ties(moe, *shape, gap=1e-3):
    """x (*shape, H) whose routing no rounding can flip: each token's k-th and (k+1)-th score
    differ by at least `gap` (redrawn until so), so fp32 and fp64 choose the same experts."""
    x = torch.randn(*shape, moe.hidden_size)
    flat = x.view(-1, moe.hidden_size)
    for _ in range(100):
        logits = flat.double() @ moe.gate.weight.double().t()
        s = logits.softmax(-1) if moe.score == "softmax" else logits.sigmoid()
        top = s.sort(-1, descending=True).values
        close = (top[:, :moe.top_k] - top[:, 1:moe.top_k + 1]).abs().min(-1).values < gap \
            if moe.top_k < moe.num_experts else torch.zeros(len(flat), dtype=torch.bool)
        if not close.any():
            return x
        flat[close] = torch.randn(int(close.sum()), moe.hidden_size)
    raise AssertionError("could not draw tokens away from routing ties")


def eager_moe(moe, x):
    """The module's math in plain PyTorch, on the module's own (possibly fp64) parameters:
    scores, top-k, renormalisation, slot-major capacity (a Python loop), a loop over experts,
    the shared expert; returns (out, aux, z)."""
    p = dict(moe.named_parameters())
    flat = x.reshape(-1, moe.hidden_size)
    t, e, k = flat.shape[0], moe.num_experts, moe.top_k
    gated = moe.activation in ("swiglu", "geglu")
    act = {"swiglu": F.silu, "geglu": F.gelu, "gelu": F.gelu, "relu": F.relu, "silu": F.silu}[moe.activation]

    def activate(parts):  # (gate, up) or (pre,)
        return act(parts[0]) * parts[1] if gated else act(parts[0])

    logits = flat @ p["gate.weight"].t()
    s = logits.softmax(-1) if moe.score == "softmax" else logits.sigmoid()
    w, ids = s.topk(k, -1)
    if moe.normalize:
        w = w / w.sum(-1, keepdim=True)
    keep = torch.ones_like(ids, dtype=torch.bool)
    capacity = capacity_for(t, e, k, moe.capacity_factor)
    if capacity is not None:
        used = [0] * e
        for slot in range(k):
            for tok in range(t):
                keep[tok, slot] = used[int(ids[tok, slot])] < capacity
                used[int(ids[tok, slot])] += int(keep[tok, slot])
    out = torch.zeros_like(flat)
    for ex in range(e):
        tok, slot = torch.where((ids == ex) & keep)
        h = flat[tok] @ p["experts.gate_up_proj"][ex].t()
        h = activate(h.chunk(2, -1) if gated else (h,))
        out = out.index_add(0, tok, (h @ p["experts.down_proj"][ex].t()) * w[tok, slot, None])
    if moe.shared_expert_size is not None:  # Qwen2-MoE's MLP; up and down alone for a plain activation
        up = flat @ p["shared_expert.up_proj.weight"].t()
        h = activate((flat @ p["shared_expert.gate_proj.weight"].t(), up) if gated else (up,))
        out = out + torch.sigmoid(flat @ p["shared_expert_gate.weight"].t()) * (h @ p["shared_expert.down_proj.weight"].t())
    probs = s / s.sum(-1, keepdim=True)
    aux = e * (F.one_hot(ids, e).to(s.dtype).sum(1).mean(0) * probs.mean(0)).sum()  # before capacity
    z = torch.logsumexp(logits, -1).square().mean()
    return out.view(x.shape), aux, z


def check_against_eager(moe, shape):
    """moe (fp32) against eager_moe on an fp64 copy: out, aux_loss, routing stats, every gradient."""
    moe64 = copy.deepcopy(moe).double()
    x = tokens_away_from_ties(moe, *shape)
    x32, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    out = moe(x32)
    want, aux, z = eager_moe(moe64, x64)
    assert out.shape == x.shape and not out.isnan().any()
    torch.testing.assert_close(out.double(), want, **TOL)
    torch.testing.assert_close(moe.aux_loss.double(), moe.aux_loss_coef * aux + moe.z_loss_coef * z, **TOL)
    g = torch.randn_like(want)
    ((out.double() * g).sum() + moe.aux_loss).backward()
    ((want * g).sum() + moe.aux_loss_coef * aux + moe.z_loss_coef * z).backward()
    for (name, p32), p64 in zip(moe.named_parameters(), moe64.parameters()):
        torch.testing.assert_close(p32.grad.double(), p64.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    return x


# ---------------------------------------------------------------- the module's math
@pytest.mark.parametrize("kw", [
    dict(),
    dict(top_k=1, router="switch"),
    dict(score="sigmoid"),
    dict(score="sigmoid", normalize=False, top_k=3),
    dict(activation="gelu", top_k=4),
    dict(capacity_factor=0.75, z_loss_coef=1e-3),
    dict(shared_expert_size=12, aux_loss_coef=0.1),
    dict(activation="gelu", shared_expert_size=20, capacity_factor=1.0),
], ids=["topk", "switch", "sigmoid", "sigmoid-unnormalized", "gelu-top4", "capacity-zloss", "shared", "gelu-shared-cap"])
def test_matches_float64_eager(kw):
    moe = randomize(fnn.MoE(16, 24, 6, **{"top_k": 2, **kw}))
    check_against_eager(moe, (3, 13))


@pytest.mark.parametrize("shape", [(1,), (7,), (2, 5, 3), (0,)],
                         ids=["one-token", "tokens", "3d", "empty"])
def test_shapes(shape):
    moe = randomize(fnn.MoE(8, 16, 4, shared_expert_size=8))
    x = torch.randn(*shape, 8)
    out = moe(x)
    assert out.shape == x.shape and not out.isnan().any()
    if x.numel():
        torch.testing.assert_close(out.double(), eager_moe(copy.deepcopy(moe).double(), x.double())[0], **TOL)
    assert float(moe.drop_rate) == 0.0


def test_matches_the_op_and_residual():
    """Without a shared expert the routed part is exactly one fastlm.ops.moe_mlp call."""
    moe = randomize(fnn.MoE(16, 32, 8, 2, capacity_factor=1.0, z_loss_coef=0.01))
    x, r = torch.randn(4, 9, 16), torch.randn(4, 9, 16)
    got = moe(x, residual=r)
    want = ops.moe_mlp(x, moe.gate.weight, moe.experts.gate_up_proj, moe.experts.down_proj, 2,
                       capacity=capacity_for(36, 8, 2, 1.0))
    torch.testing.assert_close(got, want.out + r, rtol=0, atol=0)
    for a, b in zip(moe.last_routing, want.routing):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
    assert not any(t.requires_grad for t in moe.last_routing)
    torch.testing.assert_close(moe.aux_loss, 0.01 * want.routing.aux_loss + 0.01 * want.routing.z_loss)


def test_capacity_drops_and_load():
    """capacity_factor 0.5: each expert keeps at most ceil(0.5 * T * k / E) assignments, the rest are
    dropped (a token with both dropped gets 0), and the load and drop rate say so."""
    moe = randomize(fnn.MoE(16, 24, 4, 2, capacity_factor=0.5))
    x = check_against_eager(moe, (40,))
    capacity = capacity_for(40, 4, 2, 0.5)
    counts = moe.last_routing.counts
    assert capacity == 10 and int(counts.max()) <= capacity
    torch.testing.assert_close(moe.drop_rate, torch.tensor(1 - int(counts.sum()) / 80))
    torch.testing.assert_close(moe.expert_load, counts.float() / counts.sum())
    assert float(moe.drop_rate) >= 0.5  # at most E * capacity = 40 of 80 assignments kept
    dropped = (moe.last_routing.expert_ids < 0).all(-1)
    assert dropped.any()
    with torch.no_grad():
        assert torch.equal(moe(x)[dropped], torch.zeros(int(dropped.sum()), 16))
    # the capacity follows each call's token count
    moe(torch.randn(8, 16))
    assert int(moe.last_routing.counts.max()) <= capacity_for(8, 4, 2, 0.5) == 2


def test_aux_loss_and_jitter():
    moe = randomize(fnn.MoE(16, 24, 4, 2, aux_loss_coef=0.0, z_loss_coef=0.0, jitter=0.5))
    with pytest.raises(RuntimeError, match="MoE.expert_load: no forward has run yet"):
        moe.expert_load
    x = torch.randn(30, 16)
    moe.eval()
    a, b = moe(x), moe(x)
    assert torch.equal(a, b)  # no noise at eval
    assert isinstance(moe.aux_loss, torch.Tensor) and moe.aux_loss.item() == 0.0
    moe.train()
    assert not torch.allclose(moe(x), a)  # the logits are jittered in training
    moe.aux_loss_coef = 1.0
    moe(x)
    moe.aux_loss.backward()  # the load-balancing loss alone reaches the router
    assert moe.gate.weight.grad.abs().sum() > 0
    torch.testing.assert_close(moe.expert_load.sum(), torch.tensor(1.0))
    twin = copy.deepcopy(moe)  # aux_loss holds a graph; copies (EMA models, pickles) start without it
    assert twin.aux_loss is None and twin.last_routing is None and moe.aux_loss is not None


# ---------------------------------------------------------------- HF transformers' blocks
transformers = pytest.importorskip("transformers")


def hf_block(kind, **kw):
    if kind == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        cfg = transformers.MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=6,
                                         num_experts_per_tok=2, **kw)
        block = MixtralSparseMoeBlock
    else:
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

        cfg = transformers.Qwen2MoeConfig(hidden_size=16, moe_intermediate_size=24, shared_expert_intermediate_size=20,
                                          num_experts=6, num_experts_per_tok=2, **kw)
        block = Qwen2MoeSparseMoeBlock
    cfg._experts_implementation = "eager"  # the experts loop, as the standalone block would run it
    return randomize(block(cfg)).eval(), cfg


@pytest.mark.parametrize("kind,kw", [("mixtral", {}), ("qwen2_moe", dict(norm_topk_prob=False)),
                                     ("qwen2_moe", dict(norm_topk_prob=True))],
                         ids=["mixtral", "qwen2-moe", "qwen2-moe-normalized"])
def test_hf_sparse_block_both_ways(kind, kw):
    hf, cfg = hf_block(kind, **kw)
    shared = cfg.shared_expert_intermediate_size if kind == "qwen2_moe" else None
    moe = fnn.MoE(16, 24, 6, 2, shared_expert_size=shared, normalize=cfg.norm_topk_prob if kind == "qwen2_moe" else True).eval()  # Mixtral always renormalises
    assert list(moe.state_dict()) == list(hf.state_dict())
    moe.load_state_dict(hf.state_dict())
    randomize(moe)  # and back, with values HF doesn't have yet
    hf.load_state_dict(moe.state_dict())
    for key, value in moe.state_dict().items():
        assert torch.equal(hf.state_dict()[key], value), key
    x = tokens_away_from_ties(moe, 3, 11)
    xs, xh = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = moe(xs), hf(xh)
    torch.testing.assert_close(out, want, **TOL)
    g = torch.randn_like(want)
    (out * g).sum().backward()
    (want * g).sum().backward()
    hf_grads = dict(hf.named_parameters())
    for name, p in moe.named_parameters():
        torch.testing.assert_close(p.grad, hf_grads[name].grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(xs.grad, xh.grad, rtol=1e-4, atol=1e-5)


def test_hf_load_balancing_loss():
    """aux_loss with coefficient 1 is HF's load_balancing_loss_func for the layer's router logits."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    moe = randomize(fnn.MoE(16, 24, 6, 2, aux_loss_coef=1.0))
    x = torch.randn(40, 16)
    moe(x)
    want = load_balancing_loss_func((x @ moe.gate.weight.t(),), 6, 2)
    torch.testing.assert_close(moe.aux_loss, want, rtol=1e-5, atol=1e-6)


def test_base_router_balanced_and_gated_by_sigmoid():
    """BASE layers: training assigns exactly T/E tokens per expert (the balanced optimum of the
    logits), each token's output scaled by sigmoid(its logit); eval takes the best expert."""
    moe = randomize(fnn.MoE(16, 24, 4, 1, router="base")).double()
    x = torch.randn(24, 16, dtype=torch.float64, requires_grad=True)
    out = moe(x)
    ids = moe.last_routing.expert_ids.view(-1).long()
    assert moe.last_routing.counts.tolist() == [6, 6, 6, 6] and float(moe.aux_loss) == 0.0
    logits = x @ moe.gate.weight.t()
    assert torch.equal(ids, ops.base_assignment(logits.detach())[0].long())  # the op's balanced optimum
    want = torch.zeros_like(x)
    for e in range(4):
        rows = ids == e
        gate, up = F.linear(x[rows], moe.experts.gate_up_proj[e]).chunk(2, -1)
        want[rows] = F.linear(F.silu(gate) * up, moe.experts.down_proj[e]) * torch.sigmoid(logits[rows, e:e + 1])
    torch.testing.assert_close(out, want)
    (g_router,) = torch.autograd.grad(out.sum(), moe.gate.weight)
    assert g_router.abs().sum() > 0  # the router learns through the sigmoid gate
    moe.eval()
    moe(x)
    assert torch.equal(moe.last_routing.expert_ids.view(-1).long(), logits.argmax(-1))


# ---------------------------------------------------------------- errors, compile
@pytest.mark.parametrize("kw,error,message", [
    (dict(router="base"), ValueError, r"router='base' assigns each token one expert, exactly balanced: it takes "
                                      r"top_k=1, capacity_factor=None and normalize=None, got top_k=2"),
    (dict(router="expert_choice"), ValueError, r"router must be one of topk, switch, base, got 'expert_choice'"),
    (dict(router="switch"), ValueError, r"router='switch' sends each token to one expert: top_k must be 1, got 2"),
    (dict(router="switch", top_k=1, normalize=True), ValueError, r"router='switch' .* normalize=True"),
    (dict(top_k=5), ValueError, r"top_k must be an int in \[1, 4\] \(num_experts\), got 5"),
    (dict(num_experts=0), ValueError, r"num_experts must be an int >= 1, got 0"),
    (dict(activation="tanh"), ValueError, r"activation must be one of swiglu, geglu, gelu, .*got 'tanh'"),
    (dict(score="relu"), ValueError, r"score must be one of softmax, sigmoid, got 'relu'"),
    (dict(capacity_factor=0), ValueError, r"capacity_factor must be None \(no dropping\) or a number > 0, got 0"),
    (dict(aux_loss_coef=-1), ValueError, r"aux_loss_coef must be a number >= 0, got -1"),
    (dict(jitter=1.0), ValueError, r"jitter must be a number in \[0, 1\), got 1.0"),
    (dict(shared_expert_size=0), ValueError, r"shared_expert_size must be an int >= 1, got 0"),
    (dict(backend="fast"), ValueError, r"backend must be None or one of .*got 'fast'"),
    (dict(process_group=object()), ValueError, r"process_group must be a torch.distributed ProcessGroup whose size "
                                                r"divides num_experts=4, got <object"),
])
def test_bad_arguments(kw, error, message):
    args = {"hidden_size": 8, "intermediate_size": 16, "num_experts": 4, "top_k": 2, **kw}
    with pytest.raises(error, match=message):
        fnn.MoE(**args)


def test_torch_compile_fullgraph():
    moe = randomize(fnn.MoE(16, 24, 4, 2, capacity_factor=1.0, z_loss_coef=0.01, shared_expert_size=8))
    twin = copy.deepcopy(moe)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 9, 16)
    out = compiled(x)
    want = moe(x)
    torch.testing.assert_close(out, want, **TOL)
    torch.testing.assert_close(twin.aux_loss, moe.aux_loss, **TOL)  # the compiled call keeps the stats too
    assert torch.equal(twin.last_routing.counts, moe.last_routing.counts)
    ((out * out).sum() + twin.aux_loss).backward()
    ((want * want).sum() + moe.aux_loss).backward()
    for (name, a), b in zip(twin.named_parameters(), moe.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
