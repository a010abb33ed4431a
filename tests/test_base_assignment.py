"""base_assignment: exactly balanced, and optimal (brute force on small problems, the sorted
closed form for two experts), with T not divisible by E; the errors it raises; compile."""
import itertools

import pytest
import torch

from fastlm.ops import base_assignment
from fastlm.ops.base_assignment import default_capacity


def brute_force(a, capacity):
    labels = [e for e, c in enumerate(capacity) for _ in range(c)]
    return max(sum(a[i, p].item() for i, p in enumerate(perm)) for perm in set(itertools.permutations(labels)))


def total(a, ids):
    return a[torch.arange(a.shape[0]), ids.long()].sum().item()


@pytest.mark.parametrize("t,e", [(1, 1), (6, 3), (7, 3), (8, 4), (9, 2), (5, 4), (10, 3)])
def test_optimal_and_balanced_on_small_problems(t, e):
    a = torch.randn(t, e, dtype=torch.float64)
    ids, prices = base_assignment(a)
    capacity = default_capacity(t, e)
    assert ids.dtype == torch.int32 and prices.shape == (e,)
    assert torch.bincount(ids.long(), minlength=e).tolist() == capacity
    assert total(a, ids) == pytest.approx(brute_force(a, capacity), abs=1e-9)


def test_two_experts_match_the_sorted_closed_form():
    """With two experts the optimum takes the c_0 tokens with the largest a_t0 - a_t1 for expert 0."""
    a = torch.randn(1001, 2, dtype=torch.float64)
    ids, _ = base_assignment(a)
    want = torch.ones(1001, dtype=torch.long)
    want[torch.argsort(a[:, 0] - a[:, 1], descending=True)[:501]] = 0
    assert total(a, ids) == pytest.approx(total(a, want), abs=1001 * 1e-4 * float(a.max() - a.min()) / 2)


def test_large_balanced_with_custom_capacity_and_ties():
    a = torch.randn(4096, 8)
    ids, _ = base_assignment(a)
    assert torch.bincount(ids.long(), minlength=8).tolist() == [512] * 8
    cap = [100, 0, 3, 897]
    ids, _ = base_assignment(torch.randn(1000, 4), capacity=cap)
    assert torch.bincount(ids.long(), minlength=4).tolist() == cap
    ids, _ = base_assignment(torch.zeros(12, 3))  # all tied: still exactly balanced
    assert torch.bincount(ids.long(), minlength=3).tolist() == [4, 4, 4]


def test_bad_inputs_name_argument_and_value():
    with pytest.raises(ValueError, match=r"capacity must be 3 ints >= 0 summing to the 5 tokens, got \[1, 1, 1\]"):
        base_assignment(torch.randn(5, 3), capacity=[1, 1, 1])
    with pytest.raises(ValueError, match=r"scores must be finite"):
        base_assignment(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"eps must be > 0, got 0.0"):
        base_assignment(torch.randn(4, 2), eps=0.0)
    with pytest.raises(ValueError, match=r"scores must be a floating-point \(tokens, experts\) tensor, got \(4,\)"):
        base_assignment(torch.randn(4))


def test_opcheck_and_compile():
    a = torch.randn(40, 4)
    torch.library.opcheck(torch.ops.fastlm.base_assignment.default, (a, [10, 10, 10, 10], 1e-4))
    torch._dynamo.reset()
    f = lambda s: base_assignment(s * 2)[0]  # noqa: E731
    assert torch.equal(torch.compile(f, fullgraph=True, backend="aot_eager")(a), f(a))
