"""Expert parallelism under a real 2-process torchrun (gloo, CPU): each rank holds half the experts
and half the tokens; the output and every gradient equal the single-process MoE on all tokens,
for the core exchange (expert_parallel_experts) and for fastlm.nn.MoE(process_group=...)."""
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from fastlm import _ext
from fastlm.nn.expert_parallel import expert_parallel_experts
from fastlm.ops import moe_experts, moe_router

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker():
    """Run by torchrun: compares rank-local expert-parallel results with the one-process MoE."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    backend = "cpu" if _ext.HAS_EXTENSION and hasattr(torch.ops.fastlm, "grouped_linear_fwd") else "reference"
    torch.manual_seed(int(os.environ["EP_SEED"]))  # same draws on every rank: the global problem
    t, h, inner, e, k = 24, 16, 12, 4, 2
    x = torch.randn(world * t, h)
    router = torch.randn(e, h)
    w1, w2 = torch.randn(e, 2 * inner, h) / h ** 0.5, torch.randn(e, h, inner) / inner ** 0.5
    grad = torch.randn(world * t, h)
    capacity = int(os.environ["EP_CAPACITY"]) if os.environ["EP_CAPACITY"] != "none" else None

    def one_process_step(xs, rw, a, b, g, cap):
        """The whole MoE on the given tokens; returns out and grads of (x, router, w1, w2)."""
        xs, rw, a, b = (v.clone().requires_grad_() for v in (xs, rw, a, b))
        r = moe_router(xs @ rw.t(), k, capacity=cap, backend=backend)
        out = moe_experts(xs, r.expert_ids, r.weights, a, b, backend=backend)
        (out * g).sum().backward()
        return out.detach(), xs.grad, rw.grad, a.grad, b.grad

    mine = slice(rank * t, (rank + 1) * t)
    experts = slice(rank * e // world, (rank + 1) * e // world)
    xl, rl = x[mine].clone().requires_grad_(), router.clone().requires_grad_()
    a, b = w1[experts].clone().requires_grad_(), w2[experts].clone().requires_grad_()
    # capacity is per process (each rank routes its own tokens): the reference applies it per half too
    r = moe_router(xl @ rl.t(), k, capacity=capacity, backend=backend)
    out = expert_parallel_experts(xl, r.expert_ids, r.weights, a, b, e, backend=backend)
    (out * grad[mine]).sum().backward()
    dist.all_reduce(rl.grad)  # the replicated router: gradients summed over ranks, as DDP would (before /P)
    halves = [one_process_step(x[s], router, w1, w2, grad[s], capacity)
              for s in (slice(i * t, (i + 1) * t) for i in range(world))]
    want_w1 = sum(hh[3] for hh in halves)[experts]
    want_w2 = sum(hh[4] for hh in halves)[experts]
    want_router = sum(hh[2] for hh in halves)
    errors = {
        "out": (out - halves[rank][0]).abs().max().item(),
        "grad_x": (xl.grad - halves[rank][1]).abs().max().item(),
        "grad_router": (rl.grad - want_router).abs().max().item(),
        "grad_w_gate_up": (a.grad - want_w1).abs().max().item(),
        "grad_w_down": (b.grad - want_w2).abs().max().item(),
    }
    if capacity is None:  # without capacity the halves are exactly the one-process run on all tokens
        full = one_process_step(x, router, w1, w2, grad, None)
        errors["out_vs_all_tokens"] = (out - full[0][mine]).abs().max().item()
        errors["grad_w_gate_up_vs_all_tokens"] = (a.grad - full[3][experts]).abs().max().item()
    errors.update(_module_errors(rank, world, x[mine], grad[mine], backend))
    print(f"rank {rank} backend {backend} " + " ".join(f"{n}={v:.2e}" for n, v in errors.items()), flush=True)
    assert max(errors.values()) < 1e-4, errors
    dist.barrier()
    dist.destroy_process_group()


def _module_errors(rank, world, x, grad, backend):
    """fastlm.nn.MoE(process_group=WORLD) holding E/P experts vs the full module, on this rank's tokens."""
    import fastlm.nn as fnn

    full = fnn.MoE(16, 12, 4, 2, shared_expert_size=8, backend=backend)
    with torch.no_grad():
        for p in full.parameters():  # same draws on every rank (the seed above)
            p.normal_(0, 0.3)
    ep = fnn.MoE(16, 12, 4, 2, shared_expert_size=8, backend=backend, process_group=dist.group.WORLD)
    local = slice(rank * 4 // world, (rank + 1) * 4 // world)
    state = full.state_dict()
    state["experts.gate_up_proj"] = state["experts.gate_up_proj"][local]
    state["experts.down_proj"] = state["experts.down_proj"][local]
    ep.load_state_dict(state)
    outs = []
    for m in (full, ep):
        out = m(x)
        (out * grad).sum().backward()
        outs.append(out.detach())
    # the full module saw only this rank's tokens: its expert grads summed over ranks are the EP ones
    want = full.experts.gate_up_proj.grad.clone()
    dist.all_reduce(want)
    return {"module_out": (outs[0] - outs[1]).abs().max().item(),
            "module_grad_experts": (ep.experts.gate_up_proj.grad - want[local]).abs().max().item(),
            "module_grad_shared": (ep.shared_expert.up_proj.weight.grad - full.shared_expert.up_proj.weight.grad)
            .abs().max().item()}


@pytest.mark.parametrize("capacity", ["none", "7"])
def test_two_process_torchrun_matches_one_process(capacity):
    env = dict(os.environ, EP_SEED=str(torch.randint(0, 2**31 - 1, ()).item()), EP_CAPACITY=capacity,
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # the two ranks share stdout: their lines may interleave, so count reports, not lines
    reports = re.findall(r"rank (\d) backend \S+ out=\S+ .*?grad_w_down=", run.stdout)
    assert sorted(reports) == ["0", "1"], run.stdout


def test_refuses_experts_that_do_not_split():
    if not dist.is_available():
        pytest.skip("torch without distributed")
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1) \
        if not dist.is_initialized() else None
    try:
        x = torch.randn(4, 8)
        ids, w = torch.zeros(4, 1, dtype=torch.int32), torch.ones(4, 1)
        with pytest.raises(ValueError, match=r"rank 0 must hold 3 experts \(experts 0..2\), got w_gate_up \(2, 6, 8\)"):
            expert_parallel_experts(x, ids, w, torch.randn(2, 6, 8), torch.randn(2, 8, 3), 3)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker()
