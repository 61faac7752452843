"""GPT-2: the inner model is `.transformer` (wte + learned absolute positions wpe).

Positions matter here: they index `wpe`, so the prompt takes positions 0..m-1 and the tokens
follow from m, both on the first forward and through the KV cache.
"""

from __future__ import annotations

from torch import nn
from torch.utils.hooks import RemovableHandle

from . import _decoder
from ._hooks import AdapterOf, find_inner

MODEL_TYPE = "gpt2"


def install(model: nn.Module, adapter_of: AdapterOf) -> list[RemovableHandle]:
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Model

    if isinstance(model, GPT2LMHeadModel):
        return _decoder.install(model, model.transformer, adapter_of, head="lm")
    if isinstance(model, GPT2ForSequenceClassification):
        return _decoder.install(model, model.transformer, adapter_of, head="cls")
    if isinstance(model, GPT2Model):
        return _decoder.install(model, model, adapter_of, head="base")
    raise TypeError(
        f"GPT-2 support covers GPT2LMHeadModel, GPT2ForSequenceClassification and GPT2Model, "
        f"got {type(model).__name__}"
    )


def aot_sites(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(the GPT2Model inside `model`, its blocks `h`): where AoT P-tuning adds its bias."""
    from transformers import GPT2Model

    inner = find_inner(model, GPT2Model)
    return inner, inner.h
