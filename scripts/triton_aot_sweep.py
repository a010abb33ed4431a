"""Compile every Triton kernel for sm_80, sm_86 and sm_90 with every specialisation and config
its launcher can pick, for fp32/fp16/bf16, and print a table (kernel, target, dtype, config,
shared memory, registers, spills, seconds, status). No GPU needed; single process. A case whose
launcher has no config that fits a target (e.g. sm_86's 99 KB) is a row with status no-config.

    python scripts/triton_aot_sweep.py [--targets 80,90] [--dtypes fp16] [--modules attention] [--jsonl rows.jsonl]

tests/test_triton_aot.py compiles the representative subset (--ci) of the same cases.
"""
import os
import sys

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # kernels must be real JIT functions to compile
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from fastlm.triton.aot import main

    main()
