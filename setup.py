"""Builds the one extension, fastlm._C, with ninja.

CPU kernels (csrc/cpu) are always built. CUDA kernels (csrc/cuda) are built when torch is a
CUDA build and nvcc is found, or forced with FASTLM_BUILD_CUDA=1 / =0. Other knobs:
  FASTLM_CUDA_ARCHS  "8.0;9.0a" by default; PTX of the first arch is embedded for newer GPUs
  FASTLM_CPU_ARCH    -march value for the CPU kernels, "native" by default ("" to omit)
  FASTLM_PTXAS_VERBOSE=1  print ptxas register/spill reports (the build test reads them)
  MAX_JOBS           parallel compile jobs (ninja)
"""
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:  # nvcc may be a wrapper script: ask it where it lives
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME  # read by torch.utils.cpp_extension at import

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda():
    forced = os.environ.get("FASTLM_BUILD_CUDA", "").strip()
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        problems.append("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    if forced == "0":
        return False
    if forced == "1" and problems:
        sys.exit("fastlm: FASTLM_BUILD_CUDA=1 but the CUDA kernels can't be built: " + "; ".join(problems))
    if problems:
        print("fastlm: building without CUDA kernels: " + "; ".join(problems), file=sys.stderr)
    return not problems


def gencode_flags(archs):
    flags = []
    for i, arch in enumerate(a.strip() for a in archs.split(";") if a.strip()):
        num = arch.replace(".", "").replace("+PTX", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if i == 0 or arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def sources(folder, suffix, exclude=None):
    path = os.path.join("csrc", folder)
    names = os.listdir(os.path.join(ROOT, path))
    return sorted(os.path.join(path, f) for f in names if f.endswith(suffix) and not (exclude and f.endswith(exclude)))


def extension():
    cpu_arch = os.environ.get("FASTLM_CPU_ARCH", "native")
    cpu_flags = ["-O3", "-fopenmp", "-fno-math-errno"] + ([f"-march={cpu_arch}"] if cpu_arch else [])
    macros = [("FASTLM_CPU_FLAGS", f'"{" ".join(cpu_flags)}"')]
    args = dict(
        name="fastlm._C",
        sources=["csrc/module.cpp"] + sources("bindings", ".cpp", exclude="_cuda.cpp") + sources("cpu", ".cpp"),
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_compile_args={"cxx": cpu_flags},
        extra_link_args=["-fopenmp"],
        define_macros=macros,
    )
    if not want_cuda():
        return CppExtension(**args)
    archs = os.environ.get("FASTLM_CUDA_ARCHS", "8.0;9.0a")
    nvcc = ["-O3", "-lineinfo", f"--threads={os.cpu_count() or 1}"] + gencode_flags(archs)
    if os.environ.get("FASTLM_PTXAS_VERBOSE") == "1":
        nvcc.append("-Xptxas=-v")
    args["sources"] += sources("bindings", "_cuda.cpp") + sources("cuda", ".cu")
    args["extra_compile_args"]["nvcc"] = nvcc
    args["define_macros"] += [("FASTLM_WITH_CUDA", "1"), ("FASTLM_CUDA_ARCHS", f'"{archs}"')]
    return CUDAExtension(**args)


setup(
    packages=find_packages(include=["fastlm", "fastlm.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
