"""Batch-first gradient reduction shared by the ops.

Backward of a gather (`out[n] += table[rows[n]]`) is a scatter-add of the output gradient
into the gathered rows. Here it is done as a segmented sum: the tokens are grouped by the
row they read, and a backend kernel sums each group in a fixed order without atomics, so
the result is deterministic and each output-gradient row is read once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def impl(backend: str):
    """The module implementing the kernels (`forward`, `reduce`, `gather_add`) of `backend`."""
    if backend == "torch":
        from . import _torch_impl

        return _torch_impl
    if backend == "cpu":
        from .. import _build

        return _build.cpu_ops_or_reference()
    if backend == "triton":
        from .. import _triton

        return _triton
    if backend == "cuda":
        from .. import _build

        return _build.cuda_ops()
    raise ValueError(f"unknown backend {backend!r}")


def row_sums(
    grad_out: Tensor, skip: int, rows: Tensor | None, backend: str
) -> tuple[Tensor, Tensor]:
    """Per-row sums of the token gradients of `grad_out` (B, skip + s, d).

    Returns `(used, sums)`: the distinct rows read (R,) and their fp32 gradient sums (R, d).
    `rows is None` means token t read row t (the default DePT positions), which needs no
    grouping: the kernel sums over the batch directly.
    """
    seq_len = grad_out.shape[1] - skip
    if rows is None:
        used = torch.arange(seq_len, device=grad_out.device)
        return used, impl(backend).reduce(grad_out, skip, None, None)
    used, inverse, counts = torch.unique(rows.reshape(-1), return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    offsets = F.pad(counts.cumsum(0), (1, 0))
    return used, impl(backend).reduce(grad_out, skip, order, offsets)
