"""The custom ops behind the AoT ops: the gather-add (out of place and in place), its
backward, and the id helpers `checked_ids` / `distinct_ids` traced by torch.compile.

The gather-add checks the ids' range (unless the library's caller did; sync-free, clamps
them) and runs the selected backend's `gather_add`; the backward is a segmented sum
(`_grads.aot_table_grad`) over the table's rows, whose count is a shape: no `torch.unique`,
no host sync. The AoT reparameterisations' table is the (U, d) rows of the forward's
distinct ids and the ids the op gets their inverse, so the backward reuses what the
forward's one `torch.unique` found.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from . import _grads
from . import _validate as v
from ._eager import EagerOp
from ._sync_free import sync_free_enabled


def shares_memory(a: Tensor, b: Tensor) -> bool:
    """Whether `a` and `b` may overlap in memory: one storage and intersecting byte spans
    (conservative: interleaved views that touch no common element count too)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(x: Tensor) -> tuple[int, int]:
        last = sum((size - 1) * stride for size, stride in zip(x.shape, x.stride(), strict=True))
        return x.data_ptr(), x.data_ptr() + (last + 1) * x.element_size()

    (a_start, a_end), (b_start, b_end) = span(a), span(b)
    return a_start < b_end and b_start < a_end


def _unaliased(hidden: Tensor, x: Tensor | None) -> Tensor | None:
    """`x`, or a copy of it if it shares memory with `hidden`: the in-place kernels write
    `hidden` while they read `x`, so they would read rows (or ids) already overwritten."""
    if x is not None and shares_memory(hidden, x):
        return x.clone()
    return x


def table_rows(input_ids: Tensor, table: Tensor, task_ids: Tensor | None, checked: bool) -> Tensor:
    """Row of the flattened (T*V, d) table for every token, range-checked (or, sync-free,
    clamped) unless `checked`."""
    vocab = table.shape[-2]
    if not checked:
        ranges = [v.Range("input_ids", input_ids, vocab)]
        if task_ids is not None:
            ranges.append(v.Range("task_ids", task_ids, table.shape[0]))
        input_ids, *rest = v.checked(*ranges)
        task_ids = rest[0] if rest else None
    if task_ids is None:
        return input_ids
    return task_ids.long()[:, None] * vocab + input_ids.long()


def _aot_bias_add_body(
    hidden: Tensor,
    input_ids: Tensor,
    table: Tensor,
    task_ids: Tensor | None,
    backend: str | None,
    checked: bool,
) -> Tensor:
    backend = backends.resolved(backend, hidden.device)
    rows = table_rows(input_ids, table, task_ids, checked)
    flat = table.reshape(-1, table.shape[-1])
    return backends.load(backend).gather_add(hidden, rows, flat, torch.empty_like(hidden))


_aot_bias_add_op = torch.library.custom_op("dept_kernels::aot_bias_add", mutates_args=())(
    _aot_bias_add_body
)


@_aot_bias_add_op.register_fake
def _(hidden, input_ids, table, task_ids, backend, checked):
    return torch.empty_like(hidden)


def _aot_bias_add_inplace_body(
    hidden: Tensor,
    input_ids: Tensor,
    table: Tensor,
    task_ids: Tensor | None,
    backend: str | None,
    checked: bool,
) -> None:
    backend = backends.resolved(backend, hidden.device)
    # Copies taken before the range check, so the ids checked are the ids the kernel reads.
    input_ids, table, task_ids = (_unaliased(hidden, x) for x in (input_ids, table, task_ids))
    rows = table_rows(input_ids, table, task_ids, checked)
    backends.load(backend).gather_add(hidden, rows, table.reshape(-1, table.shape[-1]), hidden)


_aot_bias_add_inplace_op = torch.library.custom_op(
    "dept_kernels::aot_bias_add_", mutates_args=("hidden",)
)(_aot_bias_add_inplace_body)


def _aot_bias_add_inplace_eager(*args) -> None:
    """The in-place body called directly; the kernel writes `hidden` through its pointer, so
    its version counter is bumped here, as the custom op does for a mutated argument (a
    tensor autograd saved would otherwise be read changed, silently)."""
    _aot_bias_add_inplace_body(*args)
    torch.autograd.graph.increment_version(args[0])


aot_bias_add_inplace_call = EagerOp(_aot_bias_add_inplace_op, _aot_bias_add_inplace_eager)


@_aot_bias_add_inplace_op.register_fake
def _(hidden, input_ids, table, task_ids, backend, checked):
    return None


def _aot_bias_add_backward_body(
    grad_out: Tensor,
    input_ids: Tensor,
    task_ids: Tensor | None,
    table_shape: list[int],
    table_dtype: torch.dtype,
    backend: str | None,
) -> Tensor:
    """Gradient of the table: per-row sums of `grad_out`, deterministic."""
    return _grads.aot_table_grad(
        grad_out,
        input_ids,
        task_ids,
        table_shape,
        table_dtype,
        backends.resolved(backend, grad_out.device),
    )


_aot_bias_add_backward_op = torch.library.custom_op(
    "dept_kernels::aot_bias_add_backward", mutates_args=()
)(_aot_bias_add_backward_body)
_backward_call = EagerOp(_aot_bias_add_backward_op, _aot_bias_add_backward_body)


@_aot_bias_add_backward_op.register_fake
def _(grad_out, input_ids, task_ids, table_shape, table_dtype, backend):
    return grad_out.new_empty(table_shape, dtype=table_dtype)


def _setup_context(ctx, inputs, output) -> None:
    _hidden, input_ids, table, task_ids, backend, _checked = inputs
    ctx.save_for_backward(input_ids, task_ids)
    ctx.table_shape = list(table.shape)
    ctx.table_dtype = table.dtype
    ctx.backend = backend


def _backward(ctx, grad_out):
    input_ids, task_ids = ctx.saved_tensors
    d_table = None
    if ctx.needs_input_grad[2]:
        d_table = _backward_call(
            grad_out, input_ids, task_ids, ctx.table_shape, ctx.table_dtype, ctx.backend
        )
    # The bias is added, so the hidden state's gradient passes through unchanged.
    return grad_out if ctx.needs_input_grad[0] else None, None, d_table, None, None, None


_aot_bias_add_op.register_autograd(_backward, setup_context=_setup_context)
# What the public op calls: the custom op, or its body directly on plain eager tensors.
aot_bias_add_call = EagerOp(_aot_bias_add_op, _aot_bias_add_body, _setup_context, _backward)


@torch.library.custom_op("dept_kernels::checked_ids", mutates_args=())
def _checked_ids_op(ids: Tensor, upper: int, name: str) -> Tensor:
    (ids,) = v.checked(v.Range(name, ids, upper))
    return ids.clone()


@_checked_ids_op.register_fake
def _(ids, upper, name):
    return torch.empty_like(ids)


def _distinct_ids_body(ids: Tensor, upper: int, name: str, checked: bool) -> tuple[Tensor, Tensor]:
    if sync_free_enabled():
        if not checked:
            (ids,) = v.checked(v.Range(name, ids, upper))
        return padded_distinct(ids, upper)
    if checked:
        used, inverse = torch.unique(ids, return_inverse=True)
        return used, inverse
    return checked_distinct(ids, upper, name)


def _sorted_slots(ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`(flat, ordered, order, slot)`: the ids flattened to int64, sorted (stably), the
    sorting permutation, and each sorted id's index among the distinct ones."""
    flat = ids.reshape(-1).long()
    ordered, order = torch.sort(flat, stable=True)
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[1:] = ordered[1:] != ordered[:-1]
    return flat, ordered, order, new.cumsum(0) - 1


def _scatter_distinct(
    ids: Tensor, flat: Tensor, ordered: Tensor, order: Tensor, slot: Tensor, length: int, fill: int
) -> tuple[Tensor, Tensor]:
    """`(used, inverse)` from `_sorted_slots`: `used` of `length` holds the distinct ids at
    their slots (`fill` past them), `inverse` each id's slot."""
    used = flat.new_full((length,), fill)
    # Duplicate indices write one value: deterministic.
    used.index_put_((slot,), ordered)
    inverse = torch.empty_like(flat).index_put_((order,), slot)
    return used.to(ids.dtype), inverse.view(ids.shape)


def checked_distinct(ids: Tensor, upper: int, name: str) -> tuple[Tensor, Tensor]:
    """`torch.unique(ids, return_inverse=True)` after checking that the ids lie in
    [0, upper), with one host read for both: the distinct count and the ids' bounds cross
    in one transfer (`torch.unique` would sync for its count, the check for its bounds).
    Raises the range check's IndexError before the rows are formed."""
    rng = v.Range(name, ids, upper)
    if ids.numel() == 0:
        v.checked(rng)  # raises what sync-free calls recorded
        return ids.new_empty(0), torch.empty(ids.shape, dtype=torch.int64, device=ids.device)
    flat, ordered, order, slot = _sorted_slots(ids)
    count, *bounds = torch.stack([slot[-1] + 1, *v.range_reads([rng])]).tolist()
    v.raise_out_of_range([rng], bounds)
    return _scatter_distinct(ids, flat, ordered, order, slot, count, 0)


def padded_distinct(ids: Tensor, upper: int) -> tuple[Tensor, Tensor]:
    """`torch.unique(ids, return_inverse=True)` without its host sync: `used` has the
    static length R = min(N, upper) for N ids in [0, upper), the U distinct ids first,
    sorted, then R - U copies of `upper - 1` that no element's inverse points at.

    Rows formed from `used` are then R instead of U, and each distinct id still has one row
    (one dropout mask per distinct id, as with `torch.unique`).
    """
    flat, ordered, order, slot = _sorted_slots(ids)
    length = min(flat.numel(), upper)
    return _scatter_distinct(ids, flat, ordered, order, slot, length, max(upper - 1, 0))


_distinct_ids_op = torch.library.custom_op("dept_kernels::distinct_ids", mutates_args=())(
    _distinct_ids_body
)
distinct_ids_call = EagerOp(_distinct_ids_op, _distinct_ids_body)


@_distinct_ids_op.register_fake
def _(ids, upper, name, checked):
    count = torch.library.get_ctx().new_dynamic_size()
    return ids.new_empty(count), ids.new_empty(ids.shape, dtype=torch.int64)
