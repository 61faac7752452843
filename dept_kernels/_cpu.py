"""The `cpu` backend: the C++ kernels of `csrc/cpu`, built on first use by `_build`.

Same contract as `dept_kernels.ops._torch_impl`; inputs arrive validated by the op.
"""

from __future__ import annotations

from torch import Tensor

from . import _build


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
) -> Tensor:
    """(B, m + s, d) output in `weight.dtype`; see `dept_kernels.ops.dept_embedding`.

    With `task_ids` (B,) the parameters are stacked per task and `batch_order` (B,) lists
    the samples grouped by task.
    """
    return _build.cpu_extension().forward(
        input_ids, weight, prompt, lora_a, lora_b, rows, float(scaling), task_ids, batch_order
    )


def reduce(grad_out: Tensor, m: int, order: Tensor | None, offsets: Tensor | None) -> Tensor:
    """fp32 sums of the token rows of `grad_out` (B, m + s, d): (s, d), or (R, d) by segment."""
    return _build.cpu_extension().reduce(grad_out, int(m), order, offsets)


def gather_add(hidden: Tensor, rows: Tensor, table: Tensor, out: Tensor) -> Tensor:
    """`out = hidden + table[rows]` (B, s, d), added in fp32; `out` may be `hidden`."""
    return _build.cpu_extension().gather_add(hidden, rows, table, out)
