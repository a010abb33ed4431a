"""Fused ops. Each module holds the public function, its pure-PyTorch reference, the custom
op registration (with fake impl and autograd) and the per-backend dispatch."""
from fastlm.ops.bias_act import bias_act, bias_act_ref
from fastlm.ops.cross_entropy import cross_entropy
from fastlm.ops.linear_cross_entropy import linear_cross_entropy
from fastlm.ops.softmax import log_softmax, softmax, softmax_ref

__all__ = ["bias_act", "bias_act_ref", "cross_entropy", "linear_cross_entropy", "log_softmax", "softmax", "softmax_ref"]
