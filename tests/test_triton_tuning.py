"""Triton launch policy: bucketed autotune keys, shared-memory pruning, FASTLM_TRITON_AUTOTUNE=0,
int64 head offsets, and the interpreter's bf16 refusal. Runs in the interpreter (CPU CI)."""
import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.ops.attention import scaled_dot_product_attention as sdpa
from fastlm.triton import _tune
from fastlm.triton.aot import TARGETS
from numerics import assert_close


def _recorded(run, capability=90):
    """(kernel, named args) of every launch run() makes, launch sizes as for sm_<capability>."""
    rec = []
    saved = dict(_tune._aot)
    _tune._aot.update(target=TARGETS[capability], record=lambda k, a, m, g: rec.append((k, a, m)))
    try:
        run()
    finally:
        _tune._aot.update(saved)
    tuned = [(k, {**dict(zip(k.arg_names, a)), **m}) for k, a, m in rec if isinstance(k, fastlm_autotuner())]
    assert tuned, "no autotuned launch recorded"
    return tuned


def fastlm_autotuner():
    import triton

    return triton.runtime.Autotuner


def _attention(tq, tk, d=64, dtype=torch.float32, mask=None):
    from fastlm.triton import attention

    q, k, v = torch.randn(1, 2, tq, d, dtype=dtype), torch.randn(1, 2, tk, d, dtype=dtype), torch.randn(1, 2, tk, d, dtype=dtype)
    out, lse = attention.forward(q, k, v, mask, 0, 0.125)
    attention.backward(out, q, k, v, mask, out, lse, 0, 0.125)


def _linear(m):
    from fastlm.triton import linear

    x, w = torch.randn(m, 96), torch.randn(80, 96)
    y, _ = linear.forward(x, w, None, None, None, False)
    linear.backward(y, x, w, None, y, "none")


def _keys(launches):
    return [tuple(args[name] for name in k.keys) for k, args in launches]


@pytest.mark.parametrize("run_a,run_b", [
    (lambda: _attention(1000, 1000), lambda: _attention(1003, 1020)),  # a new sequence length, same bucket
    (lambda: _attention(1, 130), lambda: _attention(1, 131)),  # one more decoded token (below the split-KV path)
    (lambda: _linear(1000), lambda: _linear(1017)),
], ids=["attention-lengths", "attention-decode-token", "linear-rows"])
def test_autotune_key_is_bucketed(run_a, run_b):
    a, b = _recorded(run_a), _recorded(run_b)
    assert _keys(a) == _keys(b)


def test_autotune_key_changes_across_buckets():
    assert _keys(_recorded(lambda: _attention(1000, 1000))) != _keys(_recorded(lambda: _attention(1000, 3000)))


def _pruned(launches, capability):
    saved = dict(_tune._aot)
    _tune._aot.update(target=TARGETS[capability])
    try:
        return _prune_each(launches)
    finally:
        _tune._aot.update(saved)


def _prune_each(launches):
    return [k.early_config_prune(k.configs, {n: v for n, v in args.items() if n in k.arg_names},
                                 **{n: v for n, v in args.items() if n not in k.arg_names}) for k, args in launches]


@pytest.mark.parametrize("capability", [80, 86, 90])
def test_configs_that_cannot_fit_are_pruned_before_compiling(capability):
    limit = TARGETS[capability].smem
    launches = _recorded(lambda: _attention(64, 64, d=256), capability)
    for (kernel, args), kept in zip(launches, _pruned(launches, capability)):
        assert kept and max(_need(kernel, c, args) for c in kept) <= limit
        assert len(kept) < len(kernel.configs), "fp32 d=256 has configs over every GPU's limit"


def _need(kernel, cfg, args):
    from fastlm.triton import attention

    fn = attention._smem_fwd if kernel is attention._fwd_tuned else attention._smem_bwd
    return fn(cfg, args)


def test_autotune_off_runs_the_first_config_that_fits(monkeypatch):
    launches = _recorded(lambda: _attention(64, 64, d=256), 80)
    all_kept = _pruned(launches, 80)
    monkeypatch.setenv("FASTLM_TRITON_AUTOTUNE", "0")
    for kept, one in zip(all_kept, _pruned(launches, 80)):
        assert one == kept[:1]


def test_no_config_fits_names_the_limit_and_sizes():
    small = _tune.Target(80, 1024, 108)
    saved = dict(_tune._aot)
    _tune._aot.update(target=small, record=lambda k, a, m, g: k.early_config_prune(
        k.configs, dict(zip(k.arg_names, a)), **m))
    try:
        with pytest.raises(RuntimeError, match=r"triton attention forward: no config fits 1024 B of shared memory "
                                               r"per block \(the smallest needs \d+ B\) for .*D=256"):
            _attention(16, 16, d=256)
    finally:
        _tune._aot.update(saved)


@pytest.mark.parametrize("capability", [80, 86, 90])
def test_decode_keeps_a_config_for_every_head_dim(capability):
    """Row blocks let the split-KV path serve 64 rows of every head dim and dtype on every GPU."""
    from fastlm.triton import attention_decode as dec

    target = TARGETS[capability]
    for dtype in (torch.float16, torch.float32):
        for d in (64, 128, 256):
            q, k = torch.empty(1, 64, 1, d, dtype=dtype), torch.empty(1, 1, 4096, d, dtype=dtype)
            assert dec.serves(q, k, k)
            launches = _recorded(lambda: dec.forward(q, k, k, None, 2, d ** -0.5), capability)
            for (kernel, args), kept in zip(launches, _pruned(launches, capability)):
                assert kept and max(dec._smem(c, args) for c in kept) <= target.smem
                assert all(c.kwargs["ROW_BLOCK"] <= args["ROWS"] for c in kept)


def test_head_offsets_are_int64():
    """Per-head bool mask whose head stride puts head 2 past 2^31 elements: int32 head offsets
    wrap and read another (all-False) part of the buffer. Only the touched pages get memory."""
    h, t, d = 3, 16, 16
    head_stride = 2**30 + 2**19  # 2 * head_stride wraps int32 to -(2^31) + 2^20
    base = 2**31  # so the wrapped address still lands inside the buffer (zero pages: all False)
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False  # don't touch 4 GB of pages
    try:
        buf = torch.empty(base + 2 * head_stride + t * t, dtype=torch.bool)
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
    mask = buf.as_strided((1, h, t, t), (0, head_stride, t, 1), base)
    keep = torch.rand(h, t, t) > 0.3
    keep[..., 0] = True
    for i in range(h):
        mask[0, i].copy_(keep[i])
    q, k, v = (torch.randn(1, h, t, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[None])
    want_grads = torch.autograd.grad(want.sum(), (q, k, v))
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    out = sdpa(qf, kf, vf, attn_mask=mask, backend="triton")
    grads = torch.autograd.grad(out.sum(), (qf, kf, vf))
    assert_close("out (head 2 past 2^31 mask elements)", out, want)
    for name, g, w in zip("qkv", grads, want_grads):
        assert_close(f"grad_{name}", g, w)


def test_interpreter_refuses_bf16_attention():
    q = torch.randn(1, 2, 8, 32, dtype=torch.bfloat16)
    msg = "the Triton interpreter computes tl.dot wrongly for bfloat16 operands (bf16 runs on GPU only)"
    with pytest.raises(fastlm.BackendUnavailableError) as info:
        sdpa(q, q, q, backend="triton")
    assert msg in str(info.value)
    k = torch.randn(1, 2, 300, 32, dtype=torch.bfloat16)  # a decode step: the split-KV path
    with pytest.raises(fastlm.BackendUnavailableError, match=r"computes tl.dot wrongly for bfloat16"):
        sdpa(q[:, :, :1], k, k, backend="triton")


def _gqa(group_split=None):
    from fastlm.triton import attention

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 40, 32), torch.randn(1, 1, 40, 32), torch.randn(1, 1, 40, 32)
    out, lse = attention.forward(q, k, v, None, 1, 0.2)
    return attention.backward(torch.randn_like(out), q, k, v, None, out, lse, 1, 0.2)


def test_gqa_backward_same_with_the_group_in_one_program_or_split(monkeypatch):
    """dK / dV of a GQA group: its 4 query heads in one program (straight into dk) or one per
    program (fp32 partials summed after) give the same gradients."""
    from fastlm.triton import attention

    assert attention.group_split(1, 1, 40, 4, torch.device("cpu")) == 4  # 1 key block, 4 "SMs"
    assert attention.group_split(8, 8, 4096, 4, torch.device("cpu")) == 1
    split = _gqa()
    monkeypatch.setattr(attention, "group_split", lambda *a: 1)
    whole = _gqa()
    for name, a, b in zip(("dq", "dk", "dv"), split, whole):
        assert_close(name, a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp32_dot_precision_follows_torch_and_keys_the_tuner(monkeypatch, dtype):
    """fp32 dots use TF32 exactly when torch's matmuls may (read per call), IEEE otherwise; the
    choice is a constexpr of the kernels and part of their autotune key."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32  # a property of torch's cuBLAS module: set and restore it by hand
    run = lambda: _attention(100, 100, dtype=dtype)  # noqa: E731
    try:
        matmul.allow_tf32 = False
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
        ieee = _recorded(run)
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
        tf32_by_precision = _recorded(run)
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
        matmul.allow_tf32 = True
        tf32_by_flag = _recorded(run)
    finally:
        matmul.allow_tf32 = saved
    assert all("PREC" in k.keys for k, _ in ieee)
    want = ("ieee", "tf32") if dtype == torch.float32 else ("", "")
    assert {a["PREC"] for _, a in ieee} == {want[0]}
    assert {a["PREC"] for _, a in tf32_by_precision} == {a["PREC"] for _, a in tf32_by_flag} == {want[1]}
    assert (_keys(ieee) != _keys(tf32_by_flag)) == (dtype == torch.float32)


def _varlen(lengths, d=32, h=4, hkv=2, max_len=None):
    from fastlm.triton import attention

    cu = torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(len(lengths))], dtype=torch.int32)
    q, k, v = torch.randn(cu[-1], h, d), torch.randn(cu[-1], hkv, d), torch.randn(cu[-1], hkv, d)
    m = max_len or max(lengths)
    out, lse = attention.varlen_forward(q, k, v, cu, cu, m, m, 1, 0.125)
    return attention.varlen_backward(torch.randn_like(out), q, k, v, cu, cu, m, m, out, lse, 1, 0.125)


def test_varlen_autotune_key_is_the_bucketed_longest_sequence():
    """Packed batches key the tuner by max_seqlen's bucket (lengths are on the device); the
    varlen specialisation is part of the key, so it never reuses a dense config's timing."""
    a, b = _recorded(lambda: _varlen([1000, 7, 300])), _recorded(lambda: _varlen([3, 1020, 900, 5]))
    assert _keys(a) == _keys(b)
    assert all(args["VARLEN"] for _, args in a)
    assert _keys(a) != _keys(_recorded(lambda: _varlen([1000, 7], max_len=3000)))
    assert _keys(a) != _keys(_recorded(lambda: _attention(1000, 1000, d=32)))


def test_varlen_gqa_backward_same_with_the_group_in_one_program_or_split(monkeypatch):
    """dK / dV of packed sequences: the GQA group's heads in one program, or split over programs
    into (SPLIT, total_k, H_kv, D) fp32 partials summed after, give the same gradients."""
    from fastlm.triton import attention

    torch.manual_seed(0)
    lengths = [0, 37, 5, 20]
    monkeypatch.setattr(attention, "group_split", lambda *a: 4)
    split = _varlen(lengths, h=8, hkv=2)
    monkeypatch.setattr(attention, "group_split", lambda *a: 1)
    torch.manual_seed(0)
    whole = _varlen(lengths, h=8, hkv=2)
    for name, a, b in zip(("dq", "dk", "dv"), split, whole):
        assert not a.isnan().any(), f"{name}: unwritten rows"
        assert_close(name, a, b)


def _paged(seqlens, paged=True, b=2, hkv=2, h=8, d=64, page=16, capacity=4096):
    from fastlm.triton import attention_decode

    q = torch.randn(b, 1, h, d)
    if paged:
        kc = torch.randn(b * capacity // page, page, hkv, d)
        table = torch.randperm(b * capacity // page).to(torch.int32).view(b, -1)
    else:
        kc, table = torch.randn(b, capacity, hkv, d), None
    attention_decode.paged_forward(q, kc, kc, table, torch.tensor(seqlens, dtype=torch.int32), True, d ** -0.5)


def test_paged_decode_tunes_once_for_every_length_and_layout():
    """Decoding against a cache keys the tuner by shapes only: another token (or any lengths)
    re-uses the config, and a paged and a contiguous cache of the same shapes get the same one
    (their results are bit-identical only if their tiles are)."""
    a = _recorded(lambda: _paged([100, 3000]))
    assert _keys(a) == _keys(_recorded(lambda: _paged([101, 3001])))
    assert _keys(a) == _keys(_recorded(lambda: _paged([5, 17], paged=False)))
    assert _keys(a) == _keys(_recorded(lambda: _paged([5, 17], page=1, capacity=512)))


# ---------------------------------------------------------------- grid limits (CUDA: axes 1, 2 <= 65,535)
def _grids(run, capability=90):
    """(kernel name, (x, y, z)) of every launch run() makes for sm_<capability>, an autotuned
    launch once per config its pruning keeps (any of them may be picked)."""
    got = []

    def record(kernel, args, meta, grid):
        tuned = isinstance(kernel, fastlm_autotuner())
        fn = kernel.fn if tuned else kernel
        configs = kernel.early_config_prune(kernel.configs, dict(zip(fn.arg_names, args)), **meta) if tuned else [None]
        for cfg in configs:
            got.append((fn.fn.__name__, _tune.grid_of(grid, {**meta, **(cfg.kwargs if cfg else {})})))
    saved = dict(_tune._aot)
    _tune._aot.update(target=TARGETS[capability], record=record)
    try:
        run()
    finally:
        _tune._aot.update(saved)
    assert got, "no launch recorded"
    return got


def _dense_many_heads():  # B * H = 70,000 > 65,535, tiny T and D
    from fastlm.triton import attention

    q = torch.randn(35000, 2, 1, 16)
    out, lse = attention.forward(q, q, q, None, 0, 0.25)
    attention.backward(out, q, q, q, None, out, lse, 0, 0.25)


def _dense_big_batch():  # B = 70,000 > 65,535 (one head): the batch folded into axis 0
    from fastlm.triton import attention

    q = torch.randn(70000, 1, 1, 16)
    out, lse = attention.forward(q, q, q, None, 0, 0.25)
    attention.backward(out, q, q, q, None, out, lse, 0, 0.25)


def _varlen_many_sequences():  # 2,048 packed sequences x 32 heads
    from fastlm.triton import attention

    seqs, h = 2048, 32
    q = torch.randn(seqs * 2, h, 16)
    cu = torch.arange(0, seqs * 2 + 1, 2, dtype=torch.int32)
    out, lse = attention.varlen_forward(q, q, q, cu, cu, 2, 2, 1, 0.25)
    attention.varlen_backward(out, q, q, q, cu, cu, 2, 2, out, lse, 1, 0.25)


def _decode_big_batch():  # B = 2,048, H = H_kv = 32: B * H_kv = 65,536 (stride-0 keys: no memory)
    from fastlm.triton import attention

    q = torch.randn(2048, 32, 1, 16)
    k = torch.randn(1, 1, 1, 16).expand(2048, 32, 512, 16)
    attention.forward(q, k, k, None, 2, 0.25)


def _paged_big_batch():
    from fastlm.triton import attention_decode

    q = torch.randn(2048, 1, 32, 16)
    kc = torch.randn(1, 1, 1, 16).expand(2048, 256, 32, 16)  # a contiguous cache, one row per sequence
    attention_decode.paged_forward(q, kc, kc, None, torch.full((2048,), 200, dtype=torch.int32), True, 0.25)


@pytest.mark.parametrize("run,kernels", [
    (_dense_many_heads, {"_fwd_kernel", "_delta_kernel", "_dkdv_kernel", "_dq_kernel"}),
    (_dense_big_batch, {"_fwd_kernel", "_delta_kernel", "_dkdv_kernel", "_dq_kernel"}),
    (_varlen_many_sequences, {"_fwd_kernel", "_delta_kernel", "_dkdv_kernel", "_dq_kernel"}),
    (_decode_big_batch, {"_split_kernel", "_merge_kernel"}),
    (_paged_big_batch, {"_split_kernel", "_merge_kernel"}),
], ids=["dense-70000-heads", "dense-70000-batch", "varlen-2048x32", "decode-2048x32", "paged-2048x32"])
@pytest.mark.parametrize("capability", [80, 90])
def test_attention_grids_fit_cuda_limits(run, kernels, capability):
    """Batch x heads past 65,535 must not land on grid axis 1 or 2 (CUDA refuses the launch; the
    interpreter does not), for every config the tuner may pick."""
    grids = _grids(run, capability)
    assert {name for name, _ in grids} == kernels
    over = [(name, g) for name, g in grids if any(n > m for n, m in zip(g, _tune.MAX_GRID))]
    assert not over, f"grid axes over CUDA's limits {_tune.MAX_GRID}: {over[:4]}"
    assert all(n >= 1 for _, g in grids for n in g)


@pytest.mark.parametrize("fold", [False, True], ids=["3d-grid", "batch-folded"])
def test_grid_decomposition(monkeypatch, fold):
    """(tile, bh) of each program (attention._tile: a (tiles, B * heads) grid, or with B * heads
    past 65,535 (here: past 1) folded into axis 0, tile fastest) and decode's split / head
    decomposition: several query / key tiles of several heads and sequences, GQA, every kernel
    of the forward, backward, varlen and decode paths against the reference (a wrong
    decomposition writes the wrong head or tile)."""
    from fastlm.triton import attention, attention_decode

    if fold:
        monkeypatch.setattr(attention, "MAX_GRID_YZ", 1)
    # 4 batch entries of 3 tiles (16 rows each), so swapping tile and batch entry is caught
    q, k, v = torch.randn(4, 6, 40, 16), torch.randn(4, 2, 40, 16), torch.randn(4, 2, 40, 16)
    qr, kr, vr = (x.double().requires_grad_() for x in (q, k, v))
    want = F.scaled_dot_product_attention(qr, kr.repeat_interleave(3, 1), vr.repeat_interleave(3, 1), is_causal=True)
    gout = torch.randn_like(q)
    want_grads = torch.autograd.grad(want, (qr, kr, vr), gout.double())
    out, lse = attention.forward(q, k, v, None, 1, 0.25)
    assert_close("out", out, want)
    for name, g, w in zip("qkv", attention.backward(gout, q, k, v, None, out, lse, 1, 0.25), want_grads):
        assert_close(f"grad_{name}", g, w)
    # packed: sequences of 40, 17, 33 and 5 rows (3, 2, 3 and 1 tiles of 16)
    lens = [40, 17, 33, 5]
    cu = torch.tensor([0, 40, 57, 90, 95], dtype=torch.int32)
    pq, pk, pv = (torch.cat([x[i, :, :n].transpose(0, 1) for i, n in enumerate(lens)]) for x in (q, k, v))
    out_p, _ = attention.varlen_forward(pq, pk, pv, cu, cu, 40, 40, 1, 0.25)
    for i, n in enumerate(lens):
        ref = F.scaled_dot_product_attention(q[i:i + 1, :, :n], k[i:i + 1, :, :n].repeat_interleave(3, 1),
                                             v[i:i + 1, :, :n].repeat_interleave(3, 1), is_causal=True, scale=0.25)
        assert_close(f"varlen out, sequence {i}", out_p[cu[i]:cu[i + 1]].transpose(0, 1)[None], ref)
    # decode: B * H_kv = 6 (batch, kv head) pairs, each split over several key chunks
    qd, kd = torch.randn(3, 4, 1, 16), torch.randn(3, 2, 600, 16)
    vd = torch.randn(3, 2, 600, 16)
    assert attention_decode.serves(qd, kd, vd)
    out_d, _ = attention.forward(qd, kd, vd, None, 2, 0.25)
    ref = F.scaled_dot_product_attention(qd, kd.repeat_interleave(2, 1), vd.repeat_interleave(2, 1), scale=0.25)
    assert_close("decode out", out_d, ref)


def test_decode_head_offsets_are_int64():
    """test_head_offsets_are_int64 for the split-KV decode kernel: a per-head bool mask whose head
    stride puts head 2 past 2^31 elements (the heads of a GQA group are rows of one program, so
    the row's head offset h * stride must be int64)."""
    from fastlm.triton import attention_decode

    h, tk, d = 3, 256, 16
    head_stride = 2**30 + 2**19
    base = 2**31
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        buf = torch.empty(base + 2 * head_stride + tk, dtype=torch.bool)
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
    mask = buf.as_strided((1, h, 1, tk), (0, head_stride, tk, 1), base)
    keep = torch.rand(h, 1, tk) > 0.3
    keep[..., 0] = True
    for i in range(h):
        mask[0, i].copy_(keep[i])
    q, k, v = torch.randn(1, h, 1, d), torch.randn(1, 1, tk, d), torch.randn(1, 1, tk, d)
    assert attention_decode.serves(q, k, v)
    want = F.scaled_dot_product_attention(q.double(), k.double().expand(1, h, tk, d), v.double().expand(1, h, tk, d),
                                          attn_mask=keep[None])
    out = sdpa(q, k, v, attn_mask=mask, backend="triton", enable_gqa=True)
    assert_close("decode out (head 2 past 2^31 mask elements)", out, want)
