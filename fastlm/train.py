"""Train a fastlm GPT: `python -m fastlm.train [--data PATH] [options]` (or `fastlm-train`).

With no --data it trains on the Python standard library's own source files, which every
machine with Python has. Data is a text file or a folder (every *.py, *.txt, *.md file under
it, sorted), tokenized to bytes (vocabulary 256) or, with --tokenizer gpt2, with the GPT-2 BPE
found locally (a folder, or the HF cache; never downloaded here).

AdamW (no decay on biases, norms and embeddings), cosine learning rate with linear warm-up,
gradient accumulation, gradient clipping, bf16 autocast on GPUs that have it (fp16 with a
GradScaler otherwise; fp32 on CPU unless --dtype says), eval loss every --eval-interval steps,
checkpoints (model, optimizer, step, configs) to --out every --ckpt-interval steps and at the
end, --resume to continue from the checkpoint there. Batches are a pure function of (seed,
step), so a resumed run sees exactly the batches the uninterrupted one would have.

Mixture-of-experts presets (moe-tiny): the loss reported is the LM loss; the MoE layers' aux
losses are added to it for the backward and shown beside it, with the expert load of the step
(the least and most loaded expert's share of the kept assignments, 1/E each when balanced, and
the share capacity dropped; each averaged over layers). --capacity-factor turns on dropping.

Distributed: under torchrun (RANK/WORLD_SIZE set) each rank trains on its slice of the same
global batch, wrapped in DistributedDataParallel (--dist ddp, nccl on GPU, gloo on CPU) or
FSDP2's fully_shard (--dist fsdp, where torch has it); --batch-size is per rank.
--expert-parallel (MoE presets, --dist ddp): each of the P ranks keeps E/P of every MoE layer's
experts and the ranks trade tokens with all-to-alls (fastlm.nn.MoE's process_group); DDP averages
everything else. The run is the data-parallel one computed another way: same losses, gradient
norms and checkpoint (the experts gathered back into one state dict).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import sysconfig
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

from fastlm.models import GPT, GPTConfig

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")


@dataclass
class TrainConfig:
    data: str | None = None  # text file or folder; None: the Python standard library's sources
    max_bytes: int = 8_000_000  # read at most this much text (the whole stdlib is ~40 MB)
    tokenizer: str = "byte"  # "byte" | "gpt2" (local files only) | a local tokenizer folder
    preset: str = "small"  # a GPTConfig preset
    capacity_factor: float = 0.0  # MoE presets: GShard capacity factor (excess assignments dropped); 0: dropless
    block_size: int = 128
    pack: bool = False  # documents (files) end to end with cu_seqlens: no attention or targets across them
    batch_size: int = 16  # sequences per micro-step, per rank
    grad_accum: int = 1
    max_steps: int = 200
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 50
    eval_batches: int = 8
    log_interval: int = 25
    ckpt_interval: int = 0  # 0: only at the end
    stop_step: int = 0  # stop (and checkpoint) after this step, schedule unchanged; 0: run to max_steps
    out: str = "fastlm-run"
    resume: bool = False
    seed: int = 1337
    dtype: str = "auto"  # "auto" | "fp32" | "bf16" | "fp16" (autocast dtype)
    backend: str | None = None  # pin a fastlm backend for the whole run ("reference" to compare)
    compile: bool = False
    dist: str = "ddp"  # "ddp" | "fsdp" (under torchrun)
    expert_parallel: bool = False  # MoE presets under torchrun, --dist ddp: E/P experts per rank
    device: str = "auto"
    progress: bool = True


# ---------------------------------------------------------------- data
def corpus_files(data: str | None) -> list[Path]:
    root = Path(data) if data else Path(sysconfig.get_paths()["stdlib"])
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"train: data {str(root)!r} is neither a file nor a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"train: no {'/'.join(TEXT_SUFFIXES)} files under {root}")
    return files


def read_documents(data: str | None, max_bytes: int) -> list[str]:
    """The corpus files' texts (one document each), at most max_bytes characters in all."""
    parts, total = [], 0
    for path in corpus_files(data):
        text = path.read_text(encoding="utf-8", errors="replace")[:max_bytes - total]
        parts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return parts


def read_text(data: str | None, max_bytes: int) -> str:
    return "\n".join(read_documents(data, max_bytes))[:max_bytes]


def tokenize_documents(tok, docs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, starts): the documents' tokens end to end, and a bool per token, True where a
    document begins."""
    ids = [torch.tensor(tok.encode(d), dtype=torch.int32) for d in docs]
    ids = [t for t in ids if len(t)]
    starts = torch.zeros(sum(len(t) for t in ids), dtype=torch.bool)
    starts[torch.tensor([0] + [len(t) for t in ids[:-1]]).cumsum(0)] = True
    return torch.cat(ids), starts


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def make_tokenizer(name: str):
    if name == "byte":
        return ByteTokenizer()
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained("gpt2" if name == "gpt2" else name, local_files_only=True)
    except (ImportError, OSError) as e:
        raise RuntimeError(f"train: tokenizer {name!r} is not available locally ({e}); use --tokenizer byte") from e


class Batches:
    """Random windows of the token stream. Batch (split, step, micro) is a pure function of the
    seed, so runs are reproducible and resumable; rank r of w takes rows [r*B, (r+1)*B) of the
    global batch of w*B rows, so w ranks together see what one process with w*B rows sees."""

    def __init__(self, tokens: torch.Tensor, block_size: int, seed: int, doc_starts: torch.Tensor | None = None):
        n = int(0.9 * len(tokens))
        self.splits = {"train": tokens[:n], "val": tokens[n:]}
        self.starts = None if doc_starts is None else {"train": doc_starts[:n], "val": doc_starts[n:]}
        self.block_size, self.seed = block_size, seed
        for split, t in self.splits.items():
            if len(t) <= block_size + 1:
                raise ValueError(f"train: the {split} split has {len(t)} tokens, fewer than block_size + 2")

    def get(self, split: str, step: int, micro: int, batch_size: int, rank: int = 0, world: int = 1):
        data = self.splits[split]
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step * 4099 + micro * 2 + (split == "val")) % 2**62)
        starts = torch.randint(len(data) - self.block_size - 1, (batch_size * world,), generator=g)
        starts = starts[rank * batch_size:(rank + 1) * batch_size]  # (B,)
        offsets = torch.arange(self.block_size + 1)
        windows = data[starts[:, None] + offsets].long()  # (B, T + 1)
        if self.starts is None:
            return windows[:, :-1], windows[:, 1:]  # inputs (B, T), targets (B, T)
        return self._packed(windows, self.starts[split][starts[:, None] + offsets])

    def _packed(self, windows, begins):
        """Packed documents: each row is cut where a document begins (cu_seqlens over the B*T
        tokens), and the target of a document's last token (the next one's first) is ignored."""
        B, T = windows.shape[0], self.block_size
        cut = begins[:, :-1].clone()  # (B, T): a segment starts here
        cut[:, 0] = True  # every row starts one
        targets = windows[:, 1:].masked_fill(begins[:, 1:], -100)
        bounds = cut.flatten().nonzero().flatten().to(torch.int32)
        cu = torch.cat([bounds, torch.tensor([B * T], dtype=torch.int32)])
        return windows[:, :-1], targets, cu


# ---------------------------------------------------------------- optimisation
def lr_at(step: int, c: TrainConfig) -> float:
    """Linear warm-up to lr, then cosine down to min_lr at max_steps."""
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    progress = min(1.0, (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps))
    return c.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (c.lr - c.min_lr)


def make_optimizer(model: torch.nn.Module, c: TrainConfig, fused: bool) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wte" not in n and "wpe" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "wte" not in n and "wpe" not in n)]
    groups = [dict(params=decay, weight_decay=c.weight_decay), dict(params=other, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=c.lr, betas=(0.9, 0.95), fused=fused or None)


def autocast_dtype(c: TrainConfig, device: torch.device) -> torch.dtype | None:
    if c.dtype == "fp32" or (c.dtype == "auto" and device.type != "cuda"):
        return None
    if c.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[c.dtype]


# ---------------------------------------------------------------- distributed
def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank), starting the process group under torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def shard_experts(model: GPT, c: TrainConfig, world: int) -> list[str]:
    """--expert-parallel: every MoE layer keeps this rank's E/world experts; returns their
    parameters' names (which DDP must leave alone)."""
    if not c.expert_parallel:
        return []
    why = ("it needs torchrun with 2 or more ranks" if world < 2 else
           f"preset {c.preset!r} has no experts" if model.config.moe is None else
           f"it runs with --dist ddp, not {c.dist!r}" if c.dist != "ddp" else
           f"{model.config.moe.num_experts} experts don't split over {world} ranks"
           if model.config.moe.num_experts % world else "")
    if why:
        raise ValueError(f"train: --expert-parallel can't be used here: {why}")
    for layer in model.moe_layers():
        layer.shard_experts_(dist.group.WORLD)
    return [n for n, _ in model.named_parameters() if ".experts." in n]


def wrap_distributed(model: GPT, c: TrainConfig, device: torch.device, experts: list[str]) -> torch.nn.Module:
    if c.dist == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as e:
            raise RuntimeError("train: --dist fsdp needs torch with FSDP2 (torch.distributed.fsdp.fully_shard)") from e
        for block in model.transformer.h:
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    # each rank's experts are its own: not broadcast from rank 0, their gradients not averaged
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, experts)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_mean(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= world
    return x


def clip_gradients(model: torch.nn.Module, experts: list[str], max_norm: float, world: int) -> torch.Tensor:
    """clip_grad_norm_ of the whole model. With sharded experts each rank holds its own experts'
    gradients: they sum the tokens of every rank, so divided by `world` they are what DDP's
    average gives the data-parallel run; the norm's square sums them over ranks."""
    if not experts:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    replicated, own = [], []
    for name, p in model.named_parameters():
        if p.grad is not None:
            (own if name.removeprefix("module.") in experts else replicated).append(p.grad)
    torch._foreach_div_(own, float(world))
    zero = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    own_square = sum((g.double().square().sum() for g in own), zero)
    dist.all_reduce(own_square)
    norm = (sum((g.double().square().sum() for g in replicated), zero) + own_square).sqrt().float()
    torch._foreach_mul_(replicated + own, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm


# ---------------------------------------------------------------- checkpoints
def _gather_experts(tensors: dict, experts: list[str]) -> None:
    """The sharded experts' tensors (weights, or an optimizer state's per-parameter dicts) become
    the whole layer's: every rank's E/P experts concatenated in rank order."""
    for name in experts:
        entry = tensors[name]
        items = entry.items() if isinstance(entry, dict) else [(None, entry)]
        for key, t in list(items):
            if not isinstance(t, torch.Tensor) or t.dim() == 0:
                continue  # e.g. Adam's step count
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, t.contiguous())
            whole = torch.cat(parts).cpu()
            if key is None:
                tensors[name] = whole
            else:
                entry[key] = whole


def _slice_experts(tensors: dict, experts: list[str]) -> None:
    """The inverse of _gather_experts for this rank, on a checkpoint's whole state."""
    world, rank = dist.get_world_size(), dist.get_rank()
    for name in experts:
        entry = tensors[name]
        items = entry.items() if isinstance(entry, dict) else [(None, entry)]
        for key, t in list(items):
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                local = t.shape[0] // world
                part = t[rank * local:(rank + 1) * local]
                if key is None:
                    tensors[name] = part
                else:
                    entry[key] = part


def _state(model, optimizer, world, experts):
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        # cpu_offload keeps the result on rank 0 only; gathering the experts needs every rank's
        options = StateDictOptions(full_state_dict=True, cpu_offload=not experts)
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        if experts:
            _gather_experts(model_state, experts)
            _gather_experts(optim_state["state"], experts)
        return model_state, optim_state
    return model.state_dict(), optimizer.state_dict()


def save_checkpoint(path: Path, model, optimizer, step: int, c: TrainConfig, gc: GPTConfig, history, world, rank,
                    experts=()):
    model_state, optim_state = _state(model, optimizer, world, list(experts))
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(dict(model=model_state, optimizer=optim_state, step=step, train_config=asdict(c),
                        model_config=asdict(gc), history=history), tmp)
        os.replace(tmp, path)


def load_checkpoint(path: Path, model, optimizer, world, experts=()) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        if experts:
            _slice_experts(ckpt["model"], list(experts))
            _slice_experts(ckpt["optimizer"]["state"], list(experts))
        set_state_dict(model, optimizer, model_state_dict=ckpt["model"], optim_state_dict=ckpt["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt


# ---------------------------------------------------------------- the loop
def _call(step_fn, batch, device):
    """The model on (inputs, targets) or, packed, (inputs, targets, cu_seqlens)."""
    x, y = batch[0].to(device), batch[1].to(device)
    return step_fn(x, y) if len(batch) == 2 else step_fn(x, y, cu_seqlens=batch[2].to(device))


MOE_STATS = ("aux_loss", "expert_share_min", "expert_share_max", "drop_rate")


def moe_stats(model: GPT) -> torch.Tensor:
    """(aux loss, least and most loaded expert's share, dropped share) of the last forward; the
    shares averaged over MoE layers. One tensor, so logging costs one device sync."""
    layers = model.moe_layers()
    load = torch.stack([m.expert_load for m in layers])  # (layers, E)
    drop = torch.stack([m.drop_rate for m in layers])  # (layers,)
    return torch.stack([model.aux_loss().detach().float(), load.min(1).values.mean(), load.max(1).values.mean(),
                        drop.mean()])


def moe_message(stats) -> str:
    aux, lo, hi, drop = stats
    return f"aux {aux:.4f}, expert share min/max {lo:.3f}/{hi:.3f}, dropped {100 * drop:.1f}%"


def train(c: TrainConfig) -> dict:
    """Run training; returns the history: step, loss, lr, grad_norm per step and eval losses."""
    rank, world, local = dist_info()
    if c.device == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(c.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tok = make_tokenizer(c.tokenizer)
    if c.pack:
        tokens, doc_starts = tokenize_documents(tok, read_documents(c.data, c.max_bytes))
    else:
        tokens, doc_starts = torch.tensor(tok.encode(read_text(c.data, c.max_bytes)), dtype=torch.int32), None
    batches = Batches(tokens, c.block_size, c.seed, doc_starts)

    torch.manual_seed(c.seed)  # same initial weights on every rank
    gc = GPTConfig.preset(c.preset, vocab_size=tok.vocab_size, block_size=c.block_size)
    if c.capacity_factor:
        if gc.moe is None:
            raise ValueError(f"train: --capacity-factor applies to MoE presets, and {c.preset!r} has no experts")
        gc.moe.capacity_factor = c.capacity_factor
    moe = gc.moe is not None
    raw = GPT(gc, backend=c.backend).to(device)
    experts = shard_experts(raw, c, world)  # after the whole model is built: the same weights as without
    model = wrap_distributed(raw, c, device, experts) if world > 1 else raw
    optimizer = make_optimizer(model, c, fused=device.type == "cuda")  # after fully_shard swaps the Parameters
    ckpt_path = Path(c.out) / "ckpt.pt"
    history = dict(step=[], loss=[], lr=[], grad_norm=[], eval_step=[], eval_loss=[], **{k: [] for k in MOE_STATS if moe})
    start = 0
    if c.resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, model, optimizer, world, experts)
        start, history = ckpt["step"], ckpt["history"]
        if rank == 0:
            print(f"resumed from {ckpt_path} at step {start}")
    step_fn = torch.compile(model) if c.compile else model
    amp = autocast_dtype(c, device)
    autocast = torch.autocast(device.type, dtype=amp) if amp else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    def forward(batch):
        """(the loss to backpropagate, the LM loss alone): MoE adds its layers' aux losses to the first."""
        _, loss = _call(step_fn, batch, device)
        return loss, raw.lm_loss if moe else loss.detach()

    def evaluate(step: int) -> float:
        model.eval()
        with torch.no_grad(), autocast:
            losses = [forward(batches.get("val", 0, i, c.batch_size, rank, world))[1] for i in range(c.eval_batches)]
        model.train()
        return all_mean(torch.stack(losses).mean().float(), world).item()

    if rank == 0:
        print(f"fastlm.train: {raw.num_params() / 1e6:.2f}M parameters ({c.preset}), {len(tokens):,} tokens, "
              f"{world} rank(s) on {device}, batch {c.batch_size}x{c.grad_accum}x{world} of {c.block_size}, "
              f"autocast {amp}, backend {c.backend or 'auto'}{', documents packed' if c.pack else ''}"
              f"{f', experts sharded over {world} ranks' if experts else ''}")
    bar = None
    if c.progress and rank == 0:
        try:
            from tqdm import tqdm

            bar = tqdm(total=c.max_steps, initial=start, desc="train", dynamic_ncols=True)
        except ImportError:
            bar = None
    model.train()
    t0 = time.perf_counter()
    end = min(c.max_steps, c.stop_step) if c.stop_step else c.max_steps
    for step in range(start, end):
        lr = lr_at(step, c)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=device)
        stats = torch.zeros(len(MOE_STATS), device=device)
        for micro in range(c.grad_accum):
            batch = batches.get("train", step, micro, c.batch_size, rank, world)
            sync = micro == c.grad_accum - 1 or world == 1 or c.dist != "ddp"
            with (nullcontext() if sync else model.no_sync()), autocast:
                loss, lm_loss = forward(batch)
                scaler.scale(loss / c.grad_accum).backward()
            total += lm_loss.float() / c.grad_accum
            if moe:
                stats += moe_stats(raw) / c.grad_accum
        scaler.unscale_(optimizer)
        norm = clip_gradients(model, experts, c.grad_clip if c.grad_clip > 0 else float("inf"), world)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss_value = all_mean(total, world).item()
        history["step"].append(step + 1)
        history["loss"].append(loss_value)
        history["lr"].append(lr)
        history["grad_norm"].append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        stats = all_mean(stats, world).tolist() if moe else []
        for key, value in zip(MOE_STATS, stats):
            history[key].append(value)
        done = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", **({"moe": moe_message(stats)} if moe else {}))
        if rank == 0 and (done % c.log_interval == 0 or done == 1 or done == c.max_steps):
            routing = f"{moe_message(stats)}, " if moe else ""
            msg = f"step {done}: loss {loss_value:.4f}, {routing}lr {lr:.2e}, {time.perf_counter() - t0:.1f}s"
            (bar.write if bar is not None else print)(msg)
        if c.eval_interval and (done % c.eval_interval == 0 or done == c.max_steps):
            val = evaluate(done)
            history["eval_step"].append(done)
            history["eval_loss"].append(val)
            if rank == 0:
                (bar.write if bar is not None else print)(f"step {done}: eval loss {val:.4f}")
        if c.ckpt_interval and done % c.ckpt_interval == 0 and done < end:
            save_checkpoint(ckpt_path, model, optimizer, done, c, gc, history, world, rank, experts)
    if bar is not None:
        bar.close()
    if end > start:
        save_checkpoint(ckpt_path, model, optimizer, end, c, gc, history, world, rank, experts)
    if rank == 0 and history["loss"]:
        last = f" ({moe_message([history[k][-1] for k in MOE_STATS])})" if moe else ""
        print(f"first loss {history['loss'][0]:.4f}, last loss {history['loss'][-1]:.4f}{last}; checkpoint {ckpt_path}")
    return history


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="fastlm-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=f.default)
    return TrainConfig(**vars(p.parse_args(argv)))


def main(argv=None) -> int:
    train(parse_args(argv))
    if dist.is_initialized():
        dist.barrier()  # every rank leaves together: tearing gloo down under a busy peer can abort
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
