"""Triton kernel of the AoT gather-add `out = hidden + table[rows]` (docs/design.md §1, AoT).

One program per token tile × column tile; the fp32 sum is rounded once into `out`, which
may be `hidden` itself (in-place inference). Its backward is the segmented sum of
`dept_kernels.triton.dept_embedding.reduce`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dept_embedding import BLOCK_D, BLOCK_T, COMPILE_OPTIONS, FLOATS, IDS, RUNTIME_SIZES

__all__ = ["COMPILE_OPTIONS", "CTAS_PER_SM", "RUNTIME_SIZES", "aot_variants", "gather_add"]

# Blocks per SM the kernel is built for (see `dept_embedding.CTAS_PER_SM`).
CTAS_PER_SM = {"_gather_add_kernel": 8}


def gather_add_constexprs(out_dtype: torch.dtype) -> dict:
    """Compile-time parameters of the gather-add kernel."""
    return {"BLOCK_T": BLOCK_T, "BLOCK_D": BLOCK_D[out_dtype]}


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def _gather_add_kernel(
    h_ptr,
    rows_ptr,
    t_ptr,
    out_ptr,
    n_tok,
    seq_len,
    d,
    stride_hb,
    stride_hs,
    stride_ob,
    stride_os,
    stride_t,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_mask = n < n_tok
    mask = n_mask[:, None] & (cols < d)[None, :]
    b, t = n // seq_len, n % seq_len
    rows = tl.load(rows_ptr + n, mask=n_mask, other=0).to(tl.int64)
    h = tl.load(h_ptr + (b * stride_hb + t * stride_hs)[:, None] + cols[None, :], mask=mask)
    e = tl.load(t_ptr + rows[:, None] * stride_t + cols[None, :], mask=mask)
    # Each element is read before it is written by the same program: `out` may be `h`.
    tl.store(
        out_ptr + (b * stride_ob + t * stride_os)[:, None] + cols[None, :],
        (h.to(tl.float32) + e.to(tl.float32)).to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def _unit_last_stride(x: Tensor) -> Tensor:
    """`x` with last stride 1. Not `contiguous()`: torch counts a size-1 dim as contiguous
    whatever its stride, so a one-column tensor would come back unchanged (and the call
    above would recurse forever)."""
    return x if x.stride(-1) == 1 else x.clone(memory_format=torch.contiguous_format)


def gather_add(hidden: Tensor, rows: Tensor, table: Tensor, out: Tensor) -> Tensor:
    """`out = hidden + table[rows]` in fp32, cast to `out.dtype`; `out` may be `hidden`.

    hidden, out (B, s, d); rows (B, s) int; table (R, d) of any float dtype.
    """
    batch, seq_len, d = hidden.shape
    if out.numel() == 0:
        return out
    if hidden.stride(-1) != 1 or out.stride(-1) != 1 or table.stride(-1) != 1:
        # Column-strided layouts are rare; the kernel keeps to vector loads along d.
        result = gather_add(
            _unit_last_stride(hidden),
            rows,
            _unit_last_stride(table),
            torch.empty(hidden.shape, dtype=out.dtype, device=out.device),
        )
        return out.copy_(result)
    rows = rows.contiguous()
    meta = gather_add_constexprs(out.dtype)
    grid = (triton.cdiv(batch * seq_len, BLOCK_T), triton.cdiv(d, meta["BLOCK_D"]))
    _gather_add_kernel[grid](
        hidden,
        rows,
        table,
        out,
        batch * seq_len,
        seq_len,
        d,
        hidden.stride(0),
        hidden.stride(1),
        out.stride(0),
        out.stride(1),
        table.stride(0),
        **meta,
        **COMPILE_OPTIONS,
    )
    return out


def aot_variants() -> Iterator[tuple[str, dict[str, torch.dtype], dict]]:
    """(kernel, element dtype of each pointer, constexprs) of every launch made here."""
    for rows, hidden, table in itertools.product(IDS, FLOATS, FLOATS):
        pointers = dict(h_ptr=hidden, rows_ptr=rows, t_ptr=table, out_ptr=hidden)
        yield "_gather_add_kernel", pointers, gather_add_constexprs(hidden)
