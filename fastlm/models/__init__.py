"""Models built from fastlm.nn and fastlm.ops: the GPT decoder (GPT-2 family, LLaMA-style options)."""
from fastlm.models.gpt import GPT, PRESETS, GPTConfig, KVCache, sample

__all__ = ["GPT", "GPTConfig", "KVCache", "PRESETS", "sample"]
