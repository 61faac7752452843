"""Encoder-only models (the rows of `encoders.ENCODERS`): the prompt methods' hooks, once the
base model (`BertModel`, `RobertaModel`, `DebertaV2Model`) is located.

They feed the base model what PEFT's prompt tuning feeds it (`PeftModelForSequenceClassification`,
peft 0.17 to 0.21), with the formula's rows in place of `[P; E[ids]]`:
- `inputs_embeds` = `[P; E[ids] + delta]` (B, m + s, d), built inside the call of the word
  embedding module (`FusedEmbedding`);
- `attention_mask` with m ones in front; left None when the caller passes none (the model
  then attends to all m + s columns, as it does for PEFT);
- `token_type_ids` with m zeros in front, when given (segment A for the prompt);
- no `position_ids`: the model numbers the m + s rows itself, the prompt 0..m-1 and token t
  at m + t (RoBERTa from `pad_token_id + 1` on, since its positions come from
  `inputs_embeds`, padding included); DeBERTa-v2's relative attention measures distances
  over the same rows. PEFT drops a caller's `position_ids` with a warning; here they are
  refused (the result would not depend on them). The low-rank rows are the token
  positions t = 0..s-1 (docs/design.md §1).
The output keeps the prompt rows, as under PEFT: per-position outputs have m + s rows, and
the heads that pool row 0 (BERT's pooler, RoBERTa's classification head, DeBERTa-v2's
`ContextPooler`) read the first *prompt* row, not the [CLS] token.

A stacked adapter's `task_ids` (B,) are popped from the model's call. No padding trim: the
hooks run every column the caller passes (`patch(..., trim_padding=True)` is refused).
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
    extend_mask,
    needs_ids,
    signature,
)

_NEEDS = ("input_ids", "attention_mask", "inputs_embeds", "token_type_ids")
_WANTS = ("position_ids",)


def install(model: nn.Module, inner: nn.Module, adapter_of: AdapterOf) -> list[RemovableHandle]:
    """Hook `inner`, the base model inside `model` (or `model` itself), and `model` for its
    `task_ids`."""
    if adapter_of.trim_padding:
        raise ValueError(
            f"trim_padding is not supported on {type(model).__name__}: the encoder hooks run "
            "every column the caller passes (leave trim_padding None or False)"
        )
    if getattr(inner.config, "is_decoder", False):
        raise TypeError(
            f"{type(inner).__name__} configured as a decoder (config.is_decoder=True) is not "
            "supported by the prompt methods; they serve the bidirectional encoder"
        )
    # Checked before any hook is registered: a missing argument fails the patch, whole.
    hooks = _EncoderHooks(adapter_of, signature(type(inner), _NEEDS, _WANTS))
    handles = hooks.tasks.install(model)
    handles += hooks.fused.install(inner.get_input_embeddings())
    handles.append(inner.register_forward_pre_hook(hooks.pre_hook, with_kwargs=True))
    return handles


class _EncoderHooks:
    def __init__(self, adapter_of: AdapterOf, args: Signature) -> None:
        self.adapter_of = adapter_of
        self.args = args
        self.tasks = TaskIds()
        self.fused = FusedEmbedding(adapter_of)

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
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
        m = self.adapter_of().num_virtual_tokens
        types = sig.get(kw, "token_type_ids")
        if types is not None:
            sig.set(kw, "token_type_ids", _prefix_types(types, ids, m))
        task_ids = self.tasks.resolve(own_tasks, ids.shape[0])
        embedding = module.get_input_embeddings()
        sig.set(kw, "inputs_embeds", self.fused(embedding, ids, None, task_ids))
        sig.set(kw, "input_ids", None)
        sig.set(kw, "attention_mask", extend_mask(sig.get(kw, "attention_mask"), m))
        return (), kw


def _prefix_types(types: object, ids: Tensor, m: int) -> Tensor:
    """(B, m + s): segment 0 for the prompt rows, then the caller's (B, s) token types."""
    if not isinstance(types, Tensor) or types.shape != ids.shape:
        shape = tuple(types.shape) if isinstance(types, Tensor) else type(types).__name__
        raise ValueError(
            f"token_type_ids must have the shape of input_ids {tuple(ids.shape)}, got {shape}"
        )
    return torch.cat([types.new_zeros(types.shape[0], m), types], dim=1)
