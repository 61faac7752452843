"""Triton kernels, one module per op: launchers with the backend contract of `dept_kernels.ops`.

Each module defines its kernels at import, so under `TRITON_INTERPRET=1` (CPU tests) the
variable must be set first. `precompile` compiles every kernel variant for CUDA targets without a
GPU. This package's own import is light: it imports neither triton nor a kernel module.
"""

import os


def interpreting() -> bool:
    """Whether Triton runs kernels under its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
