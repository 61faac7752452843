"""AoT P-tuning (docs/design.md §1, AoT): a per-layer, per-token bias before each layer.

Before transformer layer i, `H_i += P_i[ids]` with a (V, d) table `P_i` that is trained
through a reparameterisation (Kronecker or FC) evaluated on the batch's distinct ids only,
and after training merged (`merged`) into a plain table, so that inference is a gather-add. Fused
adapters of several tasks `stack` into (T, V, d) tables picked per sample by `task_ids`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from .._engines import embedding_shape
from ..ops import _validate as v
from ..ops import fc_rows, kron_rows
from ..ops._sync_free import sync_free_enabled
from ..ops.aot import (
    ACTIVATIONS,
    _aot_bias_add,
    _aot_fc_bias,
    _aot_kron_bias,
    _distinct_ids,
    checked_ids,
)
from .base import (
    Adapter,
    MethodConfig,
    as_stacked,
    check_int,
    check_same_kind,
    check_task_ids,
    is_int,
    register_method,
)

if TYPE_CHECKING:
    from ..models import ModelSpec

REPARAMS = ("fc", "kron")


@dataclass(frozen=True)
class AoTConfig(MethodConfig):
    """AoT P-tuning.

    Args:
        reparam: "fc" (`P_x = f(E[x] W_1 + b_1) W_2 + b_2`) or "kron"
            (`P = (W_L ⊗ W_M) W_R`).
        r: rank of the reparameterisation (FC hidden width, or Kronecker factor width).
        a, b: Kronecker factor heights with a*b >= V; by default b = ceil(sqrt(V)) and
            a = ceil(V / b).
        activation: f of the FC form, one of ACTIVATIONS.
        dropout: on `P_x` (Kronecker) or on `E[x]` (FC), in training only.
    """

    reparam: str
    r: int
    a: int | None = None
    b: int | None = None
    activation: str = "relu"
    dropout: float = 0.1

    method: ClassVar[str] = "aot"

    def __post_init__(self) -> None:
        if self.reparam not in REPARAMS:
            raise ValueError(f"reparam must be one of {REPARAMS}, got {self.reparam!r}")
        check_int("r", self.r, 1)
        for name in ("a", "b"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        if (self.a is None) != (self.b is None):
            raise ValueError("give both Kronecker heights a and b, or neither")
        if self.a is not None and self.reparam != "kron":
            raise ValueError("a and b are Kronecker heights; reparam='fc' takes neither")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool):
            raise TypeError(f"dropout must be a number, got {type(self.dropout).__name__}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")

    def kron_heights(self, vocab: int) -> tuple[int, int]:
        """(a, b) with a*b >= vocab."""
        if self.a is not None:
            if self.a * self.b < vocab:
                raise ValueError(
                    f"Kronecker heights a={self.a}, b={self.b} cover a*b={self.a * self.b} ids, "
                    f"fewer than the vocabulary V={vocab}"
                )
            return self.a, self.b
        b = math.isqrt(vocab - 1) + 1
        return -(-vocab // b), b


class AoTLayer(nn.Module):
    """The bias of one layer: a reparameterisation, or a fused table.

    Kronecker: `w_l` (a, r), `w_m` (b, r), `w_r` (r², d). FC: `w1` (e, r), `b1` (r,),
    `w2` (r, d), `b2` (d,). Fused (`table` given, or after `set_table`): buffer `table`
    (V, d), or (T, V, d) stacked over tasks, and no parameters.
    """

    def __init__(
        self,
        config: AoTConfig,
        vocab: int,
        embed_dim: int,
        d: int,
        *,
        table: Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.vocab = vocab
        self.d = d
        self.register_buffer("table", None)
        if table is not None:
            self.set_table(table)
            return
        kw = {"dtype": dtype, "device": device}
        r = config.r
        if config.reparam == "kron":
            a, b = config.kron_heights(vocab)
            # W_L, W_M random with unit-variance Kronecker products; W_R zero, so training
            # starts from the unmodified model (the paper's init).
            self.w_l = nn.Parameter(_normal((a, r), r**-0.5, generator, **kw))
            self.w_m = nn.Parameter(_normal((b, r), r**-0.5, generator, **kw))
            self.w_r = nn.Parameter(torch.zeros(r * r, d, **kw))
        else:
            bound = embed_dim**-0.5  # nn.Linear's default range for W_1
            self.w1 = nn.Parameter(_uniform((embed_dim, r), bound, generator, **kw))
            self.b1 = nn.Parameter(torch.zeros(r, **kw))
            self.w2 = nn.Parameter(torch.zeros(r, d, **kw))
            self.b2 = nn.Parameter(torch.zeros(d, **kw))

    @property
    def fused(self) -> bool:
        return self.table is not None

    def _fp32(self) -> dict[str, Tensor]:
        # The rows are formed in fp32 whatever the parameters' dtype (docs/design.md §1: fp32
        # accumulation always); the casts are of the small factors, not of (B, s, d) data.
        return {name: p.float() for name, p in self._parameters.items()}

    def rows(self, ids: Tensor, embedding: Tensor | None = None) -> Tensor:
        """The fp32 rows P_x for the ids (U,) → (U, d), from the reparameterisation (no
        dropout)."""
        w = self._fp32()
        if self.config.reparam == "kron":
            return kron_rows(ids, w["w_l"], w["w_m"], w["w_r"])
        return fc_rows(
            ids,
            _frozen(embedding),
            w["w1"],
            w["b1"],
            w["w2"],
            w["b2"],
            activation=self.config.activation,
        )

    def forward(
        self,
        hidden: Tensor,
        input_ids: Tensor,
        embedding: Tensor | None = None,
        task_ids: Tensor | None = None,
        *,
        inplace: bool = False,
        _ids_checked: bool = False,
        _distinct: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """(B, s, d) hidden + P[ids]; `embedding` (V, e) is the FC form's input table E.

        `task_ids` (B,) pick each sample's table from stacked ones; `inplace` writes into
        `hidden` (fused tables, inference only). `_ids_checked` is the library's own: its
        model hooks have range-checked the ids (`AoTAdapter.check_batch`, once per forward),
        so the ops do not again; it goes through the module call (hooks such as FSDP's run).
        `_distinct` is the library's too: the ids' `(used, inverse)`, found once per forward
        for every layer (each `torch.unique` is a host sync on a GPU); unfused only.
        """
        if self.table is not None:
            if self.training:
                raise RuntimeError(
                    "a fused AoT adapter is for inference: its tables are fixed buffers. "
                    "Call model.eval(), or train the unfused adapter and merge afterwards"
                )
            return _fused_add(hidden, input_ids, self.table, task_ids, inplace, _ids_checked)
        if task_ids is not None:
            raise ValueError(
                "task_ids need stacked tables: fuse the adapters and build the model with "
                "dept_kernels.stack_adapters"
            )
        p = self.config.dropout if self.training else 0.0
        w = self._fp32()
        if self.config.reparam == "kron":
            w_l, w_m, w_r = w["w_l"], w["w_m"], w["w_r"]
            return _aot_kron_bias(hidden, input_ids, w_l, w_m, w_r, p, _ids_checked, _distinct)
        return _aot_fc_bias(
            hidden,
            input_ids,
            _frozen(embedding),
            w["w1"],
            w["b1"],
            w["w2"],
            w["b2"],
            self.config.activation,
            p,
            _ids_checked,
            _distinct,
        )

    @torch.no_grad()
    def materialise(self, embedding: Tensor | None = None, chunk: int = 8192) -> Tensor:
        """The full (V, d) table in fp32, formed `chunk` rows at a time."""
        if self.fused:
            raise ValueError("the layer is already fused")
        ids = torch.arange(self.vocab, device=next(self.parameters()).device)
        return torch.cat([self.rows(part, embedding) for part in ids.split(chunk)])

    def set_table(self, table: Tensor) -> None:
        """Replace the reparameterisation by a fixed (V, d) or (T, V, d) table."""
        v.check_float("table", table, ndim=table.dim() if table.dim() in (2, 3) else 2)
        if tuple(table.shape[-2:]) != (self.vocab, self.d):
            raise ValueError(
                f"table has shape {tuple(table.shape)}; the layer needs (V, d) = "
                f"({self.vocab}, {self.d}) or (T, {self.vocab}, {self.d})"
            )
        for name in list(self._parameters):
            delattr(self, name)
        self.table = table


def _frozen(embedding: Tensor | None) -> Tensor:
    if embedding is None:
        raise ValueError("the FC reparameterisation needs the model's input embedding table E")
    # E is the base model's table: the adapter reads it and never trains it.
    return embedding.detach()


def _fused_add(
    hidden: Tensor,
    input_ids: Tensor,
    table: Tensor,
    task_ids: Tensor | None,
    inplace: bool,
    ids_checked: bool,
) -> Tensor:
    if table.device == hidden.device:
        return _aot_bias_add(hidden, input_ids, table, task_ids, inplace, ids_checked)
    rows, inverse = _fetch_rows(table, input_ids, task_ids, hidden.device, ids_checked)
    # inverse indexes rows by construction.
    return _aot_bias_add(hidden, inverse, rows, None, inplace, ids_checked=True)


def fetch_rows(
    table: Tensor, input_ids: Tensor, task_ids: Tensor | None, device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """The rows a batch reads from a table held on another device (host RAM for a GPU model).

    Only the batch's distinct (task, id) rows cross, through a pinned staging buffer when the
    target is a CUDA device, so the copy is asynchronous.

    Args:
        table: (V, d) or (T, V, d); input_ids: (B, s); task_ids: (B,) with stacked tables.

    Returns:
        `(rows, inverse)`: (U, d) rows on `device`, and (B, s) indices into them, so that
        `aot_bias_add(hidden, inverse, rows)` adds `table[ids]` (or `table[task_ids, ids]`).
    """
    return _fetch_rows(table, input_ids, task_ids, device, ids_checked=False)


def _fetch_rows(
    table: Tensor,
    input_ids: Tensor,
    task_ids: Tensor | None,
    device: torch.device | str,
    ids_checked: bool,
) -> tuple[Tensor, Tensor]:
    """`fetch_rows`; `ids_checked`: the library's caller has range-checked the ids and task
    ids."""
    device = torch.device(device)
    if sync_free_enabled() and table.device != input_ids.device:
        raise RuntimeError(
            f"a table on {table.device} read for ids on {input_ids.device}: its rows are "
            "fetched by ids copied across devices, a host sync that sync-free mode forbids; "
            "move the table to the model's device or leave sync-free mode"
        )
    vocab = table.shape[-2]
    v.check_ids("input_ids", input_ids, ndim=2)
    flat = table.reshape(-1, table.shape[-1])
    keys, checked = input_ids, ids_checked
    if table.dim() == 3:
        if task_ids is None:
            raise ValueError("stacked tables (T, V, d) need task_ids (B,)")
        if not ids_checked:
            tasks = v.Range("task_ids", task_ids, table.shape[0])
            task_ids, input_ids = v.checked(tasks, v.Range("input_ids", input_ids, vocab))
        # Both checked, so the keys lie in [0, T*V): no third read of the ids.
        keys, checked = input_ids.long() + task_ids.long()[:, None] * vocab, True
    elif task_ids is not None:
        raise ValueError("task_ids needs stacked tables of shape (T, V, d)")
    used, inverse = _distinct_ids(keys, flat.shape[0], "input_ids", checked)
    pinned = device.type == "cuda" and flat.device.type == "cpu"
    staging = torch.empty(
        (used.shape[0], flat.shape[1]), dtype=flat.dtype, device=flat.device, pin_memory=pinned
    )
    torch.index_select(flat, 0, used.to(flat.device), out=staging)
    return staging.to(device, non_blocking=pinned), inverse


def _normal(shape, std, generator, dtype, device) -> Tensor:
    return (torch.randn(shape, generator=generator) * std).to(dtype=dtype, device=device)


def _uniform(shape, bound, generator, dtype, device) -> Tensor:
    out = torch.empty(shape).uniform_(-bound, bound, generator=generator)
    return out.to(dtype=dtype, device=device)


class AoTAdapter(Adapter):
    """One `AoTLayer` per transformer layer, in `layers`."""

    site: ClassVar[str] = "layer_input"
    # No soft prompt: every parameter is in the reparameterisation group. The AoT paper's
    # learning rates were searched per task, so none is a default here.
    groups: ClassVar[dict[str, float | None]] = {"lowrank": None}

    def __init__(self, config: AoTConfig, layers: Iterable[AoTLayer]) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(layers)

    @classmethod
    def create(
        cls, config: AoTConfig, spec: ModelSpec, generator: torch.Generator | None = None
    ) -> AoTAdapter:
        """A fresh adapter for the model `spec` describes: one layer per `spec.layers`.

        Parameters take the input embedding's dtype and device, like the prompt methods.
        """
        embedding = spec.embedding.weight
        vocab, embed_dim = embedding_shape(embedding)  # an engine's shard has its own shape
        kw = {"dtype": embedding.dtype, "device": embedding.device, "generator": generator}
        d = spec.hidden_size
        return cls(
            config, (AoTLayer(config, vocab, embed_dim, d, **kw) for _ in range(len(spec.layers)))
        )

    @classmethod
    def from_tables(cls, config: AoTConfig, tables: Sequence[Tensor]) -> AoTAdapter:
        """A fused adapter over the given per-layer (V, d) or (T, V, d) tables."""
        return cls(
            config,
            (AoTLayer(config, t.shape[-2], t.shape[-1], t.shape[-1], table=t) for t in tables),
        )

    @classmethod
    def stack(cls, adapters: Sequence[AoTAdapter]) -> AoTAdapter:
        """One fused adapter serving the tasks of `adapters` in order: (T, V, d) tables.

        A stacked source contributes all its tasks. Tables take the first adapter's dtype
        and device.
        """
        check_same_kind(cls, adapters)
        first = adapters[0]
        for i, other in enumerate(adapters):
            if not other.fused:
                raise ValueError(
                    f"adapter {i} is not fused; stack fused adapters (dept_kernels.merge(model))"
                )
            if other.config.reparam != first.config.reparam:
                raise ValueError(
                    f"adapter {i} uses reparam={other.config.reparam!r}, adapter 0 uses "
                    f"{first.config.reparam!r}; stacked adapters share one reparameterisation"
                )
            if len(other.layers) != len(first.layers):
                raise ValueError(
                    f"adapter {i} has {len(other.layers)} layers, adapter 0 has "
                    f"{len(first.layers)}: they were not trained on the same base model"
                )
            shape, want = other.layers[0].table.shape[-2:], first.layers[0].table.shape[-2:]
            if shape != want:
                raise ValueError(
                    f"adapter {i} has (V, d) = {tuple(shape)}, adapter 0 has {tuple(want)}: "
                    "they were not trained on the same base model"
                )
        ref = first.layers[0].table
        tables = [
            torch.cat([as_stacked(a.layers[i].table).to(ref.device, ref.dtype) for a in adapters])
            for i in range(len(first.layers))
        ]
        return cls.from_tables(first.config, tables)

    @property
    def vocab(self) -> int:
        return self.layers[0].vocab

    @property
    def fused(self) -> bool:
        return self.layers[0].fused

    @property
    def num_tasks(self) -> int | None:
        """T for stacked tables (T, V, d); None for a single-task adapter."""
        table = self.layers[0].table
        return table.shape[0] if table is not None and table.dim() == 3 else None

    def check_batch(
        self,
        input_ids: Tensor,
        task_ids: Tensor | None,
        device: torch.device | None = None,
        *,
        defer_ids: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Ids in [0, V) and, for a stacked adapter, one task id in [0, T) per sample, on
        `device` (the model's, when given: fused tables may live elsewhere). The ranges are
        read once, together. `defer_ids`: the caller range-checks `input_ids` itself, in
        the read that finds their distinct ids (`checked_distinct`); eager only.

        Returns `(input_ids, task_ids)` to use from here on: while compiling, checked copies
        whose consumers run after the check (`checked_ids`); eager, the arguments (sync-free
        mode: clamped copies).
        """
        v.check_ids("input_ids", input_ids, ndim=2)
        if device is not None:
            v.check_device("input_ids", input_ids, device, like="the model")
        tasks = self.num_tasks
        check_task_ids(tasks, task_ids)
        if tasks is not None:
            v.check_ids("task_ids", task_ids, ndim=1)
            if device is not None:
                v.check_device("task_ids", task_ids, device, like="the model")
            if task_ids.shape[0] != input_ids.shape[0]:
                raise ValueError(
                    f"task_ids has {task_ids.shape[0]} entries but the batch has "
                    f"{input_ids.shape[0]}"
                )
        if torch.compiler.is_compiling():
            input_ids = checked_ids(input_ids, self.vocab, "input_ids")
            if tasks is not None:
                task_ids = checked_ids(task_ids, tasks, "task_ids")
            return input_ids, task_ids
        ranges = [] if defer_ids else [v.Range("input_ids", input_ids, self.vocab)]
        if tasks is not None:
            ranges.append(v.Range("task_ids", task_ids, tasks))
        checked = iter(v.checked(*ranges))
        if not defer_ids:
            input_ids = next(checked)
        return input_ids, next(checked, task_ids)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        if self.fused:
            raise RuntimeError(
                "a fused AoT adapter has no trainable parameters (its tables are fixed); "
                "train the unfused adapter, then merge"
            )
        return {"lowrank": [p for p in self.parameters() if p.requires_grad]}

    def check_fits(self, spec: ModelSpec) -> None:
        got = (len(self.layers), self.layers[0].d)
        if got != (len(spec.layers), spec.hidden_size):
            raise ValueError(
                f"the AoTAdapter has {got[0]} layers of width {got[1]}; the model has "
                f"{len(spec.layers)} layers of width {spec.hidden_size}"
            )

    @torch.no_grad()
    def merged(
        self,
        embedding: Tensor,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> AoTAdapter:
        """The fused adapter: each layer's (V, d) table materialised once, the
        reparameterisation dropped. A fused adapter is its own merged form.

        `dtype` and `device` default to the parameters'. `device="cpu"` for a model on the
        GPU keeps the tables in host memory: each batch then moves only the rows it needs.
        `embedding` is the model's input table (read by the FC form).
        """
        if self.fused:
            return self
        self.check_whole(embedding)
        tables = []
        for layer in self.layers:
            ref = next(layer.parameters())
            table = layer.materialise(embedding)
            tables.append(table.to(dtype=dtype or ref.dtype, device=device or ref.device))
        return type(self).from_tables(self.config, tables)

    def state_fields(self) -> dict[str, Any]:
        # The Kronecker and FC shapes need not show V, and a fused adapter saves tables
        # instead of its reparameterisation.
        return {**super().state_fields(), "fused": self.fused, "vocab_size": self.vocab}

    @classmethod
    def read_fields(cls, fields: dict[str, Any]) -> dict[str, Any]:
        read = super().read_fields(fields)
        fused = fields.pop("fused", False)
        # A string such as "false" would read as true: only JSON booleans are taken.
        if not isinstance(fused, bool):
            raise ValueError(f"fused must be true or false, got {fused!r}")
        # Files written before vocab_size was recorded skip its check.
        vocab = fields.pop("vocab_size", None)
        if vocab is not None and not is_int(vocab, 1):
            raise ValueError(f"vocab_size must be an int >= 1, got {vocab!r}")
        return {**read, "fused": fused, "vocab_size": vocab}

    @classmethod
    def skeleton(cls, config: AoTConfig, spec: ModelSpec, fields: dict[str, Any]) -> AoTAdapter:
        adapter = cls.create(config, spec)
        vocab, tasks = fields["vocab_size"], fields["num_tasks"]
        if vocab is not None and vocab != adapter.vocab:
            raise ValueError(
                f"the AoT adapter was saved for a vocabulary of V={vocab}, the model's has "
                f"V={adapter.vocab}: they were not trained on the same base model"
            )
        if not fields["fused"]:
            if tasks is not None:
                raise ValueError(f"num_tasks={tasks}: stacked AoT adapters are fused")
            return adapter
        # The tables' shapes on the meta device: the loader puts the file's tables in their
        # place rather than allocating them twice.
        lead = () if tasks is None else (tasks,)
        shape = (*lead, adapter.vocab, spec.hidden_size)
        return cls.from_tables(config, [torch.empty(shape, device="meta") for _ in adapter.layers])


register_method(AoTConfig, AoTAdapter)
