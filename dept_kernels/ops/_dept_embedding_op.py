"""The custom ops behind `dept_embedding`: forward, backward, their fakes and the autograd link.

`dept_kernels::dept_embedding` checks the id ranges (reading the ids once: after
torch.compile's tracing, before any kernel reads memory; in sync-free mode it clamps them
instead, reading nothing) and runs the selected backend's `forward`;
`dept_kernels::dept_embedding_backward` forms the gradients (`_grads`). Only ids and the
small low-rank factors are saved for backward: nothing of size (B, s, d).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch import Tensor

from .. import backends
from . import _grads
from . import _validate as v
from ._eager import EagerOp

__all__ = [
    "check_default_positions",
    "check_values",
    "dept_embedding_call",
    "fp32_math",
    "lowrank_rows",
]


def check_default_positions(input_ids: Tensor, lora_a: Tensor) -> None:
    """Without position_ids token t reads row t of lora_a: s must not exceed L."""
    _check_length(input_ids.shape[1], lora_a.shape[-2])


def _check_length(seq_len: int, max_length: int) -> None:
    if seq_len > max_length:
        raise ValueError(
            f"input_ids has sequence length s={seq_len} > max_length L={max_length} "
            f"(rows of lora_a); truncate the input or raise max_length"
        )


def value_ranges(
    input_ids: Tensor,
    vocab: int,
    lora_rows: int | None,
    position_ids: Tensor | None,
    task_ids: Tensor | None,
    num_tasks: int,
    index: str,
) -> list[v.Range]:
    """The range of every index tensor the kernels read, for a (V = `vocab`, d) table and
    `lora_rows` rows of lora_a (None without the low-rank factors). Sizes come from the
    caller, so a hook can build them from the config before a sharded table is gathered.

    The mode comes from the declared `index`, never from which tensors are the same object:
    one tensor passed as both input_ids and position_ids is checked twice, against V and L.
    """
    ranges = [v.Range("input_ids", input_ids, vocab)]
    if lora_rows is not None and index == "token":
        # The rows are the ids, checked above; lora_a has one row per id (V = L, checked
        # with the shapes), so this holds unless the op was called around the public checks.
        if lora_rows < vocab:
            ranges.append(
                v.Range("input_ids", input_ids, lora_rows, "index='token' rows of lora_a")
            )
    elif lora_rows is not None and position_ids is not None:
        hint = f"lora_a has max_length L={lora_rows} rows; truncate the input or raise max_length"
        ranges.append(v.Range("position_ids", position_ids, lora_rows, hint))
    elif lora_rows is not None:
        _check_length(input_ids.shape[1], lora_rows)
    if task_ids is not None:
        ranges.append(v.Range("task_ids", task_ids, num_tasks))
    return ranges


def check_values(
    input_ids: Tensor,
    weight: Tensor,
    lora_a: Tensor | None,
    position_ids: Tensor | None,
    task_ids: Tensor | None,
    num_tasks: int,
    index: str,
    checked: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Range checks of every index tensor a kernel reads (`value_ranges`), with one read in
    all (a sync on GPU; none in sync-free mode, which clamps them instead:
    `_validate.checked`). `checked`: the library's caller read these ranges already, in a
    read it made anyway (the padding trim's), and passes the ids as they were checked.

    Returns `(input_ids, position_ids, task_ids)` as the kernels may read them.
    """
    lora_rows = None if lora_a is None else lora_a.shape[-2]
    ranges = value_ranges(
        input_ids, weight.shape[0], lora_rows, position_ids, task_ids, num_tasks, index
    )
    found_ids = [r.ids for r in ranges] if checked else v.checked(*ranges)
    # Token mode may bound input_ids twice: the later bound, the tighter, is the one to keep.
    found = {r.name: ids for r, ids in zip(ranges, found_ids, strict=True)}
    return found["input_ids"], found.get("position_ids"), found.get("task_ids")


def lowrank_rows(
    input_ids: Tensor, lora_a: Tensor | None, position_ids: Tensor | None, index: str
) -> Tensor | None:
    """The rows of lora_a the tokens read: the ids in token mode, else the given positions
    (None: row t for token t)."""
    if lora_a is None:
        return None
    return input_ids if index == "token" else position_ids


def fp32_math(fn: Callable) -> Callable:
    """Run a custom op's body with autocast off: its math is fp32 by contract (docs/design.md §1),
    but autocast stays on inside custom ops (and in a backward run under it), where it would
    round the low-rank products to half precision and mix dtypes in their stores."""

    @functools.wraps(fn)
    def body(*args, **kwargs):
        # Contexts only for the device types whose autocast is on (usually none).
        active = [t for t in ("cpu", "cuda") if torch.is_autocast_enabled(t)]
        if not active:
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for device_type in active:
                stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)

    return body


@fp32_math
def _dept_embedding_body(
    input_ids: Tensor,
    weight: Tensor,
    prompt: Tensor | None,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    position_ids: Tensor | None,
    task_ids: Tensor | None,
    num_tasks: int,
    scaling: float,
    index: str,
    backend: str | None,
    visual: Tensor | None = None,
    checked: bool = False,
) -> Tensor:
    input_ids, position_ids, task_ids = check_values(
        input_ids, weight, lora_a, position_ids, task_ids, num_tasks, index, checked
    )
    backend = backends.resolved(backend, weight.device)
    rows = lowrank_rows(input_ids, lora_a, position_ids, index)
    if lora_a is not None and lora_a.shape[-1] == 0:
        # r = 0: the delta is empty and the kernels run plain prompt tuning; the factors
        # stay inputs of the op so that backward gives them (empty) zero gradients.
        lora_a = lora_b = rows = None
    batch_order = None
    if task_ids is not None:
        if prompt is None and lora_a is None:
            # r = 0 without a prompt: nothing depends on the task.
            task_ids = None
        else:
            task_ids = task_ids.long()
            # Sorted once here, so the kernels can walk the batch task by task and form each
            # low-rank tile once per task present rather than once per sample.
            batch_order = torch.argsort(task_ids, stable=True)
    if visual is not None and visual.shape[1] == 0:
        visual = None  # n_v = 0: nothing to write (its empty gradient comes from backward)
    # Loaded (built on first use) only now, after every check passed.
    return backends.load(backend).forward(
        input_ids, weight, prompt, lora_a, lora_b, rows, scaling, task_ids, batch_order, visual
    )


_dept_embedding_op = torch.library.custom_op("dept_kernels::dept_embedding", mutates_args=())(
    _dept_embedding_body
)


@_dept_embedding_op.register_fake
def _(
    input_ids,
    weight,
    prompt,
    lora_a,
    lora_b,
    position_ids,
    task_ids,
    num_tasks,
    scaling,
    index,
    backend,
    visual=None,
    checked=False,
):
    m = 0 if prompt is None else prompt.shape[-2]
    n_v = 0 if visual is None else visual.shape[1]
    batch, seq_len = input_ids.shape
    return weight.new_empty(batch, m + seq_len + n_v, weight.shape[1])


@fp32_math
def _dept_embedding_backward_body(
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
    backend: str | None,
) -> list[Tensor]:
    """Returns [d_prompt (m, d) or (T, m, d), d_lora_a, d_lora_b, d_weight (V, d) or empty].

    `num_prompt` is where the token rows of `grad_out` start; `prompt_grad` False skips the
    prompt's gradient (returned as zeros of its shape).
    """
    return _grads.dept_embedding_grads(
        _grads.row_layout(grad_out),
        input_ids,
        rows,
        task_ids,
        lora_a,
        lora_b,
        num_prompt,
        num_tasks,
        vocab_size,
        scaling,
        prompt_dtype,
        prompt_grad,
        weight_grad,
        backends.resolved(backend, grad_out.device),
    )


_dept_embedding_backward_op = torch.library.custom_op(
    "dept_kernels::dept_embedding_backward", mutates_args=()
)(_dept_embedding_backward_body)
backward_call = EagerOp(_dept_embedding_backward_op, _dept_embedding_backward_body)


@_dept_embedding_backward_op.register_fake
def _(
    grad_out,
    input_ids,
    rows,
    task_ids,
    lora_a,
    lora_b,
    num_prompt,
    num_tasks,
    vocab_size,
    scaling,
    prompt_dtype,
    prompt_grad,
    weight_grad,
    backend,
):
    d = grad_out.shape[-1]
    prompt_shape = (num_prompt, d) if task_ids is None else (num_tasks, num_prompt, d)
    d_prompt = grad_out.new_empty(prompt_shape, dtype=prompt_dtype)
    d_a = grad_out.new_empty(0) if lora_a is None else torch.empty_like(lora_a)
    d_b = grad_out.new_empty(0) if lora_b is None else torch.empty_like(lora_b)
    d_weight = grad_out.new_empty(vocab_size, d) if weight_grad else grad_out.new_empty(0)
    return [d_prompt, d_a, d_b, d_weight]


def _setup_context(ctx, inputs, output) -> None:
    input_ids, weight, prompt, lora_a, lora_b, position_ids, task_ids = inputs[:7]
    num_tasks, scaling, index, backend = inputs[7:11]
    visual = inputs[11] if len(inputs) > 11 else None
    rows = lowrank_rows(input_ids, lora_a, position_ids, index)
    # Only ids and the small low-rank factors are saved: nothing of size (B, s, d).
    ctx.save_for_backward(input_ids, rows, task_ids, lora_a, lora_b)
    ctx.num_prompt = 0 if prompt is None else prompt.shape[-2]
    # Columns [:text] of grad_out are the prompt and token rows, the rest the visual rows.
    ctx.text = ctx.num_prompt + input_ids.shape[1]
    ctx.has_visual = visual is not None
    ctx.num_tasks = num_tasks
    ctx.prompt_dtype = weight.dtype if prompt is None else prompt.dtype
    ctx.vocab_size = weight.shape[0]
    ctx.scaling = scaling
    ctx.backend = backend


def _backward(ctx, grad_out):
    input_ids, rows, task_ids, lora_a, lora_b = ctx.saved_tensors
    need = ctx.needs_input_grad
    # The visual rows are copies: their gradient is their slice of grad_out. The kernels
    # below read (B, m + s, d), so they get the text columns alone: a view, read in place
    # through its batch stride.
    d_visual = grad_out[:, ctx.text :] if ctx.has_visual and need[11] else None
    if grad_out.shape[1] != ctx.text:
        grad_out = grad_out[:, : ctx.text]
    d_prompt, d_a, d_b, d_weight = backward_call(
        grad_out,
        input_ids,
        rows,
        task_ids,
        lora_a if need[3] or need[4] else None,
        lora_b if need[3] or need[4] else None,
        ctx.num_prompt,
        ctx.num_tasks,
        ctx.vocab_size,
        ctx.scaling,
        ctx.prompt_dtype,
        bool(need[2]),
        bool(need[1]),
        ctx.backend,
    )
    return (
        None,
        d_weight if need[1] else None,
        d_prompt if need[2] else None,
        d_a if need[3] else None,
        d_b if need[4] else None,
        None,
        None,
        None,
        None,
        None,
        None,
        d_visual,
        None,
    )


_dept_embedding_op.register_autograd(_backward, setup_context=_setup_context)
# What the public op calls: the custom op, or its body directly on plain eager tensors.
dept_embedding_call = EagerOp(_dept_embedding_op, _dept_embedding_body, _setup_context, _backward)
