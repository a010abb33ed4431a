"""The tolerance rule of DESIGN.md, in one place.

fp32/fp64 outputs: allclose to the fp64 oracle with the table below.
fp16/bf16 outputs: max error against the fp64 oracle at most FACTOR x (3x for gradients) the
error of plain PyTorch run in the same low precision, plus one unit in the last place of the
oracle's largest magnitude as a floor (so exact baselines like relu don't demand perfection
beyond the dtype). A NaN where the oracle has none always fails.
"""
import torch

FP32_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}
FACTOR = {"out": 2.0, "grad": 3.0}


def assert_close(name, out, oracle, baseline=None, kind="out", atol=0.0, fp32_tol=None):
    """atol: an extra absolute floor for low precision, for oracles that are exactly 0 by structure.
    fp32_tol: rtol/atol replacing the table for fp32 (DESIGN.md allows 1e-5..1e-4)."""
    assert out.shape == oracle.shape, f"{name}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    out64, oracle64 = out.detach().double().cpu(), oracle.detach().double().cpu()
    bad_nan = torch.isnan(out64) & ~torch.isnan(oracle64)
    assert not bad_nan.any(), f"{name}: {int(bad_nan.sum())} NaN(s) where the oracle has none"
    if out.dtype in FP32_TOL:
        torch.testing.assert_close(out64, oracle64, **(fp32_tol or FP32_TOL[out.dtype]), equal_nan=True, msg=lambda m: f"{name}: {m}")
        return
    assert baseline is not None, f"{name}: low-precision checks need the plain-PyTorch baseline"
    if out.numel() == 0:
        return
    err = (out64 - oracle64).abs().nan_to_num(0).max().item()
    base = (baseline.detach().double().cpu() - oracle64).abs().nan_to_num(0).max().item()
    ulp = torch.finfo(out.dtype).eps * oracle64.abs().nan_to_num(0).max().item()
    limit = FACTOR[kind] * base + ulp + atol
    assert err <= limit, f"{name}: max error {err:.3g} > {FACTOR[kind]}x plain-PyTorch error {base:.3g} + ulp {ulp:.3g}"
