"""The MoE CPU kernels (torch.ops.fastlm.moe_router_*, moe_permute_*, moe_unpermute_*,
grouped_linear_*) called directly, against float64 formulas written here from the spec
(the docstrings of fastlm/ops/moe_router.py, moe_permute.py, grouped_linear.py), and their backwards against torch.autograd on float64 reimplementations.
Outputs are NaN-prefilled by conftest (deterministic fill of torch.empty, ours included), so an
element a kernel forgets to write fails; shapes and dtypes are checked on every output.
"""
import pytest
import torch
import torch.nn.functional as F

import fastlm  # noqa: F401  (imports fastlm.ops: registers the Python layer's fake impls, where written)
from fastlm import _ext
from numerics import assert_close

pytestmark = pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="extension not built")
ops = torch.ops.fastlm
F32_TOL = dict(rtol=1e-4, atol=1e-5)


def f32_tol(ref):
    """fp32 tolerance for long reductions (GEMMs over K or Nw, sums over rows): atol relative to
    the output's scale, since an element that cancels to near 0 keeps the rounding of its terms."""
    return dict(rtol=1e-4, atol=1e-5 * max(1.0, ref.abs().max().item() if ref.numel() else 1.0))


# ------------------------------------------------------------------------------------- router
def separated_logits(T, E, dtype=torch.float32):
    """Random logits whose scores are well apart within each row (a random permutation of
    spread-out values in [-4, 4]), so the fp64 oracle and the fp32 kernel select the same
    experts; ties are tested separately with exact duplicates."""
    gaps = 0.2 + torch.rand(T, E, dtype=torch.float64)
    vals = gaps.cumsum(-1)
    span = (vals[:, -1:] - vals[:, :1]).clamp_min(1e-9)
    vals = (vals - vals.mean(-1, keepdim=True)) / span * 8 if E > 1 else torch.randn(T, 1, dtype=torch.float64)
    perm = torch.argsort(torch.rand(T, E), dim=-1)
    return vals.gather(1, perm).to(dtype)


def capacity_mask(order, E, capacity):
    """GShard slot-major keep mask of the (T, k) selection."""
    T, k = order.shape
    keep = torch.ones(T, k, dtype=torch.bool)
    if capacity < 0:
        return keep
    used = [0] * E
    for slot in range(k):
        for t in range(T):
            e = int(order[t, slot])
            if used[e] < capacity:
                used[e] += 1
            else:
                keep[t, slot] = False
    return keep


def router_ref(logits, k, sigmoid, normalize, capacity):
    """float64 oracle; differentiable in logits (selection and drops are constants)."""
    l = logits.double() if not logits.requires_grad else logits
    T, E = l.shape
    soft = torch.softmax(l, -1)
    s = torch.sigmoid(l) if sigmoid else soft
    order = torch.sort(s.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    w = s.gather(1, order)
    if normalize:
        w = w / w.sum(-1, keepdim=True)
    keep = capacity_mask(order, E, capacity)
    w = torch.where(keep, w, torch.zeros_like(w))
    ids = torch.where(keep, order, torch.full_like(order, -1))
    f = torch.bincount(order.flatten(), minlength=E).double() / max(T, 1)
    p = s / s.sum(-1, keepdim=True) if sigmoid else soft
    aux = E * (f * p.sum(0) / max(T, 1)).sum()
    z = (torch.logsumexp(l, -1) ** 2).sum() / max(T, 1)
    counts = torch.bincount(order[keep].flatten(), minlength=E)
    return ids, w, counts, aux, z


def check_router_fwd(logits, k, sigmoid, normalize, capacity):
    T, E = logits.shape
    ids, w, counts, aux, z = ops.moe_router_fwd(logits, k, sigmoid, normalize, capacity)
    rids, rw, rcounts, raux, rz = router_ref(logits, k, sigmoid, normalize, capacity)
    assert ids.dtype == torch.int32 and ids.shape == (T, k)
    assert w.dtype == torch.float32 and w.shape == (T, k)
    assert counts.dtype == torch.int32 and counts.shape == (E,)
    assert aux.dtype == z.dtype == torch.float32 and aux.shape == z.shape == ()
    assert torch.equal(ids.long(), rids), (ids, rids)
    assert torch.equal(counts.long(), rcounts)
    assert_close("weights", w, rw, fp32_tol=F32_TOL)
    assert (w[ids < 0] == 0).all()
    assert_close("aux_loss", aux, raux, fp32_tol=F32_TOL)
    assert_close("z_loss", z, rz, fp32_tol=F32_TOL)
    return ids


def check_router_bwd(logits, k, sigmoid, normalize, capacity):
    T, E = logits.shape
    gw = torch.randn(T, k)
    ga, gz = torch.randn(()), torch.randn(())
    grad = ops.moe_router_bwd(gw, ga, gz, logits, k, sigmoid, normalize, capacity)
    assert grad.dtype == logits.dtype and grad.shape == (T, E) and grad.is_contiguous()
    l64 = logits.detach().double().requires_grad_()
    _, w, _, aux, z = router_ref(l64, k, sigmoid, normalize, capacity)
    loss = (w * gw.double()).sum() + aux * ga.double() + z * gz.double()
    (ref,) = torch.autograd.grad(loss, l64) if T else (torch.zeros(T, E, dtype=torch.float64),)
    if logits.dtype == torch.float32:
        assert_close("grad_logits", grad, ref, fp32_tol=F32_TOL)
    else:  # fp32 math rounded once: the baseline is the oracle rounded to bf16
        assert_close("grad_logits", grad, ref, baseline=ref.to(logits.dtype), kind="grad")


ROUTER_CASES = [  # (T, E, k, capacity)
    (37, 8, 1, -1),
    (37, 8, 2, -1),
    (64, 8, 2, 12),   # tight: drops (64 * 2 / 8 = 16 per expert on average)
    (64, 8, 2, 0),    # everything dropped
    (33, 6, 6, -1),   # k = E
    (50, 6, 6, 30),   # k = E with drops
    (19, 1, 1, -1),   # one expert
    (19, 1, 1, 5),
    (200, 64, 4, 9),
    (0, 8, 2, -1),    # no tokens
    (0, 8, 2, 3),
]


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("sigmoid", [False, True], ids=["softmax", "sigmoid"])
@pytest.mark.parametrize("T,E,k,capacity", ROUTER_CASES, ids=str)
def test_router(T, E, k, capacity, sigmoid, normalize):
    logits = separated_logits(T, E)
    check_router_fwd(logits, k, sigmoid, normalize, capacity)
    check_router_bwd(logits, k, sigmoid, normalize, capacity)


@pytest.mark.parametrize("sigmoid", [False, True], ids=["softmax", "sigmoid"])
def test_router_bf16_and_strided(sigmoid):
    # bf16 logits read as bf16, computed in fp32: the oracle sees the same rounded values.
    logits = separated_logits(45, 16).to(torch.bfloat16)
    check_router_fwd(logits, 3, sigmoid, True, 10)
    check_router_bwd(logits, 3, sigmoid, True, 10)
    # transposed (column stride != 1) and row-strided views
    wide = separated_logits(16, 45).t()
    assert wide.stride(1) != 1
    check_router_fwd(wide, 2, sigmoid, False, 7)
    check_router_bwd(wide, 2, sigmoid, False, 7)
    rows = separated_logits(40, 24)[::2, 3:19]
    check_router_fwd(rows, 4, sigmoid, True, -1)
    check_router_bwd(rows, 4, sigmoid, True, -1)


@pytest.mark.parametrize("sigmoid", [False, True], ids=["softmax", "sigmoid"])
def test_router_ties(sigmoid):
    # Exact duplicates: the lower expert index goes first (stable descending sort).
    T, E = 24, 8
    base = separated_logits(T, 4)
    logits = torch.cat([base, base], dim=1)[:, torch.randperm(E)]  # every value twice per row
    logits[:3] = 0.5  # whole rows tied
    for k in (1, 2, 3, 8):
        ids = check_router_fwd(logits, k, sigmoid, True, -1)
        check_router_bwd(logits, k, sigmoid, True, 5)
    assert ids[0].tolist() == list(range(E))


def test_router_nan_propagates():
    logits = separated_logits(6, 8)
    logits[2, 3] = float("nan")
    ids, w, counts, aux, z = ops.moe_router_fwd(logits, 2)
    assert torch.isnan(w[2]).all() and not torch.isnan(w[[0, 1, 3, 4, 5]]).any()
    assert ((ids >= 0) & (ids < 8)).all() and int(counts.sum()) == 12
    assert torch.isnan(z)
    ops.moe_router_bwd(torch.randn(6, 2), torch.ones(()), torch.ones(()), logits, 2, False, True, -1)


def test_router_deterministic_across_threads():
    logits = torch.randn(3000, 32)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.moe_router_fwd(logits, 4, False, True, 300)
        g1 = ops.moe_router_bwd(torch.ones(3000, 4), torch.ones(()), torch.ones(()), logits, 4, False, True, 300)
        torch.set_num_threads(max(2, prev))
        many = ops.moe_router_fwd(logits, 4, False, True, 300)
        g2 = ops.moe_router_bwd(torch.ones(3000, 4), torch.ones(()), torch.ones(()), logits, 4, False, True, 300)
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(one, many):
        assert torch.equal(a, b)
    assert torch.equal(g1, g2)


# ---------------------------------------------------------------------------- permute / unpermute
def permute_ref(x, ids, E):
    """float64 oracle of moe_permute_fwd: (x_sorted, row_index, offsets); differentiable in x."""
    T, k = ids.shape
    flat = ids.flatten().long()
    key = torch.where(flat < 0, torch.full_like(flat, E), flat)
    order = torch.sort(key, stable=True).indices  # assignment flat indices, expert-ascending
    kept = int((flat >= 0).sum())
    row_index = torch.full((T * k,), -1, dtype=torch.long)
    row_index[order[:kept]] = torch.arange(kept)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(flat[flat >= 0], minlength=E).cumsum(0)])
    sorted_ = torch.cat([x[order[:kept] // k], x.new_zeros(T * k - kept, x.shape[1])])
    return sorted_, row_index.view(T, k), offsets


def unpermute_ref(y, row_index, w):
    """float64 oracle of moe_unpermute_fwd; differentiable in y and w."""
    mask = row_index >= 0
    rows = y[row_index.clamp_min(0).long()]  # (T, k, H)
    return (rows * (w * mask).unsqueeze(-1)).sum(1)


def random_ids(T, k, E, drop=0.25):
    ids = torch.argsort(torch.rand(T, E), dim=-1)[:, :k] if k <= E else torch.randint(0, E, (T, k))  # distinct per token
    ids[torch.rand(T, k) < drop] = -1
    return ids.to(torch.int32)


PERMUTE_CASES = [  # (T, k, E, H, kind)
    (37, 2, 8, 48, "random"),
    (64, 1, 4, 33, "random"),
    (41, 3, 5, 97, "one_expert"),
    (29, 2, 7, 16, "empty_experts"),
    (30, 4, 6, 20, "all_dropped"),
    (1, 2, 3, 5, "random"),
    (0, 2, 3, 8, "random"),
    (300, 2, 16, 129, "random"),
    (1500, 2, 16, 40, "random"),        # several counting-sort chunks, in parallel
    (1500, 2, 16, 40, "empty_experts"),
]


def make_ids(T, k, E, kind):
    if kind == "one_expert":
        ids = torch.full((T, k), 2, dtype=torch.int32)
        ids[:, 1:] = -1
        return ids
    ids = random_ids(T, k, E)
    if kind == "empty_experts":
        ids[(ids == 0) | (ids == 3) | (ids == E - 1)] = -1
    if kind == "all_dropped":
        ids[:] = -1
    return ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,k,E,H,kind", PERMUTE_CASES, ids=str)
def test_permute_roundtrip(T, k, E, H, kind, dtype):
    x = torch.randn(T, H, dtype=dtype)
    ids = make_ids(T, k, E, kind)
    xs, ri, off = ops.moe_permute_fwd(x, ids, E)
    rxs, rri, roff = permute_ref(x.double(), ids, E)
    assert xs.dtype == dtype and xs.shape == (T * k, H)
    assert ri.dtype == torch.int32 and ri.shape == (T, k) and off.dtype == torch.int32 and off.shape == (E + 1,)
    assert torch.equal(ri.long(), rri) and torch.equal(off.long(), roff)
    assert torch.equal(xs.double(), rxs)  # copies: exact, zero tail included
    if kind == "empty_experts" and T:
        assert off[1] == off[0] and off[4] == off[3]

    # backward of permute: grad_x[t] = sum of its rows' grads (autograd on float64 index ops)
    gs = torch.randn(T * k, H, dtype=dtype)
    gx = ops.moe_permute_bwd(gs, ri)
    x64 = x.double().requires_grad_()
    (ref_gx,) = torch.autograd.grad(permute_ref(x64, ids, E)[0], x64, gs.double()) if T else (x64.detach() * 0,)
    base_gx = torch.zeros(T, H, dtype=dtype).index_add_(0, torch.arange(T).repeat_interleave(k)[ri.flatten() >= 0],
                                                      gs[ri.flatten()[ri.flatten() >= 0].long()])
    assert gx.dtype == dtype and gx.shape == (T, H)
    assert_close("permute grad_x", gx, ref_gx, base_gx, kind="grad")

    # unpermute: weighted sum back per token; roundtrip of the identity weights gives x * (#kept slots)
    w = torch.rand(T, k)
    out = ops.moe_unpermute_fwd(xs, ri, w)
    ref = unpermute_ref(xs.double(), ri, w.double())
    base = unpermute_ref(xs, ri, w.to(dtype))
    assert out.dtype == dtype and out.shape == (T, H)
    assert_close("unpermute out", out, ref, base)
    ones = ops.moe_unpermute_fwd(xs, ri, torch.ones(T, k))
    assert_close("roundtrip", ones, x.double() * (ri >= 0).sum(1, keepdim=True), x * (ri >= 0).sum(1, keepdim=True))

    # unpermute backward against autograd
    go = torch.randn(T, H, dtype=dtype)
    gy, gw = ops.moe_unpermute_bwd(go, xs, ri, w)
    y64, w64 = xs.double().requires_grad_(), w.double().requires_grad_()
    if T:
        ref_gy, ref_gw = torch.autograd.grad(unpermute_ref(y64, ri, w64), (y64, w64), go.double())
    else:
        ref_gy, ref_gw = torch.zeros(0, H, dtype=torch.float64), torch.zeros(0, k, dtype=torch.float64)
    yb, wb = xs.detach().clone().requires_grad_(), w.to(dtype).requires_grad_()
    base_gy, base_gw = torch.autograd.grad(unpermute_ref(yb, ri, wb), (yb, wb), go) if T else (ref_gy, ref_gw)
    assert gy.dtype == dtype and gy.shape == (T * k, H) and gw.dtype == torch.float32 and gw.shape == (T, k)
    assert_close("unpermute grad_y", gy, ref_gy, base_gy, kind="grad")
    assert_close("unpermute grad_w", gw, ref_gw, fp32_tol=f32_tol(ref_gw))  # fp32 dots of exact (bf16) inputs
    assert (gw[ri < 0] == 0).all() and (gy[off[-1]:] == 0).all()


def test_unpermute_strided_and_larger_rows():
    # y_sorted with more rows than referenced, non-contiguous weights and row_index
    T, k, H = 20, 2, 24
    y = torch.randn(60, 2 * H)[:, ::2]
    ri = torch.randperm(60)[: T * k].view(k, T).t().to(torch.int32)
    ri[3, 1] = -1
    w = torch.rand(k, T).t()
    out = ops.moe_unpermute_fwd(y, ri, w)
    assert_close("out", out, unpermute_ref(y.double(), ri, w.double()), fp32_tol=F32_TOL)
    go = torch.randn(T, H)
    gy, gw = ops.moe_unpermute_bwd(go, y, ri, w)
    y64, w64 = y.double().requires_grad_(), w.double().requires_grad_()
    ref_gy, ref_gw = torch.autograd.grad(unpermute_ref(y64, ri, w64), (y64, w64), go.double())
    assert_close("grad_y", gy, ref_gy, fp32_tol=F32_TOL)
    assert_close("grad_w", gw, ref_gw, fp32_tol=F32_TOL)


# ------------------------------------------------------------------------------- grouped linear
ACTS = ["none", "gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu"]


def _act(z, activation):
    gelu = lambda t: 0.5 * t * torch.special.erfc(-t * 0.7071067811865476) if t.dtype == torch.float64 else F.gelu(t)  # noqa: E731
    fns = {"none": lambda t: t, "gelu": gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
           "relu": F.relu, "silu": F.silu}
    if activation in ("swiglu", "geglu"):
        g, u = z.chunk(2, dim=-1)
        return (F.silu(g) if activation == "swiglu" else gelu(g)) * u
    return fns[activation](z)


def grouped_ref(x, w, offsets, b, activation, at_pre=None):
    """Per-expert loop in plain torch (any dtype, differentiable); rows past offsets[E] are 0.
    at_pre: evaluate the activation (and its derivative) at these pre-activation values instead of
    x @ w.T + b, gradients still flowing to x, w, b: the contract of the backward, which is given pre."""
    N = x.shape[0]
    width = w.shape[1] // 2 if activation in ("swiglu", "geglu") else w.shape[1]
    outs, pres = [], []
    for e in range(w.shape[0]):
        r0, r1 = int(offsets[e]), int(offsets[e + 1])
        p = x[r0:r1] @ w[e].t()
        if b is not None:
            p = p + b[e]
        if at_pre is not None:
            p = p + (at_pre[r0:r1].to(p.dtype) - p).detach()
        pres.append(p)
        outs.append(_act(p, activation))
    used = int(offsets[-1])
    outs.append(x.new_zeros(N - used, width))
    return torch.cat(outs), torch.cat(pres) if pres else x.new_zeros(0, w.shape[1])


def make_offsets(counts, N):
    off = torch.zeros(len(counts) + 1, dtype=torch.int32)
    off[1:] = torch.tensor(counts, dtype=torch.int32).cumsum(0)
    assert off[-1] <= N
    return off


GROUPED_CASES = [  # (counts per expert, N, K, Nw)
    ([5, 0, 1, 9, 0, 3], 21, 24, 40),   # empty and one-row experts, 3 tail rows
    ([7, 6, 4], 17, 33, 18),             # no tail
    ([0, 0, 0], 5, 8, 6),                # nothing routed
    ([1], 1, 7, 2),                      # one expert, one row
    ([40, 1, 23], 70, 64, 130),          # wider
    ([300, 0, 170, 1], 480, 32, 260),    # parallel epilogue / grad pass, many row blocks per expert
    ([9, 4], 14, 8, 4200),               # more than one column chunk (2048) per row
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("counts,N,K,Nw", GROUPED_CASES, ids=str)
def test_grouped_linear(counts, N, K, Nw, activation, has_bias, dtype):
    E = len(counts)
    gated = activation in ("swiglu", "geglu")
    width = Nw // 2 if gated else Nw
    offsets = make_offsets(counts, N)
    x = torch.randn(N, K, dtype=dtype)
    w = (torch.randn(E, Nw, K) / K**0.5).to(dtype)
    b = torch.randn(E, Nw, dtype=dtype) if has_bias else None
    out, pre = ops.grouped_linear_fwd(x, w, offsets, b, activation)
    assert out.dtype == dtype and out.shape == (N, width)
    used = int(offsets[-1])
    ref64, pre64 = grouped_ref(x.double(), w.double(), offsets, None if b is None else b.double(), activation)
    base, pre0 = grouped_ref(x, w, offsets, b, activation)
    assert (out[used:] == 0).all()
    if activation == "none":
        assert pre.numel() == 0
        assert_close("out", out, ref64, base, fp32_tol=f32_tol(ref64))
    else:
        # pre against the oracle; out as act(pre) of the pre the op returns (the forward goes on from
        # its rounded value, as eager does). Checking out end to end instead is ill-conditioned in
        # bf16: at gate ~ -3.4, gelu amplifies pre's rounding ~10x, and one-element cases flaked.
        assert pre.dtype == dtype and pre.shape == (N, Nw)
        assert_close("pre", pre[:used], pre64, pre0, fp32_tol=f32_tol(pre64))
        at64 = _act(pre[:used].double(), activation)
        assert_close("out", out[:used], at64, _act(pre[:used], activation), fp32_tol=f32_tol(at64))

    # backward against autograd on the float64 loop evaluated at the given pre (and plain torch in
    # the low precision)
    go = torch.randn(N, width, dtype=dtype)
    gx, gw, gb = ops.grouped_linear_bwd(go, x, w, offsets, pre, activation, has_bias)
    assert gx.dtype == gw.dtype == dtype and gx.shape == (N, K) and gw.shape == (E, Nw, K)
    assert gb.dtype == dtype and gb.shape == ((E, Nw) if has_bias else (0,))

    def grads(d):
        xs = x.detach().to(d).requires_grad_()
        ws = w.detach().to(d).requires_grad_()
        bs = b.detach().to(d).requires_grad_() if has_bias else None
        o, _ = grouped_ref(xs, ws, offsets, bs, activation, at_pre=pre if d == torch.float64 and pre.numel() else None)
        inputs = (xs, ws) + ((bs,) if has_bias else ())
        return torch.autograd.grad(o, inputs, go.to(d), allow_unused=True, materialize_grads=True)

    ref_g, base_g = grads(torch.float64), grads(dtype)
    assert_close("grad_x", gx, ref_g[0], base_g[0], kind="grad", fp32_tol=f32_tol(ref_g[0]))
    assert_close("grad_weight", gw, ref_g[1], base_g[1], kind="grad", fp32_tol=f32_tol(ref_g[1]))
    if has_bias:
        assert_close("grad_bias", gb, ref_g[2], base_g[2], kind="grad", fp32_tol=f32_tol(ref_g[2]))
    assert (gx[used:] == 0).all()
    for e, c in enumerate(counts):
        if c == 0:
            assert (gw[e] == 0).all() and (not has_bias or (gb[e] == 0).all())


def test_grouped_linear_strided_inputs():
    N, K, Nw, E = 30, 20, 16, 3
    offsets = make_offsets([10, 0, 15], N)
    x = torch.randn(K, N).t()                       # column stride != 1
    w = torch.randn(E, K, Nw).transpose(1, 2)        # last dim not contiguous
    b = torch.randn(Nw, E).t()
    out, pre = ops.grouped_linear_fwd(x, w, offsets, b, "swiglu")
    ref, _ = grouped_ref(x.double(), w.double(), offsets, b.double(), "swiglu")
    assert_close("out", out, ref, fp32_tol=f32_tol(ref))
    go = torch.randn(Nw // 2, N).t()
    gx, gw, gb = ops.grouped_linear_bwd(go, x, w, offsets, pre, "swiglu", True)
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    rg = torch.autograd.grad(grouped_ref(x64, w64, offsets, b64, "swiglu")[0], (x64, w64, b64), go.double())
    for name, g, r in zip(("grad_x", "grad_weight", "grad_bias"), (gx, gw, gb), rg):
        assert_close(name, g, r, fp32_tol=f32_tol(r))


def test_grouped_linear_no_experts_no_rows():
    out, pre = ops.grouped_linear_fwd(torch.randn(4, 8), torch.randn(0, 6, 8), torch.zeros(1, dtype=torch.int32),
                                      None, "silu")
    assert out.shape == (4, 6) and (out == 0).all() and pre.shape == (4, 6)
    gx, gw, gb = ops.grouped_linear_bwd(torch.randn(4, 6), torch.randn(4, 8), torch.randn(0, 6, 8),
                                        torch.zeros(1, dtype=torch.int32), pre, "silu", True)
    assert (gx == 0).all() and gw.shape == (0, 6, 8) and gb.shape == (0, 6)
    out, pre = ops.grouped_linear_fwd(torch.randn(0, 8), torch.randn(2, 6, 8), torch.zeros(3, dtype=torch.int32),
                                      torch.randn(2, 6), "geglu")
    assert out.shape == (0, 3) and pre.shape == (0, 6)
    gx, gw, gb = ops.grouped_linear_bwd(torch.randn(0, 3), torch.randn(0, 8), torch.randn(2, 6, 8),
                                        torch.zeros(3, dtype=torch.int32), pre, "geglu", True)
    assert gx.shape == (0, 8) and (gw == 0).all() and (gb == 0).all()


# --------------------------------------------------------------------------------- bad inputs
def test_bad_inputs():
    logits = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"moe_router_fwd: top_k must be in \[1, E\] = \[1, 4\], got 5"):
        ops.moe_router_fwd(logits, 5)
    with pytest.raises(ValueError, match=r"moe_router_fwd: top_k must be in \[1, E\] = \[1, 4\], got 0"):
        ops.moe_router_fwd(logits, 0)
    with pytest.raises(ValueError, match="moe_router_fwd: capacity must be -1 \\(none\\) or >= 0, got -2"):
        ops.moe_router_fwd(logits, 2, capacity=-2)
    with pytest.raises(TypeError, match="moe_router_fwd: logits must be float32 or bfloat16 on cpu, got Double"):
        ops.moe_router_fwd(logits.double(), 2)
    with pytest.raises(ValueError, match=r"moe_router_fwd: logits must be 2-D \(T, E\), got shape \[24\]"):
        ops.moe_router_fwd(logits.flatten(), 2)
    with pytest.raises(ValueError, match=r"moe_router_bwd: grad_weights must have shape \(6, 2\), got \[6, 3\]"):
        ops.moe_router_bwd(torch.randn(6, 3), torch.ones(()), torch.ones(()), logits, 2, False, True, -1)
    with pytest.raises(ValueError, match=r"moe_router_bwd: grad_aux must be a single value \(shape \(\)\), got shape \[2\]"):
        ops.moe_router_bwd(torch.randn(6, 2), torch.ones(2), torch.ones(()), logits, 2, False, True, -1)

    x = torch.randn(6, 8)
    ids = torch.randint(0, 4, (6, 2), dtype=torch.int32)
    with pytest.raises(TypeError, match="moe_permute_fwd: expert_ids must be int32, got Long"):
        ops.moe_permute_fwd(x, ids.long(), 4)
    with pytest.raises(ValueError, match=r"moe_permute_fwd: expert_ids must be 2-D \(T, top_k\), got shape \[12\]"):
        ops.moe_permute_fwd(x, ids.flatten(), 4)
    with pytest.raises(ValueError, match=r"moe_permute_fwd: expert_ids must have 6 rows \(T\), got shape \[5, 2\]"):
        ops.moe_permute_fwd(x, ids[:5], 4)
    bad = ids.clone()
    bad[4, 1] = 4
    with pytest.raises(ValueError, match=r"moe_permute_fwd: expert_ids must be in \[-1, num_experts\) = \[-1, 4\), got 4 at \[4, 1\]"):
        ops.moe_permute_fwd(x, bad, 4)
    bad[4, 1] = -2
    with pytest.raises(ValueError, match=r"expert_ids must be in \[-1, num_experts\) = \[-1, 4\), got -2 at \[4, 1\]"):
        ops.moe_permute_fwd(x, bad, 4)
    with pytest.raises(TypeError, match="moe_permute_fwd: x must be float32 or bfloat16 on cpu, got Half"):
        ops.moe_permute_fwd(x.half(), ids, 4)
    xs, ri, off = ops.moe_permute_fwd(x, ids, 4)
    bad_ri = ri.clone()
    bad_ri[2, 0] = 12
    with pytest.raises(ValueError, match=r"moe_unpermute_fwd: row_index must be in \[-1, 12\) \(rows of the sorted tensor\), got 12 at \[2, 0\]"):
        ops.moe_unpermute_fwd(xs, bad_ri, torch.rand(6, 2))
    with pytest.raises(ValueError, match=r"moe_permute_bwd: row_index must be in \[-1, 12\)"):
        ops.moe_permute_bwd(xs, bad_ri)
    bad_ri[2, 0] = ri[1, 1]
    with pytest.raises(ValueError, match=rf"moe_unpermute_bwd: row_index must reference each row at most once, got {int(ri[1, 1])} twice \(again at \[2, 0\]\)"):
        ops.moe_unpermute_bwd(torch.randn(6, 8), xs, bad_ri, torch.rand(6, 2))
    with pytest.raises(TypeError, match="moe_unpermute_fwd: weights must be float32, got BFloat16"):
        ops.moe_unpermute_fwd(xs, ri, torch.rand(6, 2).bfloat16())
    with pytest.raises(ValueError, match=r"moe_unpermute_fwd: weights must have shape \[6, 2\], got \[6, 3\]"):
        ops.moe_unpermute_fwd(xs, ri, torch.rand(6, 3))
    with pytest.raises(TypeError, match="moe_unpermute_bwd: grad_out has dtype BFloat16 but y_sorted has dtype Float"):
        ops.moe_unpermute_bwd(torch.randn(6, 8).bfloat16(), xs, ri, torch.rand(6, 2))

    w = torch.randn(3, 8, 5)
    x = torch.randn(10, 5)
    good = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"grouped_linear_fwd: offsets\[0\] must be 0, got 1"):
        ops.grouped_linear_fwd(x, w, torch.tensor([1, 3, 3, 7], dtype=torch.int32), None, "none")
    with pytest.raises(ValueError, match=r"grouped_linear_fwd: offsets must be nondecreasing, got offsets\[2\] = 2 < offsets\[1\] = 3"):
        ops.grouped_linear_fwd(x, w, torch.tensor([0, 3, 2, 7], dtype=torch.int32), None, "none")
    with pytest.raises(ValueError, match=r"grouped_linear_fwd: offsets\[3\] = 11 exceeds the 10 rows of x"):
        ops.grouped_linear_fwd(x, w, torch.tensor([0, 3, 3, 11], dtype=torch.int32), None, "none")
    with pytest.raises(TypeError, match="grouped_linear_fwd: offsets must be int32, got Long"):
        ops.grouped_linear_fwd(x, w, good.long(), None, "none")
    with pytest.raises(ValueError, match=r"grouped_linear_fwd: offsets must have shape \(E \+ 1,\) = \(4,\), got \[3\]"):
        ops.grouped_linear_fwd(x, w, good[:3], None, "none")
    with pytest.raises(ValueError, match="grouped_linear_fwd: a gated activation needs an even Nw .* got Nw = 7"):
        ops.grouped_linear_fwd(x, torch.randn(3, 7, 5), good, None, "swiglu")
    with pytest.raises(ValueError, match="grouped_linear_bwd: a gated activation needs an even Nw .* got Nw = 7"):
        ops.grouped_linear_bwd(torch.randn(10, 3), x, torch.randn(3, 7, 5), good, torch.randn(10, 7), "geglu", False)
    with pytest.raises(ValueError, match="grouped_linear_fwd: unknown activation 'tanh'"):
        ops.grouped_linear_fwd(x, w, good, None, "tanh")
    with pytest.raises(ValueError, match=r"grouped_linear_fwd: weight must have shape \(E, Nw, 5\) to match x's K, got \[3, 8, 4\]"):
        ops.grouped_linear_fwd(x, torch.randn(3, 8, 4), good, None, "none")
    with pytest.raises(ValueError, match=r"grouped_linear_fwd: bias must have shape \(3, 8\), got \[8\]"):
        ops.grouped_linear_fwd(x, w, good, torch.randn(8), "none")
    with pytest.raises(TypeError, match="grouped_linear_fwd: weight has dtype BFloat16 but x has dtype Float"):
        ops.grouped_linear_fwd(x, w.bfloat16(), good, None, "none")
    with pytest.raises(ValueError, match=r"grouped_linear_bwd: pre must have shape \(10, 8\) for activation 'silu', got \[0\]"):
        ops.grouped_linear_bwd(torch.randn(10, 8), x, w, good, torch.empty(0), "silu", False)
    with pytest.raises(ValueError, match=r"grouped_linear_bwd: grad_out must have shape \(10, 4\), got \[10, 8\]"):
        ops.grouped_linear_bwd(torch.randn(10, 8), x, w, good, torch.randn(10, 8), "swiglu", False)


# ------------------------------------------------------------------------------------ opcheck
def _has_fake(name):
    try:
        from torch._library.simple_registry import singleton

        return singleton.find(f"fastlm::{name}").fake_impl.kernel is not None
    except Exception:  # noqa: BLE001  (a private API: without it, assume no fake)
        return False


def _opcheck(name, args):
    # Fake impls belong to the Python layer (fastlm/ops/moe_*.py); until it registers them, the
    # fake-tensor and AOT checks cannot run, and only the schema / autograd-registration ones do.
    utils = None if _has_fake(name) else ("test_schema", "test_autograd_registration")
    kwargs = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(getattr(ops, name).default, args, **kwargs)


def test_opcheck():
    logits = torch.randn(12, 6)
    _opcheck("moe_router_fwd", (logits, 2, False, True, 3))
    _opcheck("moe_router_fwd", (logits.bfloat16(), 3, True, False, -1))
    _opcheck("moe_router_bwd", (torch.randn(12, 2), torch.randn(()), torch.randn(()), logits, 2, True, True, 3))
    ids = ops.moe_router_fwd(logits, 2, False, True, 3)[0]
    x = torch.randn(12, 10)
    _opcheck("moe_permute_fwd", (x, ids, 6))
    xs, ri, off = ops.moe_permute_fwd(x, ids, 6)
    _opcheck("moe_permute_bwd", (torch.randn(24, 10), ri))
    _opcheck("moe_unpermute_fwd", (xs, ri, torch.rand(12, 2)))
    _opcheck("moe_unpermute_bwd", (torch.randn(12, 10), xs, ri, torch.rand(12, 2)))
    w = torch.randn(6, 8, 10)
    _opcheck("grouped_linear_fwd", (xs, w, off, torch.randn(6, 8), "swiglu"))
    _opcheck("grouped_linear_fwd", (xs, w, off, None, "none"))
    assert torch.equal(ops.grouped_linear_fwd(xs, w, off, None)[0], ops.grouped_linear_fwd(xs, w, off, None, "none")[0])
    out, pre = ops.grouped_linear_fwd(xs, w, off, None, "gelu")
    _opcheck("grouped_linear_bwd", (torch.randn(24, 8), xs, w, off, pre, "gelu", True))
    _opcheck("grouped_linear_bwd", (torch.randn(24, 8), xs, w, off, torch.empty(0), "none", False))


def test_expanded_upstream_grads():
    # autograd may hand over expanded (stride-0) gradients, e.g. from a .sum(): same results as contiguous ones
    N, K, Nw = 10, 6, 8
    off = make_offsets([4, 0, 5], N)
    x, w = torch.randn(N, K), torch.randn(3, Nw, K)
    go = torch.randn(1, Nw).expand(N, Nw)
    for act in ("none", "silu"):
        _, pre = ops.grouped_linear_fwd(x, w, off, None, act)
        for a, b in zip(ops.grouped_linear_bwd(go, x, w, off, pre, act, True),
                        ops.grouped_linear_bwd(go.contiguous(), x, w, off, pre, act, True)):
            assert torch.equal(a, b)
    xs, ri, _ = ops.moe_permute_fwd(x, random_ids(N, 2, 3), 3)
    g, wt = torch.randn(1, K).expand(N, K), torch.rand(1, 2).expand(N, 2)
    for a, b in zip(ops.moe_unpermute_bwd(g, xs, ri, wt), ops.moe_unpermute_bwd(g.contiguous(), xs, ri, wt.contiguous())):
        assert torch.equal(a, b)
    gs = torch.randn(1, K).expand(N * 2, K)
    assert torch.equal(ops.moe_permute_bwd(gs, ri), ops.moe_permute_bwd(gs.contiguous(), ri))
    logits, gw = torch.randn(N, 3), torch.randn(1, 2)
    assert torch.equal(ops.moe_router_bwd(gw.expand(N, 2), torch.ones(()), torch.ones(()), logits, 2, False, True, 3),
                       ops.moe_router_bwd(gw.expand(N, 2).contiguous(), torch.ones(()), torch.ones(()), logits, 2, False, True, 3))
