"""fastlm: hand-written fused Transformer kernels as PyTorch ops and drop-in modules.

    import fastlm
    y = fastlm.ops.bias_act(x, b, "gelu")          # picks the best backend for x
    with fastlm.use_backend("reference"):          # or pin one for a block
        ...
`python -m fastlm info` shows which backends serve which op on this machine, and why not.
"""
import warnings

from fastlm import _ext
from fastlm.backend import BackendUnavailableError, use_backend
from fastlm import ops

__version__ = "0.1.0"
__all__ = ["ops", "use_backend", "BackendUnavailableError", "__version__"]

_missing = _ext.missing_message()
if _missing:
    warnings.warn(_missing, RuntimeWarning, stacklevel=2)
