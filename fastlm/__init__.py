"""fastlm: hand-written fused Transformer kernels as PyTorch ops and drop-in modules.

    import fastlm
    y = fastlm.ops.bias_act(x, b, "gelu")          # picks the best backend for x
    with fastlm.use_backend("reference"):          # or pin one for a block
        ...
    fastlm.nn.Linear(...), fastlm.models.GPT, fastlm.patch(model)   # modules, decoder, patching
`python -m fastlm info` shows which backends serve which op on this machine, and why not.
"""
import sys
import warnings

from fastlm import _ext
from fastlm.backend import BackendUnavailableError, use_backend
from fastlm import ops
from fastlm import nn, models
from fastlm.patch import PatchReport, patch, register_hf_attention

__version__ = "0.1.0"
__all__ = ["ops", "nn", "models", "patch", "PatchReport", "register_hf_attention", "use_backend", "BackendUnavailableError", "__version__"]

if "transformers" in sys.modules:  # make attn_implementation="fastlm" available right away
    register_hf_attention()

_missing = _ext.missing_message()
if _missing:
    warnings.warn(_missing, RuntimeWarning, stacklevel=2)
