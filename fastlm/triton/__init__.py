"""Triton kernels, one module per op: @triton.jit kernels and their launch helpers only.
Modules here are imported on first use so TRITON_INTERPRET is honoured as set at that time."""
