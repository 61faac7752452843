"""Gradients of the ops: batch-first reductions, then small matmuls.

Backward of a gather (`out[n] += table[rows[n]]`) is a scatter-add of the output gradient
into the gathered rows. Here it is done as a segmented sum: the tokens are grouped by the
row they read, and the backend's `reduce` kernel sums each group in a fixed order without
atomics, so the result is deterministic and each output-gradient row is read once. No
(B, s, d) tensor is saved or created.

Shared parameters (no tasks) wanting both the prompt's and the factors' gradients read the
output gradient once: the prompt rows are summed in the same `reduce` call as the token
rows (`prompt_and_row_sums`), and dA, dB are small matmuls on those (L, d) sums; in position
mode a backend may do all of it in one call (`reduce_lowrank`, `_sums_and_lowrank_grads`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends

__all__ = [
    "aot_table_grad",
    "dept_embedding_grads",
    "prompt_and_row_sums",
    "row_layout",
    "row_sums",
]


def row_layout(grad_out: Tensor) -> Tensor:
    """`grad_out` (B, w, d) as the reduce kernels read it: unit column stride and rows d
    apart, any batch stride that is a multiple of d. The text columns of an output with
    visual rows (a view) pass in place; other layouts (an expanded gradient) are copied."""
    batch, width, d = grad_out.shape
    stride_b, stride_r, stride_c = grad_out.stride()
    in_place = (
        (d <= 1 or stride_c == 1)
        and (width <= 1 or stride_r == d)
        and (batch <= 1 or (d > 0 and stride_b % d == 0 and stride_b >= width * d))
    )
    return grad_out if in_place else grad_out.contiguous()


def segments(keys: Tensor, num_keys: int) -> tuple[Tensor | None, Tensor, Tensor]:
    """`(used, order, offsets)`: the flattened `keys` (N,) grouped by key for a segmented
    sum, found with no host sync: every size comes from shapes, never from the keys' values.

    R = min(N, num_keys) segments. `order` lists the N positions grouped by key (stable),
    `offsets` (R + 1,) bounds each group. With num_keys <= N segment u is key u (`used` is
    None); else `used` (R,) holds each segment's key, sorted, the segments after the
    distinct keys being empty (zero sums) with the largest key. Add the sums to their rows
    (`index_put_(..., accumulate=True)`): an empty segment may repeat a key.

    Keys are clamped into [0, num_keys) first: a key that sync-free mode let through (it
    records, not reads, the ids) cannot write out of bounds; the record raises later.
    """
    flat = keys.reshape(-1).long().clamp(0, max(num_keys - 1, 0))
    order = torch.argsort(flat, stable=True)
    if num_keys <= flat.numel():
        used, slot = None, flat
    else:
        ordered = flat[order]
        new = torch.ones_like(ordered, dtype=torch.bool)
        new[1:] = ordered[1:] != ordered[:-1]
        slot_ordered = new.cumsum(0) - 1  # the segment of each key in sorted order
        # Duplicate indices write one value: deterministic.
        used = torch.full_like(flat, num_keys - 1).index_put_((slot_ordered,), ordered)
        slot = torch.empty_like(flat).index_put_((order,), slot_ordered)
    size = num_keys if used is None else flat.numel()
    counts = flat.new_zeros(size).index_add_(0, slot, torch.ones_like(flat))
    return used, order, F.pad(counts.cumsum(0), (1, 0))


def row_sums(
    grad_out: Tensor, skip: int, rows: Tensor | None, num_rows: int, backend: str
) -> tuple[Tensor | None, Tensor]:
    """Per-row sums of the token gradients of `grad_out` (B, skip + s, d).

    Returns `(used, sums)`: fp32 sums (R, d) and their rows as `segments` gives them (None:
    rows 0..R-1). `rows` lie in [0, num_rows); `rows is None` means token t read row t (the
    default DePT positions), which needs no grouping: the kernel sums over the batch
    directly, R = s.
    """
    kernels = backends.load(backend)
    if rows is None:
        return None, kernels.reduce(grad_out, skip, None, None)
    used, order, offsets = segments(rows, num_rows)
    return used, kernels.reduce(grad_out, skip, order, offsets)


def prompt_and_row_sums(
    grad_out: Tensor, m: int, rows: Tensor | None, num_rows: int, backend: str
) -> tuple[Tensor, Tensor | None, Tensor]:
    """`(prompt_sums (m, d), used, sums)`, all fp32 sums over the batch of `grad_out`
    (B, m + s, d), from one `reduce` call: one read of the output gradient. `used` and
    `sums` are the token rows' (`row_sums`; rows in [0, num_rows)).

    The prompt rows are keyed 0..m-1 and token rows m + their row, so the prompt's sums are
    the first m segments (every prompt row is read when B > 0). `rows is None` (row t for
    token t) needs no keys: the position sums over all m + s rows.
    """
    kernels = backends.load(backend)
    batch, _, d = grad_out.shape
    if rows is None:
        sums = kernels.reduce(grad_out, 0, None, None)
        return sums[:m], None, sums[m:]
    prompt_keys = torch.arange(m, device=rows.device).expand(batch, m)
    # Clamped here too, so that a row out of range stays a token row (see `segments`).
    rows = rows.long().clamp(0, max(num_rows - 1, 0))
    keys = torch.cat([prompt_keys, rows + m], dim=1)
    used, order, offsets = segments(keys, m + num_rows)
    sums = kernels.reduce(grad_out, 0, order, offsets)
    if batch == 0:
        return grad_out.new_zeros(m, d, dtype=torch.float32), None, sums[m:]
    return sums[:m], None if used is None else used[m:] - m, sums[m:]


def dept_embedding_grads(
    grad_out: Tensor,
    input_ids: Tensor,
    rows: Tensor | None,
    task_ids: Tensor | None,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    num_prompt: int,
    num_tasks: int,
    vocab_size: int,
    scaling: float,
    prompt_dtype: torch.dtype,
    prompt_grad: bool,
    weight_grad: bool,
    backend: str,
) -> list[Tensor]:
    """[d_prompt (m, d) or (T, m, d), d_lora_a, d_lora_b, d_weight (V, d) or empty] of
    `dept_embedding`, from `grad_out` (B, m + s, d) in `row_layout`.

    `lora_a is None`: no low-rank gradient is wanted; `prompt_grad` False gives the prompt's
    gradient as zeros of its shape.
    """
    m = num_prompt
    # Each absent gradient is its own empty tensor: custom-op outputs may not alias.
    d_a, d_b, d_weight = (grad_out.new_empty(0) for _ in range(3))
    if task_ids is None and prompt_grad and lora_a is not None and lora_a.shape[-1] > 0:
        # The prompt's and the factors' gradients from one read of grad_out.
        prompt_sums, d_a, d_b = _sums_and_lowrank_grads(
            grad_out, m, rows, lora_a, lora_b, scaling, backend, prompt=True
        )
        # A copy, not a view: without `reduce_lowrank` the sums hold all m + s rows, which
        # the gradient would otherwise keep alive.
        d_prompt = prompt_sums.to(prompt_dtype, copy=True)
    else:
        d_prompt = _prompt_grad(
            grad_out, m, task_ids, num_tasks, prompt_dtype, prompt_grad, backend
        )
        if lora_a is not None:
            d_a, d_b = _separate_lowrank_grads(
                grad_out, m, rows, task_ids, lora_a, lora_b, scaling, backend
            )
    if weight_grad:
        used, g = row_sums(grad_out, m, input_ids, vocab_size, backend)
        d_weight = _dense_rows(vocab_size, used, g, grad_out.dtype, backend)
    return [d_prompt, d_a, d_b, d_weight]


def _sums_and_lowrank_grads(
    grad_out: Tensor,
    m: int,
    rows: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    backend: str,
    prompt: bool,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """(fp32 prompt sums (m, d), a view, or None unless `prompt`; dA (L, r), dB (r, d) in the
    factors' dtypes) of shared parameters, from one read of `grad_out`: in one call where the
    backend has a position-mode kernel for it (`reduce_lowrank`, the cpu backend's), else
    the row sums (with the prompt rows' when `prompt`) and two small matmuls."""
    fused = getattr(backends.load(backend), "reduce_lowrank", None)
    if rows is None and fused is not None:
        # Without the prompt's sums, its rows are left out of the view the kernel reads.
        tokens = grad_out if prompt else grad_out[:, m:]
        # bf16 factors go in as they are: the GEMMs then take the sums rounded to bf16, as
        # autograd of the formula does (docs/design.md §2, "Numerics"); others in fp32.
        bf16 = lora_a.dtype == lora_b.dtype == torch.bfloat16
        dtype = torch.bfloat16 if bf16 else torch.float32
        a, b = lora_a.detach().to(dtype), lora_b.detach().to(dtype)
        sums, d_a, d_b = fused(tokens, m if prompt else 0, a, b, scaling)
        return sums if prompt else None, d_a.to(lora_a.dtype), d_b.to(lora_b.dtype)
    if prompt:
        prompt_sums, used, g = prompt_and_row_sums(grad_out, m, rows, lora_a.shape[0], backend)
    else:
        prompt_sums, (used, g) = None, row_sums(grad_out, m, rows, lora_a.shape[0], backend)
    return prompt_sums, *_lowrank_from_sums(used, g, lora_a, lora_b, scaling)


def _prompt_grad(
    grad_out: Tensor,
    m: int,
    task_ids: Tensor | None,
    num_tasks: int,
    prompt_dtype: torch.dtype,
    prompt_grad: bool,
    backend: str,
) -> Tensor:
    """The prompt's gradient alone, (m, d) or (T, m, d); zeros when `prompt_grad` is False."""
    d = grad_out.shape[-1]
    if not prompt_grad:
        shape = (m, d) if task_ids is None else (num_tasks, m, d)
        return grad_out.new_zeros(shape, dtype=prompt_dtype)
    if task_ids is None:
        return grad_out[:, :m].sum(0, dtype=torch.float32).to(prompt_dtype)
    return _task_prompt_grad(grad_out, m, task_ids.long(), num_tasks, backend).to(prompt_dtype)


def _separate_lowrank_grads(
    grad_out: Tensor,
    m: int,
    rows: Tensor | None,
    task_ids: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(dA, dB) when the prompt's gradient is not formed in the same pass."""
    if lora_a.shape[-1] == 0:
        # r = 0: the factors are unused, so their gradients are zeros (of empty shapes).
        return torch.zeros_like(lora_a), torch.zeros_like(lora_b)
    if task_ids is None:
        _, d_a, d_b = _sums_and_lowrank_grads(
            grad_out, m, rows, lora_a, lora_b, scaling, backend, prompt=False
        )
        return d_a, d_b
    return _task_lowrank_grads(grad_out, m, rows, task_ids.long(), lora_a, lora_b, scaling, backend)


def _dense_rows(
    num_rows: int, used: Tensor | None, sums: Tensor, dtype: torch.dtype, backend: str
) -> Tensor:
    """(num_rows, d) of `dtype`: the fp32 segment sums (R, d) at their rows `used` (None:
    0..R-1), zeros elsewhere. Each row is written once where the backend has `scatter_rows`
    (no zero-filled table first), else `_scatter_rows`."""
    dense = getattr(backends.load(backend), "scatter_rows", None)
    if used is not None and dense is not None:
        return dense(used, sums, sums.new_empty(num_rows, sums.shape[-1], dtype=dtype))
    return _scatter_rows(num_rows, used, sums.to(dtype))


def _scatter_rows(num_rows: int, used: Tensor | None, sums: Tensor) -> Tensor:
    """(num_rows, d) zeros with the sums (R, d) added at their rows `used` (None: 0..R-1)."""
    out = sums.new_zeros(num_rows, sums.shape[-1])
    if used is None:
        out[: sums.shape[0]] = sums
        return out
    # Accumulated: an empty segment repeats a key (`segments`), adding zeros to it. Only
    # those zero rows meet a used row twice, so no order of the adds can change a bit. On the
    # CPU `index_add_` takes a fraction of `index_put_(accumulate=True)`'s time (32128 x 768
    # zeros, 4096 rows added, two threads: 4.0 against 7.4 ms, the zeros alone 3.1 ms);
    # elsewhere the latter, whose CUDA kernel is deterministic by construction.
    if out.device.type == "cpu":
        return out.index_add_(0, used, sums)
    return out.index_put_((used,), sums, accumulate=True)


def _lowrank_from_sums(
    used: Tensor | None, g: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float
) -> tuple[Tensor, Tensor]:
    """dA = scaling * S @ B^T (L, r) and dB = scaling * A[used]^T @ S (r, d), in the factors'
    dtypes, from the fp32 sums S (R, d) of the rows `used` (None: 0..R-1, so plain slices
    replace the gather and the scatter)."""
    # Formed transposed, (r, d) @ (d, R): on the 2-core CPU, one thread, that order measured
    # 0.20 ms against 0.30 ms at T5-base dims (and faster at GPT-2 and LLaMA-7B widths);
    # with two threads the two orders were within the noise.
    d_a = _scatter_rows(lora_a.shape[0], used, (lora_b.float() @ g.T).T.mul_(scaling))
    rows_a = lora_a[: g.shape[0]] if used is None else lora_a[used]
    d_b = scaling * (rows_a.float().T @ g)
    return d_a.to(lora_a.dtype), d_b.to(lora_b.dtype)


def _task_prompt_grad(
    grad_out: Tensor, m: int, task_ids: Tensor, num_tasks: int, backend: str
) -> Tensor:
    """fp32 (T, m, d): the prompt rows of `grad_out` (B, m + s, d) summed per task."""
    d = grad_out.shape[-1]
    if not m:
        return grad_out.new_zeros(num_tasks, m, d, dtype=torch.float32)
    # Rows keyed (task, prompt row) go through the deterministic segmented sum; it reads
    # token rows, so the prompt block (B, m, d, no s) is handed over as its own tensor.
    tasks = task_ids.clamp(0, num_tasks - 1)  # see `segments`
    keys = tasks[:, None] * m + torch.arange(m, device=grad_out.device)
    used, sums = row_sums(grad_out[:, :m].contiguous(), 0, keys, num_tasks * m, backend)
    return _scatter_rows(num_tasks * m, used, sums).view(num_tasks, m, d)


def _task_lowrank_grads(
    grad_out: Tensor,
    m: int,
    rows: Tensor | None,
    task_ids: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(dA (T, L, r), dB (T, r, d)) for stacked factors, in their dtypes.

    The token gradients are summed per (task, row) key `task * L + row` in one segmented
    pass; each sum S_u (of task k, row j) then meets its own task's factors through a
    one-hot over the tasks, with no per-task loop (whose split sizes would be read back to
    the host): dA[k, j] = scaling * S_u @ B[k]^T and dB[k] = scaling * sum_u A[k, j]^T S_u.
    The work is T times that of the per-task products, R * T * r * d for R sums.
    """
    batch, width, d = grad_out.shape
    num_tasks, max_len, rank = lora_a.shape
    if rows is None:
        rows = torch.arange(width - m, device=grad_out.device).expand(batch, -1)
    # Clamped apart, so that a task or row out of range stays in its own part of the key.
    tasks = task_ids.clamp(0, num_tasks - 1)[:, None]
    keys = tasks * max_len + rows.long().clamp(0, max_len - 1)
    used, g = row_sums(grad_out, m, keys, num_tasks * max_len, backend)
    if used is None:
        used = torch.arange(g.shape[0], device=g.device)
    task_of, row_of = used // max_len, used % max_len
    # (R, T); not `F.one_hot`, which on the CPU reads the classes' range back.
    tasks_range = torch.arange(num_tasks, device=g.device)
    one_hot = (task_of[:, None] == tasks_range).to(g.dtype)
    # (R, T, r): each sum against every task's B, of which its own task's is kept.
    d_a_rows = (g @ lora_b.float().reshape(num_tasks * rank, d).T).view(-1, num_tasks, rank)
    d_a_rows = (d_a_rows * one_hot[:, :, None]).sum(1).mul_(scaling)
    d_a = _scatter_rows(num_tasks * max_len, used, d_a_rows).view(num_tasks, max_len, rank)
    a_rows = lora_a.float()[task_of, row_of]  # (R, r)
    spread = (one_hot[:, :, None] * a_rows[:, None, :]).reshape(-1, num_tasks * rank)
    d_b = (spread.T @ g).mul_(scaling).view(num_tasks, rank, d)
    return d_a.to(lora_a.dtype), d_b.to(lora_b.dtype)


def aot_table_grad(
    grad_out: Tensor,
    input_ids: Tensor,
    task_ids: Tensor | None,
    table_shape: list[int],
    table_dtype: torch.dtype,
    backend: str,
) -> Tensor:
    """Gradient of the (V, d) or (T, V, d) table of `aot_bias_add`: per-row sums of
    `grad_out` (B, s, d), deterministic."""
    vocab = table_shape[-2]
    num_rows = math.prod(table_shape[:-1])
    rows = input_ids.long().clamp(0, vocab - 1)  # see `segments`
    if task_ids is not None:
        rows = task_ids.long().clamp(0, num_rows // vocab - 1)[:, None] * vocab + rows
    used, sums = row_sums(grad_out.contiguous(), 0, rows, num_rows, backend)
    return _dense_rows(num_rows, used, sums, table_dtype, backend).reshape(table_shape)
