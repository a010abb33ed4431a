"""Models built from fastlm.nn and fastlm.ops: the GPT decoder (GPT-2 family, LLaMA-style options,
mixture-of-experts blocks)."""
from fastlm.models.gpt import GPT, PRESETS, GPTConfig, KVCache, MoEConfig, sample

__all__ = ["GPT", "GPTConfig", "KVCache", "MoEConfig", "PRESETS", "sample"]
