"""AoT P-tuning (docs/design.md §1, AoT): a per-token bias added before a transformer layer.

    out[b, t] = hidden[b, t] + P[ids[b, t]]                         (B, s, d)

`P` is a (V, d) table, or one of T stacked tables (T, V, d) picked per sample by
`task_ids` (B,), so one batch can mix tasks. During training `P` is a reparameterisation
evaluated only on the batch's distinct ids, never on all V rows:

- Kronecker: `P_x = (W_L[x // b] ⊗ W_M[x % b]) @ W_R`, with W_L (a, r), W_M (b, r), W_R (r², d);
- FC: `P_x = f(E[x] @ W_1 + b_1) @ W_2 + b_2`.

The (U, d) rows are formed with small differentiable torch ops; the (B, s, d) work, the
gather-add forward and its segmented-sum backward, is one custom op with a kernel per
backend (`_aot_op`); this module holds the public functions and their checks. Dropout
follows the paper (on `P_x` for Kronecker, on `E[x]` for FC) and acts per distinct id: all
occurrences of a token in a batch share one mask, which is what evaluating on distinct ids
means. It draws from torch's generator, so it is reproducible
under `torch.manual_seed` and identical on every backend. In sync-free mode the distinct ids
come padded to a static length (`distinct_ids`): still one row, and one mask, per distinct
id, but drawn from more random numbers, so the masks differ from the default mode's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from . import _aot_op, _eager
from . import _validate as v

__all__ = [
    "ACTIVATIONS",
    "aot_bias_add",
    "aot_fc_bias",
    "aot_kron_bias",
    "fc_rows",
    "kron_rows",
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
    backend = backends.resolve_later(hidden.device)
    ids = input_ids.contiguous()
    if inplace:
        if torch.is_grad_enabled() and (hidden.requires_grad or table.requires_grad):
            raise RuntimeError(
                "aot_bias_add(inplace=True) is for inference; hidden or table requires grad "
                "(use torch.no_grad() or inplace=False)"
            )
        if not hidden.is_contiguous():
            raise ValueError("aot_bias_add(inplace=True) needs a contiguous hidden")
        _aot_op.aot_bias_add_inplace_call(hidden, ids, table, task_ids, backend, ids_checked)
        return hidden
    return _aot_op.aot_bias_add_call(
        hidden.contiguous(), ids, table, task_ids, backend, ids_checked
    )


class FusedAdds(NamedTuple):
    """The fused AoT hooks' inference adds for one batch: `hidden += tables[i][rows]` in
    place before layer i, with what every layer shares found once per forward
    (`fused_adds`) rather than once per layer. On a GPU a small batch's forward is bound by
    the host's time per call (bench/results/README.md, third H200 run).

    kernels: the loaded backend for rows' device; rows (B, s): contiguous checked ids into the
    flattened tables (offset by task for stacked ones); flats: each layer's (R, d) table,
    contiguous; shape: the (B, s, d) each hidden state must have.
    """

    kernels: backends.Backend
    rows: Tensor
    flats: list[Tensor]
    shape: torch.Size

    def add_(self, index: int, hidden: Tensor) -> bool:
        """Layer `index`'s rows added into `hidden` in place. Checks only what the batch's
        plan cannot know (the hidden state's type, dtype, shape, device, layout, grad and
        aliasing); False, having done nothing, for anything but the common case: the caller
        then runs `aot_bias_add`, whose checks name what is wrong."""
        flat = self.flats[index]
        if (
            type(hidden) is not Tensor
            or hidden.shape != self.shape
            or hidden.dtype not in v.FLOAT_DTYPES
            or hidden.device != self.rows.device
            or not hidden.is_contiguous()
            or (torch.is_grad_enabled() and hidden.requires_grad)
            or _eager.forced()
            or _aot_op.shares_memory(hidden, flat)
            or _aot_op.shares_memory(hidden, self.rows)
        ):
            return False
        self.kernels.gather_add(hidden, self.rows, flat, hidden)
        # The kernel wrote through hidden's pointer: bumped as the in-place op does.
        torch.autograd.graph.increment_version(hidden)
        return True


def fused_adds(
    input_ids: Tensor, task_ids: Tensor | None, tables: list[Tensor]
) -> FusedAdds | None:
    """`FusedAdds` for checked `input_ids` (B, s) (and `task_ids` (B,) for stacked tables)
    and each layer's (V, d) or (T, V, d) table; None unless the tables are all plain
    contiguous fp32, fp16 or bf16 tensors of one shape on the ids' device, without grad (the
    layers' own calls serve, or reject, the others)."""
    first = tables[0]
    for table in tables:
        if (
            type(table) is not Tensor
            or table.dtype not in v.FLOAT_DTYPES
            or table.device != input_ids.device
            or table.shape != first.shape
            or not table.is_contiguous()
            or table.requires_grad
        ):
            return None
    rows = _aot_op.table_rows(input_ids, first, task_ids, checked=True).contiguous()
    shape = torch.Size((*rows.shape, first.shape[-1]))
    flats = tables if first.dim() == 2 else [table.view(-1, first.shape[-1]) for table in tables]
    kernels = backends.load(backends.resolve(input_ids.device))
    return FusedAdds(kernels, rows, flats, shape)


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


# --------------------------------------------------------------------------- reparameterisations


def checked_ids(ids: Tensor, upper: int, name: str) -> Tensor:
    """`ids`, after checking that they lie in [0, upper) (sync-free: clamped into it).

    Eager: the check, and `ids` itself (sync-free: a clamped copy). While compiling, a
    custom op returning a copy: the check then runs at run time (tracing cannot read the
    ids), and it runs before every consumer of the returned ids, which a check with no
    output would not guarantee.
    """
    if torch.compiler.is_compiling():
        return torch.ops.dept_kernels.checked_ids(ids, upper, name)
    (ids,) = v.checked(v.Range(name, ids, upper))
    return ids


def distinct_ids(ids: Tensor, upper: int, name: str = "input_ids") -> tuple[Tensor, Tensor]:
    """`(used, inverse)`: the sorted distinct ids (U,) of `ids`, range-checked against
    [0, upper), and each element's index into them (same shape as `ids`, int64).

    Sync-free mode: `used` has the static length min(N, upper), the distinct ids first,
    then padding that no inverse points at (`_aot_op.padded_distinct`).

    A custom op, so that `torch.compile(fullgraph=True)` traces it with U as an unbacked size
    instead of breaking the graph on `torch.unique`'s data-dependent output.
    """
    return _distinct_ids(ids, upper, name, checked=False)


def _distinct_ids(ids: Tensor, upper: int, name: str, checked: bool) -> tuple[Tensor, Tensor]:
    """`distinct_ids`, skipping the range check where the library's caller has done it."""
    return _aot_op.distinct_ids_call(ids, upper, name, checked)


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
    distinct: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """`aot_kron_bias`; `ids_checked` as in `_aot_bias_add`; `distinct`: the ids' `(used,
    inverse)` when the library's caller found them once for several layers."""
    _check_hidden(hidden, input_ids)
    _check_dropout(dropout_p)
    _check_kron(w_l, w_m, w_r, hidden.device, "hidden")
    if w_r.shape[1] != hidden.shape[-1]:
        raise ValueError(f"w_r has width {w_r.shape[1]} but hidden has d={hidden.shape[-1]}")
    if distinct is None:
        upper = w_l.shape[0] * w_m.shape[0]
        distinct = _distinct_ids(input_ids, upper, "input_ids", ids_checked)
    used, inverse = distinct
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
    distinct: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """`aot_fc_bias`; `ids_checked` and `distinct` as in `_aot_kron_bias`."""
    _check_hidden(hidden, input_ids)
    _check_dropout(dropout_p)
    _check_fc(embedding, w1, b1, w2, b2, activation, hidden.device, "hidden", hidden.shape[-1])
    if distinct is None:
        distinct = _distinct_ids(input_ids, embedding.shape[0], "input_ids", ids_checked)
    used, inverse = distinct
    rows = _fc_rows(used, embedding, w1, b1, w2, b2, activation, dropout_p)
    # inverse < U by construction
    return _aot_bias_add(hidden, inverse, rows, None, inplace=False, ids_checked=True)
