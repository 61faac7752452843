"""The encoder-only architectures (BERT, RoBERTa, DeBERTa-v2: the AoT paper's backbones), one
`Encoder` row each in `ENCODERS`, registered for both sites.

Prompt methods (DePT, prompt tuning, EPT; site "input_embedding") serve the base model and
its sequence-classification head (`Encoder.heads`); other heads are refused with a
TypeError naming those. The hooks (`_encoder.py`) feed the base model what PEFT's prompt
tuning feeds it: the formula's `[P; E[ids] + delta]` as `inputs_embeds`, the mask with m
ones in front, `token_type_ids` with m zeros in front, and no `position_ids`, so the model
numbers the prompt 0..m-1 and the tokens from m. The outputs keep the prompt rows, so the
classifier, which pools row 0, reads the first prompt row, as under PEFT. Padding trim
cuts trailing all-padding columns (`_encoder.py`).
A row's absolute position table (`position_table`; RoBERTa's first `pad_token_id + 1` rows
precede position 0, `positions_after_pad`; DeBERTa-v2 reads its table only with
`config.position_biased_input`, `position_flag`) bounds m + s: a pre-hook says so
(`PositionLimit`) where HF would fail inside the embedding.

AoT P-tuning (site "layer_input") serves every head. The bias goes before every layer of
the base model's encoder (`encoder.layer`). The first layer's input is the embedding output
(after its LayerNorm, mask and dropout), each later one the previous layer's output.

DeBERTa-v2's encoder (transformers 4.57 to 5) keeps that placement:
- Relative positions: each layer also receives the relative-position embeddings
  (`encoder.rel_embeddings`, normalised) and the relative positions, as arguments apart
  from the hidden state, built from parameters and the sequence length alone. The bias
  goes on the hidden state only and never reaches them.
- The convolution (`conv_kernel_size > 0`, as in DeBERTa-v2-xlarge) is no layer: after
  layer 0 the encoder replaces layer 0's output by `conv(embedding output, that output,
  mask)`, which is layer 1's input, so layer 1's bias goes on the convolution's output. It
  reads the embedding output as the encoder received it, without layer 0's bias (which a
  pre-hook adds to layer 0's input only): so that bias is never added in place there
  (`reread=(0,)`), or the convolution would read it too.
- `DebertaV2Model` runs each layer once per forward: its `z_steps` re-run of the last
  layer is fixed off (`z_steps = 0`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.utils.hooks import RemovableHandle

from . import _encoder
from ._hooks import AdapterOf, PositionLimit, find_inner, transformers_class
from ._registry import Architecture, register


@dataclass(frozen=True)
class Encoder:
    """One encoder-only architecture: its model type, the transformers classes of its base
    model and of the heads the prompt methods serve (imported by name when a model is
    patched), its absolute position table (module docstring) and the layers whose input the
    model reads again after the layer (`Architecture.reread`)."""

    model_type: str
    name: str  # as messages spell it
    base: str
    heads: tuple[str, ...]
    position_table: str | None = "max_position_embeddings"
    positions_after_pad: bool = False
    position_flag: str | None = None
    reread: tuple[int, ...] = ()

    def _class(self, name: str) -> type:
        return transformers_class(name, self.model_type)

    def locate(self, model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
        """(the base model inside `model`, its encoder's layers)."""
        inner = find_inner(model, self._class(self.base))
        return inner, inner.encoder.layer

    def install(self, model: nn.Module, adapter_of: AdapterOf) -> list[RemovableHandle]:
        """The prompt methods' hooks on `model` (site "input_embedding")."""
        served = (self.base, *self.heads)
        if not isinstance(model, tuple(self._class(n) for n in served)):
            raise TypeError(
                f"prompt methods on {self.name} cover {' and '.join(served)}, got "
                f"{type(model).__name__} (AoTConfig serves every {self.name} head)"
            )
        inner = self.locate(model)[0]
        head = "base" if model is inner else "cls"
        handles = _encoder.install(model, inner, adapter_of, head)
        limit = self._position_limit(inner, adapter_of)
        if limit is not None:
            # First among the base model's pre-hooks: it reads the caller's ids.
            handles.append(inner.register_forward_pre_hook(limit, with_kwargs=True, prepend=True))
        return handles

    def _position_limit(self, inner: nn.Module, adapter_of: AdapterOf) -> PositionLimit | None:
        config = inner.config
        if self.position_table is None or not getattr(config, self.position_flag or "", True):
            return None
        reserved = config.pad_token_id + 1 if self.positions_after_pad else 0
        return PositionLimit(adapter_of, self.name, self.position_table, inner, reserved)


ENCODERS = (
    Encoder("bert", "BERT", "BertModel", ("BertForSequenceClassification",)),
    Encoder(
        "roberta",
        "RoBERTa",
        "RobertaModel",
        ("RobertaForSequenceClassification",),
        positions_after_pad=True,
    ),
    Encoder(
        "deberta-v2",
        "DeBERTa-v2",
        "DebertaV2Model",
        ("DebertaV2ForSequenceClassification",),
        position_flag="position_biased_input",
        reread=(0,),
    ),
)

for _encoder_row in ENCODERS:
    register(
        Architecture(
            _encoder_row.model_type,
            _encoder_row.locate,
            _encoder_row.install,
            reread=_encoder_row.reread,
        )
    )
