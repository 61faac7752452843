"""Decoder-only models (GPT-2, LLaMA): what they share once the inner model is located.

The inner transformer (`GPT2Model`, `LlamaModel`) gets a pre-hook. On a first forward (no
cache or an empty one) it embeds the ids through the adapter, so the m prompt rows come
first, prepends m ones to the mask, and moves given positions behind the prompt
(`cat([0..m-1], position_ids + m)`); the given `position_ids` also pick the low-rank rows,
so left padding uses each token's position among real tokens. Later generation steps embed
their tokens plainly; only mask and positions shift by m, since the cache holds the prompt.
A stacked adapter's `task_ids` (B,) are popped from the model's call (or taken from the
running `generate`) and reach the first forward's embedding.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._hooks import AdapterOf, TaskIds, bind, cache_is_empty, extend_mask, needs_ids, row_ids

HEADS = ("lm", "cls", "base")


def install(
    model: nn.Module, inner: nn.Module, adapter_of: AdapterOf, head: str
) -> list[RemovableHandle]:
    """Hook `inner` (and `model` for its labels or pooling). head: "lm", "cls" or "base".

    "lm": labels get m leading -100s (logits keep the prompt rows, as in PEFT).
    "cls": the prompt rows are cut from the inner output, so the head pools over the
    tokens it indexes with its own `input_ids` (its last non-pad token).
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    hooks = _DecoderHooks(adapter_of, trim=head == "cls")
    handles = hooks.tasks.install(model)
    handles.append(inner.register_forward_pre_hook(hooks.inner_pre_hook, with_kwargs=True))
    if head == "cls":
        handles.append(inner.register_forward_hook(hooks.trim_hook))
    if head == "lm":
        handles.append(model.register_forward_pre_hook(hooks.labels_pre_hook, with_kwargs=True))
    return handles


class _DecoderHooks:
    def __init__(self, adapter_of: AdapterOf, trim: bool) -> None:
        self.adapter_of = adapter_of
        self.tasks = TaskIds()
        # With `trim` ("cls" head): rows prepended by each open inner call, for `trim_hook`.
        self.prepended: list[int] | None = [] if trim else None

    def inner_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kw = bind(module, args, kwargs)
        own_tasks = kw.pop("task_ids", None)
        adapter = self.adapter_of()
        m = adapter.num_virtual_tokens
        positions = kw.get("position_ids")
        if cache_is_empty(kw.get("past_key_values")):
            ids = needs_ids(kw, type(module).__name__)
            if kw.get("token_type_ids") is not None:
                raise ValueError("token_type_ids are not supported with a soft prompt")
            rows = row_ids(positions, ids)
            weight = module.get_input_embeddings().weight
            task_ids = self.tasks.resolve(own_tasks, ids.shape[0])
            kw["inputs_embeds"] = adapter.embed(ids, weight, position_ids=rows, task_ids=task_ids)
            kw["input_ids"] = None
            if rows is not None:
                prompt_pos = torch.arange(m, device=rows.device, dtype=rows.dtype)
                kw["position_ids"] = torch.cat(
                    [prompt_pos.expand(rows.shape[0], m), rows + m], dim=1
                )
            if self.prepended is not None:
                self.prepended.append(m)
        else:
            if positions is not None:
                kw["position_ids"] = positions + m
            if self.prepended is not None:
                self.prepended.append(0)
        kw["attention_mask"] = extend_mask(kw.get("attention_mask"), m)
        return (), kw

    def trim_hook(self, module: nn.Module, args: tuple, output):
        m = self.prepended.pop() if self.prepended else 0
        if m:
            output.last_hidden_state = output.last_hidden_state[:, m:]
            if getattr(output, "hidden_states", None) is not None:
                output.hidden_states = tuple(h[:, m:] for h in output.hidden_states)
        return output

    def labels_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kw = bind(module, args, kwargs)
        labels = kw.get("labels")
        if labels is not None and cache_is_empty(kw.get("past_key_values")):
            m = self.adapter_of().num_virtual_tokens
            ignore = labels.new_full((labels.shape[0], m), -100)
            kw["labels"] = torch.cat([ignore, labels], dim=1)
        return (), kw
