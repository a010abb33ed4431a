"""moe_permute / moe_unpermute against float64 index math: expert-contiguous order, the dropped
tail, the weighted gather back, and gradients to x, y_sorted and the routing weights."""
import pytest
import torch

from fastlm import _ext
from fastlm.ops import moe_permute, moe_unpermute
from moe_backends import backends_once, moe_backend_dtypes, with_cases
from numerics import assert_close

HAS_KERNEL = _ext.HAS_EXTENSION and hasattr(torch.ops.fastlm, "moe_permute_fwd")
BACKEND_DTYPES = moe_backend_dtypes("moe_permute_fwd", "moe_permute")
BACKENDS = backends_once(BACKEND_DTYPES)


def routings(t, e, k):
    """Expert ids (T, k) int32 for: random distinct choices, some dropped (-1), all tokens to one
    expert, and experts left empty."""
    distinct = torch.rand(t, e).argsort(-1)[:, :k].to(torch.int32)
    dropped = torch.where(torch.rand(t, k) < 0.3, -1, distinct).to(torch.int32)
    one = torch.zeros(t, k, dtype=torch.int32)
    one[:, 1:] = -1  # top_k > 1: everything but the first slot dropped
    sparse = (distinct % 2) * (e - 1)  # only experts 0 and E-1
    return {"distinct": distinct, "dropped": dropped, "one_expert": one, "empty_experts": sparse.to(torch.int32)}


def permute_oracle(x, ids, e):
    """The rows by a plain loop: expert by expert, tokens then slots in order."""
    t, k = ids.shape
    rows, index, counts = [], torch.full((t, k), -1, dtype=torch.int32), []
    for ex in range(e):
        mine = [(tok, s) for tok in range(t) for s in range(k) if int(ids[tok, s]) == ex]
        for tok, s in mine:
            index[tok, s] = len(rows)
            rows.append(x[tok])
        counts.append(len(mine))
    tail = t * k - len(rows)
    x_sorted = torch.stack(rows + [x.new_zeros(x.shape[1])] * tail) if t * k else x.new_zeros(0, x.shape[1])
    offsets = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32)
    return x_sorted, index, offsets


# the slow backends: odd sizes with drops, and top_k = E
@pytest.mark.parametrize("backend,device,dtype,t,e,k,h", with_cases(
    BACKEND_DTYPES, [(1, 1, 1, 8), (29, 6, 2, 33), (16, 4, 4, 64), (50, 8, 3, 1)], [(29, 6, 2, 33), (16, 4, 4, 64)]))
def test_permute_matches_loop_and_grad(backend, device, dtype, t, e, k, h):
    for name, ids in routings(t, e, k).items():
        x = torch.randn(t, h, dtype=dtype, requires_grad=True)
        x_sorted, rows, offsets = (o.cpu() for o in moe_permute(x.to(device), ids.to(device), e, backend=backend))
        want, want_rows, want_offsets = permute_oracle(x.detach(), ids, e)
        assert torch.equal(x_sorted, want), name  # a copy: exact
        assert torch.equal(rows, want_rows) and torch.equal(offsets, want_offsets), name
        assert rows.dtype == offsets.dtype == torch.int32
        g = torch.randn_like(x_sorted)
        (grad,) = torch.autograd.grad(x_sorted, x, g)
        g64 = g.double()
        want_grad = torch.zeros(t, h, dtype=torch.float64)
        for tok in range(t):
            for s in range(k):
                if rows[tok, s] >= 0:
                    want_grad[tok] += g64[rows[tok, s]]
        assert_close(f"{backend} {name} grad_x", grad, want_grad, want_grad.to(dtype), kind="grad")


@pytest.mark.parametrize("backend,device,dtype,t,e,k,h", with_cases(
    BACKEND_DTYPES, [(1, 1, 1, 8), (29, 6, 2, 33), (50, 8, 3, 1)], [(29, 6, 2, 33)]))
def test_unpermute_weighted_sum_and_grads(backend, device, dtype, t, e, k, h):
    for name, ids in routings(t, e, k).items():
        _, rows, _ = moe_permute(torch.randn(t, 2, dtype=dtype), ids, e, backend="reference")
        y = torch.randn(t * k, h, dtype=dtype)
        w = torch.rand(t, k)
        g = torch.randn(t, h, dtype=dtype)

        def run(fn, dt):
            yy, ww = y.detach().to(dt).requires_grad_(), w.detach().to(
                torch.float64 if dt == torch.float64 else torch.float32).requires_grad_()
            out = fn(yy, ww)
            return (out.cpu(), *torch.autograd.grad(out, (yy, ww), g.to(out.device, out.dtype)))

        def loop(yy, ww):  # out[t] = sum_s w[t, s] * y[rows[t, s]]
            kept = (rows >= 0).to(yy.dtype).unsqueeze(-1)
            return (yy[rows.clamp(min=0).long()] * kept * ww.to(yy.dtype).unsqueeze(-1)).sum(1)

        got = run(lambda a, b: moe_unpermute(a.to(device), rows.to(device), b.to(device), backend=backend), dtype)
        want, base = run(loop, torch.float64), run(loop, dtype)
        for i, what in enumerate(("out", "grad_y", "grad_weights")):
            assert_close(f"{backend} {name} {what}", got[i], want[i], base[i], kind="out" if i == 0 else "grad",
                         atol=1e-6)
        assert got[2].dtype == torch.float32


def test_bad_inputs_name_argument_and_value():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"expert_ids must be in \[-1, 3\) \(-1: dropped\), got values in \[0, 3\]"):
        moe_permute(x, torch.tensor([[0], [1], [2], [3]], dtype=torch.int32), 3)
    with pytest.raises(TypeError, match=r"expert_ids must be an int32 \(tokens, top_k\) tensor, got torch.int64"):
        moe_permute(x, torch.zeros(4, 1, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match=r"expert_ids has 2 rows but x has 4 tokens"):
        moe_permute(x, torch.zeros(2, 1, dtype=torch.int32), 3)
    rows = torch.tensor([[0], [5]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"row_index holds row 5 but y_sorted has 2 rows"):
        moe_unpermute(torch.randn(2, 8), rows, torch.ones(2, 1))
    with pytest.raises(ValueError, match=r"weights must be torch.float32 of row_index's shape \(2, 1\), got \(2, 1\) "
                                         r"torch.bfloat16"):
        moe_unpermute(torch.randn(6, 8), rows, torch.ones(2, 1, dtype=torch.bfloat16))


@pytest.mark.parametrize("backend,device,dtype", BACKENDS)
def test_opcheck_and_compile(backend, device, dtype):
    x = torch.randn(12, 16, device=device, dtype=dtype, requires_grad=True)
    ids = routings(12, 4, 2)["dropped"].to(device)
    torch.library.opcheck(torch.ops.fastlm.moe_permute.default, (x, ids, 4, backend))
    _, rows, _ = moe_permute(x, ids, 4, backend=backend)
    y = torch.randn(24, 16, device=device, dtype=dtype, requires_grad=True)
    w = torch.rand(12, 2, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastlm.moe_unpermute.default, (y, rows, w, backend))
    if HAS_KERNEL and backend == "cpu":
        torch.library.opcheck(torch.ops.fastlm.moe_permute_fwd.default, (x.detach(), ids, 4))
        torch.library.opcheck(torch.ops.fastlm.moe_unpermute_bwd.default,
                              (torch.randn(12, 16, dtype=dtype), y.detach(), rows, w.detach()))
    torch._dynamo.reset()

    def f(a, b):
        xs, r, _ = moe_permute(a * 2, ids, 4, backend=backend)
        return moe_unpermute(xs * 3 + 1, r, b, backend=backend).float().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w), f(x, w))
    for a, b in zip(torch.autograd.grad(compiled(x, w), (x, w)), torch.autograd.grad(f(x, w), (x, w))):
        torch.testing.assert_close(a, b)
