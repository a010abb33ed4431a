"""Drop-in torch.nn twins that run on fastlm ops (same constructor arguments and state_dict keys)."""
from fastlm.nn.attention import MultiheadAttention, TransformerEncoderLayer
from fastlm.nn.modules import GELU, MLP, CrossEntropyLoss, LayerNorm, Linear, ReLU, RMSNorm, SiLU, Softmax

__all__ = ["Linear", "LayerNorm", "RMSNorm", "GELU", "ReLU", "SiLU", "Softmax", "CrossEntropyLoss",
           "MultiheadAttention", "TransformerEncoderLayer", "MLP"]
