"""T5: the prompt and the delta go on the encoder input; the decoder is untouched.

Two hooks keep one rule, "the hook that embeds the ids extends the mask":
- the encoder stack embeds `input_ids` when it receives them (T5EncoderModel, and the
  encoder call `generate()` makes) and prepends m ones to its mask;
- the encoder-decoder module embeds `input_ids` itself when it must run the encoder, hands
  the encoder `inputs_embeds` (which its hook passes through), and always extends
  `attention_mask`, which the decoder's cross-attention also reads against the m + s
  encoder states, including when `encoder_outputs` come from `generate()`.
Both embed inside the call of the encoder's `embed_tokens` (`FusedEmbedding`), where
engines that shard parameters have gathered its weight.
T5 has relative positions, so the low-rank rows are positions t unless the caller passes
`position_ids` (consumed here; T5 itself takes none). A stacked adapter's `task_ids` (B,)
are popped from the model's call (or taken from the running `generate`, whose encoder call
the encoder hook embeds) and reach the encoder input's embedding.
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
    row_ids,
    signature,
)

MODEL_TYPE = "t5"
_STACK_NEEDS = ("input_ids", "attention_mask", "inputs_embeds")
_SEQ2SEQ_NEEDS = (*_STACK_NEEDS, "encoder_outputs")


def install(model: nn.Module, adapter_of: AdapterOf) -> list[RemovableHandle]:
    from transformers import (
        T5EncoderModel,
        T5ForConditionalGeneration,
        T5ForQuestionAnswering,
        T5ForSequenceClassification,
        T5Model,
    )

    if isinstance(model, (T5ForConditionalGeneration, T5Model, T5ForQuestionAnswering)):
        seq2seq = model
    elif isinstance(model, T5ForSequenceClassification):
        seq2seq = model.transformer
    elif isinstance(model, T5EncoderModel):
        seq2seq = None
    else:
        raise TypeError(
            "T5 support covers T5ForConditionalGeneration, T5Model, T5EncoderModel, "
            f"T5ForSequenceClassification and T5ForQuestionAnswering, got {type(model).__name__}"
        )
    encoder = model.get_encoder() if seq2seq is None else seq2seq.encoder
    # Checked before any hook is registered: a missing argument fails the patch, whole.
    top = signature(
        type(model if seq2seq is None else seq2seq), _SEQ2SEQ_NEEDS[: 3 + bool(seq2seq)]
    )
    hooks = _T5Hooks(adapter_of, signature(type(encoder), _STACK_NEEDS), top)
    handles = hooks.tasks.install(model)
    handles += hooks.fused.install(encoder.embed_tokens)
    handles.append(encoder.register_forward_pre_hook(hooks.encoder_pre_hook, with_kwargs=True))
    if seq2seq is not None:
        handles.append(seq2seq.register_forward_pre_hook(hooks.seq2seq_pre_hook, with_kwargs=True))
    else:
        handles.append(
            model.register_forward_pre_hook(hooks.encoder_model_pre_hook, with_kwargs=True)
        )
    return handles


class _T5Hooks:
    def __init__(self, adapter_of: AdapterOf, stack_args: Signature, top_args: Signature) -> None:
        self.adapter_of = adapter_of
        self.stack_args = stack_args
        self.top_args = top_args
        self.tasks = TaskIds()
        self.fused = FusedEmbedding(adapter_of)

    def _embed(self, kw: dict, sig: Signature, encoder: nn.Module, where: str) -> None:
        ids = needs_ids(kw, where)
        rows = row_ids(kw.pop("position_ids", None), ids)
        task_ids = self.tasks.resolve(kw.pop("task_ids", None), ids.shape[0])
        sig.set(kw, "inputs_embeds", self.fused(encoder.embed_tokens, ids, rows, task_ids))
        sig.set(kw, "input_ids", None)
        m = self.adapter_of().num_virtual_tokens
        sig.set(kw, "attention_mask", extend_mask(sig.get(kw, "attention_mask"), m))

    def encoder_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kw = bind(module, args, kwargs)
        if self.stack_args.get(kw, "input_ids") is not None:
            self._embed(kw, self.stack_args, module, "T5 encoder")
        else:
            kw.pop("task_ids", None)
        return (), kw

    def seq2seq_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        sig = self.top_args
        kw = bind(module, args, kwargs)
        if sig.get(kw, "encoder_outputs") is None:
            self._embed(kw, sig, module.encoder, type(module).__name__)
        else:
            # The encoder has run (generate's decoding steps): nothing depends on the task.
            kw.pop("position_ids", None)
            kw.pop("task_ids", None)
            m = self.adapter_of().num_virtual_tokens
            sig.set(kw, "attention_mask", extend_mask(sig.get(kw, "attention_mask"), m))
        return (), kw

    def encoder_model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # The stack's hook cannot tell a user's inputs_embeds from its own: refuse them here,
        # where only the user calls, rather than run without the prompt.
        needs_ids(bind(module, args, kwargs), type(module).__name__)


def aot_sites(model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """(the encoder T5Stack inside `model`, the first sublayer of each of its blocks).

    AoT P-tuning biases the encoder only. The bias goes before each block's self-attention
    sublayer, the block's first operation on its input, rather than before the block: the
    same sum, and transformers before 4.52 checkpoints T5 blocks by calling `block.forward`,
    which skips the block's hooks but still calls the sublayer's.
    """
    from transformers.models.t5.modeling_t5 import T5Stack

    encoders = [m for m in model.modules() if isinstance(m, T5Stack) and not m.is_decoder]
    if not encoders:
        raise TypeError(f"T5 support needs a T5 encoder stack inside {type(model).__name__}")
    return encoders[0], [block.layer[0] for block in encoders[0].block]
