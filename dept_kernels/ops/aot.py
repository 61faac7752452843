"""AoT P-tuning (DESIGN.md §1, AoT): a per-token bias added before a transformer layer.

    out[b, t] = hidden[b, t] + P[ids[b, t]]                         (B, s, d)

`P` is a (V, d) table, or one of T stacked tables (T, V, d) picked per sample by
`task_ids` (B,), so one batch can mix tasks. During training `P` is a reparameterisation
evaluated only on the batch's distinct ids, never on all V rows:

- Kronecker: `P_x = (W_L[x // b] ⊗ W_M[x % b]) @ W_R`, with W_L (a, r), W_M (b, r), W_R (r², d);
- FC: `P_x = f(E[x] @ W_1 + b_1) @ W_2 + b_2`.

The (U, d) rows are formed with small differentiable torch ops; the (B, s, d) work, the
gather-add forward and its segmented-sum backward, is one custom op with a kernel per
backend. Dropout follows the paper (on `P_x` for Kronecker, on `E[x]` for FC) and acts
per distinct id: all occurrences of a token in a batch share one mask, which is what
evaluating on distinct ids means. It draws from torch's generator, so it is reproducible
under `torch.manual_seed` and identical on every backend.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from . import _segments
from . import _validate as v

__all__ = [
    "ACTIVATIONS",
    "aot_bias_add",
    "aot_fc_bias",
    "aot_kron_bias",
    "fc_rows",
    "kron_rows",
    "reference_aot_bias_add",
]

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}


def aot_bias_add(
    hidden: Tensor,
    input_ids: Tensor,
    table: Tensor,
    *,
    task_ids: Tensor | None = None,
    inplace: bool = False,
) -> Tensor:
    """`hidden + table[ids]` (or `table[task_ids[b], ids]`), added in fp32.

    Args:
        hidden: (B, s, d) layer input; sets the output dtype.
        input_ids: (B, s) int64 or int32 ids in [0, V).
        table: (V, d) bias table, or (T, V, d) stacked tables, of any float dtype.
        task_ids: (B,) task of each sample, required with stacked tables.
        inplace: write into `hidden` (inference only: nothing may require grad). Inputs
            that share memory with `hidden` (a view of the table, say) are read as they
            were before the call.

    Returns:
        (B, s, d) tensor of `hidden.dtype` (`hidden` itself when `inplace`).
    """
    return _aot_bias_add(hidden, input_ids, table, task_ids, inplace, ids_checked=False)


def _aot_bias_add(
    hidden: Tensor,
    input_ids: Tensor,
    table: Tensor,
    task_ids: Tensor | None,
    inplace: bool,
    ids_checked: bool,
) -> Tensor:
    """`aot_bias_add`; `ids_checked`: the library's caller has range-checked `input_ids` (and
    `task_ids`) already, so the op skips reading them (AoT's hooks check once per forward,
    not once per layer: on a GPU each check is a device sync). Never exposed publicly: with
    it unchecked ids reach the kernels."""
    _check_table_args(hidden, input_ids, table, task_ids)
    if task_ids is not None:
        task_ids = task_ids.contiguous()
    table = table if table.is_contiguous() else table.contiguous()
    backend = _backend.resolve_later(hidden.device)
    ids = input_ids.contiguous()
    if inplace:
        if torch.is_grad_enabled() and (hidden.requires_grad or table.requires_grad):
            raise RuntimeError(
                "aot_bias_add(inplace=True) is for inference; hidden or table requires grad "
                "(use torch.no_grad() or inplace=False)"
            )
        if not hidden.is_contiguous():
            raise ValueError("aot_bias_add(inplace=True) needs a contiguous hidden")
        torch.ops.dept_kernels.aot_bias_add_(hidden, ids, table, task_ids, backend, ids_checked)
        return hidden
    return torch.ops.dept_kernels.aot_bias_add(
        hidden.contiguous(), ids, table, task_ids, backend, ids_checked
    )


def _check_table_args(
    hidden: Tensor, input_ids: Tensor, table: Tensor, task_ids: Tensor | None
) -> None:
    """Shapes, dtypes and devices of `aot_bias_add`'s arguments (not the ids' values)."""
    _check_hidden(hidden, input_ids)
    v.check_float("table", table, ndim=table.dim() if table.dim() in (2, 3) else 2)
    v.check_device("table", table, hidden.device, like="hidden")
    if table.shape[-1] != hidden.shape[-1]:
        raise ValueError(f"table has width {table.shape[-1]} but hidden has d={hidden.shape[-1]}")
    if table.dim() == 3:
        if task_ids is None:
            raise ValueError("stacked tables (T, V, d) need task_ids (B,)")
        v.check_ids("task_ids", task_ids, ndim=1)
        v.check_device("task_ids", task_ids, hidden.device, like="hidden")
        if task_ids.shape[0] != hidden.shape[0]:
            raise ValueError(
                f"task_ids has {task_ids.shape[0]} entries but the batch has {hidden.shape[0]}"
            )
    elif task_ids is not None:
        raise ValueError("task_ids needs stacked tables of shape (T, V, d)")


def _check_hidden(hidden: Tensor, input_ids: Tensor) -> None:
    v.check_float("hidden", hidden, ndim=3)
    v.check_ids("input_ids", input_ids, ndim=2)
    v.check_device("input_ids", input_ids, hidden.device, like="hidden")
    if tuple(input_ids.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"input_ids shape {tuple(input_ids.shape)} must equal hidden's (B, s) = "
            f"{tuple(hidden.shape[:2])}"
        )


def _shares_memory(a: Tensor, b: Tensor) -> bool:
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
    if x is not None and _shares_memory(hidden, x):
        return x.clone()
    return x


def _table_rows(input_ids: Tensor, table: Tensor, task_ids: Tensor | None, checked: bool) -> Tensor:
    """Row of the flattened (T*V, d) table for every token, range-checked unless `checked`."""
    vocab = table.shape[-2]
    if not checked:
        v.check_range("input_ids", input_ids, vocab)
        if task_ids is not None:
            v.check_range("task_ids", task_ids, table.shape[0])
    if task_ids is None:
        return input_ids
    return task_ids.long()[:, None] * vocab + input_ids.long()


@torch.library.custom_op("dept_kernels::aot_bias_add", mutates_args=())
def _aot_bias_add_op(
    hidden: Tensor,
    input_ids: Tensor,
    table: Tensor,
    task_ids: Tensor | None,
    backend: str | None,
    checked: bool,
) -> Tensor:
    backend = _backend.resolved(backend, hidden.device)
    rows = _table_rows(input_ids, table, task_ids, checked)
    flat = table.reshape(-1, table.shape[-1])
    return _segments.impl(backend).gather_add(hidden, rows, flat, torch.empty_like(hidden))


@_aot_bias_add_op.register_fake
def _(hidden, input_ids, table, task_ids, backend, checked):
    return torch.empty_like(hidden)


@torch.library.custom_op("dept_kernels::aot_bias_add_", mutates_args=("hidden",))
def _aot_bias_add_inplace_op(
    hidden: Tensor,
    input_ids: Tensor,
    table: Tensor,
    task_ids: Tensor | None,
    backend: str | None,
    checked: bool,
) -> None:
    backend = _backend.resolved(backend, hidden.device)
    # Copies taken before the range check, so the ids checked are the ids the kernel reads.
    input_ids, table, task_ids = (_unaliased(hidden, x) for x in (input_ids, table, task_ids))
    rows = _table_rows(input_ids, table, task_ids, checked)
    _segments.impl(backend).gather_add(hidden, rows, table.reshape(-1, table.shape[-1]), hidden)


@_aot_bias_add_inplace_op.register_fake
def _(hidden, input_ids, table, task_ids, backend, checked):
    return None


@torch.library.custom_op("dept_kernels::aot_bias_add_backward", mutates_args=())
def _aot_bias_add_backward_op(
    grad_out: Tensor,
    input_ids: Tensor,
    task_ids: Tensor | None,
    table_shape: list[int],
    table_dtype: torch.dtype,
    backend: str | None,
) -> Tensor:
    """Gradient of the table: per-row sums of `grad_out`, deterministic."""
    backend = _backend.resolved(backend, grad_out.device)
    d = table_shape[-1]
    vocab = table_shape[-2]
    rows = input_ids if task_ids is None else task_ids.long()[:, None] * vocab + input_ids.long()
    used, sums = _segments.row_sums(grad_out.contiguous(), 0, rows, backend)
    grad = grad_out.new_zeros(math.prod(table_shape[:-1]), d, dtype=table_dtype)
    grad[used] = sums.to(table_dtype)
    return grad.reshape(table_shape)


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
        d_table = torch.ops.dept_kernels.aot_bias_add_backward(
            grad_out, input_ids, task_ids, ctx.table_shape, ctx.table_dtype, ctx.backend
        )
    # The bias is added, so the hidden state's gradient passes through unchanged.
    return grad_out if ctx.needs_input_grad[0] else None, None, d_table, None, None, None


_aot_bias_add_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- reparameterisations


def checked_ids(ids: Tensor, upper: int, name: str) -> Tensor:
    """`ids`, after checking that they lie in [0, upper).

    Eager: the check, and `ids` itself. While compiling, a custom op returning a copy: the
    check then runs at run time (tracing cannot read the ids), and it runs before every
    consumer of the returned ids, which a check with no output would not guarantee.
    """
    if torch.compiler.is_compiling():
        return torch.ops.dept_kernels.checked_ids(ids, upper, name)
    v.check_range(name, ids, upper)
    return ids


@torch.library.custom_op("dept_kernels::checked_ids", mutates_args=())
def _checked_ids_op(ids: Tensor, upper: int, name: str) -> Tensor:
    v.check_range(name, ids, upper)
    return ids.clone()


@_checked_ids_op.register_fake
def _(ids, upper, name):
    return torch.empty_like(ids)


def distinct_ids(ids: Tensor, upper: int, name: str = "input_ids") -> tuple[Tensor, Tensor]:
    """`(used, inverse)`: the sorted distinct ids (U,) of `ids`, range-checked against
    [0, upper), and each element's index into them (same shape as `ids`, int64).

    A custom op, so that `torch.compile(fullgraph=True)` traces it with U as an unbacked size
    instead of breaking the graph on `torch.unique`'s data-dependent output.
    """
    return _distinct_ids(ids, upper, name, checked=False)


def _distinct_ids(ids: Tensor, upper: int, name: str, checked: bool) -> tuple[Tensor, Tensor]:
    """`distinct_ids`, skipping the range check where the library's caller has done it."""
    return torch.ops.dept_kernels.distinct_ids(ids, upper, name, checked)


@torch.library.custom_op("dept_kernels::distinct_ids", mutates_args=())
def _distinct_ids_op(ids: Tensor, upper: int, name: str, checked: bool) -> tuple[Tensor, Tensor]:
    if not checked:
        v.check_range(name, ids, upper)
    used, inverse = torch.unique(ids, return_inverse=True)
    return used, inverse


@_distinct_ids_op.register_fake
def _(ids, upper, name, checked):
    count = torch.library.get_ctx().new_dynamic_size()
    return ids.new_empty(count), ids.new_empty(ids.shape, dtype=torch.int64)


def kron_rows(ids: Tensor, w_l: Tensor, w_m: Tensor, w_r: Tensor) -> Tensor:
    """Rows `P_x = (W_L[x // b] ⊗ W_M[x % b]) @ W_R` for the ids (U,) in [0, a*b) → (U, d).

    w_l: (a, r); w_m: (b, r); w_r: (r*r, d).
    """
    v.check_ids("ids", ids, ndim=1)
    _check_kron(w_l, w_m, w_r, ids.device, "ids")
    ids = checked_ids(ids, w_l.shape[0] * w_m.shape[0], "ids")
    return _kron_rows(ids, w_l, w_m, w_r)


def fc_rows(
    ids: Tensor,
    embedding: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    *,
    activation: str = "relu",
    dropout_p: float = 0.0,
) -> Tensor:
    """Rows `P_x = f(dropout(E[x]) @ W_1 + b_1) @ W_2 + b_2` for the ids (U,) in [0, V) → (U, d).

    embedding: (V, e); w1: (e, r); b1: (r,); w2: (r, d); b2: (d,).
    """
    v.check_ids("ids", ids, ndim=1)
    _check_dropout(dropout_p)
    _check_fc(embedding, w1, b1, w2, b2, activation, ids.device, "ids", w2.shape[-1])
    ids = checked_ids(ids, embedding.shape[0], "ids")
    return _fc_rows(ids, embedding, w1, b1, w2, b2, activation, dropout_p)


def _kron_rows(ids: Tensor, w_l: Tensor, w_m: Tensor, w_r: Tensor) -> Tensor:
    b, r = w_m.shape
    ids = ids.long()
    left = w_l[ids // b]  # (U, r)
    right = w_m[ids % b]  # (U, r)
    kron = (left[:, :, None] * right[:, None, :]).reshape(ids.shape[0], r * r)
    return kron @ w_r


def _fc_rows(ids, embedding, w1, b1, w2, b2, activation: str, dropout_p: float) -> Tensor:
    x = F.embedding(ids.long(), embedding).to(w1.dtype)
    if dropout_p:
        x = F.dropout(x, dropout_p)
    return ACTIVATIONS[activation](x @ w1 + b1) @ w2 + b2


def _check_dropout(dropout_p: float) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")


def _check_kron(w_l: Tensor, w_m: Tensor, w_r: Tensor, device: torch.device, like: str) -> None:
    for name, w in (("w_l", w_l), ("w_m", w_m), ("w_r", w_r)):
        v.check_float(name, w, ndim=2)
        v.check_device(name, w, device, like=like)
    (_, r), (_, r_m) = w_l.shape, w_m.shape
    if r != r_m or w_r.shape[0] != r * r:
        raise ValueError(
            f"Kronecker factors disagree on r: w_l {tuple(w_l.shape)}, w_m {tuple(w_m.shape)}, "
            f"w_r {tuple(w_r.shape)} (w_r needs r*r rows)"
        )


def _check_fc(embedding, w1, b1, w2, b2, activation: str, device, like: str, d: int) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    v.check_float("embedding", embedding, ndim=2)
    for name, w, ndim in (("w1", w1, 2), ("b1", b1, 1), ("w2", w2, 2), ("b2", b2, 1)):
        v.check_float(name, w, ndim=ndim)
    for name, w in (("embedding", embedding), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        v.check_device(name, w, device, like=like)
    e, r = w1.shape
    if embedding.shape[1] != e or b1.shape[0] != r or w2.shape != (r, d) or b2.shape[0] != d:
        raise ValueError(
            f"FC shapes disagree: embedding {tuple(embedding.shape)}, w1 {tuple(w1.shape)}, "
            f"b1 {tuple(b1.shape)}, w2 {tuple(w2.shape)}, b2 {tuple(b2.shape)}; expected "
            f"embedding (V, e), w1 (e, r), b1 (r,), w2 (r, {d}), b2 ({d},)"
        )


def aot_kron_bias(
    hidden: Tensor,
    input_ids: Tensor,
    w_l: Tensor,
    w_m: Tensor,
    w_r: Tensor,
    *,
    dropout_p: float = 0.0,
) -> Tensor:
    """`hidden + dropout(P[ids])` with the Kronecker table evaluated on distinct ids only.

    Args:
        hidden: (B, s, d); input_ids: (B, s) ids in [0, a*b).
        w_l: (a, r); w_m: (b, r); w_r: (r*r, d).
        dropout_p: dropout on the rows P_x (per distinct id), 0 in evaluation.
    """
    return _aot_kron_bias(hidden, input_ids, w_l, w_m, w_r, dropout_p, ids_checked=False)


def _aot_kron_bias(
    hidden: Tensor,
    input_ids: Tensor,
    w_l: Tensor,
    w_m: Tensor,
    w_r: Tensor,
    dropout_p: float,
    ids_checked: bool,
) -> Tensor:
    """`aot_kron_bias`; `ids_checked` as in `_aot_bias_add`."""
    _check_hidden(hidden, input_ids)
    _check_dropout(dropout_p)
    _check_kron(w_l, w_m, w_r, hidden.device, "hidden")
    if w_r.shape[1] != hidden.shape[-1]:
        raise ValueError(f"w_r has width {w_r.shape[1]} but hidden has d={hidden.shape[-1]}")
    used, inverse = _distinct_ids(input_ids, w_l.shape[0] * w_m.shape[0], "input_ids", ids_checked)
    rows = _kron_rows(used, w_l, w_m, w_r)
    if dropout_p:
        rows = F.dropout(rows, dropout_p)
    # inverse < U by construction
    return _aot_bias_add(hidden, inverse, rows, None, inplace=False, ids_checked=True)


def aot_fc_bias(
    hidden: Tensor,
    input_ids: Tensor,
    embedding: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    *,
    activation: str = "relu",
    dropout_p: float = 0.0,
) -> Tensor:
    """`hidden + P[ids]` with the FC table evaluated on distinct ids only.

    Args:
        hidden: (B, s, d); input_ids: (B, s) ids in [0, V).
        embedding: (V, e) the model's input embedding table (frozen).
        w1: (e, r); b1: (r,); w2: (r, d); b2: (d,).
        activation: one of ACTIVATIONS; dropout_p: dropout on E[x] (per distinct id).
    """
    return _aot_fc_bias(
        hidden, input_ids, embedding, w1, b1, w2, b2, activation, dropout_p, ids_checked=False
    )


def _aot_fc_bias(
    hidden: Tensor,
    input_ids: Tensor,
    embedding: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    activation: str,
    dropout_p: float,
    ids_checked: bool,
) -> Tensor:
    """`aot_fc_bias`; `ids_checked` as in `_aot_bias_add`."""
    _check_hidden(hidden, input_ids)
    _check_dropout(dropout_p)
    _check_fc(embedding, w1, b1, w2, b2, activation, hidden.device, "hidden", hidden.shape[-1])
    used, inverse = _distinct_ids(input_ids, embedding.shape[0], "input_ids", ids_checked)
    rows = _fc_rows(used, embedding, w1, b1, w2, b2, activation, dropout_p)
    # inverse < U by construction
    return _aot_bias_add(hidden, inverse, rows, None, inplace=False, ids_checked=True)


def reference_aot_bias_add(
    hidden: Tensor, input_ids: Tensor, table: Tensor, *, task_ids: Tensor | None = None
) -> Tensor:
    """The formula in plain differentiable PyTorch, fp32 accumulation: the test oracle."""
    _check_table_args(hidden, input_ids, table, task_ids)
    input_ids = checked_ids(input_ids, table.shape[-2], "input_ids")
    if task_ids is not None:
        task_ids = checked_ids(task_ids, table.shape[0], "task_ids")
    table = table.float()  # so the table's gradient is summed in fp32 too
    if task_ids is not None:
        table = table[task_ids.long()]  # (B, V, d)
        bias = torch.gather(table, 1, input_ids.long()[:, :, None].expand(-1, -1, table.shape[-1]))
    else:
        bias = F.embedding(input_ids.long(), table)
    return (hidden.float() + bias).to(hidden.dtype)
