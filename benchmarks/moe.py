"""moe: a sparse MoE layer (router, top-2 of 8 SwiGLU experts, weighted sum), fastlm's moe_mlp
against HF Mixtral's sparse block on the same weights, side by side, in tokens/s.

Peers: HF's MixtralSparseMoeBlock with its "eager" experts (a Python loop over experts with
one_hot / where / index_add, what a Mixtral user runs by default) and with "grouped_mm" (HF's
sort + torch._grouped_mm path), where torch has it. MegaBlocks is timed where importable.
CPU case (issue #16's done-when): hidden 512, 8 experts, top-2, 4096 tokens, fp32; intermediate
1792 (Mixtral's 3.5x ratio). GPU: the same shape class in bf16. Correctness first: output and
gradients against the eager block's.

Also a routing table per router kind (top-2 softmax, Switch top-1, top-2 sigmoid) and capacity
factor: the busiest expert's share of the assignments over the mean share, and the drop rate,
on these random tokens (what capacity costs at a given balance)."""
from __future__ import annotations

import torch

from benchmarks.common import Row, contenders, smoke, time_interleaved
from fastlm.ops import moe_mlp, moe_router
from fastlm.ops.moe_router import capacity_for

OP = "moe"


def _block(device, dtype, impl):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    h, inner, e = (64, 128, 8) if smoke() else (512, 1792, 8)
    config = MixtralConfig(hidden_size=h, intermediate_size=inner, num_local_experts=e, num_experts_per_tok=2)
    config._experts_implementation = impl
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.normal_(0, (1 / h ** 0.5) if "gate.weight" == name else 0.02)
    return block.to(device, dtype).train()


def _serving(device, x, logits):
    """Backends that serve both halves of moe_mlp (its grouped GEMMs and its router) here."""
    grouped = contenders("grouped_linear", device, x, x.new_empty(1, 1, x.shape[1]),
                         torch.zeros(2, dtype=torch.int32, device=device))
    return [n for n in grouped if n in contenders("moe_router", device, logits)]


def _step(fn, x, grad, mode):
    if mode == "fwd":
        with torch.no_grad():
            return fn(x)
    out = fn(x)
    out.backward(grad)
    return out


def _check(fn, x, grad, want, want_grads, params, tol) -> str | None:
    x = x.detach().requires_grad_()
    out = fn(x)
    out.backward(grad)
    grads = [x.grad] + [p.grad for p in params]
    errs = [((out - want).norm() / want.norm()).item()] + [((g - w).norm() / w.norm()).item()
                                                           for g, w in zip(grads, want_grads)]
    for p in params:
        p.grad = None
    return None if max(errs) <= tol else f"relative errors out/grads {', '.join(f'{e:.1e}' for e in errs)}"


def run(device: torch.device, quick: bool, ceilings: dict, progress=print) -> list[Row]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return [Row(OP, "mixtral block", "fastlm moe_mlp", "fwd+bwd", None, note="transformers not installed")]
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    tokens = 256 if smoke() else 4096
    eager = _block(device, dtype, "eager")
    h, e = eager.gate.weight.shape[1], eager.gate.weight.shape[0]
    inner = eager.experts.down_proj.shape[2]
    case = f"mixtral block h={h} I={inner} E={e} top-2 T={tokens} {str(dtype)[6:]}"
    progress(f"  {OP} {case}")
    x = torch.randn(1, tokens, h, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    params = [eager.gate.weight, eager.experts.gate_up_proj, eager.experts.down_proj]
    xr = x.detach().requires_grad_()
    want = eager(xr)
    want.backward(grad)
    want_grads = [xr.grad] + [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    impls = {"HF eager": eager}
    if hasattr(torch, "_grouped_mm"):
        grouped = _block(device, dtype, "grouped_mm")
        grouped.load_state_dict(eager.state_dict())
        impls["HF grouped_mm"] = grouped
    for name in _serving(device, x.view(-1, h), x.new_empty(tokens, e)):
        impls[f"fastlm:{name}"] = (lambda a, nm=name: moe_mlp(a, *params, 2, backend=nm).out)
    try:
        from megablocks.layers.moe import MoE  # noqa: F401

        progress("    megablocks is importable but not wired into this benchmark yet")
    except ImportError:
        pass

    tol = 1e-4 if dtype == torch.float32 else 3e-2
    rows, ok = [], {}
    for name, fn in impls.items():
        note = _check(fn, x, grad, want.detach(), want_grads, params if not isinstance(fn, torch.nn.Module)
                      else [fn.gate.weight, fn.experts.gate_up_proj, fn.experts.down_proj], tol)
        if note:
            rows.append(Row(OP, case, name, "fwd+bwd", None, note="WRONG: " + note))
        else:
            ok[name] = fn
    for mode in ("fwd", "fwd+bwd"):
        steps = {name: (lambda i, f=fn, m=mode: _step(f, x if m == "fwd" else x.detach().requires_grad_(), grad, m))
                 for name, fn in ok.items()}
        times = time_interleaved(steps, device, min_seconds=0.0 if quick else 1.0, warmup=1,
                                 min_rounds=3 if quick else 5)
        base = times.get("HF eager")
        rows += [Row(OP, case, name, mode, ms, vs_eager=base / ms if base else None, tokens_per_s=tokens / ms * 1e3,
                     dtype=str(dtype)[6:]) for name, ms in times.items()]
    rows += _routing_rows(x.view(-1, h), eager.gate.weight.detach(), case)
    return rows


def _routing_rows(x, router_weight, case) -> list[Row]:
    """Balance and drop rate per router kind and capacity factor on these tokens."""
    logits = (x.detach() @ router_weight.t()).float()
    t, e = logits.shape
    rows = []
    for kind, k, score in (("top-2 softmax", 2, "softmax"), ("switch top-1", 1, "softmax"),
                           ("top-2 sigmoid", 2, "sigmoid")):
        for factor in (None, 1.0, 1.25):
            r = moe_router(logits, k, score=score, normalize=kind != "switch top-1",
                           capacity=capacity_for(t, e, k, factor))
            kept = r.counts.double()
            busiest = (kept.max() / kept.mean()).item() if kept.sum() > 0 else float("nan")
            dropped = 1 - kept.sum().item() / (t * k)
            rows.append(Row(OP, case, f"routing {kind}", f"capacity {factor or 'none'}", None,
                            note=f"busiest expert {busiest:.2f}x the mean load, {100 * dropped:.1f}% dropped"))
    return rows
