"""The Hopper tier of the cuda GEMM (csrc/cuda/gemm_sm90.cuh) under the emulator's sm_90 profile:
linear's forward (every epilogue), dX and dW against the float64 oracle on ragged shapes, and the
tier decision (gemm::use_sm90_tier), seen through what ran: the Hopper kernel's blocks are 384
threads (a producer and two consumer warpgroups), the sm_80 tier's 128."""
import pytest
import torch

from backends import emulated_gpu
from fastlm import _ext
from fastlm.ops.bias_act import ACTIVATIONS, act_ref
from numerics import assert_close

pytestmark = pytest.mark.skipif(not _ext.HAS_EMULATOR, reason="the emulator extension is not built")
# The emulator executes wgmma from the sm_90 primitives' stage 3 on; until then only the
# decision's sm_80 side runs here (the kernel itself is checked by its sm_90a SASS).
EMULATED_WGMMA = True
needs_wgmma = pytest.mark.skipif(not EMULATED_WGMMA, reason="the emulator does not execute wgmma yet")
HOPPER_THREADS, SM80_THREADS = 384, 128
DTYPES = (torch.float16, torch.bfloat16)


@pytest.fixture
def ops():
    """torch.ops.fastlm_emu on the emulator's "9.0" (H100 / H200) profile."""
    with emulated_gpu() as emu:
        yield emu


def _run(ops, fn):
    """fn()'s result and the block size of every launch it made (one per launch: all equal)."""
    before = ops.emu_stats()
    out = fn()
    launches, blocks, threads, *_, faults = (a - b for a, b in zip(ops.emu_stats(), before))
    assert faults == 0 and blocks > 0
    return out, launches, threads // blocks


def _operands(M, N, K, dtype):
    x = torch.randn(M, K, dtype=dtype)
    w = (torch.randn(N, K) / K**0.5).to(dtype)
    return x, w, torch.randn(N, dtype=dtype), torch.randn(M, N, dtype=dtype)


@pytest.mark.parametrize("arch,M", [("9.0", 64), ("8.0", 130)])
def test_small_m_and_other_archs_stay_on_the_sm80_tier(ops, arch, M):
    """M <= 64 (decode: split-K's territory) on sm_90, and any M on sm_80, run the sm_80 tier."""
    ops.emu_set_arch(arch)
    x, w, b, r = _operands(M, 136, 72, torch.float16)
    (y, _), launches, block = _run(ops, lambda: ops.linear_fwd(x, w, b, r, "none", False))
    assert (launches, block) == (1, SM80_THREADS)
    z64 = x.double() @ w.double().t() + b.double() + r.double()
    assert_close("sm_80 tier y", y, z64, (x.float() @ w.float().t() + b.float() + r.float()).to(x.dtype))


@needs_wgmma
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_every_epilogue(ops, dtype):
    """Ragged M, N and K (130 x 136 x 72: 2 x 2 tiles, the second K tile 8 deep) with each
    activation; bias, residual and the saved pre-activation on and off across them."""
    M, N, K = 130, 136, 72
    for i, act in enumerate((None,) + ACTIVATIONS):
        x, w, b, r = _operands(M, N, K, dtype)
        b, r = (b if i != 1 else None), (r if i % 2 == 0 else None)
        save = i != 0
        (y, pre), launches, block = _run(ops, lambda: ops.linear_fwd(x, w, b, r, act or "none", save))
        assert (launches, block) == (1, HOPPER_THREADS), f"{act}: not the Hopper tier"
        bias64 = b.double() if b is not None else 0.0
        z64 = x.double() @ w.double().t() + bias64
        z = (x.float() @ w.float().t() + (b.float() if b is not None else 0.0)).to(dtype)
        if save:
            assert_close(f"{act} preact", pre, z64, z)
        y64 = act_ref(z64.to(dtype).double(), act) if act else z64
        y0 = act_ref(z.float(), act) if act else z.float()
        if r is not None:
            y64, y0 = y64 + r.double(), y0 + r.float()
        assert_close(f"{act} y", y, y64, y0.to(dtype))


@needs_wgmma
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_dx_and_dw(ops, dtype):
    """dX = grad_p @ w (B read MN-major) and dW = grad_p^T @ x (both MN-major), ragged: the
    dX GEMM is 130 x 72 x 136, the dW GEMM 136 x 72 x 130. The operands are column slices of
    wider tensors: the tensor maps' row strides are not the row lengths."""
    M, N, K = 130, 136, 72
    x, w, _, gp = _operands(M, N, K, dtype)
    x, w, gp = (torch.cat([t, torch.randn(t.shape[0], pad, dtype=dtype)], 1)[:, : t.shape[1]]
                for t, pad in ((x, 16), (w, 8), (gp, 8)))
    assert (x.stride(0), w.stride(0), gp.stride(0)) == (K + 16, K + 8, N + 8)
    (gx, gw), launches, block = _run(ops, lambda: ops.linear_bwd(gp, x, w))
    assert (launches, block) == (2, HOPPER_THREADS)
    assert_close("grad_x", gx, gp.double() @ w.double(), (gp.float() @ w.float()).to(dtype), kind="grad")
    assert_close("grad_w", gw, gp.double().t() @ x.double(), (gp.float().t() @ x.float()).to(dtype), kind="grad")


@needs_wgmma
def test_persistent_ctas_and_the_ring_wrapping(ops, monkeypatch):
    """One CTA runs all 4 tiles of 130 x 136, 6 K tiles each (K = 328, the last 8 deep): 24 K tiles
    through the 4-stage ring (its barriers' phases flip 6 times, across tile boundaries), and the
    epilogue stage reused per tile; M = 65 is the smallest M the tier takes."""
    monkeypatch.setenv("FASTLM_EMU_GEMM_CTAS", "1")
    for M in (130, 65):
        x, w, b, r = _operands(M, 136, 328, torch.bfloat16)
        (y, pre), launches, block = _run(ops, lambda: ops.linear_fwd(x, w, b, r, "gelu", True))
        assert (launches, block) == (1, HOPPER_THREADS)
        z64 = x.double() @ w.double().t() + b.double()
        z = (x.float() @ w.float().t() + b.float()).to(x.dtype)
        assert_close("persistent preact", pre, z64, z)
        y64 = act_ref(z64.to(x.dtype).double(), "gelu") + r.double()
        assert_close("persistent y", y, y64, (act_ref(z.float(), "gelu") + r.float()).to(x.dtype))
