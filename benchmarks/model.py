"""GPT-2 small forward, fastlm GPT vs HF transformers (the same random weights), side by side.

CPU: B=1, T=512, fp32, no grad (the issue's done-when: fastlm >= 1.2x HF eager). Rows:
fastlm (auto backends), fastlm on the reference path, HF with attn_implementation "eager"
and "sdpa" (HF's default). Correctness first: fastlm's logits against HF's. GPU: the same
forward in bf16 at T=1024. Implementations are timed round-robin (see interleaved_ms).
"""
from __future__ import annotations

import statistics
import time

import torch

import fastlm
from benchmarks.common import Row, smoke, sync
from fastlm.models import GPT

OP = "model"


def _hf(attn: str, config):
    import transformers

    return transformers.GPT2LMHeadModel._from_config(config, attn_implementation=attn).eval()


def interleaved_ms(impls: dict, idx, device, rounds: int) -> dict:
    """Median ms per impl, timed round-robin (one call of each per round) so that load from
    other processes on a shared machine hits every impl alike."""
    samples = {name: [] for name in impls}
    with torch.no_grad():
        for fn in impls.values():  # warm-up
            fn(idx)
        for _ in range(rounds):
            for name, fn in impls.items():
                sync(device)
                start = time.perf_counter()
                fn(idx)
                sync(device)
                samples[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(ts) for name, ts in samples.items()}


def run(device: torch.device, quick: bool, ceilings: dict, progress=print) -> list[Row]:
    try:
        import transformers
    except ImportError:
        return [Row(OP, "gpt2", "HF transformers", "fwd", None, note="transformers not installed")]
    if smoke():
        config, T = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=128), 32
    else:
        config, T = transformers.GPT2Config(), (512 if device.type == "cpu" else 1024)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    hf = {attn: _hf(attn, config).to(device, dtype) for attn in ("eager", "sdpa")}
    hf["sdpa"].load_state_dict(hf["eager"].state_dict())
    model = GPT.from_hf(hf["eager"]).to(device, dtype).eval()
    idx = torch.randint(0, config.vocab_size, (1, T), device=device)
    case = f"gpt2{'-smoke' if smoke() else ''} B=1 T={T} {str(dtype)[6:]}"
    progress(f"  {OP} {case}")
    with torch.no_grad():
        expected = hf["eager"](idx).logits.float()
        err = (model(idx)[0].float() - expected).abs().max().item()
    tol = 1e-3 if dtype == torch.float32 else 0.25
    note = f"max |logits - HF| {err:.2e}"
    if not err <= tol:
        return [Row(OP, case, "fastlm", "fwd", None, note=f"WRONG: {note} > {tol}")]
    L, C, V = config.n_layer, config.n_embd, config.vocab_size
    flops = 2 * T * (12 * L * C * C + V * C) + 2 * L * T * T * C  # matmuls + causal attention

    impls = {"fastlm": lambda x: model(x)[0], "HF eager": lambda x: hf["eager"](x).logits,
             "HF sdpa": lambda x: hf["sdpa"](x).logits}

    def reference_path(x):
        with fastlm.use_backend("reference"):
            return model(x)[0]

    impls["fastlm reference path"] = reference_path
    times = interleaved_ms(impls, idx, device, rounds=3 if smoke() else (5 if quick else 9))
    rows = []
    for name, ms in times.items():
        rows.append(Row(OP, case, name, "fwd", ms, tflops=flops / ms / 1e9,
                        pct_ceiling=100 * flops / ms / 1e9 / ceilings["matmul_tflops"] if ceilings.get("matmul_tflops") else None,
                        vs_eager=times["HF eager"] / ms, note=note if name == "fastlm" else ""))
    return rows
