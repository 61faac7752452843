"""The generic path's encoder-decoder hooks (`_generic.py`): the prompt and the delta go on
the encoder input; the decoder is untouched. T5 keeps its own entry (`t5.py`).

One rule, as for T5: the encoder-decoder module's mask is extended by m on every call, since
the decoder's cross-attention reads it against the m + s encoder states, including in the
decoding steps of `generate`, which pass `encoder_outputs`. The encoder embeds its
`input_ids` through the adapter inside the call of its input embedding
(`FusedEmbedding`) on every call and prepends m ones to its mask, unless the
encoder-decoder call that runs it has done so already. Unlike T5's hooks, the encoder-decoder
call keeps its `input_ids`: heads and base models derive the decoder's input from them where
none is given (BART shifts them right), and its sequence-classification head finds its
<eos> tokens in them. The low-rank rows are the columns 0..s-1. No padding trim.
"""

from __future__ import annotations

from torch import nn
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
from ._per_thread import HookState, PerThread

ENCODER_NEEDS = ("input_ids", "attention_mask", "inputs_embeds")
SEQ2SEQ_NEEDS = ("input_ids", "attention_mask", "encoder_outputs")


def install(
    model: nn.Module,
    seq2seq: nn.Module,
    encoder: nn.Module,
    embedding: nn.Module,
    adapter_of: AdapterOf,
) -> list[RemovableHandle]:
    """Hook `encoder` (its input embedding `embedding`) and `seq2seq`, the encoder-decoder
    module running it inside `model`."""
    hooks = _Seq2SeqHooks(
        adapter_of,
        embedding,
        signature(type(encoder), ENCODER_NEEDS),
        signature(type(seq2seq), SEQ2SEQ_NEEDS),
    )
    handles = hooks.tasks.install(model)
    handles += hooks.fused.install(embedding)
    handles.append(encoder.register_forward_pre_hook(hooks.encoder_pre_hook, with_kwargs=True))
    handles.append(seq2seq.register_forward_pre_hook(hooks.seq2seq_pre_hook, with_kwargs=True))
    handles.append(seq2seq.register_forward_hook(hooks.seq2seq_hook, always_call=True))
    return handles


class _Seq2SeqHooks(HookState):
    # Per open encoder-decoder call, pushed by its pre-hook and popped by its forward hook
    # (which runs on errors too): whether the encoder it runs gets a mask extended by the
    # call already. Each thread's own (`_per_thread`).
    extended = PerThread(list)

    def __init__(
        self,
        adapter_of: AdapterOf,
        embedding: nn.Module,
        encoder_args: Signature,
        seq2seq_args: Signature,
    ) -> None:
        self.adapter_of = adapter_of
        self.embedding = embedding
        self.encoder_args = encoder_args
        self.seq2seq_args = seq2seq_args
        self.tasks = TaskIds()
        self.fused = FusedEmbedding(adapter_of)

    def seq2seq_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        sig = self.seq2seq_args
        kw = bind(module, args, kwargs)
        runs_encoder = sig.get(kw, "encoder_outputs") is None
        if runs_encoder:
            # Checked here, against the caller's mask, before it is extended.
            needs_ids(kw, type(module).__name__)
        self.extended.append(runs_encoder)
        m = self.adapter_of().num_virtual_tokens
        sig.set(kw, "attention_mask", extend_mask(sig.get(kw, "attention_mask"), m))
        return (), kw

    def seq2seq_hook(self, module: nn.Module, args: tuple, output) -> None:
        if self.extended:
            self.extended.pop()

    def encoder_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        sig = self.encoder_args
        kw = bind(module, args, kwargs)
        inside = bool(self.extended) and self.extended[-1]
        if inside:
            self.extended[-1] = False  # one encoder run per call
        mask = sig.get(kw, "attention_mask")
        # An extended mask has m more columns than the ids: checked by the outer call.
        ids = needs_ids(
            {"input_ids": sig.get(kw, "input_ids"), "attention_mask": None if inside else mask},
            type(module).__name__,
        )
        task_ids = self.tasks.resolve(kw.pop("task_ids", None), ids.shape[0])
        sig.set(kw, "inputs_embeds", self.fused(self.embedding, ids, None, task_ids))
        sig.set(kw, "input_ids", None)
        if not inside:
            m = self.adapter_of().num_virtual_tokens
            sig.set(kw, "attention_mask", extend_mask(mask, m))
        return (), kw
