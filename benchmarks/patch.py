"""fastlm.patch on a Llama-style HF model: one training step (forward + backward with labels),
patched versus the same model unpatched with HF's sdpa attention, side by side.

CPU case (the patch issue's done-when): hidden 512, 4 layers, 8 query / 2 KV heads (GQA),
vocab 32000, B=4, T=256, fp32. GPU: the same in bf16. Correctness first: the patched loss and
gradients against the unpatched model's. The progress output ends with the profile of the
patched step (the ops that remain, by self time), which says where the rest of the time goes.
"""
from __future__ import annotations

import copy

import torch

import fastlm
from benchmarks.common import Row, smoke, time_interleaved

OP = "patch"


def _llama(device, dtype):
    import transformers

    if smoke():
        shape = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512)
        B, T = 2, 32
    else:
        shape = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=2, vocab_size=32000)
        B, T = 4, 256
    config = transformers.LlamaConfig(max_position_embeddings=T, **shape)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").to(device, dtype).train()
    return model, B, T, shape


def _step(model, idx):
    loss = model(idx, labels=idx).loss
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return loss


def _check(hf, patched, idx, tol) -> str:
    losses, grads = [], []
    for m in (hf, patched):
        loss = m(idx, labels=idx).loss
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in m.parameters()])
        m.zero_grad(set_to_none=True)
    grad_err = max(((a - b).norm() / b.norm()).item() for a, b in zip(*grads) if b.norm() > 0)
    loss_err = abs(losses[0] - losses[1]) / abs(losses[0])
    note = f"loss rel err {loss_err:.1e}, worst grad rel err {grad_err:.1e}"
    return note if loss_err <= tol and grad_err <= 10 * tol else "WRONG: " + note


def run(device: torch.device, quick: bool, ceilings: dict, progress=print) -> list[Row]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return [Row(OP, "llama", "fastlm.patch", "fwd+bwd", None, note="transformers not installed")]
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    hf, B, T, shape = _llama(device, dtype)
    patched = copy.deepcopy(hf)
    report = fastlm.patch(patched)
    case = (f"llama h={shape['hidden_size']} L={shape['num_hidden_layers']} GQA {shape['num_attention_heads']}/"
            f"{shape['num_key_value_heads']} V={shape['vocab_size']} B={B} T={T} {str(dtype)[6:]}")
    progress(f"  {OP} {case}: fused {sorted(report.kinds())}")
    idx = torch.randint(0, shape["vocab_size"], (B, T), device=device)
    note = _check(hf, patched, idx, 1e-4 if dtype == torch.float32 else 2e-2)
    if note.startswith("WRONG"):
        return [Row(OP, case, "fastlm.patch", "fwd+bwd", None, note=note)]
    times = time_interleaved({"HF sdpa": lambda i: _step(hf, idx), "fastlm.patch": lambda i: _step(patched, idx)},
                             device, min_seconds=0.0, warmup=1, min_rounds=3 if quick else 7)
    tokens = B * T
    rows = [Row(OP, case, name, "fwd+bwd", ms, vs_eager=times["HF sdpa"] / ms, tokens_per_s=tokens / ms * 1e3,
                note=note if name == "fastlm.patch" else "") for name, ms in times.items()]
    progress(f"  {OP}: fastlm.patch {times['HF sdpa'] / times['fastlm.patch']:.2f}x HF sdpa "
             f"({times['fastlm.patch']:.0f} ms vs {times['HF sdpa']:.0f} ms per step)")
    if not smoke():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            _step(patched, idx)
        progress(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return rows
