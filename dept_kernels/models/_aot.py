"""AoT P-tuning's hooks, shared by every architecture: a bias before each layer.

The architecture's entry locates two sites (`Architecture.locate`): the module that receives
`input_ids` (the base model, or T5's encoder stack) and its layers. A pre-hook on the first
records the batch's ids and the task ids; a pre-hook on layer i adds `P_i[ids]` to the
layer's input hidden state. With the KV cache each step's forward carries only its new ids,
so the bias follows the step.

The FC form reads rows of the input embedding table E. It reads them inside the call of the
embedding module (a forward hook on it, when the model embeds its ids), where engines that
shard parameters (FSDP, DeepSpeed ZeRO-3) have gathered E, and only the batch's distinct
rows E[used]: the layers then take the rows and the ids' indices into them, which give each
layer the same `P_i[ids]` as E and the ids would.

The batch's distinct ids and each id's index into them (`torch.unique`, a host sync on a GPU)
are found once per forward, with the rows or in the pre-hook, and every unfused layer reuses
them (`_Inputs.distinct`); the ops find them themselves when called directly.

A fused inference forward (no autograd, no hidden states recorded) finds what its layers
share once, in the pre-hook (`ops.aot.FusedAdds`: the backend, the checked rows, the tables'
views), and each layer hook adds its bias with the backend's kernel directly and counts the
layer (`_planned`); anything else (or anything that plan declines) takes the layer's own
call. On a GPU a small batch's forward is bound by the host's time per call, and the layer's
call costs several times the kernel there (bench/results/README.md, third H200 run).

`task_ids` is popped from the top-level call (or from the encoder call that `generate()`
makes) before HF sees it, or comes from the patched model's `generate` for the whole
generation (`TaskIds`).

Activation checkpointing that wraps a layer's `__call__` (transformers < 5, torch's
`checkpoint_wrapper`) re-runs the layer's pre-hook in backward, after the forward that
recorded the ids has ended. So in training each layer hook also files what it used under
its input tensor (`_Records`); the recomputation, which receives that same tensor (the
non-reentrant checkpoint) or a detached alias of it (the reentrant one), finds the entry by
storage address and layout. An entry lives as long as the input's memory, which
checkpointing keeps alive until its backward. A recomputation whose input matches no entry,
or more than one, raises: it never borrows another batch's ids.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..ops._sync_free import sync_free_enabled
from ..ops.aot import _distinct_ids, fused_adds
from ._hooks import AdapterOf, TaskIds, bind
from ._per_thread import HookState, PerThread


def install(
    model: nn.Module,
    adapter_of: AdapterOf,
    inner: nn.Module,
    layers: Sequence[nn.Module],
    reread: Sequence[int] = (),
) -> list[RemovableHandle]:
    """Hook `model`, `inner` (the module taking input_ids) and each of its `layers`; the
    layers at indices `reread` have inputs the model reads again after them (never added to
    in place)."""
    hooks = _AoTHooks(adapter_of, type(inner).__name__, len(layers), reread)
    handles = hooks.tasks.install(model)
    handles += [
        inner.register_forward_pre_hook(hooks.inner_pre_hook, with_kwargs=True),
        inner.register_forward_hook(hooks.inner_hook, always_call=True),
        # First: it must run before an engine's post-forward hook frees the gathered weight.
        inner.get_input_embeddings().register_forward_hook(hooks.embedding_hook, prepend=True),
    ]
    # partial of a bound method: a deep copy of the model copies it with the hook object.
    handles += [
        layer.register_forward_pre_hook(
            functools.partial(hooks.layer_pre_hook, i), with_kwargs=True
        )
        for i, layer in enumerate(layers)
    ]
    return handles


class _Inputs(NamedTuple):
    """What a layer hook passes to its layer besides the hidden state: the ids and task ids;
    for the FC form, the distinct rows E[used] (U, e) as `embedding` and each id's index
    into them as `ids`. `distinct` (unfused only): `ids`' `(used, inverse)`, found once per
    forward for every layer, since each `torch.unique` is a host sync on a GPU."""

    ids: Tensor
    embedding: Tensor | None
    task_ids: Tensor | None
    distinct: tuple[Tensor, Tensor] | None = None


class _Records:
    """The inputs each layer hook used in training, filed under the layer's input tensor.

    Keyed by (layer, device, address, shape, strides, dtype); each entry holds a weak
    reference to the tensor's storage whose callback removes the entry when the storage is
    freed, so no entry outlives a forward whose graph is gone. While the storage lives no
    other tensor can take its memory, so a match is that tensor or an alias of it.
    """

    def __init__(self) -> None:
        self.entries: dict[tuple, list[tuple[weakref.ref, _Inputs]]] = {}

    @staticmethod
    def key(index: int, hidden: Tensor) -> tuple:
        return (
            index,
            hidden.device,
            hidden.data_ptr(),
            tuple(hidden.shape),
            hidden.stride(),
            hidden.dtype,
        )

    def add(self, index: int, hidden: Tensor, inputs: _Inputs) -> None:
        key = self.key(index, hidden)
        # The memory, not the tensor object, is what must stay: a recomputation may receive a
        # detached alias after the object itself died (nested checkpoints detach what they
        # save). The callback holds the dict, not the hook object.
        storage = hidden.untyped_storage()
        ref = weakref.ref(storage, functools.partial(_forget, self.entries, key))
        self.entries.setdefault(key, []).append((ref, inputs))

    def find(self, index: int, hidden: Tensor) -> list[_Inputs]:
        """The inputs of every live entry filed under `hidden`'s storage and layout."""
        return [
            inputs
            for ref, inputs in self.entries.get(self.key(index, hidden), ())
            if ref() is not None
        ]

    def __len__(self) -> int:
        return sum(len(entries) for entries in self.entries.values())


def _forget(entries: dict, key: tuple, ref: weakref.ref) -> None:
    kept = [entry for entry in entries.get(key, ()) if entry[0] is not ref]
    if kept:
        entries[key] = kept
    else:
        entries.pop(key, None)


class _AoTHooks(HookState):
    """The hooks, and what the layer hooks need from the forward that is running."""

    # The running forward's, each thread's own (`_per_thread`): the checked ids and task
    # ids, the layers' inputs (for the FC form, set once E's rows are read), the distinct
    # ids, for the FC form the embedding module, whether the layers may add in place, and
    # a fused forward's plan. Eager bookkeeping (skipped while torch.compile traces the
    # hooks): the autograd graph task the forward started in (-1 outside a backward) and
    # how many layer hooks it has run.
    ids = PerThread()
    task_ids = PerThread()
    inputs = PerThread()
    distinct = PerThread()
    embedding = PerThread()
    inplace = PerThread(lambda: False)
    plan = PerThread()
    graph_task = PerThread(lambda: -1)
    layers_run = PerThread(lambda: 0)

    def __init__(
        self, adapter_of: AdapterOf, inner_name: str, num_layers: int, reread: Sequence[int]
    ) -> None:
        self.adapter_of = adapter_of
        self.inner_name = inner_name
        self.num_layers = num_layers
        self.reread = frozenset(reread)
        self.tasks = TaskIds()
        self.records = _Records()

    def __getstate__(self) -> dict:
        # A deep copy or pickle of the model starts without records: they are keyed by the
        # addresses of this model's live tensors. The training forwards' records are shared
        # by the threads: a checkpointed layer may be recomputed in autograd's thread.
        return {**super().__getstate__(), "records": _Records()}

    def inner_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kw = bind(module, args, kwargs)
        own_tasks = kw.pop("task_ids", None)
        ids = kw.get("input_ids")
        if ids is None:
            raise ValueError(
                f"the AoT-patched {type(module).__name__} needs input_ids: the bias before each "
                "layer is P_i[input_ids], which inputs_embeds cannot carry"
            )
        if ids.shape[0] == 0:
            raise ValueError(f"input_ids is an empty batch (B=0, shape {tuple(ids.shape)})")
        # Multiple-choice heads pass (B, C, s); the layers see (B*C, s).
        ids = ids.reshape(-1, ids.shape[-1])
        task_ids = self.tasks.resolve(own_tasks, ids.shape[0])
        embedding = module.get_input_embeddings()
        adapter = self.adapter_of()
        # Unfused, the ids' distinct values are found once here for every layer; in the
        # default mode, eager, with the range check in the same host read (one per forward).
        # (Compiling first: Dynamo cannot trace the mode's ContextVar.)
        one_read = not (adapter.fused or torch.compiler.is_compiling() or sync_free_enabled())
        # The checked ids: while compiling, copies that the range check runs before.
        self.ids, self.task_ids = adapter.check_batch(
            ids, task_ids, device=embedding.weight.device, defer_ids=one_read
        )
        self.distinct = None
        if not adapter.fused:
            # Before the model's embedding runs: it reads the ids too.
            self.distinct = _distinct_ids(self.ids, adapter.vocab, "input_ids", not one_read)
        # The model's own embedding reads the checked ids too: sync-free mode clamps them.
        kw["input_ids"] = self.ids.reshape(kw["input_ids"].shape)
        if adapter.config.reparam == "fc" and not adapter.fused:
            self.embedding, self.inputs = embedding, None  # E's rows: `embedding_hook`
        else:
            self.embedding = None
            self.inputs = _Inputs(self.ids, None, self.task_ids, self.distinct)
        # In place is safe without autograd unless hidden states are being recorded: each
        # layer's input is then otherwise a fresh tensor that only the layer reads (but for
        # the architecture's `reread` layers).
        config = module.config
        records = kw.get("output_hidden_states") or getattr(config, "output_hidden_states", False)
        self.inplace = not torch.is_grad_enabled() and not records
        self.plan = None
        if not torch.compiler.is_compiling():
            self.graph_task = torch._C._current_graph_task_id()
            self.layers_run = 0
            # Outside a backward only (`_planned`), and a layer in training mode takes its
            # own call, which refuses fixed tables.
            layers = list(adapter.layers) if adapter.fused and self.inplace else []
            if layers and self.graph_task == -1 and not any(layer.training for layer in layers):
                tables = [layer.table for layer in layers]
                self.plan = fused_adds(self.ids, self.task_ids, tables)
        return (), kw

    def inner_hook(self, module: nn.Module, args: tuple, output) -> None:
        skipped = not torch.compiler.is_compiling() and self.layers_run != self.num_layers
        self.ids = self.task_ids = self.inputs = self.embedding = self.distinct = None
        self.plan = None
        # `output` is None when the forward raised: that error is the one to report.
        if skipped and output is not None:
            raise RuntimeError(
                f"the patched {self.inner_name} ran {self.layers_run} of its "
                f"{self.num_layers} AoT layer hooks: a layer was called through `.forward`, "
                "which bypasses hooks (transformers < 4.52 does so for T5 blocks under "
                "gradient checkpointing), so its AoT bias was not added"
            )

    def embedding_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        """Inside the embedding's call (its weight gathered), the FC form's rows of E."""
        if self.embedding is None or self.inputs is not None or self.ids is None:
            return
        used, inverse = self.distinct
        # E is the base model's table: the adapter reads it and never trains it.
        rows = torch.nn.functional.embedding(used, module.weight.detach())
        # The layers index `rows` by `inverse`, whose distinct values are all of 0..U-1.
        indices = torch.arange(rows.shape[0], device=inverse.device)
        self.inputs = _Inputs(inverse, rows, self.task_ids, (indices, inverse))

    def _running(self) -> _Inputs:
        """The running forward's layer inputs. A model that did not call its embedding
        module on the ids has E's rows read by calling it here."""
        if self.inputs is None:
            self.embedding(self.ids)  # `embedding_hook` sets the inputs
            if self.inputs is None:
                raise RuntimeError(
                    f"the AoT hook on {type(self.embedding).__name__} did not run: its call was "
                    "replaced or its hooks removed, so the FC form has no embedding rows"
                )
        return self.inputs

    def layer_pre_hook(
        self, index: int, module: nn.Module, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs["hidden_states"]
        if self._planned(index, module, hidden):
            return args, kwargs
        if torch.compiler.is_compiling():
            # A traced forward runs its layers inside the inner call (a checkpointed region
            # is recomputed from the graph, not by re-running this hook).
            if self.ids is None:
                raise self._outside(index)
            inputs = self._running()
            inplace = self.inplace
        else:
            inputs = self._eager_inputs(index, module, hidden)
            inplace = self.inplace and inputs is self.inputs
        inplace = inplace and hidden.is_contiguous() and index not in self.reread
        # The ids were range-checked once for the whole forward (`check_batch`).
        out = self.adapter_of().layers[index](
            hidden,
            inputs.ids,
            inputs.embedding,
            inputs.task_ids,
            inplace=inplace,
            _ids_checked=True,
            _distinct=inputs.distinct,
        )
        if args:
            return (out, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": out}

    def _planned(self, index: int, module: nn.Module, hidden: Tensor) -> bool:
        """Whether layer `index`'s rows were added into `hidden` by the forward's plan: an
        eager no-grad forward of fused tables outside a backward, the layer in eval mode and
        not one that re-reads its input. What `_eager_inputs` would find for such a layer is
        the running forward's inputs with no record to keep, so only its count is kept here:
        at model sizes where kernels take microseconds, the host's time per layer is what
        the forward pays (bench/results/README.md, the third H200 run)."""
        plan = self.plan  # None outside a forward, or in another thread's
        if (
            plan is None
            or torch.compiler.is_compiling()  # a layer compiled alone: its own call
            or module.training
            or index in self.reread
            or torch._C._current_graph_task_id() != -1
            or not plan.add_(index, hidden)
        ):
            return False
        self.layers_run += 1
        return True

    def _eager_inputs(self, index: int, module: nn.Module, hidden: Tensor) -> _Inputs:
        """The running forward's inputs, or those recorded for a recomputed layer input."""
        graph_task = torch._C._current_graph_task_id()
        running = self.ids is not None and self.graph_task == graph_task
        current = [self._running()] if running else []
        if graph_task != -1:
            # Inside a backward: a checkpoint recomputing this layer, or a forward that runs
            # within the backward (a checkpoint around the whole model). Every forward that
            # may own this input is a candidate; more than one cannot be told apart.
            candidates = self.records.find(index, hidden) + current
            if len(candidates) > 1:
                raise RuntimeError(
                    f"AoT layer {index} of the patched {self.inner_name} runs in backward on "
                    f"an input that {len(candidates)} live forwards passed to it; which "
                    "forward's input_ids apply cannot be told. Give each forward its own "
                    "hidden-state tensor"
                )
            if candidates and not running:
                return candidates[0]
        if not running:
            raise self._outside(index, recomputed=graph_task != -1)
        self.layers_run += 1
        if module.training:
            self.records.add(index, hidden, current[0])
        return current[0]

    def _outside(self, index: int, recomputed: bool = False) -> RuntimeError:
        if recomputed:
            return RuntimeError(
                f"AoT layer {index} of the patched {self.inner_name} ran in backward (an "
                "activation-checkpoint recomputation) on an input that no training forward "
                "of this model recorded (the checkpoint's saved input was copied, e.g. by "
                "torch.autograd.graph.save_on_cpu, or the layer ran in eval mode), so which "
                "input_ids apply cannot be told"
            )
        return RuntimeError(
            f"AoT layer {index} ran outside a forward of the patched {self.inner_name} "
            "(no input_ids recorded); call the model, not its layers"
        )
