"""Build and load the C++/CUDA extensions (placeholder until the cpu backend lands)."""

from __future__ import annotations


def cpu_extension_available() -> bool:
    return False


def cuda_extension_available() -> bool:
    return False


def cpu_ops_or_reference():
    from .ops import _torch_impl

    return _torch_impl


def cuda_ops():
    raise RuntimeError("the cuda backend is not built")
