"""Decoder-only models (GPT-2, LLaMA): what they share once the inner model is located.

The inner transformer (`GPT2Model`, `LlamaModel`) gets a pre-hook. On a first forward (a
cache holding no tokens, or none) it embeds the ids through the adapter, inside the call of
the embedding module (`FusedEmbedding`), so the m prompt rows come first, prepends m ones
to the mask, and moves given positions behind the prompt (`cat([0..m-1], position_ids + m)`);
the given `position_ids` also pick the low-rank rows, so left padding uses each token's
position among real tokens. Later generation steps embed their tokens plainly; only mask and
positions shift by m, since the cache holds the prompt. A generation without the cache
re-runs the whole sequence each step: the tokens past generate's input take no delta.
A stacked adapter's `task_ids` (B,) are popped from the model's call (or taken from the
running `generate`) and reach the first forward's embedding.

The hooks find the cache, mask, positions and embeddings by the installed forward's
signature (`Signature`): transformers 5.24 renamed `past_key_values` to `cache`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._hooks import (
    AdapterOf,
    FusedEmbedding,
    TaskIds,
    bind,
    cache_length,
    extend_mask,
    generation,
    needs_ids,
    row_ids,
    signature,
)

HEADS = ("lm", "cls", "base")
_INNER_NEEDS = ("input_ids", "attention_mask", "inputs_embeds", "position_ids", "cache")
_INNER_WANTS = ("cache_position",)


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
    # Checked before any hook is registered: a missing argument fails the patch, whole.
    inner_args = signature(type(inner), _INNER_NEEDS, _INNER_WANTS)
    model_args = signature(type(model), ("labels", "cache")) if head == "lm" else None
    hooks = _DecoderHooks(adapter_of, inner_args, model_args, trim=head == "cls")
    handles = hooks.tasks.install(model)
    handles += hooks.fused.install(inner.get_input_embeddings())
    handles.append(inner.register_forward_pre_hook(hooks.inner_pre_hook, with_kwargs=True))
    if head == "cls":
        handles.append(inner.register_forward_hook(hooks.trim_hook))
    if head == "lm":
        handles.append(model.register_forward_pre_hook(hooks.labels_pre_hook, with_kwargs=True))
    return handles


class _DecoderHooks:
    def __init__(self, adapter_of: AdapterOf, inner_args, model_args, trim: bool) -> None:
        self.adapter_of = adapter_of
        self.inner_args = inner_args
        self.model_args = model_args
        self.tasks = TaskIds()
        self.fused = FusedEmbedding(adapter_of)
        # With `trim` ("cls" head): rows prepended by each open inner call, for `trim_hook`.
        self.prepended: list[int] | None = [] if trim else None

    def inner_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        sig = self.inner_args
        kw = bind(module, args, kwargs)
        own_tasks = kw.pop("task_ids", None)
        m = self.adapter_of().num_virtual_tokens
        positions = sig.get(kw, "position_ids")
        cache_position = sig.get(kw, "cache_position")
        first = cache_length(sig.get(kw, "cache")) == 0
        if first:
            ids = needs_ids(kw, type(module).__name__)
            if kw.get("token_type_ids") is not None:
                raise ValueError("token_type_ids are not supported with a soft prompt")
            rows = row_ids(positions, ids)
            task_ids = self.tasks.resolve(own_tasks, ids.shape[0])
            sig.set(kw, "inputs_embeds", self._embed(module, ids, rows, task_ids))
            sig.set(kw, "input_ids", None)
            if rows is not None:
                prompt_pos = torch.arange(m, device=rows.device, dtype=rows.dtype)
                sig.set(
                    kw, "position_ids", torch.cat([prompt_pos.expand(len(rows), m), rows + m], 1)
                )
            if cache_position is not None:
                prompt_pos = torch.arange(m, device=cache_position.device)
                sig.set(
                    kw,
                    "cache_position",
                    torch.cat([prompt_pos.to(cache_position), cache_position + m]),
                )
        else:
            if positions is not None:
                sig.set(kw, "position_ids", positions + m)
            if cache_position is not None:
                sig.set(kw, "cache_position", cache_position + m)
        if self.prepended is not None:
            self.prepended.append(m if first else 0)
        sig.set(kw, "attention_mask", extend_mask(sig.get(kw, "attention_mask"), m))
        return (), kw

    def _embed(
        self, module: nn.Module, ids: Tensor, rows: Tensor | None, task_ids: Tensor | None
    ) -> Tensor:
        """(B, m + s, d) for a first forward. Under a `generate` that runs without the cache,
        the tokens past its input are generated ones: plain embeddings, no delta (their
        positions may lie past max_length)."""
        embedding = module.get_input_embeddings()
        running = generation(self.tasks.model)
        given = ids.shape[1]
        if running is not None and running.input_length is not None:
            given = min(running.input_length, given)
        head_rows = None if rows is None else rows[:, :given]
        embeds = self.fused(embedding, ids[:, :given], head_rows, task_ids)
        if given == ids.shape[1]:
            return embeds
        return torch.cat([embeds, embedding(ids[:, given:])], dim=1)

    def trim_hook(self, module: nn.Module, args: tuple, output):
        m = self.prepended.pop() if self.prepended else 0
        if m:
            output.last_hidden_state = output.last_hidden_state[:, m:]
            if getattr(output, "hidden_states", None) is not None:
                output.hidden_states = tuple(h[:, m:] for h in output.hidden_states)
        return output

    def labels_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        sig = self.model_args
        kw = bind(module, args, kwargs)
        labels = sig.get(kw, "labels")
        if labels is not None and cache_length(sig.get(kw, "cache")) == 0:
            m = self.adapter_of().num_virtual_tokens
            ignore = labels.new_full((labels.shape[0], m), -100)
            sig.set(kw, "labels", torch.cat([ignore, labels], dim=1))
        return (), kw
