"""The encoder-only architectures (BERT, RoBERTa, DeBERTa-v2: the AoT paper's backbones), one
`Encoder` row each in `ENCODERS`: AoT P-tuning only; the prompt methods are not wired here.

The bias goes before every layer of the base model's encoder (`encoder.layer`). The first
layer's input is the embedding output (after its LayerNorm, mask and dropout), each later
one the previous layer's output.

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

from ._hooks import find_inner, transformers_version
from ._registry import Architecture, register


@dataclass(frozen=True)
class Encoder:
    """One encoder-only architecture: its model type, the transformers class of its base
    model (imported by name when a model is patched), and the layers whose input the model
    reads again after the layer (`Architecture.reread`)."""

    model_type: str
    base: str
    reread: tuple[int, ...] = ()

    def locate(self, model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
        """(the base model inside `model`, its encoder's layers)."""
        import transformers

        cls = getattr(transformers, self.base, None)
        if cls is None:
            raise TypeError(
                f"{self.model_type} support needs transformers.{self.base}, which "
                f"transformers {transformers_version()} does not have"
            )
        inner = find_inner(model, cls)
        return inner, inner.encoder.layer


ENCODERS = (
    Encoder("bert", "BertModel"),
    Encoder("roberta", "RobertaModel"),
    Encoder("deberta-v2", "DebertaV2Model", reread=(0,)),
)

for _encoder in ENCODERS:
    register(Architecture(_encoder.model_type, _encoder.locate, reread=_encoder.reread))
