"""Triton kernels, one module per op: launchers with the backend contract of `dept_kernels.ops`.

Each module defines its kernels at import, so under `TRITON_INTERPRET=1` (CPU tests) the
variable must be set first. `precompile` compiles every kernel variant for CUDA targets without a
GPU.
"""
