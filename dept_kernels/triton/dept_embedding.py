"""Triton kernels of `dept_kernels.ops.dept_embedding` (docs/design.md §2).

Forward, position mode (row(b, t) = t): a program owns a tile of positions × a tile of
columns and a chunk of the batch. It forms the low-rank tile `scaling * A[t-tile] @ B[:,
d-tile]` on chip once (tl.dot, looping over rank chunks) and adds it to the gathered
embedding rows of every batch element in its chunk, so the low-rank work is s·r·d (times
the few batch chunks), not B·s·r·d. Forward, rows mode (position_ids or token mode): a
program owns a tile of flattened tokens × a tile of columns and gathers the `A` rows.
In both kernels extra programs at the end of grid axis 0 write the prompt rows, then the
visual rows (copies from their strided source, after the token rows), so the whole output
comes from one launch with the copied tiles load-balanced among the rest.

Per-task parameters (HAS_TASKS): the position kernel walks its batch chunk in the op's
task-sorted order and forms the low-rank tile again only when the task changes, so the
work is (distinct tasks)·s·r·d (times the few chunks); the rows kernel tiles the tokens of
one sample at a time instead of the flattened batch, so every tile has one task and one
`B[task]` for its tl.dot (at the price of masked lanes in the last tile of short samples).

Reduce (the backward of every gather, see `dept_kernels.ops._grads`): the batch sum of
the token rows of `grad_out` per position, or per segment of tokens sharing a row; each
output tile is summed by one program in a fixed order, so the result is deterministic
without atomics.

Compile-time parameters come from small tables keyed on dtypes (no autotuning), and the
sizes that vary per call are never specialised on, so `aot_variants` can list every
variant that runs and `dept_kernels.triton.precompile` compile it ahead of time."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import interpreting

__all__ = [
    "aot_variants",
    "forward",
    "forward_constexprs",
    "reduce",
    "reduce_constexprs",
]

# The dtypes the launchers pass (`aot_variants` crosses them).
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
IDS = (torch.int32, torch.int64)
# Positions (or tokens) per tile: the smallest M of tl.dot, which keeps the on-chip delta
# tile (BLOCK_T × BLOCK_D fp32) small enough to stay in registers across the batch loop.
BLOCK_T = 16
# Column tiles of 512 bytes per row: 16-byte vector loads across a warp and 8 KiB in
# flight per program and batch step. Real embeddings are at least this wide; a narrow d
# only leaves lanes masked. One width per dtype keeps the ahead-of-time list closed.
BLOCK_D = {torch.float32: 128, torch.float16: 256, torch.bfloat16: 256}
# Rank chunk of tl.dot: its minimum K. The rank loop is software-pipelined by the
# compiler, padding wastes at most 15 rows (r = 40 runs as 48, not 64), and the operand
# tiles stay small on the fp32 (FMA) path.
BLOCK_R = 16
# Tokens summed per step of a segment in the reduce kernel (two steps' rows load together).
BLOCK_N = 8
# Positions per tile of the batch-sum reduce kernel, which loads 4 batch elements' rows
# together: 4 x 8 rows of 512 bytes = 16 KiB in flight per program, with registers for 8
# programs per SM, and twice the programs of 16-row tiles.
REDUCE_BLOCK_T = 8
NUM_WARPS = 4
# Blocks of NUM_WARPS warps each kernel is sized to keep resident per SM: the launchers size
# their grids from it, and tests/triton/test_sass_facts.py checks that the compiled
# registers fit (65536 / (blocks * 32 * NUM_WARPS) per thread). Not imposed with ptxas's
# maxnreg: under a cap ptxas spilled kernels that need fewer registers without one.
CTAS_PER_SM = {
    "_fwd_position_kernel": 4,
    "_fwd_rows_kernel": 4,
    "_reduce_position_kernel": 8,
    "_reduce_segment_kernel": 6,
}
# Position-mode forward splits the batch into chunks when the tile grid alone is small,
# aiming at WAVES full waves of resident programs (SMs x CTAS_PER_SM), so the last,
# partial wave is a small part of the work. Each chunk recomputes its low-rank tile,
# r·BLOCK_T·BLOCK_D FMAs next to BLOCK_T·BLOCK_D loads per batch element.
WAVES = 2
# SMs assumed where the device cannot say (the interpreter's CPU tensors): an H100's.
FALLBACK_SMS = 132
# Launch options pinned so the ahead-of-time build compiles exactly what runs (fp
# fusion is also what the fp32 FMA path of tl.dot wants).
COMPILE_OPTIONS = {"num_warps": NUM_WARPS, "enable_fp_fusion": True}
# Sizes that change from call to call: triton would otherwise compile a variant per
# value 1 and per divisibility by 16 of each. The other integer arguments (widths and
# strides) stay specialised, since their divisibility is what allows vector loads.
RUNTIME_SIZES = ("batch", "seq_len", "m", "n_v", "rank", "batch_chunk", "n_tok", "max_len")


def forward_constexprs(
    weight_dtype: torch.dtype, factor_dtype: torch.dtype | None, rows_mode: bool, tasks: bool
) -> dict:
    """Compile-time parameters of a forward kernel; `factor_dtype` None: no delta.

    Without a delta the position kernel receives `weight` in place of the factors; without
    `tasks` both kernels receive `input_ids` in place of the task ids and batch order.
    """
    has_lora = {} if rows_mode else {"HAS_LORA": factor_dtype is not None}
    return {
        **has_lora,
        "HAS_TASKS": tasks,
        # Half-precision factors form the low-rank tile on the tensor cores (exact products,
        # fp32 sums); fp32 factors with fp32 FMAs (TF32 would round them to 10 mantissa
        # bits; the reference does not). The position kernel once formed every tile with
        # FMAs, keeping it in the rows' layout (no barrier in its batch loop), but the
        # H200 run of 2026-11-30 measured its bf16 forward at 1.27x-1.72x the time of the
        # tensor-core tile's (docs/kernels.md): its programs hold one or two batch
        # elements, so the tile's r FMAs per element outweigh the layout change.
        "DOT_FP32": (factor_dtype or weight_dtype) == torch.float32,
        "BLOCK_T": BLOCK_T,
        "BLOCK_D": BLOCK_D[weight_dtype],
        "BLOCK_R": BLOCK_R,
    }


def reduce_constexprs(grad_dtype: torch.dtype, ordered: bool) -> dict:
    """Compile-time parameters of the reduce kernels (`ordered`: the segment kernel)."""
    rows = {"BLOCK_N": BLOCK_N} if ordered else {"BLOCK_T": REDUCE_BLOCK_T}
    return {**rows, "BLOCK_D": BLOCK_D[grad_dtype]}


# --------------------------------------------------------------------------- kernels


@triton.jit
def _store_prompt_tile(
    p_ptr,
    task_ptr,
    order_ptr,
    out_ptr,
    row0,
    col0,
    i0,
    i1,
    width,
    m,
    d,
    stride_pt,
    stride_p,
    HAS_TASKS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Prompt rows [row0, row0 + BLOCK_T) of the samples at batch positions [i0, i1); each
    sample has `width` output rows.

    With HAS_TASKS position i is sample `order[i]`, whose task picks the prompt.
    """
    j = row0 + tl.arange(0, BLOCK_T)
    cols = col0 + tl.arange(0, BLOCK_D)
    mask = (j < m)[:, None] & (cols < d)[None, :]
    # stride_p is 0 for a broadcast prompt: every row then reads the same cached line.
    offsets = j.to(tl.int64)[:, None] * stride_p + cols[None, :]
    if not HAS_TASKS:
        p = tl.load(p_ptr + offsets, mask=mask).to(out_ptr.dtype.element_ty)
    for i in range(i0, i1):
        b = tl.cast(i, tl.int64)
        if HAS_TASKS:
            b = tl.load(order_ptr + b)
            # Samples come grouped by task, so consecutive loads hit the same cached rows.
            p = tl.load(p_ptr + tl.load(task_ptr + b) * stride_pt + offsets, mask=mask)
            p = p.to(out_ptr.dtype.element_ty)
        rows = b * width + j
        tl.store(out_ptr + rows[:, None] * d + cols[None, :], p, mask=mask)


@triton.jit
def _store_visual_tile(
    v_ptr,
    out_ptr,
    row0,
    col0,
    i0,
    i1,
    first,
    width,
    n_v,
    d,
    stride_vb,
    stride_vv,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Visual rows [row0, row0 + BLOCK_T) of samples [i0, i1), copied from their strided
    source to output rows `first + j` (first = m + s) of each sample's `width`."""
    j = row0 + tl.arange(0, BLOCK_T)
    cols = col0 + tl.arange(0, BLOCK_D)
    mask = (j < n_v)[:, None] & (cols < d)[None, :]
    offsets = j.to(tl.int64)[:, None] * stride_vv + cols[None, :]
    for i in range(i0, i1):
        b = tl.cast(i, tl.int64)
        v = tl.load(v_ptr + b * stride_vb + offsets, mask=mask)
        rows = b * width + first + j
        tl.store(out_ptr + rows[:, None] * d + cols[None, :], v, mask=mask)


@triton.jit
def _lowrank_tile(
    a_ptr,
    b_ptr,
    a_rows,
    row_mask,
    cols,
    col_mask,
    rank,
    d,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_FP32: tl.constexpr,
    STAGES: tl.constexpr = None,
):
    """fp32 (BLOCK_T, BLOCK_D) tile of A[a_rows] @ B[:, cols]; a_rows are int64.

    STAGES None lets the compiler pick the software pipelining of the rank loop.
    """
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for r0 in tl.range(0, rank, BLOCK_R, num_stages=STAGES):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_mask = rr < rank
        a = tl.load(
            a_ptr + a_rows[:, None] * rank + rr[None, :],
            mask=row_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + rr.to(tl.int64)[:, None] * d + cols[None, :],
            mask=r_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _store_token_tiles(
    ids_ptr,
    w_ptr,
    a_ptr,
    b_ptr,
    task_ptr,
    order_ptr,
    out_ptr,
    t0,
    col0,
    i0,
    i1,
    seq_len,
    width,
    m,
    d,
    rank,
    max_len,
    stride_w,
    scaling,
    HAS_LORA: tl.constexpr,
    HAS_TASKS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Token rows of positions [t0, t0 + BLOCK_T) of the samples at batch positions [i0, i1):
    the embedding rows plus the low-rank tile, formed once (again per task change).

    Software-pipelined by hand: the rows of element i + 1 and the ids of element i + 2 load
    while element i is added and stored, so a program keeps a tile of rows in flight at
    every step. With per-task tiles only the ids load ahead (see the loop)."""
    t = t0 + tl.arange(0, BLOCK_T)
    cols = col0 + tl.arange(0, BLOCK_D)
    t_mask = t < seq_len
    col_mask = cols < d
    mask = t_mask[:, None] & col_mask[None, :]
    # Batch position i holds sample order[i] with tasks (grouped by task), else i.
    b = tl.cast(i0, tl.int64)
    if HAS_TASKS:
        b = tl.load(order_ptr + b)
    ids = tl.load(ids_ptr + b * seq_len + t, mask=t_mask, other=0)
    b_next = tl.minimum(tl.cast(i0, tl.int64) + 1, i1 - 1)
    if HAS_TASKS:
        b_next = tl.load(order_ptr + b_next)
    # (Batch positions compared as vectors: the interpreter takes no scalar in a mask.)
    zero = tl.zeros_like(t)
    ids_next = tl.load(ids_ptr + b_next * seq_len + t, mask=t_mask & (zero + i0 + 1 < i1), other=0)
    if HAS_LORA:
        if HAS_TASKS:
            # Formed in the loop, whenever the task changes; -1 is no task.
            task = tl.full((), -1, tl.int64)
            delta = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        else:
            delta = scaling * _lowrank_tile(
                a_ptr,
                b_ptr,
                t.to(tl.int64),
                t_mask,
                cols,
                col_mask,
                rank,
                d,
                BLOCK_T,
                BLOCK_D,
                BLOCK_R,
                DOT_FP32,
            )
    if not (HAS_LORA and HAS_TASKS):
        # After the low-rank tile: loaded before it, these rows would hold registers through
        # its loop (sm_90 bf16: 130 rather than 128, past the budget of 4 blocks per SM).
        emb = tl.load(w_ptr + ids.to(tl.int64)[:, None] * stride_w + cols[None, :], mask=mask)
    for i in range(i0, i1):
        b_after = tl.minimum(tl.cast(i, tl.int64) + 2, i1 - 1)
        if HAS_TASKS:
            b_after = tl.load(order_ptr + b_after)
        # Masked past the chunk's end rather than branched: the last steps load nothing.
        ids_after = tl.load(
            ids_ptr + b_after * seq_len + t, mask=t_mask & (zero + i + 2 < i1), other=0
        )
        if HAS_LORA and HAS_TASKS:
            task_b = tl.load(task_ptr + b)
            if task_b != task:
                # Unpipelined: inside the batch loop, pipeline buffers would add to the
                # loop's live registers, and the tile is formed only at task changes, so
                # its latency matters little.
                delta = scaling * _lowrank_tile(
                    a_ptr + task_b * max_len * rank,
                    b_ptr + task_b * rank * d,
                    t.to(tl.int64),
                    t_mask,
                    cols,
                    col_mask,
                    rank,
                    d,
                    BLOCK_T,
                    BLOCK_D,
                    BLOCK_R,
                    DOT_FP32,
                    1,
                )
                task = task_b
            # This element's rows, after the task check (their ids came two steps ahead):
            # rows loaded a step ahead would stay live through the tile's loop (sm_80 fp32:
            # 183 registers rather than 96).
            emb = tl.load(w_ptr + ids.to(tl.int64)[:, None] * stride_w + cols[None, :], mask=mask)
        else:
            ahead = (zero + i + 1 < i1)[:, None]
            emb_next = tl.load(
                w_ptr + ids_next.to(tl.int64)[:, None] * stride_w + cols[None, :],
                mask=mask & ahead,
            )
        out = emb.to(tl.float32)
        if HAS_LORA:
            out += delta
        rows = b * width + m + t
        tl.store(
            out_ptr + rows[:, None] * d + cols[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=mask,
        )
        if not (HAS_LORA and HAS_TASKS):
            emb = emb_next
        ids = ids_next
        ids_next = ids_after
        b = b_next
        b_next = b_after


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def _fwd_position_kernel(
    ids_ptr,
    w_ptr,
    p_ptr,
    a_ptr,
    b_ptr,
    task_ptr,
    order_ptr,
    v_ptr,
    out_ptr,
    batch,
    seq_len,
    m,
    n_v,
    d,
    rank,
    max_len,
    stride_w,
    stride_pt,
    stride_p,
    stride_vb,
    stride_vv,
    batch_chunk,
    scaling,
    HAS_LORA: tl.constexpr,
    HAS_TASKS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    i0 = tl.program_id(2) * batch_chunk
    i1 = tl.minimum(i0 + batch_chunk, batch)
    col0 = pid_d * BLOCK_D
    n_t = tl.cdiv(seq_len, BLOCK_T)
    n_p = tl.cdiv(m, BLOCK_T)
    width = m + seq_len + n_v
    if pid_t >= n_t + n_p:
        _store_visual_tile(
            v_ptr,
            out_ptr,
            (pid_t - n_t - n_p) * BLOCK_T,
            col0,
            i0,
            i1,
            m + seq_len,
            width,
            n_v,
            d,
            stride_vb,
            stride_vv,
            BLOCK_T,
            BLOCK_D,
        )
    elif pid_t >= n_t:
        _store_prompt_tile(
            p_ptr,
            task_ptr,
            order_ptr,
            out_ptr,
            (pid_t - n_t) * BLOCK_T,
            col0,
            i0,
            i1,
            width,
            m,
            d,
            stride_pt,
            stride_p,
            HAS_TASKS,
            BLOCK_T,
            BLOCK_D,
        )
    else:
        _store_token_tiles(
            ids_ptr,
            w_ptr,
            a_ptr,
            b_ptr,
            task_ptr,
            order_ptr,
            out_ptr,
            pid_t * BLOCK_T,
            col0,
            i0,
            i1,
            seq_len,
            width,
            m,
            d,
            rank,
            max_len,
            stride_w,
            scaling,
            HAS_LORA,
            HAS_TASKS,
            DOT_FP32,
            BLOCK_T,
            BLOCK_D,
            BLOCK_R,
        )


@triton.jit
def _store_rows_tile(
    ids_ptr,
    rows_ptr,
    w_ptr,
    a_ptr,
    b_ptr,
    task_ptr,
    out_ptr,
    tile,
    col0,
    batch,
    seq_len,
    width,
    m,
    d,
    rank,
    max_len,
    stride_w,
    scaling,
    HAS_TASKS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Token tile `tile` (of one sample with HAS_TASKS, else of the flattened batch): the
    embedding rows plus each token's gathered low-rank row."""
    n_tok = batch * seq_len
    n_t = tl.cdiv(seq_len, BLOCK_T)
    cols = col0 + tl.arange(0, BLOCK_D)
    col_mask = cols < d
    if HAS_TASKS:
        # A tile of one sample's tokens: one task, so one B[task] for the whole tile.
        b = tile // n_t
        t = (tile % n_t) * BLOCK_T + tl.arange(0, BLOCK_T)
        n = b.to(tl.int64) * seq_len + t
        n_mask = t < seq_len
        task = tl.load(task_ptr + b)
        a_task = a_ptr + task * max_len * rank
        b_task = b_ptr + task * rank * d
    else:
        n = tile.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        n_mask = n < n_tok
        a_task = a_ptr
        b_task = b_ptr
    mask = n_mask[:, None] & col_mask[None, :]
    ids = tl.load(ids_ptr + n, mask=n_mask, other=0).to(tl.int64)
    a_rows = tl.load(rows_ptr + n, mask=n_mask, other=0).to(tl.int64)
    # Issued before the rank loop, so the rows are in flight while the low-rank tile forms.
    emb = tl.load(w_ptr + ids[:, None] * stride_w + cols[None, :], mask=mask)
    delta = _lowrank_tile(
        a_task,
        b_task,
        a_rows,
        n_mask,
        cols,
        col_mask,
        rank,
        d,
        BLOCK_T,
        BLOCK_D,
        BLOCK_R,
        DOT_FP32,
    )
    emb = emb.to(tl.float32) + scaling * delta
    out_rows = (n // seq_len) * width + m + n % seq_len
    tl.store(
        out_ptr + out_rows[:, None] * d + cols[None, :],
        emb.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def _fwd_rows_kernel(
    ids_ptr,
    rows_ptr,
    w_ptr,
    p_ptr,
    a_ptr,
    b_ptr,
    task_ptr,
    v_ptr,
    out_ptr,
    batch,
    seq_len,
    m,
    n_v,
    d,
    rank,
    max_len,
    stride_w,
    stride_pt,
    stride_p,
    stride_vb,
    stride_vv,
    scaling,
    HAS_TASKS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    col0 = tl.program_id(1) * BLOCK_D
    n_tok = batch * seq_len
    n_t = tl.cdiv(seq_len, BLOCK_T)
    n_tok_tiles = batch * n_t if HAS_TASKS else tl.cdiv(n_tok, BLOCK_T)
    n_prompt_tiles = batch * tl.cdiv(m, BLOCK_T)
    width = m + seq_len + n_v
    if pid >= n_tok_tiles + n_prompt_tiles:
        # Visual programs, like the prompt ones, each own one batch element.
        q = pid - n_tok_tiles - n_prompt_tiles
        n_j = tl.cdiv(n_v, BLOCK_T)
        b = q // n_j
        _store_visual_tile(
            v_ptr,
            out_ptr,
            (q % n_j) * BLOCK_T,
            col0,
            b,
            b + 1,
            m + seq_len,
            width,
            n_v,
            d,
            stride_vb,
            stride_vv,
            BLOCK_T,
            BLOCK_D,
        )
    elif pid >= n_tok_tiles:
        # Prompt programs each own one batch element: no low-rank tile to share here.
        q = pid - n_tok_tiles
        n_j = tl.cdiv(m, BLOCK_T)
        b = q // n_j
        p_task = p_ptr
        if HAS_TASKS:
            p_task += tl.load(task_ptr + b) * stride_pt
        _store_prompt_tile(
            p_task,
            task_ptr,
            task_ptr,
            out_ptr,
            (q % n_j) * BLOCK_T,
            col0,
            b,
            b + 1,
            width,
            m,
            d,
            stride_pt,
            stride_p,
            False,
            BLOCK_T,
            BLOCK_D,
        )
    else:
        _store_rows_tile(
            ids_ptr,
            rows_ptr,
            w_ptr,
            a_ptr,
            b_ptr,
            task_ptr,
            out_ptr,
            pid,
            col0,
            batch,
            seq_len,
            width,
            m,
            d,
            rank,
            max_len,
            stride_w,
            scaling,
            HAS_TASKS,
            DOT_FP32,
            BLOCK_T,
            BLOCK_D,
            BLOCK_R,
        )


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def _reduce_position_kernel(
    g_ptr,
    out_ptr,
    batch,
    seq_len,
    m,
    d,
    stride_gb,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (t < seq_len)[:, None] & (cols < d)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    tile = g_ptr + ((m + t).to(tl.int64) * d)[:, None] + cols[None, :]
    zero = tl.zeros_like(t)
    for b0 in range(0, batch, 4):
        # Four batch elements' rows in flight together (issued before any of them is
        # summed), then added in batch order, the order of a plain loop.
        b = tl.cast(b0, tl.int64)
        # (Compared as vectors: the interpreter takes no scalar in a mask.)
        b_t = (zero + b0)[:, None]
        x0 = tl.load(tile + b * stride_gb, mask=mask, other=0.0)
        x1 = tl.load(tile + (b + 1) * stride_gb, mask=mask & (b_t + 1 < batch), other=0.0)
        x2 = tl.load(tile + (b + 2) * stride_gb, mask=mask & (b_t + 2 < batch), other=0.0)
        x3 = tl.load(tile + (b + 3) * stride_gb, mask=mask & (b_t + 3 < batch), other=0.0)
        acc += x0
        acc += x1
        acc += x2
        acc += x3
    tl.store(out_ptr + t.to(tl.int64)[:, None] * d + cols[None, :], acc, mask=mask)


@triton.jit
def _segment_rows(g_ptr, n, n_mask, col_mask, cols, seq_len, m, d, stride_gb):
    """The rows of `grad_out` of flattened tokens `n` (zeros where masked)."""
    rows = (n // seq_len) * stride_gb + (m + n % seq_len) * d
    return tl.load(
        g_ptr + rows[:, None] + cols[None, :], mask=n_mask[:, None] & col_mask[None, :], other=0.0
    )


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def _reduce_segment_kernel(
    g_ptr,
    order_ptr,
    offsets_ptr,
    out_ptr,
    seq_len,
    m,
    d,
    stride_gb,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seg = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < d
    start = tl.load(offsets_ptr + seg)
    end = tl.load(offsets_ptr + seg + 1)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    # Two steps of BLOCK_N tokens per iteration, whose token indices were loaded by the one
    # before: the gathered rows are one memory latency away, not two. acc[j] sums tokens
    # start + j, start + j + BLOCK_N, ... in token order, then tl.sum adds the BLOCK_N rows:
    # a fixed order, so the result is deterministic.
    i = start + tl.arange(0, BLOCK_N)
    n_a = tl.load(order_ptr + i, mask=i < end, other=0)
    n_b = tl.load(order_ptr + i + BLOCK_N, mask=i + BLOCK_N < end, other=0)
    for i0 in range(start, end, 2 * BLOCK_N):
        i_a = i0 + tl.arange(0, BLOCK_N)
        i_b = i_a + BLOCK_N
        x_a = _segment_rows(g_ptr, n_a, i_a < end, col_mask, cols, seq_len, m, d, stride_gb)
        x_b = _segment_rows(g_ptr, n_b, i_b < end, col_mask, cols, seq_len, m, d, stride_gb)
        n_a = tl.load(order_ptr + i_a + 2 * BLOCK_N, mask=i_a + 2 * BLOCK_N < end, other=0)
        n_b = tl.load(order_ptr + i_b + 2 * BLOCK_N, mask=i_b + 2 * BLOCK_N < end, other=0)
        acc += x_a
        acc += x_b
    total = tl.sum(acc, axis=0)
    tl.store(out_ptr + seg.to(tl.int64) * d + cols, total, mask=col_mask)


# --------------------------------------------------------------------------- launchers


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return FALLBACK_SMS


def resident_programs(device: torch.device, kernel: str) -> int:
    """Programs of `kernel` that run at once on `device`: SMs x CTAS_PER_SM (one wave)."""
    return _sm_count(device) * CTAS_PER_SM[kernel]


def _factors(lora_a: Tensor, lora_b: Tensor) -> tuple[Tensor, Tensor]:
    """The low-rank factors as the kernels take them: one dtype, contiguous.

    Factors of different dtypes are upcast to fp32 (they are tiny), so each kernel has one
    variant per factor dtype rather than one per pair.
    """
    if lora_a.dtype != lora_b.dtype:
        lora_a, lora_b = lora_a.float(), lora_b.float()
    return lora_a.contiguous(), lora_b.contiguous()


def forward(
    input_ids: Tensor,
    weight: Tensor,
    prompt: Tensor | None,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    rows: Tensor | None,
    scaling: float,
    task_ids: Tensor | None = None,
    batch_order: Tensor | None = None,
    visual: Tensor | None = None,
) -> Tensor:
    """(B, m + s + n_v, d) output of `weight.dtype`; see `dept_kernels.ops.dept_embedding`.

    With `task_ids` (B,) int64 the parameters are stacked per task and `batch_order` (B,)
    int64 lists the samples grouped by task. `visual` (B, n_v, d) rows are read in place
    through their strides.
    """
    batch, seq_len = input_ids.shape
    d = weight.shape[1]
    m = 0 if prompt is None else prompt.shape[-2]
    visual, n_v, stride_vb, stride_vv = _visual_operand(visual, weight)
    out = weight.new_empty(batch, m + seq_len + n_v, d)
    if out.numel() == 0:
        return out
    tasks = task_ids is not None
    if not tasks:
        # Never read; an index tensor keeps the variants to the listed pointer dtypes.
        task_ids = batch_order = input_ids
    prompt, stride_pt, stride_p = _prompt_operand(prompt, weight, tasks)
    if lora_a is None:
        factor_dtype, rank, max_len = None, 0, 0
        lora_a = lora_b = weight
    else:
        lora_a, lora_b = _factors(lora_a, lora_b)
        factor_dtype, rank, max_len = lora_a.dtype, lora_a.shape[-1], lora_a.shape[-2]
    meta = forward_constexprs(weight.dtype, factor_dtype, rows_mode=rows is not None, tasks=tasks)
    if factor_dtype == torch.bfloat16 and interpreting():
        # The interpreter multiplies bf16 tiles as their raw uint16 bits (triton 3.x
        # `create_dot`); the fp32 path computes the same exact products with the fp32
        # accumulation of the tensor cores.
        meta["DOT_FP32"] = True
    sizes = (batch, seq_len, m, n_v, d, rank, max_len, weight.stride(0), stride_pt, stride_p)
    sizes += (stride_vb, stride_vv)
    n_d = triton.cdiv(d, meta["BLOCK_D"])
    n_prompt = triton.cdiv(m, BLOCK_T)
    n_visual = triton.cdiv(n_v, BLOCK_T)
    if rows is None:
        n_t = triton.cdiv(seq_len, BLOCK_T)
        tiles = n_t + n_prompt + n_visual
        resident = resident_programs(weight.device, "_fwd_position_kernel")
        n_chunks = min(batch, triton.cdiv(WAVES * resident, tiles * n_d))
        batch_chunk = triton.cdiv(batch, n_chunks)
        grid = (tiles, n_d, triton.cdiv(batch, batch_chunk))
        pointers = (input_ids, weight, prompt, lora_a, lora_b, task_ids, batch_order, visual, out)
        _fwd_position_kernel[grid](
            *pointers,
            *sizes,
            batch_chunk,
            scaling,
            **meta,
            **COMPILE_OPTIONS,
        )
    else:
        if rows.dtype != input_ids.dtype:
            # One index dtype per variant; rows is (B, s), cheap to convert.
            rows = rows.to(input_ids.dtype)
        if tasks:
            n_tok_tiles = batch * triton.cdiv(seq_len, BLOCK_T)
        else:
            n_tok_tiles = triton.cdiv(batch * seq_len, BLOCK_T)
        grid = (n_tok_tiles + (n_prompt + n_visual) * batch, n_d)
        pointers = (input_ids, rows, weight, prompt, lora_a, lora_b, task_ids, visual, out)
        _fwd_rows_kernel[grid](*pointers, *sizes, scaling, **meta, **COMPILE_OPTIONS)
    return out


def _prompt_operand(prompt: Tensor | None, weight: Tensor, tasks: bool) -> tuple[Tensor, int, int]:
    """(prompt, task stride, row stride) as the kernels read the prompt.

    A stride-0 broadcast (EPT, per task or shared) is read in place. Without a prompt there
    are no prompt programs, so any pointer of a listed dtype will do.
    """
    if prompt is None:
        return weight, 0, 0
    if prompt.stride(-1) != 1:
        prompt = prompt.contiguous()
    return prompt, prompt.stride(0) if tasks else 0, prompt.stride(-2)


def _visual_operand(visual: Tensor | None, weight: Tensor) -> tuple[Tensor, int, int, int]:
    """(visual, n_v, batch stride, row stride) as the kernels read the visual rows: in place
    unless the last stride is not 1. Without visual rows there are no visual programs, so
    `weight` (same dtype, the listed pointer variant) stands in."""
    if visual is None or visual.shape[1] == 0:
        return weight, 0, 0, 0
    if visual.stride(-1) != 1:
        visual = visual.contiguous()
    return visual, visual.shape[1], visual.stride(0), visual.stride(1)


def reduce(grad_out: Tensor, m: int, order: Tensor | None, offsets: Tensor | None) -> Tensor:
    """fp32 batch sum of the token rows of `grad_out` (B, m + s, d).

    `order is None`: (s, d), one row per position. Otherwise (R, d): row u sums the
    flattened tokens `order[offsets[u]:offsets[u + 1]]`. Rows are read d apart, samples
    `grad_out.stride(0)` apart (`dept_kernels.ops._grads.row_layout`).
    """
    batch, total, d = grad_out.shape
    seq_len = total - m
    stride_gb = grad_out.stride(0) if batch > 1 else total * d
    meta = reduce_constexprs(grad_out.dtype, ordered=order is not None)
    n_d = triton.cdiv(d, meta["BLOCK_D"])
    if order is None:
        if batch == 0:
            return grad_out.new_zeros(seq_len, d, dtype=torch.float32)
        out = grad_out.new_empty(seq_len, d, dtype=torch.float32)
        if out.numel():
            _reduce_position_kernel[(triton.cdiv(seq_len, REDUCE_BLOCK_T), n_d)](
                grad_out,
                out,
                batch,
                seq_len,
                m,
                d,
                stride_gb,
                **meta,
                **COMPILE_OPTIONS,
            )
        return out
    out = grad_out.new_empty(offsets.numel() - 1, d, dtype=torch.float32)
    if out.numel():
        _reduce_segment_kernel[(out.shape[0], n_d)](
            grad_out,
            order,
            offsets,
            out,
            seq_len,
            m,
            d,
            stride_gb,
            **meta,
            **COMPILE_OPTIONS,
        )
    return out


def aot_variants() -> Iterator[tuple[str, dict[str, torch.dtype], dict]]:
    """(kernel, element dtype of each pointer, constexprs) of every launch made here.

    Crosses the dtypes the launchers pass with the tables above; `dept_kernels.triton.precompile`
    compiles the list.
    """
    for ids, weight, prompt, tasks in itertools.product(IDS, FLOATS, FLOATS, (False, True)):
        # Without tasks the launcher passes `input_ids` in place of the task ids and order.
        task = torch.int64 if tasks else ids
        for factor in (None, *FLOATS):
            # Without a delta the launcher passes `weight` in place of the factors.
            ab = factor or weight
            pointers = dict(
                ids_ptr=ids,
                w_ptr=weight,
                p_ptr=prompt,
                a_ptr=ab,
                b_ptr=ab,
                task_ptr=task,
                order_ptr=task,
                v_ptr=weight,
                out_ptr=weight,
            )
            meta = forward_constexprs(weight, factor, False, tasks)
            yield "_fwd_position_kernel", pointers, meta
        for factor in FLOATS:
            pointers = dict(
                ids_ptr=ids,
                rows_ptr=ids,
                w_ptr=weight,
                p_ptr=prompt,
                a_ptr=factor,
                b_ptr=factor,
                task_ptr=task,
                v_ptr=weight,
                out_ptr=weight,
            )
            yield "_fwd_rows_kernel", pointers, forward_constexprs(weight, factor, True, tasks)
    for grad in FLOATS:
        pointers = dict(g_ptr=grad, out_ptr=torch.float32)
        yield "_reduce_position_kernel", pointers, reduce_constexprs(grad, ordered=False)
        pointers = dict(
            g_ptr=grad, order_ptr=torch.int64, offsets_ptr=torch.int64, out_ptr=torch.float32
        )
        yield "_reduce_segment_kernel", pointers, reduce_constexprs(grad, ordered=True)
