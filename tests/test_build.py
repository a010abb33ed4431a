"""The build: the extension exists, CUDA kernels are in it wherever they can be built, kernel
sources stay torch-free, and ptxas reports no register spills in any kernel."""
import glob
import importlib.util
import os
import platform
import re
import shutil
import subprocess

import pytest
import torch

from fastlm import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shipped_sass_is_checked():
    """test_sass_report.py reads the built extension's own SASS (its real flags, every kernel it
    ships) for local memory: true when that extension has CUDA kernels and cuobjdump is found."""
    if not _ext.HAS_CUDA_KERNELS:
        return False
    spec = importlib.util.spec_from_file_location("sass_report", os.path.join(ROOT, "scripts", "sass_report.py"))
    sr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sr)
    return sr.find_tool() is not None


def _nvcc():
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    cand = os.path.join(home, "bin", "nvcc")
    return cand if os.path.exists(cand) else shutil.which("nvcc")


def test_extension_is_built():
    assert _ext.HAS_EXTENSION, f"fastlm._C failed to import: {_ext.EXTENSION_ERROR}"
    assert "-O3" in _ext.CPU_FLAGS


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64"
                    or os.environ.get("FASTLM_BUILD_EMU", "").strip() == "0",
                    reason="the emulator is built by default on x86-64 Linux only (FASTLM_BUILD_EMU)")
def test_emulator_is_built():
    """Without this, a broken emulator build would only turn every cuda-emu test into a skip."""
    assert _ext.HAS_EMULATOR, f"fastlm._C_emu failed to import: {_ext.EMULATOR_ERROR}"
    assert hasattr(torch.ops.fastlm_emu, "attention_fwd") and hasattr(torch.ops.fastlm_emu, "emu_stats")


@pytest.mark.skipif(torch.version.cuda is None or _nvcc() is None, reason="needs a CUDA torch and nvcc")
def test_cuda_kernels_built_where_possible():
    assert _ext.HAS_CUDA_KERNELS, "torch is a CUDA build and nvcc exists, yet fastlm._C has no CUDA kernels"
    assert "8.0" in _ext.CUDA_ARCHS and "9.0a" in _ext.CUDA_ARCHS
    assert hasattr(torch.ops.fastlm, "bias_act_fwd")


def test_kernel_sources_include_no_torch():
    for path in glob.glob(os.path.join(ROOT, "csrc", "c*", "*")) + glob.glob(os.path.join(ROOT, "csrc", "include", "**", "*"), recursive=True):
        if os.path.isdir(path):
            continue
        text = open(path).read()
        bad = re.findall(r"#include\s*[<\"](torch|ATen|c10|pybind11)/", text)
        assert not bad, f"{os.path.relpath(path, ROOT)} includes {bad}: kernel files must stay torch-free"


@pytest.mark.skipif(_nvcc() is None, reason="needs nvcc")
@pytest.mark.skipif(_shipped_sass_is_checked(), reason="test_sass_report.py checks the built kernels' SASS for spills")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_cuda_kernels_do_not_spill(arch, tmp_path):
    """Without a CUDA build of the extension: every kernel source compiled here with ptxas -v
    (8 minutes of CI on 2 cores, so only where the shipped binary cannot be read instead)."""
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    assert sources
    for src in sources:
        cmd = [_nvcc(), "-std=c++17", "-O3", f"-arch={arch}", "-Xptxas=-v", "-I", os.path.join(ROOT, "csrc", "include"),
               "-c", src, "-o", str(tmp_path / "k.o")]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out.stderr)
        assert spills, f"no ptxas report for {src}"
        assert all(s == ("0", "0") for s in spills), f"{os.path.basename(src)} spills on {arch}: {spills}"
