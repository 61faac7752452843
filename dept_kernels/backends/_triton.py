"""The `triton` backend: the Triton kernels of `dept_kernels.triton`, one module per op.

Takes CUDA tensors, and CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, the CPU
tests). The kernel modules are imported on first use only: importing defines the kernels,
and under the interpreter the variable must be set by then.
"""

from __future__ import annotations

import functools
import importlib.util
from types import SimpleNamespace

import torch

from ..triton import interpreting
from ._registry import BackendUnavailable, register_backend

__all__ = ["devices"]


@functools.cache
def _importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def devices() -> tuple[str, ...]:
    """CUDA, and CPU under the interpreter."""
    return ("cuda", "cpu") if interpreting() else ("cuda",)


def _probe() -> str | None:
    if not _importable():
        return "the triton package is not installed"
    if not (torch.cuda.is_available() or interpreting()):
        return "no CUDA GPU, and TRITON_INTERPRET=1 is not set"
    return None


def _load() -> SimpleNamespace:
    if not _importable():
        raise BackendUnavailable("the triton package is not installed")
    from ..triton.aot_bias import gather_add
    from ..triton.dept_embedding import forward, reduce

    return SimpleNamespace(forward=forward, reduce=reduce, gather_add=gather_add)


register_backend(
    "triton",
    devices,
    _load,
    probe=_probe,
    automatic=True,
    hint="it takes CPU tensors only under TRITON_INTERPRET=1: use CUDA tensors or the "
    "'cpu' backend",
)
