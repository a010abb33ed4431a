"""The CUDA MoE kernels (csrc/cuda/moe_router.cu, moe_permute.cu, moe_grouped_linear.cu) under the
SIMT emulator, where the shared op tests don't reach: inputs long enough for several row chunks and
scan tiles (the device-side scans carry across them), every row-copy width, rows nobody references,
bitwise equal results run to run, and grouped_linear reading a transposed weight in place (the
profiler sees every aten op the binding calls, so a copy cannot hide). The float64 references are
the oracle."""
import pytest
import torch

from fastlm import _ext
from fastlm.ops.moe_permute import (moe_permute_backward_ref, moe_permute_ref, moe_unpermute_backward_ref,
                                    moe_unpermute_ref)
from fastlm.ops.moe_router import moe_router_backward_ref, moe_router_ref

pytestmark = [pytest.mark.emu,
              pytest.mark.skipif(not (_ext.HAS_EMULATOR and hasattr(torch.ops.fastlm_emu, "moe_router_fwd")),
                                 reason="fastlm._C_emu without the MoE kernels")]


def emu():
    return torch.ops.fastlm_emu


def distinct_logits(t, e):
    """Random fp32 logits whose scores are far apart (no near-tie for fp32 to order otherwise)."""
    return (torch.rand(t, e).argsort(-1).double() * 0.37 + torch.rand(t, e, dtype=torch.float64) * 0.1).float()


@pytest.mark.parametrize("sigmoid", [False, True])
def test_router_capacity_across_chunks_and_slots(sigmoid):
    # 300 rows: three chunks of 128 for the per-chunk counts, so an assignment's rank adds earlier
    # slots' totals, earlier chunks' counts and earlier rows of its own chunk. Capacity 45 of the
    # 75 assignments an expert gets on average: drops in slot 0 for popular experts, more in slot 1.
    t, e, k, cap = 300, 8, 2, 45
    logits = distinct_logits(t, e)
    logits[:, 3] += 0.8  # expert 3 overflows in slot 0 already
    got = emu().moe_router_fwd(logits, k, sigmoid, True, cap)
    want = moe_router_ref(logits.double(), k, sigmoid, True, cap)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    assert (got[0][:, 0] == -1).any() and (got[0][:, 1] == -1).any()
    for a, b in zip(got[1:2] + got[3:], want[1:2] + want[3:]):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    gw, ga, gz = torch.randn(t, k), torch.randn(()), torch.randn(())
    grad = emu().moe_router_bwd(gw, ga, gz, logits, k, sigmoid, True, cap)
    want_grad = moe_router_backward_ref(gw.double(), ga.double(), gz.double(), logits.double(), k, sigmoid, True,
                                           cap)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)
    again = emu().moe_router_fwd(logits, k, sigmoid, True, cap)
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    assert torch.equal(grad, emu().moe_router_bwd(gw, ga, gz, logits, k, sigmoid, True, cap))


def test_permute_scan_over_several_tiles():
    # (E + 1) buckets x 9 chunks of 256 assignments = 4608 cells: two passes of the one-block scan.
    t, k, e = 1152, 2, 511
    x = torch.randn(t, 4)
    ids = torch.randint(-1, e, (t, k), dtype=torch.int32)
    got = emu().moe_permute_fwd(x, ids, e)
    want = moe_permute_ref(x, ids, e)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("dtype,h", [(torch.float32, 8), (torch.float32, 3), (torch.bfloat16, 3),
                                     (torch.float16, 16)],
                         ids=["16-byte", "4-byte", "2-byte", "fp16-16-byte"])
def test_row_widths_and_unreferenced_rows(dtype, h):
    t, k, e = 40, 3, 5
    x = torch.randn(t, h).to(dtype)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)]).int()
    ids[torch.rand(t, k) < 0.3] = -1
    sorted_x, rows, offsets = emu().moe_permute_fwd(x, ids, e)
    want = moe_permute_ref(x, ids, e)
    assert torch.equal(sorted_x, want[0]) and torch.equal(rows, want[1]) and torch.equal(offsets, want[2])
    # y with extra rows nobody references: their gradient must come back 0.
    y = torch.randn(t * k + 5, h).to(dtype)
    w, g = torch.rand(t, k), torch.randn(t, h).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(emu().moe_unpermute_fwd(y, rows, w).double(),
                               moe_unpermute_ref(y.double(), rows, w.double()), **tol)
    torch.testing.assert_close(emu().moe_permute_bwd(y, rows).double(),
                               moe_permute_backward_ref(y.double(), rows), **tol)
    gy, gw = emu().moe_unpermute_bwd(g, y, rows, w)
    want_gy, want_gw = moe_unpermute_backward_ref(g.double(), y.double(), rows, w.double())
    torch.testing.assert_close(gy.double(), want_gy, **tol)
    torch.testing.assert_close(gw.double(), want_gw, **tol)
    assert not gy[t * k:].any() and torch.equal((gy, gw)[1], emu().moe_unpermute_bwd(g, y, rows, w)[1])


def weight_copies(fn):
    """The aten ops that copy tensor data which fn's C++ makes (the profiler records nested
    dispatcher calls too), and fn's result."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::cat")], result


@pytest.mark.parametrize("activation", ["none", "swiglu"])
def test_grouped_linear_reads_transposed_weight_in_place(activation):
    """GPT-OSS's (E, in, out) expert weight passed as its (E, out, in) transpose: with K and the
    width multiples of 8 the binding reads it where it lies (no copy in the forward or the
    backward) and the results are bit for bit those of the same weight stored (E, out, in): the
    same products in the same order, only the other operand layout. K = 12 or a weight base off
    16 bytes take the padded copy, which the profiler sees (so it would see one in place too)."""
    e, k, n_w, dtype = 3, 16, 48, torch.float16
    x = torch.randn(37, k).to(dtype)
    offsets = torch.tensor([0, 20, 20, 35], dtype=torch.int32)
    storage = torch.randn(e, k + 1, n_w).to(dtype)  # (E, in, out) plus a spare in-row for the offset view
    weight = storage[:, :k].transpose(1, 2)
    bias = torch.randn(e, n_w).to(dtype)
    grad = torch.randn(37, n_w // 2 if activation == "swiglu" else n_w).to(dtype)

    def run(w, xs=x):
        out, pre = emu().grouped_linear_fwd(xs, w, offsets, bias, activation, True)
        return out, pre, *emu().grouped_linear_bwd(grad, xs, w, offsets, pre, activation, True)

    copies, got = weight_copies(lambda: run(weight))
    assert copies == [], f"the transposed weight was copied: {copies}"
    want = run(weight.contiguous())
    for name, a, b in zip(("out", "pre", "grad_x", "grad_weight", "grad_bias"), got, want):
        assert torch.equal(a, b), f"{activation} {name}: in place differs from the contiguous weight"
    # grad_weight in the weight's layout, written transposed by the dW GEMM itself (no copy above)
    assert got[3].shape == weight.shape and got[3].stride() == (k * n_w, 1, n_w), got[3].stride()
    assert weight_copies(lambda: run(weight[:, :, :12], x[:, :12]))[0], "K = 12: the padded copy"
    off16 = storage.flatten()[1:1 + e * k * n_w].view(e, k, n_w).transpose(1, 2)  # base 2 bytes past 16
    assert weight_copies(lambda: run(off16))[0], "a weight base off 16 bytes: the aligned copy"
