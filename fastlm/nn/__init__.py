"""Drop-in torch.nn twins that run on fastlm ops (same constructor arguments and state_dict keys)."""
from torch import nn as _nn

from fastlm.nn.attention import MultiheadAttention, TransformerEncoderLayer
from fastlm.nn.modules import GELU, MLP, CrossEntropyLoss, LayerNorm, Linear, ReLU, RMSNorm, SiLU, Softmax
from fastlm.nn.moe import MoE

__all__ = ["Linear", "LayerNorm", "RMSNorm", "GELU", "ReLU", "SiLU", "Softmax", "CrossEntropyLoss",
           "MultiheadAttention", "TransformerEncoderLayer", "MLP", "MoE", "prepack"]


def prepack(model: _nn.Module, enabled: bool = True, *, min_elements: int = 1 << 16) -> list[str]:
    """Turn weight prepacking (Linear.prepack) on or off for every fastlm.nn.Linear in `model` whose
    weight has at least `min_elements` (smaller ones gain nothing: MKL's pack has a ~8 MB floor).
    CPU float32 inference only; returns the names of the Linears now prepacked."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            if module.prepack(enabled and module.weight.numel() >= min_elements):
                names.append(name)
    return names
