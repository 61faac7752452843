"""AoT P-tuning's hooks, shared by every architecture: a bias before each layer.

The architecture module names two sites (`aot_sites`): the module that receives
`input_ids` (the base model, or T5's encoder stack) and its layers. A pre-hook on the first
records the batch's ids, the FC form's embedding table E and the task ids; a pre-hook on
layer i adds `P_i[ids]` to the layer's input hidden state. With the KV cache each step's
forward carries only its new ids, so the bias follows the step.

`task_ids` is popped from the top-level call (or from the encoder call that `generate()`
makes) before HF sees it. HF's `generate` rejects arguments its forward does not name, so
the patched model's `generate` (`wrap_generate`) takes `task_ids` itself and hands them to
the hooks for the whole generation, repeated per beam or returned sequence as generate
repeats the batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from contextvars import ContextVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._hooks import bind

# task_ids (B,) of the `generate` call running in this context, if any.
_GENERATION_TASKS: ContextVar[Tensor | None] = ContextVar("aot_generation_tasks", default=None)


def wrap_generate(generate: Callable) -> Callable:
    """`generate(..., task_ids=None, ...)` around a model's bound `generate`."""

    @functools.wraps(generate)
    def wrapper(*args, task_ids: Tensor | None = None, **kwargs):
        token = _GENERATION_TASKS.set(task_ids)
        try:
            return generate(*args, **kwargs)
        finally:
            _GENERATION_TASKS.reset(token)

    return wrapper


def _generation_tasks(batch_size: int) -> Tensor | None:
    """The running generate's task ids for a batch of `batch_size` rows (beams included)."""
    task_ids = _GENERATION_TASKS.get()
    if task_ids is None or task_ids.ndim != 1 or task_ids.shape[0] in (0, batch_size):
        return task_ids
    if batch_size % task_ids.shape[0]:
        raise ValueError(
            f"generate got task_ids for {task_ids.shape[0]} samples but runs {batch_size} rows"
        )
    # generate repeats each sample's row for its beams / sequences (repeat_interleave).
    return task_ids.repeat_interleave(batch_size // task_ids.shape[0])


class _Batch:
    """What the layer hooks need from the forward that is running."""

    def __init__(self) -> None:
        self.ids: Tensor | None = None
        self.embedding: Tensor | None = None
        self.task_ids: Tensor | None = None
        self.outer_task_ids: Tensor | None = None
        self.inplace = False


def install(
    model: nn.Module,
    adapter_of: Callable[[], nn.Module],
    inner: nn.Module,
    layers: Sequence[nn.Module],
) -> list[RemovableHandle]:
    """Hook `inner` (the module taking input_ids), each of its `layers`, and `model`."""
    batch = _Batch()

    def outer_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        batch.outer_task_ids = kwargs.pop("task_ids", None)
        return args, kwargs

    def outer_hook(module: nn.Module, args: tuple, output):
        batch.outer_task_ids = None

    def inner_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kw = bind(module, args, kwargs)
        task_ids = kw.pop("task_ids", None)
        ids = kw.get("input_ids")
        if ids is None:
            raise ValueError(
                f"the AoT-patched {type(module).__name__} needs input_ids: the bias before each "
                "layer is P_i[input_ids], which inputs_embeds cannot carry"
            )
        # Multiple-choice heads pass (B, C, s); the layers see (B*C, s).
        ids = ids.reshape(-1, ids.shape[-1])
        if task_ids is None:
            task_ids = batch.outer_task_ids
        if task_ids is None:
            task_ids = _generation_tasks(ids.shape[0])
        adapter_of().check_batch(ids, task_ids)
        batch.ids, batch.task_ids = ids, task_ids
        batch.embedding = module.get_input_embeddings().weight
        # In place is safe without autograd unless hidden states are being recorded: each
        # layer's input is then otherwise a fresh tensor that only the layer reads.
        config = module.config
        records = kw.get("output_hidden_states") or getattr(config, "output_hidden_states", False)
        batch.inplace = not torch.is_grad_enabled() and not records
        return (), kw

    def inner_hook(module: nn.Module, args: tuple, output):
        batch.ids = batch.embedding = batch.task_ids = None

    def layer_pre_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if batch.ids is None:
                raise RuntimeError(
                    f"AoT layer {index} ran outside a forward of the patched "
                    f"{type(inner).__name__} (no input_ids recorded); calling layers directly "
                    "and gradient checkpointing's recomputation are not supported"
                )
            hidden = args[0] if args else kwargs["hidden_states"]
            inplace = batch.inplace and hidden.is_contiguous()
            out = adapter_of().layers[index](
                hidden, batch.ids, batch.embedding, batch.task_ids, inplace=inplace
            )
            if args:
                return (out, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": out}

        return hook

    handles = [
        inner.register_forward_pre_hook(inner_pre_hook, with_kwargs=True),
        inner.register_forward_hook(inner_hook, always_call=True),
    ]
    handles += [
        layer.register_forward_pre_hook(layer_pre_hook(i), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    if model is not inner:
        handles += [
            model.register_forward_pre_hook(outer_pre_hook, with_kwargs=True),
            model.register_forward_hook(outer_hook, always_call=True),
        ]
    return handles
