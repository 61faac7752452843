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

Padding trim (on unless `patch(..., trim_padding=False)`): the hook that embeds cuts the
trailing columns that the mask marks padding in every row from the ids, mask and positions
first, so the fused op, the encoder and the decoder's cross-attention run on m + s' columns.
Leading columns stay: T5's relative attention bias reads the distance between the prompt
and each token, which cutting them would shorten. The encoder's states go back to the
caller at m + s columns (zeros in the cut ones): `encoder_last_hidden_state`, the output of
`T5EncoderModel` and of the encoder call `generate` makes, whose decoder steps then read
them with the caller's mask. A trimmed call of the encoder-decoder returns no KV cache
(its cross-attention half would span m + s' columns) unless `use_cache=True` is passed,
which keeps the call untrimmed.

Visual rows (CLIP-T5, docs/design.md §1): `visual_embeds` (B, n_v, d) and an optional
`visual_attention_mask` (B, n_v), given to the forward of any T5 model here or to
`generate`, are routed as `task_ids` are (`TaskIds.visual`: popped from the top-level call,
or held by the running `generate` and repeated per beam). The hook that embeds has the fused
op write them after the tokens, `[P; E[ids] + delta; V]`, and extends the mask to
`[1 (m); attention_mask (or ones); visual mask (or ones)]`; the encoder's states then have
m + s + n_v columns, and generate's decoding steps extend the caller's (B, s) mask the same
way for the cross-attention. A call with visual rows is never trimmed: the visual rows sit
after the text, so cutting padding columns would shorten the relative distances between
them and the tokens, which T5's attention bias reads (as with leading columns above).
"""

from __future__ import annotations

from torch import nn
from torch.utils.hooks import RemovableHandle

from ._hooks import (
    VISUAL_ARGS,
    AdapterOf,
    Cut,
    FusedEmbedding,
    Signature,
    TaskIds,
    Visual,
    bind,
    call_keeps_shapes,
    checked_cut,
    extend_mask,
    needs_ids,
    restore_outputs,
    row_ids,
    signature,
)
from ._per_thread import HookState, PerThread
from ._registry import Architecture, register

_STACK_NEEDS = ("input_ids", "attention_mask", "inputs_embeds")
_SEQ2SEQ_NEEDS = (*_STACK_NEEDS, "encoder_outputs")
# Per-column outputs of the encoder stack and of the encoder-decoder, restored after a trim.
_STACK_OUTPUTS = ("last_hidden_state", "hidden_states")
_SEQ2SEQ_OUTPUTS = ("encoder_last_hidden_state", "encoder_hidden_states")


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
    # T5ForQuestionAnswering makes its decoder input from input_ids, which the hook replaces.
    hooks.decoder_from_ids = isinstance(model, T5ForQuestionAnswering)
    handles = hooks.tasks.install(model)
    handles += hooks.fused.install(encoder.embed_tokens)
    handles.append(encoder.register_forward_pre_hook(hooks.encoder_pre_hook, with_kwargs=True))
    handles.append(encoder.register_forward_hook(hooks.encoder_hook, always_call=True))
    if seq2seq is not None:
        handles.append(seq2seq.register_forward_pre_hook(hooks.seq2seq_pre_hook, with_kwargs=True))
        handles.append(seq2seq.register_forward_hook(hooks.seq2seq_hook, always_call=True))
    else:
        handles.append(
            model.register_forward_pre_hook(hooks.encoder_model_pre_hook, with_kwargs=True)
        )
    return handles


class _T5Hooks(HookState):
    # The cut of each open encoder / encoder-decoder call (None: untrimmed), pushed first
    # thing by its pre-hook and popped by its forward hook (which runs on errors too). Each
    # thread's own (`_per_thread`).
    stack_cuts = PerThread(list)
    seq2seq_cuts = PerThread(list)

    def __init__(self, adapter_of: AdapterOf, stack_args: Signature, top_args: Signature) -> None:
        self.adapter_of = adapter_of
        self.stack_args = stack_args
        self.top_args = top_args
        self.tasks = TaskIds(visual=True)
        self.fused = FusedEmbedding(adapter_of)
        self.decoder_from_ids = False

    def _embed(
        self, kw: dict, sig: Signature, encoder: nn.Module, where: str, trim: bool
    ) -> Cut | None:
        """Embed the call's ids in `kw` (trimmed first when `trim` finds padding); returns
        the cut."""
        ids = needs_ids(kw, where)
        rows = row_ids(kw.pop("position_ids", None), ids)
        weight = encoder.embed_tokens.weight
        visual = self.tasks.visual(kw, ids.shape[0], encoder.config.d_model, weight.device)
        trim = trim and visual is None  # see the module docstring
        task_ids = self.tasks.resolve(kw.pop("task_ids", None), ids.shape[0])
        cut, checked = None, False
        if trim:
            # The op's id ranges are read with the mask's runs: one read for the forward.
            ranges = self.fused.id_ranges(encoder.embed_tokens, ids, rows, task_ids)
            cut, checked = checked_cut(sig.get(kw, "attention_mask"), ranges, leading=False)
        if cut is not None:
            ids = cut.take(ids)
            rows = None if rows is None else cut.take(rows)
            sig.set(kw, "attention_mask", cut.take(sig.get(kw, "attention_mask")))
        after = None if visual is None else visual.embeds
        embeds = self.fused(encoder.embed_tokens, ids, rows, task_ids, after, checked=checked)
        sig.set(kw, "inputs_embeds", embeds)
        sig.set(kw, "input_ids", None)
        self._extend_mask(kw, sig, visual, ids.shape[1])
        return cut

    def _extend_mask(self, kw: dict, sig: Signature, visual: Visual | None, s: int) -> None:
        """The call's (B, s) mask -> `[1 (m); mask; visual mask]`, as the encoder input."""
        mask = sig.get(kw, "attention_mask")
        if visual is not None:
            mask = visual.extend_mask(mask, s)
        m = self.adapter_of().num_virtual_tokens
        sig.set(kw, "attention_mask", extend_mask(mask, m))

    def _trims(self, kw: dict, module: nn.Module) -> bool:
        return self.adapter_of.trim_padding is not False and call_keeps_shapes(kw, module.config)

    def encoder_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.stack_cuts.append(None)
        kw = bind(module, args, kwargs)
        if self.stack_args.get(kw, "input_ids") is not None:
            trim = self._trims(kw, module)
            self.stack_cuts[-1] = self._embed(kw, self.stack_args, module, "T5 encoder", trim)
        else:
            kw.pop("task_ids", None)
            if any(kw.pop(k, None) is not None for k in VISUAL_ARGS):
                raise ValueError(
                    "the patched T5 encoder got visual rows with inputs_embeds: they are "
                    "written with the embedding of input_ids (pass input_ids)"
                )
        return (), kw

    def encoder_hook(self, module: nn.Module, args: tuple, output) -> None:
        if self.stack_cuts:
            restore_outputs(output, self.stack_cuts.pop(), _STACK_OUTPUTS)

    def seq2seq_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.seq2seq_cuts.append(None)
        sig = self.top_args
        kw = bind(module, args, kwargs)
        if sig.get(kw, "encoder_outputs") is None:
            decoder_input = (kw.get("decoder_input_ids"), kw.get("decoder_inputs_embeds"))
            if self.decoder_from_ids and all(x is None for x in decoder_input):
                # As HF's QA head would, from the caller's ids: the answer spans index them.
                kw["decoder_input_ids"] = module._shift_right(needs_ids(kw, type(module).__name__))
            # A cache the caller asked for would hold cross-attention keys of m + s' columns.
            trim = self._trims(kw, module) and kw.get("use_cache") is not True
            cut = self._embed(kw, sig, module.encoder, type(module).__name__, trim)
            if cut is not None:
                kw["use_cache"] = False
            self.seq2seq_cuts[-1] = cut
        else:
            # The encoder has run (generate's decoding steps): nothing depends on the task;
            # the cross-attention's mask gains the prompt's and the visual rows' columns.
            kw.pop("position_ids", None)
            kw.pop("task_ids", None)
            states = sig.get(kw, "encoder_outputs")[0]
            visual = self.tasks.visual(kw, states.shape[0], None)
            m = self.adapter_of().num_virtual_tokens
            n_v = 0 if visual is None else visual.embeds.shape[1]
            self._extend_mask(kw, sig, visual, states.shape[1] - m - n_v)
        return (), kw

    def seq2seq_hook(self, module: nn.Module, args: tuple, output) -> None:
        if self.seq2seq_cuts:
            restore_outputs(output, self.seq2seq_cuts.pop(), _SEQ2SEQ_OUTPUTS)

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


register(Architecture("t5", aot_sites, install))
