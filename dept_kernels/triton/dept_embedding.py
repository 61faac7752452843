"""Triton kernels of `dept_kernels.ops.dept_embedding` (DESIGN.md §2).

Forward, position mode (row(b, t) = t): a program owns a tile of positions × a tile of
columns and a chunk of the batch. It forms the low-rank tile `scaling * A[t-tile] @ B[:,
d-tile]` on chip once (tl.dot, looping over rank chunks) and adds it to the gathered
embedding rows of every batch element in its chunk, so the low-rank work is s·r·d (times
the few batch chunks), not B·s·r·d. Forward, rows mode (position_ids or token mode): a
program owns a tile of flattened tokens × a tile of columns and gathers the `A` rows.
In both kernels extra programs at the end of grid axis 0 write the prompt rows, so the
whole output comes from one launch with the prompt tiles load-balanced among the rest.

Reduce (the backward of every gather, see `dept_kernels.ops._segments`): the batch sum of
the token rows of `grad_out` per position, or per segment of tokens sharing a row; each
output tile is summed by one program in a fixed order, so the result is deterministic
without atomics.

Compile-time parameters come from small tables keyed on dtypes (no autotuning), and the
sizes that vary per call are never specialised on, so `aot_variants` can list every
variant that runs and `dept_kernels.triton.precompile` compile it ahead of time."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _backend

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
# Tokens summed per step of a segment in the reduce kernel.
BLOCK_N = 16
NUM_WARPS = 4
# Position-mode forward splits the batch into chunks when the tile grid alone is small,
# aiming at this many programs: several per SM on an H100 (132 SMs), so the last wave
# is short. Each chunk recomputes its low-rank tile, r·BLOCK_T·BLOCK_D flops next to
# BLOCK_T·BLOCK_D loads per batch element.
TARGET_PROGRAMS = 1024
# Launch options pinned so the ahead-of-time build compiles exactly what runs (fp
# fusion is also what the fp32 FMA path of tl.dot wants).
COMPILE_OPTIONS = {"num_warps": NUM_WARPS, "enable_fp_fusion": True}
# Sizes that change from call to call: triton would otherwise compile a variant per
# value 1 and per divisibility by 16 of each. The other integer arguments (widths and
# strides) stay specialised, since their divisibility is what allows vector loads.
RUNTIME_SIZES = ("batch", "seq_len", "m", "rank", "batch_chunk", "n_tok")


def forward_constexprs(
    weight_dtype: torch.dtype, factor_dtype: torch.dtype | None, rows_mode: bool
) -> dict:
    """Compile-time parameters of a forward kernel; `factor_dtype` None: no delta.

    Without a delta the position kernel receives `weight` in place of the factors.
    """
    has_lora = {} if rows_mode else {"HAS_LORA": factor_dtype is not None}
    return {
        **has_lora,
        # TF32 would round fp32 factors to 10 mantissa bits; the reference does not.
        "DOT_FP32": (factor_dtype or weight_dtype) == torch.float32,
        "BLOCK_T": BLOCK_T,
        "BLOCK_D": BLOCK_D[weight_dtype],
        "BLOCK_R": BLOCK_R,
    }


def reduce_constexprs(grad_dtype: torch.dtype, ordered: bool) -> dict:
    """Compile-time parameters of the reduce kernels (`ordered`: the segment kernel)."""
    rows = {"BLOCK_N": BLOCK_N} if ordered else {"BLOCK_T": BLOCK_T}
    return {**rows, "BLOCK_D": BLOCK_D[grad_dtype]}


# --------------------------------------------------------------------------- kernels


@triton.jit
def _store_prompt_tile(
    p_ptr,
    out_ptr,
    row0,
    col0,
    b0,
    b1,
    seq_len,
    m,
    d,
    stride_p,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    j = row0 + tl.arange(0, BLOCK_T)
    cols = col0 + tl.arange(0, BLOCK_D)
    mask = (j < m)[:, None] & (cols < d)[None, :]
    # stride_p is 0 for a broadcast prompt: every row then reads the same cached line.
    p = tl.load(p_ptr + j.to(tl.int64)[:, None] * stride_p + cols[None, :], mask=mask)
    p = p.to(out_ptr.dtype.element_ty)
    for b in range(b0, b1):
        rows = tl.cast(b, tl.int64) * (m + seq_len) + j
        tl.store(out_ptr + rows[:, None] * d + cols[None, :], p, mask=mask)


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
):
    """fp32 (BLOCK_T, BLOCK_D) tile of A[a_rows] @ B[:, cols]; a_rows are int64."""
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
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


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def _fwd_position_kernel(
    ids_ptr,
    w_ptr,
    p_ptr,
    a_ptr,
    b_ptr,
    out_ptr,
    batch,
    seq_len,
    m,
    d,
    rank,
    stride_w,
    stride_p,
    batch_chunk,
    scaling,
    HAS_LORA: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    b0 = tl.program_id(2) * batch_chunk
    b1 = tl.minimum(b0 + batch_chunk, batch)
    col0 = pid_d * BLOCK_D
    n_t = tl.cdiv(seq_len, BLOCK_T)
    if pid_t >= n_t:
        _store_prompt_tile(
            p_ptr,
            out_ptr,
            (pid_t - n_t) * BLOCK_T,
            col0,
            b0,
            b1,
            seq_len,
            m,
            d,
            stride_p,
            BLOCK_T,
            BLOCK_D,
        )
    else:
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = col0 + tl.arange(0, BLOCK_D)
        t_mask = t < seq_len
        col_mask = cols < d
        mask = t_mask[:, None] & col_mask[None, :]
        if HAS_LORA:
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
        ids = tl.load(ids_ptr + tl.cast(b0, tl.int64) * seq_len + t, mask=t_mask, other=0)
        for b in range(b0, b1):
            b64 = tl.cast(b, tl.int64)
            # The next element's ids load while this one's rows do: the id -> row dependency
            # would otherwise cost two memory latencies per step. (The last step reloads its
            # own ids rather than branch.)
            b_next = tl.minimum(b64 + 1, b1 - 1)
            ids_next = tl.load(ids_ptr + b_next * seq_len + t, mask=t_mask, other=0)
            emb = tl.load(w_ptr + ids.to(tl.int64)[:, None] * stride_w + cols[None, :], mask=mask)
            emb = emb.to(tl.float32)
            if HAS_LORA:
                emb += delta
            rows = b64 * (m + seq_len) + m + t
            tl.store(
                out_ptr + rows[:, None] * d + cols[None, :],
                emb.to(out_ptr.dtype.element_ty),
                mask=mask,
            )
            ids = ids_next


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def _fwd_rows_kernel(
    ids_ptr,
    rows_ptr,
    w_ptr,
    p_ptr,
    a_ptr,
    b_ptr,
    out_ptr,
    batch,
    seq_len,
    m,
    d,
    rank,
    stride_w,
    stride_p,
    scaling,
    DOT_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    col0 = tl.program_id(1) * BLOCK_D
    n_tok = batch * seq_len
    n_tok_tiles = tl.cdiv(n_tok, BLOCK_T)
    if pid >= n_tok_tiles:
        # Prompt programs each own one batch element: no low-rank tile to share here.
        q = pid - n_tok_tiles
        n_j = tl.cdiv(m, BLOCK_T)
        b = q // n_j
        _store_prompt_tile(
            p_ptr,
            out_ptr,
            (q % n_j) * BLOCK_T,
            col0,
            b,
            b + 1,
            seq_len,
            m,
            d,
            stride_p,
            BLOCK_T,
            BLOCK_D,
        )
    else:
        n = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = col0 + tl.arange(0, BLOCK_D)
        n_mask = n < n_tok
        col_mask = cols < d
        mask = n_mask[:, None] & col_mask[None, :]
        ids = tl.load(ids_ptr + n, mask=n_mask, other=0).to(tl.int64)
        a_rows = tl.load(rows_ptr + n, mask=n_mask, other=0).to(tl.int64)
        delta = _lowrank_tile(
            a_ptr,
            b_ptr,
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
        emb = tl.load(w_ptr + ids[:, None] * stride_w + cols[None, :], mask=mask)
        emb = emb.to(tl.float32) + scaling * delta
        out_rows = (n // seq_len) * (m + seq_len) + m + n % seq_len
        tl.store(
            out_ptr + out_rows[:, None] * d + cols[None, :],
            emb.to(out_ptr.dtype.element_ty),
            mask=mask,
        )


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def _reduce_position_kernel(
    g_ptr,
    out_ptr,
    batch,
    seq_len,
    m,
    d,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (t < seq_len)[:, None] & (cols < d)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for b in range(batch):
        rows = tl.cast(b, tl.int64) * (m + seq_len) + m + t
        acc += tl.load(g_ptr + rows[:, None] * d + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + t.to(tl.int64)[:, None] * d + cols[None, :], acc, mask=mask)


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def _reduce_segment_kernel(
    g_ptr,
    order_ptr,
    offsets_ptr,
    out_ptr,
    seq_len,
    m,
    d,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seg = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < d
    start = tl.load(offsets_ptr + seg)
    end = tl.load(offsets_ptr + seg + 1)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for i0 in range(start, end, BLOCK_N):
        i = i0 + tl.arange(0, BLOCK_N)
        i_mask = i < end
        n = tl.load(order_ptr + i, mask=i_mask, other=0)
        rows = (n // seq_len) * (m + seq_len) + m + n % seq_len
        acc += tl.load(
            g_ptr + rows[:, None] * d + cols[None, :],
            mask=i_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
    total = tl.sum(acc, axis=0)
    tl.store(out_ptr + seg.to(tl.int64) * d + cols, total, mask=col_mask)


# --------------------------------------------------------------------------- launchers


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
) -> Tensor:
    """(B, m + s, d) output of `weight.dtype`; see `dept_kernels.ops.dept_embedding`."""
    batch, seq_len = input_ids.shape
    d = weight.shape[1]
    m = 0 if prompt is None else prompt.shape[0]
    out = weight.new_empty(batch, m + seq_len, d)
    if out.numel() == 0:
        return out
    if prompt is None:
        # Never read (there are no prompt programs); any pointer of a listed dtype will do.
        prompt, stride_p = weight, 0
    else:
        if prompt.stride(1) != 1:
            prompt = prompt.contiguous()
        stride_p = prompt.stride(0)
    if lora_a is None:
        factor_dtype, rank = None, 0
        lora_a = lora_b = weight
    else:
        lora_a, lora_b = _factors(lora_a, lora_b)
        factor_dtype, rank = lora_a.dtype, lora_a.shape[1]
    meta = forward_constexprs(weight.dtype, factor_dtype, rows_mode=rows is not None)
    if factor_dtype == torch.bfloat16 and _backend.triton_interpreting():
        # The interpreter multiplies bf16 tiles as their raw uint16 bits (triton 3.x
        # `create_dot`); the fp32 path computes the same exact products with the fp32
        # accumulation of the tensor cores.
        meta["DOT_FP32"] = True
    n_d = triton.cdiv(d, meta["BLOCK_D"])
    n_prompt = triton.cdiv(m, BLOCK_T)
    if rows is None:
        n_t = triton.cdiv(seq_len, BLOCK_T)
        n_chunks = min(batch, triton.cdiv(TARGET_PROGRAMS, (n_t + n_prompt) * n_d))
        batch_chunk = triton.cdiv(batch, n_chunks)
        grid = (n_t + n_prompt, n_d, triton.cdiv(batch, batch_chunk))
        _fwd_position_kernel[grid](
            input_ids,
            weight,
            prompt,
            lora_a,
            lora_b,
            out,
            batch,
            seq_len,
            m,
            d,
            rank,
            weight.stride(0),
            stride_p,
            batch_chunk,
            scaling,
            **meta,
            **COMPILE_OPTIONS,
        )
    else:
        if rows.dtype != input_ids.dtype:
            # One index dtype per variant; rows is (B, s), cheap to convert.
            rows = rows.to(input_ids.dtype)
        grid = (triton.cdiv(batch * seq_len, BLOCK_T) + n_prompt * batch, n_d)
        _fwd_rows_kernel[grid](
            input_ids,
            rows,
            weight,
            prompt,
            lora_a,
            lora_b,
            out,
            batch,
            seq_len,
            m,
            d,
            rank,
            weight.stride(0),
            stride_p,
            scaling,
            **meta,
            **COMPILE_OPTIONS,
        )
    return out


def reduce(grad_out: Tensor, m: int, order: Tensor | None, offsets: Tensor | None) -> Tensor:
    """fp32 batch sum of the token rows of `grad_out` (B, m + s, d).

    `order is None`: (s, d), one row per position. Otherwise (R, d): row u sums the
    flattened tokens `order[offsets[u]:offsets[u + 1]]`.
    """
    batch, total, d = grad_out.shape
    seq_len = total - m
    meta = reduce_constexprs(grad_out.dtype, ordered=order is not None)
    n_d = triton.cdiv(d, meta["BLOCK_D"])
    if order is None:
        if batch == 0:
            return grad_out.new_zeros(seq_len, d, dtype=torch.float32)
        out = grad_out.new_empty(seq_len, d, dtype=torch.float32)
        if out.numel():
            _reduce_position_kernel[(triton.cdiv(seq_len, BLOCK_T), n_d)](
                grad_out, out, batch, seq_len, m, d, **meta, **COMPILE_OPTIONS
            )
        return out
    out = grad_out.new_empty(offsets.numel() - 1, d, dtype=torch.float32)
    if out.numel():
        _reduce_segment_kernel[(out.shape[0], n_d)](
            grad_out, order, offsets, out, seq_len, m, d, **meta, **COMPILE_OPTIONS
        )
    return out


def aot_variants() -> Iterator[tuple[str, dict[str, torch.dtype], dict]]:
    """(kernel, element dtype of each pointer, constexprs) of every launch made here.

    Crosses the dtypes the launchers pass with the tables above; `dept_kernels.triton.precompile`
    compiles the list.
    """
    for ids, weight, prompt in itertools.product(IDS, FLOATS, FLOATS):
        for factor in (None, *FLOATS):
            # Without a delta the launcher passes `weight` in place of the factors.
            ab = factor or weight
            pointers = dict(
                ids_ptr=ids, w_ptr=weight, p_ptr=prompt, a_ptr=ab, b_ptr=ab, out_ptr=weight
            )
            yield "_fwd_position_kernel", pointers, forward_constexprs(weight, factor, False)
        for factor in FLOATS:
            pointers = dict(
                ids_ptr=ids,
                rows_ptr=ids,
                w_ptr=weight,
                p_ptr=prompt,
                a_ptr=factor,
                b_ptr=factor,
                out_ptr=weight,
            )
            yield "_fwd_rows_kernel", pointers, forward_constexprs(weight, factor, True)
    for grad in FLOATS:
        pointers = dict(g_ptr=grad, out_ptr=torch.float32)
        yield "_reduce_position_kernel", pointers, reduce_constexprs(grad, ordered=False)
        pointers = dict(
            g_ptr=grad, order_ptr=torch.int64, offsets_ptr=torch.int64, out_ptr=torch.float32
        )
        yield "_reduce_segment_kernel", pointers, reduce_constexprs(grad, ordered=True)
