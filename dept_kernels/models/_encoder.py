"""Encoder-only models (the rows of `encoders.ENCODERS`): the prompt methods' hooks, once the
base model (`BertModel`, `RobertaModel`, `DebertaV2Model`) is located.

They feed the base model what PEFT's prompt tuning feeds it
(`PeftModelForSequenceClassification`, peft 0.17 to 0.21), with the formula's rows in place
of its `[P; E[ids]]`:
- `inputs_embeds` = `[P; E[ids] + delta]` (B, m + s, d), built inside the call of the word
  embedding module (`FusedEmbedding`);
- `attention_mask` with m ones in front; left None when the caller passes none (the model
  then attends to all m + s columns, as it does for PEFT);
- `token_type_ids` with m zeros in front, when given (segment A for the prompt);
- no `position_ids`: the model numbers the m + s rows itself, the prompt 0..m-1 and token t
  at m + t (RoBERTa from `pad_token_id + 1` on, since its positions come from
  `inputs_embeds`, padding included); DeBERTa-v2's relative attention measures distances
  over the same rows. PEFT drops a caller's `position_ids` with a warning; here they are
  refused rather than ignored. The low-rank rows are the token positions t = 0..s-1
  (docs/design.md §1).
The output keeps the prompt rows, as under PEFT: per-position outputs have m + s rows, and
the heads that pool row 0 (BERT's pooler, RoBERTa's classification head, DeBERTa-v2's
`ContextPooler`) read the first *prompt* row, not the [CLS] token.

A stacked adapter's `task_ids` (B,) are popped from the model's call.

Padding trim: the trailing columns that the mask marks padding in every row are cut from the
ids, mask and token types before the fused op, so the model runs m + s' columns. Cutting
them changes no kept row: attention gives masked keys zero weight, each kept row keeps its
position (they follow the prompt, before the cut) and its relative distances, and DeBERTa-v2's
convolution reads the masked columns as zeros (its embedding output is multiplied by the
mask), as it reads the zero padding past the end. Leading columns stay: cutting them would
move every kept token's position. The base model's per-column outputs (`last_hidden_state`,
`hidden_states`) come back at m + s columns, zeros in the cut ones; the pooler and the
heads read row 0, the prompt's. On by default for the sequence-classification heads
(their logits are unchanged), opt-in (`trim_padding=True`) for the base models (their
padding columns read zeros), off with `trim_padding=False`, and never while tracing, with
`output_attentions=True` or `return_dict=False` (`call_keeps_shapes`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._hooks import (
    AdapterOf,
    FusedEmbedding,
    Signature,
    TaskIds,
    bind,
    call_keeps_shapes,
    checked_cut,
    extend_mask,
    needs_ids,
    restore_outputs,
    signature,
)
from ._per_thread import HookState, PerThread

_NEEDS = ("input_ids", "attention_mask", "inputs_embeds", "token_type_ids")
_WANTS = ("position_ids",)
HEADS = ("cls", "base")
# The base model's per-column outputs, restored to the caller's columns after a trim.
_OUTPUTS = ("last_hidden_state", "hidden_states")


def install(
    model: nn.Module, inner: nn.Module, adapter_of: AdapterOf, head: str
) -> list[RemovableHandle]:
    """Hook `inner`, the base model inside `model` (or `model` itself), and `model` for its
    `task_ids`. head: "cls" (a sequence-classification head) or "base" (`model` is `inner`)."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if getattr(inner.config, "is_decoder", False):
        raise TypeError(
            f"{type(inner).__name__} configured as a decoder (config.is_decoder=True) is not "
            "supported by the prompt methods; they serve the bidirectional encoder"
        )
    # Checked before any hook is registered: a missing argument fails the patch, whole.
    hooks = _EncoderHooks(adapter_of, signature(type(inner), _NEEDS, _WANTS), head)
    handles = hooks.tasks.install(model)
    handles += hooks.fused.install(inner.get_input_embeddings())
    handles.append(inner.register_forward_pre_hook(hooks.pre_hook, with_kwargs=True))
    handles.append(inner.register_forward_hook(hooks.restore_hook, always_call=True))
    return handles


class _EncoderHooks(HookState):
    # The cut of each open call (None: untrimmed), pushed first thing by the pre-hook and
    # popped by the forward hook (which runs on errors too). Each thread's own.
    cuts = PerThread(list)

    def __init__(self, adapter_of: AdapterOf, args: Signature, head: str) -> None:
        self.adapter_of = adapter_of
        self.args = args
        self.head = head
        self.tasks = TaskIds()
        self.fused = FusedEmbedding(adapter_of)

    def _trims(self, kw: dict, module: nn.Module) -> bool:
        setting = self.adapter_of.trim_padding
        if not (setting if self.head == "base" else setting is not False):
            return False
        return call_keeps_shapes(kw, module.config)

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.cuts.append(None)
        sig = self.args
        kw = bind(module, args, kwargs)
        own_tasks = kw.pop("task_ids", None)
        where = type(module).__name__
        ids = needs_ids(kw, where)
        if sig.get(kw, "inputs_embeds") is not None:
            raise ValueError(
                f"the patched {where} builds inputs_embeds from input_ids (prompt rows first); "
                "pass input_ids only"
            )
        if sig.get(kw, "position_ids") is not None:
            raise ValueError(
                f"position_ids are not supported by the patched {where}: the model numbers the "
                "prompt rows 0..m-1 and the tokens from m itself, as under PEFT's prompt "
                "tuning (which ignores them)"
            )
        types = sig.get(kw, "token_type_ids")
        _check_types(types, ids)
        mask = sig.get(kw, "attention_mask")
        task_ids = self.tasks.resolve(own_tasks, ids.shape[0])
        embedding = module.get_input_embeddings()
        cut, checked = None, False
        if self._trims(kw, module):
            # The op's id ranges are read with the mask's runs: one read for the forward.
            ranges = self.fused.id_ranges(embedding, ids, None, task_ids)
            cut, checked = checked_cut(mask, ranges, leading=False)
        if cut is not None:
            ids = cut.take(ids)
            sig.set(kw, "attention_mask", cut.take(mask))
            types = None if types is None else cut.take(types)
            self.cuts[-1] = cut
        m = self.adapter_of().num_virtual_tokens
        if types is not None:
            sig.set(kw, "token_type_ids", torch.cat([types.new_zeros(len(types), m), types], 1))
        sig.set(kw, "inputs_embeds", self.fused(embedding, ids, None, task_ids, checked=checked))
        sig.set(kw, "input_ids", None)
        sig.set(kw, "attention_mask", extend_mask(sig.get(kw, "attention_mask"), m))
        return (), kw

    def restore_hook(self, module: nn.Module, args: tuple, output) -> None:
        if self.cuts:
            restore_outputs(output, self.cuts.pop(), _OUTPUTS)


def _check_types(types: object, ids: Tensor) -> None:
    """Token types, when given, are (B, s) like the ids: m zeros go in front of each row."""
    if types is not None and (not isinstance(types, Tensor) or types.shape != ids.shape):
        shape = tuple(types.shape) if isinstance(types, Tensor) else type(types).__name__
        raise ValueError(
            f"token_type_ids must have the shape of input_ids {tuple(ids.shape)}, got {shape}"
        )
