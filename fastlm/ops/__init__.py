"""Fused ops. Each module holds the public function, its pure-PyTorch reference, the custom
op registration (with fake impl and autograd) and the per-backend dispatch."""
from fastlm.ops.attention import (
    scaled_dot_product_attention,
    scaled_dot_product_attention_ref,
    scaled_dot_product_attention_with_lse,
)
from fastlm.ops.base_assignment import base_assignment
from fastlm.ops.bias_act import bias_act, bias_act_ref
from fastlm.ops.cross_entropy import cross_entropy
from fastlm.ops.decode_attention import decode_attention
from fastlm.ops.linear import linear, linear_ref
from fastlm.ops.linear_cross_entropy import linear_cross_entropy
from fastlm.ops.linear_prepacked import PackedWeight, linear_prepacked, prepack_available
from fastlm.ops.mlp import gated_mlp, geglu, mlp, mlp_ref, swiglu
from fastlm.ops.grouped_linear import grouped_linear, grouped_swiglu
from fastlm.ops.moe_mlp import MoEOutput, moe_experts, moe_mlp
from fastlm.ops.moe_permute import moe_permute, moe_unpermute
from fastlm.ops.moe_router import RouterOutput, moe_router
from fastlm.ops.norms import layer_norm, layer_norm_ref, rms_norm, rms_norm_ref
from fastlm.ops.rope import rope, rope_frequencies, rope_ref
from fastlm.ops.softmax import log_softmax, softmax, softmax_ref
from fastlm.ops.varlen_attention import varlen_attention

__all__ = [
    "bias_act", "bias_act_ref", "cross_entropy", "linear", "linear_ref", "linear_cross_entropy",
    "linear_prepacked", "PackedWeight", "prepack_available",
    "mlp", "mlp_ref", "swiglu", "geglu", "gated_mlp", "layer_norm", "layer_norm_ref", "rms_norm", "rms_norm_ref",
    "rope", "rope_frequencies", "rope_ref", "log_softmax", "softmax", "softmax_ref", "scaled_dot_product_attention",
    "scaled_dot_product_attention_ref", "scaled_dot_product_attention_with_lse", "varlen_attention",
    "decode_attention", "moe_router", "RouterOutput", "moe_permute", "moe_unpermute", "grouped_linear",
    "grouped_swiglu", "moe_mlp", "moe_experts", "MoEOutput", "base_assignment",
]
