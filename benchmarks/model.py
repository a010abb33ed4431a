"""GPT-2 forward, training step and KV-cached generation: fastlm GPT vs HF transformers (the
same random weights) and vs the same model on the reference path, eager and torch.compile.

CPU: B=1, T=512, fp32, no grad (the issue's done-when: fastlm >= 1.2x HF eager). Rows:
fastlm (auto backends), fastlm on the reference path, HF with attn_implementation "eager"
and "sdpa" (HF's default). Correctness first: fastlm's logits against HF's. GPU: the same
forward in bf16 at T=1024. Implementations are timed round-robin (common.time_interleaved).
"""
from __future__ import annotations

import copy
import statistics
import time

import torch

import fastlm
from benchmarks.common import Row, headline, smoke, sync, time_interleaved
from fastlm.models import GPT, GPTConfig
from fastlm.models.gpt import PRESETS as GPTPRESETS

OP = "model"


def _hf(attn: str, config):
    import transformers

    return transformers.GPT2LMHeadModel._from_config(config, attn_implementation=attn).eval()


def run(device: torch.device, quick: bool, ceilings: dict, progress=print) -> list[Row]:
    if headline():  # one GPT-2 124M training step, tokens/s (works without transformers too)
        return train_rows(device, quick, torch.float32 if device.type == "cpu" else torch.bfloat16, progress, ceilings)
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
    notes = {"fastlm": note}
    if device.type == "cpu" and dtype == torch.float32 and fastlm.ops.prepack_available():
        # the same weights, packed once for the GEMM (fastlm.nn.prepack: CPU inference, opt-in)
        packed = copy.deepcopy(model)
        notes["fastlm prepacked"] = f"{len(fastlm.nn.prepack(packed))} Linears prepacked (fastlm.nn.prepack)"
        with torch.no_grad():
            err = (packed(idx)[0].float() - expected).abs().max().item()
        if not err <= tol:
            notes["fastlm prepacked"] = f"WRONG: max |logits - HF| {err:.2e} > {tol}"
        else:
            impls["fastlm prepacked"] = lambda x: packed(x)[0]
    with torch.no_grad():
        times = time_interleaved({name: (lambda i, fn=fn: fn(idx)) for name, fn in impls.items()}, device,
                                 min_seconds=0.0, warmup=1, min_rounds=5 if quick else 9)
    rows = []
    for name, ms in times.items():
        rows.append(Row(OP, case, name, "fwd", ms, tflops=flops / ms / 1e9,
                        pct_ceiling=100 * flops / ms / 1e9 / ceilings["matmul_tflops"] if ceilings.get("matmul_tflops") else None,
                        vs_eager=times["HF eager"] / ms, note=notes.get(name, "")))
    rows += train_rows(device, quick, dtype, progress, ceilings)
    rows += generate_rows(device, quick, dtype, progress)
    return rows


def _train_step(model, idx, opt):
    """One AdamW step on next-token loss; works for fastlm GPT (returns (logits, loss)) and HF."""
    if isinstance(getattr(model, "_orig_mod", model), GPT):  # (B, T) inputs, targets shifted by one
        out = model(idx[:, :-1], idx[:, 1:])
    else:  # HF shifts the labels itself: the same T tokens in, T - 1 predictions scored
        out = model(idx[:, :-1], labels=idx[:, :-1])
    loss = out[1] if isinstance(out, tuple) else out.loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def _train_models(preset: str, kw: dict, device) -> tuple[int, dict]:
    """(vocab size, name -> model in train mode) with the same random weights: fastlm, fastlm on the
    reference path (eager and torch.compile), and HF GPT-2 with SDPA when transformers is there."""
    shape = {**dict(n_layer=GPTPRESETS[preset]["n_layer"], n_head=GPTPRESETS[preset]["n_head"],
                    n_embd=GPTPRESETS[preset]["n_embd"]), **kw}
    torch.manual_seed(0)
    try:
        import transformers
    except ImportError:
        fast = GPT(GPTConfig(**shape))
        make = lambda: GPT(GPTConfig(**shape), backend="reference")  # noqa: E731
        hf = None
    else:
        hf = _hf("sdpa", transformers.GPT2Config(**shape)).to(device).train()
        fast = GPT.from_hf(hf)
        make = lambda: GPT.from_hf(hf, backend="reference")  # noqa: E731
    ref, ref_c = make(), make()
    ref.load_state_dict(fast.state_dict())
    ref_c.load_state_dict(fast.state_dict())
    impls = {"fastlm": fast.to(device).train(), "fastlm reference path": ref.to(device).train()}
    if hf is not None:
        impls["HF sdpa"] = hf
    impls["reference path + torch.compile"] = torch.compile(ref_c.to(device).train())
    return shape.get("vocab_size", 50257), impls


def train_rows(device, quick, dtype, progress, ceilings=None) -> list[Row]:
    """Training step (forward, backward, AdamW) tokens/s, % of the matmul ceiling (6 flops per
    parameter and token + causal attention), the ratio to the reference path under torch.compile;
    peak memory where the device reports it. GPT-2 124M (and 350M in full mode on a GPU);
    CPU: B=1, T=128 (quick or headline) or 256."""
    sizes = [("gpt2", 1, 32)] if smoke() else [("gpt2", 1, 128 if quick or headline() else 256)] if device.type == "cpu" else \
        [("gpt2", 8, 1024)] + ([] if quick or headline() else [("gpt2-medium", 8, 1024)])
    rows = []
    for preset, B, T in sizes:
        kw = dict(n_layer=2, n_head=2, n_embd=64, vocab_size=128) if smoke() else {}
        case = f"{preset}{'-smoke' if smoke() else ''} train B={B} T={T}"
        progress(f"  {OP} {case}")
        vocab, impls = _train_models(preset, kw, device)
        L, C = impls["fastlm"].config.n_layer, impls["fastlm"].config.n_embd
        flops = 3 * B * (2 * T * (12 * L * C * C + vocab * C) + 2 * L * T * T * C)  # fwd + 2x fwd for bwd
        idx = torch.randint(0, vocab, (B, T + 1), device=device)
        for name, model in impls.items():
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            ctx = torch.autocast(device.type, dtype) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
            try:
                with ctx:
                    for _ in range(1 if smoke() else 2):
                        _train_step(model, idx, opt)  # warm-up (and compile)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                sync(device)
                times = []
                for _ in range(2 if smoke() else (3 if quick else 5)):
                    start = time.perf_counter()
                    with ctx:
                        _train_step(model, idx, opt)
                    sync(device)
                    times.append(1e3 * (time.perf_counter() - start))
            except Exception as exc:
                rows.append(Row(OP, case, name, "train", None, note=f"failed: {type(exc).__name__}: {exc}"[:200]))
                continue
            ms = statistics.median(times)
            peak = f"peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB" if device.type == "cuda" else ""
            peak_tflops = (ceilings or {}).get("matmul_tflops")
            rows.append(Row(OP, case, name, "train", ms, note=f"{B * T / ms * 1e3:.0f} tok/s {peak}".strip(),
                            tokens_per_s=B * T / ms * 1e3,  # (no tflops: the plot panel stays tokens/s)
                            pct_ceiling=100 * flops / ms / 1e9 / peak_tflops if peak_tflops else None,
                            size=case.split(" ", 1)[1], dtype=str(dtype)[6:]))
        eager = next((r.ms for r in rows if r.case == case and r.impl == "fastlm reference path" and r.ms), None)
        compiled = next((r.ms for r in rows if r.case == case and r.impl == "reference path + torch.compile" and r.ms), None)
        for r in rows:
            if r.case == case and r.ms and eager:
                r.vs_eager = eager / r.ms
            if r.case == case and r.ms and compiled and r.impl == "fastlm":
                r.note += f", {compiled / r.ms:.2f}x reference + torch.compile"
    return rows


def generate_rows(device, quick, dtype, progress) -> list[Row]:
    """Greedy generation tokens/s with the KV cache at batch 1 and 8, fastlm vs HF generate."""
    import transformers

    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=128) if smoke() else transformers.GPT2Config()
    prompt, new = (8, 4) if smoke() else (32, 16 if quick else 64)
    torch.manual_seed(0)
    hf = _hf("sdpa", cfg).to(device, dtype).eval()
    fast = GPT.from_hf(hf).to(device, dtype).eval()
    rows = []
    for B in (1, 8):
        case = f"gpt2{'-smoke' if smoke() else ''} generate B={B} prompt={prompt} new={new}"
        progress(f"  {OP} {case}")
        idx = torch.randint(0, cfg.vocab_size, (B, prompt), device=device)
        impls = {
            "fastlm": lambda: fast.generate(idx, new, temperature=0.0),
            "HF generate": lambda: hf.generate(idx, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                                 pad_token_id=0, attention_mask=torch.ones_like(idx)),
        }
        outs = {name: fn() for name, fn in impls.items()}  # warm-up, and the tokens must agree
        same = torch.equal(outs["fastlm"], outs["HF generate"])
        times = {name: [] for name in impls}
        for _ in range(2 if smoke() else 3):
            for name, fn in impls.items():
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                times[name].append(1e3 * (time.perf_counter() - start))
        hf_ms = statistics.median(times["HF generate"])
        for name, ts in times.items():
            ms = statistics.median(ts)
            rows.append(Row(OP, case, name, "generate", ms, tokens_per_s=B * new / ms * 1e3, note=f"{B * new / ms * 1e3:.0f} tok/s"
                            + ("" if same else " (greedy tokens differ from HF's)"),
                            vs_eager=hf_ms / ms, size=f"B={B}", dtype=str(dtype)[6:]))
    return rows
