"""AoT P-tuning's hooks, shared by every architecture: a bias before each layer.

The architecture module names two sites (`aot_sites`): the module that receives
`input_ids` (the base model, or T5's encoder stack) and its layers. A pre-hook on the first
records the batch's ids, the FC form's embedding table E and the task ids; a pre-hook on
layer i adds `P_i[ids]` to the layer's input hidden state. With the KV cache each step's
forward carries only its new ids, so the bias follows the step.

`task_ids` is popped from the top-level call (or from the encoder call that `generate()`
makes) before HF sees it, or comes from the patched model's `generate` for the whole
generation (`TaskIds`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._hooks import AdapterOf, TaskIds, bind


def install(
    model: nn.Module, adapter_of: AdapterOf, inner: nn.Module, layers: Sequence[nn.Module]
) -> list[RemovableHandle]:
    """Hook `model`, `inner` (the module taking input_ids) and each of its `layers`."""
    hooks = _AoTHooks(adapter_of, type(inner).__name__)
    handles = hooks.tasks.install(model)
    handles += [
        inner.register_forward_pre_hook(hooks.inner_pre_hook, with_kwargs=True),
        inner.register_forward_hook(hooks.inner_hook, always_call=True),
    ]
    # partial of a bound method: a deep copy of the model copies it with the hook object.
    handles += [
        layer.register_forward_pre_hook(
            functools.partial(hooks.layer_pre_hook, i), with_kwargs=True
        )
        for i, layer in enumerate(layers)
    ]
    return handles


class _AoTHooks:
    """The hooks, and what the layer hooks need from the forward that is running."""

    def __init__(self, adapter_of: AdapterOf, inner_name: str) -> None:
        self.adapter_of = adapter_of
        self.inner_name = inner_name
        self.tasks = TaskIds()
        self.ids: Tensor | None = None
        self.embedding: Tensor | None = None
        self.task_ids: Tensor | None = None
        self.inplace = False

    def inner_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kw = bind(module, args, kwargs)
        own_tasks = kw.pop("task_ids", None)
        ids = kw.get("input_ids")
        if ids is None:
            raise ValueError(
                f"the AoT-patched {type(module).__name__} needs input_ids: the bias before each "
                "layer is P_i[input_ids], which inputs_embeds cannot carry"
            )
        # Multiple-choice heads pass (B, C, s); the layers see (B*C, s).
        ids = ids.reshape(-1, ids.shape[-1])
        task_ids = self.tasks.resolve(own_tasks, ids.shape[0])
        self.adapter_of().check_batch(ids, task_ids)
        self.ids, self.task_ids = ids, task_ids
        self.embedding = module.get_input_embeddings().weight
        # In place is safe without autograd unless hidden states are being recorded: each
        # layer's input is then otherwise a fresh tensor that only the layer reads.
        config = module.config
        records = kw.get("output_hidden_states") or getattr(config, "output_hidden_states", False)
        self.inplace = not torch.is_grad_enabled() and not records
        return (), kw

    def inner_hook(self, module: nn.Module, args: tuple, output) -> None:
        self.ids = self.embedding = self.task_ids = None

    def layer_pre_hook(
        self, index: int, module: nn.Module, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict]:
        if self.ids is None:
            raise RuntimeError(
                f"AoT layer {index} ran outside a forward of the patched {self.inner_name} "
                "(no input_ids recorded); calling layers directly and gradient checkpointing's "
                "recomputation are not supported"
            )
        hidden = args[0] if args else kwargs["hidden_states"]
        inplace = self.inplace and hidden.is_contiguous()
        out = self.adapter_of().layers[index](
            hidden, self.ids, self.embedding, self.task_ids, inplace=inplace
        )
        if args:
            return (out, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": out}
