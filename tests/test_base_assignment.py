"""base_assignment on every backend: exactly balanced, optimal (brute force on small problems, the
sorted closed form for two experts) within T * eps, an eps-complementary-slackness certificate
checked in float64 from the returned prices, T not divisible by E, custom capacity with zeros,
ties, E = 1, T = 0; the kernels' invalid result (non-finite scores, round cap); the errors it
raises; opcheck and compile per backend."""
import functools

import pytest
import torch

from backends import GPU
from fastlm.ops import base_assignment
from fastlm.ops.base_assignment import default_capacity
from moe_backends import SLOW, backends_once, moe_backend_dtypes, with_cases

BACKEND_DTYPES = moe_backend_dtypes("moe_base_assignment", "base_assignment")
BACKENDS = backends_once(BACKEND_DTYPES)
F32 = torch.float32


def brute_force(a, capacity):
    """The optimum over every balanced assignment: token by token, each remaining capacity vector once."""
    rows = a.tolist()

    @functools.cache
    def best(i, left):
        if i == len(rows):
            return 0.0
        return max(rows[i][e] + best(i + 1, left[:e] + (c - 1,) + left[e + 1:]) for e, c in enumerate(left) if c)

    return best(0, tuple(capacity))


def total(a, ids):
    return a[torch.arange(a.shape[0]), ids.long()].sum().item()


def default_eps(a):
    return 1e-4 * float(a.max() - a.min()) / a.shape[1]


def solve(backend, device, scores, **kw):
    ids, prices = base_assignment(scores.to(device), backend=backend, **kw)
    return ids.cpu(), prices.cpu()


@pytest.mark.parametrize("backend,device,dtype,t,e", with_cases(
    BACKEND_DTYPES, [(1, 1), (6, 3), (7, 3), (8, 4), (9, 2), (5, 4), (10, 3)], [(5, 4)]))
def test_optimal_and_balanced_on_small_problems(backend, device, dtype, t, e):
    a = torch.randn(t, e).to(dtype)
    ids, prices = solve(backend, device, a)
    capacity = default_capacity(t, e)
    assert ids.dtype == torch.int32 and ids.shape == (t,) and prices.shape == (e,) and prices.dtype == dtype
    assert torch.bincount(ids.long(), minlength=e).tolist() == capacity
    a64 = a.double()
    assert total(a64, ids) == pytest.approx(brute_force(a64, capacity), abs=t * default_eps(a64) + 1e-9)


@pytest.mark.parametrize("backend,device,dtype", [p for p in BACKENDS])
def test_eps_certificate_from_the_returned_prices(backend, device, dtype):
    """eps-complementary slackness in float64: each token's value at its expert's price is within
    eps of its best alternative, hence the total within T * eps of the dual bound (the optimum)."""
    t, e = (37, 5) if backend in SLOW else (500, 6)
    cap = default_capacity(t, e)
    cap[0], cap[1] = cap[0] + cap[1], 0  # an expert without slots, one with twice as many
    a = torch.randn(t, e)
    eps = 1e-3
    ids, prices = solve(backend, device, a, capacity=cap, eps=eps)
    assert torch.bincount(ids.long(), minlength=e).tolist() == cap
    a64, p = a.double(), prices.double()
    has_slots = torch.tensor(cap) > 0
    value = a64[torch.arange(t), ids.long()] - p[ids.long()]
    best = (a64 - p).masked_fill(~has_slots, -torch.inf).max(1).values
    rounding = 4 * torch.finfo(F32).eps * (a64.abs().max() + p.abs().max()).item()  # prices come back in fp32
    assert (value >= best - eps - rounding).all(), (best - value).max()
    dual = best.sum() + (p * torch.tensor(cap, dtype=torch.float64)).sum()
    assert total(a64, ids) >= dual.item() - t * (eps + rounding)


@pytest.mark.parametrize("backend,device,dtype", BACKENDS)
def test_two_experts_match_the_sorted_closed_form(backend, device, dtype):
    """With two experts the optimum takes the c_0 tokens with the largest a_t0 - a_t1 for expert 0."""
    t = 61 if backend in SLOW else 1001
    a = torch.randn(t, 2)
    ids, _ = solve(backend, device, a)
    want = torch.ones(t, dtype=torch.long)
    want[torch.argsort(a[:, 0] - a[:, 1], descending=True)[:(t + 1) // 2]] = 0
    assert total(a.double(), ids) == pytest.approx(total(a.double(), want), abs=t * default_eps(a.double()) + 1e-6)


@pytest.mark.parametrize("backend,device,dtype", BACKENDS)
def test_uneven_capacity_ties_one_expert_and_no_tokens(backend, device, dtype):
    def counts(scores, **kw):
        ids, prices = solve(backend, device, scores, **kw)
        assert prices.shape == (scores.shape[1],) and not prices.isnan().any()
        return torch.bincount(ids.long(), minlength=scores.shape[1]).tolist()

    assert counts(torch.randn(10, 3)) == [4, 3, 3]  # T % E spread over the first experts
    assert counts(torch.randn(10, 4), capacity=[3, 0, 5, 2]) == [3, 0, 5, 2]
    assert counts(torch.zeros(12, 3)) == [4, 4, 4]  # all tied: still exactly balanced
    ids, prices = solve(backend, device, torch.randn(5, 1))
    assert ids.tolist() == [0] * 5 and prices.shape == (1,)
    ids, prices = solve(backend, device, torch.randn(0, 3))
    assert ids.shape == (0,) and prices.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("backend,device,dtype", BACKENDS)
def test_opcheck_and_compile(backend, device, dtype):
    a = torch.randn(8, 2, device=device)  # eps >= spread / 64: one eps phase (the reference's rounds are slow)
    torch.library.opcheck(torch.ops.fastlm.base_assignment.default, (a, [4, 4], 1.0, backend))
    torch._dynamo.reset()
    f = lambda s: base_assignment(s * 2, eps=1.0, backend=backend)[0]  # noqa: E731
    assert torch.equal(torch.compile(f, fullgraph=True, backend="aot_eager")(a), f(a))


def kernel_ops():
    """The extension op per kernel backend: (name, op namespace), skipped where not built."""
    from fastlm import _ext

    out = []
    for name, ns, have in (("cpu", "fastlm", _ext.HAS_EXTENSION), ("cuda-emu", "fastlm_emu", _ext.HAS_EMULATOR)):
        ok = have and hasattr(getattr(torch.ops, ns), "moe_base_assignment")
        out.append(pytest.param(ns, id=name, marks=pytest.mark.skipif(not ok, reason=f"no {ns}.moe_base_assignment")))
    return out


@pytest.mark.parametrize("ns", kernel_ops())
def test_kernels_mark_bad_scores_and_round_cap_invalid(ns):
    """Non-finite scores (never checked on the host for GPU tensors) and an exceeded round cap give
    ids -1 and NaN prices for the whole call; the kernels never hang."""
    op = getattr(torch.ops, ns).moe_base_assignment
    for bad in (float("nan"), float("inf")):
        s = torch.randn(9, 3)
        s[4, 1] = bad
        ids, prices = op(s, [3, 3, 3])
        assert ids.tolist() == [-1] * 9 and prices.isnan().all()
    ids, prices = op(torch.randn(9, 3), [3, 3, 3], 0.0, 0)  # max_rounds 0
    assert ids.tolist() == [-1] * 9 and prices.isnan().all()
    ids, _ = op(torch.randn(9, 3), [3, 3, 3], 0.0, 100)
    assert torch.bincount(ids.long(), minlength=3).tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match=r"capacity must be 3 ints >= 0 summing to the 9 tokens, got \[3, 3, 2\]"):
        op(torch.randn(9, 3), [3, 3, 2])
    with pytest.raises(ValueError, match=r"max_rounds must be >= 0, got -1"):
        op(torch.randn(9, 3), [3, 3, 3], 0.0, -1)


def test_triton_kernel_marks_bad_scores_and_round_cap_invalid():
    """The triton kernel's device-side invalid result, as the cuda kernel's (on a CPU tensor the op
    itself raises first, so this calls the kernel directly)."""
    from fastlm.triton import base_assignment as kernel

    dev = GPU or "cpu"
    for bad in (float("nan"), float("-inf")):
        s = torch.randn(9, 3)
        s[4, 1] = bad
        ids, prices = kernel.solve(s.to(dev), [3, 3, 3], 0.0)
        assert ids.tolist() == [-1] * 9 and prices.isnan().all()
    ids, prices = kernel.solve(torch.randn(9, 3, device=dev), [3, 3, 3], 0.0, max_rounds=0)
    assert ids.tolist() == [-1] * 9 and prices.isnan().all()
    # from zero prices (no warm start) 9 x 3 takes up to ~200 rounds: a cap it never reaches
    ids, prices = kernel.solve(torch.randn(9, 3, device=dev), [3, 3, 3], 0.0, max_rounds=10_000)
    assert torch.bincount(ids.long(), minlength=3).tolist() == [3, 3, 3] and not prices.isnan().any()
    with pytest.raises(ValueError, match=r"takes up to 1024 experts, got scores of shape \(2, 1025\)"):
        kernel.solve(torch.randn(2, 1025, device=dev), [1, 1] + [0] * 1023, 0.0)


def test_cpu_and_emulated_cuda_kernels_agree():
    """The same auction step for step (float64, same tie rules): the same ids and prices."""
    from fastlm import _ext

    if not (_ext.HAS_EXTENSION and _ext.HAS_EMULATOR and hasattr(torch.ops.fastlm, "moe_base_assignment")
            and hasattr(torch.ops.fastlm_emu, "moe_base_assignment")):
        pytest.skip("needs both kernels built")
    a = torch.randn(45, 4)
    for cap in ([12, 11, 11, 11], [20, 0, 5, 20]):
        want = torch.ops.fastlm.moe_base_assignment(a, cap)
        got = torch.ops.fastlm_emu.moe_base_assignment(a, cap)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bad_inputs_name_argument_and_value():
    with pytest.raises(ValueError, match=r"capacity must be 3 ints >= 0 summing to the 5 tokens, got \[1, 1, 1\]"):
        base_assignment(torch.randn(5, 3), capacity=[1, 1, 1])
    with pytest.raises(ValueError, match=r"scores must be finite"):
        base_assignment(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"eps must be > 0, got 0.0"):
        base_assignment(torch.randn(4, 2), eps=0.0)
    with pytest.raises(ValueError, match=r"scores must be a floating-point \(tokens, experts\) tensor, got \(4,\)"):
        base_assignment(torch.randn(4))
