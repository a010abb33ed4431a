"""Skip markers for tests that need fastlm ops from branches not merged into this one yet.

A test marked `needs("linear")` runs as soon as `fastlm.ops.linear` exists, and is reported
as skipped (with the op's name) until then.
"""
import pytest

import fastlm


def missing(*names: str) -> list[str]:
    return [n for n in names if not callable(getattr(fastlm.ops, n, None))]  # a submodule of that name is not the op


def needs(*names: str):
    gone = missing(*names)
    return pytest.mark.skipif(bool(gone), reason="waiting on fastlm.ops." + ", fastlm.ops.".join(gone) + " (not merged yet)")


MODEL_OPS = ("linear", "layer_norm", "rms_norm", "softmax", "linear_cross_entropy", "scaled_dot_product_attention")
