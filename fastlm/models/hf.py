"""HF GPT-2 weights -> fastlm GPT: config mapping and the Conv1D transposes.

Sources accepted by `load_gpt2` (and `GPT.from_hf`):
- an in-memory HF model (GPT2LMHeadModel or GPT2Model: anything with .state_dict() and .config);
- a state_dict (config inferred from the shapes, n_head = n_embd // 64, unless `config` is given);
- a local folder with config.json and *.safetensors or *.bin weight files (sharded too);
- a hub name ("gpt2", "openai-community/gpt2-medium", ...), through transformers, where the
  network (or the local HF cache) allows.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fastlm.models.gpt import GPTConfig

# HF GPT-2 stores these as Conv1D weights, (in, out): nn.Linear wants (out, in)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SKIP = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older transformers versions
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                  "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}


def config_from_hf(hf) -> GPTConfig:
    """GPTConfig from an HF GPT2Config (object or its dict)."""
    get = hf.get if isinstance(hf, dict) else lambda k, d=None: getattr(hf, k, d)
    act = get("activation_function", "gelu_new")
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"from_hf: activation_function {act!r} is not supported; expected one of {', '.join(HF_ACTIVATIONS)}")
    return GPTConfig(vocab_size=get("vocab_size"), block_size=get("n_positions"), n_layer=get("n_layer"),
                     n_head=get("n_head"), n_embd=get("n_embd"), hidden_size=get("n_inner") or 4 * get("n_embd"),
                     norm_eps=get("layer_norm_epsilon", 1e-5), activation=HF_ACTIVATIONS[act],
                     tie_embeddings=get("tie_word_embeddings", True))


def config_from_state(state: dict) -> GPTConfig:
    wte, wpe = state["transformer.wte.weight"], state["transformer.wpe.weight"]
    n_layer = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.h."))
    n_embd = wte.shape[1]
    return GPTConfig(vocab_size=wte.shape[0], block_size=wpe.shape[0], n_layer=n_layer, n_head=max(1, n_embd // 64),
                     n_embd=n_embd, hidden_size=state["transformer.h.0.mlp.c_fc.weight"].shape[0])  # converted: (out, in)


def convert_state(state: dict) -> dict:
    """HF GPT-2 keys and layouts -> fastlm GPT's (GPT2Model keys gain the "transformer." prefix)."""
    out = {}
    for key, value in state.items():
        if key.endswith(SKIP):
            continue
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key
        out[key] = value.t().contiguous() if key.endswith(CONV1D) else value
    return out


def _read_folder(folder: Path) -> tuple[dict, dict]:
    with open(folder / "config.json") as f:
        hf_config = json.load(f)
    state = {}
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        for file in files:
            state.update(load_file(str(file)))
    else:
        files = sorted(folder.glob("*.bin"))
        for file in files:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    if not files:
        raise FileNotFoundError(f"from_hf: no *.safetensors or *.bin weight files in {folder}")
    return hf_config, state


def load_gpt2(source, config: GPTConfig | None = None) -> tuple[GPTConfig, dict]:
    """(GPTConfig, state_dict in fastlm GPT's naming and layout) from an HF GPT-2 source."""
    hf_config = None
    if isinstance(source, torch.nn.Module):
        hf_config, state = getattr(source, "config", None), source.state_dict()
    elif isinstance(source, dict):
        state = source
    elif isinstance(source, (str, os.PathLike)):
        if Path(source).is_dir():
            hf_config, state = _read_folder(Path(source))
        else:  # a hub name: transformers resolves it (its cache, or the network)
            from transformers import GPT2LMHeadModel

            model = GPT2LMHeadModel.from_pretrained(str(source))
            hf_config, state = model.config, model.state_dict()
    else:
        raise TypeError(f"from_hf: source must be an HF model, a state_dict, a folder or a hub name; "
                        f"got {type(source).__name__}")
    state = convert_state(state)
    if config is None:
        config = config_from_hf(hf_config) if hf_config is not None else config_from_state(state)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return config, state
