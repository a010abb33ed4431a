"""Fused ops. Each module holds the public function, its pure-PyTorch reference, the custom
op registration (with fake impl and autograd) and the per-backend dispatch."""
from fastlm.ops.bias_act import bias_act, bias_act_ref
from fastlm.ops.linear import linear, linear_ref
from fastlm.ops.mlp import geglu, mlp, mlp_ref, swiglu
from fastlm.ops.norms import layer_norm, layer_norm_ref, rms_norm, rms_norm_ref

__all__ = [
    "bias_act", "bias_act_ref", "linear", "linear_ref", "mlp", "mlp_ref", "swiglu", "geglu",
    "layer_norm", "layer_norm_ref", "rms_norm", "rms_norm_ref",
]
