"""BERT and RoBERTa (the AoT paper's own backbones): AoT P-tuning only.

The bias goes before every layer of the encoder (`encoder.layer`), whose input is the
embedding output after its LayerNorm and dropout. The prompt methods are not wired here.
"""

from __future__ import annotations

from torch import nn

from ._hooks import find_inner
from ._registry import Architecture, register

MODEL_TYPES = ("bert", "roberta")


def aot_sites(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(the BertModel / RobertaModel inside `model`, its layers)."""
    from transformers import BertModel, RobertaModel

    inner = find_inner(model, (BertModel, RobertaModel))
    return inner, inner.encoder.layer


for _model_type in MODEL_TYPES:
    register(Architecture(_model_type, aot_sites))
