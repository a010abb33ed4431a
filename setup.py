"""Builds the one extension, fastlm._C, with ninja.

CPU kernels (csrc/cpu) are always built. CUDA kernels (csrc/cuda) are built when torch is a
CUDA build and nvcc is found, or forced with FASTLM_BUILD_CUDA=1 / =0. Other knobs:
  FASTLM_CUDA_ARCHS  "8.0;9.0a" by default; PTX of the first arch is embedded for newer GPUs
  FASTLM_CPU_ARCH    -march value for the CPU kernels, "native" by default ("" to omit)
  FASTLM_PTXAS_VERBOSE=1  print ptxas register/spill reports (the build test reads them)
  FASTLM_BUILD_EMU   1 (default on x86-64 Linux) / 0: also build fastlm._C_emu, the CUDA kernels
                     compiled as host C++ against the SIMT emulator in csrc/emu (CPU tensors,
                     torch.ops.fastlm_emu.*, the "cuda-emu" backend); needs no CUDA toolkit
  MAX_JOBS           parallel compile jobs (ninja)
"""
import concurrent.futures
import os
import platform
import shutil
import subprocess
import sys
import sysconfig

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


# ---------------------------------------------------------------- the emulator build
EMU_FLAGS = ["-std=c++17", "-O2", "-fPIC", "-DFASTLM_EMU", "-fno-strict-aliasing",
             "-Wno-psabi",  # kernels taking a 64-byte aligned TmaDesc by value: GCC's note on that ABI
             "-I" + os.path.join(ROOT, "csrc", "emu", "include"), "-I" + os.path.join(ROOT, "csrc", "include")]
# Kernel files get TSan's instrumentation (every load and store calls a __tsan_* hook) but not
# TSan's runtime: csrc/emu/runtime.cpp implements the hooks as the shared-memory checker.
EMU_KERNEL_FLAGS = ["-fsanitize=thread", "--param", "tsan-instrument-func-entry-exit=0", "-x", "c++"]


def want_emu():
    forced = os.environ.get("FASTLM_BUILD_EMU", "").strip()
    supported = platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")
    if forced == "1" and not supported:
        sys.exit("fastlm: FASTLM_BUILD_EMU=1 but the emulator's fibers are written for x86-64 Linux")
    return supported and forced != "0"


def emu_objects(build_dir):
    """Compiles csrc/cuda/*.cu, the emulator's self-test kernels and its runtime as host C++."""
    cxx = os.environ.get("CXX", sysconfig.get_config_var("CXX") or "c++").split()
    jobs = [(src, EMU_KERNEL_FLAGS) for src in sources("cuda", ".cu") + ["csrc/emu/selftest.cu"]]
    jobs += [("csrc/emu/runtime.cpp", []), ("csrc/emu/sm90.cpp", [])]
    os.makedirs(build_dir, exist_ok=True)

    def compile_one(job):
        src, extra = job
        obj = os.path.join(build_dir, os.path.basename(src).replace(".", "_") + ".o")
        subprocess.check_call(cxx + EMU_FLAGS + extra + ["-c", os.path.join(ROOT, src), "-o", obj])
        return obj

    workers = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(compile_one, jobs))


def emu_extension():
    return CppExtension(
        name="fastlm._C_emu",
        sources=["csrc/emu/module.cpp", "csrc/emu/selftest_binding.cpp"] + sources("bindings", "_cuda.cpp"),
        include_dirs=[os.path.join(ROOT, "csrc", "emu", "include"), os.path.join(ROOT, "csrc", "include"),
                      os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O2", "-fno-strict-aliasing"]},
        define_macros=[("FASTLM_EMU", "1")],
    )


class Build(BuildExtension):
    def build_extension(self, ext):
        if ext.name == "fastlm._C_emu":
            ext.extra_objects = emu_objects(os.path.join(self.build_temp, "emu"))
        super().build_extension(ext)


setup(
    packages=find_packages(include=["fastlm", "fastlm.*"]),
    ext_modules=[extension()] + ([emu_extension()] if want_emu() else []),
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
)
