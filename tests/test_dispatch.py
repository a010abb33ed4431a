"""Dispatch by measurement: device classes, buckets, measured tables (synthetic ones written to a
temporary folder: nothing here measures anything) and what auto and `info` make of them."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastlm
from fastlm import backend, dispatch
from fastlm.dispatch import estimates, tables, tune

H100, A100, RTX4090 = dispatch.SIMULATED


@pytest.mark.parametrize("name, cap, cls", [
    ("NVIDIA H100 80GB HBM3", (9, 0), "h100"), ("NVIDIA H100 PCIe", (9, 0), "h100"), ("NVIDIA H800", (9, 0), "h100"),
    ("NVIDIA H200", (9, 0), "h200"), ("NVIDIA GH200 480GB", (9, 0), "h200"), ("NVIDIA H20", (9, 0), "h20"),
    ("NVIDIA A100-SXM4-80GB", (8, 0), "a100"), ("NVIDIA A100 80GB PCIe", (8, 0), "a100"), ("NVIDIA A800 80GB", (8, 0), "a100"),
    ("NVIDIA GeForce RTX 4090", (8, 9), "ada"), ("NVIDIA L40S", (8, 9), "ada"), ("NVIDIA L4", (8, 9), "ada"),
    ("NVIDIA RTX 6000 Ada Generation", (8, 9), "ada"),
    ("NVIDIA GeForce RTX 3090", (8, 6), "ampere-consumer"), ("NVIDIA A10", (8, 6), "ampere-consumer"),
    ("NVIDIA A10G", (8, 6), "ampere-consumer"), ("NVIDIA RTX A6000", (8, 6), "ampere-consumer"),
    ("NVIDIA B200", (10, 0), "b200"),
    ("Some Future Hopper", (9, 0), "hopper"), ("NVIDIA A30", (8, 0), "sm80"), ("Mystery", (12, 1), "sm121"),
])
def test_device_class(name, cap, cls):
    assert dispatch.device_class(name, cap) == cls


def test_device_class_bad_input():
    with pytest.raises(TypeError, match=r"device_class: name must be a str, got int 5"):
        dispatch.device_class(5, (9, 0))
    with pytest.raises(ValueError, match=r"device_class: capability must be \(major, minor\) .*got \(9,\)"):
        dispatch.device_class("NVIDIA H100", (9,))


def test_simulated_devices_are_explicit_data():
    assert [(s.device_class, s.capability, s.sms, s.smem_per_block_optin) for s in dispatch.SIMULATED] == [
        ("h100", (9, 0), 132, 227 * 1024), ("a100", (8, 0), 108, 163 * 1024), ("ada", (8, 9), 128, 99 * 1024)]
    with backend.simulate(RTX4090):
        dev = torch.device("cuda", 0)
        assert backend.shared_memory_per_block(dev) == 101376 and backend.capability(dev) == (8, 9)
        assert backend.device_class(dev) == "ada"
    with pytest.raises(TypeError, match=r"simulate\(spec\) takes a fastlm.dispatch.DeviceSpec, got str"):
        with backend.simulate("h100"):
            pass


def test_static_order_is_data_with_reasons():
    for key, order in estimates.STATIC_ORDER.items():
        names = [b for b, _ in order]
        assert names[-1] == "reference" and set(names) <= set(backend.BACKENDS) and len(set(names)) == len(names), key
        assert all(reason.startswith("static estimate: ") for _, reason in order), key
    # attention: cuda first everywhere (its sm_90a tier on Hopper, FA2's design elsewhere)
    assert [b for b, _ in dispatch.static_order("attention", "h100")] == ["cuda", "triton", "reference"]
    assert [b for b, _ in dispatch.static_order("attention", "a100")] == ["cuda", "triton", "reference"]
    assert [b for b, _ in dispatch.static_order("softmax", "h100")] == ["cuda", "triton", "reference"]


def test_buckets():
    assert dispatch.attention_bucket(torch.bfloat16, 128, 128, "causal", 4096, 4096, True) == \
        "bf16 d128 causal prefill T2^12 fwd+bwd"
    assert dispatch.attention_bucket(torch.float16, 64, 32, "full", 1, 5000, False) == "fp16 d64v32 full decode T2^13 fwd"
    assert dispatch.rowwise_bucket(torch.float32, 1025, False) == "fp32 n2^11 fwd"
    assert dispatch.matmul_bucket(torch.bfloat16, 8192, 4096, 50304, True) == "bf16 m2^13 k2^12 n2^16 fwd+bwd"
    with pytest.raises(ValueError, match=r"mask must be 'causal', 'full' or 'masked', got 'tril'"):
        dispatch.attention_bucket(torch.float16, 64, 64, "tril", 1, 1, False)
    # select() records the bucket it computes from the op's own inputs
    with backend.record_buckets() as seen:
        fastlm.ops.bias_act(torch.randn(3, 100), torch.randn(100))
        with torch.no_grad():
            fastlm.ops.scaled_dot_product_attention(*(torch.randn(1, 2, 1, 16) for _ in range(3)))
    assert seen == [("bias_act", "fp32 n2^7 fwd"), ("attention", "fp32 d16 full decode T2^0 fwd")]


CANDIDATES = ("cuda", "triton", "reference")


@pytest.mark.parametrize("ms, choice", [
    ({"cuda": 2.0, "triton": 1.0, "reference": 9.0}, "triton"),
    ({"cuda": 2.0, "triton": 1.0}, "triton"),  # reference unmeasured: it keeps its last place
    ({"triton": 1.0, "reference": 9.0}, None),  # cuda unmeasured: it might be faster than triton
    ({"triton": 1.0}, None),  # a backend never wins by being the only one asked
    ({"cuda": 1.0, "reference": 0.5}, None),  # triton unmeasured, ranked ahead of reference
])
def test_only_measured_backends_compete(ms, choice):
    got, reason = dispatch.choose({"ms": ms}, CANDIDATES)
    assert got == choice, reason
    if choice is None:
        assert "did not measure" in reason


def test_faster_torch_op_is_reported_and_picked_only_when_the_reference_is_it():
    entry = {"ms": {"cuda": 2.0, "triton": 1.5}, "torch": {"impl": "sdpa:flash", "ms": 1.0}}
    got, reason = dispatch.choose(entry, CANDIDATES)
    assert got == "triton" and "torch's sdpa:flash is faster (1 ms), but the reference backend does not call it" in reason
    got, reason = dispatch.choose(entry, CANDIDATES, reference_is=("sdpa:flash",))
    assert got == "reference" and "the reference backend calls it" in reason
    assert estimates.REFERENCE_IS_TORCH_OP == {}  # today every reference is plain fp32 math, not torch's fast op


@pytest.fixture
def table_dirs(tmp_path, monkeypatch):
    """Shipped tables and the user cache in temporary folders."""
    shipped, cache = tmp_path / "shipped", tmp_path / "cache"
    shipped.mkdir()
    monkeypatch.setattr(tables, "SHIPPED_DIR", str(shipped))
    monkeypatch.setenv("FASTLM_CACHE_DIR", str(cache))
    tables.clear_cache()
    yield shipped, cache
    tables.clear_cache()


def _attention_inputs(head_dim=64):
    with FakeTensorMode():
        q = torch.empty(4, 16, 4096, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return (q, q, q, None, 0.0, 1)


def _select_on(spec, inputs):
    with backend.simulate(spec):
        return backend.select("attention", inputs[0].device, *inputs), backend.auto_choice("attention", inputs[0].device, *inputs)[1]


def _write(path, cls, ms, **extra):
    key = "bf16 d64 causal prefill T2^12 fwd+bwd"
    tables.write(str(path), cls, {"attention": {key: {"ms": ms, **extra}}})


def test_select_honours_a_measured_table(table_dirs):
    shipped, _ = table_dirs
    inputs = _attention_inputs()
    assert backend.bucket("attention", *inputs) == "bf16 d64 causal prefill T2^12 fwd+bwd"
    assert _select_on(H100, inputs)[0] == "cuda"  # no table: the static order (cuda first on Hopper)
    _write(shipped / "h100.json", "h100", {"cuda": 3.0, "triton": 2.0, "reference": 40.0})
    choice, why = _select_on(H100, inputs)
    assert choice == "triton" and why.startswith("measured: triton 2 ms < cuda 3 ms < reference 40 ms")
    assert _select_on(A100, inputs)[0] == "cuda"  # another class's table doesn't apply
    # a different bucket (head dim 128) has no entry: static order, and it says so
    choice, why = _select_on(H100, _attention_inputs(128))
    assert choice == "cuda" and why.startswith("unmeasured (no entry for [bf16 d128 causal prefill T2^12 fwd+bwd]")
    # only measured backends compete: with cuda unmeasured the entry can't pick triton
    _write(shipped / "h100.json", "h100", {"triton": 2.0, "reference": 40.0})
    choice, why = _select_on(H100, inputs)
    assert choice == "cuda" and "the table entry did not measure cuda" in why


def test_user_cache_overrides_the_shipped_table(table_dirs):
    shipped, _ = table_dirs
    inputs = _attention_inputs()
    _write(shipped / "h100.json", "h100", {"cuda": 3.0, "triton": 2.0})
    _write(tables.user_path("h100"), "h100", {"cuda": 1.0, "triton": 2.0})
    choice, why = _select_on(H100, inputs)
    assert choice == "cuda" and "user cache" in why
    on_disk = json.loads(open(tables.user_path("h100")).read())
    assert on_disk["format"] == 1 and on_disk["device_class"] == "h100"


def test_a_backend_that_cant_serve_drops_out_of_the_measured_choice(table_dirs):
    if not fastlm._ext.HAS_CUDA_KERNELS:
        pytest.skip("this build has no cuda kernels whose shared memory to size")
    shipped, _ = table_dirs
    _write(shipped / "ada.json", "ada", {"cuda": 1.0, "triton": 2.0, "reference": 40.0},
           torch={"impl": "sdpa:flash", "ms": 0.5})
    inputs = _attention_inputs()
    choice, why = _select_on(RTX4090, inputs)
    assert choice == "cuda" and "torch's sdpa:flash is faster (0.5 ms), but the reference backend does not call it" in why
    # a GPU with too little shared memory for the cuda kernels: the measurement ranks the rest
    tiny = dispatch.DeviceSpec("NVIDIA GeForce RTX 4090", (8, 9), 128, 1024)
    choice, why = _select_on(tiny, inputs)
    assert choice == "triton" and why.startswith("measured: triton 2 ms < reference 40 ms")


def test_static_order_can_change_per_op_and_class(table_dirs, monkeypatch):
    order = (("triton", "static estimate: test"), ("cuda", "static estimate: second"), estimates.REFERENCE)
    monkeypatch.setitem(estimates.STATIC_ORDER, ("attention", "a100"), order)
    inputs = _attention_inputs()
    choice, why = _select_on(A100, inputs)
    assert choice == "triton" and why.endswith("static estimate: test")
    assert _select_on(RTX4090, inputs)[0] == "cuda"  # the override is a100's only


def test_malformed_table_is_named(table_dirs):
    shipped, _ = table_dirs
    (shipped / "h100.json").write_text(json.dumps({"format": 1, "entries": {"attention": {"k": {"ms": {"cudnn": 1}}}}}))
    with pytest.raises(ValueError, match=r"h100.json: entry 'attention' / 'k' needs 'ms'"):
        _select_on(H100, _attention_inputs())
    (shipped / "h100.json").write_text("{")
    tables.clear_cache()
    with pytest.raises(ValueError, match=r"h100.json: can't be read as JSON"):
        _select_on(H100, _attention_inputs())


def test_tune_measures_every_backend_that_agrees(monkeypatch):
    """measure() on CPU tensors: only the mechanics (the cases, keys and entries), no speed."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter would serve, slowly
    x = torch.randn(64, 96, requires_grad=True)
    case = tune.Case("softmax", lambda b: fastlm.ops.softmax(x, backend=b), "torch eager",
                     lambda: torch.softmax(x, -1), (x,))
    wrong = tune.Case("softmax", lambda b: fastlm.ops.softmax(x, backend=b) * (2 if b == "cpu" else 1), "torch eager",
                      lambda: torch.softmax(x, -1))
    entries = tune.measure([case], torch.device("cpu"), seconds=0.0, progress=lambda s: None)
    assert set(entries["softmax"]) == {"fp32 n2^7 fwd", "fp32 n2^7 fwd+bwd"}
    for entry in entries["softmax"].values():
        assert set(entry["ms"]) == {"cpu", "reference"} and entry["torch"]["impl"] == "torch eager"
    said = []
    entries = tune.measure([wrong], torch.device("cpu"), seconds=0.0, progress=said.append)
    assert set(entries["softmax"]["fp32 n2^7 fwd"]["ms"]) == {"reference"}  # the wrong cpu result isn't timed
    assert any("cpu disagrees with torch's op" in s for s in said)


def _fastlm(*args, cache):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTLM_CACHE_DIR"] = str(cache)
    return subprocess.run([sys.executable, "-m", "fastlm", *args], capture_output=True, text=True, env=env, timeout=180)


def test_info_shows_the_simulated_gpus_unmeasured(tmp_path):
    out = _fastlm("info", cache=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout[out.stdout.index("attention on simulated GPUs"):]
    for cls, desc in (("h100", "(sm_90, 132 SMs, 227 KB"), ("a100", "(sm_80, 108 SMs, 163 KB"), ("ada", "(sm_89, 128 SMs, 99 KB")):
        assert f" {cls}: " in text and desc in text
        assert f"auto -> " in text and f"unmeasured (no measured attention entries for {cls})" in text
    assert text.count("unmeasured") == 6  # three GPUs, two head dims
    # a user cache entry for the h100 is used and shown
    _write(tmp_path / "dispatch" / "h100.json", "h100", {"cuda": 2.0, "triton": 1.0})
    text = _fastlm("info", cache=tmp_path).stdout
    assert "auto -> triton: measured: triton 1 ms < cuda 2 ms (reference not measured" in text


def test_tune_needs_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    out = _fastlm("tune", "--quick", cache=tmp_path)
    assert out.returncode == 2 and "tune measures on a CUDA device, and none is visible" in out.stderr
    assert not (tmp_path / "dispatch").exists()
    out = _fastlm("tune", "--ops", "attention,nope", cache=tmp_path)
    assert out.returncode == 2 and "tune --ops: unknown op(s) nope" in out.stderr


def test_every_tune_case_runs_and_has_its_own_bucket():
    """The GPU cases on meta tensors (shapes only, no memory): each calls the op and torch's, and
    no two land in the same bucket (the later would overwrite the earlier)."""
    keys = []
    for case in tune.cases(torch.device("meta"), quick=False):
        with backend.record_buckets() as seen:
            out = case.call("reference")
        assert out.shape == case.torch_call().shape, case.op
        keys.append((case.op, seen[-1][1]))
    assert len(keys) == len(set(keys)) == 32
