"""The `torch` backend: the formulas in eager PyTorch, on every device; the fallback of the
others and the reference their kernels are tested against."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor

from ._registry import register_backend


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
    """(B, m + s + n_v, d) output; see `dept_kernels.ops.dept_embedding` for the contract.

    With `task_ids` (B,) the parameters are stacked per task: prompt (T, m, d), lora_a
    (T, L, r), lora_b (T, r, d). `batch_order` (B,), the samples grouped by task, is for the
    kernels that share work within a task; the eager formula has no use for it.
    """
    batch, seq_len = input_ids.shape
    m = 0 if prompt is None else prompt.shape[-2]
    n_v = 0 if visual is None else visual.shape[1]
    # One output buffer, each block written in place: no concatenation of the whole output.
    out = weight.new_empty(batch, m + seq_len + n_v, weight.shape[1])
    tokens = F.embedding(input_ids.long(), weight).float()
    if lora_a is not None:
        if task_ids is None:
            a = lora_a.float()[:seq_len] if rows is None else lora_a.float()[rows.long()]
            tokens += scaling * (a @ lora_b.float())
        else:
            # One batched matmul over the samples, each with its task's factors.
            task = task_ids.long()
            pos = torch.arange(seq_len, device=input_ids.device) if rows is None else rows.long()
            a = lora_a.float()[task[:, None], pos]  # (B, s, r)
            tokens += scaling * (a @ lora_b.float()[task])
    out[:, m : m + seq_len] = tokens
    if m:
        out[:, :m] = prompt if task_ids is None else prompt[task_ids.long()]
    if n_v:
        out[:, m + seq_len :] = visual
    return out


def reduce(grad_out: Tensor, m: int, order: Tensor | None, offsets: Tensor | None) -> Tensor:
    """Sum of the token rows of `grad_out` (B, m + s, d) per low-rank row, in fp32.

    `order is None`: row = position, result (s, d). Otherwise `order` lists the B*s tokens
    grouped by row and `offsets` (R + 1,) bounds each group; result (R, d).
    """
    tokens = grad_out[:, m:]
    if order is None:
        return tokens.sum(0, dtype=torch.float32)
    d = grad_out.shape[-1]
    counts = offsets.diff()
    # The output size is given (every token is in one group), so no host sync finds it.
    segment = torch.repeat_interleave(
        torch.arange(counts.numel(), device=counts.device), counts, output_size=order.numel()
    )
    flat = tokens.reshape(-1, d)[order].float()
    return torch.zeros(counts.numel(), d, device=grad_out.device).index_add_(0, segment, flat)


def gather_add(hidden: Tensor, rows: Tensor, table: Tensor, out: Tensor) -> Tensor:
    """`out = hidden + table[rows]` in fp32, cast to `out.dtype`; `out` may be `hidden`.

    hidden, out (B, s, d); rows (B, s) int; table (R, d) of any float dtype.
    """
    out.copy_(hidden.float() + F.embedding(rows.long(), table).float())
    return out


register_backend("torch", None, lambda: sys.modules[__name__])
