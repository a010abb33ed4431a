"""moe_router against an independent float64 oracle (HF Mixtral's routing and loss formulas, a
plain loop for GShard capacity): ids, weights, counts, both losses and the logits' gradient."""
import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import _ext
from fastlm.ops import moe_router
from moe_backends import backends_once, moe_backend_dtypes, with_cases
from numerics import assert_close

HAS_KERNEL = _ext.HAS_EXTENSION and hasattr(torch.ops.fastlm, "moe_router_fwd")
BACKEND_DTYPES = moe_backend_dtypes("moe_router_fwd", "moe_router")
BACKENDS = backends_once(BACKEND_DTYPES)


def oracle(logits, k, sigmoid=False, normalize=True, capacity=None):
    """(ids, weights, counts, aux, z) by the formulas: torch.topk on the scores, HF's
    load_balancing_loss_func for one layer, ST-MoE's z-loss, GShard's slot-major capacity loop."""
    t, e = logits.shape
    s = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, -1)
    w, ids = torch.topk(s, k, dim=-1)
    if normalize:
        w = w / w.sum(-1, keepdim=True)
    keep = torch.ones_like(ids, dtype=torch.bool)
    if capacity is not None:
        used = [0] * e
        for slot in range(k):
            for tok in range(t):
                ex = int(ids[tok, slot])
                keep[tok, slot] = used[ex] < capacity
                used[ex] += int(keep[tok, slot])
    p = s / s.sum(-1, keepdim=True)
    aux = e * (F.one_hot(ids, e).to(s.dtype).mean(0).sum(0) * p.mean(0)).sum() if t else s.sum() * 0
    z = torch.logsumexp(logits, -1).square().mean() if t else s.sum() * 0
    counts = torch.bincount(ids[keep], minlength=e)
    return torch.where(keep, ids, -1), torch.where(keep, w, 0.0), counts, aux, z


def _distinct_logits(t, e, dtype):
    """Random logits whose top scores are well separated in `dtype` (no near-ties to flip)."""
    base = torch.rand(t, e).argsort(-1).double() * 0.37 + torch.rand(t, e, dtype=torch.float64) * 0.1
    return base.to(dtype)


def check(backend, device, dtype, t, e, k, **opts):
    logits = _distinct_logits(t, e, dtype)
    gw, ga, gz = torch.randn(t, k), torch.randn(()), torch.randn(())
    cap = opts.get("capacity")

    def run(fn, dt):
        x = logits.detach().to(dt).requires_grad_()
        ids, w, counts, aux, z = (t.cpu() for t in fn(x))
        loss = (w * gw.to(w.dtype)).sum() + aux * ga.to(aux.dtype) + z * gz.to(z.dtype)
        return ids, w, counts, aux, z, torch.autograd.grad(loss, x)[0]

    got = run(lambda x: moe_router(x.to(device), k, backend=backend, **opts), dtype)
    o_opts = dict(sigmoid=opts.get("score") == "sigmoid", normalize=opts.get("normalize", True), capacity=cap)
    want = run(lambda x: oracle(x, k, **o_opts), torch.float64)
    base = run(lambda x: oracle(x, k, **o_opts), dtype)
    ids, w, counts, aux, z, grad = got
    assert ids.dtype == torch.int32 and counts.dtype == torch.int32 and w.dtype == torch.float32
    assert aux.shape == () and z.shape == () and aux.dtype == z.dtype == torch.float32
    assert torch.equal(ids.long(), want[0]) and torch.equal(counts.long(), want[2])
    if cap is not None:
        assert int(counts.max()) <= cap and int(counts.sum()) == int((ids >= 0).sum())
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)  # fp32 math on bf16 rows
    for name, a, b in (("weights", w, want[1]), ("aux", aux, want[3]), ("z", z, want[4])):
        torch.testing.assert_close(a.double(), b.double(), **tol, msg=lambda m: f"{backend} {name}: {m}")
    assert_close(f"{backend} grad_logits", grad, want[5], base[5], kind="grad", atol=1e-6)


# the slow backends: top_k = E, top_k = 1 over more experts than a warp, and a mid case
@pytest.mark.parametrize("backend,device,dtype,t,e,k", with_cases(
    BACKEND_DTYPES, [(1, 1, 1), (33, 8, 2), (64, 8, 8), (97, 16, 1), (50, 3, 3)], [(50, 3, 3), (33, 40, 1)]))
def test_topk_softmax_and_sigmoid(backend, device, dtype, t, e, k):
    check(backend, device, dtype, t, e, k)
    check(backend, device, dtype, t, e, k, normalize=False)
    check(backend, device, dtype, t, e, k, score="sigmoid")
    check(backend, device, dtype, t, e, k, score="sigmoid", normalize=False)


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
def test_capacity_drops_slot_major(backend, device, dtype):
    for cap in (0, 1, 5, 9, 1000):
        check(backend, device, dtype, 40, 6, 2, capacity=cap)
    logits = torch.zeros(5, 4).index_fill_(1, torch.tensor([2]), 3.0).to(device, dtype)
    ids = moe_router(logits, 2, capacity=3, backend=backend).expert_ids
    # every token's first choice is expert 2: the first three keep it, the last two are dropped there
    assert ids[:, 0].tolist() == [2, 2, 2, -1, -1]


@pytest.mark.parametrize("backend,device,dtype", BACKENDS)
def test_ties_empty_and_nan(backend, device, dtype):
    out = moe_router(torch.zeros(3, 5, device=device), 2, backend=backend)  # all tied: lowest ids, equal weights
    assert out.expert_ids.tolist() == [[0, 1]] * 3 and torch.allclose(out.weights.cpu(), torch.full((3, 2), 0.5))
    empty = moe_router(torch.randn(0, 4, device=device), 2, backend=backend)
    assert empty.expert_ids.shape == (0, 2) and empty.counts.tolist() == [0] * 4
    assert empty.aux_loss.item() == 0 and empty.z_loss.item() == 0
    bad = torch.randn(4, 4)
    bad[1, 2] = float("nan")
    nan_out = moe_router(bad.to(device), 2, backend=backend)
    assert torch.isnan(nan_out.weights[1]).any() and torch.isnan(nan_out.aux_loss)  # propagated, not hidden


def test_jitter_and_capacity_helper():
    from fastlm.ops.moe_router import capacity_for

    torch.manual_seed(0)
    logits = torch.randn(64, 8)
    a = moe_router(logits, 2, jitter=0.5, backend="reference").weights
    assert not torch.equal(a, moe_router(logits, 2, backend="reference").weights)
    assert capacity_for(4096, 8, 2, 1.25) == 1280 and capacity_for(10, 3, 1, 1.0) == 4 and capacity_for(10, 3, 1, None) is None


def test_bad_inputs_name_argument_and_value():
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 4\] \(the number of experts\), got 5"):
        moe_router(torch.randn(3, 4), 5)
    with pytest.raises(ValueError, match=r"score must be one of softmax, sigmoid, got 'tanh'"):
        moe_router(torch.randn(3, 4), 1, score="tanh")
    with pytest.raises(ValueError, match=r"capacity must be None or an int >= 0 .*got -2"):
        moe_router(torch.randn(3, 4), 1, capacity=-2)
    with pytest.raises(ValueError, match=r"logits must be a floating-point \(tokens, experts\) tensor, got \(3,\)"):
        moe_router(torch.randn(3), 1)
    with pytest.raises(fastlm.BackendUnavailableError, match=r"dtype float64 not supported by the triton backend|no triton kernel"):
        moe_router(torch.randn(3, 4, dtype=torch.float64), 1, backend="triton")


@pytest.mark.parametrize("backend,device,dtype", BACKENDS)
def test_opcheck_and_compile(backend, device, dtype):
    logits = torch.randn(20, 6, device=device, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.fastlm.moe_router.default, (logits, 2, False, True, 5, backend))
    torch.library.opcheck(torch.ops.fastlm.moe_router.default, (logits, 3, True, False, -1, backend))
    if HAS_KERNEL and backend == "cpu":
        torch.library.opcheck(torch.ops.fastlm.moe_router_fwd.default, (logits.detach(), 2, False, True, 5))
        torch.library.opcheck(torch.ops.fastlm.moe_router_bwd.default,
                              (torch.randn(20, 2), torch.randn(()), torch.randn(()), logits.detach(), 2, False, True, 5))
    torch._dynamo.reset()

    def f(x):
        r = moe_router(x * 2, 2, capacity=6, backend=backend)
        return (r.weights * torch.arange(2.0, device=device)).sum() + r.aux_loss + 0.1 * r.z_loss

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(logits), f(logits))
    torch.testing.assert_close(torch.autograd.grad(compiled(logits), logits)[0], torch.autograd.grad(f(logits), logits)[0])
