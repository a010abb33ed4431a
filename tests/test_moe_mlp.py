"""moe_mlp end to end against a float64 eager MoE written as HF Mixtral's block is (a loop over
experts with index_add), including capacity drops, top_k = E and plain activations; out, losses and
every gradient."""
import pytest
import torch
import torch.nn.functional as F

from fastlm.ops import moe_mlp
from moe_backends import F16, BF16, moe_backend_dtypes, with_cases
from numerics import assert_close

# every stage on the one backend: its dtypes are grouped_linear's (the CUDA GEMM is 16-bit only)
BACKEND_DTYPES = moe_backend_dtypes("grouped_linear_fwd", "grouped_linear", gpu_dtypes=(F16, BF16))


def eager_moe(x, router_w, w1, w2, k, activation="swiglu", capacity=None):
    """HF Mixtral's routing and experts loop (plus GShard's slot-major capacity), plain autograd."""
    logits = F.linear(x, router_w)
    p = torch.softmax(logits.float() if x.dtype != torch.float64 else logits, -1)
    w, ids = torch.topk(p, k, -1)
    w = w / w.sum(-1, keepdim=True)
    keep = torch.ones_like(ids, dtype=torch.bool)
    if capacity is not None:
        used = [0] * router_w.shape[0]
        for s in range(k):
            for t in range(x.shape[0]):
                keep[t, s] = used[int(ids[t, s])] < capacity
                used[int(ids[t, s])] += int(keep[t, s])
    out = torch.zeros_like(x)
    for e in range(router_w.shape[0]):
        tok, slot = torch.where((ids == e) & keep)
        h = F.linear(x[tok], w1[e])
        if activation == "swiglu":
            gate, up = h.chunk(2, -1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        out = out.index_add(0, tok, (F.linear(h, w2[e]) * w[tok, slot, None]).to(x.dtype))
    e = router_w.shape[0]
    aux = e * (F.one_hot(ids, e).to(p.dtype).mean(0).sum(0) * p.mean(0)).sum()
    z = torch.logsumexp(logits.to(p.dtype), -1).square().mean()
    return out, aux, z


# the slow backends: capacity drops with a gated expert, and top_k = E
@pytest.mark.parametrize("backend,device,dtype,t,h,inner,e,k,activation,capacity", with_cases(BACKEND_DTYPES, [
    (37, 16, 24, 4, 2, "swiglu", None), (64, 32, 16, 8, 2, "swiglu", 10), (9, 8, 8, 3, 3, "swiglu", None),
    (20, 16, 32, 5, 1, "gelu", None)], [(40, 16, 16, 8, 2, "swiglu", 6), (9, 8, 8, 3, 3, "gelu", None)]))
def test_matches_eager_moe(backend, device, dtype, t, h, inner, e, k, activation, capacity):
    gated = activation == "swiglu"
    x = torch.randn(t, h, dtype=dtype)
    router = torch.randn(e, h, dtype=dtype)
    for _ in range(200):  # redraw tokens whose top-(k+1) logits nearly tie: 16-bit rounding could flip the choice
        top = torch.sort(F.linear(x, router).double(), -1, descending=True).values[:, :k + 1]
        close = (top[:, :-1] - top[:, 1:]).min(-1).values < 0.05 if k < e else torch.zeros(t, dtype=torch.bool)
        if not close.any():
            break
        x[close] = torch.randn(int(close.sum()), h, dtype=dtype)
    params = (router, torch.randn(e, (2 if gated else 1) * inner, h, dtype=dtype) / h ** 0.5,
              torch.randn(e, h, inner, dtype=dtype) / inner ** 0.5)
    grad = torch.randn(t, h, dtype=dtype)
    ca, cz = torch.randn(()).item(), torch.randn(()).item()

    def run(fn, dt):
        args = [a.detach().to(dt).requires_grad_() for a in (x,) + params]
        out, aux, z = fn(*args)
        loss = (out * grad.to(out.dtype)).sum() + ca * aux + cz * z
        return (out, aux, z, *torch.autograd.grad(loss, args))

    def ours(a, rw, w1, w2):
        r = moe_mlp(a.to(device), rw.to(device), w1.to(device), w2.to(device), k, activation=activation,
                    capacity=capacity, backend=backend)
        return r.out.cpu(), r.routing.aux_loss.cpu(), r.routing.z_loss.cpu()

    got = run(ours, dtype)
    want = run(lambda *a: eager_moe(*a, k, activation, capacity), torch.float64)
    base = run(lambda *a: eager_moe(*a, k, activation, capacity), dtype)
    names = ("out", "aux", "z", "grad_x", "grad_router", "grad_w_gate_up", "grad_w_down")
    for i, name in enumerate(names):
        g, b = (got[i], base[i]) if i not in (1, 2) else (got[i].to(dtype), base[i].to(dtype))  # fp32 losses of
        # 16-bit logits: judged by the 16-bit rule (their error is the logits' rounding)
        assert_close(f"{backend} {name}", g, want[i], b, kind="out" if i < 3 else "grad", atol=1e-5,
                     fp32_tol=dict(rtol=1e-5, atol=1e-5) if i < 3 else dict(rtol=1e-4, atol=1e-5))


def test_shapes_and_bad_input():
    x = torch.randn(2, 5, 8)
    out = moe_mlp(x, torch.randn(4, 8), torch.randn(4, 12, 8), torch.randn(4, 8, 6), 2, backend="reference")
    assert out.out.shape == x.shape and out.router_logits.shape == (10, 4) and out.routing.expert_ids.shape == (10, 2)
    empty = torch.randn(0, 8, requires_grad=True)  # no tokens: empty output, zero losses, gradients flow
    r = moe_mlp(empty, torch.randn(4, 8), torch.randn(4, 12, 8), torch.randn(4, 8, 6), 2, backend="reference")
    (r.out.sum() + r.routing.aux_loss + r.routing.z_loss).backward()
    assert r.out.shape == (0, 8) and empty.grad.shape == (0, 8) and r.routing.aux_loss.item() == 0
    with pytest.raises(ValueError, match=r"w_down must be \(E, H, I\) and w_gate_up \(E, 2I, H\), got w_gate_up "
                                         r"\(4, 6, 8\) and w_down \(4, 8, 6\)"):
        moe_mlp(x, torch.randn(4, 8), torch.randn(4, 6, 8), torch.randn(4, 8, 6), 2)
